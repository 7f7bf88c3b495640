"""The training loop: the data position, the step, and hooks for everything else.

`run(state, step_fn, loader, steps=..., hooks=[...])` continues from `state.position` (epoch,
next batch),
so a state restored from a checkpoint resumes exactly where the run stopped: the same batches
in the same order, the same parameters, optimizer state and rng, hence bitwise the same
continuation (tests/test_train_loop.py, tests/test_train_trainer.py kills real runs). The
position is advanced before the checkpoint of a step is written, so a checkpoint at step k
holds the state after k updates and the position of batch k + 1.

Metrics, progress, evaluation, checkpoints, samples and export are hooks (`train.hooks`). Where
the state lives is a `train.placement.Placement` (re-exported here): the default keeps it as it
is (one device, or a mesh whose shardings the arrays carry); `PmapPlacement` keeps a replicated
copy per device. A checkpoint is resumed by restoring it into the fresh state
(`checkpoint.Checkpointer.restore`, placed with `placement.from_checkpoint`) and calling `run`
again.
Gradient accumulation (`accum` > 1) takes `accum` consecutive loader batches per step, pads
them to a common length and stacks them on a leading micro-batch axis (`step.build_step`
accumulates exactly over it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from alignjax.data.batching import Batch
from alignjax.train.hooks import Hook, LoopContext
from alignjax.train.placement import Placement, PmapPlacement

__all__ = ["run", "Placement", "PmapPlacement", "stack_padded"]


def stack_padded(batches: list[Batch]) -> Batch:
    """Equally sized batches -> one with a leading micro-batch axis; token arrays `[R, L_i]`
    are right-padded (zeros: no attention, no loss) to the longest L_i first."""
    if len(batches) == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], batches[0])
    length = max(b.input_ids.shape[1] for b in batches)
    rows = batches[0].input_ids.shape[0]

    def pad(b: Batch) -> Batch:
        extra = length - b.input_ids.shape[1]
        if not extra:
            return b
        out = {}
        for f in dataclasses.fields(b):
            x = getattr(b, f.name)
            if x is not None and np.ndim(x) == 2 and np.shape(x)[0] == rows:
                x = np.pad(np.asarray(x), ((0, 0), (0, extra)))
            out[f.name] = x
        return Batch(**out)

    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *map(pad, batches))


def _batches(loader, epoch: int, start: int):
    """(epoch, index, batch) from a data position on, across epochs."""
    while True:
        empty = True
        for k, batch in loader.epoch(epoch, start=start):
            empty = False
            yield epoch, k, batch
        if empty and start == 0:
            raise ValueError("the loader yields no batch (dataset smaller than one batch?)")
        epoch, start = epoch + 1, 0


def run(
    state,
    step_fn: Callable,
    loader,
    *,
    steps: int,
    hooks: Sequence[Hook] = (),
    placement: Placement | None = None,
    to_device: Callable | None = None,
    accum: int = 1,
):
    """Train until `state.step == steps`; returns the final state.

    Args:
      state: a `step.TrainState` (fresh, or restored from a checkpoint), placed as `placement`
        says.
      step_fn: `build_step(...)`'s `(state, batch) -> (state, metrics)`.
      loader: a `data.DataLoader` (or anything with `epoch(e, start=k)` yielding `(k, batch)`).
      hooks: `train.hooks.Hook`s, run in order after every step (and at start / end).
      placement: where the state lives (default: as it is).
      to_device: host batch -> device batch (default: `placement.put_batch`).
      accum: loader batches per step (gradient accumulation).
    """
    placement = placement or Placement()
    to_device = to_device or placement.put_batch
    if accum < 1:
        raise ValueError(f"`accum` must be >= 1, got {accum}")
    done, epoch, start = placement.host_position(state)
    ctx = LoopContext(state=state, steps=steps, placement=placement, step=done, start_step=done,
                      epoch=epoch, next_batch=start)  # fmt: skip
    for hook in hooks:
        hook.start(ctx)
    batches = _batches(loader, epoch, start)
    while ctx.step < steps:
        group = [next(batches) for _ in range(accum)]
        epoch, k, _ = group[-1]
        host = group[0][2] if accum == 1 else stack_padded([b for _, _, b in group])
        state, metrics = step_fn(ctx.state, to_device(host))
        ctx.state = placement.with_position(state, epoch, k + 1)
        ctx.step += 1
        ctx.epoch, ctx.next_batch, ctx.metrics, ctx.eval = epoch, k + 1, metrics, None
        ctx.tokens = sum(int(np.asarray(b.loss_mask).sum()) for _, _, b in group)
        for hook in hooks:
            hook.after_step(ctx)
    for hook in hooks:
        hook.end(ctx)
    return ctx.state
