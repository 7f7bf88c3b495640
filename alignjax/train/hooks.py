"""Loop hooks: everything around the step (metrics, progress, evaluation, checkpoints, samples,
export, curves, AdaLoRA's rank pattern) is a hook, so the loop has as many extension points as
anyone needs.

    hooks = [MetricsHook(writer, every=10), EvalHook(eval_fn, every=50, writer=writer),
             CheckpointHook(checkpointer), Callback(lambda ctx: print(ctx.step), every=25)]
    state = loop.run(state, step_fn, loader, steps=1000, hooks=hooks)

A hook has three methods, each optional: `start(ctx)` before the first step, `after_step(ctx)`
after every step (use `ctx.due(every)` to act every N steps; the final step is always due), and
`end(ctx)` after the last step. `ctx` (`LoopContext`) carries the state (a hook may replace it),
the step's metrics, the data position, the evaluation of this step, and the placement. Hooks
run in list order, so an evaluation hook placed before the checkpoint hook ranks that step's
checkpoint by its metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = [
    "LoopContext",
    "Hook",
    "Callback",
    "MetricsHook",
    "ProgressHook",
    "EvalHook",
    "CheckpointHook",
    "AtEnd",
]


@dataclasses.dataclass
class LoopContext:
    """What a hook sees. `step`: updates done; `epoch`, `next_batch`: the data position after
    it; `metrics`: the last step's (device) metrics; `tokens`: its loss tokens; `eval`: this
    step's evaluation ("eval/..." keys) once an `EvalHook` ran, else None."""

    state: Any
    steps: int
    placement: Any
    step: int = 0
    start_step: int = 0
    epoch: int = 0
    next_batch: int = 0
    metrics: Any = None
    tokens: int = 0
    eval: dict | None = None
    paused_s: float = 0.0
    _host: tuple | None = None

    def due(self, every: int) -> bool:
        """Whether a hook acting every `every` steps (0: only at the end) acts now."""
        return (every > 0 and self.step % every == 0) or self.step == self.steps

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training time (evaluation, sampling)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def host_state(self):
        """The state whole on this host (`placement.host_state`; a collective across processes,
        so every process must call it), computed once per step."""
        if self._host is None or self._host[0] != self.step:
            self._host = (self.step, self.placement.host_state(self.state))
        return self._host[1]


class Hook:
    """Base class: override any of `start`, `after_step`, `end`."""

    def start(self, ctx: LoopContext) -> None:
        pass

    def after_step(self, ctx: LoopContext) -> None:
        pass

    def end(self, ctx: LoopContext) -> None:
        pass


class Callback(Hook):
    """`fn(ctx)` every `every` steps (1: every step; 0: only after the last)."""

    def __init__(self, fn: Callable[[LoopContext], Any], every: int = 1):
        self.fn, self.every = fn, every

    def after_step(self, ctx):
        if ctx.due(self.every):
            self.fn(ctx)


class AtEnd(Hook):
    """`fn(ctx)` once, after the last step (samples, export, curves)."""

    def __init__(self, fn: Callable[[LoopContext], Any]):
        self.fn = fn

    def end(self, ctx):
        self.fn(ctx)


class MetricsHook(Hook):
    """Train metrics averaged over `every` steps, with `step_time` and `tokens_per_s` (wall
    time, evaluation excluded), written as "train/..." to a `metrics.MetricsWriter`; the loss
    goes to `progress` too."""

    def __init__(self, writer, every: int = 10, progress=None):
        self.writer, self.every, self.progress = writer, every, progress
        self.pending: list = []

    def start(self, ctx):
        self.t0, self.paused0 = time.perf_counter(), ctx.paused_s

    def after_step(self, ctx):
        self.pending.append(ctx.placement.metrics(ctx.metrics))
        if not ctx.due(self.every):
            return
        rows = jax.device_get(self.pending)
        avg = {m: float(np.mean([p[m] for p in rows])) for m in rows[0]}
        elapsed = time.perf_counter() - self.t0 - (ctx.paused_s - self.paused0)
        avg["step_time"] = elapsed / len(rows)
        avg["tokens_per_s"] = sum(p["completion_tokens"] for p in rows) / elapsed
        self.writer.write(ctx.step, avg, prefix="train/")
        if self.progress is not None:
            self.progress.update(0, loss=avg["loss"])
        self.pending = []
        self.start(ctx)


class ProgressHook(Hook):
    """Advances a `metrics.Progress` bar by each step's tokens."""

    def __init__(self, progress):
        self.progress = progress

    def after_step(self, ctx):
        self.progress.update(tokens=ctx.tokens)


class EvalHook(Hook):
    """`eval_fn(state) -> dict` before the first step of a fresh run (the curves' starting
    point), every `every` steps and after the last; results go to `ctx.eval` (for the
    checkpoint hook), to `writer` as "eval/..." and stay in `last`."""

    def __init__(self, eval_fn: Callable, every: int = 0, writer=None):
        self.eval_fn, self.every, self.writer = eval_fn, every, writer
        self.last: dict = {}

    def _run(self, ctx) -> dict:
        with ctx.paused():
            self.last = dict(self.eval_fn(ctx.state))
        evaluated = {f"eval/{m}": v for m, v in self.last.items()}
        if self.writer is not None:
            self.writer.write(ctx.step, evaluated)
        return evaluated

    def start(self, ctx):
        if ctx.step == 0:
            self._run(ctx)

    def after_step(self, ctx):
        if ctx.due(self.every):
            ctx.eval = self._run(ctx)


class CheckpointHook(Hook):
    """Saves `prepare(placement.to_checkpoint(state))` through a `checkpoint.Checkpointer`
    (it decides by its own `every`; the final step is forced), with the data position as
    metadata and this step's evaluation to rank it when the checkpointer keeps the best ones.
    `prepare` (default: identity) also gives the restore target (e.g. adapter-only states)."""

    def __init__(self, checkpointer, prepare: Callable | None = None):
        self.checkpointer = checkpointer
        self.prepare = prepare or (lambda state: state)

    def after_step(self, ctx):
        meta = {"step": ctx.step, "epoch": ctx.epoch, "next_batch": ctx.next_batch}
        self.checkpointer.save(
            ctx.step,
            self.prepare(ctx.placement.to_checkpoint(ctx.state)),
            metadata=meta,
            metrics=ctx.eval if self.checkpointer.best_metric else None,
            force=ctx.step == ctx.steps,
        )

    def end(self, ctx):
        self.checkpointer.wait()
