"""Argument validation shared by the ops.

Shape and dtype checks always run (they are static under `jit`). Value checks (labels in range,
segment ids in range) need concrete arrays: they run eagerly and are skipped for tracers, where
the kernels instead make the offending positions NaN so that the error cannot pass unnoticed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when `x` holds values now (not a tracer inside jit/pmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def as_array(name: str, x) -> jax.Array:
    if x is None:
        raise ValueError(f"`{name}` is required, got None")
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise ValueError(f"`{name}` must be an array, got {type(x).__name__}") from e


def check_floating(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"`{name}` must have a floating dtype (bf16/f16/f32/f64), got {x.dtype}")


def check_integer(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"`{name}` must have an integer dtype, got {x.dtype}")


def check_mask(name: str, mask: jax.Array, shape: tuple[int, ...]) -> None:
    if mask.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {mask.shape}")
    if not (
        mask.dtype == jnp.bool_
        or jnp.issubdtype(mask.dtype, jnp.integer)
        or jnp.issubdtype(mask.dtype, jnp.floating)
    ):
        raise ValueError(f"`{name}` must be bool, integer or floating, got {mask.dtype}")


def check_ndim(name: str, x: jax.Array, ndims: tuple[int, ...], layout: str) -> None:
    if x.ndim not in ndims:
        raise ValueError(f"`{name}` must be {layout}, got shape {x.shape}")


def binary_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """Boolean view of a 0/1 mask (nonzero = included); all-True when `mask` is None."""
    if mask is None:
        return jnp.ones(shape, dtype=jnp.bool_)
    return mask != 0


def check_labels_in_range(labels, mask, vocab_size: int, name: str = "labels") -> None:
    """Eagerly reject labels outside [0, vocab_size) at included positions."""
    if not (is_concrete(labels) and (mask is None or is_concrete(mask))):
        return
    y = np.asarray(labels)
    keep = np.ones(y.shape, bool) if mask is None else np.asarray(mask) != 0
    bad = keep & ((y < 0) | (y >= vocab_size))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`{name}` must lie in [0, {vocab_size}) at unmasked positions; "
            f"{int(bad.sum())} do not, first at index {idx} with value {int(y[idx])}"
        )


def result_dtype(*dtypes) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs, float64 for f64 inputs (only possible under x64)."""
    return jnp.result_type(jnp.float32, *dtypes)
