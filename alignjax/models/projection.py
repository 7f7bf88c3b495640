"""The matmul of the decoder's projections (`nnx.Linear(..., dot_general=projection_dot_general)`)
with a backward pass that XLA:CPU compiles well.

The weight gradient of `y = x @ W` (x [N, K], W [K, M]) is `x^T dy`, a product that contracts the
token axis, the leading axis of both operands. XLA:CPU's fast matmul (YNNPACK) wants the contracted
axis last on its left operand, so XLA materialises a transposed copy of one operand and hands
the product to its slower generic matmul; it transposes `dy`, and it fuses dy's elementwise producer
(SwiGLU's backward, the attention output's reshapes) into that transposing copy, which then runs
at a fraction of memory speed: in one decoder layer of the head-to-head model (16 rows x 128
tokens, forward + backward, one core) the copy of SwiGLU's gate gradient alone took 12 of 190 ms.

Here the weight gradient is computed as `(dy^T x)^T` when M > K, so that the operand XLA
transposes is the narrower `x`, and `x^T dy` otherwise (what autodiff computes); the input gradient
is `dy @ W^T` as in autodiff. The decoder layer's forward + backward drops from 127-144 ms to
99-115 ms there, and the head-to-head DPO step at 128 tokens per row from 692-720 to 619-630 ms
(`benchmarks/trl_head_to_head.py`'s model, 2 cores). Values equal autodiff's up to the order of
the float32 sums over the N tokens. On other backends (cuBLAS and TPU handle either order) the
plain `lax.dot_general` and its autodiff are used.
"""

from __future__ import annotations

from functools import partial

import jax
from jax import lax

__all__ = ["project", "projection_dot_general"]


def projection_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
):
    """`lax.dot_general` for `nnx.Linear`'s contraction (the last axis of `lhs` with axis 0 of a
    2-D `rhs`, no batch axes), with the backward pass of the module docstring on CPU; any other
    contraction, an `out_sharding`, or another backend is `lax.dot_general` itself."""
    (lc, rc), (lb, rb) = dimension_numbers
    standard = (
        rhs.ndim == 2
        and tuple(lc) == (lhs.ndim - 1,)
        and tuple(rc) == (0,)
        and not lb
        and not rb
        and out_sharding is None
    )
    if not standard or jax.default_backend() != "cpu":
        return lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    return _projection(precision, preferred_element_type, lhs, rhs)


def project(x, w, *, precision=None):
    """`x @ w` for x [..., K] and a 2-D w [K, M] through `projection_dot_general` (the adapters'
    low-rank products use it as the projections do)."""
    return projection_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _contract_last(x, w, precision, preferred):
    return lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=preferred,
    )  # fmt: skip


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _projection(precision, preferred, x, w):
    return _contract_last(x, w, precision, preferred)


def _projection_fwd(precision, preferred, x, w):
    return _contract_last(x, w, precision, preferred), (x, w)


def _projection_bwd(precision, preferred, residuals, dy):
    x, w = residuals
    k, m = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, m)
    tokens = (((0,), (0,)), ((), ()))
    dx = lax.dot_general(
        dy2, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=preferred
    )
    if m > k:  # (dy^T x)^T: XLA transposes the narrower x, then the small [M, K] result
        dw = lax.dot_general(
            dy2, x2, tokens, precision=precision, preferred_element_type=preferred
        ).T
    else:
        dw = lax.dot_general(x2, dy2, tokens, precision=precision, preferred_element_type=preferred)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_projection.defvjp(_projection_fwd, _projection_bwd)
