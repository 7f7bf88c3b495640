"""SPPO with soft win probabilities (Wu et al. 2024, arXiv:2405.00675; official uclaml/SPPO).

The paper's step is argmin E (log(pi/pi_t)(y) - eta (P(y > pi_t) - 1/2))^2 with eta = 1/beta,
the reference pi_t being the previous iterate. The official trainer's losses (specs/losses.md
section 4), with a, b the summed chosen / rejected log-ratios:

    sppo:        0.5 [ (a - (P_w - 1/2)/beta)^2 + (b - (P_l - 1/2)/beta)^2 ]
    sppo_single: 0.5 [ (a - (P - 1/2)/beta)^2 + (b + (P - 1/2)/beta)^2 ],  P = P(y_w > y_l)

TRL's `sppo_hard` is 2 x `sppo` at P_w = 1, P_l = 0. The official pipeline uses beta = 1e-3.
`win_probabilities` turns K scored samples per prompt into P_w, P_l, P and the picks exactly as
the official `compute_prob.py` does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alignjax.losses.dpo import pair_scores
from alignjax.losses.types import LossOutput, PreferenceBatch, check_beta, paired_output


def sppo(batch: PreferenceBatch, *, beta: float = 1e-3) -> LossOutput:
    """SPPO with per-response win probabilities P_w = `chosen_win_prob`, P_l =
    `rejected_win_prob` (estimated P(y > pi_t | x))."""
    check_beta(beta)
    if batch.chosen_win_prob is None or batch.rejected_win_prob is None:
        raise ValueError("`sppo` needs `chosen_win_prob` and `rejected_win_prob` in the batch")
    s = pair_scores(batch)
    pw, pl = batch.chosen_win_prob, batch.rejected_win_prob
    losses = 0.5 * ((s.a - (pw - 0.5) / beta) ** 2 + (s.b - (pl - 0.5) / beta) ** 2)
    return paired_output("sppo", losses, beta * s.a, beta * s.b, s.pc, s.pr)


def sppo_single(batch: PreferenceBatch, *, beta: float = 1e-3) -> LossOutput:
    """SPPO from the pairwise probability P = `win_prob` = P(y_w > y_l) alone."""
    check_beta(beta)
    if batch.win_prob is None:
        raise ValueError("`sppo_single` needs `win_prob` in the batch")
    s = pair_scores(batch)
    c = (batch.win_prob - 0.5) / beta
    losses = 0.5 * ((s.a - c) ** 2 + (s.b + c) ** 2)
    return paired_output("sppo_single", losses, beta * s.a, beta * s.b, s.pc, s.pr)


class WinProbabilities(NamedTuple):
    chosen: jax.Array  # [P] index of the chosen sample (highest score)
    rejected: jax.Array  # [P] index of the rejected sample (lowest score)
    chosen_win_prob: jax.Array  # [P] P_w = mean_j P(y_w > y_j), j over all K (self included)
    rejected_win_prob: jax.Array  # [P] P_l = mean_j P(y_l > y_j)
    win_prob: jax.Array  # [P] P(y_w > y_l)


def win_probabilities(scores: jax.Array) -> WinProbabilities:
    """From preference-model scores `[P, K]` (K samples per prompt) to SPPO's inputs.

    P(y_i > y_j) = 1 / (1 + exp(s_j - s_i)) (Bradley-Terry, as the official pipeline uses with
    PairRM scores); chosen = argmax score, rejected = argmin score; P_w, P_l average over all K
    samples including the response itself (a 1/2 term), as `compute_prob.py` does.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"`scores` must be [prompts, K >= 2], got {scores.shape}")
    pref = jax.nn.sigmoid(scores[:, :, None] - scores[:, None, :])  # [P, K, K]: P(i > j)
    chosen = jnp.argmax(scores, axis=1)
    rejected = jnp.argmin(scores, axis=1)
    rows = jnp.arange(scores.shape[0])
    mean_pref = jnp.mean(pref, axis=2)
    return WinProbabilities(
        chosen,
        rejected,
        mean_pref[rows, chosen],
        mean_pref[rows, rejected],
        pref[rows, chosen, rejected],
    )
