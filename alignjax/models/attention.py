"""Attention for the Llama-family decoder: grouped-query attention (each KV head's query heads
stacked into one matmul, no repeated K/V), causal block skipping, `jax.nn.dot_product_attention`
/ cuDNN / the memory-efficient `blockwise_attention` / JAX's Pallas TPU kernels behind one
switch, rotary position embeddings (with llama3 scaling), the padding / packed-segment masks
(4-D, or 2-D for "blockwise" and the Pallas kernels), sliding windows and default positions."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from alignjax.models.flash_attention import (
    SequenceMask,
    blockwise_attention,
    check_prefix_ids,
)
from alignjax.models.pallas_attention import PALLAS_IMPLEMENTATIONS, pallas_attention

if TYPE_CHECKING:
    from alignjax.models.llama import LlamaConfig

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "AUTO_BLOCKWISE_ABOVE",
    "attention",
    "attention_mask_4d",
    "attention_masks",
    "causal_attention",
    "default_positions",
    "grouped_query_attention",
    "resolved_implementation",
    "rope_frequencies",
    "apply_rope",
]


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d), masked) v (Vaswani et al. 2017, arXiv:1706.03762, eq. 1) with
    grouped-query heads (Ainslie et al. 2023, arXiv:2305.13245): q [B, T, H, d], k and v
    [B, S, KV, d], mask [B, 1, T, S] (True: visible); key/value head j serves query heads
    j * H/KV .. (j + 1) * H/KV - 1, as transformers' `repeat_kv`.

    The H/KV query heads of one key/value head are stacked along the query axis, so that each
    score matrix is a single [H/KV * T, d] x [d, S] product per (batch, key/value head): on CPU this
    is about twice as fast (forward + backward) as `jax.nn.dot_product_attention`'s XLA path, which
    maps the group axis to a leading batch axis and transposes the [B, H, T, S] scores around it.
    As in transformers, the scale is applied to the scores and the softmax is taken in float32.
    """
    b, t, heads, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    group = heads // kv
    q = q.reshape(b, t, kv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, group * t, d)
    scores = jnp.einsum("bkqd,bskd->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, group, t, s) * (d**-0.5)
    # A large finite negative, not -inf: a fully masked row stays finite (uniform) instead of NaN.
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, group * t, s)
    out = jnp.einsum("bkqs,bskd->bkqd", probs, v).reshape(b, kv, group, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int = 128
) -> jax.Array:
    """`grouped_query_attention` over T queries and the same T keys when `mask` hides every later
    key (as `attention_mask_4d` does). The queries are cut into n = min(8, T // block) blocks and
    block [a, b) is scored against keys [0, b) only: the keys it skips are masked for all of its
    queries and would get exactly zero probability. That skips (n - 1) / 2n of the score matrix
    (a quarter at n = 2, 7/16 at n = 8), in compute and in the memory kept for the backward pass.
    """
    t = q.shape[1]
    n = max(1, min(8, t // block))
    bounds = [t * i // n for i in range(n + 1)]
    return jnp.concatenate(
        [
            grouped_query_attention(q[:, a:b], k[:, :b], v[:, :b], mask[:, :, a:b, :b])
            for a, b in zip(bounds[:-1], bounds[1:])
        ],
        axis=1,
    )


ATTENTION_IMPLEMENTATIONS = (
    "auto",
    "grouped",
    "jax",
    "cudnn",
    "blockwise",
    *PALLAS_IMPLEMENTATIONS,
)
# The implementations that take the 2-D `SequenceMask` for a full sequence, and those of them
# that skip the keys outside a sliding window (the model's forward lets them run past it).
SEQUENCE_MASK_IMPLEMENTATIONS = ("blockwise", *PALLAS_IMPLEMENTATIONS)
WINDOWED_IMPLEMENTATIONS = ("blockwise", "pallas_splash")


# On CPU, "auto" is "grouped" up to this many positions and "blockwise" beyond (a full-sequence
# causal forward): measured on 2 CPU cores with the head-to-head model's DPO step
# (benchmarks/trl_head_to_head.py), the two are equally fast at 128 and 256 tokens per row and
# "blockwise" is faster from 512 on, where it also keeps O(T) instead of O(T^2) memory.
AUTO_BLOCKWISE_ABOVE = 256


def resolved_implementation(implementation: str, length: int) -> str:
    """The kernel `implementation` means for a full causal sequence of `length` positions:
    "auto" is "grouped" (length <= AUTO_BLOCKWISE_ABOVE) or "blockwise" on CPU, "jax" elsewhere;
    any other name is itself."""
    if implementation != "auto":
        return implementation
    if jax.default_backend() != "cpu":
        return "jax"
    return "blockwise" if length > AUTO_BLOCKWISE_ABOVE else "grouped"


def _window_band(t: int, window: int) -> jax.Array:
    """[1, 1, T, T]: key j within the causal window of query i (i - window < j)."""
    i = jnp.arange(t)
    return (i[:, None] - window < i[None, :])[None, None]


def attention(
    q, k, v, mask, *, implementation: str = "auto", causal: bool = False, window: int | None = None
):
    """Masked grouped-query attention by `implementation`, with `mask` a dense [B, 1, T, S]
    boolean array or (for "blockwise" and the Pallas kernels) a `SequenceMask`
    (`attention_masks` builds either):

    - "grouped": `causal_attention` (when `causal`, i.e. queries and keys are the same T
      positions) or `grouped_query_attention`: plain XLA, the fastest here on CPU.
    - "jax": `jax.nn.dot_product_attention` (its XLA path; jax 0.10 picks no fused kernel
      by itself).
    - "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA's fused kernel
      (fp16 / bf16 on GPU). Not exercised by the tests here (no GPU).
    - "blockwise": `blockwise_attention` (key/value blocks, online softmax, recomputing
      backward: O(T * block) memory instead of O(T^2)) when `mask` is a `SequenceMask` and
      `causal`; given a dense mask (the KV-cache decode steps) it falls back to "auto".
    - "pallas_splash" / "pallas_flash": JAX's Pallas TPU kernels (`pallas_attention`), TPU
      only (a ValueError elsewhere), for a `SequenceMask` and `causal`; given a dense mask they
      fall back to "auto" as "blockwise" does. Tested in Pallas' interpret mode on CPU only.
    - "auto": on CPU "blockwise" when `attention_masks` gave a `SequenceMask` (a full sequence
      longer than AUTO_BLOCKWISE_ABOVE positions, `resolved_implementation`), else "grouped";
      "jax" elsewhere.

    `window`: a causal sliding window (key j visible to query i only if i - window < j), as
    Mistral's `sliding_window`, for causal self-attention (T == S); ignored otherwise (the
    KV-cache decode path, which `LlamaConfig.check_length` keeps within the window).
    "pallas_flash" has none (a ValueError if it would matter).

    All of them are exact up to float rounding (tests compare "grouped" with "jax",
    "blockwise" and, in interpret mode, the Pallas kernels).
    """
    if implementation == "auto" and isinstance(mask, SequenceMask):
        implementation = "blockwise"
    if implementation in SEQUENCE_MASK_IMPLEMENTATIONS:
        if isinstance(mask, SequenceMask):
            if not causal:
                raise ValueError(
                    f'"{implementation}" attention with a `SequenceMask` must be causal'
                )
            masks = dict(key_valid=mask.key_valid, segment_ids=mask.segment_ids, window=window)
            if implementation == "blockwise":
                return blockwise_attention(q, k, v, causal=True, prefix_ids=mask.prefix_ids,
                                           **masks)  # fmt: skip
            if mask.prefix_ids is not None:
                raise ValueError(
                    f'"{implementation}" attention has no shared-prompt rows (`prefix_ids`); use '
                    '"blockwise", "grouped" or "jax"'
                )
            return pallas_attention(q, k, v, kernel=implementation, **masks)
        implementation = "auto"
    if causal and window is not None and q.shape[1] > window:
        mask = mask & _window_band(q.shape[1], window)
    if implementation == "auto":
        implementation = "grouped" if jax.default_backend() == "cpu" else "jax"
    if implementation == "grouped":
        fn = causal_attention if causal else grouped_query_attention
        return fn(q, k, v, mask)
    impl = None if implementation == "jax" else implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def attention_mask_4d(
    attention_mask: jax.Array,
    segment_ids: jax.Array | None = None,
    prefix_ids: jax.Array | None = None,
) -> jax.Array:
    """[B, 1, T, T] booleans: causal, keys on real tokens, and (when packed) the same segment,
    or the query's `prefix_ids` segment (its shared prompt, `data.pack(share_prompt=True)`)."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    keys = attention_mask.astype(bool)[:, None, None, :]
    mask = causal[None, None] & keys
    check_prefix_ids(prefix_ids, segment_ids, attention_mask.shape)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        if prefix_ids is not None:
            same |= prefix_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    # A query row with no visible key (a padding position) attends to itself: finite, ignored.
    return mask | jnp.eye(t, dtype=bool)[None, None]


def attention_masks(
    attention_mask: jax.Array,
    segment_ids: jax.Array | None,
    implementation: str,
    prefix_ids: jax.Array | None = None,
) -> jax.Array | SequenceMask:
    """The mask `attention(..., implementation=implementation, causal=True)` takes for a full
    sequence: the 2-D `SequenceMask` for "blockwise" and the Pallas kernels (never a
    [B, 1, T, T] array), and for "auto" where it means "blockwise" (`resolved_implementation`),
    else `attention_mask_4d`."""
    implementation = resolved_implementation(implementation, attention_mask.shape[-1])
    if implementation in SEQUENCE_MASK_IMPLEMENTATIONS:
        check_prefix_ids(prefix_ids, segment_ids, attention_mask.shape)
        return SequenceMask(attention_mask.astype(bool), segment_ids, prefix_ids)
    return attention_mask_4d(attention_mask, segment_ids, prefix_ids)


def default_positions(attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """cumsum(mask) - 1 (so left padding starts real tokens at 0), restarting per segment."""
    m = attention_mask.astype(jnp.int32)
    if segment_ids is None:
        return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
    t = m.shape[-1]
    idx = jnp.arange(t)
    start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], -1
    )
    first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - first


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies `theta^(-2i/d)`, with Llama 3's scaling when configured (long
    wavelengths divided by `factor`, short ones kept, a smooth blend between)."""
    d = cfg.dim_per_head
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = cfg.rope or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return inv
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: llama3")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """transformers' rotate-half convention on [B, T, heads, head_dim], computed in float32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, d/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)
