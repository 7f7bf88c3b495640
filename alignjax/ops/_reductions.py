"""Sequence reductions of per-token values: sums, means, packed-segment sums, the LD-DPO split.

All reductions run over the last axis (`T`), treat `mask` as a 0/1 selector, accumulate in
float32 (float64 for float64 inputs) and return exact zeros for empty selections (a zero-length
completion has sum 0 and mean 0, not NaN), so all-masked rows stay finite in losses and grads.

Packed rows: `segment_ids[b, t]` is 0 on padding and 1..S on the S segments packed in row b.
`segment_sums(...)[b, k]` is the sum over segment k + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.ops import _checks as C


def _values_and_keep(values, mask, name="values"):
    values = C.as_array(name, values)
    C.check_floating(name, values)
    if values.ndim < 1:
        raise ValueError(f"`{name}` must be [..., T], got a scalar")
    if mask is None:
        keep = jnp.ones(values.shape, jnp.bool_)
    else:
        mask = C.as_array("mask", mask)
        C.check_mask("mask", mask, values.shape)
        keep = mask != 0
    dt = C.result_dtype(values.dtype)
    return values.astype(dt), keep


def sequence_sum(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """sum_t mask[..., t] * values[..., t]; `[..., T] -> [...]`."""
    values, keep = _values_and_keep(values, mask)
    return jnp.sum(jnp.where(keep, values, 0.0), axis=-1)


def token_counts(mask: jax.Array) -> jax.Array:
    """Number of selected positions per row, as float32 (the denominator of a mean)."""
    mask = C.as_array("mask", mask)
    C.check_mask("mask", mask, mask.shape)
    return jnp.sum(mask != 0, axis=-1).astype(jnp.float32)


def sequence_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over selected positions; 0 for a row with none selected."""
    values, keep = _values_and_keep(values, mask)
    total = jnp.sum(jnp.where(keep, values, 0.0), axis=-1)
    count = jnp.sum(keep, axis=-1).astype(values.dtype)
    return total / jnp.maximum(count, 1.0)


def _segment_onehot(segment_ids, shape, num_segments: int):
    segment_ids = C.as_array("segment_ids", segment_ids)
    C.check_integer("segment_ids", segment_ids)
    if segment_ids.shape != tuple(shape):
        raise ValueError(f"`segment_ids` must have shape {tuple(shape)}, got {segment_ids.shape}")
    if int(num_segments) != num_segments or num_segments < 1:
        raise ValueError(f"`num_segments` must be a positive int, got {num_segments}")
    if C.is_concrete(segment_ids):
        ids = np.asarray(segment_ids)
        bad = (ids < 0) | (ids > num_segments)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"`segment_ids` must lie in [0, {num_segments}] (0 = padding); found "
                f"{int(ids[idx])} at index {idx}. Raise `num_segments` to keep every segment."
            )
    # [..., T, S]: column k selects segment k + 1. Built elementwise (no matmul precision issues).
    return segment_ids[..., None] == jnp.arange(1, num_segments + 1)


def segment_sums(
    values: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-segment sums for packed rows: `[..., T] -> [..., num_segments]`.

    Args:
      values: `[..., T]` per-token values (e.g. log-probs).
      segment_ids: `[..., T]` int, 0 on padding, 1..num_segments on packed sequences.
      num_segments: static maximum number of segments per row.
      mask: optional `[..., T]` 0/1 selector applied on top (e.g. completion tokens only).
    """
    values, keep = _values_and_keep(values, mask)
    onehot = _segment_onehot(segment_ids, values.shape, num_segments)
    contrib = jnp.where(keep, values, 0.0)[..., None]
    return jnp.sum(jnp.where(onehot, contrib, 0.0), axis=-2)


def segment_counts(
    segment_ids: jax.Array, num_segments: int, mask: jax.Array | None = None
) -> jax.Array:
    """Number of selected tokens per segment, float32 `[..., num_segments]`."""
    segment_ids = C.as_array("segment_ids", segment_ids)
    ones = jnp.ones(segment_ids.shape, jnp.float32)
    return segment_sums(ones, segment_ids, num_segments, mask)


def segment_means(
    values: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-segment means (0 for an empty or absent segment)."""
    sums = segment_sums(values, segment_ids, num_segments, mask)
    counts = segment_counts(segment_ids, num_segments, mask).astype(sums.dtype)
    return sums / jnp.maximum(counts, 1.0)


def completion_positions(mask: jax.Array) -> jax.Array:
    """1-based index of each selected token among the selected tokens of its row; 0 elsewhere."""
    mask = C.as_array("mask", mask)
    C.check_mask("mask", mask, mask.shape)
    keep = mask != 0
    return jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32), axis=-1), 0)


def ld_prefix_lengths(chosen_mask: jax.Array, rejected_mask: jax.Array) -> jax.Array:
    """LD-DPO's public length l_p = min(|y_w|, |y_l|) per pair (Liu et al. 2024), int32 `[B]`."""
    chosen_mask = C.as_array("chosen_mask", chosen_mask)
    rejected_mask = C.as_array("rejected_mask", rejected_mask)
    C.check_mask("chosen_mask", chosen_mask, chosen_mask.shape)
    C.check_mask("rejected_mask", rejected_mask, rejected_mask.shape)
    if chosen_mask.shape[:-1] != rejected_mask.shape[:-1]:
        raise ValueError(
            f"`chosen_mask` {chosen_mask.shape} and `rejected_mask` {rejected_mask.shape} "
            "must agree on the batch axes"
        )
    lw = jnp.sum(chosen_mask != 0, axis=-1)
    ll = jnp.sum(rejected_mask != 0, axis=-1)
    return jnp.minimum(lw, ll).astype(jnp.int32)


def ld_sum(
    values: jax.Array, mask: jax.Array, prefix_length: jax.Array, alpha: float | jax.Array
) -> jax.Array:
    """LD-DPO's length-desensitised sum (specs/losses.md, LD-DPO).

    sum_{pos <= l_p} v_t + alpha * sum_{pos > l_p} v_t, where pos is the 1-based completion index
    (`completion_positions(mask)`) and l_p = `prefix_length` per row (`ld_prefix_lengths`).
    alpha = 1 recovers `sequence_sum`; alpha = 0 keeps only the shared-length prefix.
    """
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` (ld_alpha) must lie in [0, 1], got {alpha}")
    values, keep = _values_and_keep(values, mask)
    prefix_length = C.as_array("prefix_length", prefix_length)
    if prefix_length.shape != values.shape[:-1]:
        raise ValueError(
            f"`prefix_length` must have shape {values.shape[:-1]}, got {prefix_length.shape}"
        )
    pos = completion_positions(mask)
    weights = jnp.where(pos <= prefix_length[..., None], 1.0, jnp.asarray(alpha, values.dtype))
    return jnp.sum(jnp.where(keep, weights * values, 0.0), axis=-1)
