"""Sequence reductions against float64 NumPy loops (tolerances as in test_logprobs_dense)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref as R
from alignjax.ops import logprobs as L

B, T = 4, 9


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.fixture
def data(rng):
    v = rng.standard_normal((B, T)).astype(np.float32) * 3
    m = (rng.random((B, T)) > 0.4).astype(np.int32)
    m[2] = 0  # zero-length completion
    return v, m


def test_sum_mean_counts(data):
    v, m = data
    assert rel(L.sequence_sum(v, m), R.sequence_sum(v, m)) <= 1e-6
    assert rel(L.sequence_mean(v, m), R.sequence_mean(v, m)) <= 1e-6
    np.testing.assert_array_equal(L.token_counts(m), m.sum(-1))
    assert float(L.sequence_mean(v, m)[2]) == 0.0  # empty row: 0, not NaN
    assert rel(L.sequence_sum(v), v.astype(np.float64).sum(-1)) <= 1e-6


def test_float64(data, x64):
    v, m = data
    v = v.astype(np.float64) * 1.1
    out = L.sequence_mean(v, m)
    assert out.dtype == jnp.float64
    assert rel(out, R.sequence_mean(v, m)) <= 1e-12
    seg = np.tile(np.array([1, 1, 1, 2, 2, 3, 3, 0, 0]), (B, 1)).astype(np.int32)
    assert rel(L.segment_sums(v, seg, 3, m), R.segment_sums(v, seg, 3, m)) <= 1e-12


def test_empty_rows_have_finite_zero_gradients(data):
    v, _ = data
    m = np.zeros((B, T), np.int32)
    g = jax.grad(lambda x: L.sequence_mean(x, m).sum())(v)
    assert np.all(np.asarray(g) == 0.0)


def test_segment_sums(rng):
    v = rng.standard_normal((B, T)).astype(np.float32)
    seg = np.array(
        [
            [1, 1, 1, 2, 2, 2, 2, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [1, 2, 3, 3, 3, 3, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        np.int32,
    )
    m = (rng.random((B, T)) > 0.2).astype(np.int32)
    got = L.segment_sums(v, seg, 3, m)
    assert got.shape == (B, 3)
    assert rel(got, R.segment_sums(v, seg, 3, m)) <= 1e-6
    counts = L.segment_counts(seg, 3, m)
    np.testing.assert_array_equal(counts, R.segment_sums(np.ones((B, T)), seg, 3, m))
    means = L.segment_means(v, seg, 3, m)
    want = R.segment_sums(v, seg, 3, m) / np.maximum(np.asarray(counts), 1)
    assert rel(means, want) <= 1e-6
    # Packed sums add up to the unpacked sum over the same tokens.
    np.testing.assert_allclose(got.sum(-1), L.sequence_sum(v, m * (seg > 0)), rtol=1e-6)


def test_segment_ids_out_of_range(rng):
    v = np.zeros((B, T), np.float32)
    seg = np.zeros((B, T), np.int32)
    seg[1, 4] = 5
    with pytest.raises(ValueError, match=r"segment_ids.*\(1, 4\)"):
        L.segment_sums(v, seg, 3)
    with pytest.raises(ValueError, match="segment_ids"):
        L.segment_sums(v, seg[:, :-1], 3)
    with pytest.raises(ValueError, match="num_segments"):
        L.segment_sums(v, seg, 0)


def test_completion_positions():
    m = np.array([[0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(
        L.completion_positions(m), [[0, 0, 1, 2, 0, 3], [1, 2, 3, 0, 0, 0]]
    )


def test_ld_dpo_split(rng):
    v = rng.standard_normal((B, T)).astype(np.float32)
    mw = (rng.random((B, T)) > 0.3).astype(np.int32)
    ml = (rng.random((B, T)) > 0.5).astype(np.int32)
    lp = L.ld_prefix_lengths(mw, ml)
    np.testing.assert_array_equal(lp, np.minimum(mw.sum(-1), ml.sum(-1)))
    for alpha in (0.0, 0.3, 1.0):
        assert rel(L.ld_sum(v, mw, lp, alpha), R.ld_sum(v, mw, np.asarray(lp), alpha)) <= 1e-6
    np.testing.assert_allclose(L.ld_sum(v, mw, lp, 1.0), L.sequence_sum(v, mw), rtol=1e-6)
    # Gradient: weight 1 on the first l_p completion tokens, alpha after, 0 off the mask.
    g = np.asarray(jax.grad(lambda x: L.ld_sum(x, mw, lp, 0.25).sum())(v))
    pos = np.cumsum(mw, -1) * mw
    want = np.where(mw == 0, 0.0, np.where(pos <= np.asarray(lp)[:, None], 1.0, 0.25))
    np.testing.assert_array_equal(g, want)
    with pytest.raises(ValueError, match="prefix_length"):
        L.ld_sum(v, mw, lp[:-1], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        L.ld_sum(v, mw, lp, 1.5)
    with pytest.raises(ValueError, match="rejected_mask"):
        L.ld_prefix_lengths(mw, ml[:-1])


def test_bad_inputs(data):
    v, m = data
    with pytest.raises(ValueError, match="mask"):
        L.sequence_sum(v, m[:, :-1])
    with pytest.raises(ValueError, match="values"):
        L.sequence_sum(v.astype(np.int32), m)
    with pytest.raises(ValueError, match="values"):
        L.sequence_mean(None, m)
