"""Checkpoint loading; `load_model` is the entry point."""

from jpaged.model_loader.default_model import default_model_path
from jpaged.model_loader.loader import load_model, weight_bytes

__all__ = ["default_model_path", "load_model", "weight_bytes"]
