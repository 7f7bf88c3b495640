"""Iterative preference methods as a driver over phases: iterative DPO (the RLHFlow recipe),
SPPO's self-play loop and CREAM's self-rewarding loop (specs/online.md sections 1.4, 2, 4).

Iteration t (t = 0 .. iterations - 1) starts from the policy pi_t (pi_0: the base config's
model; pi_t: iteration t - 1's trained policy) and

1. samples K completions per prompt from pi_t (`online.rollout`, key `fold_in(key(seed), t)`),
2. scores them: the reward functions (iterative DPO: best vs worst; SPPO: Bradley-Terry win
   rates P_ij = sigmoid((s_i - s_j) / tau) over the K samples, what `compute_prob.py` does with
   PairRM scores, or a pairwise preference model's matrix), or, for CREAM, the models' own
   DPO implicit rewards (the current ranking by log pi_t - log pi_{t-1}, the previous by
   log pi_{t-1} - log pi_{t-2}; `iteration_data.cream_rewards`),
3. writes the pairs file (`iteration_data.best_worst_pairs`, `sppo_pairs`, `cream_pairs`;
   `phases.data_step` runs steps 1-3),
4. trains offline with `alignjax.train` from pi_t (`init_from`) against the frozen reference
   pi_t (`reference.path` = pi_t's export): the reference moves every iteration, and the
   trained policy pi_{t+1} starts the next iteration.

    it = IterativeConfig(method="sppo", iterations=3, samples_per_prompt=5)
    base = TrainConfig(init_from="runs/sft", loss=LossConfig(beta=0.001), steps=200, ...)
    summary = run_iterative(it, base, prompts, "runs/sppo", eval_prompts=heldout)

`out_dir` holds `iterative.json` (the configs; a rerun with other settings is an error), one
`iter_<t>/` per iteration (`samples.jsonl`: every completion with its scores; `data.json`: the
data step's counts; `pairs.jsonl`: the training file; `train_config.yaml`; `run/`: the
trainer's run directory; `summary.json`: written last, it marks the iteration finished) and
`summary.json`. A rerun skips finished iterations, reuses a written pairs file, and the trainer
resumes a killed run from its checkpoints; the summary is read back from the files, so a rerun
of a finished loop returns the same summary.

CREAM's judge is the policy itself, as in the official code: summed log-probs of the sampled
tokens under each model (teacher-forced, temperature 1). CREAM's M0 (the model pi_0 was
fine-tuned from) is `cream_base`; without it the first iteration ranks by pi_0's
length-normalised log-likelihood and trains with C = 1, and pi_0 then plays M0's part (the
previous ranking of iteration 1). Deliberate differences from the recipes: the sampler is ours
(one rollout of K per prompt instead of K vLLM passes with seeds 50 p); a pair with an empty
completion is dropped (counted), since the trainer takes no empty text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

from alignjax.online import phases as PH
from alignjax.online.iteration_data import CREAM_STRATEGIES
from alignjax.online.scorers import reward_function_name, sentiment_reward

__all__ = [
    "METHODS",
    "DEFAULTS",
    "IterativeConfig",
    "prompt_splits",
    "policy_source",
    "iteration_config",
    "run_iterative",
]

log = logging.getLogger(__name__)

METHODS = ("iterative_dpo", "sppo", "cream")
CREAM_LOSS_MODULE = "alignjax.online.cream_loss"


class MethodDefaults(NamedTuple):
    samples_per_prompt: int
    temperature: float
    top_p: float | None
    loss: str


DEFAULTS = {
    # RLHFlow run_loop.sh / gen_hf2.py: K = 8, temperature 1.0, top_p 1.0; DPO "sigmoid"
    "iterative_dpo": MethodDefaults(8, 1.0, None, "sigmoid"),
    # uclaml/SPPO generate.py: --pairs 5, temperature 0.7, top_p 0.9; loss_type sppo
    "sppo": MethodDefaults(5, 0.7, 0.9, "sppo"),
    # Raibows/CREAM GenSamplingConfig: gen_n 5, temperature 0.8, top_p 0.95
    "cream": MethodDefaults(5, 0.8, 0.95, "cream"),
}


def _functions(value, name: str) -> tuple:
    fns = (value,) if callable(value) else tuple(value)
    if not fns or not all(callable(f) for f in fns):
        raise ValueError(f"`{name}` must be a reward function or a non-empty list of them")
    return fns


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
    """An iterative method's loop; the per-iteration training is the base `TrainConfig`.

    Attributes:
      method: "iterative_dpo", "sppo" or "cream".
      iterations: how many generate -> score -> train rounds.
      samples_per_prompt: K (None: the recipe's, `DEFAULTS`: 8, 5, 5).
      temperature, top_p: sampling (None: the recipe's; top_p None or 1: no filtering).
      max_new_tokens, prompt_length: completion budget; prompts left-padded to
        `prompt_length` (None: the longest prompt of each sampler call; a fixed length
        compiles the sampler once for every iteration and the evaluation).
      rollout_batch: prompts per sampler call.
      disjoint_prompts: iteration t uses the t-th of `iterations` contiguous parts of the
        prompts (the recipes' per-iteration prompt splits: no prompt is reused); False: every
        iteration samples all prompts.
      reward, reward_weights, missing_eos_penalty: the scorer of iterative DPO and SPPO
        (`online.score`: functions `(prompts, completions, **kw) -> list[float | None]`).
      preference: SPPO's pairwise preference model, `(prompts [P], completions [P][K]) ->
        [P, K, K]` P(y_i > y_j); None: Bradley-Terry on the reward, sigmoid((s_i - s_j) / tau).
      tau: that Bradley-Terry temperature (1: `compute_prob.py`).
      cream_base: CREAM's M0 (an HF directory or a run directory), the model pi_0 was trained
        from; None: see the module docstring.
      cream_strategy: "avg" (set-level C, the README's), "dyn" (per pair) or "none" (C = 1).
      gold: reward functions reported (never trained on; None: `reward`).
      eval_samples_per_prompt, eval_temperature: sampling of the held-out evaluation.
      seed: the sampling keys (`fold_in(key(seed), t)`; evaluation: `phases.EVAL_STREAM`).
    """

    method: str = "iterative_dpo"
    iterations: int = 3
    samples_per_prompt: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int = 64
    prompt_length: int | None = None
    rollout_batch: int = 64
    disjoint_prompts: bool = True
    reward: Any = (sentiment_reward,)
    reward_weights: tuple[float, ...] | None = None
    missing_eos_penalty: float | None = None
    preference: Callable | None = None
    tau: float = 1.0
    cream_base: str | None = None
    cream_strategy: str = "avg"
    gold: Any = None
    eval_samples_per_prompt: int = 4
    eval_temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}")
        for name, low in (("iterations", 1), ("max_new_tokens", 1), ("rollout_batch", 1),
                          ("eval_samples_per_prompt", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        k = self.samples_per_prompt
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
            raise ValueError(f"`samples_per_prompt` must be an int >= 2 (a pair), got {k!r}")
        for name in ("temperature", "eval_temperature", "tau"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.cream_strategy not in CREAM_STRATEGIES:
            raise ValueError(f"`cream_strategy` must be one of {CREAM_STRATEGIES}, "
                             f"got {self.cream_strategy!r}")  # fmt: skip
        _functions(self.reward, "reward")
        if self.gold is not None:
            _functions(self.gold, "gold")
        if self.preference is not None and not callable(self.preference):
            raise ValueError("`preference` must be a callable (prompts, completions) -> [P, K, K]")

    def resolved(self) -> IterativeConfig:
        """The config with the recipe's defaults filled in (`DEFAULTS`)."""
        d = DEFAULTS[self.method]
        top_p = d.top_p if self.top_p is None else self.top_p
        return dataclasses.replace(
            self,
            samples_per_prompt=self.samples_per_prompt or d.samples_per_prompt,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=None if top_p == 1.0 else top_p,
        )

    def sampling(self, *, evaluation: bool = False) -> PH.Sampling:
        r = self.resolved()
        if evaluation:
            return PH.Sampling(r.eval_samples_per_prompt, r.max_new_tokens, r.eval_temperature,
                               None, r.prompt_length, r.rollout_batch)  # fmt: skip
        return PH.Sampling(r.samples_per_prompt, r.max_new_tokens, r.temperature, r.top_p,
                           r.prompt_length, r.rollout_batch)  # fmt: skip

    def describe(self) -> dict:
        """JSON-able settings (functions by name), what `iterative.json` records."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self.resolved(), f.name)
            if f.name in ("reward", "gold") and v is not None:
                v = [reward_function_name(fn) for fn in _functions(v, f.name)]
            elif callable(v):
                v = reward_function_name(v)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ----------------------------------------------------------------------------- prompts, configs


def _prompt_table(prompts, name: str = "prompts") -> tuple[list, list]:
    ids, texts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            pid, text = i, p
        elif isinstance(p, Mapping) and isinstance(p.get("prompt"), str):
            pid, text = p.get("prompt_id", i), p["prompt"]
        else:
            raise TypeError(f"`{name}` row {i} must be a str or a mapping with a str 'prompt', "
                            f"got {type(p).__name__}")  # fmt: skip
        if not text.strip():
            raise ValueError(f"`{name}` row {i} is an empty prompt")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise TypeError(f"`{name}` row {i}: prompt_id must be a str or int, got {pid!r}")
        ids.append(pid)
        texts.append(text)
    if not ids:
        raise ValueError(f"`{name}` is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"`{name}` holds duplicate prompt ids")
    if len({type(i) for i in ids}) > 1:  # one column type in the pairs file
        raise ValueError(f"`{name}`: prompt ids must be all str or all int (a str prompt's id "
                         "is its index)")  # fmt: skip
    return ids, texts


def prompt_splits(cfg: IterativeConfig, prompts) -> list[tuple[list, list]]:
    """(ids, texts) of each iteration's prompts: a str's id is its index, a mapping's its
    `prompt_id` (else its index). `disjoint_prompts`: contiguous parts, sizes differing by <= 1."""
    ids, texts = _prompt_table(prompts)
    n, t = len(ids), cfg.iterations
    if not cfg.disjoint_prompts:
        return [(ids, texts)] * t
    if n < t:
        raise ValueError(f"{n} prompts cannot be split into {t} disjoint iterations "
                         "(set disjoint_prompts=False to reuse them)")  # fmt: skip
    cuts = [n * i // t for i in range(t + 1)]
    return [(ids[a:b], texts[a:b]) for a, b in zip(cuts, cuts[1:])]


def _run_dir(out_dir, t: int) -> Path:
    return Path(out_dir).absolute() / f"iter_{t}" / "run"


def policy_source(out_dir, t: int) -> str | None:
    """Where pi_t lives: None for pi_0 (the base config's model), else iteration t - 1's
    export (`iter_<t-1>/run/export/merged`)."""
    return None if t == 0 else str(_run_dir(out_dir, t - 1) / "export" / "merged")


def _hf_dir(source: str) -> str:
    path = Path(source)
    if (path / "export" / "merged" / "config.json").is_file():
        return str((path / "export" / "merged").absolute())
    if (path / "config.json").is_file():
        return str(path.absolute())
    raise ValueError(f"`cream_base` {source!r} is neither an HF directory nor a run directory")


def iteration_config(cfg: IterativeConfig, base, out_dir, t: int):
    """Iteration t's `TrainConfig`: the base config trained on `iter_<t>/pairs.jsonl` into
    `iter_<t>/run`, from pi_t (`init_from`: the base's for t = 0, else iteration t - 1's run)
    against the frozen reference pi_t (`reference.path`: pi_t's export; for t = 0 the base's
    `reference.path` or model directory, None for a fresh preset model, whose frozen copy is
    pi_0 anyway). Adapter runs keep `adapters_disabled` (with `init_from` merged, the adapters-
    disabled model is pi_t). The loss defaults to the method's (`DEFAULTS`); checkpoints export
    the merged model, which the next iteration starts from."""
    from alignjax.train import session

    if base.task != "paired":
        raise ValueError(f"the base config's task must be 'paired', got {base.task!r}")
    out = Path(out_dir).absolute()
    prev = None if t == 0 else _run_dir(out, t - 1)
    init_from = base.init_from if t == 0 else str(prev)
    ref = base.reference
    if ref.mode in ("frozen", "precomputed") and base.peft.method is None:
        if t > 0:
            path = str(prev / "export" / "merged")
        elif ref.path is not None:
            path = ref.path
        else:
            found = session.model_dir(base)
            path = None if found is None else str(found.absolute())
        ref = dataclasses.replace(ref, path=path)
    loss = base.loss
    if loss.name is None and not loss.combine:
        loss = dataclasses.replace(loss, name=DEFAULTS[cfg.method].loss)
    imports = base.imports
    if cfg.method == "cream" and CREAM_LOSS_MODULE not in imports:
        imports = (*imports, CREAM_LOSS_MODULE)
    return dataclasses.replace(
        base,
        out_dir=str(_run_dir(out, t)),
        init_from=init_from,
        reference=ref,
        loss=loss,
        imports=imports,
        data=dataclasses.replace(base.data, train=str(out / f"iter_{t}" / "pairs.jsonl")),
        checkpoint=dataclasses.replace(base.checkpoint, export_hf=True),
    )


# ----------------------------------------------------------------------------- files


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _write(path: Path, text: str) -> None:
    """Write atomically: a file that exists is complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, value) -> None:
    _write(path, json.dumps(_jsonable(value), indent=1, sort_keys=True) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    _write(path, "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in rows))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(_jsonable(value), sort_keys=True).encode()).hexdigest()


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "iterative.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != manifest:
            keys = []
            for k in sorted(set(old) | set(manifest)):
                a, b = old.get(k), manifest.get(k)
                if isinstance(a, dict) and isinstance(b, dict):
                    keys += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
                elif a != b:
                    keys.append(k)
            raise ValueError(f"{out} holds an iterative run with other settings ({keys}); "
                             "use another out_dir")  # fmt: skip
    else:
        _write_json(path, manifest)


# ----------------------------------------------------------------------------- the driver


def _train_record(tcfg, train_summary) -> dict:
    """The trainer's summary and the last logged train/* metrics of the run."""
    record = {"summary": train_summary, "last": {}}
    metrics = Path(tcfg.out_dir) / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if any(key.startswith("train/") for key in row):
                record["last"] = row
    return record


def run_iterative(
    cfg: IterativeConfig,
    base_train_config,
    prompts: Sequence,
    out_dir: str | Path,
    *,
    eval_prompts: Sequence | None = None,
    phases: PH.Phases | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) `cfg.iterations` rounds of sample -> score -> pair -> train.

    Args:
      cfg: the loop (`IterativeConfig`).
      base_train_config: the `TrainConfig` template of every iteration's run (task "paired";
        steps, batch, optimizer, beta, ...); `out_dir`, `init_from`, `reference.path`,
        `data.train` are set per iteration (`iteration_config`).
      prompts: texts, or mappings with "prompt" (and "prompt_id"); see `prompt_splits`.
      out_dir: the loop's directory (module docstring).
      eval_prompts: held-out prompts; each policy pi_0 .. pi_T is sampled on them with the same
        key and scored by `cfg.gold` (None: no evaluation).
      phases: the sampler, judge and trainer (default `phases.default_phases(base)`).
      progress: the trainer's progress bars.

    Returns the summary (also `out_dir/summary.json`): per iteration its policy, reference,
    data counts, the mean gold reward of pi_t's samples, training metrics and wall time;
    `sample_gold_reward` [T] and, with `eval_prompts`, `gold_reward` [T + 1] (pi_0 .. pi_T).
    """
    import yaml

    from alignjax.train import config as cfg_lib

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    splits = prompt_splits(cfg, prompts)
    eval_table = None if eval_prompts is None else _prompt_table(eval_prompts, "eval_prompts")
    base_dict = cfg_lib.to_dict(base_train_config)
    base_dict.pop("out_dir", None)
    _check_manifest(out, _jsonable(dict(
        iterative=cfg.describe(), train=base_dict, prompts=_digest(splits),
        eval_prompts=None if eval_table is None else _digest(eval_table))))  # fmt: skip
    if phases is None:
        phases = PH.default_phases(base_train_config, progress=progress)
    for t in range(cfg.iterations):
        d = out / f"iter_{t}"
        if (d / "summary.json").is_file():
            log.info("iteration %d: finished, skipped", t)
            continue
        d.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tcfg = iteration_config(cfg, base_train_config, out, t)
        _write(d / "train_config.yaml", yaml.safe_dump(cfg_lib.to_dict(tcfg), sort_keys=False))
        if (d / "pairs.jsonl").is_file():
            stats = json.loads((d / "data.json").read_text())
            log.info("iteration %d: pairs file found, training resumes", t)
        else:
            # the lineage, oldest first: CREAM's M0 (cream_base), pi_0, ..., pi_t
            lineage = [_hf_dir(cfg.cream_base)] if cfg.method == "cream" and cfg.cream_base else []
            lineage += [policy_source(out, i) for i in range(t + 1)]
            key = jax.random.fold_in(jax.random.key(cfg.seed), t)
            rows, stats, sample_rows = PH.data_step(cfg, phases, lineage, splits[t], key)
            _write_jsonl(d / "samples.jsonl", sample_rows)
            _write_json(d / "data.json", stats)
            if not rows:
                raise ValueError(f"iteration {t}: no training pairs ({stats}); see "
                                 f"{d / 'samples.jsonl'}")  # fmt: skip
            _write_jsonl(d / "pairs.jsonl", rows)  # last: its presence means the data is done
        log.info("iteration %d: %s", t, stats)
        train_summary = phases.train(tcfg)
        evaluation = {}
        if eval_table is not None:
            if t == 0:
                evaluation["start"] = PH.evaluate(cfg, phases, policy_source(out, 0), eval_table)
            evaluation["end"] = PH.evaluate(cfg, phases, policy_source(out, t + 1), eval_table)
        _write_json(d / "summary.json", dict(
            iteration=t, policy=policy_source(out, t), init_from=tcfg.init_from,
            reference=tcfg.reference.path, run_dir=tcfg.out_dir, pairs=str(d / "pairs.jsonl"),
            data=stats, train=_train_record(tcfg, train_summary), eval=evaluation,
            wall_s=time.perf_counter() - start))  # fmt: skip
    iterations = [
        json.loads((out / f"iter_{t}" / "summary.json").read_text()) for t in range(cfg.iterations)
    ]
    summary = dict(
        method=cfg.method,
        out_dir=str(out),
        policy=policy_source(out, cfg.iterations),
        sample_gold_reward=[it["data"]["gold_mean"] for it in iterations],
        iterations=iterations,
    )
    if eval_table is not None:
        summary["gold_reward"] = [iterations[0]["eval"]["start"]["gold_reward"]] + [
            it["eval"]["end"]["gold_reward"] for it in iterations
        ]
    _write_json(out / "summary.json", summary)
    return _jsonable(summary)
