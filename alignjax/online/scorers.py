"""Scorers: reward functions over decoded completions, their weighted sum, Bradley-Terry win rates
from preference-model scores, and chosen/rejected selection (specs/online.md sections 1.1, 2, 3.2).

Reward functions have TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`:
one value per completion, None for "no reward for this row" (e.g. a math checker on a
non-math prompt). `score` applies every function to the N (prompt, completion) pairs and returns
the `[N, F]` matrix (None -> NaN) and the weighted sum `nansum_k w_k r_k`; a row where every
function returned None has total NaN (TRL GRPO marks such rows unscorable; TRL Online DPO's plain
`nansum` would give 0, which silently scores them as neutral). `missing_eos_penalty` is subtracted
from the total where the completion has no stop token (TRL Online DPO). A NaN returned instead of
None is an error, as is any non-finite value: None is the one way to say "no reward".

Self-play (SPPO, `compute_prob.py`): K scored samples per prompt -> `P_ij = 1 / (1 + exp(s_j -
s_i))` (`bradley_terry_win_rates`), `P(y_i > pi) = mean_j P_ij` with the self term 1/2 included
(`win_rate_vs_policy`), chosen = argmax, rejected = argmin with NumPy's first-index tie rule
(`max_min_pairs`; all K equal gives chosen == rejected == 0, as the official pipeline). Online
DPO's two-sample rule is `first_second_pairs` (ties: the first sample is chosen).

Example:
    >>> import numpy as np
    >>> from alignjax import online
    >>> def length(prompts, completions, **kw):
    ...     return [float(len(c)) for c in completions]
    >>> def polite(prompts, completions, **kw):
    ...     return [1.0 if "please" in c else None for c in completions]
    >>> s = online.score([length, polite], ["q", "q"], ["please", "no"], weights=[0.5, 2.0],
    ...                  missing_eos=[False, True], missing_eos_penalty=1.0)
    >>> s.per_function.tolist(), s.total.tolist()
    ([[6.0, 1.0], [2.0, nan]], [5.0, 0.0])
    >>> p = online.bradley_terry_win_rates(np.array([[0.0, 1.0, 1.0]]))
    >>> np.asarray(online.win_rate_vs_policy(p), np.float64).round(3).tolist()
    [[0.346, 0.577, 0.577]]
    >>> online.max_min_pairs(np.array([[0.0, 1.0, 1.0]]))  # ties: first index
    PairIndex(chosen=[1], rejected=[0])
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.data.synthetic import sentiment_score
from alignjax.ops import _checks as C

__all__ = [
    "Scores",
    "PairIndex",
    "reward_function_name",
    "score",
    "sentiment_reward",
    "decode_completions",
    "decode_prompts",
    "bradley_terry_win_rates",
    "win_rate_vs_policy",
    "max_min_pairs",
    "first_second_pairs",
]

RewardFunction = Callable[..., Sequence[Any]]
_RESERVED = ("prompts", "completions")


class Scores(NamedTuple):
    """What `score` returns (host NumPy arrays, float32 as TRL's reward tensors)."""

    per_function: np.ndarray  # [N, F] rewards, NaN where a function returned None
    total: np.ndarray  # [N] nansum_k w_k r_k - penalty * missing_eos; NaN where all None
    names: tuple[str, ...]  # the F function names, in order


class PairIndex(NamedTuple):
    """Chosen / rejected indices, one per prompt (sample indices or row indices)."""

    chosen: Any
    rejected: Any

    def __repr__(self) -> str:
        return f"PairIndex(chosen={np.asarray(self.chosen).tolist()}, " + (
            f"rejected={np.asarray(self.rejected).tolist()})"
        )


def reward_function_name(fn) -> str:
    """A function's name as logs and errors show it (`__name__`, through `functools.partial`)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _as_reward(value, name: str, row: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"reward function {name!r} returned {type(value).__name__} {value!r} at row {row}; "
            "expected a real number or None"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"reward function {name!r} returned {value} at row {row}; rewards must be finite "
            "(return None for 'no reward')"
        )
    return value


def _check_columns(columns, n: int) -> dict:
    columns = dict(columns or {})
    for key, values in columns.items():
        if key in _RESERVED:
            raise ValueError(f"`columns` may not contain {key!r}: it is passed positionally")
        if not hasattr(values, "__len__") or len(values) != n:
            got = len(values) if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(f"`columns[{key!r}]` must have {n} entries (one per row), got {got}")
    return columns


def _check_weights(weights, f: int) -> np.ndarray:
    if weights is None:
        return np.ones(f, np.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (f,):
        raise ValueError(f"`weights` must have one entry per reward function ({f}), got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"`weights` must be finite, got {w.tolist()}")
    return w.astype(np.float32)


def score(
    reward_fns: RewardFunction | Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    missing_eos: Any = None,
    missing_eos_penalty: float | None = None,
) -> Scores:
    """Apply every reward function to the N (prompt, completion) pairs and combine them.

    Args:
      reward_fns: one callable or a list, each `fn(prompts, completions, **columns)` returning
        N values (real numbers or None).
      prompts, completions: N entries each (text, or chat messages as TRL passes them): the
        prompts repeated per row (`[prompts[i] for i in rollout.prompt_index]`).
      weights: one weight per function (TRL's `reward_weights`); None: all 1.
      columns: extra dataset columns, each with N entries, passed as keyword arguments.
      completion_ids: the N completions' token ids, passed as `completion_ids=` (as TRL does)
        when given.
      missing_eos: `[N]` bool, True where the completion has no stop token (`Rollout`).
      missing_eos_penalty: subtracted from `total` where `missing_eos` (None: no penalty).

    Returns:
      `Scores(per_function [N, F], total [N], names)`.

    Raises:
      ValueError: a function returns the wrong number of values (named, with both counts) or a
        non-finite value (named, with the row); `prompts` / `completions` / `columns` /
        `completion_ids` / `missing_eos` / `weights` of the wrong size; a penalty without
        `missing_eos`.
      TypeError: a function returns a non-numeric value (named, with the row) or no sequence.
    """
    fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
    if not fns:
        raise ValueError("`reward_fns` is empty: give at least one reward function")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"`prompts` has {len(prompts)} entries but `completions` has {n}")
    w = _check_weights(weights, len(fns))
    kwargs = _check_columns(columns, n)
    if completion_ids is not None:
        if len(completion_ids) != n:
            raise ValueError(f"`completion_ids` must have {n} entries, got {len(completion_ids)}")
        kwargs["completion_ids"] = [[int(t) for t in ids] for ids in completion_ids]
    if missing_eos_penalty is not None:
        if missing_eos is None:
            raise ValueError("`missing_eos_penalty` needs `missing_eos` (the rollout's flags)")
        if not math.isfinite(float(missing_eos_penalty)):
            raise ValueError(f"`missing_eos_penalty` must be finite, got {missing_eos_penalty}")
    if missing_eos is not None:
        missing_eos = np.asarray(missing_eos)
        if missing_eos.shape != (n,):
            raise ValueError(f"`missing_eos` must have shape ({n},), got {missing_eos.shape}")
        missing_eos = missing_eos.astype(bool)

    names = tuple(reward_function_name(fn) for fn in fns)
    per_function = np.empty((n, len(fns)), np.float32)
    for k, (fn, name) in enumerate(zip(fns, names)):
        out = fn(list(prompts), list(completions), **kwargs)
        if isinstance(out, str | bytes) or not hasattr(out, "__len__"):
            raise TypeError(
                f"reward function {name!r} returned {type(out).__name__}; expected a list of "
                f"{n} rewards"
            )
        if len(out) != n:
            raise ValueError(
                f"reward function {name!r} returned {len(out)} rewards, but {n} were expected "
                "(one per prompt-completion pair)"
            )
        per_function[:, k] = [_as_reward(v, name, row) for row, v in enumerate(out)]

    unscorable = np.isnan(per_function).all(1)
    total = np.nansum(per_function * w[None, :], axis=1).astype(np.float32)
    total[unscorable] = np.nan
    if missing_eos_penalty is not None:
        total = total - np.float32(missing_eos_penalty) * missing_eos.astype(np.float32)
    return Scores(per_function, total, names)


def _completion_text(completion, row: int) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(
        isinstance(m, Mapping) and "content" in m for m in completion
    ):
        return "".join(str(m["content"]) for m in completion)
    raise TypeError(
        f"completion {row} is {type(completion).__name__}; expected text or chat messages"
    )


def sentiment_reward(prompts, completions, **columns) -> list[float]:
    """The shipped gold reward: `data.synthetic.sentiment_score` of each completion's text (the
    lexicon balance, # positive - # negative words), ignoring the prompt. Conversational
    completions (lists of messages) are scored on their contents."""
    return [float(sentiment_score(_completion_text(c, i))) for i, c in enumerate(completions)]


def _rows(ids, mask, name: str) -> list[list[int]]:
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"`{name}` must be [N, T], got shape {ids.shape}")
    if mask is None:
        return [list(map(int, row)) for row in ids]
    mask = np.asarray(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"the mask of `{name}` must have shape {ids.shape}, got {mask.shape}")
    return [list(map(int, row[m != 0])) for row, m in zip(ids, mask)]


def decode_completions(
    tokenizer,
    completion_ids,
    completion_mask=None,
    *,
    stop_tokens: Sequence[int] | None = None,
    skip_special_tokens: bool = True,
    conversational: bool = False,
) -> list:
    """Completion token ids `[N, C]` -> N texts, each ending at its first stop token.

    With `completion_mask` (a `Rollout`'s) the masked tokens are decoded; without it every row
    is cut after its first token in `stop_tokens` (default: the tokenizer's EOS). The stop token
    itself is dropped with `skip_special_tokens` (TRL decodes completions that way).
    `conversational=True` wraps each text as `[{"role": "assistant", "content": text}]`, the
    form TRL hands reward functions for chat prompts.
    """
    rows = _rows(completion_ids, completion_mask, "completion_ids")
    if completion_mask is None:
        stops = set((tokenizer.eos_token_id,) if stop_tokens is None else stop_tokens)
        cut = []
        for row in rows:
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            cut.append(row[:end])
        rows = cut
    texts = tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
    if conversational:
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def decode_prompts(
    tokenizer, prompt_ids, prompt_mask=None, *, skip_special_tokens: bool = True
) -> list[str]:
    """Left-padded prompt ids `[N, P]` (and mask) -> N texts (padding dropped)."""
    rows = _rows(prompt_ids, prompt_mask, "prompt_ids")
    return list(tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens))


def _scores_matrix(scores, name: str = "scores") -> jax.Array:
    scores = C.as_array(name, scores)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"`{name}` must be [P, K] (K samples per prompt), got {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    if C.is_concrete(scores):
        bad = np.flatnonzero(~np.isfinite(np.asarray(scores)).all(1))
        if bad.size:
            raise ValueError(f"`{name}` row {int(bad[0])} is not finite: {scores[bad[0]]}")
    return scores


def bradley_terry_win_rates(scores) -> jax.Array:
    """`[P, K]` scores -> `[P, K, K]` win rates `P[p, i, j] = 1 / (1 + exp(s_j - s_i))`.

    SPPO's `compute_prob.py` on PairRM scores (Wu et al. 2024, arXiv:2405.00675): the diagonal
    is 1/2 and `P_ij + P_ji = 1`. Computed as `sigmoid(s_i - s_j)` (no overflow for large gaps).
    """
    s = _scores_matrix(scores)
    return jax.nn.sigmoid(s[:, :, None] - s[:, None, :])


def win_rate_vs_policy(win_rates) -> jax.Array:
    """`[P, K, K]` win rates -> `[P, K]` `P(y_i > pi) = mean_j P_ij` over all K samples, the
    sample itself included (its 1/2 term), as `compute_prob.py`'s `sum(axis=1) / K`."""
    p = C.as_array("win_rates", win_rates)
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"`win_rates` must be [P, K, K], got {p.shape}")
    return jnp.mean(p, axis=-1)


def max_min_pairs(scores) -> PairIndex:
    """Per prompt, chosen = argmax and rejected = argmin of `[P, K]` scores (sample indices).

    Ties go to the first index, as NumPy's argmax / argmin in the official SPPO and RLHFlow
    "max_min" pipelines: when all K scores are equal, chosen == rejected == 0 (not skipped).
    """
    s = _scores_matrix(scores)
    return PairIndex(jnp.argmax(s, axis=1), jnp.argmin(s, axis=1))


def first_second_pairs(rewards) -> PairIndex:
    """TRL Online DPO's pairing on `[2B]` rewards in the "halves" layout: prompt b's samples are
    rows b and B + b; the first is chosen when `r[b] >= r[B + b]` (ties: the first). Returns
    row indices `[B]` (`chosen`, `rejected`)."""
    r = C.as_array("rewards", rewards)
    if r.ndim != 1 or r.shape[0] % 2:
        raise ValueError(f"`rewards` must be [2B] (two halves), got shape {r.shape}")
    if C.is_concrete(r):
        bad = np.flatnonzero(np.isnan(np.asarray(r)))
        if bad.size:
            raise ValueError(
                f"`rewards` row {int(bad[0])} is NaN (every reward function returned None)"
            )
    b = r.shape[0] // 2
    first_wins = r[:b] >= r[b:]
    rows = jnp.arange(b)
    return PairIndex(rows + b * (~first_wins), rows + b * first_wins)
