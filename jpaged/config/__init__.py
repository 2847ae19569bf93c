"""Configuration: `ModelConfig` (a checkpoint's config.json) and `EngineConfig`
(every engine option, from which the CLI flags are built)."""

from jpaged.config.engine import EngineConfig
from jpaged.config.model import ModelConfig

__all__ = ["EngineConfig", "ModelConfig"]
