"""Projected updates: keep parameters on a constraint set C as the last step of an optax chain.

Projected gradient descent is x_{t+1} = Π_C(x_t + u_t), where u_t is the step the rest of the
chain proposes. `optax.projections` gives Π_C for common sets but acts on params after
`apply_updates`, outside the GradientTransformation. `project_params` moves it inside: it returns
u'_t = Π_C(x_t + u_t) - x_t, so the unchanged training step `apply_updates(x_t, u'_t)` lands on C.
The projection then travels with the optimizer (checkpoints, `nnx.Optimizer`, `inject_hyperparams`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# optax's message (optax._src.base.NO_PARAMS_MSG), kept here so we do not import a private module.
NO_PARAMS_MSG = (
    "You are using a transformation that requires the current value of parameters, but you are "
    "not passing `params` when calling `update`."
)


def _broadcast_mask(mask: Any, params: Any) -> list[bool]:
    """Flat list of bools, one per params leaf; `mask` may be a prefix of `params`."""
    try:
        full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), mask, params)
    except (ValueError, TypeError) as e:
        msg = "`mask` must be concrete bools with (a prefix of) the params structure"
        raise ValueError(f"{msg}: {e}") from e
    return jax.tree.leaves(full)


def project_params(
    projection: Callable[[Any], Any],
    *,
    per_leaf: bool = True,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Turns the update u into Π(params + u) - params, so the stepped params lie on C.

    Put it last in the chain, after `scale_by_learning_rate`: it needs the final step.

    Args:
      projection: Π_C, a function of an array (or a pytree when `per_leaf=False`) returning its
        projection, e.g. `optax.projections.projection_simplex` or
        `functools.partial(optax.projections.projection_l2_ball, scale=1.0)`.
      per_leaf: True (default): Π is applied to each selected leaf separately (one ball per
        matrix). False: Π is applied once to the list of all selected leaves (one ball for the
        whole tree, global norms and sums).
      mask: which leaves are constrained: None (all), a bool tree with the params structure
        (or a prefix of it), or a callable on params returning one; concrete bools, since the
        selection is static. Unselected leaves keep u.

    Numerics: `apply_updates` computes params + u' in the param dtype, so the result equals
    Π(params + u) up to one rounding of that dtype (an l2-ball radius may be exceeded by
    about one ulp); re-project after training if the constraint must hold exactly.

    Raises:
      ValueError: in `update`, when `params` is None.

    Example:
      >>> import functools
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.ones(4) * 0.4}
      >>> grads = {"w": -jnp.ones(4)}
      >>> proj = functools.partial(optax.projections.projection_l2_ball, scale=1.0)
      >>> tx = optax.chain(optax.sgd(0.1), project_params(proj))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)  # each leaf has norm <= 1
      >>> round(float(jnp.linalg.norm(params["w"])), 4)
      1.0
    """
    if not callable(projection):
        raise ValueError(f"`projection` must be callable, got {type(projection).__name__}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        selected = [True] * len(jax.tree.leaves(params))
        if mask is not None:
            selected = _broadcast_mask(mask(params) if callable(mask) else mask, params)
        flat_params, treedef = jax.tree.flatten(params)
        flat_updates = treedef.flatten_up_to(updates)
        # Same arithmetic as optax.apply_updates: the candidate point lives in the param dtype.
        candidates = [
            jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
            for p, u in zip(flat_params, flat_updates)
        ]
        idx = [i for i, s in enumerate(selected) if s]
        if per_leaf:
            projected = [projection(candidates[i]) for i in idx]
        else:
            projected = list(projection([candidates[i] for i in idx]))
        new_updates = list(flat_updates)
        for i, x in zip(idx, projected):
            new_updates[i] = (x - flat_params[i]).astype(jnp.asarray(flat_updates[i]).dtype)
        return treedef.unflatten(new_updates), state

    return optax.GradientTransformation(init_fn, update_fn)
