"""SPPO self-play: the training targets of one iteration and the tabular game it solves.

Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
arXiv:2405.00675; official uclaml/SPPO (specs/online.md section 2, specs/losses.md section 4).

One SPPO iteration samples K responses per prompt from pi_t, estimates each response's win rate
P(y > pi_t | x), keeps the best (chosen) and worst (rejected) with their win rates, and fits
pi_{t+1} with the squared loss `alignjax.losses.sppo` against the reference pi_t. `sppo_targets`
is that data step. The rest of this module is the finite-response-set ("tabular") game behind
it, where every expectation is exact:

  * `multiplicative_weights_step` / `sppo_tabular`: the exact update of the paper's section 4,
    pi_{t+1}(y) = pi_t(y) exp(eta (P(y > pi_t) - 1/2)) / Z_t (Hedge on the symmetric game with
    payoff P(y > y')). Its time average pi_bar_T has exploitability
    max_y P(y > pi_bar_T) - 1/2 <= log(1 / min_y pi_0(y)) / (eta T) + eta / 8 (Hedge's regret
    bound with payoffs in [0, 1]; E_{pi_t} P(y > pi_t) = 1/2 exactly, so the regret of the
    self-play sequence is T times the exploitability of the average), i.e. O(1/sqrt(T)) at
    eta ~ 1/sqrt(T) (the paper's Theorem 4.1).
  * `tabular_sppo_fit`: the exact minimiser over all policies of the SPPO loss (paper Eq. 4.7
    as specs/online.md cites it),

        min_q  E_{y ~ pi_t} (log q(y)/pi_t(y) - r(y))^2,    r(y) = eta (P(y > pi_t) - 1/2),

    which is *not* the multiplicative-weights iterate, only close to it. Derivation: write
    d = log(q / pi_t); the feasible set is {d : E_{pi_t} e^d = 1}. The unconstrained minimiser
    d = r has E_{pi_t} e^r = Z_t >= 1 (Jensen, E_{pi_t} r = 0 when P(y > y') + P(y' > y) = 1),
    so the minimum over the convex set {E_{pi_t} e^d <= 1} lies on its boundary, is unique, and
    satisfies the KKT condition d(y) - r(y) = -c e^{d(y)} with one scalar c > 0. Solving for d
    with Lambert's W: d(y) = r(y) - W(c e^{r(y)}) = r(y) - omega(nu + r(y)), nu = log c, omega
    the Wright omega function (omega + log omega = x); the normaliser fixes nu by
    sum_y pi_t(y) omega(nu + r(y)) = e^nu (one decreasing equation, solved by bisection).
    The MW step instead has d(y) = r(y) - log Z_t. Expanding in eta: c = log Z_t + O(eta^3) and
    log Z_t = eta^2 Var_{pi_t}(P(y > pi_t)) / 2 + O(eta^3), so the two differ by
    d_fit - d_MW = -log Z_t r(y) + O(eta^4) = O(eta^3): the loss reproduces the paper's update
    to second order in eta, and for the code's eta = 1/beta = 1000 it is a different
    (still well-defined) map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignjax.online.scorers import max_min_pairs, win_rate_vs_policy
from alignjax.ops import _checks as C

_TOL = 1e-6  # slack on probabilities given as concrete arrays (float32 round-off)


def _concrete(x) -> np.ndarray | None:
    """The value of a concrete array, None under a trace."""
    return np.asarray(x) if C.is_concrete(x) else None


def _check_probabilities(name: str, x) -> None:
    v = _concrete(x)
    if v is not None and v.size and not (np.all(v >= -_TOL) and np.all(v <= 1 + _TOL)):
        raise ValueError(f"`{name}` must hold probabilities in [0, 1], got [{v.min()}, {v.max()}]")


def _check_eta(eta) -> None:
    if isinstance(eta, (int, float)) and not eta > 0:
        raise ValueError(f"`eta` must be > 0, got {eta}")


# ----------------------------------------------------------------------------- the data step


class SPPOTargets(NamedTuple):
    """SPPO's training pair per prompt (all `[P]`), as `compute_prob.py` builds them."""

    prompt_ids: jax.Array  # the prompt each row belongs to
    chosen: jax.Array  # index (in 0..K-1) of the chosen response: highest win rate
    rejected: jax.Array  # index of the rejected response: lowest win rate
    chosen_win_prob: jax.Array  # P_w = P(y_w > pi_t)
    rejected_win_prob: jax.Array  # P_l = P(y_l > pi_t)
    win_prob: jax.Array | None  # P(y_w > y_l); None when only [P, K] win rates are given
    degenerate: jax.Array  # chosen == rejected (all K tie); the official code keeps these rows


def sppo_targets(
    win_rates: jax.Array,
    *,
    scores: jax.Array | None = None,
    prompt_ids: jax.Array | Sequence[int] | None = None,
) -> SPPOTargets:
    """Chosen / rejected responses and their win rates for one SPPO iteration.

    Wu et al. 2024 (arXiv:2405.00675) section 5; official `scripts/compute_prob.py`
    (`from_ranks`, `prepare_score`).

    Args:
      win_rates: `[P, K]` estimated P(y_k > pi_t | x_p), or a `[P, K, K]` pairwise matrix
        P(y_i > y_j | x_p). From a pairwise matrix P(y_i > pi_t) is the row mean over all K
        samples, the response itself included (its 1/2 term), as `compute_prob.py` averages
        `probability` rows; `win_prob` is then P(y_w > y_l).
      scores: optional `[P, K]` scores to pick chosen / rejected by (the official code picks by
        the PairRM score; its pairwise matrix is sigmoid(s_i - s_j), whose row means order the
        responses as the scores do, so this matters only for ties after rounding).
      prompt_ids: optional `[P]` ids carried to the output (default 0..P-1).

    Chosen = argmax, rejected = argmin, the first index on ties (`np.argmax` / `np.argmin`);
    a prompt whose K win rates are all equal gets chosen == rejected == 0, kept as the official
    code keeps it and flagged in `degenerate`.
    """
    w = jnp.asarray(win_rates)
    if w.ndim not in (2, 3) or w.shape[1] < 2 or (w.ndim == 3 and w.shape[2] != w.shape[1]):
        raise ValueError(f"`win_rates` must be [P, K] or [P, K, K] with K >= 2, got {w.shape}")
    _check_probabilities("win_rates", w)
    rate = win_rate_vs_policy(w) if w.ndim == 3 else w
    order = rate
    if scores is not None:
        order = jnp.asarray(scores)
        if order.shape != rate.shape:
            raise ValueError(f"`scores` must be [P, K] {rate.shape}, got {order.shape}")
    n = rate.shape[0]
    if prompt_ids is None:
        ids = jnp.arange(n)
    else:
        ids = jnp.asarray(prompt_ids)
        if ids.shape != (n,):
            raise ValueError(f"`prompt_ids` must be [P] = ({n},), got {ids.shape}")
    chosen, rejected = max_min_pairs(order)
    rows = jnp.arange(n)
    return SPPOTargets(
        ids,
        chosen,
        rejected,
        rate[rows, chosen],
        rate[rows, rejected],
        w[rows, chosen, rejected] if w.ndim == 3 else None,
        chosen == rejected,
    )


# ----------------------------------------------------------------------------- the tabular game


def _check_game(pi, preference) -> tuple[jax.Array, jax.Array]:
    pi, preference = jnp.asarray(pi), jnp.asarray(preference)
    k = pi.shape[-1] if pi.ndim else 0
    if pi.ndim < 1 or k < 2:
        raise ValueError(f"`pi` must be [..., K] with K >= 2 responses, got {pi.shape}")
    if preference.shape[-2:] != (k, k) or preference.shape[:-2] != pi.shape[:-1]:
        raise ValueError(
            f"`preference` must be [..., K, K] = {pi.shape[:-1] + (k, k)} to match `pi` "
            f"{pi.shape}, got {preference.shape}"
        )
    p = _concrete(pi)
    if p is not None and (np.any(p < 0) or np.any(np.abs(p.sum(-1) - 1) > _TOL)):
        raise ValueError("`pi` must be a probability vector (>= 0, summing to 1) on its last axis")
    m = _concrete(preference)
    if m is not None:
        _check_probabilities("preference", m)
        if np.any(np.abs(m + np.swapaxes(m, -1, -2) - 1) > _TOL):
            raise ValueError(
                "`preference` must satisfy P(y > y') + P(y' > y) = 1 (a preference matrix)"
            )
    return pi, preference


def policy_win_rates(pi: jax.Array, preference: jax.Array) -> jax.Array:
    """P(y > pi) = sum_y' P(y > y') pi(y') for every response y (`[..., K]`)."""
    pi, preference = _check_game(pi, preference)
    return jnp.einsum("...ij,...j->...i", preference, pi)


def exploitability(pi: jax.Array, preference: jax.Array) -> jax.Array:
    """max_y P(y > pi) - 1/2 >= 0: how much the best response beats pi; 0 exactly at a von
    Neumann winner (the Nash equilibrium of the symmetric preference game, Wu et al. 2024
    section 3)."""
    return jnp.max(policy_win_rates(pi, preference), axis=-1) - 0.5


def multiplicative_weights_step(pi: jax.Array, preference: jax.Array, eta: float) -> jax.Array:
    """pi_{t+1}(y) = pi_t(y) exp(eta (P(y > pi_t) - 1/2)) / Z_t.

    Wu et al. 2024 (arXiv:2405.00675) section 4 (the update Algorithm 1 approximates), exact
    over a finite response set (Freund and Schapire's multiplicative weights / Hedge).
    `pi`: `[..., K]`; `preference`: `[..., K, K]` with entries P(y_i > y_j); eta = 1/beta of
    the loss. Computed in log space; a response with pi_t(y) = 0 keeps probability 0.
    """
    _check_eta(eta)
    pi, preference = _check_game(pi, preference)
    logits = jnp.log(pi) + eta * (policy_win_rates(pi, preference) - 0.5)
    return jax.nn.softmax(logits, axis=-1)


def sppo_tabular(pi0: jax.Array, preference: jax.Array, eta: float, iterations: int) -> jax.Array:
    """The trajectory `[iterations + 1, ..., K]` of `multiplicative_weights_step` from `pi0`
    (row 0 is `pi0`). The mean of rows 0..T-1, the T policies that produced the updates, is the
    paper's output policy pi_bar_T (Theorem 4.1, there indexed 1..T); its exploitability
    obeys the bound in the module docstring."""
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"`iterations` must be a non-negative int, got {iterations!r}")
    _check_eta(eta)
    pi0, preference = _check_game(pi0, preference)

    def step(pi, _):
        nxt = multiplicative_weights_step(pi, preference, eta)
        return nxt, nxt

    _, rest = lax.scan(step, pi0, None, length=iterations)
    return jnp.concatenate([pi0[None], rest], axis=0)


def _log_wright_omega(x: jax.Array, steps: int = 60) -> jax.Array:
    """log omega(x), omega(x) = W0(e^x) the root of omega + log omega = x.

    Newton's method on u = log omega, f(u) = e^u + u - x: f is convex and increasing, and the
    start (u = x for x < 1, log x otherwise) has f >= 0, so the iterates decrease monotonically
    to the root and converge quadratically near it (< 10 steps in float64; 60 is a fixed,
    safe count under `jit`).
    """
    u0 = jnp.where(x < 1.0, x, jnp.log(jnp.maximum(x, 1.0)))

    def newton(_, u):
        eu = jnp.exp(u)
        return u - (eu + u - x) / (eu + 1.0)

    return lax.fori_loop(0, steps, newton, u0)


def tabular_sppo_fit(
    pi: jax.Array, preference: jax.Array, eta: float, *, bisection_steps: int = 200
) -> jax.Array:
    """argmin_q E_{y ~ pi_t} (log q(y)/pi_t(y) - eta (P(y > pi_t) - 1/2))^2 over all policies q.

    Wu et al. 2024 (arXiv:2405.00675) Eq. 4.7 (the SPPO loss, `alignjax.losses.sppo` with the
    reference = pi_t and exact expectations over the K responses) minimised exactly over a
    tabular softmax policy. Closed form (module docstring): log q(y)/pi_t(y) = r(y) -
    omega(nu + r(y)), r = eta (P(y > pi_t) - 1/2), omega the Wright omega function, nu the
    root of log sum_y pi_t(y) omega(nu + r(y)) = nu. It equals `multiplicative_weights_step`
    up to O(eta^3) in the log-probabilities.

    `pi` must be strictly positive (the loss weights responses by pi_t, so a zero-probability
    response is unconstrained) and `preference` a preference matrix (P + P^T = 1).
    """
    _check_eta(eta)
    pi, preference = _check_game(pi, preference)
    p = _concrete(pi)
    if p is not None and np.any(p <= 0):
        raise ValueError("`pi` must be strictly positive for `tabular_sppo_fit`")
    r = eta * (policy_win_rates(pi, preference) - 0.5)
    log_pi = jnp.log(pi)
    span = jnp.max(jnp.abs(r), axis=-1, keepdims=True)

    def excess(nu):  # log sum pi omega(nu + r) - nu, strictly decreasing in nu
        return jax.nn.logsumexp(log_pi + _log_wright_omega(nu + r), axis=-1, keepdims=True) - nu

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    # excess(lo) ~ log Z_t >= 0 (omega(x) ~ e^x far left); excess(hi) <= log(3 span + 50) - hi < 0.
    lo, hi = lax.fori_loop(0, bisection_steps, bisect, (-(2.0 * span + 750.0), 2.0 * span + 50.0))
    nu = 0.5 * (lo + hi)
    return jax.nn.softmax(log_pi + r - jnp.exp(_log_wright_omega(nu + r)), axis=-1)
