"""A Llama-family decoder in Flax NNX: Llama 2 / 3 (with llama3 RoPE scaling), Mistral and Qwen2
(q/k/v biases). transformers 5 has no Flax models, so this is ours; its attribute paths mirror
transformers' module names (`model.layers.0.self_attn.q_proj`, ...) so that HF checkpoints map
onto it by renaming alone (`checkpoint.py`), with kernels transposed to the Flax layout.

    h = embed(ids)
    for each layer:  h = h + attn(rms_norm(h));  h = h + mlp(rms_norm(h))
    last_hidden_state = rms_norm(h);  logits = last_hidden_state @ unembed

Attention takes a boolean mask that combines causality, padding and packed segments
(`attention_mask_4d`); `config.attention_implementation` picks the kernel (`attention`): "auto"
is on CPU our grouped-query form, which skips the key blocks that causality hides, up to 256
positions and "blockwise" beyond, elsewhere `jax.nn.dot_product_attention` (optionally its cuDNN
kernel); "blockwise" takes the 2-D masks instead (`attention_masks`) and never holds
[B, H, T, T] scores. Positions
default to `cumsum(attention_mask) - 1` (left padding works), or restart at every packed segment.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.attention import (  # noqa: F401  (re-exported: models.llama.attention)
    ATTENTION_IMPLEMENTATIONS,
    apply_rope,
    attention,
    attention_mask_4d,
    attention_masks,
    causal_attention,
    default_positions,
    grouped_query_attention,
    rope_frequencies,
)
from alignjax.models.config import (  # noqa: F401  (re-exported: models.llama.LlamaConfig)
    SUPPORTED,
    LlamaConfig,
    canonical_dtype,
)
from alignjax.models.projection import projection_dot_general


def _canonical_lin(lin: dict) -> dict:
    """The `nnx.Linear` dtype keywords in canonical form (`param_dtype` None: float32)."""
    param_dtype = lin.get("param_dtype")
    return {
        "dtype": canonical_dtype(lin.get("dtype")),
        "param_dtype": canonical_dtype(jnp.float32 if param_dtype is None else param_dtype),
    }


class RMSNorm(nnx.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalised in float32 as transformers does."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        param_dtype = _canonical_lin({"param_dtype": param_dtype})["param_dtype"]
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def _linear(n_in, n_out, bias, cfg_kw, rngs):
    """A decoder projection: `nnx.Linear` whose matmul has the CPU-friendly weight gradient of
    `projection.projection_dot_general` (the same forward; autodiff's values up to sum order)."""
    return nnx.Linear(
        n_in, n_out, use_bias=bias, rngs=rngs, dot_general=projection_dot_general, **cfg_kw
    )


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lin: dict, rngs: nnx.Rngs):
        lin = _canonical_lin(lin)
        d, hd = cfg.hidden_size, cfg.dim_per_head
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = _linear(d, cfg.num_attention_heads * hd, qkv_bias, lin, rngs)
        self.k_proj = _linear(d, cfg.kv_heads * hd, qkv_bias, lin, rngs)
        self.v_proj = _linear(d, cfg.kv_heads * hd, qkv_bias, lin, rngs)
        self.o_proj = _linear(cfg.num_attention_heads * hd, d, cfg.attention_bias, lin, rngs)
        self.heads, self.kv, self.hd = cfg.num_attention_heads, cfg.kv_heads, hd
        self.implementation, self.window = cfg.attention_implementation, cfg.attention_window

    def __call__(self, x, positions, mask, inv_freq, cache=None):
        """`cache`: None, or (k_cache, v_cache, index) with [B, S, kv, hd] buffers: the new keys
        and values are written at slots index .. index + T and `mask` is [B, 1, T, S]."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.hd)
        k = self.k_proj(x).reshape(b, t, self.kv, self.hd)
        v = self.v_proj(x).reshape(b, t, self.kv, self.hd)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        impl = self.implementation
        if cache is None:
            out = attention(q, k, v, mask, implementation=impl, causal=True, window=self.window)
            new_cache = None
        else:
            k_cache, v_cache, index = cache
            k_cache = jax.lax.dynamic_update_slice_in_dim(
                k_cache, k.astype(k_cache.dtype), index, 1
            )
            v_cache = jax.lax.dynamic_update_slice_in_dim(
                v_cache, v.astype(v_cache.dtype), index, 1
            )
            k, v, new_cache = k_cache.astype(q.dtype), v_cache.astype(q.dtype), (k_cache, v_cache)
            out = attention(q, k, v, mask, implementation=impl)
        out = out.reshape(b, t, self.heads * self.hd)
        return self.o_proj(out), out, new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lin: dict, rngs: nnx.Rngs):
        lin = _canonical_lin(lin)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg.mlp_bias, lin, rngs)
        self.up_proj = _linear(d, f, cfg.mlp_bias, lin, rngs)
        self.down_proj = _linear(f, d, cfg.mlp_bias, lin, rngs)

    def __call__(self, x):
        act = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(act), act


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lin: dict, rngs: nnx.Rngs):
        lin = _canonical_lin(lin)
        pd = lin["param_dtype"]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, lin, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, lin, rngs)

    def __call__(self, h, positions, mask, inv_freq, cache=None):
        attn, heads, cache = self.self_attn(
            self.input_layernorm(h), positions, mask, inv_freq, cache
        )
        h = h + attn
        mlp, mlp_act = self.mlp(self.post_attention_layernorm(h))
        h = h + mlp
        return h, {"attn": heads, "mlp": mlp_act}, cache


def _rematerialised(layer, *args):
    """`layer(*args)` under `jax.checkpoint` (activations recomputed in the backward pass).

    A pure function of the layer's state, not `nnx.remat`: the layer's parameters may come from
    different traces (a LoRA policy's frozen base weights are constants of the jitted step, its
    adapters the differentiated arguments, a frozen reference's weights neither), which
    `nnx.remat`'s write-back refuses. The only state a call changes is the RNG counters of
    active dropout (an adapter's, rate > 0): written back then, and only then."""
    graphdef, state = nnx.split(layer)

    def pure(state, *args):
        module = nnx.merge(graphdef, state)
        out = type(module).__call__(module, *args)
        return out, nnx.state(module, nnx.Not(nnx.Param))

    out, changed = jax.checkpoint(pure)(state, *args)
    if any(
        isinstance(m, nnx.Dropout) and m.rate > 0 and not m.deterministic
        for _, m in nnx.iter_graph(layer)
    ):
        nnx.update(layer, changed)
    return out


class ModelOutput(NamedTuple):
    """`last_hidden_state` [B, T, D] (after the final norm: the input of the LM head);
    `hidden_states`: (embeddings, each layer's output) when requested; `activations`: per layer
    {"attn": attention output heads, "mlp": SwiGLU activations, "resid": residual stream} when
    requested (what MaPO reads)."""

    last_hidden_state: jax.Array
    hidden_states: tuple | None = None
    activations: tuple | None = None


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lin: dict, rngs: nnx.Rngs):
        lin = _canonical_lin(lin)
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, param_dtype=lin["param_dtype"], rngs=rngs
        )
        self.layers = nnx.List([DecoderLayer(cfg, lin, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=lin["param_dtype"])


class LlamaForCausalLM(nnx.Module):
    """The decoder with its LM head.

    Args:
      cfg: the architecture.
      dtype: compute dtype (e.g. bfloat16), None for the parameters' dtype.
      param_dtype: parameter dtype (float32 by default; None: float32).
        Both take any spelling `jnp.dtype` accepts (`jnp.bfloat16`, `jnp.dtype("bfloat16")`,
        "bfloat16") and are stored as `jnp.dtype` instances (`canonical_dtype`), so models of one
        architecture have equal graph definitions however their dtypes were written.
      remat: rematerialise each layer in the backward pass (less memory, more compute).
      rngs: initialisation.

    Example:
      >>> from flax import nnx
      >>> from alignjax.models import LlamaConfig, LlamaForCausalLM
      >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
      ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
      >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
      >>> out = model(jnp.zeros((2, 5), jnp.int32))
      >>> out.last_hidden_state.shape, model.logits(out.last_hidden_state).shape
      ((2, 5, 32), (2, 5, 64))
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        # Canonical forms (`canonical_dtype`): every spelling of the same dtypes gives the same
        # graph definition, so jitted functions of the model compile once per architecture.
        lin = _canonical_lin({"dtype": dtype, "param_dtype": param_dtype})
        self.config = cfg
        self.dtype = lin["dtype"]
        self.remat = bool(remat)
        self.model = LlamaModel(cfg, lin, rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs, **lin)
        )

    def step_with_cache(self, input_ids, positions, mask, caches, index):
        """Run T new tokens against a KV cache (the sampler's prefill and decode steps):
        returns the final hidden states [B, T, D] and the updated caches."""
        h = self.model.embed_tokens(input_ids)
        if self.dtype is not None:
            h = h.astype(self.dtype)
        inv_freq = rope_frequencies(self.config)
        new = []
        for layer, (k_cache, v_cache) in zip(self.model.layers, caches):
            h, _, cache = layer(h, positions, mask, inv_freq, (k_cache, v_cache, index))
            new.append(cache)
        return self.model.norm(h), new

    def unembed(self) -> jax.Array:
        """The [D, V] LM-head matrix (the transposed embedding when tied): what
        `ops.fused_token_logps` takes."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`hidden @ unembed()`: `[..., D]` hidden states (e.g. `last_hidden_state`) to
        `[..., V]` logits, in the compute dtype (`dtype`, else the parameters'). Materialises
        the logits: training reads log-probs through `ops.fused_token_logps` instead."""
        w = self.unembed()
        dt = w.dtype if self.dtype is None else self.dtype
        return hidden.astype(dt) @ w.astype(dt)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        prefix_ids: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_activations: bool = False,
    ) -> ModelOutput:
        """The decoder forward pass. It returns hidden states, not logits: the logits are
        `model.logits(out.last_hidden_state)`, and per-token log-probs, without materialising the
        `[B, T, V]` logits, are `ops.fused_token_logps(out.last_hidden_state, model.unembed(),
        labels, mask)` (what the trainer computes).

        Args:
          input_ids: `[B, T]` int token ids.
          attention_mask: `[B, T]` 1 on real tokens, 0 on padding (left or right); None: all
            ones. No token attends to a padding position (except itself: the outputs there
            are finite but meaningless, to be masked out downstream).
          positions: `[B, T]` int RoPE positions; None: `default_positions`, i.e.
            `cumsum(attention_mask) - 1` (so left padding does not shift the real tokens), or,
            with `segment_ids`, 0, 1, ... restarting at every segment.
          segment_ids: `[B, T]` int ids of the sequences packed in a row (a token attends only
            to earlier tokens of its own segment); None for unpacked rows. Usually with
            `attention_mask` 0 on the padding after the last segment.
          prefix_ids: `[B, T]` int, with `segment_ids`: the segment each token may see besides
            its own, earlier in the row: a pair's shared prompt for its two completion
            branches (`data.pack(..., share_prompt=True)`), the token's own segment elsewhere.
            None: no sharing. Positions must then be given (the branches continue the
            prompt's positions; `Batch.model_inputs` passes them).
          output_hidden_states: also return `hidden_states`.
          output_activations: also return `activations` (MaPO's activation masks).

        Returns:
          A `ModelOutput`:
            last_hidden_state: `[B, T, D]` after the final RMSNorm, the input of the LM head, in
              the compute dtype (`dtype`, else the parameters').
            hidden_states: None, or (with `output_hidden_states`) a tuple of L + 1 `[B, T, D]`
              arrays: the embeddings, then each decoder layer's output (the residual stream,
              before the final norm).
            activations: None, or (with `output_activations`) a tuple of L dicts, per layer
              `{"attn": [B, T, heads * head_dim] attention output before o_proj, "mlp":
              [B, T, intermediate_size] SwiGLU activations silu(gate) * up, "resid": [B, T, D]
              the layer's output}`.

        Raises:
          ValueError: `input_ids` is not 2-D, `attention_mask` has another shape, or T exceeds
            a Mistral / Qwen2 sliding window where it is not applied (`LlamaConfig.check_length`:
            a Mistral window is, by "blockwise" and "pallas_splash").
        """
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be [B, T], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have shape {input_ids.shape}, got {attention_mask.shape}"
            )
        self.config.check_length(input_ids.shape[1], full_sequence=True)
        if positions is None:
            if prefix_ids is not None:
                raise ValueError("`prefix_ids` needs explicit `positions`: a completion branch "
                                 "continues its shared prompt's positions")  # fmt: skip
            positions = default_positions(attention_mask, segment_ids)
        mask = attention_masks(
            attention_mask, segment_ids, self.config.attention_implementation, prefix_ids
        )
        h = self.model.embed_tokens(input_ids)
        if self.dtype is not None:
            h = h.astype(self.dtype)
        inv_freq = rope_frequencies(self.config)  # a constant under jit
        hidden, acts = [h], []
        for layer in self.model.layers:
            call = _rematerialised if self.remat else type(layer).__call__
            h, act, _ = call(layer, h, positions, mask, inv_freq)
            if output_hidden_states:
                hidden.append(h)
            if output_activations:
                acts.append({**act, "resid": h})
        last = self.model.norm(h)
        return ModelOutput(
            last_hidden_state=last,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            activations=tuple(acts) if output_activations else None,
        )
