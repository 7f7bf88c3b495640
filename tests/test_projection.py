"""`models.projection.projection_dot_general`: the decoder projections' matmul with its own weight
gradient, against autodiff of `lax.dot_general` and float64 NumPy.

Tolerances. The forward is the same `lax.dot_general` call: bitwise. The gradients are the same
products summed over the N token rows in another order, so each float32 entry is within the
worst-case rounding bound of a float32 sum, N * eps32 * sum_n |a_n b_n|, of the float64 value
(checked entry by entry); in float64 (x64) they equal autodiff to 1e-12 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax.models.projection import projection_dot_general

DIMS = (((2,), (0,)), ((), ()))  # nnx.Linear's: [B, T, K] x [K, M]


def plain(x, w):
    return jax.lax.dot_general(x, w, DIMS)


def ours(x, w):
    return projection_dot_general(x, w, DIMS)


@pytest.mark.parametrize("k,m", [(6, 11), (11, 6), (8, 8)], ids=["wider", "narrower", "square"])
def test_values_and_gradients_float32_within_the_rounding_bound(k, m):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    w = rng.standard_normal((k, m)).astype(np.float32)
    ct = rng.standard_normal((3, 5, m)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(ours), x, w)
    y_ref, vjp_ref = jax.vjp(jax.jit(plain), x, w)
    np.testing.assert_array_equal(y, y_ref)  # the same forward call
    dx, dw = vjp(ct)
    assert dx.dtype == dw.dtype == jnp.float32 and dw.shape == (k, m) and dx.shape == x.shape
    x64, w64, ct64 = (a.astype(np.float64).reshape(-1, a.shape[-1]) for a in (x, w, ct))
    n, eps = x64.shape[0], np.finfo(np.float32).eps
    exact_dw = x64.T @ ct64
    bound_dw = n * eps * (np.abs(x64).T @ np.abs(ct64))
    assert np.all(np.abs(np.asarray(dw, np.float64) - exact_dw) <= bound_dw)
    exact_dx = ct64 @ w64.T
    bound_dx = m * eps * (np.abs(ct64) @ np.abs(w64).T)
    assert np.all(np.abs(np.asarray(dx, np.float64).reshape(n, k) - exact_dx) <= bound_dx)
    # Autodiff's gradients obey the same bounds (the independent reference is float64 above).
    auto_dx, auto_dw = (np.asarray(g, np.float64) for g in vjp_ref(ct))
    assert np.all(np.abs(auto_dw - exact_dw) <= bound_dw)
    assert np.all(np.abs(auto_dx.reshape(n, k) - exact_dx) <= bound_dx)


def test_float64_equals_autodiff(x64):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 7, 4)), rng.standard_normal((4, 9))
    g = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), (0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(plain(x, w))), (0, 1))(x, w)
    for a, b in zip(g, g_ref):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)  # float64 (x64): sum order only


def test_bfloat16_and_other_contractions_fall_back_or_keep_dtypes():
    """bf16 in, bf16 gradients out, within bf16's rounding bound of float64; a batched
    contraction is `lax.dot_general` itself (bitwise)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((6, 10)), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    gx, gw = jax.grad(lambda x, w: projection_dot_general(x, w, dims).sum(), (0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    # Against float64: each entry sums n products of bf16 values; however the backend accumulates
    # them (float32 or bfloat16), the error is within the worst-case bound (n + 2) u sum|terms|
    # with u = 2^-8, bfloat16's unit roundoff (products, n - 1 sums, the final rounding to bf16,
    # and a unit of margin for the second-order terms).
    x64, w64 = np.float64(np.float32(x)), np.float64(np.float32(w))
    ones = np.ones((4, 10))
    u = 2.0**-8
    want_gw, bound_gw = x64.T @ ones, (4 + 2) * u * (np.abs(x64).T @ ones)
    want_gx, bound_gx = ones @ w64.T, (10 + 2) * u * (ones @ np.abs(w64).T)
    assert np.all(np.abs(np.float64(np.float32(gw)) - want_gw) <= bound_gw)
    assert np.all(np.abs(np.float64(np.float32(gx)) - want_gx) <= bound_gx)
    # A batched or transposed contraction is lax.dot_general itself.
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(
        projection_dot_general(a, b, batched), jax.lax.dot_general(a, b, batched)
    )


def test_the_decoder_projections_use_it():
    from test_models import CFG

    from alignjax import models

    model = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    layer = model.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert lin.dot_general is projection_dot_general
