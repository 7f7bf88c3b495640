"""Training-run checkpoints: a thin layer over orbax's `CheckpointManager`.

    with Checkpointer(out_dir / "checkpoints", every=50, keep=3, best_metric="eval/loss") as ckpt:
        start = 0
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(target=state)  # `state`: a fresh (or abstract) state
            start = meta["step"] + 1
        for step in range(start, num_steps):
            state = train_step(state, next(batches))
            ckpt.save(step, state, metadata={"step": step, "data": loader_position},
                      metrics=last_eval_metrics)

The state is any pytree of `jax.Array` / NumPy leaves (an `nnx.State`, optax states, a
dataclass pytree, typed PRNG keys or their `key_data`); it is written in orbax's standard
format (tensorstore + OCDBT), every leaf with its own dtype, so a restore is bitwise exact.
`metadata` is a JSON document stored next to it (data position, config, ...). On disk:

    <directory>/<step>/state/      the pytree
    <directory>/<step>/metadata/   the JSON metadata
    <directory>/<step>/metrics/    the save's metrics (only with `best_metric`)

**When.** `save` writes when `step % every == 0`, when `force=True`, or when JAX reports a
preemption sync point (multi-host TPU runs); orbax's default "save the first step of a fresh
run" rule is deliberately left out. A step is never written twice (`save` returns False).

**Retention.** Without `best_metric`, the `keep` most recent checkpoints stay (orbax `LatestN`).
With `best_metric`, the `keep` best by `metrics[best_metric]` (lowest for `best_mode="min"`,
highest for "max"; orbax `BestN`) **and** the latest checkpoint stay, so at most `keep + 1`
directories exist and a resume never goes back in time. A checkpoint saved without metrics, or
whose metric is NaN/inf, ranks last: it lives only while it is the latest. Underneath this is
`AnyPreservationPolicy([LatestN(1), BestN(n=keep, keep_checkpoints_without_metrics=False)])`:
orbax's legacy options (`max_to_keep` + `best_fn`) cannot express it, because they translate to
`BestN` alone, which drops the latest step as soon as it is not among the best, and their
default `keep_checkpoints_without_metrics=True` would keep metric-less saves forever.

**Atomicity.** Orbax writes a step to `<step>.orbax-checkpoint-tmp/` and renames it to
`<step>/` once every item is complete; only renamed directories are listed. A process killed
mid-save therefore leaves only a temporary directory, which the next `Checkpointer` on the same
directory removes before its constructor returns (`cleanup_tmp_directories`). Retired steps are
first renamed into `<directory>/_deleted/` (orbax `todelete_subdir`) and removed from there
afterwards, so a kill during deletion cannot leave a half-deleted step among `all_steps()`.

**Asynchronous saves** (the default) return once the arrays are copied to host memory, so the
caller may donate or overwrite the device buffers at once; the write and commit run in a
background thread. `wait()` blocks until it is committed; `restore` and `close` wait first.
Steps that are still being written already appear in `latest_step()` / `all_steps()` of this
process, and only once committed in any other one.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer"]

_STATE = "state"
_METADATA = "metadata"
_DELETED = "_deleted"


class Checkpointer:
    """Periodic, atomic, keep-N / best-by-metric checkpoints of a training run.

    Args:
      directory: where the step directories live (local path, relative ones resolved against
        the working directory, or any path orbax supports). Created if missing.
      every: save every `every` steps (`step % every == 0`).
      keep: how many checkpoints to keep: the most recent ones, or with `best_metric` the best
        ones (plus the latest).
      best_metric: a key of the `metrics` passed to `save` (e.g. "eval/loss") to rank by.
      best_mode: "min" or "max": which end of `best_metric` is best.
      asynchronous: write in a background thread (see the module docstring).

    Example:
      >>> ckpt = Checkpointer("/tmp/run/ckpt", every=10, keep=2)  # doctest: +SKIP
      >>> ckpt.save(10, {"w": jnp.ones(3)}, metadata={"epoch": 0})  # doctest: +SKIP
      True
      >>> state, meta = ckpt.restore()  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        every: int,
        keep: int,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        asynchronous: bool = True,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive int, got {every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be a positive int, got {keep!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}")
        if best_metric is not None and not isinstance(best_metric, str):
            raise TypeError(f"`best_metric` must be a str or None, got {best_metric!r}")
        if "://" not in str(directory):  # orbax needs absolute local paths
            directory = os.path.abspath(os.fspath(directory))
        self.directory = epath.Path(directory)
        self.every, self.keep = every, keep
        self.best_metric, self.best_mode = best_metric, best_mode
        self.asynchronous = asynchronous
        policies = ocp.checkpoint_managers
        if best_metric is None:
            best_fn, preservation = None, policies.LatestN(n=keep)
        else:
            best_fn = functools.partial(_metric_value, name=best_metric, mode=best_mode)
            preservation = policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=1),
                    policies.BestN(
                        get_metric_fn=best_fn,
                        reverse=best_mode == "min",  # sorted worst..best, the last `n` are kept
                        n=keep,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=preservation,
            best_fn=best_fn,  # orbax writes `metrics` and answers `best_step` only with a best_fn
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
            todelete_subdir=_DELETED,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(_STATE, _METADATA), options=options
        )
        # Orbax removes the leftovers of killed saves in a background thread that only its next
        # `save` awaits; wait here so that the directory is clean when the constructor returns.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._purge_deleted()
        self._closed = False

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` at `step` if it is due (or `force`); returns whether it saved.

        Args:
          step: the training step (a non-negative int); names the checkpoint directory.
          state: a pytree of arrays.
          metadata: JSON-serialisable mapping stored with the state (NumPy / JAX scalars are
            converted; it round-trips through JSON, so tuples come back as lists).
          metrics: scalar metrics of this step; used (and stored) only with `best_metric`, which
            must then be one of its keys. Without metrics the checkpoint ranks last.
          force: save even if `step % every != 0` (e.g. the final step).

        Returns False without touching `state` when the step is not due, already saved, or not
        newer than the latest checkpoint (unless `force`).
        """
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"`step` must be non-negative, got {step}")
        self._check_open()
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        metadata = _json_copy({} if metadata is None else metadata, "metadata")
        tracked = self._tracked_metrics(metrics)
        # Orbax waits for the previous save anyway; doing it here lets us purge what it retired.
        self.wait()
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
            ),
            metrics=tracked,
            force=True,
        )
        if not self.asynchronous:
            self._purge_deleted()
        return bool(saved)

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """Returns `(state, metadata)` of `step` (default: the latest checkpoint).

        Args:
          step: which checkpoint; see `all_steps()`.
          target: the expected state: an abstract pytree (`jax.ShapeDtypeStruct` leaves, e.g.
            from `jax.eval_shape` / `nnx.eval_shape`, with `sharding` to place the arrays) or a
            concrete one whose structure, dtypes and shardings are used (its values are not).
            Its tree structure must match the saved one; leaves are cast to its dtypes. Without
            a target the saved structure comes back as nested dicts (an `nnx.State` as plain
            dicts) with the shardings recorded at save time.
        """
        self._check_open()
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {steps}"
            )
        abstract = None if target is None else jax.tree.map(_abstract_leaf, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _METADATA: ocp.args.JsonRestore()}
            ),
        )
        return restored[_STATE], dict(restored[_METADATA] or {})

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all kept checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the best `best_metric`; None without `best_metric` or checkpoints."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is committed; raises its error if it failed."""
        self._manager.wait_until_finished()
        self._purge_deleted()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads. Idempotent."""
        if self._closed:
            return
        self.wait()
        self._manager.close()
        self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer({str(self.directory)!r}) is closed")

    def _tracked_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
        if self.best_metric is None or metrics is None:
            return None
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"metrics[{key!r}] must be a scalar, got {value!r}") from err
        if self.best_metric not in values:
            raise ValueError(
                f"metrics lack best_metric {self.best_metric!r}; got keys {sorted(values)}"
            )
        return values

    def _purge_deleted(self) -> None:
        if jax.process_index() == 0 and (self.directory / _DELETED).exists():
            (self.directory / _DELETED).rmtree()


def _metric_value(metrics: Any, *, name: str, mode: str) -> float:
    """`metrics[name]` as orbax's best_fn; missing or non-finite values rank worst."""
    try:
        value = float(metrics[name])
    except (KeyError, TypeError, ValueError):
        value = math.nan
    if math.isfinite(value):
        return value
    return math.inf if mode == "min" else -math.inf


def _abstract_leaf(x: Any) -> Any:
    if isinstance(x, jax.Array):  # typed PRNG key arrays included
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x  # ShapeDtypeStruct, NumPy arrays (restored as NumPy), Python scalars


def _json_copy(obj: Any, name: str) -> Any:
    """A deep copy of `obj` through JSON: later mutation cannot reach an asynchronous save."""

    def scalar(o):
        if isinstance(o, np.generic | jax.Array) and np.ndim(o) == 0:
            return o.item()
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(obj, default=scalar))
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be JSON-serialisable: {err}") from err
