"""Model registry: Hugging Face ``architectures`` name -> Flax model class."""

from jpaged.config.model import SUPPORTED_ARCHITECTURES, ModelConfig
from jpaged.models.bart import BartForConditionalGeneration
from jpaged.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "BartForConditionalGeneration": BartForConditionalGeneration,
    "MBartForConditionalGeneration": BartForConditionalGeneration,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def get_model_class(cfg: ModelConfig):
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(f"architecture {cfg.architecture!r} is not supported; "
                         f"supported: {', '.join(MODEL_REGISTRY)}") from None
