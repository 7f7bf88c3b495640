"""D-Pruner (spec online.md 5.5) against float64 NumPy transcriptions of the author code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import models
from alignjax.optim import dpruner
from alignjax.optim.labels import path_string


def _np_hessian(x, percdamp=0.01):
    """general.py: H = (2 / nsamples) sum x x^T, dead -> 1, + percdamp * mean(diag)."""
    x = np.asarray(x, np.float64)
    n = int(np.prod(x.shape[:-2])) if x.ndim > 2 else 1
    flat = x.reshape(-1, x.shape[-1])
    h = 2.0 / n * flat.T @ flat
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    return h, dead


def _np_upper_chol_inv(h):
    return np.linalg.cholesky(np.linalg.inv(h)).T


def _np_fasterprune(w_torch, h, sparsity, blocksize):
    """`General_Pruner.fasterprune` (prunen = 0, no quantizer), torch layout [rows, columns]."""
    w = np.array(w_torch, np.float64)
    u = _np_upper_chol_inv(h)
    cols, importance = w.shape[1], []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        q1, err1 = np.zeros_like(w1), np.zeros_like(w1)
        tmp = w1**2 / np.diag(hinv1).reshape(1, -1) ** 2
        importance.append(tmp.copy())
        thresh = np.sort(tmp.ravel())[int(tmp.size * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            q = col.copy()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return np.concatenate(importance, axis=1), w


def _inputs(rng, shape=(3, 7, 6), dead=2):
    x = rng.normal(size=shape)
    x[..., dead] = 0.0
    return x


def test_hessian_matches_numpy_and_streams(x64, rng):
    x = _inputs(rng)
    want, dead = _np_hessian(x)
    np.testing.assert_allclose(dpruner.hessian_from_inputs(x), want, rtol=0, atol=1e-12)
    state = dpruner.hessian_init(6, jnp.float64)
    for chunk in (x[:1], x[1:]):  # 1 sequence, then 2
        state = dpruner.hessian_update(state, chunk)
    assert int(state.nsamples) == 3
    np.testing.assert_array_equal(dpruner.dead_inputs(state.h), dead)
    np.testing.assert_allclose(dpruner.hessian_finalize(state), want, rtol=0, atol=1e-12)
    # A 2-D x is one sequence: 2/1, not 2/n_tokens.
    np.testing.assert_allclose(
        dpruner.hessian_from_inputs(x[0]), _np_hessian(x[0])[0], rtol=0, atol=1e-12
    )
    assert dpruner.hessian_from_inputs(np.float32(x)).dtype == jnp.float32


def test_obs_score_equals_direct_inverse(x64, rng):
    h, _ = _np_hessian(_inputs(rng))
    w = rng.normal(size=(6, 5))  # kernel [d_in, d_out]
    g = np.asarray(dpruner.obs_importance(w, h, procedure="plain"))
    # First input: the OBS score w^2 / [H^-1]_00 from a direct inverse.
    np.testing.assert_allclose(g[0], w[0] ** 2 / np.linalg.inv(h)[0, 0], rtol=1e-10)
    # Every input j: diag(U)_j^2 = [(H[j:, j:])^-1]_00 (OBS with the earlier inputs fixed).
    u = np.asarray(dpruner.inverse_hessian_cholesky(h))
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=0, atol=1e-10)
    for j in range(6):
        np.testing.assert_allclose(u[j, j] ** 2, np.linalg.inv(h[j:, j:])[0, 0], rtol=1e-10)
        np.testing.assert_allclose(g[j], w[j] ** 2 / np.linalg.inv(h[j:, j:])[0, 0], rtol=1e-10)


@pytest.mark.parametrize("blocksize", [4, 128])
def test_obs_sparsegpt_matches_numpy_fasterprune(x64, rng, blocksize):
    x = _inputs(rng, (4, 9, 10), dead=3)
    h, dead = _np_hessian(x)
    w = rng.normal(size=(10, 6))
    w_dead = w.copy()
    w_dead[dead] = 0.0
    want_g, want_w = _np_fasterprune(w_dead.T, h, 0.52, blocksize)
    g, pruned = dpruner.obs_importance(w, h, blocksize=blocksize, dead=dead, return_pruned=True)
    np.testing.assert_allclose(g, want_g.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pruned, want_w.T, rtol=1e-10, atol=1e-12)
    # The first block is scored on the unmodified weights: the plain score there.
    plain = dpruner.obs_importance(w, h, procedure="plain", dead=dead)
    np.testing.assert_allclose(g[:4], plain[:4], rtol=1e-12)
    if blocksize == 4:  # later blocks see the OBS-updated weights
        assert not np.allclose(g[4:], plain[4:])
    # Per block, int(numel * 0.52) + 1 entries are pruned (the `<=` of the sorted value).
    assert int(np.sum(np.asarray(pruned)[:4] == 0)) == int(24 * 0.52) + 1


def test_regularised_gradient_and_dual_importance(x64, rng):
    g, G, theta = rng.normal(size=(3, 4, 5))
    G = np.abs(G)
    lr = 0.03
    got = dpruner.regularised_gradient({"k": g}, {"k": G}, lr)["k"]
    want = g + 0.1 * 2 * lr**2 * G * g**2 / 1000
    np.testing.assert_allclose(got, want, rtol=1e-14)
    np.testing.assert_allclose(dpruner.regularised_gradient(g, G, lr, lam=0.0), g, rtol=0)
    imp = np.ones_like(g)
    got_i = dpruner.dual_importance_step(imp, want, theta)
    gt = want * theta
    np.testing.assert_allclose(got_i, imp + np.abs(gt + gt**2 / 2000 + theta**3), rtol=1e-14)
    assert dpruner.regularised_gradient(np.float32(g), np.float32(G), lr).dtype == jnp.float32


def test_percentile_threshold_prunes_ties(x64):
    # 25 values, 10 of them tied at 3.0 straddling the 52nd percentile (index 12.48).
    imp = np.array([0.0, 1, 1, 2, 2, 2, 2, 2] + [3.0] * 10 + [4, 5, 6, 7, 8, 9, 10]).reshape(5, 5)
    t = np.percentile(imp, 52)
    assert t == 3.0
    mask = np.asarray(dpruner.percentile_prune_mask(imp, 0.52))
    np.testing.assert_array_equal(mask, imp > 3.0)
    assert int((~mask).sum()) == 18  # all ties pruned, more than int(25 * 0.52) = 13
    # An interpolated threshold: linear between the sorted neighbours.
    vals = np.arange(25.0).reshape(5, 5) ** 2
    t = np.percentile(vals, 52)  # between 144 and 169
    assert 144 < t < 169
    np.testing.assert_array_equal(dpruner.percentile_prune_mask(vals, 0.52), vals > t)


def test_percentile_per_block(x64, rng):
    imp = rng.normal(size=(10, 3))
    imp[4:8] = 1.5  # a block of ties: everything pruned there
    got = np.asarray(dpruner.percentile_prune_mask(imp, 0.52, block=4))
    want = np.concatenate(
        [imp[i : i + 4] > np.percentile(imp[i : i + 4], 52) for i in range(0, 10, 4)]
    )
    np.testing.assert_array_equal(got, want)
    assert not got[4:8].any()
    whole = np.asarray(dpruner.percentile_prune_mask(imp, 0.52))
    assert not np.array_equal(got, whole)


def test_prune_llama_touches_only_the_seven_projections():
    cfg = models.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    params = nnx.state(models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    flat = {path_string(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    targets = [k for k in flat if dpruner.is_llama_projection(k)]
    assert len(targets) == 7 * 2
    key = jax.random.key(1)
    masks = {}
    for k in targets:
        key, sub = jax.random.split(key)
        masks[k] = dpruner.percentile_prune_mask(jax.random.uniform(sub, flat[k].shape), 0.52)
    pruned = dpruner.prune_llama_params(params, masks)
    out = {path_string(p): v for p, v in jax.tree_util.tree_flatten_with_path(pruned)[0]}
    assert out.keys() == flat.keys()
    for k, v in out.items():
        if k in masks:
            np.testing.assert_array_equal(v, np.where(masks[k], flat[k], 0.0))
        else:
            np.testing.assert_array_equal(v, flat[k])  # embed, norms, lm_head untouched
    report = dpruner.sparsity_report(params, masks)
    for k in targets:
        assert report["per_matrix"][k] == pytest.approx(1 - float(np.mean(masks[k])))
    assert 0.5 < report["projections"] < 0.54
    assert report["overall"] < report["projections"]
    embed = next(k for k in flat if "embed" in k)
    with pytest.raises(ValueError, match="seven Llama projections"):
        dpruner.prune_llama_params(params, {embed: np.ones(flat[embed].shape, bool)})
    with pytest.raises(ValueError, match="`masks`.*shape"):
        dpruner.prune_llama_params(params, {targets[0]: np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="not a parameter path"):
        dpruner.prune_llama_params(params, {"model/layers/9/mlp/up_proj/kernel": True})


def test_bad_inputs_name_the_argument(rng):
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="`sparsity`"):
            dpruner.percentile_prune_mask(np.ones((4, 4)), bad)
    with pytest.raises(TypeError, match="`sparsity`"):
        dpruner.percentile_prune_mask(np.ones((4, 4)), True)
    with pytest.raises(ValueError, match="`block`"):
        dpruner.percentile_prune_mask(np.ones((4, 4)), 0.5, block=0)
    h = np.eye(4)
    with pytest.raises(ValueError, match="`h` must be a square"):
        dpruner.obs_importance(np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="`w` must be a kernel"):
        dpruner.obs_importance(np.ones((3, 2)), h)
    with pytest.raises(ValueError, match="`sparsity`"):
        dpruner.obs_importance(np.ones((4, 2)), h, sparsity=1.0)
    with pytest.raises(ValueError, match="`procedure`"):
        dpruner.obs_importance(np.ones((4, 2)), h, procedure="exact")
    with pytest.raises(ValueError, match="`dead`"):
        dpruner.obs_importance(np.ones((4, 2)), h, dead=np.zeros(3, bool))
    with pytest.raises(ValueError, match="`x`"):
        dpruner.hessian_update(dpruner.hessian_init(4), np.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="`G`"):
        dpruner.regularised_gradient(np.ones((2, 3)), np.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="`theta`"):
        dpruner.dual_importance_step(np.ones(3), np.ones(3), np.ones(4))
