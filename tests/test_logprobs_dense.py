"""Dense kernels (token_logps / token_entropy / token_kl) against float64 NumPy derivations.

Tolerances: inf-norm relative error <= 1e-6 for float32 (a few ulps of float32 after a
logsumexp over V terms), <= 1e-12 for float64. Gradients are compared with the analytic NumPy
gradient and with central finite differences in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref as R
from alignjax.ops import _dense
from alignjax.ops import logprobs as L

B, T, V = 3, 5, 37


@pytest.fixture(autouse=True, params=["one_chunk", "row_chunks"])
def row_chunking(request, monkeypatch):
    """Run every test with the whole sequence in one chunk and with 2-row chunks (T = 5: two
    full chunks and a remainder of one), the loop the kernels use on large inputs."""
    if request.param == "row_chunks":
        monkeypatch.setattr(_dense, "ROW_CHUNK_ELEMENTS", 2 * B * V)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def make(rng, dtype=np.float32, scale=3.0):
    z = (scale * rng.standard_normal((B, T, V))).astype(dtype)
    zr = (scale * rng.standard_normal((B, T, V))).astype(dtype)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    m = (rng.random((B, T)) > 0.3).astype(np.int32)
    m[0] = 0  # an all-masked row
    return z, zr, y, m


def test_float32_parity(rng):
    z, zr, y, m = make(rng)
    assert rel(L.token_logps(z, y, m), R.token_logps(z, y, m)) <= 1e-6
    assert rel(L.token_entropy(z, m), R.token_entropy(z, m)) <= 1e-6
    assert rel(L.token_kl(z, zr, m), R.token_kl(z, zr, m)) <= 1e-6
    for out in (L.token_logps(z, y, m), L.token_entropy(z, m), L.token_kl(z, zr, m)):
        assert out.dtype == jnp.float32
        assert np.all(np.asarray(out)[m == 0] == 0.0)


def test_float64_parity(rng, x64):
    z, zr, y, m = make(rng, np.float64)
    for out, ref in (
        (L.token_logps(z, y, m), R.token_logps(z, y, m)),
        (L.token_entropy(z, m), R.token_entropy(z, m)),
        (L.token_kl(z, zr, m), R.token_kl(z, zr, m)),
    ):
        assert out.dtype == jnp.float64
        assert rel(out, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_give_float32(rng, dtype):
    z, zr, y, m = make(rng)
    zl, zrl = jnp.asarray(z, dtype), jnp.asarray(zr, dtype)
    # The reference sees exactly the rounded inputs, so only the float32 arithmetic differs.
    z64, zr64 = np.asarray(zl, np.float64), np.asarray(zrl, np.float64)
    out = L.token_logps(zl, y, m)
    assert out.dtype == jnp.float32
    assert rel(out, R.token_logps(z64, y, m)) <= 1e-6
    assert rel(L.token_entropy(zl, m), R.token_entropy(z64, m)) <= 1e-6
    assert rel(L.token_kl(zl, zrl, m), R.token_kl(z64, zr64, m)) <= 1e-6
    g = jax.grad(lambda a: L.token_logps(a, y, m).sum())(zl)
    assert g.dtype == dtype


def test_mask_none_means_all_positions(rng):
    z, zr, y, _ = make(rng)
    assert rel(L.token_logps(z, y), R.token_logps(z, y)) <= 1e-6
    assert rel(L.token_entropy(z), R.token_entropy(z)) <= 1e-6
    assert rel(L.token_kl(z, zr), R.token_kl(z, zr)) <= 1e-6


def test_ignore_index_at_masked_positions_is_fine(rng):
    z, _, y, m = make(rng)
    y = np.where(m == 0, -100, y)  # HF's ignore index where the mask is off
    assert rel(L.token_logps(z, y, m), R.token_logps(z, np.where(m == 0, 0, y), m)) <= 1e-6


def test_gradients_match_analytic_float64(rng, x64):
    z, zr, y, m = make(rng, np.float64)
    g = rng.standard_normal((B, T))
    gm = np.where(m != 0, g, 0.0)
    d_lp = jax.grad(lambda a: jnp.sum(L.token_logps(a, y, m) * g))(z)
    d_h = jax.grad(lambda a: jnp.sum(L.token_entropy(a, m) * g))(z)
    d_kl, d_ref = jax.grad(lambda a, b: jnp.sum(L.token_kl(a, b, m) * g), (0, 1))(z, zr)
    assert rel(d_lp, R.grad_logps(z, y, gm)) <= 1e-12
    assert rel(d_h, R.grad_entropy(z, gm)) <= 1e-12
    assert rel(d_kl, R.grad_kl(z, zr, gm)) <= 1e-12
    assert np.all(np.asarray(d_ref) == 0.0)  # the reference is a constant


# Finite differences check the gradient formula, which the row chunks do not change (their
# gradients equal the analytic ones to 1e-12 above): with 2-row chunks, with the slow set.
@pytest.mark.parametrize(
    "row_chunking", ["one_chunk", pytest.param("row_chunks", marks=pytest.mark.slow)], indirect=True
)
@pytest.mark.parametrize("kernel", ["logps", "entropy", "kl"])
def test_gradients_finite_differences(rng, x64, kernel):
    z, zr, y, m = make(rng, np.float64, scale=1.0)
    g = rng.standard_normal((B, T))
    f = {
        "logps": lambda a: jnp.sum(L.token_logps(a, y, m) * g),
        "entropy": lambda a: jnp.sum(L.token_entropy(a, m) * g),
        "kl": lambda a: jnp.sum(L.token_kl(a, zr, m) * g),
    }[kernel]
    grad = np.asarray(jax.grad(f)(z))
    for _ in range(3):
        d = rng.standard_normal(z.shape)
        eps = 1e-6
        fd = (float(f(z + eps * d)) - float(f(z - eps * d))) / (2 * eps)
        assert abs(fd - np.sum(grad * d)) <= 1e-7 * max(1.0, abs(fd))


def test_extreme_logits_are_finite(rng):
    z, zr, y, m = make(rng)
    z = np.where(rng.random(z.shape) > 0.5, 1e4, -1e4).astype(np.float32)
    zr = np.where(rng.random(z.shape) > 0.5, 1e4, -1e4).astype(np.float32)
    fns = [
        lambda a: L.token_logps(a, y, m).sum(),
        lambda a: L.token_entropy(a, m).sum(),
        lambda a: L.token_kl(a, zr, m).sum(),
    ]
    for f in fns:
        val, grad = jax.value_and_grad(f)(jnp.asarray(z))
        assert np.isfinite(val) and np.all(np.isfinite(grad))
    # Values are still right: logps are 0 or about -2e4, and match the float64 reference.
    assert rel(L.token_logps(z, y, m), R.token_logps(z, y, m)) <= 1e-6
    assert rel(L.token_kl(z, zr, m), R.token_kl(z, zr, m)) <= 1e-6


def test_minus_inf_vocab_entries(rng):
    """Masked-out vocabulary entries (-inf) contribute 0, not NaN."""
    z, _, y, m = make(rng)
    banned = rng.random(z.shape) < 0.3
    banned[..., 0] = False
    y = np.zeros_like(y)  # label 0 is never banned
    zb = np.where(banned, -np.inf, z).astype(np.float32)
    ref = np.where(banned, -1e30, z.astype(np.float64))
    assert rel(L.token_logps(zb, y, m), R.token_logps(ref, y, m)) <= 1e-6
    assert rel(L.token_entropy(zb, m), R.token_entropy(ref, m)) <= 1e-6
    assert rel(L.token_kl(zb, zb, m), np.zeros((B, T))) == 0.0
    grad = jax.grad(lambda a: L.token_entropy(a, m).sum())(jnp.asarray(zb))
    assert np.all(np.isfinite(grad))


def test_identical_distributions_have_zero_kl(rng):
    z, _, _, m = make(rng)
    assert np.all(np.asarray(L.token_kl(z, z, m)) == 0.0)


def test_bad_inputs_raise_named_errors(rng):
    z, zr, y, m = make(rng)
    with pytest.raises(ValueError, match="labels"):
        L.token_logps(z, y[:, :-1], m)
    with pytest.raises(ValueError, match="labels"):
        L.token_logps(z, y.astype(np.float32), m)
    with pytest.raises(ValueError, match=r"labels.*\[0, 37\).*index"):
        L.token_logps(z, np.where(m != 0, V, y), m)
    with pytest.raises(ValueError, match="labels"):
        L.token_logps(z, np.full_like(y, -1))  # no mask: every position counts
    with pytest.raises(ValueError, match="logits"):
        L.token_logps(z.astype(np.int32), y, m)
    with pytest.raises(ValueError, match="mask"):
        L.token_logps(z, y, m[:, :-1])
    with pytest.raises(ValueError, match="ref_logits"):
        L.token_kl(z, zr[..., :-1], m)
    with pytest.raises(ValueError, match="policy_logits"):
        L.token_kl(z.astype(np.int32), zr, m)


def test_out_of_range_labels_under_jit_are_nan_not_wrong(rng):
    z, _, y, m = make(rng)
    y = y.copy()
    m = np.ones_like(m)
    y[1, 2] = V + 5
    out = np.asarray(jax.jit(L.token_logps)(z, y, m))
    assert np.isnan(out[1, 2])
    assert np.isfinite(np.delete(out.reshape(-1), 1 * T + 2)).all()
