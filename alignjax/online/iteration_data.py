"""K samples per prompt (`Samples`) and the pair builders of the iterative methods: pure
host functions from the samples and their scores to the rows of a pairs file.

Pair builders, one per method (specs/online.md sections 1.4, 2, 4):

* `best_worst_pairs` (iterative DPO, RLHFlow `run_dpo.py` choose_type "max_min"): chosen =
  argmax, rejected = argmin of the scorer's rewards (first index on ties); a prompt whose best
  and worst rewards are equal gives no pair (RLHFlow keeps a pair only when
  `rewards[idx0] > rewards[idx1]`). Rows carry the rewards as `score_chosen` /
  `score_rejected` (UltraFeedback's columns).
* `sppo_pairs` (SPPO `compute_prob.py`): `online.sppo_targets` on the `[P, K, K]` win-rate
  matrix, picked by the scores when there are scores; P_w, P_l and P(y_w > y_l) become
  `chosen_win_prob`, `rejected_win_prob`, `win_prob`. A prompt whose K scores all tie keeps its
  (degenerate, chosen == rejected) row, as the official code does; it is counted.
* `cream_pairs` (CREAM `cal_consistency.py`): y+ / y- = argmax / argmin of the current model's
  rewards (a prompt where they coincide is skipped), C from Kendall's tau of the current and
  previous rankings joined by prompt id (`online.consistency`), per pair ("dyn") or its mean
  ("avg"), or C = 1 ("none", the SRLM baseline). The row's `win_prob` column holds C: the
  probability with which y+ is labelled preferred, which the `cream` loss
  (`alignjax.online.cream_loss`) reads; C * DPO(y+, y-) + (1 - C) * DPO(y-, y+) is DPO with
  that soft label.

Every builder drops, and counts, what the trainer cannot take: a prompt with a missing (NaN)
score, and a pair whose chosen or rejected completion is empty text (the sampler stopped at
once; the trainer rejects empty completions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignjax.online.cream import consistency, pair_consistency, preference_pairs
from alignjax.online.scorers import bradley_terry_win_rates, max_min_pairs
from alignjax.online.selfplay import sppo_targets

__all__ = [
    "CREAM_STRATEGIES",
    "Samples",
    "best_worst_pairs",
    "sppo_pairs",
    "cream_rewards",
    "cream_pairs",
]

CREAM_STRATEGIES = ("avg", "dyn", "none")


@dataclasses.dataclass
class Samples:
    """K completions of each of P prompts (`completions[p][k]`)."""

    prompt_ids: list  # [P] prompt ids (str or int)
    prompts: list  # [P] prompt texts
    completions: list  # [P][K] completion texts (stop token dropped)
    missing_eos: np.ndarray  # [P, K] bool: no stop token within max_new_tokens
    lengths: np.ndarray | None = None  # [P, K] completion tokens, the stop token included
    rollout: Any = None  # the `Rollout` (token ids and masks, grouped rows) for token judges

    @property
    def num_samples(self) -> int:
        return len(self.completions[0]) if self.completions else 0

    def flat(self) -> tuple[list, list]:
        """(prompts, completions) repeated per row, row p * K + k (the "grouped" layout)."""
        k = self.num_samples
        return [p for p in self.prompts for _ in range(k)], [c for g in self.completions for c in g]


# ----------------------------------------------------------------------------- pair builders


def _checked_scores(samples: Samples, scores, name: str) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    shape = (len(samples.prompts), samples.num_samples)
    if s.shape != shape:
        raise ValueError(f"`{name}` must be [P, K] = {shape}, got {s.shape}")
    return s


def _empty(text) -> bool:
    return not str(text).strip()


def _row(samples: Samples, p: int, c: int, r: int, **extra) -> dict:
    return dict(
        prompt=samples.prompts[p],
        chosen=samples.completions[p][c],
        rejected=samples.completions[p][r],
        prompt_id=samples.prompt_ids[p],
        **extra,
    )


def best_worst_pairs(samples: Samples, scores) -> tuple[list[dict], dict]:
    """Iterative DPO's pairs (RLHFlow "max_min"): best vs worst of each prompt's K rewards.

    Returns the rows and counts: `unscored` (a NaN reward), `ties` (best == worst),
    `empty` (an empty chosen / rejected completion), `pairs`.
    """
    s = _checked_scores(samples, scores, "scores")
    scored = np.flatnonzero(~np.isnan(s).any(1))
    rows, ties, empty = [], 0, 0
    if scored.size:
        chosen, rejected = (np.asarray(x) for x in max_min_pairs(s[scored]))
        for p, c, r in zip(scored, chosen, rejected):
            if not s[p, c] > s[p, r]:
                ties += 1
            elif _empty(samples.completions[p][c]) or _empty(samples.completions[p][r]):
                empty += 1
            else:
                rows.append(_row(samples, p, c, r, score_chosen=float(s[p, c]),
                                 score_rejected=float(s[p, r])))  # fmt: skip
    stats = dict(pairs=len(rows), unscored=int(len(s) - scored.size), ties=ties, empty=empty)
    return rows, stats


def sppo_pairs(
    samples: Samples, scores=None, *, win_rates=None, tau: float = 1.0
) -> tuple[list[dict], dict]:
    """SPPO's pairs with their win probabilities (`compute_prob.py`).

    Args:
      samples: K completions per prompt.
      scores: `[P, K]` scores (PairRM's in the official code; here any reward), or None when
        `win_rates` come from a pairwise preference model.
      win_rates: `[P, K, K]` P(y_i > y_j); None: Bradley-Terry on the scores,
        P_ij = sigmoid((s_i - s_j) / tau).
      tau: the Bradley-Terry temperature of the default preference (1: `compute_prob.py`).

    Returns the rows and counts: `unscored`, `degenerate` (all K tie; kept), `empty`, `pairs`.
    """
    if scores is None and win_rates is None:
        raise ValueError("`sppo_pairs` needs `scores` or `win_rates`")
    n, k = len(samples.prompts), samples.num_samples
    s = None if scores is None else _checked_scores(samples, scores, "scores")
    keep = np.ones(n, bool) if s is None else ~np.isnan(s).any(1)
    if win_rates is None:
        if not tau > 0:
            raise ValueError(f"`tau` must be > 0, got {tau}")
        w = np.asarray(bradley_terry_win_rates(s[keep] / tau)) if keep.any() else None
    else:
        w = np.asarray(win_rates, np.float64)
        if w.shape != (n, k, k):
            raise ValueError(f"`win_rates` must be [P, K, K] = {(n, k, k)}, got {w.shape}")
        keep &= ~np.isnan(w).any((1, 2))
        w = w[keep]
    rows, empty, degenerate = [], 0, 0
    prompts = np.flatnonzero(keep)
    if prompts.size:
        t = sppo_targets(w, scores=None if s is None else s[keep].astype(w.dtype))
        picks = zip(prompts, np.asarray(t.chosen), np.asarray(t.rejected))
        for i, (p, c, r) in enumerate(picks):
            if _empty(samples.completions[p][c]) or _empty(samples.completions[p][r]):
                empty += 1
                continue
            degenerate += int(c == r)
            rows.append(_row(samples, p, c, r,
                             chosen_win_prob=float(np.asarray(t.chosen_win_prob)[i]),
                             rejected_win_prob=float(np.asarray(t.rejected_win_prob)[i]),
                             win_prob=float(np.asarray(t.win_prob)[i])))  # fmt: skip
    stats = dict(pairs=len(rows), unscored=int(n - prompts.size), degenerate=degenerate,
                 empty=empty)  # fmt: skip
    return rows, stats


def cream_rewards(current, previous=None, before=None) -> tuple[np.ndarray, np.ndarray | None]:
    """CREAM's two rankings from `(sums, counts)` log-probs `[P, K]` of the same samples under
    the current model M_t, the previous M_{t-1} and the one before, M_{t-2} (None where the
    chain has no such model), as `rewarding.py` scores them:

    * current ranking: the DPO implicit reward log pi_t(y) - log pi_{t-1}(y) (summed over the
      completion tokens, no beta; `--enable_ref yes`); without a previous model, pi_t's
      length-normalised log-likelihood;
    * previous ranking: log pi_{t-1}(y) - log pi_{t-2}(y); without M_{t-2}, pi_{t-1}'s
      length-normalised log-likelihood (`--enable_ref no`, how M0 ranks); None without M_{t-1}.
    """

    def normalised(x):
        sums, counts = (np.asarray(a, np.float64) for a in x)
        return sums / np.maximum(counts, 1.0)

    def implicit(a, b):
        return np.asarray(a[0], np.float64) - np.asarray(b[0], np.float64)

    cur = normalised(current) if previous is None else implicit(current, previous)
    if previous is None:
        return cur, None
    return cur, normalised(previous) if before is None else implicit(previous, before)


def cream_pairs(
    samples: Samples,
    current,
    previous=None,
    *,
    strategy: str = "avg",
    previous_ids: Sequence | None = None,
) -> tuple[list[dict], dict]:
    """CREAM's pairs with their consistency C in the `win_prob` column.

    Args:
      samples: K completions per prompt (ids `samples.prompt_ids`).
      current: `[P, K]` the current model's rewards (NaN: not scored).
      previous: `[Q, K]` the previous model's rewards of the same completions (NaN: skipped),
        rows keyed by `previous_ids` (default: `samples.prompt_ids`); None: no previous model,
        C = 1.
      strategy: "avg" (`consistency_avg`, the README's choice: the mean C over the pairs),
        "dyn" (`consistency_dyn`: each pair's own C, the mean where it has none), or "none"
        (C = 1: plain DPO on the self-rewarded pairs, SRLM).

    Returns the rows and counts: `pairs`, `skipped` (argmax == argmin or a NaN current
    reward), `empty`, `consistency_mean` / `tau_mean` over the prompts both models scored,
    `consistency_skipped_ids` (prompts either model left out, joined by id, never shifted),
    `pairs_without_consistency` (given the mean C), `c_mean` (the mean C of the pairs).
    """
    if strategy not in CREAM_STRATEGIES:
        raise ValueError(f"`strategy` must be one of {CREAM_STRATEGIES}, got {strategy!r}")
    cur = _checked_scores(samples, current, "current")
    ids = list(samples.prompt_ids)
    sel = preference_pairs(cur, ids)
    stats: dict = dict(skipped=len(sel.skipped_ids))
    c = np.ones(len(sel.prompt_ids))
    if previous is not None and strategy != "none" and len(sel.prompt_ids):
        result = consistency(cur, previous, ids, ids if previous_ids is None else previous_ids)
        c_pairs, missing = pair_consistency(sel.prompt_ids, result, strategy=strategy)
        c = np.asarray(c_pairs, np.float64)
        stats.update(
            consistency_mean=float(result.mean) if len(result.prompt_ids) else None,
            tau_mean=float(np.mean(np.asarray(result.tau))) if len(result.prompt_ids) else None,
            consistency_skipped_ids=np.asarray(result.skipped_ids).tolist(),
            pairs_without_consistency=missing,
        )
    position = {key: i for i, key in enumerate(ids)}
    rows, empty = [], 0
    for key, ch, rj, ci in zip(np.asarray(sel.prompt_ids).tolist(), sel.chosen, sel.rejected, c):
        p = position[key]
        if _empty(samples.completions[p][ch]) or _empty(samples.completions[p][rj]):
            empty += 1
            continue
        rows.append(_row(samples, p, int(ch), int(rj), win_prob=float(ci)))
    c_mean = float(np.mean([r["win_prob"] for r in rows])) if rows else None
    stats.update(pairs=len(rows), empty=empty, c_mean=c_mean)
    return rows, stats
