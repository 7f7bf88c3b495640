"""Statistics over seeds: means with 95% t-intervals, differences with Welch-style intervals,
and each run's summary statistics (final values, AUC)."""

from __future__ import annotations

import numpy as np

from experiments.stats import T975, t975  # noqa: F401  (re-exported)


def mean_ci(x) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds."""
    x = np.asarray(x, np.float64)
    m = float(x.mean())
    if x.size < 2:
        return m, m, m
    h = t975(x.size - 1) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return m, m - h, m + h


def diff_ci(a, b) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a 95% Welch-style interval (independent seeds, df = n_a + n_b - 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return d, d, d
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    h = t975(a.size + b.size - 2) * float(se)
    return d, d - h, d + h


def run_stats(hist: dict) -> dict:
    """Per-seed final values and AUC (mean E[r] over the evaluation points), `[S]` each."""
    return {
        "final_reward": hist["reward"][:, -1],
        "auc": hist["reward"].mean(axis=1),
        "final_kl": hist["kl"][:, -1],
        "final_peak_mass": hist["peak_mass"][:, -1],
    }


def ci_dict(x) -> dict:
    m, lo, hi = mean_ci(x)
    return {"mean": m, "ci95": [lo, hi]}
