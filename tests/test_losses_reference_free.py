"""CPO / SimPO / AlphaPO and ORPO against fixtures from TRL 1.16.0's own loss methods.

TRL's `cpo_loss` / `odds_ratio_loss` take sequence log-probs; here they enter as one-token rows
(mask 1), so sums and averages equal the given values. Tolerances: <= 1e-12 relative in x64 for
CPO; ORPO's TRL method casts to float32 internally, so 1e-6 for its values and 1e-5 for its
gradients.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_other.npz"
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["meta_json"]))["cases"]["sequence"]


def batch_of(chosen, rejected):
    ones = jnp.ones((chosen.shape[0], 1), jnp.int32)
    return L.PreferenceBatch(chosen[:, None], rejected[:, None], ones, ones)


def run(name):
    cfg = META[name]
    if name.startswith("orpo"):

        def fn(b):
            return L.orpo(b, beta=cfg["beta"])
    else:

        def fn(b):
            return L.cpo(b, cpo_alpha=0.0, **cfg)

    def total(c, r):
        out = fn(batch_of(c, r))
        return jnp.sum(out.losses), out

    c = jnp.asarray(DATA["seq/chosen_logps"], jnp.float64)
    r = jnp.asarray(DATA["seq/rejected_logps"], jnp.float64)
    (_, out), (gc, gr) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(c, r)
    return out, gc, gr


@pytest.mark.parametrize("name", sorted(META))
def test_matches_trl(name, x64):
    out, gc, gr = run(name)
    orpo = name.startswith("orpo")
    tol, gtol = (1e-6, 1e-5) if orpo else (1e-12, 1e-12)
    sign = -1.0 if orpo else 1.0  # TRL returns ORPO's term as beta*log s(.), to be subtracted
    np.testing.assert_allclose(out.losses, sign * DATA[f"{name}/losses"], rtol=tol, atol=tol)
    np.testing.assert_allclose(out.chosen_rewards, DATA[f"{name}/chosen_rewards"], rtol=tol)
    np.testing.assert_allclose(out.rejected_rewards, DATA[f"{name}/rejected_rewards"], rtol=tol)
    np.testing.assert_allclose(gc, sign * DATA[f"{name}/grad_chosen"], rtol=gtol, atol=gtol)
    np.testing.assert_allclose(gr, sign * DATA[f"{name}/grad_rejected"], rtol=gtol, atol=gtol)
    if orpo:
        assert (
            abs(float(out.metrics["log_odds_ratio"]) - float(DATA[f"{name}/log_odds_ratio"])) < tol
        )


def test_nll_terms_and_registry(x64):
    rng = np.random.default_rng(1)
    lp = jnp.asarray(-rng.gamma(2.0, 0.5, (4, 6)))
    m = jnp.asarray(rng.random((4, 6)) > 0.3, jnp.int32)
    b = L.PreferenceBatch.from_stacked(lp, m)
    nll = -float(jnp.sum(jnp.where(m[:2] != 0, lp[:2], 0.0))) / float(jnp.sum(m[:2]))
    cpo = L.get("cpo")(b, cpo_alpha=0.7)
    np.testing.assert_allclose(cpo.loss, jnp.mean(cpo.losses) + 0.7 * nll, rtol=1e-12)
    simpo = L.get("simpo")(b)
    assert set(simpo.terms) == {"simpo"}  # SimPO proper: no NLL term
    orpo = L.get("orpo")(b)
    np.testing.assert_allclose(orpo.loss, jnp.mean(orpo.losses) + nll, rtol=1e-12)
    with pytest.raises(ValueError, match="CPO `loss_type`"):
        L.cpo(b, loss_type="exo_pair")
    with pytest.raises(ValueError, match="beta"):
        L.orpo(b, beta=-1.0)


def test_log1mexp_accuracy(x64):
    """Against log(-expm1(x)) where that is accurate (x > -1) and the series
    -e^x - e^2x / 2 - e^3x / 3 where e^x is small (x < -15, truncation < e^4x)."""
    x = -np.concatenate([np.logspace(-12, 0, 100, endpoint=False), np.linspace(15, 200, 100)])
    got = np.asarray(L.reference_free.log1mexp(jnp.asarray(x)))
    small = x <= -15
    series = -np.exp(x) - np.exp(2 * x) / 2 - np.exp(3 * x) / 3
    want = np.where(small, series, np.log(-np.expm1(x)))
    np.testing.assert_allclose(got, want, rtol=1e-14)
