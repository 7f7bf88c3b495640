"""Masks: next-token alignment, prompt/completion/padding masks, truncation, MaPO activation masks.

Alignment convention (DESIGN.md): `labels[b, t]` is the token predicted at position t, i.e.
`input_ids[b, t + 1]`, and `loss_mask[b, t]` is 1 when that token counts. Arrays keep the full
length T (the last column is always masked) so that labels line up with the model's hidden
states `[B, T, D]` without slicing; TRL instead drops the last position (T - 1 columns). The
values per position are the same.

Packed rows carry `segment_ids` (0 = padding, 1..S = packed sequences): a token is never
predicted across a segment boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.ops import _checks as C

__all__ = [
    "next_token_alignment",
    "length_mask",
    "prompt_completion_masks",
    "truncate_sequence",
    "mapo_rescale",
    "mapo_activation_mask",
]


def _int_array(name, x, shape=None):
    x = C.as_array(name, x)
    if shape is not None and x.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {x.shape}")
    return x


def next_token_alignment(
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    completion_mask: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    pad_label: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Labels and loss mask for next-token prediction, for right-, left-padded and packed rows.

    Args:
      input_ids: `[B, T]` int token ids.
      attention_mask: `[B, T]` 0/1, 1 on real tokens (either padding side); None: all real.
      completion_mask: `[B, T]` 0/1, 1 on completion tokens (the ones that are trained on);
        None: every real token counts (plain language modelling).
      segment_ids: `[B, T]` int for packed rows, 0 on padding, 1..S per packed sequence.
      pad_label: label written where nothing is predicted (any id in `[0, V)`).

    Returns:
      `(labels, loss_mask)`, both `[B, T]` int32: `labels[:, t] = input_ids[:, t + 1]`;
      `loss_mask[:, t] = 1` iff positions t and t + 1 are real tokens of the same segment and
      t + 1 is a completion token. The last column is always 0.
    """
    input_ids = C.as_array("input_ids", input_ids)
    C.check_integer("input_ids", input_ids)
    C.check_ndim("input_ids", input_ids, (2,), "[B, T]")
    shape = input_ids.shape
    real = C.binary_mask(
        None if attention_mask is None else _int_array("attention_mask", attention_mask, shape),
        shape,
    )
    comp = C.binary_mask(
        None if completion_mask is None else _int_array("completion_mask", completion_mask, shape),
        shape,
    )

    def nxt(x, fill):  # x[:, t + 1], with `fill` in the last column
        return jnp.concatenate([x[:, 1:], jnp.full((x.shape[0], 1), fill, x.dtype)], axis=1)

    keep = real & nxt(real, False) & nxt(comp, False)
    if segment_ids is not None:
        seg = _int_array("segment_ids", segment_ids, shape)
        C.check_integer("segment_ids", seg)
        seg_next = nxt(seg, 0)
        keep = keep & (seg == seg_next) & (seg_next != 0)
    labels = jnp.where(keep, nxt(input_ids, pad_label), pad_label).astype(jnp.int32)
    return labels, keep.astype(jnp.int32)


def length_mask(lengths: jax.Array, max_length: int, *, padding_side: str = "right") -> jax.Array:
    """`[B]` lengths -> `[B, max_length]` int32 mask of real tokens, padded on `padding_side`."""
    lengths = C.as_array("lengths", lengths)
    C.check_integer("lengths", lengths)
    if padding_side not in ("right", "left"):
        raise ValueError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}")
    if C.is_concrete(lengths) and (np.asarray(lengths) > max_length).any():
        row = int(np.argmax(np.asarray(lengths) > max_length))
        raise ValueError(f"`lengths` row {row} is {int(lengths[row])} > max_length {max_length}")
    pos = jnp.arange(max_length)
    if padding_side == "right":
        return (pos < lengths[..., None]).astype(jnp.int32)
    return (pos >= max_length - lengths[..., None]).astype(jnp.int32)


def prompt_completion_masks(
    prompt_lengths: jax.Array,
    completion_lengths: jax.Array,
    max_length: int,
    *,
    padding_side: str = "right",
) -> tuple[jax.Array, jax.Array]:
    """(attention_mask, completion_mask) for rows laid out as [prompt][completion] + padding.

    Right padding: `[prompt][completion][pad]`; left padding: `[pad][prompt][completion]`.
    """
    prompt_lengths = C.as_array("prompt_lengths", prompt_lengths)
    completion_lengths = C.as_array("completion_lengths", completion_lengths)
    if prompt_lengths.shape != completion_lengths.shape:
        raise ValueError(
            f"`prompt_lengths` {prompt_lengths.shape} and `completion_lengths` "
            f"{completion_lengths.shape} must have the same shape"
        )
    total = prompt_lengths + completion_lengths
    attention = length_mask(total, max_length, padding_side=padding_side)
    pos = jnp.arange(max_length)
    start = prompt_lengths if padding_side == "right" else max_length - completion_lengths
    start = start[..., None]
    completion = (pos >= start) & (pos < start + completion_lengths[..., None])
    return attention, (completion & (attention != 0)).astype(jnp.int32)


def truncate_sequence(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    mode: str = "keep_start",
    row: int | str | None = None,
) -> tuple[list[int], list[int]]:
    """Truncate one (prompt, completion) pair the way TRL does, never to an empty completion.

    Order: the prompt keeps its last `max_prompt_length` tokens; the completion keeps its first
    `max_completion_length` tokens; then prompt + completion is cut to `max_length`, from the
    end (`mode="keep_start"`, TRL's default) or from the start (`mode="keep_end"`).

    Raises:
      ValueError (naming `row`) if the completion is empty to begin with or would be cut to
      zero tokens (e.g. a prompt of `max_length` tokens under keep_start). Callers that prefer
      to skip such rows catch the error and count them.
    """
    where = "" if row is None else f"row {row}: "
    if mode not in ("keep_start", "keep_end"):
        raise ValueError(f"`mode` must be 'keep_start' or 'keep_end', got {mode!r}")
    for name, v in (
        ("max_length", max_length),
        ("max_prompt_length", max_prompt_length),
        ("max_completion_length", max_completion_length),
    ):
        if v is not None and (int(v) != v or v < 1):
            raise ValueError(f"`{name}` must be a positive int or None, got {v}")
    prompt = [int(t) for t in prompt_ids]
    completion = [int(t) for t in completion_ids]
    if not completion:
        raise ValueError(f"{where}the completion is empty before truncation")
    if max_prompt_length is not None:
        prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    if max_completion_length is not None:
        completion = completion[:max_completion_length]
    if max_length is not None and len(prompt) + len(completion) > max_length:
        excess = len(prompt) + len(completion) - max_length
        if mode == "keep_start":
            completion = completion[: max(len(completion) - excess, 0)]
        else:
            cut_prompt = min(excess, len(prompt))
            prompt = prompt[cut_prompt:]
            completion = completion[excess - cut_prompt :]
        if not completion:
            raise ValueError(
                f"{where}truncation to max_length={max_length} ({mode}) leaves no completion "
                f"token (prompt {len(prompt)} tokens); raise max_length or set max_prompt_length"
            )
    return prompt, completion


# ------------------------------------------------------------------------------------- MaPO


def mapo_rescale(activation: jax.Array, mask: jax.Array) -> jax.Array:
    """MaPO's `zn_rescale` map of one activation (specs/losses.md section 5.2).

    The activation `[B, T, ...]` is averaged over its trailing axes to `[B, T]`; per row, over the
    masked tokens, it is z-normalised (mean, unbiased std + 1e-12) and then min-max rescaled to
    [0, 1]; it is 0 outside the mask. Differences from the official code, on purpose: statistics
    stay in float32 (the official casts them to float16), and a row whose masked values are all
    equal or that has a single masked token gets weight 1 on its tokens (the official gives NaN).
    """
    a = C.as_array("activation", activation)
    C.check_floating("activation", a)
    if a.ndim < 2:
        raise ValueError(f"`activation` must be [B, T, ...], got shape {a.shape}")
    mask = C.as_array("mask", mask)
    C.check_mask("mask", mask, a.shape[:2])
    keep = mask != 0
    dt = C.result_dtype(a.dtype)
    x = jnp.mean(a.astype(dt).reshape(*a.shape[:2], -1), axis=-1)
    n = jnp.sum(keep, axis=-1, keepdims=True).astype(dt)
    mean = jnp.sum(jnp.where(keep, x, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(keep, (x - mean) ** 2, 0.0), axis=-1, keepdims=True)
    std = jnp.sqrt(var / jnp.maximum(n - 1.0, 1.0))
    z = (x - mean) / (std + 1e-12)
    zmin = jnp.min(jnp.where(keep, z, jnp.inf), axis=-1, keepdims=True)
    zmax = jnp.max(jnp.where(keep, z, -jnp.inf), axis=-1, keepdims=True)
    span = zmax - zmin
    ok = (n >= 2) & (span > 0) & jnp.isfinite(span)
    scaled = jnp.where(ok, (z - zmin) / jnp.where(ok, span, 1.0), 1.0)
    return jax.lax.stop_gradient(jnp.where(keep, scaled, 0.0))


def mapo_activation_mask(
    activations: Mapping[str, Sequence[jax.Array] | jax.Array], mask: jax.Array
) -> jax.Array:
    """MaPO's token mask from reference-model activations, in [0, 1] and detached.

    Args:
      activations: group name -> activation array(s) `[B, T, ...]` aligned with `mask` (the
        activation at position t is the one that predicts `labels[:, t]`). The official groups
        are "mlp" (MLP post-activations), "attn" (q, k, v, attention outputs), "resid"
        (residual-stream points) and "logits".
      mask: `[B, T]` 0/1 completion mask.

    Returns:
      `[B, T]`: each activation mapped by `mapo_rescale`, averaged within its group, then the
      group maps averaged with equal weight.
    """
    if not isinstance(activations, Mapping) or not activations:
        raise ValueError("`activations` must be a non-empty mapping of group name -> arrays")
    group_maps = []
    for group, arrays in activations.items():
        if not isinstance(arrays, (list, tuple)):
            arrays = [arrays]
        if not arrays:
            raise ValueError(f"`activations[{group!r}]` is empty")
        maps = [mapo_rescale(a, mask) for a in arrays]
        group_maps.append(sum(maps) / len(maps))
    return sum(group_maps) / len(group_maps)
