"""alignjax.losses on-policy family (GRPO loss types, RLOO, REINFORCE-KL, Online DPO and their
advantages) against TRL 1.16.0's own code and exact oracles.

Parity (fixture `trl_online.npz`, made by `reference/generate_trl_online.py` from TRL's
`_compute_loss`, `_generate_and_score_completions` and Online DPO `training_step`): losses,
gradients w.r.t. the per-token policy log-probs, per-token losses, advantages and every logged
metric match to <= 1e-10 relative to max(1, |TRL|) under x64: both sides are float64 and differ
only in summation order (~1e-16). Exception: TRL computes its fractions (`clip_ratio/*`,
`frac_reward_zero_std`, `rewards/accuracies`, `val/contain_eos_token`) from `.float()` (float32)
indicators, so they get 1e-7. The float32 check uses 1e-5 (float32 rounding of O(1) sums).

Oracles: the KL estimators and the Korbak REINFORCE-KL surrogate are checked by exact
enumeration over an 8-token vocabulary (expected values and expected gradients are finite sums,
so they agree with the closed forms to 1e-12); gradients by finite differences (check_grads,
1e-6, the finite-difference error at eps ~1e-4 in float64 is ~1e-8).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax import losses as L

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_online.npz"
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["meta_json"]))
CASES = META["cases"]
X = {k.split("/", 1)[1]: DATA[k] for k in DATA.files if k.startswith("loss_inputs/")}
TOL = 1e-10
# Fractions TRL computes from `.float()` (float32) indicators, whatever the default dtype.
FLOAT32_METRICS = (
    "clip_ratio/",
    "frac_reward_zero_std",
    "rewards/accuracies",
    "val/contain_eos_token",
)


def of_kind(kind):
    return sorted(n for n, c in CASES.items() if c["kind"] == kind)


def close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
        return False
    ok = ~np.isnan(want)
    if not ok.any():
        return True
    return np.max(np.abs(got[ok] - want[ok])) <= tol * max(1.0, np.max(np.abs(want[ok])))


def assert_metrics(metrics, values, skip=("loss",)):
    want = {k: v for k, v in values.items() if k not in skip}
    assert set(metrics) == set(want), (sorted(metrics), sorted(want))
    for k, v in want.items():
        tol = 1e-7 if k.startswith(FLOAT32_METRICS) else TOL
        assert close(metrics[k], v, tol), (k, float(metrics[k]), v)


def rollout(logps, *, off_policy, beta=0.0, rows=slice(None)):
    return L.RolloutBatch(
        logps=logps,
        mask=jnp.asarray(X["mask"][rows]),
        advantages=jnp.asarray(X["advantages"][rows]),
        old_logps=jnp.asarray(X["old_logps"][rows]) if off_policy else None,
        ref_logps=jnp.asarray(X["ref_logps"][rows]) if beta else None,
        entropy=jnp.asarray(X["entropy"][rows]),
    )


def grpo_kwargs(cfg):
    return dict(
        loss_type=cfg["loss_type"],
        beta=cfg["beta"],
        epsilon=cfg["epsilon"],
        epsilon_high=cfg["epsilon_high"],
        delta=cfg["delta"],
        use_bias_correction_kl=cfg["use_bias_correction_kl"],
        max_completion_length=META["max_completion_length"],
        importance_sampling_level=cfg["importance_sampling_level"],
    )


def grpo_value_and_grad(cfg, rows=slice(None), dtype=jnp.float64):
    def f(logps):
        out = L.grpo_loss(rollout(logps, off_policy=cfg["off_policy"], beta=cfg["beta"],
                                  rows=rows), **grpo_kwargs(cfg))  # fmt: skip
        return out.loss, out

    return jax.value_and_grad(f, has_aux=True)(jnp.asarray(X["logps"][rows], dtype))


# ------------------------------------------------------------------------- TRL parity


# At beta 0 the KL term, and with it `use_bias_correction_kl`, is off: the bias1 cases there take
# the bias0 cases' path (same inputs, same values), so they run with the slow set.
GRPO_CASES = [
    pytest.param(n, marks=pytest.mark.slow) if "/beta0.0/bias1/" in n else n
    for n in of_kind("grpo_loss")
]


@pytest.mark.parametrize("name", GRPO_CASES)
def test_grpo_loss_matches_trl(name, x64):
    cfg, values = CASES[name]["config"], CASES[name]["values"]
    (loss, out), grad = grpo_value_and_grad(cfg)
    assert loss.dtype == jnp.float64
    assert close(loss, values["loss"]), (float(loss), values["loss"])
    assert close(grad, DATA[f"{name}/grad"])
    kwargs = grpo_kwargs(cfg)
    kwargs.pop("loss_type"), kwargs.pop("max_completion_length")
    batch = rollout(jnp.asarray(X["logps"]), off_policy=cfg["off_policy"], beta=cfg["beta"])
    per_token, _, _ = L.grpo_per_token_loss(batch, **kwargs)
    assert close(per_token, DATA[f"{name}/per_token_loss"])
    assert_metrics(out.metrics, values)


def test_grpo_loss_float32_matches_trl():
    name = "grpo/dapo/beta0.04/bias1/token/off"
    (loss, out), grad = grpo_value_and_grad(CASES[name]["config"], dtype=jnp.float32)
    assert loss.dtype == jnp.float32
    assert close(loss, CASES[name]["values"]["loss"], 1e-5)
    assert close(grad, DATA[f"{name}/grad"], 1e-5)


@pytest.mark.parametrize("name", of_kind("grpo_accumulated"))
def test_accumulated_terms_match_trl_gradient_accumulation(name, x64):
    """TRL with GA = 4, steps_per_generation = 4 and 2 DDP processes (8 calls of 2 rows; the
    optimizer sees half the sum): summing our 8 terms' totals and counts gives the same loss
    and gradient, for bnpo too (its term is each micro-batch's own token mean, count 1)."""
    cfg = CASES[name]["config"]
    kwargs = grpo_kwargs(cfg)

    def f(logps):
        terms = [
            L.grpo_loss(rollout(logps[2 * i : 2 * i + 2], off_policy=True, beta=cfg["beta"],
                                rows=slice(2 * i, 2 * i + 2)), **kwargs).terms[cfg["loss_type"]]
            for i in range(8)
        ]  # fmt: skip
        return sum(t.total for t in terms) / sum(t.count for t in terms)

    loss, grad = jax.value_and_grad(f)(jnp.asarray(X["logps"]))
    assert close(loss, CASES[name]["values"]["loss"])
    assert close(grad, DATA[f"{name}/grad"])


@pytest.mark.parametrize("loss_type", L.policy_gradient.LOSS_TYPES)
def test_microbatches_sum_to_the_whole_batch(loss_type, x64):
    """Four micro-batches of 4 rows: (sum of totals) / (sum of counts) is the whole-batch loss
    for dapo, grpo and dr_grpo. bnpo's term is a per-micro-batch token mean (TRL's definition,
    whose value depends on the split): the sum gives the mean of the micro-batch means, which
    differs from the whole-batch token mean when micro-batches hold different token counts."""
    cfg = dict(CASES["grpo/dapo/beta0.04/bias1/token/off"]["config"], loss_type=loss_type)
    kwargs = grpo_kwargs(cfg)
    logps = jnp.asarray(X["logps"])
    whole = L.grpo_loss(rollout(logps, off_policy=True, beta=0.04), **kwargs)
    parts = [
        L.grpo_loss(rollout(logps[r], off_policy=True, beta=0.04, rows=r), **kwargs)
        for r in (slice(4 * i, 4 * i + 4) for i in range(4))
    ]
    terms = [p.terms[loss_type] for p in parts]
    accumulated = sum(t.total for t in terms) / sum(t.count for t in terms)
    if loss_type != "bnpo":
        assert close(accumulated, whole.loss)
        return
    assert close(accumulated, np.mean([p.loss for p in parts]))
    assert abs(float(accumulated) - float(whole.loss)) > 1e-3


@pytest.mark.parametrize("name", of_kind("rloo_loss"))
def test_rloo_loss_matches_trl(name, x64):
    cfg, values = CASES[name]["config"], CASES[name]["values"]

    def f(logps):
        out = L.rloo_loss(rollout(logps, off_policy=cfg["off_policy"]), epsilon=cfg["epsilon"],
                          epsilon_high=cfg["epsilon_high"])  # fmt: skip
        return out.loss, out

    (loss, out), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(X["logps"]))
    assert close(loss, values["loss"])
    assert close(grad, DATA[f"{name}/grad"])
    assert close(out.losses, DATA[f"{name}/per_sequence_loss"])
    assert_metrics(out.metrics, values)


def reward_inputs(case):
    r = case["rewards"]
    names = [f"r{k}" for k in range(DATA[f"rewards/{r}"].shape[1])]
    return (
        jnp.asarray(DATA[f"rewards/{r}"]),
        int(DATA[f"num_generations/{r}"]),
        dict(reward_weights=jnp.asarray(DATA[f"reward_weights/{r}"]), reward_names=names),
    )


@pytest.mark.parametrize("name", of_kind("grpo_advantages"))
def test_group_advantages_match_trl(name, x64):
    case = CASES[name]
    rewards, g, kwargs = reward_inputs(case)
    static = ("scale_rewards", "multi_objective_aggregation", "reward_names")
    fn = jax.jit(L.group_advantages, static_argnums=1, static_argnames=static)
    adv, metrics = fn(
        rewards,
        g,
        scale_rewards=case["scale_rewards"],
        multi_objective_aggregation=case["multi_objective_aggregation"],
        reward_weights=kwargs["reward_weights"],
        reward_names=tuple(kwargs["reward_names"]),
    )
    assert close(adv, DATA[f"{name}/advantages"])
    assert_metrics(metrics, case["values"])


@pytest.mark.parametrize("name", of_kind("rloo_advantages"))
def test_rloo_advantages_match_trl(name, x64):
    case = CASES[name]
    rewards, g, kwargs = reward_inputs(case)
    adv, metrics = L.rloo_advantages(
        rewards,
        g,
        beta=case["beta"],
        old_logps=jnp.asarray(DATA[f"{name}/old_logps"]),
        ref_logps=jnp.asarray(DATA[f"{name}/ref_logps"]),
        mask=jnp.asarray(DATA[f"{name}/mask"]),
        normalize=case["normalize_advantages"],
        reward_clip_range=case["reward_clip_range"],
        **kwargs,
    )
    assert close(adv, DATA[f"{name}/advantages"])
    assert_metrics(metrics, case["values"])


@pytest.mark.parametrize("name", of_kind("online_dpo"))
def test_online_dpo_matches_trl(name, x64):
    cfg, values = CASES[name]["config"], CASES[name]["values"]
    inp = {k.split("/", 1)[1]: DATA[k] for k in DATA.files if k.startswith("online_dpo_inputs/")}

    def f(logps):
        batch = L.RolloutBatch(logps=logps, mask=jnp.asarray(inp["mask"]),
                               ref_logps=jnp.asarray(inp["ref_logps"]))  # fmt: skip
        out = L.online_dpo_loss(batch, jnp.asarray(inp["rewards"]), beta=cfg["beta"],
                                loss_type=cfg["loss_type"], contains_eos=inp["contains_eos"],
                                missing_eos_penalty=cfg["missing_eos_penalty"])  # fmt: skip
        return out.loss, out

    (loss, out), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(inp["logps"]))
    assert close(loss, values["loss"])
    assert close(grad, DATA[f"{name}/grad"])
    assert_metrics(out.metrics, values)


def test_online_dpo_pairs_ties_to_the_first_sample():
    chosen, rejected, scores = L.pair_by_reward(jnp.array([1.0, 0.5, 2.0, 0.5, 0.5, 3.0]))
    np.testing.assert_array_equal(chosen, [0, 1, 5])
    np.testing.assert_array_equal(rejected, [3, 4, 2])
    chosen, _, scores = L.pair_by_reward(jnp.array([jnp.nan, -1.0]))  # None scores 0
    np.testing.assert_array_equal(chosen, [0])
    np.testing.assert_array_equal(scores, [0.0, -1.0])


# ------------------------------------------------------------------------ exact oracles


def categorical(seed, v=8):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(0, 1.0, v)), jax.nn.log_softmax(jnp.asarray(rng.normal(0, 1, v)))


def kl(logp, logq):
    return jnp.sum(jnp.exp(logp) * (logp - logq))


def test_kl_estimators_exact_enumeration(x64):
    """E_{y~pi}[k1] = E_{y~pi}[k3] = KL(pi || ref) = E_{y~old}[rho k3]; expected gradients of
    the estimators used as losses: k1 -> 0, k3 -> grad KL(ref || pi), k2 and rho k3 (on-policy)
    -> grad KL(pi || ref) (specs/online.md 3.1 table)."""
    theta, ref = categorical(1)
    old = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(2).normal(0, 1, 8)))
    logp = jax.nn.log_softmax(theta)
    p = jnp.exp(logp)
    target = kl(logp, ref)
    assert abs(jnp.sum(p * L.kl_k1(logp, ref)) - target) < 1e-12
    assert abs(jnp.sum(p * L.kl_k3(logp, ref)) - target) < 1e-12
    assert abs(jnp.sum(jnp.exp(old) * L.kl_k3_ratio(logp, ref, old)) - target) < 1e-12
    assert jnp.all(L.kl_k3(logp, ref) >= 0) and jnp.all(L.kl_k2(logp, ref) >= 0)

    def expected_grad(estimator):
        def f(t):
            lp = jax.nn.log_softmax(t)
            return jnp.sum(jax.lax.stop_gradient(jnp.exp(lp)) * estimator(lp))

        return jax.grad(f)(theta)

    reverse = jax.grad(lambda t: kl(jax.nn.log_softmax(t), ref))(theta)
    forward = jax.grad(lambda t: kl(ref, jax.nn.log_softmax(t)))(theta)
    np.testing.assert_allclose(expected_grad(lambda lp: L.kl_k1(lp, ref)), 0.0, atol=1e-12)
    np.testing.assert_allclose(expected_grad(lambda lp: L.kl_k3(lp, ref)), forward, atol=1e-12)
    np.testing.assert_allclose(expected_grad(lambda lp: L.kl_k2(lp, ref)), reverse, atol=1e-12)
    on_policy = expected_grad(lambda lp: L.kl_k3_ratio(lp, ref, lp))
    np.testing.assert_allclose(on_policy, reverse, atol=1e-12)
    assert np.max(np.abs(forward - reverse)) > 1e-2  # the two targets really differ


def test_korbak_reinforce_kl_oracle(x64):
    """Korbak et al. 2022: J = E_pi[r] - beta KL(pi || pi0) = beta log Z - beta KL(pi || pi*),
    pi* = pi0 e^{r/beta} / Z. The exact expectation (weights pi, no sampling) of the
    REINFORCE-KL surrogate's gradient is -grad J, with or without a constant baseline, and
    exact gradient descent on it from pi_0 converges to pi* (linearly; min pi* ~ 5e-4 sets the
    rate, 4000 steps of size 6 reach KL ~ 1e-10)."""
    theta0, ref = categorical(3)
    rewards = jnp.asarray(np.random.default_rng(4).normal(0, 1, 8))
    beta = 0.5
    log_z = jax.nn.logsumexp(ref + rewards / beta)
    target = ref + rewards / beta - log_z

    def objective(t):
        lp = jax.nn.log_softmax(t)
        return jnp.sum(jnp.exp(lp) * rewards) - beta * kl(lp, ref)

    def surrogate(t, baseline=None):
        lp = jax.nn.log_softmax(t)
        batch = L.RolloutBatch(logps=lp[:, None], mask=jnp.ones((8, 1)), ref_logps=ref[:, None])
        out = L.reinforce_kl_loss(batch, rewards, beta=beta, baseline=baseline)
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(lp)) * out.losses)

    lp0 = jax.nn.log_softmax(theta0)
    assert abs(objective(theta0) - (beta * log_z - beta * kl(lp0, target))) < 1e-12
    want = -jax.grad(objective)(theta0)
    np.testing.assert_allclose(jax.grad(surrogate)(theta0), want, atol=1e-12)
    const = jnp.full((8,), 0.7)
    np.testing.assert_allclose(jax.grad(surrogate)(theta0, const), want, atol=1e-12)

    step = jax.jit(lambda t: t - 6.0 * jax.grad(surrogate)(t))  # from pi_0: logits = log pi_0
    theta = jax.lax.fori_loop(0, 4000, lambda i, t: step(t), ref)
    assert kl(jax.nn.log_softmax(theta), target) < 1e-8


def test_on_policy_loss_is_zero_but_gradient_is_not(x64):
    """trl #2703 / #3452: with mu = 1 (old = sg(logps)) and beta = 0 the loss value is the mean
    advantage (0 for group-centred advantages) while the gradient is -A_i / |y_i| per token."""
    rewards = jnp.asarray(np.random.default_rng(5).normal(0, 1, 16))
    adv, _ = L.group_advantages(rewards, 4)
    mask = jnp.asarray(X["mask"]).at[:, 0].set(1)  # ragged, no empty row

    def f(logps):
        batch = L.RolloutBatch(logps=logps, mask=mask, advantages=adv)
        return L.grpo_loss(batch, loss_type="grpo").loss

    value, grad = jax.value_and_grad(f)(jnp.asarray(X["logps"]))
    assert abs(float(value)) < 1e-12
    n = jnp.maximum(mask.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(grad, -(adv[:, None] / n) * mask / 16, atol=1e-14)
    assert float(jnp.abs(grad).max()) > 1e-2


@pytest.mark.parametrize(
    "loss",
    [
        lambda b: L.grpo_loss(b, loss_type="dapo", beta=0.1, importance_sampling_level="token"),
        lambda b: L.grpo_loss(b, loss_type="grpo", beta=0.1, use_bias_correction_kl=False),
        lambda b: L.grpo_loss(
            b,
            loss_type="dr_grpo",
            beta=0.1,
            max_completion_length=8,
            importance_sampling_level="sequence",
        ),  # fmt: skip
        lambda b: L.rloo_loss(b, epsilon_high=0.28),
    ],
    ids=["dapo_token", "grpo_no_bias", "dr_grpo_sequence", "rloo"],
)
def test_check_grads(loss, x64):
    """Finite differences on inputs away from the clip kinks (ratios within 1 +- 0.1)."""
    rng = np.random.default_rng(6)
    logps = jnp.asarray(X["logps"])
    old = logps + 0.02 * rng.standard_normal(logps.shape)
    mask = jnp.asarray(X["mask"])

    def f(x):
        batch = L.RolloutBatch(logps=x, mask=mask, advantages=jnp.asarray(X["advantages"]),
                               old_logps=old, ref_logps=jnp.asarray(X["ref_logps"]))  # fmt: skip
        return loss(batch).loss

    check_grads(f, (logps,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_pmap_metrics_and_terms_are_global(x64):
    """Under pmap over 8 devices (2 rows each), summed terms give the whole-batch loss and the
    `axis_name` metrics (psum means, pmin / pmax) equal the whole-batch metrics."""
    cfg = CASES["grpo/dapo/beta0.04/bias1/token/off"]["config"]
    kwargs = grpo_kwargs(cfg)
    logps = jnp.asarray(X["logps"])
    whole = L.grpo_loss(rollout(logps, off_policy=True, beta=0.04), **kwargs)
    split = rollout(logps, off_policy=True, beta=0.04)
    split = jax.tree.map(lambda a: a.reshape(8, 2, *a.shape[1:]), split)

    def run(b):
        out = L.grpo_loss(b, axis_name="d", **kwargs)
        return out.terms["dapo"], out.metrics

    term, metrics = jax.pmap(run, axis_name="d")(split)
    assert close(jnp.sum(term.total) / jnp.sum(term.count), whole.loss)
    for k, v in whole.metrics.items():
        assert close(metrics[k][0], v), k


def test_extreme_log_ratios_stay_finite():
    """float32, log-ratios of +-1000 against the sampler and the reference: loss and gradients
    are finite (exponents clamped at MAX_LOG_RATIO)."""
    logps = jnp.array([[-1000.0, -0.1, -3.0], [-0.5, -900.0, -2.0]])
    old = jnp.array([[-0.1, -1000.0, -3.0], [-700.0, -0.2, -2.0]])
    ref = jnp.array([[-0.1, -1000.0, -2.0], [-1.0, -0.2, -800.0]])
    mask = jnp.ones((2, 3))
    for level in ("token", "sequence"):

        def f(x, level=level):
            b = L.RolloutBatch(logps=x, mask=mask, advantages=jnp.array([1.0, -1.0]),
                               old_logps=old, ref_logps=ref)  # fmt: skip
            pg = L.grpo_loss(b, beta=0.1, importance_sampling_level=level)
            return pg.loss + L.rloo_loss(b).loss

        value, grad = jax.jit(jax.value_and_grad(f))(logps)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), level


# --------------------------------------------------------------------------- bad input


def good_batch(**kw):
    fields = dict(
        logps=jnp.zeros((4, 3)), mask=jnp.ones((4, 3)), advantages=jnp.zeros(4),
        ref_logps=jnp.zeros((4, 3)),
    )  # fmt: skip
    fields.update(kw)
    return L.RolloutBatch(**fields)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: good_batch(mask=jnp.ones((4, 2))), "`mask`"),
        (lambda: good_batch(mask=None), "`mask`"),
        (lambda: good_batch(advantages=jnp.zeros(3)), "`advantages`"),
        (lambda: good_batch(logps=jnp.zeros(4)), "`logps`"),
        (lambda: good_batch(old_logps=jnp.zeros((3, 3))), "`old_logps`"),
        (lambda: L.group_advantages(jnp.zeros(8), 3), "num_generations"),
        (lambda: L.group_advantages(jnp.zeros(8), 0), "num_generations"),
        (lambda: L.group_advantages(jnp.zeros(8), 4, scale_rewards="std"), "scale_rewards"),
        (
            lambda: L.group_advantages(jnp.zeros(8), 4, multi_objective_aggregation="x"),
            "multi_objective_aggregation",
        ),  # fmt: skip
        (lambda: L.group_advantages(jnp.zeros((8, 2)), 4, reward_weights=[1.0]), "reward_weights"),
        (lambda: L.group_advantages(jnp.zeros((8, 2, 1)), 4), "`rewards`"),
        (lambda: L.rloo_advantages(jnp.zeros(8), 3, beta=0.0), "num_generations"),
        (lambda: L.rloo_advantages(jnp.zeros(8), 4, beta=-0.1), "`beta`"),
        (lambda: L.rloo_advantages(jnp.zeros(8), 4, beta=0.1), "old_logps"),
        (lambda: L.grpo_loss(good_batch(), loss_type="ppo"), "loss_type"),
        (lambda: L.grpo_loss(good_batch(), beta=-1.0), "`beta`"),
        (lambda: L.grpo_loss(good_batch(), epsilon=0.0), "`epsilon`"),
        (lambda: L.grpo_loss(good_batch(), epsilon_high=-0.1), "`epsilon_high`"),
        (
            lambda: L.grpo_loss(good_batch(), importance_sampling_level="seq"),
            "importance_sampling_level",
        ),  # fmt: skip
        (lambda: L.grpo_loss(good_batch(), loss_type="dr_grpo"), "max_completion_length"),
        (lambda: L.grpo_loss(good_batch(ref_logps=None), beta=0.1), "ref_logps"),
        (lambda: L.grpo_loss(good_batch(advantages=None)), "advantages"),
        (lambda: L.rloo_loss(good_batch(), epsilon=0.0), "`epsilon`"),
        (
            lambda: L.reinforce_kl_loss(good_batch(old_logps=jnp.zeros((4, 3))), jnp.zeros(4)),
            "old_logps",
        ),  # fmt: skip
        (lambda: L.reinforce_kl_loss(good_batch(), jnp.zeros(3)), "`rewards`"),
        (lambda: L.reinforce_kl_loss(good_batch(), jnp.zeros(4), baseline="mean"), "baseline"),
        (lambda: L.online_dpo_loss(good_batch(), jnp.zeros(3)), "`rewards`"),
        (lambda: L.online_dpo_loss(good_batch(), jnp.zeros(4), loss_type="hinge"), "loss_type"),
        (lambda: L.online_dpo_loss(good_batch(), jnp.zeros(4), beta=0.0), "`beta`"),
        (
            lambda: L.online_dpo_loss(good_batch(), jnp.zeros(4), missing_eos_penalty=1.0),
            "contains_eos",
        ),  # fmt: skip
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
