"""TDPO1/2, SparsePO and MaPO against float64 NumPy derivations of the official formulas
(specs/losses.md section 5), identities between them, and gradients. Tolerance <= 1e-12
relative in x64."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax import losses as L
from alignjax import ops

B, T, V = 4, 6, 11


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def make(rng, masks=False, kl_masks=False):
    z = rng.normal(0, 1.5, (2 * B, T, V))
    r = z + rng.normal(0, 0.3, (2 * B, T, V))
    y = rng.integers(0, V, (2 * B, T))
    m = (rng.random((2 * B, T)) > 0.25).astype(np.int32)
    pol, ref = ops.token_logps(z, y, m), ops.token_logps(r, y, m)
    kl = ops.token_kl(z, r, m)  # per-token KL(ref || policy), the TDPO / SparsePO input
    fields = dict(kl=kl)
    if masks:
        fields["reward_mask"] = jnp.asarray(np.maximum(rng.normal(0.5, 0.5, (2 * B, T)), 0.0))
    if kl_masks:
        fields["kl_mask"] = jnp.asarray(np.maximum(rng.normal(0.5, 0.5, (2 * B, T)), 0.0))
    batch = L.PreferenceBatch.from_stacked(pol, jnp.asarray(m), ref, **fields)
    arrays = {
        k: np.asarray(v, np.float64) for k, v in {**dict(pol=pol, ref=ref, m=m), **fields}.items()
    }
    return batch, arrays


def sides(x):
    return x[:B], x[B:]


def numpy_tdpo(a, beta, alpha, version):
    dw, dl = sides(np.where(a["m"] != 0, a["pol"] - a["ref"], 0.0).sum(1))
    sw, sl = sides(np.where(a["m"] != 0, a["kl"], 0.0).sum(1))
    margin = (dw - dl) - (sl - sw) if version == 1 else (dw - dl) - alpha * (sl - sw)
    return -log_sigmoid(beta * margin), beta * (dw + sw), beta * (dl + sl)


def numpy_sparsepo(a, beta, l1_u, l1_d):
    mu = a["reward_mask"]
    md = a.get("kl_mask", mu)
    keep = a["m"] != 0
    uw, ul = sides(np.where(keep, mu * (a["pol"] - a["ref"]), 0.0).sum(1))
    dw, dl = sides(np.where(keep, md * a["kl"], 0.0).sum(1))
    loss = -log_sigmoid(beta * ((uw - ul) - (dl - dw)))
    l1 = lambda x: sum(sides(np.where(keep, np.abs(x), 0.0).sum(1)))  # noqa: E731
    return loss + l1_u * l1(mu) + l1_d * l1(md), beta * (uw - dw), beta * (ul - dl)


@pytest.mark.parametrize("version", [1, 2])
def test_tdpo_matches_numpy(x64, version):
    batch, a = make(np.random.default_rng(version))
    for beta, alpha in ((0.1, 0.5), (0.8, 0.2)):
        out = L.tdpo(batch, beta=beta, alpha=alpha, version=version)
        want, rw, rl = numpy_tdpo(a, beta, alpha, version)
        np.testing.assert_allclose(out.losses, want, rtol=1e-12)
        np.testing.assert_allclose(out.chosen_rewards, rw, rtol=1e-12)
        np.testing.assert_allclose(out.rejected_rewards, rl, rtol=1e-12)
    assert L.get(f"tdpo{version}")(batch).terms.keys() == {f"tdpo{version}"}


def test_tdpo2_stops_the_gradient_through_chosen_kl(x64):
    batch, _ = make(np.random.default_rng(3))

    def f(kl_w, kl_l, version):
        b = replace(batch, chosen_kl=kl_w, rejected_kl=kl_l)
        return L.tdpo(b, version=version).loss

    g2w, g2l = jax.grad(f, (0, 1))(batch.chosen_kl, batch.rejected_kl, 2)
    g1w, _ = jax.grad(f, (0, 1))(batch.chosen_kl, batch.rejected_kl, 1)
    assert np.all(np.asarray(g2w) == 0.0)
    assert np.any(np.asarray(g2l) != 0.0) and np.any(np.asarray(g1w) != 0.0)


@pytest.mark.parametrize("independent", [False, True])
def test_sparsepo_matches_numpy(x64, independent):
    batch, a = make(np.random.default_rng(4), masks=True, kl_masks=independent)
    for l1_u, l1_d in ((0.0, 0.0), (1e-3, 2e-3)):
        out = L.sparsepo(batch, beta=0.8, l1_reward=l1_u, l1_kl=l1_d)
        want, rw, rl = numpy_sparsepo(a, 0.8, l1_u, l1_d)
        np.testing.assert_allclose(out.losses, want, rtol=1e-12)
        np.testing.assert_allclose(out.chosen_rewards, rw, rtol=1e-12)
        np.testing.assert_allclose(out.rejected_rewards, rl, rtol=1e-12)
    zeros = (a["reward_mask"] == 0) & (a["m"] != 0)
    np.testing.assert_allclose(out.metrics["mask/sparsity"], zeros.sum() / (a["m"] != 0).sum())


def test_unit_masks_reduce_to_tdpo1(x64):
    batch, _ = make(np.random.default_rng(5))
    ones = jnp.ones_like(batch.chosen_logps)
    unit = replace(batch, chosen_reward_mask=ones, rejected_reward_mask=ones)
    tdpo1 = L.tdpo(batch, version=1).losses
    np.testing.assert_allclose(L.sparsepo(unit).losses, tdpo1, rtol=1e-12)
    np.testing.assert_allclose(L.mapo(unit).losses, tdpo1, rtol=1e-12)


def test_gradients(x64):
    batch, _ = make(np.random.default_rng(6), masks=True)

    def with_logps(fn):
        def f(lp):
            return fn(replace(batch, chosen_logps=lp)).loss

        return f

    for fn in (
        lambda b: L.tdpo(b, version=1),
        lambda b: L.tdpo(b, version=2),
        lambda b: L.sparsepo(b, l1_reward=1e-3),
        L.mapo,
    ):
        check_grads(with_logps(fn), (batch.chosen_logps,), order=1, modes=["rev"])

    # SparsePO trains its mask head through the loss; MaPO's mask is detached.
    def mask_fn(fn):
        return lambda m: fn(replace(batch, chosen_reward_mask=m)).loss

    # Away from 0, where |m| (the L1 term) has its kink and finite differences would straddle it.
    positive = batch.chosen_reward_mask + 0.1
    check_grads(
        mask_fn(lambda b: L.sparsepo(b, l1_reward=1e-3)), (positive,), order=1, modes=["rev"]
    )
    assert np.all(np.asarray(jax.grad(mask_fn(L.mapo))(batch.chosen_reward_mask)) == 0.0)


def test_missing_fields():
    batch, _ = make(np.random.default_rng(7))
    with pytest.raises(ValueError, match="chosen_reward_mask"):
        L.sparsepo(batch)
    plain = replace(batch, chosen_kl=None, rejected_kl=None)
    with pytest.raises(ValueError, match="chosen_kl"):
        L.tdpo(plain)
    with pytest.raises(ValueError, match="version"):
        L.tdpo(batch, version=3)


def test_constrained_sft_schedule_objective_and_surrogate(x64):
    rng = np.random.default_rng(8)
    pol = -rng.gamma(2.0, 0.7, (3, 9))
    ref = pol + rng.normal(0, 0.4, (3, 9))
    m = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0, 0, 0], [0] * 9])
    batch = L.PreferenceBatch(
        jnp.asarray(pol),
        jnp.asarray(pol),
        jnp.asarray(m),
        jnp.asarray(m),
        jnp.asarray(ref),
        jnp.asarray(ref),
    )
    beta_t = np.asarray(L.constrained_beta_schedule(m))
    np.testing.assert_allclose(beta_t[0, 2:], [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1], rtol=1e-12)
    # Objective: token mean of (2 / beta_t) softplus(-beta_t Delta_t), a NumPy loop.
    total, count = 0.0, 0
    for b in range(3):
        for t in range(9):
            if m[b, t]:
                d, bt = pol[b, t] - ref[b, t], beta_t[b, t]
                total += (2 / bt) * np.logaddexp(0.0, -bt * d)
                count += 1
    out = L.token_constrained_sft(batch)
    np.testing.assert_allclose(out.loss, total / count, rtol=1e-12)

    # The official surrogate has the objective's gradient (where its 1e-3 floor is inactive).
    def grad(surrogate):
        def f(lp):
            b = replace(batch, chosen_logps=lp)
            return L.token_constrained_sft(b, surrogate=surrogate).loss

        return np.asarray(jax.grad(f)(batch.chosen_logps))

    np.testing.assert_allclose(grad(True), grad(False), rtol=1e-12, atol=1e-15)
    # Small beta approaches SFT: the gradient tends to -1/count per token.
    small = L.token_constrained_sft(batch, beta=1e-6, first_token_factor=1.0, bias_factor=1.0)
    g = jax.grad(
        lambda lp: (
            L.token_constrained_sft(
                replace(batch, chosen_logps=lp),
                beta=1e-6,
                first_token_factor=1.0,
                bias_factor=1.0,
            ).loss
        )
    )(batch.chosen_logps)
    np.testing.assert_allclose(np.asarray(g)[m != 0], -1.0 / count, rtol=1e-5)
    assert np.isfinite(float(small.loss))
