"""A training run from a `TrainConfig`: what `alignjax train / eval / export` run.

    summary = train(load_config("run.yaml", ["loss.beta=0.2"]))

`train` is a composition of public parts: `session.setup` (tokenizer, data, model, PEFT,
optimizer, state, placement, step), a `DataLoader`, and `loop.run` with hooks (metrics,
progress, evaluation, checkpoints, AdaLoRA's rank pattern, samples, export, curves). Extra hooks
passed to `train(..., hooks=[...])` run after the built-in ones.

The run directory (`cfg.out_dir`, relative paths resolved against the working directory):

    config.yaml            the resolved config (what `eval` / `export` / a resume rebuild from)
    metrics.jsonl, tb/     train/* and eval/* metrics (TRL's names), TensorBoard events
    checkpoints/<step>/    orbax checkpoints (adapter-only with checkpoint.adapters_only)
    eval.json              the final evaluation; samples.jsonl: completions of held-out prompts
    data_report.json       rows kept and every skipped row (index, field, problem) per split
    dynamics_baseline.npz  paired runs: held-out log-probs at step 0 (`train.dynamics`)
    export/merged/         HF safetensors + config + tokenizer (adapters merged)
    export/adapter/        the adapters in HF PEFT format (PEFT runs)
    export/merged/reward_head.safetensors, reward_config.json   task reward: the value head
                           (HF's `score.weight`) and how rows were tokenized
    curves.png             training and evaluation curves

Starting `train` on a directory that holds checkpoints resumes from the latest one (bitwise the
same continuation as an uninterrupted run). The model is a local HF directory (`model.path`),
a previous run (`init_from`), or a random model of a `builders.PRESETS` size with the
tokenizer's vocabulary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignjax import data as D
from alignjax import models, peft
from alignjax.train import builders as B
from alignjax.train import config as cfg_lib
from alignjax.train import evaluate as E
from alignjax.train import hooks as H
from alignjax.train import loop as L
from alignjax.train import metrics as M
from alignjax.train import step as S
from alignjax.train.builders import PRESETS, build_optimizer
from alignjax.train.data import load_split
from alignjax.train.online_config import ITERATIVE_METHODS
from alignjax.train.placement import split_batch_for_pmap
from alignjax.train.session import Session, build_model, open_run, setup

__all__ = [
    "PRESETS",
    "Session",
    "setup",
    "open_run",
    "train",
    "train_loader",
    "evaluate_run",
    "export_run",
    "build_model",
    "build_optimizer",
    "load_split",
    "split_batch_for_pmap",
]

log = logging.getLogger(__name__)


def train_loader(session: Session) -> D.DataLoader:
    """The training split's loader: `data.batch_size / optim.grad_accum` examples a batch."""
    d, o = session.cfg.data, session.cfg.optim
    if d.batch_size % o.grad_accum:
        raise ValueError(f"`data.batch_size` {d.batch_size} is not divisible by "
                         f"`optim.grad_accum` {o.grad_accum}")  # fmt: skip
    if session.cfg.task == "unlearn":
        return session.unlearn_loader()
    if session.cfg.task == "online":  # prompts: data.batch_size / num_generations a step
        return session.rollouts.loader()
    config = D.LoaderConfig(
        batch_size=d.batch_size // o.grad_accum, seed=d.seed, buckets=d.buckets,
        sort_window=d.sort_window, packing=d.packing, pack_length=d.pack_length,
        pack_rows=d.pack_rows, kto_kl=session.spec.kto_kl, share_prompt=d.share_prompt,
    )  # fmt: skip
    return D.DataLoader(session.train_data, config)


class RankPatternHook(H.Hook):
    """AdaLoRA: the kept rank (total and per module) written as "peft/..." metrics every
    `every` steps, so the allocation is visible in the curves."""

    def __init__(self, writer, every: int):
        self.writer, self.every = writer, every

    def after_step(self, ctx):
        if not ctx.due(self.every):
            return
        pattern = peft.rank_pattern(ctx.host_state().params)  # every process (a collective)
        if self.writer is not None:
            total = int(sum(np.sum(m) for m in pattern.values()))
            self.writer.write(ctx.step, {"peft/rank_total": total})


def _finish(session: Session, summary: dict, evaluation: H.EvalHook | None):
    """After the last step: final evaluation, samples, export, curves, eval.json."""
    cfg, out = session.cfg, session.out_dir

    def fn(ctx):
        if evaluation is not None:
            summary["eval"] = dict(evaluation.last) or session.evaluate(ctx.state)
        prompts = session.train_data if cfg.task == "unlearn" else session.eval_data
        # unlearn: the forget prompts; a reward model does not generate
        samples = cfg.eval_samples and prompts is not None and cfg.task != "reward"
        host = ctx.host_state() if samples or cfg.checkpoint.export_hf else None
        if not session.is_main:
            return
        if samples:
            (out / "samples.jsonl").unlink(missing_ok=True)
            n = min(cfg.eval_samples, len(prompts))
            E.sample_completions(host, session.tokenizer, [prompts[i] for i in range(n)],
                                 max_new_tokens=cfg.sample_tokens,
                                 path=out / "samples.jsonl")  # fmt: skip
        if cfg.checkpoint.export_hf:
            summary["export"] = export_run(session, out / "export", state=host)

    return H.AtEnd(fn)


def write_data_report(session, path) -> None:
    """Each split's `DataReport` (every skipped row with its field and problem) as JSON."""
    reports = {}
    train_data = session.train_data
    for split, data in (("train", train_data), ("eval", session.eval_data)):
        if data is None:
            continue
        if split == "eval" and train_data is not None and data.report is train_data.report:
            reports[split] = {"held_out_of": "train", "rows": len(data)}  # data.eval=auto
        else:
            reports[split] = data.report.to_dict()
    if session.probe_data is not None:
        reports["probe"] = session.probe_data.report.to_dict()
    Path(path).write_text(json.dumps(reports, indent=1) + "\n")


def train(cfg: cfg_lib.TrainConfig, *, progress: bool = True, hooks: Sequence = ()) -> dict:
    """Run (or resume) a training run; returns a summary (final eval metrics, paths). An
    iterative `task: online` method runs `online.run_iterative` (`train.iterative_task`)."""
    if cfg.task == "online" and cfg.online.method in ITERATIVE_METHODS:
        from alignjax.train.iterative_task import train_iterative

        return train_iterative(cfg, progress=progress, hooks=hooks)
    session = setup(cfg)
    out = session.out_dir
    if cfg.data.probe is not None and session.eval_data is None:
        raise ValueError("`data.probe` is evaluated with the held-out pairs, but the run has "
                         "no eval split (data.eval=null, or auto on too few rows)")  # fmt: skip
    if session.is_main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg_lib.to_dict(cfg), sort_keys=False))
        write_data_report(session, out / "data_report.json")
    loader = train_loader(session)
    summary = {"steps": cfg.steps, "out_dir": str(out)}
    with session.checkpointer() as ckpt:
        state = session.state
        if ckpt.latest_step() is not None:
            if session.dynamics is not None:  # the dynamics/* baseline, if not on disk
                session.initial_state = session.state
            state = session.restore(ckpt)
            log.info("resumed from step %d", ckpt.latest_step())
        done = session.placement.host_position(state)[0]
        writer = (
            M.MetricsWriter(out, purge_step=done + 1 if done else None) if session.is_main else None
        )
        bar = M.Progress(cfg.steps, initial=done, enabled=progress, desc=cfg.task)
        evaluation = None
        if session.eval_data is not None or cfg.task == "unlearn":
            evaluation = H.EvalHook(session.evaluate, every=cfg.eval_every, writer=writer)
        parts = [H.ProgressHook(bar)]
        if writer is not None:
            parts.append(H.MetricsHook(writer, every=cfg.log_every, progress=bar))
        if evaluation is not None:
            parts.append(evaluation)
        parts.append(H.CheckpointHook(ckpt, prepare=session.saveable))
        if cfg.peft.method == "adalora":
            parts.append(RankPatternHook(writer, every=cfg.log_every))
        online = session.rollouts
        if online is not None:  # rollout progress and samples (rollouts.jsonl)
            parts.append(online.hook(cfg.log_every, progress=progress))
        parts.append(_finish(session, summary, evaluation))
        if cfg.plot and session.is_main:
            parts.append(
                H.AtEnd(
                    lambda ctx: summary.update(
                        curves=str(M.plot_curves(out / "metrics.jsonl", out / "curves.png"))
                    )
                )
            )
        try:
            step_fn, to_device, accum = session.step_fn, session.to_device, cfg.optim.grad_accum
            if online is not None:  # rollout phase + step, on host prompt batches
                step_fn, to_device, accum = online, (lambda batch: batch), 1
            state = L.run(state, step_fn, loader, steps=cfg.steps, hooks=[*parts, *hooks],
                          placement=session.placement, to_device=to_device,
                          accum=accum)  # fmt: skip
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    session.state = state
    summary["skipped"] = int(np.max(state.skipped))
    if session.is_main:
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------- eval and export


def evaluate_run(run_dir: str | Path, *, step: int | None = None, overrides=()) -> dict:
    """Evaluate a run's checkpoint (default: the latest) on its eval split (or
    `data.eval=...` in `overrides`)."""
    session = open_run(run_dir, step, overrides=overrides)
    if session.eval_data is None and session.cfg.task != "unlearn":
        raise ValueError("the run has no eval split; pass data.eval=<source>")
    result = session.evaluate()
    result["step"] = session.placement.host_position(session.state)[0]
    return result


def export_run(
    session_or_dir, out: str | Path | None = None, *, step: int | None = None, state=None
) -> dict:
    """Write `out/merged` (HF safetensors, adapters merged, plus the tokenizer) and, for PEFT
    runs, `out/adapter` (HF PEFT format, with the PEFT method's export arguments: AdaLoRA's
    schedule and final rank pattern). From a session, or a run directory's checkpoint."""
    if isinstance(session_or_dir, Session):
        session = session_or_dir
    else:
        session = open_run(session_or_dir, step, overrides=["data.eval=null"])
    out = Path(out) if out is not None else session.out_dir / "export"
    host = session.host_state() if state is None else state
    model = S.model_of(host)
    paths = {}
    if session.adapted:
        cfg = session.cfg
        method = B.PEFT_METHODS[cfg.peft.method]
        kwargs = {} if method.export is None else method.export(cfg.peft, cfg.steps, host)
        path = peft.export_adapters(model, out / "adapter", **kwargs)
        session.tokenizer.save_pretrained(str(out / "adapter"))
        paths["adapter"] = str(path)
        model = peft.unload(model, merge_first=True)
    merged = models.save_pretrained(model, out / "merged")
    session.tokenizer.save_pretrained(str(out / "merged"))
    paths["merged"] = str(merged)
    if session.cfg.task == "reward":  # the value head next to the decoder
        from alignjax.online.reward_model import save_reward_head

        paths["reward_head"] = str(save_reward_head(host, session.cfg, out / "merged"))
    return paths
