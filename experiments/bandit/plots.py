"""The figures: training curves (sampled mean with its band, exact run dotted), the final exact
policies against pi_ref and pi*, and the ablations (batch reuse; plain SGD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.bandit.env import LOG_REF, PEAKS, kl_optimum, reward
from experiments.bandit.methods import METHODS, Study
from experiments.bandit.stats import mean_ci


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {m.name: f"C{i}" for i, m in enumerate(METHODS)}


def plot_curves(res: dict, path: Path):
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), sharex=True)
    keys = (("reward", "E_pi[r]"), ("kl", "KL(pi || pi_ref)"), ("peak_mass", "mass at the peak"))
    for row, p in enumerate(PEAKS):
        for col, (k, title) in enumerate(keys):
            ax = axes[row, col]
            for m in METHODS:
                h = res["sampled"][(m.name, p)][0][k]
                ci = np.array([mean_ci(h[:, t]) for t in range(h.shape[1])])
                x = np.arange(h.shape[1])
                ls = "-" if m.on_policy else "-."
                ax.plot(x, ci[:, 0], color=COLORS[m.name], ls=ls, label=f"{m.name} (sampled)")
                ax.fill_between(x, ci[:, 1], ci[:, 2], color=COLORS[m.name], alpha=0.2)
                ax.plot(x, res["exact"][(m.name, p)][0][k][0], color=COLORS[m.name], ls=":", lw=1)
            ax.set(title=f"{title}, peak {p} (a* = {PEAKS[p]})")
            if row == 1:
                ax.set_xlabel("epoch (15 Adam steps; on-policy: 100 new samples)")
    axes[0, 0].legend(fontsize=7, title="dotted: exact; band: 95% over seeds", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policies(res: dict, cfg: Study, path: Path):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(14, 8), sharex=True)
    ref = np.exp(LOG_REF)
    for row, p in enumerate(PEAKS):
        star = kl_optimum(LOG_REF, reward(PEAKS[p]), cfg.beta)
        for col, on in enumerate((True, False)):
            ax = axes[row, col]
            ax.plot(ref, "k-", lw=2, label="pi_ref")
            ax.plot(star, "k--", lw=1, label=f"pi* (beta {cfg.beta})")
            ax.plot(reward(PEAKS[p]) * 0.5, color="grey", lw=1, label="r / 2")
            for m in METHODS:
                if m.on_policy == on:
                    ax.plot(res["exact"][(m.name, p)][1][0], color=COLORS[m.name], label=m.name)
            kind = "on-policy" if on else "offline"
            ax.set(yscale="log", ylim=(1e-6, 1.5), title=f"final exact policies, {kind}, peak {p}")
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("action")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablations(res: dict, cfg: Study, path: Path):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    queries = cfg.groups * cfg.n
    for i, p in enumerate(PEAKS):
        reuse = res["sampled"][("on-policy IPO", p)][0]["reward"].mean(0)
        fresh = res["reuse"]["runs"][p][0]["reward"].mean(0)
        for h, steps, ls, lab in ((reuse, cfg.inner, "-", "15 steps / batch"),
                                  (fresh, 1, ":", "1 step / batch")):  # fmt: skip
            x = np.arange(h.shape[0])
            axes[0].plot(x * queries, h, color=f"C{i}", ls=ls, label=f"{p}: {lab}")
            axes[1].plot(x * steps, h, color=f"C{i}", ls=ls, label=f"{p}: {lab}")
    axes[0].set(title="on-policy IPO (sampled mean): E_pi[r] vs reward queries",
                xlabel="reward queries", xscale="log")  # fmt: skip
    axes[1].set(title="on-policy IPO (sampled mean): E_pi[r] vs gradient steps",
                xlabel="gradient step")  # fmt: skip
    axes[0].legend(fontsize=7)
    for m in METHODS:
        lr, (h, _) = res["sgd"][(m.name, "far")]
        axes[2].plot(h["reward"][0], color=COLORS[m.name], ls="-" if m.on_policy else "-.",
                     label=f"{m.name} (lr {lr:g})")  # fmt: skip
    axes[2].set(title="plain SGD, exact, peak far: E_pi[r]", xlabel="epoch")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
