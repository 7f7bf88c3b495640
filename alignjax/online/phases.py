"""The phases of one iteration of an iterative method: sample K completions per prompt from the
policy, score them, build the pairs (`data_step`), and train. `Phases` holds the three parts that
touch a model (sampler, judge, trainer); `default_phases` binds the model-backed ones that
`run_iterative` (`alignjax.online.iterative`) uses unless it is handed others (tests hand it
tabular ones). The pair builders are in `alignjax.online.iteration_data`.

`data_step` scores with the config's reward functions (iterative DPO: `best_worst_pairs`; SPPO:
`sppo_pairs` on Bradley-Terry win rates of the rewards, or on a pairwise preference model's
matrix) or, for CREAM, with the models' own log-probs of the samples (`cream_rewards` over the
last three models of the lineage, `cream_pairs`); every sample's scores and the configured gold
reward go to the samples rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.online import iteration_data as D
from alignjax.online.iteration_data import Samples
from alignjax.online.rollout import Rollout, rollout, teacher_forced_logps
from alignjax.online.scorers import decode_completions, score

__all__ = ["Sampling", "Phases", "default_phases", "gold_scores", "evaluate", "data_step"]

EVAL_STREAM = 0x7FFFFFFF  # fold_in data of the evaluation key: the same for every policy


class Sampling(NamedTuple):
    """How a policy is sampled (`Phases.sample`)."""

    num_samples: int
    max_new_tokens: int
    temperature: float
    top_p: float | None
    prompt_length: int | None  # left-pad prompts to this; None: the call's longest prompt
    batch: int  # prompts per sampler call (one compiled shape)


@dataclasses.dataclass(frozen=True)
class Phases:
    """The parts of an iteration that touch a model. A policy is named by its source: an HF
    directory (a run's `export/merged`), or None for the base config's initial model.

    Attributes:
      sample: `(source, prompt_ids, prompts, key, Sampling) -> Samples`.
      logps: `(source, Samples) -> (sums [P, K], counts [P, K])`, each completion's summed
        log-prob under the policy and its token count (CREAM's judge).
      train: `(TrainConfig) -> dict`, one offline run (resumes from its own checkpoints).
    """

    sample: Callable[..., Samples]
    logps: Callable[..., tuple[np.ndarray, np.ndarray]]
    train: Callable[..., dict]


# ----------------------------------------------------------------------------- model phases


def _on_device(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))


def _encode(tokenizer, prompts: Sequence[str], length: int | None) -> tuple[np.ndarray, ...]:
    """Left-padded prompt ids and mask (BOS + text, as the trainer tokenizes a prompt)."""
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenizes to no token")
    width = max(len(ids) for ids in encoded) if length is None else length
    ids = np.full((len(prompts), width), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, row in enumerate(encoded):
        if len(row) > width:
            raise ValueError(f"prompt {i} has {len(row)} tokens > prompt_length {width}")
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def _rows(r: Rollout, rows: np.ndarray) -> Rollout:
    return dataclasses.replace(
        r,
        **{
            f: np.asarray(getattr(r, f))[rows]
            for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            + ("missing_eos", "logps", "prompt_index", "sample_index")
        },
    )


def default_phases(base, *, progress: bool = True, cache: int = 3) -> Phases:
    """The phases `run_iterative` uses by default for the base `TrainConfig` `base`: sampling
    with `online.rollout` (stop at the tokenizer's EOS; chunks of `Sampling.batch` prompts, the
    last one wrapping around to keep one shape, chunk c with key `fold_in(key, c)`),
    teacher-forced log-probs of the sampled tokens at temperature 1, and
    `alignjax.train.trainer.train`. Up to `cache` loaded policies are kept."""
    from flax import nnx

    from alignjax import models
    from alignjax.train import session as S
    from alignjax.train import trainer

    tokenizer = S.load_tokenizer(base)
    loaded: dict = {}
    forced = nnx.jit(teacher_forced_logps, static_argnames="temperature")

    def policy(source):
        if source not in loaded:
            if len(loaded) >= cache:
                loaded.pop(next(iter(loaded)))
            model = (
                S.build_model(base, tokenizer)
                if source is None
                else models.load_pretrained(Path(source))
            )
            loaded[source] = _on_device(model)
        return loaded[source]

    def sample(source, prompt_ids, prompts, key, s: Sampling) -> Samples:
        model = policy(source)
        ids, mask = _encode(tokenizer, prompts, s.prompt_length)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
        parts = []
        n = len(prompts)
        size = min(s.batch, n)
        for c, start in enumerate(range(0, n, size)):
            rows = np.arange(start, start + size) % n  # the last chunk wraps: one shape
            r = rollout(model, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]),
                        jax.random.fold_in(key, c), num_generations=s.num_samples,
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_p=s.top_p, stop_tokens=(eos,), pad_id=pad)  # fmt: skip
            take = min(size, n - start) * s.num_samples
            parts.append(_rows(r, np.arange(take)))
        arrays = {
            f: np.concatenate([np.asarray(getattr(p, f)) for p in parts])
            for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            + ("missing_eos", "logps", "sample_index")
        }
        arrays["prompt_index"] = np.repeat(np.arange(n, dtype=np.int32), s.num_samples)
        r = dataclasses.replace(parts[0], **arrays)
        texts = decode_completions(tokenizer, r.completion_ids, r.completion_mask)
        k = s.num_samples
        return Samples(
            list(prompt_ids),
            list(prompts),
            [texts[i * k : (i + 1) * k] for i in range(n)],
            arrays["missing_eos"].reshape(n, k),
            arrays["completion_mask"].sum(-1).reshape(n, k),
            r,
        )

    def logps(source, samples: Samples) -> tuple[np.ndarray, np.ndarray]:
        r = samples.rollout
        if r is None:
            raise ValueError("the default `logps` phase reads the samples' tokens (`rollout`)")
        model = policy(source)
        n = np.asarray(r.completion_ids).shape[0]
        size = min(n, 256)
        out = []
        for start in range(0, n, size):
            rows = np.arange(start, start + size) % n
            lp = np.asarray(forced(model, _rows(r, rows), temperature=1.0), np.float64)
            out.append(lp[: min(size, n - start)])
        shape = (len(samples.prompts), samples.num_samples)
        sums = np.concatenate(out).sum(-1).reshape(shape)
        return sums, np.asarray(r.completion_mask).sum(-1).reshape(shape).astype(np.float64)

    return Phases(sample, logps, lambda cfg: trainer.train(cfg, progress=progress))


# ----------------------------------------------------------------------------- data step


def _nan_to_none(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def _mean_se(values: np.ndarray) -> tuple:
    """Mean over all samples and the standard error of the per-prompt means (`[P, K]`)."""
    per_prompt = np.nanmean(values, axis=1) if values.size else values
    n = int(np.isfinite(per_prompt).sum())
    se = float(np.nanstd(per_prompt, ddof=1) / np.sqrt(n)) if n > 1 else None
    return _nan_to_none(float(np.nanmean(values))) if values.size else None, se


def _functions(value) -> tuple:
    return (value,) if callable(value) else tuple(value)


def gold_scores(cfg, samples: Samples) -> np.ndarray:
    """`[P, K]` the config's gold reward (`cfg.gold`, else `cfg.reward`) of every sample."""
    prompts, completions = samples.flat()
    fns = _functions(cfg.reward if cfg.gold is None else cfg.gold)
    shape = (len(samples.prompts), samples.num_samples)
    return np.asarray(score(fns, prompts, completions).total, np.float64).reshape(shape)


def evaluate(cfg, phases: Phases, source, table) -> dict:
    """The gold reward of a policy on held-out prompts `table` = (ids, texts): sampled with
    `cfg.sampling(evaluation=True)` and the key `fold_in(key(seed), EVAL_STREAM)`, the same
    for every policy; its mean and the standard error of the per-prompt means."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), EVAL_STREAM)
    s = phases.sample(source, *table, key, cfg.sampling(evaluation=True))
    mean, se = _mean_se(gold_scores(cfg, s))
    out = dict(gold_reward=mean, gold_reward_se=se, samples=len(s.prompts) * s.num_samples,
               finished=float(1.0 - np.mean(s.missing_eos)))  # fmt: skip
    if s.lengths is not None:
        out["mean_length"] = float(np.mean(s.lengths))
    return out


def data_step(cfg, phases: Phases, lineage: list, table, key) -> tuple[list, dict, list]:
    """Sample K completions per prompt of `table` = (ids, texts) from the last policy of
    `lineage` (sources, oldest first: [M0,] pi_0, ..., pi_t) with `key`, score them and build
    the pairs of `cfg.method`: returns (pair rows, counts, sample rows)."""
    s = phases.sample(lineage[-1], *table, key, cfg.sampling())
    p, k = len(s.prompts), s.num_samples
    gold = gold_scores(cfg, s)
    columns: dict = {"gold": gold}
    if cfg.method in ("iterative_dpo", "sppo"):
        prompts, completions = s.flat()
        penalty = cfg.missing_eos_penalty
        scores = score(
            _functions(cfg.reward),
            prompts,
            completions,
            weights=cfg.reward_weights,
            missing_eos_penalty=penalty,
            missing_eos=None if penalty is None else np.ravel(s.missing_eos),
        )
        reward = np.asarray(scores.total, np.float64).reshape(p, k)
        columns["reward"] = reward
        if cfg.method == "iterative_dpo":
            rows, stats = D.best_worst_pairs(s, reward)
        elif cfg.preference is None:
            rows, stats = D.sppo_pairs(s, reward, tau=cfg.tau)
        else:
            win = cfg.preference(list(s.prompts), [list(c) for c in s.completions])
            rows, stats = D.sppo_pairs(s, None, win_rates=win)
        stats["reward_mean"] = _nan_to_none(float(np.nanmean(reward)))
    else:
        # the judges: pi_t, and the previous two models of the lineage where there are
        logps = [phases.logps(src, s) for src in lineage[-3:]]
        current, previous = D.cream_rewards(*reversed(logps))
        columns["current_reward"] = current
        if previous is not None:
            columns["previous_reward"] = previous
        rows, stats = D.cream_pairs(s, current, previous, strategy=cfg.cream_strategy)
    gold_mean, gold_se = _mean_se(gold)
    stats.update(prompts=p, samples=p * k, gold_mean=gold_mean, gold_se=gold_se,
                 missing_eos=float(np.mean(s.missing_eos)))  # fmt: skip
    if s.lengths is not None:
        stats["mean_length"] = float(np.mean(s.lengths))
    sample_rows = [
        dict(prompt_id=s.prompt_ids[i], prompt=s.prompts[i], sample=j,
             completion=s.completions[i][j], missing_eos=bool(s.missing_eos[i, j]),
             **{name: _nan_to_none(v[i, j]) for name, v in columns.items()})
        for i in range(p) for j in range(k)
    ]  # fmt: skip
    return rows, stats, sample_rows
