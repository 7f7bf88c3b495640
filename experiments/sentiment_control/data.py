"""Prompts, Bradley-Terry preference pairs and SPPO win probabilities from scored samples.

Prompts are review openings of the synthetic language (`synthetic.review_opening`), drawn from
`random.Random(f"sentiment-{split}-{seed}-{i}")`; held-out prompts skip every training prompt,
so the two sets are disjoint by construction (and checked).

Labels. For two samples a, b of one prompt with gold rewards r_a, r_b (`sentiment_score` of the
completion), a is chosen with probability P(a > b) = sigmoid((r_a - r_b) / tau) (one uniform
draw per pair): the Bradley-Terry model with temperature `tau`, so a pair whose rewards differ
by 1 gets the "wrong" label with probability sigmoid(-1 / tau) (0.27 at tau = 1). Pairs with
equal rewards carry no preference and are not kept (they are counted). SPPO's per-response win
probability against the reference policy, P(y > pi_ref | x), is estimated from the same gold
model over the prompt's K samples, itself included (a 1/2 term), as the official SPPO
`compute_prob.py` does with PairRM scores: P(y_k > pi_ref) = mean_j sigmoid((r_k - r_j) / tau).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignjax.data import synthetic

__all__ = ["draw_prompts", "encode_prompts", "lexicon", "make_pairs", "win_probabilities"]


def draw_prompts(split: str, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list:
    """`n` distinct review openings of `split`, none of them in `exclude`."""
    out, seen, i = [], set(exclude), 0
    while len(out) < n:
        prompt = synthetic.review_opening(random.Random(f"sentiment-{split}-{seed}-{i}"))
        i += 1
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
        if i > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} prompts (the grammar is small)")
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], length: int) -> tuple:
    """Left-padded `[N, length]` token ids and mask of the prompts (BOS + text, as the trainer
    tokenizes a prompt), for `models.generate`."""
    pad = tokenizer.pad_token_id or 0
    ids = np.full((len(prompts), length), pad, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, prompt in enumerate(prompts):
        p = tokenizer(prompt)["input_ids"]
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens > {length}: {prompt!r}")
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    return ids, mask


def lexicon() -> frozenset[str]:
    """The sentiment-carrying words of the gold reward."""
    s = synthetic
    return frozenset(s.POSITIVE + s.NEGATIVE + s.POSITIVE_VERBS + s.NEGATIVE_VERBS)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # no overflow for very negative x (a tiny tau)
    return z / (1.0 + z)


def win_probabilities(rewards: Sequence[float], tau: float) -> list[float]:
    """P(y_k > pi_ref) for each of the K samples of one prompt (see the module docstring)."""
    return [float(np.mean([_sigmoid((rk - rj) / tau) for rj in rewards])) for rk in rewards]


def make_pairs(
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    *,
    tau: float,
    seed: int,
    pairs_per_prompt: int | None = None,
) -> tuple[list[dict], dict]:
    """Preference rows from K scored completions per prompt, labelled by a Bradley-Terry draw.

    Every unordered pair of distinct completions with different rewards is a candidate
    (`pairs_per_prompt`: keep a random subset of that many per prompt, None: all); pairs with
    an empty completion are dropped too. Returns the rows (prompt, chosen, rejected,
    chosen_win_prob, rejected_win_prob, chosen_score, rejected_score) and counts: rows, ties and
    empty pairs dropped, label noise (rows whose chosen completion has the lower gold reward)
    and its expected value under the BT model.
    """
    rng = random.Random(f"sentiment-pairs-{seed}")
    rows, ties, empty, expected_noise = [], 0, 0, 0.0
    for prompt, texts, scores in zip(prompts, completions, rewards, strict=True):
        wins = win_probabilities(scores, tau)
        candidates = []
        for i, j in itertools.combinations(range(len(texts)), 2):
            if not texts[i].strip() or not texts[j].strip():
                empty += 1  # the sampler stopped at once: no completion to train on
                continue
            if scores[i] == scores[j] or texts[i] == texts[j]:
                ties += scores[i] == scores[j]
                continue
            candidates.append((i, j))
        if pairs_per_prompt is not None and len(candidates) > pairs_per_prompt:
            candidates = rng.sample(candidates, pairs_per_prompt)
        for i, j in candidates:
            p_i = _sigmoid((scores[i] - scores[j]) / tau)
            c, r = (i, j) if rng.random() < p_i else (j, i)
            expected_noise += min(p_i, 1.0 - p_i)
            rows.append(
                dict(
                    prompt=prompt,
                    chosen=texts[c],
                    rejected=texts[r],
                    chosen_win_prob=wins[c],
                    rejected_win_prob=wins[r],
                    chosen_score=float(scores[c]),
                    rejected_score=float(scores[r]),
                )
            )
    noisy = sum(r["chosen_score"] < r["rejected_score"] for r in rows)
    stats = dict(
        pairs=len(rows),
        ties_dropped=int(ties),
        empty_dropped=int(empty),
        label_noise_rate=noisy / max(len(rows), 1),
        expected_label_noise_rate=expected_noise / max(len(rows), 1),
        tau=tau,
        mean_chosen_score=float(np.mean([r["chosen_score"] for r in rows])) if rows else 0.0,
        mean_rejected_score=float(np.mean([r["rejected_score"] for r in rows])) if rows else 0.0,
    )
    return rows, stats


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path
