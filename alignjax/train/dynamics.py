"""DPO-dynamics diagnostics (specs/online.md section 7): how a paired run moves the likelihood of
held-out chosen and rejected responses, and of responses in neither set.

    recorder = DynamicsRecorder(out_dir / BASELINE_FILE)
    values = held_out_values(E.eval_examples(state, eval_step, loader), probe_examples)
    metrics = recorder.record(step, values, save=True)   # step 0 sets (and saves) the baseline

Every paired run with an eval split logs these at every evaluation (before the first step,
every `eval_every` steps, at the end), as `eval/dynamics/...` in metrics.jsonl next to
`eval/logps/chosen` / `eval/logps/rejected`. With `logp` the sequence log-prob of a completion
under the policy, `i` over the real held-out pairs, `(0)` the same example at step 0:

- `dynamics/delta_logps/chosen`, `dynamics/delta_logps/rejected`: mean_i logp_i(t) - logp_i(0).
  The rejected one's "drastic drop" (Yan et al., arXiv 2406.07327); the chosen one is Won et
  al.'s regime indicator (arXiv 2505.23761: rising = reinforcement, falling = smoothing).
- `dynamics/delta_ratio`: delta_logps/rejected / delta_logps/chosen; logged only when
  |delta_logps/chosen| >= `RATIO_FLOOR` (1e-3 nats), so never at step 0.
- `dynamics/displacement`: the fraction of pairs with logp_w,i(t) < logp_w,i(0) (likelihood
  displacement: the chosen response lost probability).
- `dynamics/log_grad_ratio`: mean_i logp_w,i - logp_l,i = mean_i log(pi(y_w) / pi(y_l)). With
  u the DPO margin, dL/dpi(y_w) = -beta (1 - s(u)) / pi(y_w) and dL/dpi(y_l) =
  +beta (1 - s(u)) / pi(y_l), so pi(y_w) / pi(y_l) = |dL/dpi(y_l)| / |dL/dpi(y_w)|: the log of
  the probability-space gradient ratio, rejected over chosen. Positive: the rejected response's
  probability gets the larger push. Logged in log space because the ratio of two sequence
  probabilities over- or underflows even float64 (exp(+-700)), and its mean over pairs would
  be one pair's.
- `dynamics/log_grad_ratio/per_token`: mean_i logp_w,i / n_w,i - logp_l,i / n_l,i (n:
  completion tokens), the same ratio of geometric-mean per-token probabilities.

Dispersion probe (`data.probe`: a fixed held-out set of reference samples, prompt-completion or
text rows in neither set of pairs; `j` over its rows):

- `dynamics/probe/logps`: mean_j logp_j(t);
- `dynamics/probe/delta_logps`: mean_j logp_j(t) - logp_j(0) (rising while chosen and rejected
  both fall: probability mass dispersed to responses in neither set);
- `dynamics/probe/entropy`: the policy's next-token entropy, averaged over every completion
  position of the probe (a token mean, like `eval/nll`).

Design. The pairs' diagnostics come from the evaluation's own per-example log-probs
(`evaluate.eval_examples`), so they cost no second forward pass and are exact over the split
on one device, a mesh, pmap or several processes alike. They are measured on held-out pairs,
not the training batches: "since step 0" needs the same examples every time, and the training
batches change every step. The probe is one more forward pass per evaluation over its rows
(`build_probe_step`), its log-probs and entropies from one fused LM-head pass
(`ops.fused_token_stats(entropy=True)`; no `[B, T, V]` logits).

The step-0 baseline is the evaluation of the initial state that the trainer runs before the
first step. `DynamicsRecorder` keeps its per-example values and the main process saves them
to `<out_dir>/dynamics_baseline.npz` (float32 as computed, so a resumed run subtracts the very
same numbers: its metrics are bitwise an uninterrupted run's). A resumed run, `open_run` and
`alignjax eval` read it back. The file is a cache of a deterministic quantity (the initial state
on the held-out sets): when it is missing or was written for other held-out sets (its token
counts differ), the session recomputes it from the initial state. As with `mask.npz`, several
processes share the run directory.

A toy-model fact the tests check (tests/test_dynamics.py): with one pair and a softmax over
*independent* logits (a table), gradient flow gives d logp_w/dt = c (1 - pi_w + pi_l) > 0, so
displacement needs parameters shared between responses (logits = E theta with similar
embeddings for y_w and y_l), where d logp_l/dt < d logp_w/dt < 0 and the mass outside the pair
grows (dispersion).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import ops
from alignjax.losses.types import masked_sum
from alignjax.train.forward import policy_outputs
from alignjax.train.state import TrainState, model_of

__all__ = [
    "BASELINE_FILE",
    "RATIO_FLOOR",
    "PAIR_KEYS",
    "PROBE_KEYS",
    "pair_dynamics",
    "probe_dynamics",
    "dynamics_metrics",
    "held_out_values",
    "DynamicsRecorder",
    "save_baseline",
    "load_baseline",
    "build_probe_step",
    "load_probe",
]

log = logging.getLogger(__name__)

BASELINE_FILE = "dynamics_baseline.npz"
RATIO_FLOOR = 1e-3  # nats: below this change of the chosen log-prob, delta_ratio is not logged
PAIR_KEYS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
PROBE_KEYS = ("probe_logps", "probe_entropy", "probe_tokens")


def _f64(name: str, x, like=None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array of per-example values, got "
                         f"shape {x.shape}")  # fmt: skip
    if like is not None and x.shape != like.shape:
        raise ValueError(f"`{name}` has shape {x.shape}, the other per-example arrays "
                         f"{like.shape}")  # fmt: skip
    return x


def pair_dynamics(
    chosen_logps,
    rejected_logps,
    chosen_logps0,
    rejected_logps0,
    *,
    chosen_tokens=None,
    rejected_tokens=None,
    ratio_floor: float = RATIO_FLOOR,
) -> dict[str, float]:
    """The held-out pairs' `dynamics/*` (module docstring) from per-example sequence log-probs
    now and at step 0 (`[N]` each, float64 arithmetic); with the completion token counts also
    `dynamics/log_grad_ratio/per_token`."""
    c = _f64("chosen_logps", chosen_logps)
    others = {"rejected_logps": rejected_logps, "chosen_logps0": chosen_logps0,
              "rejected_logps0": rejected_logps0}  # fmt: skip
    r, c0, r0 = (_f64(name, x, c) for name, x in others.items())
    dc, dr = float(np.mean(c - c0)), float(np.mean(r - r0))
    out = {
        "dynamics/delta_logps/chosen": dc,
        "dynamics/delta_logps/rejected": dr,
        "dynamics/displacement": float(np.mean(c < c0)),
        "dynamics/log_grad_ratio": float(np.mean(c - r)),
    }
    if chosen_tokens is not None and rejected_tokens is not None:
        nc = np.maximum(_f64("chosen_tokens", chosen_tokens, c), 1.0)
        nr = np.maximum(_f64("rejected_tokens", rejected_tokens, c), 1.0)
        out["dynamics/log_grad_ratio/per_token"] = float(np.mean(c / nc - r / nr))
    if abs(dc) >= ratio_floor:
        out["dynamics/delta_ratio"] = dr / dc
    return out


def probe_dynamics(logps, logps0, entropy, tokens) -> dict[str, float]:
    """The dispersion probe's `dynamics/probe/*` from its per-row sequence log-probs now and at
    step 0, per-row sums of the per-token entropy and completion token counts (`[M]` each)."""
    lp = _f64("logps", logps)
    others = {"logps0": logps0, "entropy": entropy, "tokens": tokens}
    lp0, h, n = (_f64(name, x, lp) for name, x in others.items())
    return {
        "dynamics/probe/logps": float(np.mean(lp)),
        "dynamics/probe/delta_logps": float(np.mean(lp - lp0)),
        "dynamics/probe/entropy": float(np.sum(h) / max(float(np.sum(n)), 1.0)),
    }


def dynamics_metrics(values: Mapping, baseline: Mapping, *, ratio_floor=RATIO_FLOOR) -> dict:
    """`pair_dynamics` (and `probe_dynamics` when `values` hold the probe's) of `held_out_values`
    against the baseline's."""
    out = pair_dynamics(
        values["chosen_logps"], values["rejected_logps"], baseline["chosen_logps"],
        baseline["rejected_logps"], chosen_tokens=values["chosen_tokens"],
        rejected_tokens=values["rejected_tokens"], ratio_floor=ratio_floor,
    )  # fmt: skip
    if "probe_logps" in values:
        out.update(probe_dynamics(values["probe_logps"], baseline["probe_logps"],
                                  values["probe_entropy"], values["probe_tokens"]))  # fmt: skip
    return out


def held_out_values(examples: Mapping, probe: Mapping | None = None) -> dict[str, np.ndarray]:
    """The real examples' `PAIR_KEYS` of `evaluate.eval_examples`' arrays (a paired eval step),
    and `PROBE_KEYS` of the probe step's (`build_probe_step`), padding rows dropped."""
    keep = np.asarray(examples["valid"]) != 0
    out = {k: np.asarray(examples[k])[keep] for k in PAIR_KEYS}
    if probe is not None:
        keep = np.asarray(probe["valid"]) != 0
        out.update({k: np.asarray(probe[k.removeprefix("probe_")])[keep] for k in PROBE_KEYS})
    return out


def save_baseline(path: str | os.PathLike, values: Mapping) -> Path:
    """`values` as an .npz, written to a temporary file and renamed (a killed run never leaves
    half a baseline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in values.items()})
    os.replace(tmp, path)
    return path


def load_baseline(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `save_baseline` file; a ValueError names it when it lacks the pairs' arrays."""
    with np.load(path) as f:
        values = {k: f[k] for k in f.files}
    missing = [k for k in PAIR_KEYS if k not in values]
    if missing:
        raise ValueError(f"{str(path)!r} is not a dynamics baseline: it lacks {missing}")
    return values


class DynamicsRecorder:
    """Keeps a run's step-0 held-out values and turns later ones into `dynamics/*`.

    Args:
      path: where `record(0, ..., save=True)` saves the baseline and where a resumed run's
        recorder finds it (None: memory only).
      ratio_floor: see `pair_dynamics`.

    Example:
      >>> rec = DynamicsRecorder()
      >>> v0 = {"chosen_logps": np.array([-3.0, -5.0]), "rejected_logps": np.array([-4.0, -4.0]),
      ...       "chosen_tokens": np.array([2.0, 3.0]), "rejected_tokens": np.array([2.0, 2.0])}
      >>> rec.record(0, v0)["dynamics/delta_logps/chosen"]
      0.0
      >>> v1 = dict(v0, chosen_logps=np.array([-3.5, -4.0]))
      >>> rec.record(10, v1)["dynamics/displacement"]
      0.5
    """

    def __init__(self, path: str | os.PathLike | None = None, *, ratio_floor: float = RATIO_FLOOR):
        self.path = None if path is None else Path(path)
        self.ratio_floor = ratio_floor
        self.baseline: dict[str, np.ndarray] | None = None

    def ready(self, values: Mapping) -> bool:
        """Whether a baseline for these held-out sets is at hand (read from `path` if none is
        in memory): the same arrays, and the same completion token counts per example."""
        if self.baseline is None and self.path is not None and self.path.is_file():
            self.baseline = load_baseline(self.path)
        b = self.baseline
        if b is None or set(b) != set(values):
            return False
        return all(
            np.shape(b[k]) == np.shape(values[k])
            and (not k.endswith("_tokens") or np.array_equal(b[k], values[k]))
            for k in values
        )

    def record(self, step: int, values: Mapping, *, save: bool = False) -> dict[str, float]:
        """`dynamics/*` of `held_out_values` at `step`; step 0 makes them the baseline (and
        saves it to `path` when `save`). A later step without a matching baseline (`ready`)
        is a ValueError."""
        values = {k: np.asarray(v) for k, v in values.items()}
        if step == 0:
            self.baseline = values
            if save and self.path is not None:
                save_baseline(self.path, values)
        elif not self.ready(values):
            where = "" if self.path is None else f" (nor a matching {str(self.path)!r})"
            raise ValueError(f"step {step}: no step-0 baseline of these held-out values in "
                             f"memory{where}; record step 0 first")  # fmt: skip
        return dynamics_metrics(values, self.baseline, ratio_floor=self.ratio_floor)


def build_probe_step() -> Callable:
    """A jitted `(state, batch) -> {"logps", "entropy", "tokens", "valid"}` over single-side
    rows (prompt-completion or text): each row's completion log-prob, its sum of the policy's
    per-token entropies and its completion token count, from one fused LM-head pass."""

    def step(state: TrainState, batch):
        out, w = policy_outputs(model_of(state), batch)
        mask = batch.loss_mask
        stats = ops.fused_token_stats(out.last_hidden_state, w, batch.labels, mask, entropy=True)
        return {
            "logps": masked_sum(stats.logps, mask),
            "entropy": masked_sum(stats.entropy, mask),
            "tokens": jnp.sum(mask, axis=-1).astype(jnp.float32),
            "valid": batch.valid,
        }

    return jax.jit(step)


def load_probe(cfg, tokenizer):
    """`data.probe` tokenized as SFT rows (prompt-completion or text, columns detected; the run's
    `data.columns` / `data.format` describe its pairs, not the probe), or None; a ValueError
    names the key."""
    source = cfg.data.probe
    if source is None:
        return None
    from alignjax.train.data import load_split

    path = source.partition("::")[0]
    if not source.startswith("shipped:") and not Path(path).exists():
        raise FileNotFoundError(f"`data.probe`: {path!r} does not exist")
    data_cfg = dataclasses.replace(cfg.data, columns={}, format=None)
    try:
        probe = load_split(source, SimpleNamespace(data=data_cfg), tokenizer, "sft")
    except ValueError as err:
        raise ValueError(f"`data.probe`: {err}") from err
    if len(probe) == 0:
        raise ValueError(f"`data.probe` {source!r}: no row left after tokenization")
    log.info("data.probe: %d reference samples from %s", len(probe), source)
    return probe
