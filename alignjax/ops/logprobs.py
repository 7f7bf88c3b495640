"""Per-token log-probabilities, entropies and KLs, dense or fused with the LM head.

Conventions (DESIGN.md): per-token arrays are `[B, T]`; `labels[b, t]` is the token predicted at
position `t`; `mask[b, t]` is nonzero on the positions that count (completion tokens). Outputs are
float32 for bf16/f16/f32 inputs and float64 for float64 inputs (under `jax_enable_x64`); masked
positions are exactly 0 and receive no gradient. A mask is a 0/1 selector, not a weight.

Labels outside `[0, V)` at unmasked positions raise a ValueError when the call is eager; inside
`jit`/`pmap` they cannot raise, so those positions come out as NaN instead of a silently wrong
gather. Masked positions may hold anything (HF's -100 included).

Dense kernels take logits `[B, T, V]`; fused kernels take final hidden states `[B, T, D]` and the
unembedding `[D, V]` (Flax layout) and never build `[B, T, V]`, forward or backward (see
`alignjax/ops/_fused.py` for the algorithm and its cost).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from alignjax.ops import logprobs
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y = jnp.zeros((2, 5), jnp.int32)
    >>> a = logprobs.fused_token_logps(h, w, y)
    >>> b = logprobs.token_logps(h @ w, y)
    >>> bool(jnp.allclose(a, b, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from alignjax.ops import _checks as C
from alignjax.ops._dense import dense_entropy, dense_kl, dense_logps
from alignjax.ops._fused import (
    DEFAULT_CHUNK_ELEMENTS,
    HeadConfig,
    auto_chunk_size,
    fused_head,
    kept_span,
)
from alignjax.ops._reductions import (
    completion_positions,
    ld_prefix_lengths,
    ld_sum,
    segment_counts,
    segment_means,
    segment_sums,
    sequence_mean,
    sequence_sum,
    token_counts,
)

__all__ = [
    "TokenStats",
    "token_logps",
    "token_entropy",
    "token_kl",
    "fused_token_logps",
    "fused_token_entropy",
    "fused_token_kl",
    "fused_token_stats",
    "sequence_sum",
    "sequence_mean",
    "token_counts",
    "segment_sums",
    "segment_counts",
    "segment_means",
    "completion_positions",
    "ld_prefix_lengths",
    "ld_sum",
]


class TokenStats(NamedTuple):
    """Per-token outputs of `fused_token_stats`; fields not requested are None."""

    logps: jax.Array | None
    entropy: jax.Array | None
    ref_logps: jax.Array | None
    kl: jax.Array | None


def _prepare_labels(labels, mask, shape, vocab: int):
    labels = C.as_array("labels", labels)
    C.check_integer("labels", labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"`labels` must have shape {tuple(shape)}, got {labels.shape}")
    C.check_labels_in_range(labels, mask, vocab)
    valid = (labels >= 0) & (labels < vocab)
    return jnp.clip(labels, 0, vocab - 1).astype(jnp.int32), valid


def _prepare_mask(mask, shape):
    if mask is None:
        return None, jnp.ones(shape, jnp.bool_)
    mask = C.as_array("mask", mask)
    C.check_mask("mask", mask, shape)
    return mask, mask != 0


def _finish(values, keep, valid=None):
    if valid is not None:
        values = jnp.where(valid, values, jnp.nan)
    return jnp.where(keep, values, jnp.zeros((), values.dtype))


# ------------------------------------------------------------------------------ dense kernels


def token_logps(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """log softmax(logits)[label] = logit[label] - logsumexp(logits), per token.

    Args:
      logits: `[..., V]` floating (bf16/f16/f32/f64).
      labels: `[...]` integer token ids in `[0, V)` wherever `mask` is nonzero.
      mask: optional `[...]` 0/1 selector; masked positions are 0.

    Returns:
      `[...]` log-probabilities, float32 (float64 for float64 logits).
    """
    logits = C.as_array("logits", logits)
    C.check_floating("logits", logits)
    C.check_ndim("logits", logits, tuple(range(1, 8)), "[..., V]")
    mask, keep = _prepare_mask(mask, logits.shape[:-1])
    labels, valid = _prepare_labels(labels, mask, logits.shape[:-1], logits.shape[-1])
    return _finish(dense_logps(logits, labels), keep, valid)


def token_entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Entropy -sum_v p_v log p_v of softmax(logits), per token; `[..., V] -> [...]`."""
    logits = C.as_array("logits", logits)
    C.check_floating("logits", logits)
    C.check_ndim("logits", logits, tuple(range(1, 8)), "[..., V]")
    _, keep = _prepare_mask(mask, logits.shape[:-1])
    return _finish(dense_entropy(logits), keep)


def token_kl(
    policy_logits: jax.Array, ref_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Full-vocabulary KL(ref || policy) at every position (specs/losses.md section 5).

    KL_t = sum_v p_ref(v) (log p_ref(v) - log p_policy(v)) >= 0, the per-token term of TDPO's
    sequential KL and SparsePO's masked KL. The gradient flows to `policy_logits` only; the
    reference is a constant. No log-softmax of either side is materialised.
    """
    policy_logits = C.as_array("policy_logits", policy_logits)
    ref_logits = C.as_array("ref_logits", ref_logits)
    C.check_floating("policy_logits", policy_logits)
    C.check_floating("ref_logits", ref_logits)
    C.check_ndim("policy_logits", policy_logits, tuple(range(1, 8)), "[..., V]")
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"`ref_logits` must have the shape of `policy_logits` {policy_logits.shape}, "
            f"got {ref_logits.shape}"
        )
    _, keep = _prepare_mask(mask, policy_logits.shape[:-1])
    return _finish(dense_kl(policy_logits, jax.lax.stop_gradient(ref_logits)), keep)


# ------------------------------------------------------------------------------ fused kernels


def _check_head(prefix: str, hidden, unembed, bias):
    hidden = C.as_array(f"{prefix}hidden", hidden)
    unembed = C.as_array(f"{prefix}unembed", unembed)
    C.check_floating(f"{prefix}hidden", hidden)
    C.check_floating(f"{prefix}unembed", unembed)
    C.check_ndim(f"{prefix}hidden", hidden, (2, 3), "[B, T, D] or [T, D]")
    C.check_ndim(f"{prefix}unembed", unembed, (2,), "[D, V]")
    if unembed.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"`{prefix}unembed` must be [D, V] with D = {prefix}hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {unembed.shape}"
        )
    if bias is not None:
        bias = C.as_array(f"{prefix}bias", bias)
        C.check_floating(f"{prefix}bias", bias)
        if bias.shape != (unembed.shape[1],):
            raise ValueError(
                f"`{prefix}bias` must have shape ({unembed.shape[1]},), got {bias.shape}"
            )
    return hidden, unembed, bias


def fused_token_stats(
    hidden: jax.Array,
    unembed: jax.Array,
    labels: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    entropy: bool = False,
    ref_hidden: jax.Array | None = None,
    ref_unembed: jax.Array | None = None,
    ref_bias: jax.Array | None = None,
    ref_logps: bool = False,
    kl: bool = False,
    soft_cap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    precision: Any = None,
) -> TokenStats:
    """Any of {log-prob of `labels`, entropy, reference log-prob, KL(ref || policy)} in one pass.

    The logits are `z = cap * tanh((hidden @ unembed + bias) / cap) / temperature` (the tanh only
    when `soft_cap` is set); the reference side uses the same soft-cap and temperature. One pass
    shares each chunk's logits between the requested statistics (TDPO needs policy log-probs,
    reference log-probs and the KL: 2 LM-head matmuls forward instead of 4).

    Args:
      hidden: `[B, T, D]` (or `[T, D]`) final hidden states of the policy.
      unembed: `[D, V]` LM-head kernel (Flax layout; transpose a tied `[V, D]` embedding).
      labels: `[B, T]` int, required for log-probs (computed whenever labels are given).
      mask: `[B, T]` 0/1; masked positions are 0 in every output and get no gradient. The LM
        head runs only over the positions from the first to the last one that any row keeps
        (in chunks of `chunk_size` starting there), forward and backward: a loss on right-padded
        [prompt | completion] rows does not pay for the prompts' logits.
      bias: optional `[V]` LM-head bias.
      entropy: also return the policy entropy.
      ref_hidden, ref_unembed, ref_bias: the reference model's head, for `ref_logps` / `kl`.
        They are constants: their cotangents are zero. `ref_unembed` may have its own D.
      ref_logps: return the reference log-prob of `labels`.
      kl: return KL(ref || policy) per position.
      soft_cap: logit soft-capping value (Gemma 2 uses 30.0), or None.
      temperature: logits are divided by it (sampling temperature), > 0.
      chunk_size: sequence positions per chunk; default: the largest with
        `B * chunk_size * vocab_block <= chunk_elements` (counting both sides with a reference).
      vocab_chunk_size: vocabulary entries per block (online logsumexp); default: all of V.
      chunk_elements: logits budget per chunk for the automatic `chunk_size`; the backward
        pass accumulates `d unembed` in column blocks of `chunk_elements / (4 D)`.
      precision: `jax.lax.Precision` of the LM-head matmuls (None: JAX's default).
    """
    hidden, unembed, bias = _check_head("", hidden, unembed, bias)
    squeeze = hidden.ndim == 2
    shape = hidden.shape[:-1]
    vocab = unembed.shape[1]
    mask, keep = _prepare_mask(mask, shape)
    valid = None
    if labels is not None:
        labels, valid = _prepare_labels(labels, mask, shape, vocab)
    elif ref_logps:
        raise ValueError("`labels` is required when `ref_logps=True`")
    needs_ref = ref_logps or kl
    if needs_ref:
        if ref_hidden is None or ref_unembed is None:
            raise ValueError("`ref_hidden` and `ref_unembed` are required for `kl` / `ref_logps`")
        ref_hidden, ref_unembed, ref_bias = _check_head("ref_", ref_hidden, ref_unembed, ref_bias)
        if ref_hidden.shape[:-1] != shape:
            raise ValueError(
                f"`ref_hidden` must have leading shape {shape} like `hidden`, "
                f"got {ref_hidden.shape}"
            )
        if ref_unembed.shape[1] != vocab:
            raise ValueError(
                f"`ref_unembed` must have V = {vocab} columns, got {ref_unembed.shape}"
            )
    else:
        ref_hidden = ref_unembed = ref_bias = None
    if not (temperature > 0):
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if soft_cap is not None and not (soft_cap > 0):
        raise ValueError(f"`soft_cap` must be > 0 or None, got {soft_cap}")
    for name, value in (
        ("chunk_size", chunk_size),
        ("vocab_chunk_size", vocab_chunk_size),
        ("chunk_elements", chunk_elements),
    ):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"`{name}` must be a positive int, got {value}")

    if squeeze:
        hidden = hidden[None]
        ref_hidden = None if ref_hidden is None else ref_hidden[None]
        labels = None if labels is None else labels[None]
    batch, length = hidden.shape[:2]
    block = vocab if vocab_chunk_size is None else min(int(vocab_chunk_size), vocab)
    if chunk_size is None:
        # The budget covers every logits block alive at once: the reference side doubles it.
        width = block * (2 if needs_ref else 1)
        chunk_size = auto_chunk_size(batch, length, width, chunk_elements)
    cfg = HeadConfig(
        chunk_size=min(int(chunk_size), length),
        vocab_chunk_size=block,
        grad_block=max(1, int(chunk_elements) // (4 * unembed.shape[0])),
        soft_cap=None if soft_cap is None else float(soft_cap),
        temperature=float(temperature),
        precision=precision,
        want_logps=labels is not None,
        want_entropy=bool(entropy),
        want_ref_logps=bool(ref_logps),
        want_kl=bool(kl),
    )
    if needs_ref:
        ref_hidden = jax.lax.stop_gradient(ref_hidden)
        ref_unembed = jax.lax.stop_gradient(ref_unembed)
        ref_bias = None if ref_bias is None else jax.lax.stop_gradient(ref_bias)
    # With a mask, the LM head runs only over the positions between the first and the last one
    # that any row keeps (a completion-only loss skips the prompts' logits, forward and backward).
    span = None if mask is None else kept_span(keep if not squeeze else keep[None])
    outs = fused_head(cfg, hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span)
    if squeeze:
        outs = tuple(None if o is None else o[0] for o in outs)
    lp, ent, rlp, kl_out = outs
    return TokenStats(
        logps=None if lp is None else _finish(lp, keep, valid),
        entropy=None if ent is None else _finish(ent, keep),
        ref_logps=None if rlp is None else _finish(rlp, keep, valid),
        kl=None if kl_out is None else _finish(kl_out, keep),
    )


def fused_token_logps(
    hidden: jax.Array,
    unembed: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    **head_kwargs,
) -> jax.Array:
    """`token_logps(hidden @ unembed + bias, labels, mask)` without materialising the logits.

    Gradients flow to `hidden`, `unembed` and `bias`. Keyword options (`bias`, `soft_cap`,
    `temperature`, `chunk_size`, `vocab_chunk_size`, `chunk_elements`, `precision`) are those of
    `fused_token_stats`.
    """
    if labels is None:
        raise ValueError("`labels` is required, got None")
    return fused_token_stats(hidden, unembed, labels, mask, **head_kwargs).logps


def fused_token_entropy(
    hidden: jax.Array, unembed: jax.Array, mask: jax.Array | None = None, **head_kwargs
) -> jax.Array:
    """`token_entropy(hidden @ unembed + bias, mask)` without materialising the logits."""
    return fused_token_stats(hidden, unembed, None, mask, entropy=True, **head_kwargs).entropy


def fused_token_kl(
    hidden: jax.Array,
    unembed: jax.Array,
    ref_hidden: jax.Array,
    ref_unembed: jax.Array,
    mask: jax.Array | None = None,
    **head_kwargs,
) -> jax.Array:
    """`token_kl(policy logits, reference logits, mask)` from both heads, never holding a
    `[B, T, V]` tensor of either; the gradient flows to the policy side (`hidden`, `unembed`,
    `bias`) only. `ref_bias` is a keyword option like `bias`."""
    return fused_token_stats(
        hidden,
        unembed,
        None,
        mask,
        ref_hidden=ref_hidden,
        ref_unembed=ref_unembed,
        kl=True,
        **head_kwargs,
    ).kl
