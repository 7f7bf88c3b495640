"""The train state: everything a run needs to continue bit-identically, as one pytree.

    state = init_state(model, optimizer, wrt=nnx.Param, reference="frozen", seed=0)
    policy = model_of(state)          # the policy as an nnx.Module (a view of the state)

Reference, four ways (`reference`): "frozen" (a copy of the initial trainable state, no
gradient), "adapters_disabled" (the policy with its adapters off: no parameter memory),
"precomputed" (the batch carries `ref_logps`, e.g. from `reference.precompute`), or "none"
(reference-free losses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from alignjax import losses as L

__all__ = [
    "REFERENCES",
    "Heads",
    "TrainState",
    "init_state",
    "model_of",
    "heads_of",
    "model_params",
    "keep_if",
]

REFERENCES = ("frozen", "adapters_disabled", "precomputed", "none")


class Heads(nnx.Module):
    """Named trainable modules trained with the policy (e.g. SparsePO's "reward" / "kl" heads)."""

    def __init__(self, heads: Mapping[str, nnx.Module]):
        for name, module in heads.items():
            setattr(self, name, module)


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue bit-identically.

    Attributes:
      graphdef: the model's NNX graph definition (static).
      params: the trainable state (`wrt` filter: all `nnx.Param`, or adapters only).
      rest: the rest of the model state (frozen base weights under PEFT, buffers).
      opt_state: the optax state of `params`.
      ref: the frozen reference's trainable state ("frozen" reference), else None.
      step: int32 number of applied updates (skipped ones included).
      rng: uint32 PRNG key data (dropout, sampling).
      position: int32 `[2]` data position (epoch, next batch), written by the loop.
      skipped: int32 number of updates skipped by the non-finite guard.
      loss_state: a loss's carried statistics (`losses.LossNeeds.state`, e.g. BCO's running
        reward moments), else None.
      head_graphdef: with trainable heads (SparsePO's mask heads), their graph definition;
        `params` and `rest` are then `{"policy": ..., "heads": ...}` (`model_of`, `heads_of`).
    """

    graphdef: Any = struct.field(pytree_node=False)
    params: Any
    rest: Any
    opt_state: Any
    ref: Any
    step: jax.Array
    rng: jax.Array
    position: jax.Array
    skipped: jax.Array
    loss_state: Any = None
    head_graphdef: Any = struct.field(pytree_node=False, default=None)


def init_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    wrt=nnx.Param,
    reference: str = "frozen",
    seed: int = 0,
    loss: str | Callable | None = None,
    heads: Mapping[str, nnx.Module] | None = None,
) -> TrainState:
    """Split `model` into trainable / rest, initialise the optimizer, the reference and (when
    `loss` carries state, e.g. BCO) the loss's state. `heads` are further modules trained with
    the policy (all their `nnx.Param`s), e.g. `{"reward": SparseMaskHead(...)}` for SparsePO."""
    if reference not in REFERENCES:
        raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}")
    graphdef, params, rest = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"the model has no parameters matching `wrt`={wrt}")
    ref = jax.tree.map(jnp.copy, params) if reference == "frozen" else None
    head_graphdef = None
    if heads:
        head_graphdef, head_params, head_rest = nnx.split(Heads(dict(heads)), nnx.Param, ...)
        params = {"policy": params, "heads": head_params}
        rest = {"policy": rest, "heads": head_rest}
    carried = None if loss is None else L.needs_of(loss).state
    return TrainState(
        graphdef=graphdef,
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        ref=ref,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        position=jnp.zeros((2,), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        loss_state=None if carried is None else carried.init(),
        head_graphdef=head_graphdef,
    )


def model_of(state: TrainState, params=None) -> nnx.Module:
    """The policy with `params` (default: the state's trainable params; the policy part when
    the state has heads; a reference's params `state.ref` work too)."""
    params = state.params if params is None else params
    rest = state.rest
    if state.head_graphdef is not None:
        rest = rest["policy"]
        if isinstance(params, dict) and set(params) == {"policy", "heads"}:
            params = params["policy"]
    return nnx.merge(state.graphdef, params, rest)


def heads_of(state: TrainState, params=None) -> Heads:
    """The trainable heads with `params` (default: the state's)."""
    if state.head_graphdef is None:
        raise ValueError("the state has no heads (init_state(..., heads=...))")
    params = state.params if params is None else params
    return nnx.merge(state.head_graphdef, params["heads"], state.rest["heads"])


def model_params(state: TrainState, params=None):
    """The policy's part of the trainable params (all of them when the state has no heads)."""
    params = state.params if params is None else params
    return params["policy"] if state.head_graphdef is not None else params


def keep_if(cond, new, old):
    """`new` where `cond` else `old`, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)
