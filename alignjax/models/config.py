"""The Llama-family architecture (`LlamaConfig`, transformers' field names) and the canonical
dtype spelling every model module keeps as static graph metadata."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from alignjax.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    WINDOWED_IMPLEMENTATIONS,
    resolved_implementation,
)

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True, eq=False)
class LlamaConfig:
    """The architecture, in transformers' field names (`from_hf` / `to_hf` convert).

    Equality and hash are those of the architecture: `num_key_value_heads` and `head_dim` left
    None compare equal to the values they resolve to (`kv_heads`, `dim_per_head`), so a config
    written by `to_hf` (which spells both out) and read back by `from_hf` equals the one it came
    from. Models keep their config as static graph metadata (`nnx.graphdef`), where an unequal
    but identical architecture would make every `nnx.jit` (`generate`, the train step) compile
    again.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama / Mistral: on q, k, v and o; Qwen2 sets qkv_bias
    qkv_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    sliding_window: int | None = None  # Mistral / Qwen2: see `attention_window`, `check_length`
    # Not a transformers field: how attention is computed (`attention`); never written to HF.
    attention_implementation: str = "auto"

    def __post_init__(self):
        # Modules keep the config as static metadata, which must be hashable: a dict is not.
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED}")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"`attention_implementation` must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                f"{self.attention_implementation!r}"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.kv_heads})"
            )

    def _key(self) -> tuple:
        resolved = {"num_key_value_heads": self.kv_heads, "head_dim": self.dim_per_head}
        return tuple(resolved.get(f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        """From a transformers `config.json` dict; unknown architectures raise ValueError."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED}")
        rope = config.get("rope_parameters") or config.get("rope_scaling")
        theta = config.get("rope_theta")
        if theta is None and rope:
            theta = rope.get("rope_theta")
        if rope and rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in config.items() if k in fields and k not in ("rope_scaling",)}
        kw.update(rope_theta=float(theta if theta is not None else 10000.0), rope_scaling=rope)
        if model_type == "qwen2":
            kw["qkv_bias"], kw["attention_bias"] = True, False
            if not config.get("use_sliding_window", False):
                kw["sliding_window"] = None
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        return cls(**kw)

    @property
    def attention_window(self) -> int | None:
        """The causal sliding window every layer applies: Mistral's `sliding_window`. Qwen2's
        applies to the layers from `max_window_layers` on only, which this config does not
        describe, so it stays None there (and `check_length` keeps such rows in the window)."""
        return self.sliding_window if self.model_type == "mistral" else None

    def check_length(self, length: int, *, full_sequence: bool = False) -> None:
        """Refuse rows longer than a sliding window where it is not applied: within the window
        it equals full causal attention, so rows up to the window are exact everywhere. Past
        it, only the model's forward over a full sequence (`full_sequence`) with an
        implementation that skips the keys outside the window ("blockwise",
        "pallas_splash", or "auto" where it resolves to "blockwise") and a Mistral window
        (`attention_window`) computes it; the dense paths and the KV-cache decode refuse such
        rows."""
        window = self.sliding_window
        if window is None or length <= window:
            return
        if (
            full_sequence
            and self.attention_window is not None
            and resolved_implementation(self.attention_implementation, length)
            in WINDOWED_IMPLEMENTATIONS
        ):
            return
        raise ValueError(
            f"sequence length {length} exceeds the sliding window {window} of this "
            f"{self.model_type} config; past the window, sliding-window attention is applied "
            f"only by the forward pass of a Mistral config with attention_implementation in "
            f"{WINDOWED_IMPLEMENTATIONS}"
        )

    @property
    def rope(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def to_hf(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rope_scaling"] = self.rope
        out.pop("qkv_bias")
        out.pop("attention_implementation")
        if out["sliding_window"] is None:
            out.pop("sliding_window")
        out["num_key_value_heads"] = self.kv_heads
        out["head_dim"] = self.dim_per_head
        if self.model_type == "qwen2":
            out.pop("attention_bias")
            out.pop("mlp_bias")
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        out["architectures"] = [arch[self.model_type]]
        return out


def canonical_dtype(dtype: Any) -> jnp.dtype | None:
    """One spelling per dtype: None stays None, anything `jnp.dtype` accepts (the scalar type
    `jnp.float32`, `jnp.dtype("float32")`, the string "float32", `np.float32`) becomes the
    `jnp.dtype` instance. Modules keep their dtypes as static graph metadata, and the spellings
    do not agree there: "float32" equals neither of the others, and `jnp.float32 ==
    jnp.dtype("float32")` although their hashes differ. Without this, two models of one
    architecture built with different spellings (a direct `LlamaForCausalLM(...)`, the trainer's
    `jnp.dtype(cfg.model.param_dtype)`, `load_pretrained`) have unequal `nnx.graphdef`s and each
    compiles `generate` (and any other `nnx.jit`) anew."""
    return None if dtype is None else jnp.dtype(dtype)
