"""SPPO self-play (alignjax.online.selfplay) against float64 NumPy derivations and the theory.

* `sppo_targets` vs a NumPy restatement of `compute_prob.py` (`from_ranks`, `prepare_score`)
  with ties, K = 3, 5, 7: picks exactly, probabilities to 1e-12 (float64, sums of <= 7 terms in
  another order: error <= 7 eps ~ 2e-15).
* The multiplicative-weights step vs NumPy to 1e-12 per step (one softmax of K = 4 terms).
* Rock-paper-scissors: the time average of the iterates has exploitability below Hedge's regret
  bound log(1/min pi_0)/(eta T) + eta (1 - 2p)^2 / 8 (payoffs in [p, 1 - p]), hence is within
  sqrt(2) eps / (1/2 - p) of uniform in l2; the last iterate drifts away (KL(u || pi_t) grows by
  exactly log Z_t per step, an identity).
* Transitive Bradley-Terry preferences: pi_t(best) increases monotonically to >= 1 - bound / g.
* The SPPO loss (`alignjax.losses.sppo`, reference = previous iterate, exact expectations)
  minimised by gradient descent over tabular logits equals `tabular_sppo_fit` (gradient-norm
  stopping, 1e-9), and differs from the MW step by -log Z_t r(y) + O(eta^4) (third order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L
from alignjax import online

PI0 = np.array([0.6, 0.3, 0.1])


def rps(p):
    """P(R > S) = P(S > P) = P(P > R) = 1 - p; order (R, P, S)."""
    m = np.full((3, 3), 0.5)
    for winner, loser in ((0, 2), (2, 1), (1, 0)):
        m[winner, loser], m[loser, winner] = 1 - p, p
    return m


def bt(rewards):
    r = np.asarray(rewards, np.float64)
    return 1.0 / (1.0 + np.exp(r[None, :] - r[:, None]))


def np_mw_step(pi, m, eta):
    x = pi * np.exp(eta * (m @ pi - 0.5))
    return x / x.sum()


# ----------------------------------------------------------------------------- sppo_targets


def compute_prob_reference(scores):
    """`compute_prob.py` restated: prb[i][j] = 1/(1+exp(s_j - s_i)), picks by np.argmax /
    np.argmin of the scores, P_w = prb.sum(axis=1)[w] / K, chosen_probs = prb[w][l]."""
    out = {k: [] for k in ("chosen", "rejected", "win", "lose", "pwl", "pair")}
    for s in scores:
        k = len(s)
        prb = np.array([[1 / (1 + np.exp(s[j] - s[i])) for j in range(k)] for i in range(k)])
        w, l = int(np.argmax(s)), int(np.argmin(s))
        out["chosen"].append(w)
        out["rejected"].append(l)
        out["win"].append(prb.sum(axis=1)[w] / k)
        out["lose"].append(prb.sum(axis=1)[l] / k)
        out["pwl"].append(prb[w][l])
        out["pair"].append(prb)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("k", [3, 5, 7])
def test_sppo_targets_match_compute_prob(x64, rng, k):
    scores = rng.normal(0, 2, (12, k)).round(1)  # rounding makes ties
    scores[1, :] = 0.7  # all equal: chosen == rejected == 0, kept
    scores[2, 1] = scores[2, -1] = scores[2].max() + 1  # a tie for the maximum: first wins
    want = compute_prob_reference(scores)
    ids = np.arange(100, 112)
    got = online.sppo_targets(jnp.asarray(want["pair"]), scores=scores, prompt_ids=ids)
    np.testing.assert_array_equal(got.chosen, want["chosen"])
    np.testing.assert_array_equal(got.rejected, want["rejected"])
    np.testing.assert_array_equal(got.prompt_ids, ids)
    np.testing.assert_array_equal(got.degenerate, np.arange(12) == 1)
    np.testing.assert_allclose(got.chosen_win_prob, want["win"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.rejected_win_prob, want["lose"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.win_prob, want["pwl"], rtol=0, atol=1e-12)
    # Picking by the win rates themselves gives the same pairs (row means order as scores do).
    by_rate = online.sppo_targets(jnp.asarray(want["pair"]))
    np.testing.assert_array_equal(by_rate.chosen, want["chosen"])
    np.testing.assert_array_equal(by_rate.rejected, want["rejected"])
    np.testing.assert_array_equal(by_rate.prompt_ids, np.arange(12))
    # And the loss module's one-call version agrees.
    wp = L.win_probabilities(jnp.asarray(scores))
    np.testing.assert_allclose(wp.chosen_win_prob, got.chosen_win_prob, rtol=0, atol=1e-12)


def test_sppo_targets_from_per_response_win_rates(rng):
    rates = rng.random((6, 4))
    rates[3] = rates[3, 0]
    got = online.sppo_targets(rates)
    np.testing.assert_array_equal(got.chosen, rates.argmax(1))
    np.testing.assert_array_equal(got.rejected, rates.argmin(1))
    rows = np.arange(6)
    np.testing.assert_array_equal(got.chosen_win_prob, rates[rows, rates.argmax(1)].astype("f4"))
    np.testing.assert_array_equal(got.rejected_win_prob, rates[rows, rates.argmin(1)].astype("f4"))
    assert got.win_prob is None
    np.testing.assert_array_equal(got.degenerate, rows == 3)


def test_sppo_targets_input_errors():
    with pytest.raises(ValueError, match="win_rates"):
        online.sppo_targets(jnp.zeros((3, 1)))  # K < 2
    with pytest.raises(ValueError, match="win_rates"):
        online.sppo_targets(jnp.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="win_rates"):
        online.sppo_targets(jnp.full((3, 4), 1.5))
    with pytest.raises(ValueError, match="scores"):
        online.sppo_targets(jnp.zeros((3, 4)), scores=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="prompt_ids"):
        online.sppo_targets(jnp.zeros((3, 4)), prompt_ids=[1, 2])


# ----------------------------------------------------------------------------- the MW update


def test_mw_step_and_trajectory_match_numpy(x64, rng):
    x = rng.normal(0, 1, (2, 4, 4))
    m = 1 / (1 + np.exp(-(x - np.swapaxes(x, 1, 2))))  # a random (intransitive) preference
    pi = rng.dirichlet(np.ones(4), 2)
    pi[1, 2] = 0.0
    pi[1] /= pi[1].sum()
    got = online.multiplicative_weights_step(pi, m, 0.7)
    want = np.stack([np_mw_step(pi[i], m[i], 0.7) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert got[1, 2] == 0.0  # a response outside the support stays there
    traj = online.sppo_tabular(jnp.asarray(pi[0]), m[0], 0.7, 30)
    want = [pi[0]]
    for _ in range(30):
        want.append(np_mw_step(want[-1], m[0], 0.7))
    # 30 steps, each a relative 1e-15 error amplified by at most (1 + 2 eta) per step: < 1e-11.
    np.testing.assert_allclose(traj, np.array(want), rtol=1e-11, atol=0)
    np.testing.assert_allclose(online.policy_win_rates(pi[0], m[0]), m[0] @ pi[0], rtol=1e-14)


def test_last_iterate_drifts_from_nash_by_log_partition(x64):
    """A = P - 1/2 is antisymmetric with A u = 0, so KL(u || pi_{t+1}) = KL(u || pi_t) + log Z_t
    exactly: MW's last iterate never converges on RPS; only its average does."""
    m, eta = rps(0.2), 0.3
    traj = np.asarray(online.sppo_tabular(jnp.asarray(PI0), m, eta, 40))
    kl = np.log(1 / 3) - np.log(traj).mean(axis=1)
    log_z = np.log([pi @ np.exp(eta * (m @ pi - 0.5)) for pi in traj[:-1]])
    np.testing.assert_allclose(np.diff(kl), log_z, rtol=1e-9, atol=1e-15)
    assert np.all(log_z > 0)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3])
def test_rps_average_converges_to_uniform(x64, p):
    m, t = rps(p), 2000
    eta = float(np.sqrt(8 * np.log(1 / PI0.min()) / t)) / (1 - 2 * p)  # minimises the bound
    traj = online.sppo_tabular(jnp.asarray(PI0), m, eta, t)
    average = jnp.mean(traj[:-1], axis=0)  # the policies played at t = 0..T-1
    bound = np.log(1 / PI0.min()) / (eta * t) + eta * (1 - 2 * p) ** 2 / 8
    gap = float(online.exploitability(average, m))
    assert 0 <= gap <= bound
    # eps >= (1/2 - p) ||pi - u||_2 / sqrt(2) on RPS (sum-zero vectors: max >= ||.||_2 / sqrt 6).
    assert np.linalg.norm(average - 1 / 3) <= np.sqrt(2) * bound / (0.5 - p)
    # The bound is informative: neither pi_0 nor the last iterate meets it.
    assert float(online.exploitability(PI0, m)) > 3 * bound
    assert float(online.exploitability(traj[-1], m)) > bound


def test_transitive_preference_concentrates_on_best(x64):
    rewards = np.array([0.0, 1.0, 2.0, 0.5])
    m, pi0, t, eta = bt(rewards), np.array([0.4, 0.3, 0.1, 0.2]), 3000, 0.05
    traj = np.asarray(online.sppo_tabular(jnp.asarray(pi0), m, eta, t))
    best = traj[:, 2]
    # P(best > pi) is the largest win rate, so its weight grows (until it rounds to 1).
    assert np.all(np.diff(best) >= 0) and np.all(np.diff(best)[best[:-1] < 0.999] > 0)
    bound = np.log(1 / pi0[2]) / (eta * t) + eta * (m.max() - m.min()) ** 2 / 8
    gap_unit = m[2, 1] - 0.5  # smallest margin of the best response over another
    # eps(avg) = sum_y avg(y) (P(best > y) - 1/2) >= (1 - avg(best)) g, and best is increasing.
    avg = traj[:-1].mean(axis=0)
    assert float(online.exploitability(avg, m)) <= bound
    assert 1 - avg[2] <= bound / gap_unit
    assert best[-1] >= 1 - bound / gap_unit and best[-1] > 0.95


def test_game_input_errors():
    m = rps(0.2)
    with pytest.raises(ValueError, match="eta"):
        online.multiplicative_weights_step(PI0, m, 0.0)
    with pytest.raises(ValueError, match="preference"):
        online.multiplicative_weights_step(PI0, m[:2], 0.1)
    with pytest.raises(ValueError, match="preference"):
        online.multiplicative_weights_step(PI0, np.full((3, 3), 0.7), 0.1)  # P + P^T != 1
    with pytest.raises(ValueError, match="pi"):
        online.multiplicative_weights_step(np.array([0.5, 0.6, 0.1]), m, 0.1)
    with pytest.raises(ValueError, match="pi"):
        online.multiplicative_weights_step(np.array([1.0]), np.full((1, 1), 0.5), 0.1)  # K < 2
    with pytest.raises(ValueError, match="iterations"):
        online.sppo_tabular(PI0, m, 0.1, -1)
    with pytest.raises(ValueError, match="strictly positive"):
        online.tabular_sppo_fit(np.array([0.5, 0.5, 0.0]), m, 0.1)


# ----------------------------------------------------------------------------- loss vs MW


def tabular_loss(theta, log_ref, rate, weight, beta):
    """E_{y ~ pi_t} of `losses.sppo` over the K responses: chosen = rejected = y, so each
    per-pair loss is (log pi_theta(y)/pi_t(y) - (P(y > pi_t) - 1/2)/beta)^2."""
    logp = jax.nn.log_softmax(theta)[:, None]
    ones = jnp.ones_like(logp)
    batch = L.PreferenceBatch(
        logp,
        logp,
        ones,
        ones,
        log_ref[:, None],
        log_ref[:, None],
        chosen_win_prob=rate,
        rejected_win_prob=rate,
    )
    return jnp.sum(weight * L.sppo(batch, beta=beta).losses)


@jax.jit
def descend(pi, m, beta):
    """Gradient descent from the reference (lr 0.5, 2000 steps): the Hessian in the logits is
    2 J^T diag(pi_t) J with eigenvalues in [~2 min pi_t, 4] on the non-constant directions."""
    log_ref, rate = jnp.log(pi), m @ pi
    grad = jax.grad(tabular_loss)
    theta = jax.lax.fori_loop(
        0, 2000, lambda _, th: th - 0.5 * grad(th, log_ref, rate, pi, beta), log_ref
    )
    return jax.nn.log_softmax(theta), grad(theta, log_ref, rate, pi, beta)


@pytest.mark.parametrize(
    "eta",
    [pytest.param(0.1, marks=pytest.mark.slow), pytest.param(1.0, marks=pytest.mark.slow), 1000.0],
)  # 1000 = the official 1/beta; the others run with the slow set (suite budget)
def test_fit_is_the_sppo_loss_minimiser(x64, eta):
    m, pi = rps(0.2), jnp.asarray(PI0)
    log_fit = jnp.log(online.tabular_sppo_fit(pi, m, eta))
    scale = max(1.0, eta / 2)  # |log-ratios| <= eta/2 + log K: float64 resolution ~ scale eps
    # The closed form is stationary for the library's loss (independent of the descent).
    g = jax.grad(tabular_loss)(log_fit, jnp.log(pi), m @ pi, pi, 1 / eta)
    assert np.max(np.abs(g)) <= 1e-11 * scale
    log_gd, g_gd = descend(pi, m, 1 / eta)
    assert np.max(np.abs(g_gd)) <= 1e-11 * scale  # converged: distance <= |g| / lambda_min
    np.testing.assert_allclose(log_gd, log_fit, rtol=0, atol=1e-9 * scale)


def test_fit_differs_from_mw_at_third_order(x64):
    """log q_fit - log q_MW = -log Z_t r(y) + O(eta^4) up to a constant, so its spread over y is
    log Z_t (max r - min r) (1 + O(eta)) and halving eta divides it by 8 (1 + O(eta))."""
    m, pi = rps(0.2), PI0

    def spread(eta):
        d = np.log(online.tabular_sppo_fit(pi, m, eta)) - np.log(np_mw_step(pi, m, eta))
        r = eta * (m @ pi - 0.5)
        return np.ptp(d), np.log(pi @ np.exp(r)) * np.ptp(r)

    (s1, lead1), (s2, lead2) = spread(0.1), spread(0.05)
    assert abs(s1 / lead1 - 1) <= 0.1 and abs(s2 / lead2 - 1) <= 0.05
    assert abs(s1 / s2 / 8 - 1) <= 0.1
    assert s1 > 1e-7  # not identical: the loss is not exactly the MW update


def test_loss_iteration_tracks_mw(x64):
    """Ten SPPO iterations by gradient descent on the loss, each reference the previous iterate,
    vs the MW trajectory. Tolerance in osc(log pi) = max - min of the log-ratio (both
    normalised, so it bounds |log pi - log pi'|): per step 1.5 log Z_t osc(r_t) (the third-order
    gap, 50% margin over its leading term at eta = 0.1), propagated by MW's Lipschitz constant
    1 + 2 eta max|P - 1/2| in that seminorm."""
    m, eta, t = rps(0.2), 0.1, 10
    mw = np.asarray(online.sppo_tabular(jnp.asarray(PI0), m, eta, t))
    pi, tol, fits = jnp.asarray(PI0), 0.0, []
    lip = 1 + 2 * eta * np.max(np.abs(m - 0.5))
    for step in range(t):
        r = eta * (m @ mw[step] - 0.5)
        tol = tol * lip + 1.5 * np.log(mw[step] @ np.exp(r)) * np.ptp(r)
        log_pi, _ = descend(pi, m, 1 / eta)
        pi = jnp.exp(log_pi)
        fits.append(np.asarray(log_pi))
        assert np.ptp(fits[-1] - np.log(mw[step + 1])) <= tol + 1e-9
    # And the exact-fit iteration is what the descent computed (1e-9: descent tolerance).
    q = jnp.asarray(PI0)
    for step in range(t):
        q = online.tabular_sppo_fit(q, m, eta)
        np.testing.assert_allclose(np.log(q), fits[step], rtol=0, atol=1e-9)
