"""Tajwar et al. 2024's bandit: on-policy sampling and negative gradients, by exact enumeration.

The claims ("Preference fine-tuning of LLMs should leverage suboptimal, on-policy data",
arXiv:2404.14367; specs/online.md section 6): (1) on-policy sampling beats a fixed offline data
set when the reward peak lies where the reference puts little mass, and matters little when
the peak is near the reference's mode; (2) objectives with a negative gradient (DPO / IPO push
the rejected sample down) beat maximum likelihood on filtered samples (best-of-N SFT), mostly
in the same far-peak case; (3) reusing each on-policy batch for several gradient steps helps
sample efficiency. Korbak et al. 2022 (arXiv:2205.11275; specs/online.md 3.1): the maximiser
of E_pi[r] - beta KL(pi || pi_ref) is pi* proportional to pi_ref exp(r / beta).

Setting (the official `bandit_experiment/`, Asap7772/understanding-rlhf, read at 6af8169;
specs/online.md section 6 cites 9d5844e): 100 actions; pi_ref is tanh(Cauchy(-0.7, 0.4)) binned
into 100 bins on [-1, 1] (here the exact bin masses from the Cauchy CDF; the official code uses
a 10,000-sample histogram). Its interior mode is action 16; the bins 0 and 99 collect the tails
(0.078 and 0.042). r(a) = exp(-((a - a*) / 10)^2) with a* = 20 ("near", the official reward_5)
or 70 ("far", reward_4). The policy is a table of 100 logits initialised to log pi_ref, so the
reference is exactly the initial policy (the official agent is an MLP over random contexts,
SFT'd onto pi_ref). Adam, as in the official code. Per epoch a batch of `groups` x `n` = 10 x 10
samples and `inner` = 15 gradient steps on it (the official on-policy scripts); 100 epochs =
1,500 steps and 10,000 reward queries.

Methods. DPO (`losses.get("sigmoid")`, beta 0.05) and IPO (`losses.get("ipo")`, tau 0.05: the
official target margin 10 = 1 / (2 tau)) on every pair within a group, the higher reward chosen
(`losses.pair_by_reward`; ties to the first sample, which by exchangeability is the official
rule in distribution); best-of-N SFT (NLL of each group's highest-reward sample, first on ties:
the official `best_of_n`, no negative gradient); REINFORCE-KL (`losses.reinforce_kl_loss`, k1
KL in the reward, beta 0.05, leave-one-out baseline within groups; on-policy only). On-policy:
each epoch's batch is drawn from the policy at the epoch's start. Offline: one data set drawn
from pi_ref with the same number of reward queries (1,000 groups of 10), full-batch, the same
1,500 steps.

Exact vs sampled. Every *metric* is exact: E_pi[r], KL(pi || pi_ref) and the mass at the peak
pi(|a - a*| <= 8) (the 17 actions with r >= 0.5) are sums over the 100 actions (the official
code estimates the reward from samples). *Exact* rows train on the expected loss under the
sampling distribution (the policy at the epoch's start, or pi_ref), enumerated: the pair losses
over all 100 x 100 ordered pairs (y1, y2) with weights pi(y1) pi(y2) (the mean over all pairs
within a group of i.i.d. samples has exactly this expectation), best-of-N over its closed form
q(a) = pi(a) sum_{k<N} F_le(a)^k F_lt(a)^(N-1-k) (F_le / F_lt: the mass with reward <= / <
r(a)), REINFORCE-KL over all actions with weights pi and the leave-one-out baseline replaced by
its expectation. No seeds. *Sampled* rows train on sampled batches (inverse-CDF sampling from
uniforms of `np.random.default_rng(seed)`, the same stream for every method): 10 evaluation
seeds (0-9), means with 95% t-intervals over seeds. Both go through the same `objective_loss`
(weighted alignjax losses); the offline data set is kept as weights on the 100 x 100 pair grid.
Each method's Adam lr is tuned per peak over a grid on 4 separate seeds (1000-1003), by the
lower end of the 95% interval of its mean E_pi[r] over the 101 evaluation points (epochs 0-100,
"AUC"); the exact rows use the same lr.

Ablations: (a) reuse: on-policy IPO with 1 gradient step per batch for 1,500 epochs (15x the
samples, its own tuned lr), against 15 steps per batch at equal reward queries and at equal
gradient steps; (b) optimizer: every method exactly with plain SGD (its own lr grid), since
Adam's per-logit normalisation is what lets a tabular policy move mass into the tail.

    python experiments/onpolicy_bandit.py            # ~70 s of CPU on 2 cores
    python experiments/onpolicy_bandit.py --quick    # < 30 s, a smoke test

Writes experiments/results/onpolicy_bandit/{summary.json, table.md, curves.png, policies.png,
ablations.png, README.md}; the README's verdicts are computed from the run. This file parses the
arguments and runs the parts in order; the parts live in `experiments/bandit/`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from experiments.bandit.claims import summarise  # noqa: E402
from experiments.bandit.methods import Study  # noqa: E402
from experiments.bandit.plots import plot_ablations, plot_curves, plot_policies  # noqa: E402
from experiments.bandit.report import curves_json, dump_json, readme, table  # noqa: E402
from experiments.bandit.tuning import study  # noqa: E402

OUT = REPO / "experiments" / "results" / "onpolicy_bandit"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast configuration")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    cfg = Study()
    if args.quick:  # every method, both peaks, exact and sampled; few epochs, one lr (tuning
        # and evaluation batches then have the same shapes: one compile each for exact, sampled)
        cfg = replace(cfg, epochs=12, seeds=3, tuning_seeds=3, adam_lrs=(0.03,), ablations=False)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    res = study(cfg)
    summary = {"config": asdict(cfg), **summarise(res, cfg)}
    for key in ("exact_grid", "tuning_grid", "sgd_grid"):
        if key in res:
            summary[key] = res[key]
    if "reuse" in res:
        summary["reuse"] = {"lr": res["reuse"]["lr"], "tuning_grid": res["reuse"]["tuning_grid"]}
    summary["curves"] = curves_json(res)
    plot_curves(res, args.out / "curves.png")
    plot_policies(res, cfg, args.out / "policies.png")
    if cfg.ablations:
        plot_ablations(res, cfg, args.out / "ablations.png")
    summary["seconds"] = time.perf_counter() - t0
    text = table(summary)
    (args.out / "table.md").write_text(text)
    (args.out / "summary.json").write_text(dump_json(summary))
    (args.out / "README.md").write_text(readme(summary))
    print(f"\n{text}\n{summary['seconds']:.0f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
