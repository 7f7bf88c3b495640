"""CREAM: consistency-regularised self-rewarding DPO.

Wang et al., "CREAM: Consistency Regularized Self-Rewarding Language Models", ICLR 2025,
arXiv:2410.12735; official Raibows/CREAM (specs/online.md section 4).

In iteration t the current model M_t scores its N samples per prompt with its DPO implicit
reward, and the previous model M_{t-1} scores the same samples. The agreement of the two
rankings, C = (tau + 1) / 2 with tau Kendall's tau (the paper's consistency rate), weighs a DPO
loss on the current model's best / worst pair against the same loss with the pair swapped (the
paper's consistency-regularised objective):

    L = C (-log s(u)) + (1 - C) (-log s(-u)),   u = beta [(logp(y+) - logp_ref(y+)) -
                                                          (logp(y-) - logp_ref(y-))],

i.e. conservative DPO with label smoothing 1 - C. The reference is M_t, log-probs are summed.

Deliberate differences from the official code (`cal_consistency.py`, `data.py`):
  * Consistencies are joined by prompt id. The official script computes them over a Python set
    of ids, `continue`s past invalid ones, then zips the same set with the shorter list of
    values, so after the first skipped prompt every C belongs to the next prompt. Here a prompt
    that either model skipped (absent, or a NaN score) is dropped from both and reported.
  * Only the `kendall` method; `spearman` and `toporder` (which, as coded, compares the ranks of
    the first and last *responses*, not of the best and worst) are not provided.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses.dpo import Hyper, pair_scores, sigmoid_loss
from alignjax.losses.types import LossOutput, PreferenceBatch, check_beta, paired_output
from alignjax.ops import _checks as C

STRATEGIES = ("dyn", "avg")


def kendall_tau(scores_a: jax.Array, scores_b: jax.Array) -> jax.Array:
    """Kendall's tau per prompt between two scorings `[P, N]` of the same N responses -> `[P]`.

    As `cal_consistency.py`: each row is first turned into ordinal ranks
    (`scipy.stats.rankdata(method='ordinal')`: ties broken by position, the earlier response
    ranked lower), then `scipy.stats.kendalltau` (tau-b) of the two rank permutations; without
    ties tau-b is tau-a, so tau = (concordant - discordant) / (N (N - 1) / 2) over the pairs
    i < j, where response i ranks below j iff s_i <= s_j. Never NaN, always in [-1, 1].
    """
    a, b = jnp.asarray(scores_a), jnp.asarray(scores_b)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"`scores_a` must be [P, N] with N >= 2 responses, got {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"`scores_b` must have the shape of `scores_a` {a.shape}, got {b.shape}")
    n = a.shape[1]
    i, j = np.triu_indices(n, k=1)

    def order(s):  # +1 where response i ranks below j (ordinal ranks), -1 otherwise
        return jnp.where(s[:, i] <= s[:, j], 1.0, -1.0)

    return jnp.mean(order(a) * order(b), axis=1)


class Consistency(NamedTuple):
    """Per-prompt consistency of two models' rankings, joined by prompt id."""

    prompt_ids: np.ndarray  # [M] ids scored validly by both models, in the current model's order
    tau: jax.Array  # [M] Kendall's tau of the two rankings
    consistency: jax.Array  # [M] C = (tau + 1) / 2 in [0, 1]
    skipped_ids: np.ndarray  # ids in either input left out: absent from the other, or NaN scores

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_ids)

    @property
    def mean(self) -> jax.Array:
        """The mean C over every joined prompt (the statistic `cal_consistency.py` logs)."""
        return jnp.mean(self.consistency)


def _index(name: str, ids, rows: int) -> dict:
    ids = list(np.asarray(ids).tolist())
    if len(ids) != rows:
        raise ValueError(f"`{name}` must give one id per score row ({rows}), got {len(ids)}")
    index = {key: pos for pos, key in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"`{name}` holds duplicate prompt ids")
    return index


def consistency(
    current_scores,
    previous_scores,
    prompt_ids_current: Sequence,
    prompt_ids_previous: Sequence,
) -> Consistency:
    """C = (tau + 1) / 2 per prompt, the two models' scores matched by prompt id.

    Wang et al. 2025 (arXiv:2410.12735), the consistency rate; official `cal_consistency.py`
    (method `kendall`) without its misalignment after a skipped prompt (module docstring).

    Args:
      current_scores: `[P, N]` the current model M_t's rewards of the N responses per prompt
        (DPO implicit rewards; NaN where a score is missing).
      previous_scores: `[Q, N]` the previous model's scores of the same responses, in the same
        response order.
      prompt_ids_current, prompt_ids_previous: `[P]` and `[Q]` unique hashable prompt ids.

    A prompt present in only one input, or with a NaN score in either, is dropped from both
    and listed in `skipped_ids`. Host-side (NumPy) join; the tau is `kendall_tau`.
    """
    cur = np.asarray(current_scores, dtype=np.float64)
    prev = np.asarray(previous_scores, dtype=np.float64)
    if cur.ndim != 2 or cur.shape[1] < 2:
        raise ValueError(f"`current_scores` must be [P, N] with N >= 2, got {cur.shape}")
    if prev.ndim != 2 or prev.shape[1] != cur.shape[1]:
        raise ValueError(
            f"`previous_scores` must be [Q, N] with N = {cur.shape[1]} like `current_scores`, "
            f"got {prev.shape}"
        )
    index_cur = _index("prompt_ids_current", prompt_ids_current, cur.shape[0])
    index_prev = _index("prompt_ids_previous", prompt_ids_previous, prev.shape[0])
    valid_cur = ~np.isnan(cur).any(axis=1)
    valid_prev = ~np.isnan(prev).any(axis=1)
    kept = [
        key
        for key, pos in index_cur.items()
        if key in index_prev and valid_cur[pos] and valid_prev[index_prev[key]]
    ]
    kept_set = set(kept)
    skipped = [k for k in index_cur if k not in kept_set]
    skipped += [k for k in index_prev if k not in kept_set and k not in index_cur]
    rows_cur = np.asarray([index_cur[k] for k in kept], dtype=np.int64)
    rows_prev = np.asarray([index_prev[k] for k in kept], dtype=np.int64)
    if kept:
        tau = kendall_tau(jnp.asarray(cur[rows_cur]), jnp.asarray(prev[rows_prev]))
    else:
        tau = jnp.zeros((0,))
    return Consistency(np.asarray(kept), tau, (tau + 1.0) / 2.0, np.asarray(skipped))


class PairSelection(NamedTuple):
    """CREAM's training pairs from the current model's rewards."""

    prompt_ids: np.ndarray  # [B] prompts with a pair, in input order
    chosen: np.ndarray  # [B] index of y+ = argmax reward
    rejected: np.ndarray  # [B] index of y- = argmin reward
    skipped_ids: np.ndarray  # prompts whose argmax == argmin (all rewards equal) or with NaNs


def preference_pairs(scores, prompt_ids: Sequence) -> PairSelection:
    """y+ = argmax, y- = argmin of the current model's rewards `[P, N]` (first index on ties);
    a prompt where they coincide is skipped and listed, as `cal_consistency.py` does."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"`scores` must be [P, N] with N >= 2, got {s.shape}")
    ids = np.asarray(list(_index("prompt_ids", prompt_ids, s.shape[0])))
    finite = ~np.isnan(s).any(axis=1)
    filled = np.where(np.isnan(s), 0.0, s)
    chosen, rejected = np.argmax(filled, axis=1), np.argmin(filled, axis=1)
    keep = finite & (chosen != rejected)
    return PairSelection(ids[keep], chosen[keep], rejected[keep], ids[~keep])


def pair_consistency(
    prompt_ids: Sequence, result: Consistency, *, strategy: str = "dyn"
) -> tuple[jax.Array, int]:
    """The C of each training pair `[B]` and how many pairs had none.

    As the official `data.py`, the mean is over the training pairs that have a C (not over every
    prompt in `result`). `strategy="dyn"` (`consistency_dyn`, sample level): the pair's own C,
    that mean for a pair without one; `"avg"` (`consistency_avg`): the mean for all pairs.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    lookup = {key: pos for pos, key in enumerate(np.asarray(result.prompt_ids).tolist())}
    rows = np.asarray([lookup.get(key, -1) for key in np.asarray(prompt_ids).tolist()], np.int64)
    found = rows >= 0
    if not found.any():
        raise ValueError("no id in `prompt_ids` has a consistency in `result`")
    own = jnp.asarray(result.consistency)[np.maximum(rows, 0)]
    mean = jnp.mean(own[found])
    missing = int((~found).sum())
    if strategy == "avg":
        return jnp.full(rows.shape, mean), missing
    return jnp.where(found, own, mean), missing


def cream_dpo(batch: PreferenceBatch, consistency: jax.Array, *, beta: float = 0.1) -> LossOutput:
    """C (-log s(u)) + (1 - C) (-log s(-u)), the consistency-regularised DPO loss.

    Wang et al. 2025 (arXiv:2410.12735), the regularised objective; official `sft_dpo_trainer.py`
    `training_step` (summed log-probs, per-pair losses averaged). `consistency`: a scalar
    (`consistency_avg`) or `[B]` per pair (`consistency_dyn`), in [0, 1]; C = 1 is DPO's sigmoid
    loss exactly. The loss in u is minimised at s(u) = C: a pair the two models disagree on
    (C < 1/2) pushes the margin negative. Rewards beta * (logp - logp_ref), metrics under TRL's
    names plus `cream/consistency_mean`.
    """
    check_beta(beta)
    c = jnp.asarray(consistency)
    batch_shape = tuple(batch.chosen_logps.shape[:-1])
    if c.ndim and tuple(c.shape) != batch_shape:
        raise ValueError(f"`consistency` must be a scalar or [B] {batch_shape}, got {c.shape}")
    v = np.asarray(c) if C.is_concrete(c) else None
    if v is not None and not (np.all(v >= 0) and np.all(v <= 1)):
        raise ValueError(f"`consistency` must lie in [0, 1], got [{v.min()}, {v.max()}]")
    s = pair_scores(batch)
    c = jax.lax.stop_gradient(c).astype(s.a.dtype)
    losses = sigmoid_loss(s, Hyper(beta, 1.0 - c, 0.0, None))
    return paired_output(
        "cream_dpo",
        losses,
        beta * s.a,
        beta * s.b,
        s.pc,
        s.pr,
        extra_metrics={"cream/consistency_mean": jnp.mean(jnp.broadcast_to(c, losses.shape))},
    )
