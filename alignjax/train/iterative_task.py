"""`task: online` with an iterative method (iterative_dpo, sppo, cream): the run config turned
into `alignjax.online.run_iterative`'s arguments, and the run.

    alignjax train task=online online.method=sppo data.train=prompts.jsonl \
        online.iterations=3 steps=100 online.beta=0.001 init_from=runs/sft

is `run_iterative(iterative_config(cfg), base_config(cfg), prompts, cfg.out_dir,
eval_prompts=...)` with

* `iterative_config`: the loop, from the `online:` keys (`online_config` module docstring;
  None keeps `IterativeConfig`'s default, the recipe's K / temperature / top_p included), the
  reward names resolved to functions (`online.get_reward`) and `seed` as the sampling seed;
* `base_config`: every iteration's offline run, the run config itself as `task: paired`:
  `steps` are the steps OF EACH ITERATION (T iterations train T x steps in all), `data.
  batch_size` counts pairs, and the model / `init_from` (pi_0), optimizer, reference, PEFT, mesh,
  checkpoint and `loss` keys apply to every iteration; the loss is the method's
  (`iterative.DEFAULTS`) unless `loss.name` / `loss.combine` is given, its beta is
  `online.beta` (None: the paired task's default). `data.eval` / `data.columns` describe the
  prompt sets, so the per-iteration runs get none (they evaluate nothing: the loop evaluates);
* the prompts (`prompt_sets`): the prompt column of `data.train` (`data.columns.prompt` names
  another), with each row's `prompt_id` when the dataset has that column; the held-out prompts
  from `data.eval`: a source, None (no evaluation), or "auto", as for the other tasks: the
  shipped test prompts for `shipped:train`, else `data.eval_fraction` of the prompts (drawn
  with `data.seed`, removed from training) when there are at least 20, else none.

The run directory is `run_iterative`'s (`iterative.json`, `iter_<t>/`, `summary.json`), and
`train` returns its summary. Rerunning the same command resumes (finished iterations are
skipped, a killed one resumes from its pairs file and checkpoints); other settings on the same
`out_dir` are an error naming the keys. The final policy is `summary["policy"]`, an HF
directory (`init_from` takes it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from alignjax.train import config as cfg_lib
from alignjax.train.online_config import ITERATIVE_METHODS, OnlineConfig

__all__ = ["iterative_config", "base_config", "prompt_sets", "train_iterative"]

log = logging.getLogger(__name__)

# `IterativeConfig` fields read from the `online:` key of the same name
SAME_NAME = ("iterations", "temperature", "top_p", "max_new_tokens", "prompt_length",
             "rollout_batch", "disjoint_prompts", "reward_weights", "missing_eos_penalty", "tau",
             "cream_base", "cream_strategy", "eval_samples_per_prompt",
             "eval_temperature")  # fmt: skip


def _check_method(cfg) -> None:
    if cfg.task != "online" or cfg.online.method not in ITERATIVE_METHODS:
        raise ValueError(f"an iterative run needs task=online and online.method in "
                         f"{list(ITERATIVE_METHODS)}, got task={cfg.task!r}, "
                         f"online.method={cfg.online.method!r}")  # fmt: skip


def iterative_config(cfg: cfg_lib.TrainConfig):
    """The loop's `IterativeConfig` of a run config (module docstring)."""
    from alignjax.online.iterative import IterativeConfig
    from alignjax.online.rewards import get_reward

    _check_method(cfg)
    o = cfg.online
    given = {name: getattr(o, name) for name in SAME_NAME}
    given.update(samples_per_prompt=o.num_generations, seed=cfg.seed,
                 reward=tuple(get_reward(n) for n in o.rewards),
                 gold=None if o.gold_rewards is None else
                 tuple(get_reward(n) for n in o.gold_rewards))  # fmt: skip
    return IterativeConfig(method=o.method, **{k: v for k, v in given.items() if v is not None})


def base_config(cfg: cfg_lib.TrainConfig) -> cfg_lib.TrainConfig:
    """Every iteration's `task: paired` template (module docstring; `iterative.iteration_config`
    sets its data, model source, reference and output per iteration)."""
    _check_method(cfg)
    return dataclasses.replace(
        cfg,
        task="paired",
        online=OnlineConfig(),
        loss=dataclasses.replace(cfg.loss, beta=cfg.online.beta),
        data=dataclasses.replace(cfg.data, eval=None, columns={}, format=None),
    )


def _prompts(source: str, cfg, key: str) -> list:
    """The prompt column of `source` (str rows, or {"prompt", "prompt_id"} mappings)."""
    from alignjax.train.data import raw_split

    try:
        raw = raw_split(source, cfg)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"`{key}` ({source!r}): {err}") from err
    column = dict(cfg.data.columns).get("prompt", "prompt")
    if column not in raw.column_names:
        raise ValueError(f"`{key}` ({source!r}) has no prompt column {column!r} (columns: "
                         f"{raw.column_names}; data.columns.prompt names another)")  # fmt: skip
    texts = raw[column]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"`{key}` ({source!r}) row {i}: {cfg.online.method} samples from "
                             f"text prompts, got {type(text).__name__} (conversational "
                             "prompts are not supported)")  # fmt: skip
    if "prompt_id" not in raw.column_names:
        return list(texts)
    return [{"prompt": t, "prompt_id": i} for t, i in zip(texts, raw["prompt_id"])]


def prompt_sets(cfg: cfg_lib.TrainConfig) -> tuple[list, list | None]:
    """(training prompts, held-out prompts or None) of a run config (module docstring)."""
    from alignjax.train.data import MIN_HOLD_OUT_ROWS, hold_out_rows

    d = cfg.data
    prompts = _prompts(d.train, cfg, "data.train")
    source = "shipped:test" if d.eval == "auto" and d.train == "shipped:train" else d.eval
    if source is None:
        return prompts, None
    if source != "auto":
        return prompts, _prompts(source, cfg, "data.eval")
    if len(prompts) < MIN_HOLD_OUT_ROWS:
        log.warning("data.eval=auto: %s has %d prompts, too few to hold out a slice; no "
                    "evaluation (pass data.eval=<source>)", d.train, len(prompts))  # fmt: skip
        return prompts, None
    keep, held = hold_out_rows(len(prompts), d.eval_fraction, d.seed)
    log.warning("data.eval=auto: evaluating on %d of the %d prompts of %s, held out of training "
                "(data.eval_fraction=%g, data.seed=%d; data.eval=null for no evaluation)",
                len(held), len(prompts), d.train, d.eval_fraction, d.seed)  # fmt: skip
    return [prompts[i] for i in keep], [prompts[i] for i in held]


def train_iterative(cfg: cfg_lib.TrainConfig, *, progress: bool = True,
                    hooks: Sequence = ()) -> dict:  # fmt: skip
    """Run (or resume) the iterative method of `cfg` into `cfg.out_dir`; returns
    `run_iterative`'s summary. `hooks` run in every iteration's training run."""
    import jax

    from alignjax.online import phases as PH
    from alignjax.online.iterative import run_iterative

    if jax.process_count() > 1:
        raise ValueError(f"online.method={cfg.online.method!r} runs in one process (its "
                         "sampler and files are not distributed)")  # fmt: skip
    it, base = iterative_config(cfg), base_config(cfg)
    prompts, eval_prompts = prompt_sets(cfg)
    if it.disjoint_prompts and len(prompts) < it.iterations:
        raise ValueError(f"`online.iterations`={it.iterations} disjoint prompt splits need at "
                         f"least as many prompts; `data.train` has {len(prompts)} (set "
                         "online.disjoint_prompts=false to reuse them)")  # fmt: skip
    phases = None
    if hooks:
        from alignjax.train import trainer

        phases = dataclasses.replace(
            PH.default_phases(base, progress=progress),
            train=lambda c: trainer.train(c, progress=progress, hooks=hooks),
        )
    return run_iterative(it, base, prompts, cfg.out_dir, eval_prompts=eval_prompts,
                         phases=phases, progress=progress)  # fmt: skip
