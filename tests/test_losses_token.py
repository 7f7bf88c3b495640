"""TDPO1/2, SparsePO, MaPO and token-wise constrained SFT: identities between them, where the
gradient stops, finite-difference gradients and input errors. Parity with the official formulas
is in test_losses_official.py (committed float64 NumPy fixture)."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax import losses as L
from alignjax import ops

B, T, V = 4, 6, 11


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


@pytest.mark.parametrize("version", [1, 2])
def test_tdpo_registered(version):
    batch, _ = make(np.random.default_rng(version))
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
    count = int((m != 0).sum())

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
