"""experiments/onpolicy_bandit.py (issue 15, Tajwar et al.'s bandit): the exact expected
gradients against sampled groups enumerated with their probabilities (a float64 NumPy
derivation), the KL-regularised optimum reached by the exact policy gradient, the reference
policy against the official histogram construction, and the --quick run end to end."""

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `experiments` is imported from the checkout
    sys.path.insert(0, str(ROOT))

from experiments import bandit as ob  # noqa: E402

SCRIPT = ROOT / "experiments" / "onpolicy_bandit.py"
PNG = b"\x89PNG\r\n\x1a\n"
EPS64 = np.finfo(np.float64).eps / 2  # unit roundoff u

# A small problem whose groups can all be enumerated: V actions, groups of N, rewards with a
# tie between two distinct actions (1 and 2) so the tie rules are exercised.
V, N, BETA = 5, 3, 0.3
REWARDS = np.array([0.2, 0.5, 0.5, 0.9, 0.1])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_enumerated_gradient(objective, theta, logref, sampler):
    """E over every group (y_1..y_N) ~ sampler i.i.d. of the gradient of the group's loss, each
    group's gradient derived by hand (no autodiff), in float64. Returns (gradient, sum of the
    magnitudes of every summand, number of summands): the last two size the rounding bound."""
    p = _softmax(theta)
    logp = np.log(p)
    eye = np.eye(V)
    grad, mag, count = np.zeros(V), np.zeros(V), 0
    for ys in itertools.product(range(V), repeat=N):
        w = np.prod(sampler[list(ys)])
        terms = []
        if objective in ("dpo", "ipo"):  # every pair i < j; chosen = higher reward, ties: y_i
            for i, j in itertools.combinations(range(N), 2):
                c, l = (ys[i], ys[j]) if REWARDS[ys[i]] >= REWARDS[ys[j]] else (ys[j], ys[i])
                h = (logp[c] - logp[l]) - (logref[c] - logref[l])
                if objective == "dpo":  # d/dh -log s(beta h) = -beta (1 - s(beta h))
                    dh = -BETA / (1.0 + np.exp(BETA * h))
                else:  # d/dh (h - 1 / (2 beta))^2
                    dh = 2.0 * (h - 1.0 / (2.0 * BETA))
                terms.append(dh * (eye[c] - eye[l]))  # grad_theta h = e_c - e_l
        elif objective == "bon":  # -log pi(best); first index on ties
            best = ys[int(np.argmax(REWARDS[list(ys)]))]
            terms.append(-(eye[best] - p))
        else:  # REINFORCE: r' = r - beta (log pi - log ref), leave-one-out baseline
            shaped = np.array([REWARDS[y] - BETA * (logp[y] - logref[y]) for y in ys])
            for i, y in enumerate(ys):
                adv = shaped[i] - (shaped.sum() - shaped[i]) / (N - 1)
                terms.append(-adv * (eye[y] - p))
        g = np.mean(terms, axis=0)
        grad += w * g
        mag += w * np.mean(np.abs(terms), axis=0) + w * np.abs(g)
        count += len(terms)
    return grad, mag, count


def jax_gradients(objective, theta, logref, sampler, grid=False):
    """(exact-enumeration gradient, mean of the sampled-batch gradients over every group
    weighted by its probability), both through the experiment's own loss code; `grid`: the
    sampled pairs as weights on the (chosen, rejected) grid, as the offline data set is."""
    rewards, logref, theta = jnp.asarray(REWARDS), jnp.asarray(logref), jnp.asarray(theta)

    def grad(data, sampled):
        def loss(t):
            return ob.objective_loss(
                t, data, rewards, logref, objective=objective, beta=BETA, n=N, sampled=sampled
            )

        return jax.grad(loss)(theta)

    exact = jax.jit(lambda: grad(ob.exact_data(jnp.asarray(sampler), rewards, N), False))()
    groups = np.array(list(itertools.product(range(V), repeat=N)))
    weights = np.prod(sampler[groups], axis=1)
    per_group = jax.jit(
        jax.vmap(lambda ys: grad(ob.sampled_data(ys[None], rewards, V, grid), True))
    )(jnp.asarray(groups))
    return np.asarray(exact), weights @ np.asarray(per_group)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "bon", "pg"])
def test_exact_gradient_equals_enumerated_sampled_groups(objective, x64):
    """(a) The exact-enumeration expected gradient = the probability-weighted mean of the
    sampled per-group (per-pair, per-best, per-sample) gradients over all V^N groups, with a
    sampling distribution other than the policy (offline data, or an on-policy batch reused
    for several steps); for REINFORCE the leave-one-out baseline is then part of the
    expectation. The sampled groups are also checked as grid weights (the offline data set).
    Tie rules (first vs second sample, first vs last best) do not change these expectations
    (exchangeability); the direction of the labels does, and fails this test.

    Tolerance: both sides are float64 sums of `count` summands, each computed with a few dozen
    roundings, and autodiff's log-softmax backward mixes coordinates (weights pi <= 1), so
    every coordinate is within (count + 64) u sum|summands| of the true value, the sum over all
    coordinates' summands (recursive-summation bound gamma_n sum|x_i|, u = 2^-53); the check
    allows twice that (about 1e-13 here)."""
    rng = np.random.default_rng(7)
    theta, logref = rng.normal(size=V), np.log(_softmax(rng.normal(size=V)))
    sampler = _softmax(rng.normal(size=V))  # the policy after some steps on an older batch
    want, mag, count = numpy_enumerated_gradient(objective, theta, logref, sampler)
    exact, sampled = jax_gradients(objective, theta, logref, sampler)
    _, on_grid = jax_gradients(objective, theta, logref, sampler, grid=True)
    tol = 2.0 * (count + 64) * EPS64 * mag.sum()
    assert np.abs(want).max() > 1e-3  # a real gradient, not zeros on both sides
    for got in (exact, sampled, on_grid):
        np.testing.assert_array_less(np.abs(got - want), tol)


def test_best_of_n_probs_sum_to_one_and_put_ties_in_proportion(x64):
    """The closed form q(a) = pi(a) sum_k F_le^k F_lt^(N-1-k) on the 100-action problem sums
    to 1 and gives tied actions (a* - d, a* + d) mass in proportion to pi."""
    p, r = np.exp(ob.LOG_REF), ob.reward(70)
    q = np.asarray(ob.best_of_n_probs(jnp.asarray(p), jnp.asarray(r), 10))
    assert abs(q.sum() - 1.0) < 1e-12
    assert r[60] == r[80]
    assert abs(q[60] / q[80] - p[60] / p[80]) < 1e-12


def test_reference_matches_the_official_histogram():
    """pi_ref's exact bin masses against the official construction (a histogram of
    tanh(Cauchy(-0.7, 0.4)) samples): every bin within 5 binomial standard errors."""
    rng = np.random.default_rng(0)
    m = 400_000
    samples = np.tanh(-0.7 + 0.4 * rng.standard_cauchy(m))
    hist, _ = np.histogram(samples, range=(-1.0, 1.0), bins=100)
    p = ob.reference_probs()
    assert abs(p.sum() - 1.0) < 1e-12 and p.min() > 0
    se = np.sqrt(p * (1 - p) / m)
    np.testing.assert_array_less(np.abs(hist / m - p), 5 * se)
    assert int(np.argmax(p[1:-1])) + 1 == 16  # the interior mode


@pytest.mark.parametrize("peak", ["near", "far"])
def test_exact_policy_gradient_reaches_the_kl_regularised_optimum(peak, x64):
    """(b) Exact REINFORCE-KL (expected loss under the current policy, one step per epoch) from
    pi_ref reaches pi* = pi_ref exp(r / beta) / Z: KL(pi_T || pi*) < 1e-6 after 5000 Adam steps
    with a cosine-decayed lr. Also checks the identity J(pi) = beta log Z - beta KL(pi || pi*)
    at pi_T (Korbak et al. 2022), to float64 rounding."""
    steps = 5000
    cfg = replace(ob.Study(), epochs=steps, inner=1)
    method = ob.BY_NAME["on-policy REINFORCE-KL"]
    r = ob.reward(ob.PEAKS[peak])
    run = jax.jit(
        lambda rewards: ob.train(
            0.3,
            rewards,
            float(ob.PEAKS[peak]),
            jnp.zeros((1, 1)),
            ob.OBJECTIVES.index(method.objective),
            on_policy=True,
            exact=True,
            cfg=cfg,
            tx_fn=lambda lr: optax.adam(optax.cosine_decay_schedule(lr, steps), b2=0.99),
        )  # fmt: skip
    )
    hist, probs = run(jnp.asarray(r))
    p = np.asarray(probs, np.float64)
    star = ob.kl_optimum(ob.LOG_REF, r, cfg.beta)
    kl_star = float(np.sum(p * np.log(p / star)))
    assert kl_star < 1e-6, kl_star
    beta = cfg.beta
    j = p @ r - beta * np.sum(p * (np.log(p) - ob.LOG_REF))
    log_z = np.log(np.sum(np.exp(ob.LOG_REF + r / beta - r.max() / beta))) + r.max() / beta
    assert abs(j - (beta * log_z - beta * kl_star)) < 1e-12 * beta * abs(log_z)
    assert abs(float(hist["reward"][-1]) - star @ r) < 1e-3


@pytest.mark.slow  # runs the script in a subprocess
def test_quick_run_writes_its_outputs(tmp_path):
    """(c) --quick end to end: every method, both peaks, exact and sampled rows with finite
    numbers in range, the table, the figures and the README."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one host device
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = {(r["method"], r["peak"], r["mode"]) for r in summary["rows"]}
    assert got == {(m.name, p, mode) for m in ob.METHODS for p in ob.PEAKS
                   for mode in ("exact", "sampled")}  # fmt: skip
    for row in summary["rows"]:
        for key in ("final_reward", "auc", "final_kl", "final_peak_mass"):
            lo, hi = row[key]["ci95"]
            assert all(math.isfinite(x) for x in (row[key]["mean"], lo, hi)), (row, key)
            assert lo <= row[key]["mean"] <= hi
        assert 0.0 <= row["final_reward"]["mean"] <= 1.0 and row["final_kl"]["mean"] >= 0.0
    assert {c["id"] for c in summary["claims"]} >= {"on_policy_far", "negative_gradient"}
    for name in ("curves.png", "policies.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert "| far | offline IPO |" in (tmp_path / "table.md").read_text()
    assert "## " in (tmp_path / "README.md").read_text()
