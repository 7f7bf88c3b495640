"""SPPO against TRL 1.16.0's `sppo_hard` fixture (sppo at P_w = 1, P_l = 0, times 2), to 1e-12
relative in x64, and its input errors. Parity with the official soft-probability formulas and
the P-hat procedure is in test_losses_official.py."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L

DPO = np.load(Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_dpo.npz")


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


def test_win_probabilities_input_errors():
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
