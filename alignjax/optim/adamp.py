"""AdamP (Heo et al. 2021, arXiv:2006.08217, Algorithm 2) as optax transforms, with the exact
semantics of the reference code (clovaai/AdamP = PyPI adamp 0.3.0; specs/optim.md 1.2):

    m_t = b1 m + (1 - b1) g,   v_t = b2 v + (1 - b2) g^2
    u   = m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)      (nesterov: (b1 m_t + (1 - b1) g) / ...)
    u, r = projection(w_t, g_t, u)                      (matrices only; r = wd_ratio or 1)
    w_{t+1} = w_t - lr (u / (1 - b1^t) + weight_decay r w_t)

The moments are never projected; the cosine test uses the raw gradient; weight decay is
decoupled and scaled by wd_ratio where the projection fired, which is why it lives inside
`scale_by_adamp` rather than in a separate `add_decayed_weights`. AdamP's nesterov form is its
own (bias-corrected as a whole by 1 - b1^t), not `optax.scale_by_adam(nesterov=True)`.

`mask` selects the leaves that get weight decay, with `optax.adamw`'s semantics (a static tree
of bools shaped like, or a prefix of, the params, or a callable params -> such a tree): a
masked-out leaf is updated exactly as with weight_decay = 0, everything else is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.optim.constraints import NO_PARAMS_MSG
from alignjax.optim.projection import (
    ChannelAxisSpec,
    Hyper,
    check_hyper,
    check_projection_hypers,
    hyper,
    project_tree,
    resolve_channel_axes,
    split_projected,
)

DecayMask = Any | Callable[[Any], Any] | None


def decay_mask_tree(mask: DecayMask, params) -> Any:
    """`mask` (as `optax.adamw`'s: None, a tree of bools shaped like or a prefix of `params`,
    or a callable params -> such a tree) as one Python bool per leaf of `params`; None for
    None (every leaf decays). The bools must be static (known at trace time)."""
    if mask is None:
        return None
    tree = mask(params) if callable(mask) else mask

    def expand(m, sub):
        try:
            flag = bool(m)
        except jax.errors.ConcretizationTypeError as e:
            raise TypeError(
                "`mask` must hold static bools (Python or concrete NumPy/JAX), not traced "
                "values; under optax.inject_hyperparams pass a callable mask in static_args"
            ) from e
        return jax.tree.map(lambda _: flag, sub)

    try:
        return jax.tree.map(expand, tree, params)
    except ValueError as e:
        raise ValueError(
            f"`mask` must be a tree shaped like (or a prefix of) the params: {e}"
        ) from e


def leaf_decays(weight_decay, mask_tree, params) -> Any:
    """The weight decay of every leaf: `weight_decay` where `mask_tree` is True, a zero of the
    same kind elsewhere, so a masked-out leaf computes what a weight_decay = 0 run computes."""
    if mask_tree is None:
        return jax.tree.map(lambda _: weight_decay, params)
    if isinstance(weight_decay, (jax.Array, np.ndarray, np.generic)):
        zero = jnp.zeros_like(weight_decay)
    else:
        zero = 0.0
    return jax.tree.map(lambda m: weight_decay if m else zero, mask_tree)


class ScaleByAdamPState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adamp(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    delta: Hyper = 0.1,
    wd_ratio: Hyper = 0.1,
    weight_decay: Hyper = 0.0,
    *,
    nesterov: bool = False,
    channel_axis: ChannelAxisSpec = None,
    mu_dtype=None,
    mask: DecayMask = None,
) -> optax.GradientTransformation:
    """AdamP's direction: the projected, bias-corrected Adam update plus the decoupled weight
    decay `weight_decay * r * params` (r = wd_ratio where the projection fired, 1 elsewhere).
    Multiply by the learning rate after it (`adamp` does). Needs `params`.

    Args:
      b1, b2, eps: Adam's constants (reference defaults). eps also enters the projection.
      delta: the cosine threshold is delta / sqrt(row length).
      wd_ratio: factor on the weight decay of projected parameters.
      weight_decay: decoupled weight decay (AdamW-style), >= 0.
      nesterov: AdamP's nesterov momentum, (b1 m_t + (1 - b1) g) / (1 - b1^t).
      channel_axis: None (Flax layout), an int, a pytree or a callable; see `projection`.
      mu_dtype: dtype of the first moment (None: the parameters').
      mask: which leaves get weight decay, as `optax.adamw`'s `mask`: a static tree of bools
        shaped like (or a prefix of) the params, or a callable params -> such a tree (under
        `optax.inject_hyperparams` list a callable in `static_args`). False leaves are
        updated exactly as with weight_decay = 0 (the projection and wd_ratio still apply to
        the direction); None decays every leaf.

    Every numeric hyperparameter may be a schedule `count -> value`.
    """
    check_hyper("b1", b1, low=0.0, high=1.0)
    check_hyper("b2", b2, low=0.0, high=1.0)
    check_projection_hypers(delta, wd_ratio, eps, weight_decay)

    def init_fn(params):
        resolve_channel_axes(channel_axis, params)
        decay_mask_tree(mask, params)
        return ScaleByAdamPState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        axes = resolve_channel_axes(channel_axis, params)
        c = state.count
        beta1, beta2, e = hyper(b1, c), hyper(b2, c), hyper(eps, c)
        mu = optax.tree.update_moment(updates, state.mu, beta1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, beta2, 2)
        t = optax.safe_increment(c)
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t

        def direction(g, m, v):
            den = jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + e
            top = beta1 * m + (1 - beta1) * g if nesterov else m
            return (top / den).astype(g.dtype)

        # The direction is passed as a function of (g, m, v), not as a tree, so that the
        # projection recomputes it where it is needed instead of storing it (see `projection`).
        projected = project_tree(
            params,
            updates,
            axes,
            delta=hyper(delta, c),
            wd_ratio=hyper(wd_ratio, c),
            eps=e,
            direction=direction,
            parts=(updates, mu, nu),
        )
        u, ratios = split_projected(projected, updates)
        wds = leaf_decays(hyper(weight_decay, c), decay_mask_tree(mask, params), params)
        out = jax.tree.map(
            lambda x, r, p, wd: (x / bc1 + wd * r * p).astype(x.dtype), u, ratios, params, wds
        )
        return out, ScaleByAdamPState(t, optax.tree.cast(mu, mu_dtype), nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: Hyper = 1e-3,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    delta: Hyper = 0.1,
    wd_ratio: Hyper = 0.1,
    *,
    nesterov: bool = False,
    channel_axis: ChannelAxisSpec = None,
    mu_dtype=None,
    mask: DecayMask = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamP: `chain(scale_by_adamp(...), scale_by_learning_rate(learning_rate))`.

    Defaults are the reference's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0,
    delta 0.1, wd_ratio 0.1). Where the projection never fires this is `optax.adamw`, with the
    same `mask` argument (which leaves get weight decay; see `scale_by_adamp`).

        >>> import jax.numpy as jnp, optax
        >>> from alignjax.optim import adamp
        >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
        >>> tx = adamp(1e-3, weight_decay=1e-2)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(params, state, params)  # gradients, state, params
        >>> params = optax.apply_updates(params, updates)
        >>> tx = adamp(1e-3, weight_decay=1e-2, mask={"kernel": True, "bias": False})

    References: Heo et al., ICLR 2021, arXiv:2006.08217; github.com/clovaai/AdamP.
    """
    check_hyper("learning_rate", learning_rate)
    return optax.chain(
        scale_by_adamp(
            b1,
            b2,
            eps,
            delta,
            wd_ratio,
            weight_decay,
            nesterov=nesterov,
            channel_axis=channel_axis,
            mu_dtype=mu_dtype,
            mask=mask,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
