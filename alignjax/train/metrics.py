"""Run metrics: a JSON-lines log, TensorBoard scalars, and a tqdm progress bar.

    with MetricsWriter(out_dir) as writer, Progress(num_steps) as bar:
        for step in range(num_steps):
            state, metrics = train_step(state, batch)
            writer.write(step, metrics)                     # TRL names: "rewards/chosen", ...
            writer.write(step, eval_metrics, prefix="eval/")
            bar.update(tokens=batch_tokens, loss=metrics["loss"])

`out_dir/metrics.jsonl` gets one line per `write`: `{"step": 10, "loss": 0.69, ...}`, flushed at
once, so a crashed run keeps every row it logged. JSON has no NaN or infinity: such values are
written as `null` and named in the row's `nonfinite` list. `out_dir/tb/` holds the same scalars
as TensorBoard events (tensorboardX). A resumed run passes `purge_step` (the first step it will
log again) so that neither file keeps the rows of the steps it repeats.

Under multi-process JAX only process 0 writes or draws; the other processes get no-op objects,
so the training loop needs no `if jax.process_index() == 0`. Converting a device scalar to a
float waits for it: log every few steps, not every step, in a fast loop. `plot_curves` draws a
run's metrics.jsonl as a PNG (loss, reward accuracy and margins, log-probs, NLL).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from time import perf_counter
from typing import IO, Any

import jax
import numpy as np
from tqdm.auto import tqdm

__all__ = ["MetricsWriter", "Progress", "read_jsonl", "plot_curves"]

_RESERVED = ("step", "nonfinite")


class MetricsWriter:
    """Appends scalar metrics to `out_dir/metrics.jsonl` and to TensorBoard (`out_dir/tb/`).

    Args:
      out_dir: the run's output directory (created).
      tensorboard: also write TensorBoard event files.
      purge_step: when resuming, the first step that will be logged again: rows (and
        TensorBoard events) at this step or later are dropped.

    Example:
      >>> with MetricsWriter("/tmp/run") as writer:  # doctest: +SKIP
      ...     writer.write(1, {"loss": 0.69, "rewards/chosen": jnp.float32(0.1)})
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, tensorboard: bool = True, purge_step: int | None = None
    ):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._file: IO[str] | None = None
        self._tb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if purge_step is not None and self.path.exists():
            _purge_jsonl(self.path, purge_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names the file after the time in whole seconds and opens it with "wb":
            # a writer reopened within the same second would truncate the first one's events.
            self._tb = SummaryWriter(
                logdir=str(self.out_dir / "tb"),
                purge_step=purge_step,
                filename_suffix=f".{time.time_ns()}",
            )

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Logs the scalar `metrics` of `step`, each name prefixed with `prefix`.

        Values may be Python numbers, NumPy or JAX scalars (0-d arrays); integers stay integers,
        everything else becomes a Python float.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter({str(self.out_dir)!r}) is closed")
        step = int(step)
        row: dict[str, Any] = {"step": step}
        nonfinite = []
        for name, value in metrics.items():
            key = f"{prefix}{name}"
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved ({_RESERVED})")
            number = _to_number(key, value)
            if math.isfinite(number):
                row[key] = number
            else:
                row[key] = None
                nonfinite.append(key)
            if self._tb is not None:
                self._tb.add_scalar(key, float(number), global_step=step)
        if nonfinite:
            row["nonfinite"] = nonfinite
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file; a last line cut short by a crash is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1]:  # no trailing newline: the last write did not finish
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


class Progress:
    """A tqdm bar over `total` steps with the latest loss (or any postfix), tokens/s and ETA.

    Args:
      total: number of steps of the run (None if unknown: no ETA).
      initial: steps already done (a resumed run), so that the ETA is right.
      enabled: draw the bar at all; it is also off on every JAX process but 0.
      desc: the bar's label.
      file: where to draw (default stderr).
      smoothing: weight of the newest interval in the tokens/s moving average.
      **tqdm_kwargs: passed on to `tqdm` (e.g. `mininterval`, `leave`, `position`).

    Example:
      >>> with Progress(100, file=io.StringIO()) as bar:  # doctest: +SKIP
      ...     bar.update(tokens=4096, loss=0.69)
    """

    def __init__(
        self,
        total: int | None,
        *,
        initial: int = 0,
        enabled: bool = True,
        desc: str = "train",
        file: IO[str] | None = None,
        smoothing: float = 0.3,
        **tqdm_kwargs: Any,
    ):
        self.enabled = bool(enabled) and jax.process_index() == 0
        self.smoothing = smoothing
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            file=file if file is not None else sys.stderr,
            disable=not self.enabled,
            **{"dynamic_ncols": True, **tqdm_kwargs},
        )
        self._last = perf_counter()
        self.tokens = 0
        self.tokens_per_second: float | None = None

    def update(self, n_steps: int = 1, *, tokens: Any = 0, **postfix: Any) -> None:
        """Advances by `n_steps`, counting `tokens` processed in them; `postfix` values (e.g.
        `loss=...`) are shown next to the bar, numbers with 4 significant digits."""
        if not self.enabled:
            return
        now = perf_counter()
        tokens = int(tokens)
        self.tokens += tokens
        if tokens:
            rate = tokens / max(now - self._last, 1e-9)
            previous = self.tokens_per_second
            if previous is not None:
                rate = self.smoothing * rate + (1 - self.smoothing) * previous
            self.tokens_per_second = rate
        self._last = now
        shown = {name: _format(value) for name, value in postfix.items()}
        if self.tokens_per_second is not None:
            shown["tok/s"] = f"{self.tokens_per_second:.3g}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n_steps)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _to_number(name: str, value: Any) -> int | float:
    if np.ndim(value) != 0:
        raise TypeError(f"metric {name!r} must be a scalar, got shape {np.shape(value)}")
    if np.asarray(value).dtype.kind in "iub":
        return int(value)
    if np.iscomplexobj(value):
        raise TypeError(f"metric {name!r} must be a real number, got {value!r}")
    return float(value)  # float16/32/64 and bfloat16


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _purge_jsonl(path: Path, purge_step: int) -> None:
    kept = [row for row in read_jsonl(path) if row.get("step", -1) < purge_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(tmp, path)


def plot_curves(metrics_path: str | Path, png: str | Path) -> Path:
    """A PNG of loss, reward accuracy / margins and eval metrics against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    panels = [
        ("loss", ["train/loss", "eval/loss"]),
        ("reward accuracy", ["train/rewards/accuracies", "eval/rewards/accuracies"]),
        ("reward margin", ["train/rewards/margins", "eval/rewards/margins"]),
        ("log-prob", ["train/logps/chosen", "train/logps/rejected", "eval/logps/chosen",
                      "eval/logps/rejected"]),
        ("NLL", ["train/nll/chosen", "eval/nll", "eval/nll/chosen"]),
    ]  # fmt: skip
    panels = [(t, [k for k in keys if any(k in r for r in rows)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2))
    axes = np.atleast_1d(axes)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            pts = [(s, v) for s, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                style = "o-" if key.startswith("eval/") else "-"
                ax.plot(*zip(*pts), style, label=key, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
