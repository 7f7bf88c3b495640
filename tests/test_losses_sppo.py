"""SPPO against float64 NumPy derivations of the official formulas (specs/losses.md section 4)
and against TRL 1.16.0's `sppo_hard` fixture (sppo at P_w = 1, P_l = 0, times 2). Tolerance
<= 1e-12 relative in x64."""

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L

DPO = np.load(Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_dpo.npz")


def numpy_sppo(a, b, pw, pl, beta):
    return 0.5 * ((a - (pw - 0.5) / beta) ** 2 + (b - (pl - 0.5) / beta) ** 2)


def numpy_sppo_single(a, b, p, beta):
    return 0.5 * ((a - (p - 0.5) / beta) ** 2 + (b + (p - 0.5) / beta) ** 2)


def make(rng, **probs):
    b_, t = 5, 6
    pol = -rng.gamma(2.0, 1.0, (2 * b_, t))
    ref = pol + rng.normal(0, 0.01, (2 * b_, t))
    mask = (rng.random((2 * b_, t)) > 0.3).astype(np.int32)
    return (
        L.PreferenceBatch.from_stacked(
            jnp.asarray(pol), jnp.asarray(mask), jnp.asarray(ref), **probs
        ),
        pol,
        ref,
        mask,
    )


def test_sppo_and_single_match_numpy(x64):
    rng = np.random.default_rng(0)
    pw, pl, p = rng.uniform(0.3, 1, 5), rng.uniform(0, 0.6, 5), rng.uniform(0.4, 1, 5)
    batch, pol, ref, mask = make(
        rng,
        chosen_win_prob=jnp.asarray(pw),
        rejected_win_prob=jnp.asarray(pl),
        win_prob=jnp.asarray(p),
    )
    seq = np.where(mask != 0, pol - ref, 0.0).sum(1)
    a, b = seq[:5], seq[5:]
    for beta in (1e-3, 0.1):
        np.testing.assert_allclose(
            L.sppo(batch, beta=beta).losses, numpy_sppo(a, b, pw, pl, beta), rtol=1e-12
        )
        np.testing.assert_allclose(
            L.sppo_single(batch, beta=beta).losses, numpy_sppo_single(a, b, p, beta), rtol=1e-12
        )
    # Gradient w.r.t. the chosen per-token log-probs: (a - (P_w - 1/2)/beta) on its mask.
    g = jax.grad(lambda x: jnp.sum(L.sppo(replace(batch, chosen_logps=x), beta=0.1).losses))(
        batch.chosen_logps
    )
    want = np.where(mask[:5] != 0, (a - (pw - 0.5) / 0.1)[:, None], 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-12)


def test_hard_probabilities_give_trl_sppo_hard(x64):
    shift = jnp.asarray(DPO["completion_mask"][:, 1:])
    n = shift.shape[0] // 2
    batch = L.PreferenceBatch.from_stacked(
        jnp.asarray(DPO["policy_logps"]),
        shift,
        jnp.asarray(DPO["ref_logps"]),
        chosen_win_prob=jnp.ones(n),
        rejected_win_prob=jnp.zeros(n),
    )
    ours = 2.0 * L.sppo(batch, beta=0.1).loss
    np.testing.assert_allclose(ours, DPO["sppo_hard/loss"], rtol=1e-12)


def test_win_probabilities_match_official_procedure(x64):
    rng = np.random.default_rng(3)
    scores = rng.normal(0, 2, (4, 5))
    got = L.win_probabilities(jnp.asarray(scores))
    for i, s in enumerate(scores):
        # P(j beats k) = 1 / (1 + exp(s_k - s_j)), compute_prob.py's P_jk
        pref = np.array([[1 / (1 + np.exp(s[k] - s[j])) for k in range(5)] for j in range(5)])
        w, lo = int(np.argmax(s)), int(np.argmin(s))
        assert (int(got.chosen[i]), int(got.rejected[i])) == (w, lo)
        np.testing.assert_allclose(got.chosen_win_prob[i], pref[w].mean(), rtol=1e-12)
        np.testing.assert_allclose(got.rejected_win_prob[i], pref[lo].mean(), rtol=1e-12)
        np.testing.assert_allclose(got.win_prob[i], pref[w, lo], rtol=1e-12)
    with pytest.raises(ValueError, match="scores"):
        L.win_probabilities(jnp.zeros((3,)))


def test_missing_probabilities_and_bad_beta():
    batch, *_ = make(np.random.default_rng(1))
    with pytest.raises(ValueError, match="chosen_win_prob"):
        L.sppo(batch)
    with pytest.raises(ValueError, match="win_prob"):
        L.sppo_single(batch)
    with pytest.raises(ValueError, match="beta"):
        L.sppo(batch, beta=0.0)
