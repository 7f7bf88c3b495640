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
from experiments.stats import t975

__all__ = [
    "aggregate",
    "seed_interval",
    "frontier_means",
    "verdict",
    "runs_table",
    "masks_table",
    "dynamics_table",
    "dynamics_rows",
    "plot_frontier",
    "plot_trajectories",
    "plot_dynamics",
    "plot_mask_training",
]


METRICS = ("reward", "bounded_reward", "kl", "positive_share", "mean_length")
SCORES = {"reward": "gold reward (lexicon balance)", "bounded_reward": "bounded gold reward"}


def seed_interval(values) -> float | None:
    """Half-width of the 95% Student-t interval of the mean of per-seed values (None for one)."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return None
    return float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def _frontier(points: list[tuple[float, float]]):
    pts = sorted(points)
    kls = np.array([p[0] for p in pts])
    return kls, np.maximum.accumulate([p[1] for p in pts])


def aggregate(runs: list[dict], reference: dict, baseline: str = "dpo") -> list[dict]:
    """One row per (method, beta): seed means of the evaluation metrics with their 95%
    intervals over training seeds (`<metric>_ci`, None with one seed; `<metric>_se` is the mean
    evaluation standard error), and the gap to DPO's frontier for each score.

    DPO's frontier is the piecewise-linear curve through the reference policy (KL 0) and DPO's
    seed-mean points sorted by KL, made monotone (the best score reached at any KL up to each
    point). A run's gap is its score minus that curve at its own KL (None beyond DPO's largest
    KL); a configuration's gap is the mean of its seeds' gaps, with their interval."""
    order, groups = [], {}
    for r in runs:
        key = (r["method"], r["beta"])
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(r)
    configs = []
    for key in order:
        rs = groups[key]
        c = {k: rs[0][k] for k in ("method", "label", "loss", "beta", "trained")}
        c["seeds"] = [r["seed"] for r in rs]
        for m in METRICS:
            vals = [r[m] for r in rs]
            c[m] = float(np.mean(vals))
            c[f"{m}_ci"] = seed_interval(vals)
            if f"{m}_se" in rs[0]:
                c[f"{m}_se"] = float(np.mean([r[f"{m}_se"] for r in rs]))
        c["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
        c["dead_heads"] = sum(bool(r.get("dead_head")) for r in rs)
        c["redrawn"] = sum(r.get("redrawn_head_seed") is not None for r in rs)
        configs.append(c)
    for score in SCORES:
        base = [(c["kl"], c[score]) for c in configs if c["method"] == baseline]
        kls, best = _frontier([(0.0, reference[score])] + base)
        for c in configs:
            gaps = []
            for r in groups[(c["method"], c["beta"])]:
                inside = 0.0 <= r["kl"] <= kls[-1]
                r[f"vs_dpo_{score}"] = (
                    float(r[score] - np.interp(r["kl"], kls, best)) if inside else None
                )
                gaps.append(r[f"vs_dpo_{score}"])
            ok = [g for g in gaps if g is not None]
            c[f"vs_dpo_{score}"] = float(np.mean(ok)) if len(ok) == len(gaps) else None
            c[f"vs_dpo_{score}_ci"] = seed_interval(ok) if len(ok) == len(gaps) else None
    return configs


def frontier_means(configs: list[dict]) -> dict:
    """Per method and score, the mean gap to DPO's frontier over its configurations within
    DPO's KL range."""
    out = {}
    for score in SCORES:
        per = {}
        for c in configs:
            if c[f"vs_dpo_{score}"] is not None:
                per.setdefault(c["method"], []).append(c[f"vs_dpo_{score}"])
        for m, v in per.items():
            out.setdefault(m, {})[score] = dict(mean=float(np.mean(v)), points=len(v))
    return out


def verdict(configs: list[dict], mask_rows: list[dict], methods) -> list[str]:
    """One line per method: its gap to DPO's frontier for both scores (mean over its betas in
    DPO's KL range), dead heads; then the masks' weight on lexicon tokens (trained vs init)."""
    lines = []
    gaps = frontier_means(configs)
    for m in methods:
        if m.name == "dpo":
            continue
        g = gaps.get(m.name, {})
        if "reward" not in g:
            lines.append(f"{m.label}: every run beyond DPO's KL range, no comparison")
            continue
        parts = [
            f"{g[s]['mean']:+.2f} {word}"
            for s, word in (("reward", "reward"), ("bounded_reward", "bounded reward"))
            if s in g
        ]
        dead = sum(c["dead_heads"] for c in configs if c["method"] == m.name)
        runs = sum(len(c["seeds"]) for c in configs if c["method"] == m.name)
        tail = f"; mask head dead at init in {dead} of {runs} runs" if m.learned_heads else ""
        lines.append(
            f"{m.label}: {'above' if g['reward']['mean'] > 0 else 'below'} DPO's frontier at "
            f"equal KL by {', '.join(parts)} on average ({g['reward']['points']} of "
            f"{len(m.betas)} betas in range){tail}"
        )
    for r in mask_rows:
        if r["state"] == "trained" and r["mask"] == "reward":
            s = r["stats"]
            init = next(
                (
                    x["stats"]
                    for x in mask_rows
                    if x["method"] == r["method"]
                    and x["seed"] == r["seed"]
                    and x["state"] == "init"
                    and x["mask"] == "reward"
                ),
                None,
            )
            tail = (
                "" if init is None else f" (at init: {init['ratio']:.2f}, mean {init['mean']:.3f})"
            )
            lines.append(
                f"{r['label']} beta {r['beta']:g} seed {r['seed']}: lexicon / neutral mask "
                f"weight {s['ratio']:.2f}{tail}, mean {s['mean']:.3f}, exactly zero "
                f"{s['zero_fraction']:.2f}"
            )
    return lines


def _pm(mean, se, digits=2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if se is None or math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _gap(c, score) -> str:
    if c["method"] == "dpo":
        return "(the frontier)"
    g = c[f"vs_dpo_{score}"]
    if g is None:
        return "beyond DPO's range"
    ci = c[f"vs_dpo_{score}_ci"]
    return f"{g:+.2f}" if ci is None else f"{g:+.2f} ± {ci:.2f}"


def runs_table(configs: list[dict], reference: dict, *, seeds: int) -> str:
    """The frontier table: seed means; ± is the 95% interval over training seeds when there
    are several, else one evaluation standard error (over prompts) of the single run."""
    what = f"mean ± 95% CI over {seeds} seeds" if seeds > 1 else "1 seed, ± eval SE"
    head = (
        f"| method | beta | gold reward ({what}) | bounded reward | KL(π ‖ π_ref) (nats) | "
        "reward - DPO at equal KL | bounded - DPO at equal KL | positive share | "
        "completion tokens | dead heads | train s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = reference
    lines.append(
        f"| reference (SFT) | - | {_pm(ref['reward'], ref['reward_se'])} | "
        f"{_pm(ref['bounded_reward'], ref['bounded_reward_se'], 3)} | "
        f"{_pm(ref['kl'], ref['kl_se'])} | - | - | {ref['positive_share']:.2f} | "
        f"{ref['mean_length']:.1f} | - | {ref['train_seconds']:.0f} |"
    )

    def pm(c, m, digits=2):
        ci = c[f"{m}_ci"]
        return _pm(c[m], ci if ci is not None else c.get(f"{m}_se"), digits)

    for c in configs:
        dead = "-"
        if c["loss"] == "sparsepo" and (c["dead_heads"] or c["redrawn"]):
            dead = f"{c['dead_heads']}/{len(c['seeds'])}"
            dead += f" ({c['redrawn']} re-drawn)" if c["redrawn"] else ""
        elif c["loss"] == "sparsepo":
            dead = f"0/{len(c['seeds'])}"
        lines.append(
            f"| {c['label']} | {c['beta']:g} | {pm(c, 'reward')} | {pm(c, 'bounded_reward', 3)}"
            f" | {pm(c, 'kl')} | {_gap(c, 'reward')} | {_gap(c, 'bounded_reward')} | "
            f"{c['positive_share']:.2f} | {c['mean_length']:.1f} | {dead} | "
            f"{c['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def masks_table(rows: list[dict]) -> str:
    head = (
        "| method | beta | seed | mask | state | mean | lexicon | neutral | lexicon / neutral | "
        "positive | negative | EOS | exactly zero |"
    )
    lines = [head, "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["stats"]
        lines.append(
            f"| {r['label']} | {r['beta']:g} | {r.get('seed', 0)} | {r['mask']} | {r['state']} | "
            f"{s['mean']:.3f} | "
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


def plot_frontier(configs: list[dict], reference: dict, methods, path: Path) -> Path:
    """Gold reward (left) and bounded gold reward (right) against KL(pi || pi_ref), one curve
    per method (betas joined in KL order; reward-model rows dotted, hollow markers, in their
    gold-scored twin's colour); error bars are the 95% intervals over training seeds
    (one evaluation standard error with a single seed); the reference policy at KL 0."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^v<>pPX*h"
    # an on-policy row scored by the reward model shares its gold-scored twin's colour, dotted
    families = list(dict.fromkeys(m.name.removesuffix("_rm") for m in methods))
    for ax, score in zip(axes, SCORES):
        for m in methods:
            family = families.index(m.name.removesuffix("_rm"))
            rm = getattr(m, "scorer", "gold") == "rm"
            pts = sorted((c for c in configs if c["method"] == m.name), key=lambda c: c["kl"])
            if not pts:
                continue

            def bar(c, key):
                ci = c[f"{key}_ci"]
                return ci if ci is not None else c.get(f"{key}_se", 0.0)

            ax.errorbar(
                [c["kl"] for c in pts],
                [c[score] for c in pts],
                xerr=[bar(c, "kl") for c in pts],
                yerr=[bar(c, score) for c in pts],
                marker=markers[family % len(markers)],
                markersize=5,
                capsize=2,
                color=f"C{family % 10}",
                mfc="none" if rm else None,
                linestyle=":" if rm else "--" if m.lora or m.name.startswith("sparsepo_") else "-",
                label=m.label,
            )
            for c in pts:
                ax.annotate(
                    f"{c['beta']:g}",
                    (c["kl"], c[score]),
                    fontsize=6,
                    alpha=0.6,
                    xytext=(3, -8),
                    textcoords="offset points",
                )
        ax.errorbar(
            [0.0],
            [reference[score]],
            yerr=[reference[f"{score}_se"]],
            marker="*",
            markersize=12,
            color="k",
            linestyle="none",
            label="reference (SFT)",
        )
        ax.set_xlabel("KL(π ‖ π_ref) per completion (nats, Monte-Carlo)")
        ax.set_ylabel(SCORES[score] + " of samples")
        ax.grid(alpha=0.3)
    axes[0].set_title("gold reward (counts lexicon words) vs KL; labels: beta")
    axes[1].set_title("bounded gold reward sigmoid(balance) vs KL")
    axes[1].legend(fontsize=7, loc="lower right")
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


DYNAMICS = (
    ("dynamics/delta_logps/chosen", "Δ log p(chosen) since step 0"),
    ("dynamics/delta_logps/rejected", "Δ log p(rejected) since step 0"),
    ("dynamics/displacement", "displacement: share of pairs whose chosen log p fell"),
    ("dynamics/log_grad_ratio", "log π(y_w)/π(y_l) (prob.-space gradient ratio, log)"),
    ("dynamics/probe/delta_logps", "probe: Δ log p of held-out reference samples"),
    ("dynamics/probe/entropy", "probe: next-token entropy (nats)"),
)


def _eval_series(metrics: Path, key: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r[f"eval/{key}"])
        for r in read_jsonl(metrics)
        if r.get(f"eval/{key}") is not None
    ]


def plot_dynamics(curves: dict[str, Path], path: Path) -> Path:
    """The DPO-dynamics diagnostics (`alignjax.train.dynamics`) over training, one panel each,
    for every trajectory run."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.ravel(), DYNAMICS):
        for label, metrics in curves.items():
            pts = _eval_series(metrics, key)
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dynamics_rows(curves: dict[str, Path]) -> list[dict]:
    """The last evaluation's diagnostics of every trajectory run."""
    rows = []
    for label, metrics in curves.items():
        last = {}
        for key, _ in DYNAMICS + (("logps/chosen", ""), ("logps/rejected", "")):
            pts = _eval_series(metrics, key)
            if pts:
                last[key] = pts[-1][1]
        rows.append(dict(label=label, **last))
    return rows


def dynamics_table(curves: dict[str, Path]) -> str:
    keys = [k for k, _ in DYNAMICS]
    short = [k.removeprefix("dynamics/") for k in keys]
    lines = [
        "| run (final evaluation) | " + " | ".join(short) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for row in dynamics_rows(curves):
        cells = [f"{row[k]:.3f}" if k in row else "-" for k in keys]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MASK_TRAINING = (
    (("mask/chosen_mean", "chosen"), ("mask/rejected_mean", "rejected")),
    (("mask/eos", "EOS"),),
    (("mask/sparsity", "exactly zero"),),
    (("seq_kl/chosen", "SeqKL chosen"), ("masked_seq_kl/chosen", "WgtSeqKL chosen")),
)
MASK_TITLES = (
    "mean reward mask: chosen vs rejected rows",
    "mask at the EOS token",
    "share of exactly-zero mask entries",
    "sequence KL: unmasked vs masked",
)


def plot_mask_training(curves: dict[str, Path], path: Path) -> Path:
    """SparsePO's mask over training (the train step's `mask/*` and KL metrics), per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, series, title in zip(axes, MASK_TRAINING, MASK_TITLES):
        for k, (label, metrics) in enumerate(curves.items()):
            rows = read_jsonl(metrics)
            for j, (key, name) in enumerate(series):
                pts = [
                    (r["step"], r[f"train/{key}"])
                    for r in rows
                    if r.get(f"train/{key}") is not None
                ]
                if pts:
                    ax.plot(
                        *zip(*pts),
                        ("-", "--")[j],
                        color=colors[k % len(colors)],
                        label=f"{label}: {name}" if len(series) > 1 else label,
                    )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
