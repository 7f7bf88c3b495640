"""The training loop: data position, step, metrics, evaluation, checkpoints, resume.

`run(state, step_fn, loader, steps=...)` continues from `state.position` (epoch, next batch),
so a state restored from a checkpoint resumes exactly where the run stopped: the same batches
in the same order, the same parameters, optimizer state and rng, hence bitwise the same
continuation (tests/test_train_loop.py, tests/test_train_trainer.py kills real runs). The
position is advanced before the checkpoint of a step is written, so a checkpoint at step k
holds the state after k updates and the position of batch k + 1.

Where the state lives is a `Placement`: the default keeps it as it is (one device, or a mesh
whose shardings the arrays carry); `PmapPlacement` keeps a replicated copy per device.
Gradient accumulation (`accum` > 1) takes `accum` consecutive loader batches per step, pads
them to a common length and stacks them on a leading micro-batch axis (`step.build_step`
accumulates exactly over it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.data.batching import Batch

__all__ = ["run", "resume", "Placement", "PmapPlacement", "stack_padded"]


class Placement:
    """The state and batches on one device or a mesh (arrays carry their shardings)."""

    def host_position(self, state) -> tuple[int, int, int]:
        """(step, epoch, next batch) of the state, as Python ints."""
        epoch, start = (int(x) for x in np.asarray(state.position))
        return int(state.step), epoch, start

    def with_position(self, state, epoch: int, start: int):
        """The state at a new data position, placed like the old one (a global array under a
        multi-process mesh, which orbax needs to save it)."""
        position = np.asarray([epoch, start], np.int32)
        sharding = getattr(state.position, "sharding", None)
        if sharding is None:
            return state.replace(position=jnp.asarray(position))
        return state.replace(position=jax.device_put(position, sharding))

    def to_checkpoint(self, state):
        """What a checkpoint stores (a pytree of arrays)."""
        return state

    def from_checkpoint(self, restored, state):
        """A restored checkpoint placed like `state`."""
        return restored

    def metrics(self, metrics):
        return metrics


class PmapPlacement(Placement):
    """A state replicated over the local devices (`sharding.replicate`), for `jax.pmap` steps."""

    def __init__(self, devices=None):
        self.devices = devices

    def host_position(self, state):
        epoch, start = (int(x) for x in np.asarray(state.position[0]))
        return int(state.step[0]), epoch, start

    def with_position(self, state, epoch, start):
        from alignjax.train.sharding import replicate

        position = replicate(np.asarray([epoch, start], np.int32), self.devices)
        return state.replace(position=position)

    def to_checkpoint(self, state):
        return jax.tree.map(lambda x: x[0], state)

    def from_checkpoint(self, restored, state):
        from alignjax.train.sharding import replicate

        return replicate(restored, self.devices)

    def metrics(self, metrics):
        return jax.tree.map(lambda x: x[0], metrics)


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


def resume(checkpointer, state, placement: Placement | None = None):
    """The latest checkpoint restored into `state`'s structure, or `state` when there is none."""
    placement = placement or Placement()
    if checkpointer is None or checkpointer.latest_step() is None:
        return state
    restored, _ = checkpointer.restore(target=placement.to_checkpoint(state))
    return placement.from_checkpoint(restored, state)


def run(
    state,
    step_fn: Callable,
    loader,
    *,
    steps: int,
    to_device: Callable = lambda b: jax.tree.map(jnp.asarray, b),
    checkpointer=None,
    writer=None,
    progress=None,
    log_every: int = 10,
    eval_fn: Callable | None = None,
    eval_every: int = 0,
    on_step: Callable | None = None,
    accum: int = 1,
    placement: Placement | None = None,
):
    """Train until `state.step == steps`; returns the final state.

    Args:
      state: a `step.TrainState` (fresh, or from `resume`), placed as `placement` says.
      step_fn: `build_step(...)`'s `(state, batch) -> (state, metrics)`.
      loader: a `data.DataLoader` (or anything with `epoch(e, start=k)` yielding `(k, batch)`).
      to_device: host batch -> device batch (e.g. `sharding.shard_batch` under a mesh).
      checkpointer: a `checkpoint.Checkpointer` (saves every `every` steps; final step forced;
        an evaluation's metrics, prefixed "eval/", rank the checkpoint of its step).
      writer: a `metrics.MetricsWriter`; train metrics are averaged over `log_every` steps.
      progress: a `metrics.Progress`.
      eval_fn: `eval_fn(state) -> dict` of scalars, run before the first step of a fresh run,
        every `eval_every` steps and at the end.
      on_step: called as `on_step(step, state, metrics)` after every step.
      accum: loader batches per step (gradient accumulation).
      placement: where the state lives (default: as it is; `PmapPlacement` for pmap).
    """
    placement = placement or Placement()
    if accum < 1:
        raise ValueError(f"`accum` must be >= 1, got {accum}")
    done, epoch, start = placement.host_position(state)
    if eval_fn is not None and done == 0:  # the starting point of the curves
        evaluated = {f"eval/{m}": v for m, v in eval_fn(state).items()}
        if writer is not None:
            writer.write(0, evaluated)
    pending, t0 = [], time.perf_counter()
    batches = _batches(loader, epoch, start)
    while done < steps:
        group = [next(batches) for _ in range(accum)]
        epoch, k, _ = group[-1]
        host = group[0][2] if accum == 1 else stack_padded([b for _, _, b in group])
        state, metrics = step_fn(state, to_device(host))
        done += 1
        state = placement.with_position(state, epoch, k + 1)
        tokens = sum(int(np.asarray(b.loss_mask).sum()) for _, _, b in group)
        if writer is not None:
            pending.append(placement.metrics(metrics))
        if progress is not None:
            progress.update(tokens=tokens)
        if writer is not None and (done % log_every == 0 or done == steps):
            rows = jax.device_get(pending)
            avg = {m: float(np.mean([p[m] for p in rows])) for m in rows[0]}
            elapsed = time.perf_counter() - t0
            avg["step_time"] = elapsed / len(rows)
            avg["tokens_per_s"] = sum(p["num_tokens"] for p in rows) / elapsed
            writer.write(done, avg, prefix="train/")
            if progress is not None:
                progress.update(0, loss=avg["loss"])
            pending, t0 = [], time.perf_counter()
        evaluated = None
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == steps):
            evaluated = {f"eval/{m}": v for m, v in eval_fn(state).items()}
            if writer is not None:
                writer.write(done, evaluated)
            t0 = time.perf_counter()  # evaluation time is not training time
        if checkpointer is not None:
            meta = {"step": done, "epoch": epoch, "next_batch": k + 1}
            checkpointer.save(
                done,
                placement.to_checkpoint(state),
                metadata=meta,
                metrics=evaluated if checkpointer.best_metric else None,
                force=done == steps,
            )
        if on_step is not None:
            on_step(done, state, metrics)
    if checkpointer is not None:
        checkpointer.wait()
    return state
