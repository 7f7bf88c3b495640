"""D-Pruner through a Llama model: calibration inputs, general importance, masks, HF export.

D-Pruner (Zhang et al., NAACL 2024 Findings, arXiv:2405.06275; spec `online.md` 5.5, L557-584)
on `alignjax.models.LlamaForCausalLM`, with the pure pieces of `alignjax.optim.dpruner`:

    G = general_importance(model, calibration_batches)        # general.py, SparseGPT-based
    tx = optax.chain(generality_regularised(G, lr), optax.clip_by_global_norm(1.0),
                     optax.sgd(lr))                           # lomo.py: domain training
    ...train with tx...;  I = dual_importance(opt_state)
    masks = dpruner_masks(I, 0.52, model=model)               # save_model.py
    report = export_pruned(original_model, masks, out_dir)    # prunes the ORIGINAL weights

Every dict here is keyed by the `optim.path_string` path of a projection kernel in
`nnx.state(model, nnx.Param)` ("model/layers/0/self_attn/q_proj/kernel", ...), the keys of
`prune_llama_params`'s masks; arrays are in the kernel layout [d_in, d_out].
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from flax import nnx

from alignjax.optim.dpruner import (
    DPRUNER_LAMBDA,
    DPRUNER_SPARSITY,
    LLAMA_PROJECTIONS,
    PERCDAMP,
    _check_sparsity,
    _float,
    _kernels,
    dead_inputs,
    dual_importance_step,
    hessian_finalize,
    hessian_init,
    hessian_update,
    is_llama_projection,
    obs_importance,
    percentile_prune_mask,
    prune_llama_params,
    regularised_gradient,
    sparsity_report,
)
from alignjax.optim.labels import path_string

# Which captured input feeds which projection: q/k/v read the input-normed residual stream,
# o_proj the attention heads, gate/up the post-attention-normed stream, down_proj silu(gate)*up.
INPUT_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp",
}
ITERATIVE_BLOCKS = 32  # save_model_iterative.py: 32 blocks per matrix (128 of 4096, 344 of 11008)


def projection_path(layer: int, proj: str) -> str:
    """The `path_string` of layer `layer`'s `proj` kernel, e.g. (0, "q_proj") ->
    "model/layers/0/self_attn/q_proj/kernel"."""
    group = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model/layers/{layer}/{group}/{proj}/kernel"


def _num_layers(model: nnx.Module) -> int:
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError("`model` must be an `alignjax.models.LlamaForCausalLM`")
    return len(model.model.layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "layers"))
def _group_inputs(graphdef, params, rest, input_ids, attention_mask, layers):
    """Per layer in `layers` the four distinct projection inputs [B, T, d], 0 on padding, from
    the model's public outputs (hidden states, activations) and its public norm and o_proj
    modules: attn_in = input_layernorm(h), mid = h + o_proj(attn), mlp_in =
    post_attention_layernorm(mid), exactly as `DecoderLayer.__call__` computes them."""
    model = nnx.merge(graphdef, params, rest)
    out = model(input_ids, attention_mask, output_hidden_states=True, output_activations=True)
    keep = (attention_mask == 1)[..., None]
    groups = {}
    for i in layers:
        layer, h, acts = model.model.layers[i], out.hidden_states[i], out.activations[i]
        mid = h + layer.self_attn.o_proj(acts["attn"])
        found = {
            "attn_in": layer.input_layernorm(h),
            "attn": acts["attn"],
            "mlp_in": layer.post_attention_layernorm(mid),
            "mlp": acts["mlp"],
        }
        groups[i] = {k: jnp.where(keep, v, jnp.zeros((), v.dtype)) for k, v in found.items()}
    return groups


def _batch(input_ids: Any, attention_mask: Any, name: str) -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"`{name}`: input_ids must be an int [B, T] array, got {ids.shape}")
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"`{name}`: attention_mask {mask.shape} does not match {ids.shape}")
    if not bool(jnp.any(mask == 1)):
        raise ValueError(f"`{name}`: a calibration batch has no real token (attention_mask == 1)")
    return ids, mask.astype(jnp.int32)


def _split(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def projection_inputs(
    model: nnx.Module, input_ids: Any, attention_mask: Any = None
) -> dict[str, jax.Array]:
    """The inputs [N, d_in] of the seven projections of every layer on a calibration batch,
    N = the real tokens (attention_mask == 1) in row-major order: what `general.py`'s forward
    hooks feed `add_batch` (spec L562-563), from the model's public outputs
    (`output_hidden_states`, `output_activations`) and its norms; q/k/v (and gate/up) share one
    array. Keys: the kernels' `path_string` paths in `nnx.state(model, nnx.Param)`.

    Example:
      >>> from alignjax import models
      >>> cfg = models.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
      ...                          num_hidden_layers=1, num_attention_heads=2)
      >>> model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
      >>> x = projection_inputs(model, jnp.array([[5, 2, 3]]), jnp.array([[0, 1, 1]]))
      >>> x["model/layers/0/mlp/down_proj/kernel"].shape  # 2 real tokens, intermediate 12
      (2, 12)
    """
    ids, mask = _batch(input_ids, attention_mask, "input_ids")
    layers = tuple(range(_num_layers(model)))
    groups = _group_inputs(*_split(model), ids, mask, layers)
    real = np.asarray(mask) == 1
    return {
        projection_path(i, proj): groups[i][INPUT_OF[proj]][real]
        for i in layers
        for proj in LLAMA_PROJECTIONS
    }


def _calibration(batches: Any) -> list[tuple[jax.Array, jax.Array]]:
    if isinstance(batches, (np.ndarray, jax.Array)) or isinstance(batches, Mapping):
        batches = [batches]
    out = []
    for b in batches if isinstance(batches, Iterable) else ():
        if isinstance(b, Mapping):
            ids, mask = b.get("input_ids"), b.get("attention_mask")
        elif isinstance(b, tuple):
            ids, mask = b if len(b) == 2 else (b[0], None)
        else:
            ids, mask = b, None
        out.append(_batch(ids, mask, "calibration_batches"))
    if not out:
        raise ValueError("`calibration_batches` must hold at least one batch")
    return out


def _hessians(states: dict, groups: dict, mask: jax.Array) -> dict:
    """`hessian_update` with the rows holding a real token: H counts sequences, as the code's
    `nsamples` (one per calibration sample); padding inputs are 0, so they add nothing."""
    rows = np.asarray(jnp.any(mask == 1, axis=1))
    for i, inputs in groups.items():
        for name, x in inputs.items():
            key = (i, name)
            if key not in states:
                states[key] = hessian_init(x.shape[-1], jnp.promote_types(x.dtype, jnp.float32))
            states[key] = hessian_update(states[key], x[rows])
    return states


def general_importance(
    model: nnx.Module,
    calibration_batches: Any,
    *,
    sparsity: float = DPRUNER_SPARSITY,
    percdamp: float = PERCDAMP,
    blocksize: int = 128,
    sequential: bool = True,
) -> dict[str, jax.Array]:
    """D-Pruner's general importance G per projection kernel (`general.py::llama_sequential`
    and `fasterprune`, spec L560-567), [d_in, d_out] like the kernel.

    Layer by layer: the Hessian H = (2 / n_seq) sum x x^T of each projection's inputs over the
    real tokens of all `calibration_batches` (streamed with `hessian_update`; each batch is an
    int [B, T] array, an (input_ids, attention_mask) pair or a dict with those keys), dead
    inputs and damping `percdamp` (`hessian_finalize`), then `obs_importance` (SparseGPT's
    block-wise score and pruning at `sparsity`, `blocksize` input columns per block). The seven
    inputs of a layer are captured in one pass with that layer's weights unpruned (the code's
    default, without `--true-sequential`). With `sequential` (the code) the inputs of layer i
    are computed with layers < i replaced by their SparseGPT-pruned, OBS-updated weights; else
    all layers see the original model. `model` is not modified.

    Each layer's inputs come from a full forward of the model (its public outputs), one
    compilation per layer when `sequential`.
    """
    sparsity = _check_sparsity(sparsity)
    n_layers = _num_layers(model)
    batches = _calibration(calibration_batches)
    graphdef, params, rest = _split(model)
    current = dict(_kernels(params))
    order = [(i,) for i in range(n_layers)] if sequential else [tuple(range(n_layers))]
    G = {}
    for layers in order:
        now = jtu.tree_map_with_path(lambda p, v: current.get(path_string(p), v), params)
        states = {}
        for ids, mask in batches:
            states = _hessians(states, _group_inputs(graphdef, now, rest, ids, mask, layers), mask)
        for i in layers:
            for proj in LLAMA_PROJECTIONS:
                path, state = projection_path(i, proj), states[(i, INPUT_OF[proj])]
                w = current[path]
                G[path], pruned = obs_importance(
                    w,
                    hessian_finalize(state, percdamp),
                    blocksize=blocksize,
                    sparsity=sparsity,
                    dead=dead_inputs(state.h),
                    return_pruned=True,
                )
                current[path] = pruned.astype(w.dtype)
    return G


def dpruner_masks(
    importance: Mapping[str, Any],
    sparsity: float = DPRUNER_SPARSITY,
    per_block: bool | int = False,
    *,
    model: nnx.Module | None = None,
) -> dict[str, jax.Array]:
    """Masks (path -> bool, False = pruned) for `prune_llama_params` from the dual importance I
    (`dual_importance`): per matrix, I <= its `sparsity` percentile is pruned
    (`save_model.py`, spec L578-579; `percentile_prune_mask`). `per_block`: thresholds per
    block of input rows as `save_model_iterative.py` (spec L580): True = 32 blocks per matrix
    (d_in // 32 rows: 128 of Llama-2-7B's 4096, 344 of down_proj's 11008), an int = that many
    rows per block.

    Every layer named in `importance` must have all seven projections; with `model`, exactly
    the seven projections of each of its layers.
    """
    sparsity = _check_sparsity(sparsity)
    if not isinstance(importance, Mapping) or not importance:
        raise ValueError("`importance` must be a non-empty mapping of projection paths")
    bad = [k for k in importance if not is_llama_projection(k)]
    if bad:
        raise ValueError(f"`importance` keys {bad} are not Llama projection kernels")
    if isinstance(per_block, bool):
        block_of = (lambda d: max(1, d // ITERATIVE_BLOCKS)) if per_block else (lambda d: None)
    elif isinstance(per_block, (int, np.integer)) and per_block > 0:
        block_of = lambda d: int(per_block)  # noqa: E731
    else:
        raise ValueError(f"`per_block` must be a bool or a positive int, got {per_block!r}")
    layers = {int(k.split("/")[-4]) for k in importance}
    if model is not None:
        layers = set(range(_num_layers(model)))
        extra = set(importance) - {projection_path(i, p) for i in layers for p in LLAMA_PROJECTIONS}
        if extra:
            raise ValueError(f"`importance` keys {sorted(extra)} are not kernels of `model`")
    missing = [
        projection_path(i, p)
        for i in sorted(layers)
        for p in LLAMA_PROJECTIONS
        if projection_path(i, p) not in importance
    ]
    if missing:
        raise ValueError(f"`importance` has no entry for the projections {missing}")
    return {
        k: percentile_prune_mask(v, sparsity, block=block_of(np.shape(v)[0]))
        for k, v in importance.items()
    }


def prune_model(model: nnx.Module, masks: Mapping[str, Any]) -> nnx.Module:
    """A copy of `model` with its projection kernels pruned by `masks` (`prune_llama_params`);
    `model` itself is unchanged. Give it the ORIGINAL (pre-domain-training) model, as
    `save_model.py` does (spec L579)."""
    graphdef, params, rest = _split(model)
    return nnx.merge(graphdef, prune_llama_params(params, masks), jax.tree.map(jnp.copy, rest))


def export_pruned(
    model: nnx.Module, masks: Mapping[str, Any], out_dir: str | Path, *, dtype: Any = None
) -> dict[str, Any]:
    """Prune `model` (the original weights, `prune_model`) and write it with
    `models.save_pretrained` (config.json + model.safetensors, in `dtype` if given) so that
    transformers loads it; returns its `sparsity_report` (per matrix, over the seven
    projections, and over all parameters: `save_model.py`'s count of zeros)."""
    from alignjax.models import save_pretrained

    pruned = prune_model(model, masks)
    save_pretrained(pruned, out_dir, dtype=dtype)
    return sparsity_report(nnx.state(pruned, nnx.Param))


# ----------------------------------------------------------------------------- domain training


class GeneralityRegularisedState(NamedTuple):
    """`count` of updates, the general importance G and the dual importance I (path -> array)."""

    count: jax.Array
    general: dict[str, jax.Array]
    importance: dict[str, jax.Array]


def generality_regularised(
    G: Mapping[str, Any], lr: float | optax.Schedule, lam: float = DPRUNER_LAMBDA
) -> optax.GradientTransformation:
    """D-Pruner's domain-training step as an optax transform (`lomo.py::fuse_update_zero3`,
    spec L568-577), to put FIRST in a chain, e.g. `optax.chain(generality_regularised(G, lr),
    optax.clip_by_global_norm(1.0), optax.sgd(lr))` (the code clips the regularised gradient).

    Each kernel named in `G` (`path_string` -> G of its shape, e.g. `general_importance`) gets
    `regularised_gradient(g, G, lr(count), lam)` instead of its gradient, and the state's dual
    importance accumulates `dual_importance_step(I, g', theta)` with theta the `params` passed
    to `update` (the weights before this step). Other leaves pass through unchanged. `lr`: the
    learning rate of the SGD step, a float or an optax schedule of the update count (the code
    uses the scheduled rate). Read I with `dual_importance(opt_state)`.
    """
    if not isinstance(G, Mapping) or not G:
        raise ValueError("`G` must be a non-empty mapping of parameter paths to importance")
    lr_fn = lr if callable(lr) else (lambda _: lr)

    def init_fn(params):
        leaves = _kernels(params)
        for key, g in G.items():
            if key not in leaves:
                raise ValueError(f"`G` key {key!r} is not a parameter path of `params`")
            if np.shape(g) != np.shape(leaves[key]):
                raise ValueError(f"`G` {key!r} has shape {np.shape(g)}, the parameter differs")
        general = {k: jnp.asarray(g, _float(g)) for k, g in G.items()}
        zeros = {k: jnp.zeros(np.shape(g), _float(leaves[k])) for k, g in G.items()}
        return GeneralityRegularisedState(jnp.zeros((), jnp.int32), general, zeros)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("`generality_regularised` needs `params` (theta) in `update`")
        rate = lr_fn(state.count)
        thetas = _kernels(params)
        importance = dict(state.importance)

        def regularise(path, g):
            key = path_string(path)
            if key not in state.general:
                return g
            g_reg = regularised_gradient(g, state.general[key], rate, lam)
            importance[key] = dual_importance_step(importance[key], g_reg, thetas[key])
            return g_reg.astype(jnp.result_type(g))

        updates = jtu.tree_map_with_path(regularise, updates)
        count = optax.safe_increment(state.count)
        return updates, GeneralityRegularisedState(count, state.general, importance)

    return optax.GradientTransformation(init_fn, update_fn)


def dual_importance(opt_state: Any) -> dict[str, jax.Array]:
    """The dual importance I (path -> array) of the `generality_regularised` state found in a
    (nested: chain, partition, inject_hyperparams) optax state."""
    is_state = lambda x: isinstance(x, GeneralityRegularisedState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
    if len(found) != 1:
        raise ValueError(
            f"`opt_state` holds {len(found)} `generality_regularised` states, expected one"
        )
    return found[0].importance


__all__ = [
    "GeneralityRegularisedState",
    "dual_importance",
    "generality_regularised",
    "INPUT_OF",
    "ITERATIVE_BLOCKS",
    "dpruner_masks",
    "export_pruned",
    "general_importance",
    "projection_inputs",
    "projection_path",
    "prune_model",
]
