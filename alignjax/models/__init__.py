"""Models: a Llama-family decoder in Flax NNX with HF checkpoint I/O."""

from alignjax.models.checkpoint import load_pretrained, save_pretrained
from alignjax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    ModelOutput,
    attention_mask_4d,
    default_positions,
    rope_frequencies,
)

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelOutput",
    "attention_mask_4d",
    "default_positions",
    "load_pretrained",
    "rope_frequencies",
    "save_pretrained",
]
