"""Models: a Llama-family decoder in Flax NNX with HF checkpoint I/O."""

from alignjax.models.attention import resolved_implementation
from alignjax.models.checkpoint import load_pretrained, save_pretrained
from alignjax.models.flash_attention import SequenceMask, blockwise_attention
from alignjax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    ModelOutput,
    attention,
    attention_mask_4d,
    canonical_dtype,
    causal_attention,
    default_positions,
    grouped_query_attention,
    rope_frequencies,
)
from alignjax.models.projection import projection_dot_general
from alignjax.models.protocol import CausalLM
from alignjax.models.sampling import Generation, generate, generate_mixture, mixture_logits

__all__ = [
    "SequenceMask",
    "blockwise_attention",
    "CausalLM",
    "Generation",
    "generate",
    "generate_mixture",
    "mixture_logits",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelOutput",
    "attention_mask_4d",
    "attention",
    "canonical_dtype",
    "causal_attention",
    "default_positions",
    "grouped_query_attention",
    "load_pretrained",
    "projection_dot_general",
    "resolved_implementation",
    "rope_frequencies",
    "save_pretrained",
]
