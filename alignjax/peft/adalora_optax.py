"""AdaLoRA's rank allocation (Zhang et al. 2023, arXiv:2303.10512) as an optax wrapper, for
jitted training steps that only call `tx.update(grads, opt_state, params)` and
`optax.apply_updates` (specs/peft.md sections 3.3-3.4).

PEFT's loop is `loss.backward(); optimizer.step(); model.update_and_allocate(i)`, with `i`
the 0-based index of the optimizer step just taken: the allocator scores the *updated* params
with the grads of that step, then zeroes pruned singular values `e`. `with_rank_allocation`
does the same inside `update`: it computes the inner optimizer's updates `u`, forms
`new = params + u`, runs `adalora_allocator.update_and_allocate(new, grads, state, i, cfg)` and
returns `u` except at pruned `e` entries, where it returns `-params`, so that
`apply_updates` gives exactly 0.0 there. Everything else in the tree passes through.

AdaLoRA layers are found in any params pytree (an `nnx.State`, nested dicts, alignjax's
`{"policy": ..., "heads": ...}`) as the leaves `lora_a`, `lora_e`, `lora_b` under one parent;
the layer's name is the parent path joined with "/" (a leading "policy" key dropped), i.e. the
module path that `peft.apply` / `peft.adalora_triplets` report.

Example (the wrapper must see the whole optimizer, so put it last in a chain):

    >>> from flax import nnx
    >>> from alignjax import peft
    >>> model = nnx.Module()
    >>> model.proj = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    >>> peft.apply(model, [peft.Rule("proj", "adalora", rank=4)], rngs=nnx.Rngs(1))
    ['proj']
    >>> params = nnx.state(model, peft.AdapterParam)
    >>> cfg = peft.AdaLoraSchedule(init_r=4, target_r=2, tinit=0, tfinal=1, total_step=3)
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), with_rank_allocation(optax.adam(0.1), cfg))
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):  # the loss would add 0.5 * orthogonal_penalty(params)
    ...     grads = jax.tree.map(jnp.ones_like, params)
    ...     updates, opt_state = tx.update(grads, opt_state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> {n: m.tolist() for n, m in rank_pattern(params).items()}
    {'proj': [True, True, False, False]}
    >>> int(allocation_state(opt_state).info.budget)
    2
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.optim.labels import path_string
from alignjax.peft.adalora_allocator import (
    AdaLoraSchedule,
    AllocationInfo,
    AllocatorState,
    init_allocator,
    orthogonal_regularizer,
    update_and_allocate,
)

KeyPath = tuple[Any, ...]
_ROLES = ("lora_a", "lora_e", "lora_b")


class RankAllocationState(NamedTuple):
    """State of `with_rank_allocation`: the inner optimizer's, the allocator's (EMAs and the
    latest rank pattern), the number of updates done (the next PEFT step index) and the
    `AllocationInfo` of the last update (budget, whether it allocated, threshold, kept ranks)."""

    inner: optax.OptState
    allocator: AllocatorState
    count: jax.Array
    info: AllocationInfo


def _index(params) -> dict[str, tuple[int, int, int]]:
    """`{name: (i_a, i_e, i_b)}`: positions of each triplet in `jax.tree.leaves(params)`."""
    if params is None:
        raise ValueError("`params` is None: AdaLoRA's rank allocation needs the params")
    strip = isinstance(params, dict) and "policy" in params  # alignjax's {"policy", "heads"}
    groups: dict[str, dict[str, int]] = {}
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        keys = list(path)
        if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
            keys.pop()  # an nnx.Variable's `.value`
        leaf = path_string(keys[-1:])
        if leaf not in _ROLES:
            continue
        parent = keys[:-1]
        if strip and path_string(parent[:1]) == "policy":
            parent = parent[1:]
        name = path_string(parent)
        roles = groups.setdefault(name, {})
        if leaf in roles:
            raise ValueError(f"two {leaf} leaves for the AdaLoRA layer {name!r}")
        roles[leaf] = i
    out = {}
    for name, roles in groups.items():
        if "lora_e" not in roles:
            continue  # a LoRA layer (lora_a, lora_b)
        missing = [r for r in _ROLES if r not in roles]
        if missing:
            raise ValueError(f"AdaLoRA layer {name!r} has lora_e but no {missing}")
        out[name] = tuple(roles[r] for r in _ROLES)
    if not out:
        raise ValueError(
            "`params` has no AdaLoRA triplets (leaves lora_a, lora_e, lora_b under one parent)"
        )
    return out


def adalora_triplet_paths(params) -> dict[str, tuple[KeyPath, KeyPath, KeyPath]]:
    """`{module name: (key path of a, of e, of b)}` (jax key paths, as
    `jax.tree_util.tree_flatten_with_path` gives them) for every AdaLoRA layer in `params`.
    Raises ValueError if there is none, or a layer has `lora_e` without `lora_a` / `lora_b`."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {n: tuple(paths[i] for i in idx) for n, idx in _index(params).items()}


def _gather(leaves, index) -> dict[str, tuple]:
    return {n: tuple(leaves[i] for i in idx) for n, idx in index.items()}


def with_rank_allocation(
    inner: optax.GradientTransformation, schedule: AdaLoraSchedule
) -> optax.GradientTransformationExtraArgs:
    """Wrap the optimizer `inner` so that every update also runs PEFT's
    `update_and_allocate(i)` (i = number of earlier updates), on the updated params with the
    grads given to `update` (after any clipping earlier in a chain: PEFT's Trainer clips the
    `.grad`s in place before the step). `inner` must produce the final updates (e.g.
    `optax.adamw(lr)`): nothing may rescale them afterwards. `update` requires `params`.
    Jittable; `schedule` is static (a hashable frozen dataclass)."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        index = _index(params)
        triplets = _gather(jax.tree.leaves(params), index)
        allocator = init_allocator(triplets)
        info = jax.eval_shape(
            lambda: update_and_allocate(triplets, triplets, allocator, 0, schedule)
        )[2]
        info = AllocationInfo(
            budget=jnp.full((), sum(t[1].shape[0] for t in triplets.values()), info.budget.dtype),
            mask_now=jnp.zeros((), bool),
            allocated=jnp.zeros((), bool),
            threshold=jnp.full((), jnp.nan, info.threshold.dtype),
            kept_ranks={n: jnp.full((), t[1].shape[0], jnp.int32) for n, t in triplets.items()},
        )
        count = jnp.zeros((), jnp.int32)
        return RankAllocationState(inner.init(params), allocator, count, info)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "with_rank_allocation: `params` is required in update(grads, state, params)"
            )
        index = _index(params)
        p_leaves, treedef = jax.tree.flatten(params)
        grads = treedef.flatten_up_to(updates)
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        u_leaves = treedef.flatten_up_to(updates)
        # the params `optax.apply_updates` will produce, before masking
        new = {
            n: tuple((p_leaves[i] + u_leaves[i]).astype(p_leaves[i].dtype) for i in idx)
            for n, idx in index.items()
        }
        step = state.count
        _, allocator, info = update_and_allocate(
            new, _gather(grads, index), state.allocator, step, schedule
        )
        # update_and_allocate zeroes e where (allocation or fixed phase) & ~new pattern
        masking = info.allocated | (step > schedule.final_step)
        for n, (_, i_e, _) in index.items():
            pruned = masking & ~allocator.rank_pattern[n]
            u_leaves[i_e] = jnp.where(pruned, -p_leaves[i_e], u_leaves[i_e])
        updates = treedef.unflatten(u_leaves)
        return updates, RankAllocationState(inner_state, allocator, step + 1, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def orthogonal_penalty(params) -> jax.Array:
    """PEFT's orthogonal regulariser over every AdaLoRA layer of `params`:
    `mean_{P in all a, b} ||C_P - I||_F` (not squared; `adalora_allocator.orthogonal_regularizer`).
    Add `orth_reg_weight * orthogonal_penalty(params)` (PEFT: 0.5) to the training loss."""
    return orthogonal_regularizer(_gather(jax.tree.leaves(params), _index(params)))


def rank_pattern(params) -> dict[str, np.ndarray]:
    """`{module name: bool (init_r,)}`, True where `e != 0`, on the host. Once training has passed
    `T - tfinal` this is the allocator's pattern (`allocation_state(opt_state).allocator
    .rank_pattern`, which is authoritative: it also keeps an `e` that is exactly 0)."""
    leaves = jax.tree.leaves(params)
    return {n: np.asarray(leaves[i_e]) != 0 for n, (_, i_e, _) in _index(params).items()}


def allocation_state(opt_state) -> RankAllocationState:
    """The `RankAllocationState` inside `opt_state` (of a chain, `multi_transform`,
    `inject_hyperparams`, ...): `.info` has the last budget and kept ranks, `.allocator
    .rank_pattern` the rank pattern for `peft.export_adapters(..., rank_pattern=...)`."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, RankAllocationState))
        if isinstance(s, RankAllocationState)
    ]
    if len(found) != 1:
        raise ValueError(f"`opt_state` holds {len(found)} with_rank_allocation states, not one")
    return found[0]
