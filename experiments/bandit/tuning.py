"""Learning-rate grids and selection, and the study's schedule built on them: the exact grid, lr
selection on tuning seeds, the sampled runs on the evaluation seeds at the selected lrs, and the
ablations (batch reuse, plain SGD)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from experiments.bandit.env import PEAKS
from experiments.bandit.methods import BY_NAME, METHODS, Study
from experiments.bandit.stats import mean_ci, run_stats
from experiments.bandit.training import run_configs


def grid_runs(cfg: Study, lrs, seeds, *, exact: bool, optimizer: str = "adam", methods=METHODS):
    """Every method x peak x lr; rows of seed-mean statistics (and `auc_lo`, the lower end of
    the AUC's 95% interval), and the runs by (method, peak, lr)."""
    rows, runs = [], {}
    for m in methods:
        configs = [(p, lr) for p in PEAKS for lr in lrs]
        for (p, lr), run in zip(configs, run_configs(m, exact, cfg, configs, seeds, optimizer)):
            stats = run_stats(run[0])
            row = {"method": m.name, "peak": p, "lr": lr}
            row.update({k: float(np.mean(v)) for k, v in stats.items()})
            row["auc_lo"] = mean_ci(stats["auc"])[1]
            rows.append(row)
            runs[(m.name, p, lr)] = run
    return rows, runs


def select_lr(rows: list[dict], method: str, peak: str) -> float:
    """The learning rate with the highest lower 95% bound of the AUC for (method, peak), so that
    an lr whose seeds split between the peak and a frozen point mass is not picked on luck;
    non-finite runs excluded."""
    mine = [r for r in rows if (r["method"], r["peak"]) == (method, peak)]
    finite = [r for r in mine if np.isfinite(r["auc_lo"])]
    return max(finite, key=lambda r: r["auc_lo"])["lr"] if finite else mine[0]["lr"]


def study(cfg: Study) -> dict:
    """Exact grid; lr selection on the tuning seeds; sampled runs on the evaluation seeds;
    ablations."""
    t0 = time.perf_counter()
    seeds = list(range(cfg.seeds))
    tuning_seeds = list(range(1000, 1000 + cfg.tuning_seeds))
    res = {}
    res["exact_grid"], exact_runs = grid_runs(cfg, cfg.adam_lrs, [0], exact=True)
    print(f"exact grid: {time.perf_counter() - t0:.1f} s", flush=True)
    res["tuning_grid"], _ = grid_runs(cfg, cfg.adam_lrs, tuning_seeds, exact=False)
    print(f"tuning grid: {time.perf_counter() - t0:.1f} s", flush=True)
    res["chosen"] = {(m.name, p): select_lr(res["tuning_grid"], m.name, p)
                     for m in METHODS for p in PEAKS}  # fmt: skip
    res["exact"], res["sampled"] = {}, {}
    for m in METHODS:
        configs = [(p, res["chosen"][(m.name, p)]) for p in PEAKS]
        for (p, lr), run in zip(configs, run_configs(m, False, cfg, configs, seeds)):
            res["sampled"][(m.name, p)] = run
            res["exact"][(m.name, p)] = exact_runs[(m.name, p, lr)]
    print(f"sampled runs: {time.perf_counter() - t0:.1f} s", flush=True)
    if not cfg.ablations:
        return res
    res["sgd_grid"], sgd_runs = grid_runs(cfg, cfg.sgd_lrs, [0], exact=True, optimizer="sgd")
    res["sgd"] = {}
    for m in METHODS:
        for p in PEAKS:
            lr = select_lr(res["sgd_grid"], m.name, p)
            res["sgd"][(m.name, p)] = (lr, sgd_runs[(m.name, p, lr)])
    # One step per batch, 15x the batches: the same gradient steps, 15x the reward queries;
    # its own lr, tuned the same way.
    fresh = replace(cfg, inner=1, epochs=cfg.epochs * cfg.inner)
    ipo = BY_NAME["on-policy IPO"]
    tuning, runs = grid_runs(fresh, cfg.adam_lrs, tuning_seeds, exact=False, methods=(ipo,))
    for row in tuning:
        h = runs[(ipo.name, row["peak"], row["lr"])][0]["reward"]
        row["auc_first_queries"] = float(h[:, : cfg.epochs + 1].mean())
    lrs = {p: select_lr(tuning, ipo.name, p) for p in PEAKS}
    runs = run_configs(ipo, False, fresh, [(p, lrs[p]) for p in PEAKS], seeds)
    res["reuse"] = {"lr": lrs, "tuning_grid": tuning, "runs": dict(zip(PEAKS, runs))}
    print(f"ablations: {time.perf_counter() - t0:.1f} s", flush=True)
    return res
