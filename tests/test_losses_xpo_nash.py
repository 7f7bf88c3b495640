"""XPO and Nash-MD (`losses.xpo_loss`, `losses.nash_md_loss`, registered "xpo" / "nash_md"), and
the geometric mixture's logits (`models.mixture_logits`), against TRL's snapshot code and exact
oracles.

Parity (fixture `trl_xpo_nash.npz`, made by `reference/generate_trl_xpo_nash.py` from the
source of `XPOTrainer._compute_rewards / _compute_losses / _log_statistics`,
`NashMDTrainer._compute_rewards / _compute_losses / _log_statistics` and
`GeometricMixtureWrapper.forward` at huggingface/trl @ f2cd5771, run unbound in float64): loss,
gradient w.r.t. the per-token policy log-probs of both samples, the chosen side of every pair
(both branches of TRL's `torch.where`, a tie, a pair the missing-EOS penalty decides) and every
logged stat, quirks included (XPO's `logps/chosen` = mean(policy) + mean(reference)), match to
<= 1e-10 relative to max(1, |TRL|) under x64: both sides are float64 and differ only in
summation order. alignjax's log-probs hold arbitrary values off the completion mask (TRL's are
zeroed there), so the masking is exercised too.

Oracles: alpha = 0 is exactly (bitwise) Online DPO on the pair; on a one-token bandit (exact
enumeration over a 6-token vocabulary) the expected Nash-MD gradient is
-grad E[P(y > y')] + beta grad KL(pi || pi_ref) with the mixture held fixed, to 1e-12; the
mixture's softmax is pi^(1-c) pi_ref^c renormalised; micro-batch terms sum to the whole batch.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from alignjax import models

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_xpo_nash.npz"
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["meta_json"]))
CASES = META["cases"]
X = {k.split("/", 1)[1]: DATA[k] for k in DATA.files if k.startswith("inputs/")}
P = X["mask_y"].shape[0]
TOL = 1e-10


def of_kind(kind):
    return sorted(n for n, c in CASES.items() if c["kind"] == kind)


def close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    return got.shape == want.shape and float(np.max(np.abs(got - want), initial=0)) <= tol * scale


def assert_metrics(metrics, values, skip=("loss", "mixture_coef")):
    want = {k: v for k, v in values.items() if k not in skip}
    assert set(metrics) == set(want), (sorted(metrics), sorted(want))
    for k, v in want.items():
        assert close(metrics[k], v), (k, float(metrics[k]), v)


def garbage_off_mask(values, mask, seed):
    """TRL's inputs are 0 off the mask; alignjax must ignore whatever is there."""
    noise = np.random.default_rng(seed).uniform(-4.0, 1.0, values.shape)
    return np.where(mask == 1, values, noise)


def xpo_batch(logps):
    mask = np.concatenate([X["mask_y"], X["mask_opp"]])
    ref = garbage_off_mask(np.concatenate([X["ref_y"], X["ref_opp"]]), mask, 1)
    return L.RolloutBatch(logps=logps, mask=jnp.asarray(mask), ref_logps=jnp.asarray(ref))


def xpo_logps():
    mask = np.concatenate([X["mask_y"], X["mask_opp"]])
    return jnp.asarray(garbage_off_mask(np.concatenate([X["logps_y"], X["logps_opp"]]), mask, 0))


REWARDS = np.concatenate([X["scores_y"], X["scores_opp"]])
EOS = np.concatenate([X["eos_y"], X["eos_opp"]])


@pytest.mark.parametrize("name", of_kind("xpo"))
def test_xpo_matches_trl(name, x64):
    cfg, values = CASES[name]["config"], CASES[name]["values"]

    @jax.jit
    def f(logps):
        out = L.xpo_loss(xpo_batch(logps), jnp.asarray(REWARDS), contains_eos=jnp.asarray(EOS),
                         **cfg)  # fmt: skip
        return out.loss, out

    (loss, out), grad = jax.value_and_grad(f, has_aux=True)(xpo_logps())
    assert close(loss, values["loss"])
    assert close(grad[:P], DATA[f"{name}/grad_y"]) and close(grad[P:], DATA[f"{name}/grad_opp"])
    assert_metrics(out.metrics, values)
    chosen, _, scores = L.pair_by_reward(REWARDS, missing_eos_penalty=cfg["missing_eos_penalty"],
                                         contains_eos=EOS)  # fmt: skip
    np.testing.assert_array_equal(chosen < P, DATA[f"{name}/chosen_mask"])
    assert close(scores, DATA[f"{name}/scores"])
    assert close(out.losses, DATA[f"{name}/dpo"] + DATA[f"{name}/xpo"])


def test_xpo_covers_both_branches_a_tie_and_the_penalty():
    no_penalty = DATA["xpo/sigmoid/beta0.1/alpha1e-05/penaltyNone/chosen_mask"]
    penalty = DATA["xpo/sigmoid/beta0.5/alpha0.3/penalty1.0/chosen_mask"]
    assert no_penalty.any() and not no_penalty.all()
    assert X["scores_y"][1] == X["scores_opp"][1] and no_penalty[1]  # a tie: y chosen (>=)
    assert no_penalty[4] and not penalty[4]  # y's missing EOS flips the pair


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_xpo_with_alpha_zero_is_online_dpo_exactly(loss_type, x64):
    def value_and_grad(fn):
        return jax.value_and_grad(lambda lp: fn(xpo_batch(lp)).loss)(xpo_logps())

    kw = dict(beta=0.5, loss_type=loss_type, missing_eos_penalty=1.0, contains_eos=EOS)
    xpo = value_and_grad(lambda b: L.xpo_loss(b, REWARDS, alpha=0.0, **kw))
    dpo = value_and_grad(lambda b: L.online_dpo_loss(b, REWARDS, **kw))
    np.testing.assert_array_equal(xpo[0], dpo[0])
    np.testing.assert_array_equal(xpo[1], dpo[1])


@pytest.mark.parametrize("name", of_kind("nash_md"))
def test_nash_md_matches_trl(name, x64):
    cfg, values = CASES[name]["config"], CASES[name]["values"]
    mask = jnp.asarray(X["mask_y"])
    ref = jnp.asarray(garbage_off_mask(X["ref_y"], X["mask_y"], 1))

    @jax.jit
    def f(logps):
        batch = L.RolloutBatch(logps=logps, mask=mask, ref_logps=ref)
        out = L.nash_md_loss(batch, X["scores_y"], X["scores_opp"], beta=cfg["beta"],
                             missing_eos_penalty=cfg["missing_eos_penalty"],
                             contains_eos=X["eos_y"],
                             opponent_contains_eos=X["eos_opp"])  # fmt: skip
        return out.loss, out

    logps = jnp.asarray(garbage_off_mask(X["logps_y"], X["mask_y"], 0))
    (loss, out), grad = jax.value_and_grad(f, has_aux=True)(logps)
    assert close(loss, values["loss"])
    assert close(grad, DATA[f"{name}/grad_y"])
    assert_metrics(out.metrics, values)
    assert out.losses.shape == (P,)


@pytest.mark.parametrize("coef", [0.0, 0.25, 0.5, 1.0])
def test_mixture_logits_match_trl_geometric_mixture_wrapper(coef, x64):
    policy, ref = DATA["mixture/policy_logits"], DATA["mixture/ref_logits"]
    got = jax.nn.log_softmax(models.mixture_logits(jnp.asarray(policy), jnp.asarray(ref), coef))
    assert close(got, DATA[f"mixture/logps/{coef}"])
    # ... which is the normalised geometric mixture pi^(1-c) pi_ref^c
    p, q = jax.nn.softmax(policy), jax.nn.softmax(ref)
    geometric = p ** (1 - coef) * q**coef
    np.testing.assert_allclose(jnp.exp(got), geometric / geometric.sum(-1, keepdims=True),
                               rtol=1e-12, atol=1e-300)  # fmt: skip


# ------------------------------------------------------------------------ exact oracles


@pytest.mark.parametrize("beta, coef", [(0.1, 0.5), (0.7, 0.2), (0.0, 1.0)])
def test_nash_md_expected_gradient_on_a_one_token_bandit(beta, coef, x64):
    """Munos et al. 2023's Nash-MD gradient: for one-token responses, E_{y~pi, y'~mix} of the
    loss's gradient is -grad E[P(y > y')] + beta grad KL(pi || pi_ref), the mixture fixed."""
    v = 6
    rng = np.random.default_rng(7)
    theta0, ref_logits, reward = (jnp.asarray(rng.normal(size=v)) for _ in range(3))
    ref_logp = jax.nn.log_softmax(ref_logits)
    mix = jax.nn.softmax(models.mixture_logits(theta0, ref_logits, coef))  # held fixed
    y, y2 = (a.ravel() for a in jnp.meshgrid(jnp.arange(v), jnp.arange(v), indexing="ij"))
    win = jax.nn.sigmoid(reward[:, None] - reward[None, :])  # P(y > y')

    def expected_loss(theta):  # the sampling weights carry no gradient
        logp = jax.nn.log_softmax(theta)
        batch = L.RolloutBatch(logps=logp[y][:, None], mask=jnp.ones((v * v, 1)),
                               ref_logps=ref_logp[y][:, None])  # fmt: skip
        out = L.nash_md_loss(batch, reward[y], reward[y2], beta=beta)
        weight = jax.lax.stop_gradient(jnp.exp(logp))[y] * mix[y2]
        return jnp.sum(weight * out.losses)

    def objective(theta):
        pi = jax.nn.softmax(theta)
        kl = jnp.sum(pi * (jnp.log(pi) - ref_logp))
        return -pi @ win @ mix + beta * kl

    theta = theta0 + 0.3
    np.testing.assert_allclose(jax.grad(expected_loss)(theta), jax.grad(objective)(theta),
                               rtol=0, atol=1e-12)  # fmt: skip


def test_micro_batches_sum_to_the_whole_batch(x64):
    """(sum, count) terms: two halves of the pairs give the whole batch's loss exactly."""
    logps, batch = xpo_logps(), xpo_batch(xpo_logps())
    whole = L.xpo_loss(batch, REWARDS, contains_eos=EOS, missing_eos_penalty=1.0, alpha=0.3)
    totals = counts = 0.0
    for part in (np.arange(0, 3), np.arange(3, P)):
        rows = np.concatenate([part, P + part])
        sub = L.RolloutBatch(logps=logps[rows], mask=batch.mask[rows],
                             ref_logps=batch.ref_logps[rows])  # fmt: skip
        t = L.xpo_loss(sub, REWARDS[rows], contains_eos=EOS[rows], missing_eos_penalty=1.0,
                       alpha=0.3).terms["xpo"]  # fmt: skip
        totals, counts = totals + t.total, counts + t.count
    np.testing.assert_allclose(totals / counts, whole.loss, rtol=1e-14)
    nash = L.RolloutBatch(logps=logps[:P], mask=batch.mask[:P], ref_logps=batch.ref_logps[:P])
    whole = L.nash_md_loss(nash, X["scores_y"], X["scores_opp"], beta=0.3)
    parts = [L.nash_md_loss(L.RolloutBatch(logps=nash.logps[s], mask=nash.mask[s],
                                           ref_logps=nash.ref_logps[s]),
                            X["scores_y"][s], X["scores_opp"][s], beta=0.3).terms["nash_md"]
             for s in (slice(0, 5), slice(5, P))]  # fmt: skip
    got = sum(t.total for t in parts) / sum(t.count for t in parts)
    np.testing.assert_allclose(got, whole.loss, rtol=1e-14)


def scored(rows=2 * P, opponent=False):
    mask = np.concatenate([X["mask_y"], X["mask_opp"]])[:rows]
    ref = xpo_batch(xpo_logps()).ref_logps[:rows]
    return L.ScoredRolloutBatch(
        logps=xpo_logps()[:rows], mask=jnp.asarray(mask), ref_logps=ref,
        rewards=jnp.asarray(REWARDS[:rows]), contains_eos=jnp.asarray(EOS[:rows]),
        opponent_rewards=jnp.asarray(X["scores_opp"]) if opponent else None,
        opponent_contains_eos=jnp.asarray(X["eos_opp"]) if opponent else None,
    )  # fmt: skip


def test_registered_losses_read_the_scored_batch(x64):
    assert {"xpo", "nash_md"} <= set(L.available())
    for name in ("xpo", "nash_md"):
        needs = L.needs_of(name)
        assert needs.tasks == ("online",) and needs.reference
    out = L.get("xpo")(scored(), beta=0.5, alpha=0.3, missing_eos_penalty=1.0)
    want = CASES["xpo/sigmoid/beta0.5/alpha0.3/penalty1.0"]["values"]
    assert close(out.loss, want["loss"])
    assert close(out.metrics["val/ref_contain_eos_token"], want["val/ref_contain_eos_token"])
    out = L.get("nash_md")(scored(P, opponent=True), beta=0.5, missing_eos_penalty=1.0)
    assert_metrics(out.metrics, CASES["nash_md/beta0.5/penalty1.0"]["values"])


@pytest.mark.parametrize("call, match", [
    (lambda: L.xpo_loss(L.RolloutBatch(logps=xpo_logps()[:3], mask=jnp.ones((3, 6))),
                        REWARDS[:3]), r"needs `ref_logps`"),
    (lambda: L.xpo_loss(L.RolloutBatch(logps=xpo_logps()[:3], mask=jnp.ones((3, 6)),
                                       ref_logps=xpo_logps()[:3]), REWARDS[:3]),
     r"an even number of \[B, T\] rows"),
    (lambda: L.xpo_loss(xpo_batch(xpo_logps()), REWARDS, loss_type="hinge"), r"`loss_type`"),
    (lambda: L.xpo_loss(xpo_batch(xpo_logps()), REWARDS, alpha=-1.0), r"`alpha` must be >= 0"),
    (lambda: L.xpo_loss(xpo_batch(xpo_logps()), REWARDS[:4]), r"`rewards` has 4 rows"),
    (lambda: L.nash_md_loss(xpo_batch(xpo_logps()), REWARDS[:3], REWARDS[:3]),
     r"must be \[P\] = \[16\] each"),
    (lambda: L.nash_md_loss(xpo_batch(xpo_logps()), REWARDS, REWARDS, missing_eos_penalty=1.0),
     r"needs `contains_eos` and `opponent_contains_eos`"),
    (lambda: L.nash_md_loss(xpo_batch(xpo_logps()), REWARDS, REWARDS, beta=-0.1),
     r"`beta` must be >= 0"),
    (lambda: L.get("nash_md")(scored(P)), r"`opponent_rewards`"),
])  # fmt: skip
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
