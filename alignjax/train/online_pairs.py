"""The rollouts of XPO and Nash-MD (`task: online`, `online.method` "xpo" / "nash_md"): each
prompt's completion from the policy and one from an opponent, in the two halves of Online DPO's
layout (`[policy samples y; opponent samples y']`, specs/online.md sections 1.2-1.3).

- XPO: the opponent is the frozen reference (`reference.path`, the initial policy, or the
  policy with its adapters disabled), sampled with the same settings as the policy. The step's
  batch holds both halves: the DPO pair is built from y and y', and the exploration bonus reads
  the policy's log-probs of y'.
- Nash-MD: the opponent samples from the geometric mixture of the policy and the reference
  (`models.generate_mixture`, c = `online.mixture_coef`), token by token with a KV cache per
  model. Only y is trained on: the step's batch holds the policy's half, each row carrying its
  opponent's score and EOS flag (`OnlineBatch.opponent_rewards`), so the step's forward and
  backward run on P rows, not 2P.

The two halves draw from `split(key)`'s two keys, so a resumed run samples the same pairs. The
reward metrics (`reward`, `rewards/<fn>/*`) and the `completions/*` lengths describe the policy's
samples; TRL's `objective/*_scores`, `val/*_contain_eos_token` and `rewards/*` compare the two
halves in the loss's metrics.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from alignjax.losses.advantages import nanstd
from alignjax.online.rollout import rollout
from alignjax.peft import adapters_disabled
from alignjax.train.distributed import fetch
from alignjax.train.state import model_of

__all__ = ["OPPONENT_METHODS", "reference_model", "sample_pairs", "pair_fields"]

OPPONENT_METHODS = ("xpo", "nash_md")
SAMPLE_FIELDS = ("completion_ids", "completion_mask", "missing_eos", "logps")


@contextlib.contextmanager
def reference_model(state, ref_params, *, adapters_off: bool):
    """The frozen reference as a model: the policy's graph with `ref_params`, or a fresh copy of
    the policy (sharing its arrays) with its adapters disabled."""
    if adapters_off:
        with adapters_disabled(model_of(state)) as base:
            yield base
    else:
        yield model_of(state, ref_params)


def sample_pairs(phase, state, ids, mask, key, settings: dict) -> tuple[np.ndarray, ...]:
    """Host `(completion_ids, completion_mask, missing_eos, logps)` of 2P rows: the policy's
    completion of each of the P prompts (`ids[:P]` = `ids[P:]`, left-padded host arrays), then
    the opponent's (`phase.o.method`). The opponent rows' log-probs are the opponent's own
    (reference or mixture) at the sampling temperature."""
    p = ids.shape[0] // 2
    k_policy, k_opponent = jax.random.split(key)
    halves = []
    with reference_model(state, phase.ref_params, adapters_off=phase.adapters_off) as ref:
        for rows, k, side in ((slice(0, p), k_policy, "policy"), (slice(p, None), k_opponent,
                                                                   phase.o.method)):  # fmt: skip
            model, extra = model_of(state), {}
            if side == "xpo":
                model = ref
            elif side == "nash_md":
                extra = dict(mixture_with=ref, mixture_coef=phase.o.mixture_coef)
            r = rollout(model, *phase._put((ids[rows], mask[rows])), k, num_generations=1,
                        **settings, **extra)  # fmt: skip
            halves.append(fetch(tuple(getattr(r, f) for f in SAMPLE_FIELDS)))
    return tuple(np.concatenate([np.asarray(a), np.asarray(b)]) for a, b in zip(*halves))


def pair_fields(method: str, s: dict, scores, reward_weights=None) -> tuple[np.ndarray, dict, dict]:
    """`(rows, fields, metrics)` of a sampled pair batch: which of the 2P rows the step trains
    on (XPO: all; Nash-MD: the policy's), the opponent's score and EOS flag of each (Nash-MD),
    and the rollout's metrics on the policy's samples (TRL's names, as `OnlinePhase`)."""
    import alignjax.losses as L

    n = len(s["missing_eos"])
    p = n // 2
    policy_scores = scores.per_function[:p]
    names = [f if f not in scores.names[:i] else f"{f}_{i}" for i, f in
             enumerate(scores.names)]  # fmt: skip
    metrics = L.reward_metrics(policy_scores, reward_weights, names)
    total = scores.total[:p]
    metrics.update(reward=np.nanmean(total), reward_std=nanstd(total))
    fields = {}
    rows = np.arange(n)
    if method == "nash_md":
        rows = np.arange(p)
        fields = dict(opponent_rewards=scores.total[p:].astype(np.float32),
                      opponent_contains_eos=~s["missing_eos"][p:])  # fmt: skip
    return rows, fields, {k: float(v) for k, v in metrics.items()}
