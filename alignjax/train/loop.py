"""The training loop: data position, step, metrics, checkpoints, resume.

`run(state, step_fn, loader, steps=...)` continues from `state.position` (epoch, next batch),
so a state restored from a checkpoint resumes exactly where the run stopped: the same batches
in the same order, the same parameters, optimizer state and rng, hence bitwise the same
continuation (tests/test_train_loop.py). The position is advanced before the checkpoint of a
step is written, so a checkpoint at step k holds the state after k updates and the position of
batch k + 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["run", "resume"]


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


def resume(checkpointer, state):
    """The latest checkpoint restored into `state`'s structure, or `state` when there is none."""
    if checkpointer is None or checkpointer.latest_step() is None:
        return state
    restored, _ = checkpointer.restore(target=state)
    return restored


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
    on_step: Callable | None = None,
):
    """Train until `state.step == steps`; returns the final state.

    Args:
      state: a `step.TrainState` (fresh, or from `resume`).
      step_fn: `build_step(...)`'s jitted `(state, batch) -> (state, metrics)`.
      loader: a `data.DataLoader` (or anything with `epoch(e, start=k)` yielding `(k, batch)`).
      to_device: host batch -> device batch (e.g. `sharding.shard_batch` under a mesh).
      checkpointer: a `checkpoint.Checkpointer` (saves every `every` steps; final step forced).
      writer: a `metrics.MetricsWriter`; metrics are averaged over `log_every` steps.
      progress: a `metrics.Progress`.
      on_step: called as `on_step(step, state, metrics)` after every step (eval hooks, ...).
    """
    epoch, start = (int(x) for x in np.asarray(state.position))
    done = int(state.step)
    pending, t0 = [], time.perf_counter()
    batches = _batches(loader, epoch, start)
    while done < steps:
        epoch, k, batch = next(batches)
        state, metrics = step_fn(state, to_device(batch))
        done += 1
        state = state.replace(position=jnp.asarray([epoch, k + 1], jnp.int32))
        if writer is not None:
            pending.append(metrics)
        if progress is not None:
            progress.update(tokens=int(np.asarray(batch.loss_mask).sum()))
        if writer is not None and (done % log_every == 0 or done == steps):
            host = jax.device_get(pending)
            avg = {m: float(np.mean([p[m] for p in host])) for m in host[0]}
            elapsed = time.perf_counter() - t0
            avg["step_time"] = elapsed / len(host)
            avg["tokens_per_s"] = sum(p["num_tokens"] for p in host) / elapsed
            writer.write(done, avg, prefix="train/")
            pending, t0 = [], time.perf_counter()
        if checkpointer is not None:
            meta = {"step": done, "epoch": epoch, "next_batch": k + 1}
            checkpointer.save(done, state, metadata=meta, force=done == steps)
        if on_step is not None:
            on_step(done, state, metrics)
    if checkpointer is not None:
        checkpointer.wait()
    return state
