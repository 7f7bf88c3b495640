"""Tajwar et al. 2024's bandit (issue 15): on-policy sampling and negative gradients on a
100-action bandit, by exact enumeration next to sampled runs.

Run `python experiments/onpolicy_bandit.py [--quick] [--out DIR]`; the module docstring there
describes the experiment. The parts: `env` (actions, pi_ref, rewards, pi*, exact metrics),
`methods` (the compared methods, the study's configuration, each objective's loss on weighted
data), `training` (the training loop, batched over runs), `stats` (intervals over seeds),
`tuning` (lr grids and selection, the study's schedule), `claims` (the claim checks), `report`
(table, JSON, README) and `plots` (figures).
"""

from experiments.bandit.env import (
    LOG_REF,
    NUM_ACTIONS,
    PEAK_HALFWIDTH,
    PEAKS,
    kl_div,
    kl_optimum,
    policy_metrics,
    reference_probs,
    reward,
)
from experiments.bandit.methods import (
    BY_NAME,
    METHODS,
    OBJECTIVES,
    PAIRWISE,
    Method,
    Study,
    best_of_n_probs,
    exact_data,
    objective_loss,
    pair_grid,
    pair_rows,
    sampled_data,
)
from experiments.bandit.training import inverse_cdf, run_configs, runner, seed_uniforms, train

__all__ = [
    "BY_NAME",
    "LOG_REF",
    "METHODS",
    "NUM_ACTIONS",
    "OBJECTIVES",
    "PAIRWISE",
    "PEAKS",
    "PEAK_HALFWIDTH",
    "Method",
    "Study",
    "best_of_n_probs",
    "exact_data",
    "inverse_cdf",
    "kl_div",
    "kl_optimum",
    "objective_loss",
    "pair_grid",
    "pair_rows",
    "policy_metrics",
    "reference_probs",
    "reward",
    "run_configs",
    "runner",
    "sampled_data",
    "seed_uniforms",
    "train",
]
