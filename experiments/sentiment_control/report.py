"""Tables and figures of the study: the reward-vs-KL frontier, the mask statistics, and the
chosen / rejected log-likelihood trajectories.

Frontier comparison. DPO's frontier is the piecewise-linear curve through the reference policy
(KL 0) and the DPO runs sorted by KL, made monotone (the best reward reached at any KL up to
each point). Another run's "reward - DPO" is its reward minus that curve at the run's KL; it is
undefined (None) beyond DPO's largest KL, where nothing is interpolated.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from alignjax.train.metrics import read_jsonl

__all__ = [
    "dpo_frontier_gap",
    "frontier_means",
    "verdict",
    "runs_table",
    "masks_table",
    "plot_frontier",
    "plot_trajectories",
]


def dpo_frontier_gap(runs: list[dict], reference: dict, baseline: str = "dpo") -> None:
    """Adds `vs_dpo` (reward minus the DPO frontier at the same KL) to every run in place."""
    pts = sorted(
        [(0.0, reference["reward"])]
        + [(r["kl"], r["reward"]) for r in runs if r["method"] == baseline]
    )
    kls = np.array([p[0] for p in pts])
    best = np.maximum.accumulate([p[1] for p in pts])
    for r in runs:
        inside = 0.0 <= r["kl"] <= kls[-1]
        r["vs_dpo"] = float(r["reward"] - np.interp(r["kl"], kls, best)) if inside else None


def frontier_means(runs: list[dict]) -> dict:
    """Per method, the mean of `vs_dpo` over its runs within DPO's KL range."""
    out = {}
    for r in runs:
        if r["vs_dpo"] is not None:
            out.setdefault(r["method"], []).append(r["vs_dpo"])
    return {m: dict(mean=float(np.mean(v)), points=len(v)) for m, v in out.items()}


def verdict(runs: list[dict], mask_rows: list[dict], methods) -> list[str]:
    """One line per claim and method: the frontier against DPO's, and the masks' weight on
    lexicon tokens against neutral ones (trained, and at initialisation)."""
    lines = []
    gaps = frontier_means(runs)
    for m in methods:
        if m.name == "dpo":
            continue
        g = gaps.get(m.name)
        if g is None:
            lines.append(f"{m.label}: every run beyond DPO's KL range, no comparison")
        else:
            word = "above" if g["mean"] > 0 else "below"
            lines.append(
                f"{m.label}: {word} DPO's frontier at equal KL by {g['mean']:+.2f} "
                f"reward on average ({g['points']} of {len(m.betas)} runs in range)"
            )
    for r in mask_rows:
        if r["state"] != "init" and r["mask"] == "reward":
            s = r["stats"]
            init = next(
                (
                    x["stats"]
                    for x in mask_rows
                    if x["method"] == r["method"] and x["state"] == "init" and x["mask"] == "reward"
                ),
                None,
            )
            tail = "" if init is None else f" (at init: {init['ratio']:.2f})"
            lines.append(
                f"{r['label']} beta {r['beta']:g}: lexicon / neutral mask weight "
                f"{s['ratio']:.2f}{tail}, exactly zero {s['zero_fraction']:.2f}"
            )
    return lines


def _pm(mean, se, digits=2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if se is None or math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def runs_table(runs: list[dict], reference: dict) -> str:
    head = (
        "| method | beta | trained | gold reward ± SE | KL(π ‖ π_ref) ± SE (nats) | "
        "reward - DPO frontier at equal KL | positive share of lexicon words | "
        "completion tokens | train s |"
    )
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    ref = reference
    lines.append(
        f"| reference (SFT) | - | - | {_pm(ref['reward'], ref['reward_se'])} | "
        f"{_pm(ref['kl'], ref['kl_se'])} | - | {ref['positive_share']:.2f} | "
        f"{ref['mean_length']:.1f} | {ref['train_seconds']:.0f} |"
    )
    for r in runs:
        if r["method"] == "dpo":
            gap = "(the frontier)"
        else:
            gap = "beyond DPO's range" if r["vs_dpo"] is None else f"{r['vs_dpo']:+.2f}"
        lines.append(
            f"| {r['label']} | {r['beta']:g} | {r['trained']} | {_pm(r['reward'], r['reward_se'])}"
            f" | {_pm(r['kl'], r['kl_se'])} | {gap} | {r['positive_share']:.2f} | "
            f"{r['mean_length']:.1f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def masks_table(rows: list[dict]) -> str:
    head = (
        "| method | beta | mask | state | lexicon | neutral | lexicon / neutral | positive | "
        "negative | EOS | exactly zero |"
    )
    lines = [head, "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["stats"]
        lines.append(
            f"| {r['label']} | {r['beta']:g} | {r['mask']} | {r['state']} | "
            f"{s['lexicon']:.3f} | {s['neutral']:.3f} | {s['ratio']:.2f} | "
            f"{s['positive']:.3f} | {s['negative']:.3f} | {s['eos']:.3f} | "
            f"{s['zero_fraction']:.3f} |"
        )
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(runs: list[dict], reference: dict, methods, path: Path) -> Path:
    """Gold reward against KL(pi || pi_ref), one curve per method (betas joined in KL order),
    error bars of one standard error on both axes; the reference policy at KL 0."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^v<>pPX*h"
    for k, m in enumerate(methods):
        pts = sorted((r for r in runs if r["method"] == m.name), key=lambda r: r["kl"])
        if not pts:
            continue
        ax.errorbar(
            [r["kl"] for r in pts],
            [r["reward"] for r in pts],
            xerr=[r["kl_se"] for r in pts],
            yerr=[r["reward_se"] for r in pts],
            marker=markers[k % len(markers)],
            markersize=5,
            capsize=2,
            linestyle="--" if m.lora else "-",
            label=m.label,
        )
        for r in pts:
            ax.annotate(
                f"{r['beta']:g}",
                (r["kl"], r["reward"]),
                fontsize=6,
                alpha=0.6,
                xytext=(3, -8),
                textcoords="offset points",
            )
    ax.errorbar(
        [0.0],
        [reference["reward"]],
        yerr=[reference["reward_se"]],
        marker="*",
        markersize=12,
        color="k",
        linestyle="none",
        label="reference (SFT)",
    )
    ax.set_xlabel("KL(π ‖ π_ref) per completion (nats, Monte-Carlo)")
    ax.set_ylabel("gold reward (lexicon balance) of samples")
    ax.set_title("Controlled sentiment: reward vs KL on held-out prompts (labels: beta)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(curves: dict[str, Path], path: Path) -> Path:
    """Held-out chosen / rejected sequence log-likelihoods against the step, for each labelled
    run's metrics.jsonl (the trainer's `eval/logps/chosen|rejected`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, metrics) in enumerate(curves.items()):
        rows = read_jsonl(metrics)
        for side, style in (("chosen", "-"), ("rejected", "--")):
            key = f"eval/logps/{side}"
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    color=colors[k % len(colors)],
                    marker="o",
                    markersize=3,
                    label=f"{label}: {side}",
                )
    ax.set_title("Held-out pairs: log-likelihood of chosen / rejected completions")
    ax.set_xlabel("step")
    ax.set_ylabel("sum of completion log-probs (nats)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
