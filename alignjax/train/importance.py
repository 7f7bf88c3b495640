"""A run's importance mask (the `mask:` config): WAGLE's score pass through the model, the
baselines, and the masked optimizer.

    g_forget, g_retain = nll_gradients(state, loader, placement=placement)   # one data pass
    mask = compute_mask(cfg.mask, state, loader, placement=placement)        # bool pytree
    optimizer = mask_optimizer(optimizer, mask, mode="updates")

The score pass follows WAGLE's `snip_advanced` (specs/online.md 5.4): over one epoch of the
unlearning batches (each a forget batch and a retain batch, `data.UnlearnLoader`), the sum over
batches of the gradient of each batch's forget NLL and of its retain NLL, both HF token means
(the NLL summed over the batch's completion tokens over their number). It is one jitted
function per batch shape, placed like the training step: under a mesh the batch is a global
array and the accumulated gradients keep the parameters' shardings, so 1 and N devices give the
same sums to float rounding. One forward pass serves both gradients (two backward passes of
one `jax.vjp`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.losses.types import masked_sum
from alignjax.optim import importance as I
from alignjax.train.config import MASK_SCORES
from alignjax.train.forward import token_stats
from alignjax.train.placement import MeshPlacement, Placement, PmapPlacement
from alignjax.train.step import StepSpec

__all__ = ["build_score_step", "nll_gradients", "compute_mask", "mask_optimizer", "run_mask"]

log = logging.getLogger(__name__)


def _score_spec() -> StepSpec:
    return StepSpec(task="unlearn", loss="grad_ascent", reference="none",
                    row_blocks=jax.process_count())  # fmt: skip


def build_score_step(placement: Placement | None = None, *, donate: bool = True):
    """A jitted `(state, (g_forget, g_retain), batch) -> ((g_forget, g_retain), nlls)` adding
    one unlearning batch's forget and retain NLL gradients (HF token means) to the sums;
    `nlls` = [forget NLL, retain NLL] of the batch. Under a `MeshPlacement` (after
    `put_state`) the sums keep the parameters' shardings. `donate`: the sums' buffers are
    reused for the new sums."""
    spec = _score_spec()

    def fn(state, acc, batch):
        n = batch.valid.shape[0]

        def nlls(params):
            stats = token_stats(spec, state, params, batch)
            out = []
            for part in (slice(0, n), slice(n, None)):
                logps, mask = stats.logps[part], stats.mask[part]
                total = -jnp.sum(masked_sum(logps, mask))
                out.append(total / jnp.maximum(jnp.sum(mask != 0), 1).astype(total.dtype))
            return jnp.stack(out)

        values, vjp = jax.vjp(nlls, state.params)
        (g_f,) = vjp(jnp.array([1.0, 0.0], values.dtype))
        (g_r,) = vjp(jnp.array([0.0, 1.0], values.dtype))
        acc = (jax.tree.map(jnp.add, acc[0], g_f), jax.tree.map(jnp.add, acc[1], g_r))
        return acc, values

    if isinstance(placement, PmapPlacement):
        raise ValueError("the score pass runs on one device or a mesh (mesh.pmap=false)")
    kw = {}
    if isinstance(placement, MeshPlacement):
        if placement.shardings is None:
            raise ValueError("build_score_step needs placement.put_state first (the shardings)")
        replicated = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec())
        params = placement.shardings.params
        kw["out_shardings"] = ((params, params), replicated)
    return jax.jit(fn, donate_argnums=(1,) if donate else (), **kw)


def nll_gradients(state, loader, *, placement: Placement | None = None, epoch: int = 0,
                  max_batches: int | None = None, score_step=None) -> tuple[Any, Any]:  # fmt: skip
    """(g_forget, g_retain): the gradients of each batch's forget and retain NLL w.r.t.
    `state.params`, summed over `loader.epoch(epoch)` (an `UnlearnLoader`; at most
    `max_batches` batches), placed like the state. `score_step`: a `build_score_step` result
    to reuse (compiled once per batch shape)."""
    placement = placement or Placement()
    step = score_step or build_score_step(placement)
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p), state.params)
    acc = (zeros, jax.tree.map(jnp.copy, zeros))
    count = 0
    for k, batch in loader.epoch(epoch):
        if max_batches is not None and k >= max_batches:
            break
        acc, _ = step(state, acc, placement.put_batch(batch))
        count += 1
    if count == 0:
        raise ValueError("the score pass saw no batch (forget set smaller than one batch?)")
    return acc


def compute_mask(mask_cfg, state, loader=None, *, placement: Placement | None = None) -> Any:
    """The bool mask (host NumPy, the structure of `state.params`) that `mask_cfg` (a
    `config.MaskConfig`) asks for: the top `ratio` of the WAGLE / gradient / magnitude / random
    scores. "wagle" and "gradient" run `nll_gradients` over one epoch of `loader`."""
    placement = placement or Placement()
    score = mask_cfg.score
    if score in ("wagle", "gradient"):
        if loader is None:
            raise ValueError(f"mask.score={score!r} needs the unlearning batches (`loader`)")
        g_f, g_r = nll_gradients(state, loader, placement=placement)
        host = placement.host_state(state.replace(opt_state=(g_f, g_r)))
        params, (g_f, g_r) = host.params, host.opt_state
        scores = (I.wagle_scores(params, g_f, g_r, mu=mask_cfg.mu) if score == "wagle"
                  else I.gradient_scores(g_f))  # fmt: skip
    else:
        params = placement.host_state(state).params
        if score == "magnitude":
            scores = I.magnitude_scores(params)
        elif score == "random":
            scores = I.random_scores(params, mask_cfg.seed)
        else:
            raise ValueError(f"`mask.score` must be one of {list(MASK_SCORES)}, got {score!r}")
    mask = I.top_ratio_mask(scores, mask_cfg.ratio, per_matrix=mask_cfg.per_matrix)
    return jax.tree.map(lambda m: np.asarray(m, bool), mask)


def mask_optimizer(optimizer: optax.GradientTransformation, mask, mode: str = "updates"):
    """`optimizer` with `mask` applied: "updates" (`importance.masked_updates`, masked weights
    bitwise unchanged) or "gradients" (`importance.masked_gradients`, WAGLE's behaviour)."""
    if mode == "updates":
        return I.masked_updates(optimizer, mask)
    if mode == "gradients":
        return I.masked_gradients(optimizer, mask)
    raise ValueError(f"`mask.mode` must be 'updates' or 'gradients', got {mode!r}")


def _fraction(mask) -> float:
    leaves = [np.asarray(m) for m in jax.tree.leaves(mask)]
    return float(sum(int(m.sum()) for m in leaves) / max(sum(m.size for m in leaves), 1))


def run_mask(cfg, state, loader_fn, *, placement: Placement, out_dir: Path, is_main: bool):
    """A run's mask (None without `mask.score` / `mask.path`): `mask.path`; else the run's own
    `<out_dir>/mask.npz` when it exists (a resumed run, or `open_run`); else computed from the
    initial `state` (`compute_mask`, `loader_fn()` gives the unlearning batches) and saved
    there by the main process."""
    m = cfg.mask
    if m.score is None and m.path is None:
        return None
    saved = Path(out_dir) / "mask.npz"
    source = m.path if m.path is not None else (saved if saved.is_file() else None)
    like = jax.tree.map(lambda x: np.zeros(np.shape(x), bool), state.params)
    if source is not None:
        try:
            mask = I.load_mask(str(source), like)
        except ValueError as err:
            key = "mask.path" if m.path is not None else "the run's mask.npz"
            raise ValueError(f"{key}: {err}") from None
        mask = jax.tree.map(lambda x: np.asarray(x, bool), mask)
        log.info("mask: %s (%.4f of the weights trained)", source, _fraction(mask))
        return mask
    loader = loader_fn() if m.score in ("wagle", "gradient") else None
    mask = compute_mask(m, state, loader, placement=placement)
    if is_main:
        saved.parent.mkdir(parents=True, exist_ok=True)
        I.save_mask(str(saved), mask)
    log.info("mask: %s scores, ratio %g%s: %.4f of the weights trained; saved to %s", m.score,
             m.ratio, " per matrix" if m.per_matrix else "", _fraction(mask), saved)  # fmt: skip
    return mask
