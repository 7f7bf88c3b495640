"""SGDP (Heo et al. 2021, arXiv:2006.08217, Algorithm 1) as optax transforms, with the exact
semantics of the reference code (clovaai/AdamP = PyPI adamp 0.3.0; specs/optim.md 1.3):

    buf_t = momentum buf + (1 - dampening) g          (buf_0 = 0)
    d     = g + momentum buf_t  if nesterov  else  buf_t
    d, r  = projection(w_t, g_t, d)                   (matrices only; r = wd_ratio or 1)
    w_{t+1} = w_t - lr (d + weight_decay r w_t / (1 - momentum))

Reference quirk kept by default: without nesterov, `d` *is* the momentum buffer and the
reference projects it in place, so the stored buffer is projected too whenever the test fires
(`project_momentum=True`). `project_momentum=False` keeps the buffer unprojected.

`mask` selects the leaves that get weight decay, as in `optax.adamw` (see `adamp`): a masked-out
leaf is updated exactly as with weight_decay = 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from alignjax.optim.adamp import DecayMask, decay_mask_tree, leaf_decays
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


class ScaleBySGDPState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates


def scale_by_sgdp(
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    eps: Hyper = 1e-8,
    delta: Hyper = 0.1,
    wd_ratio: Hyper = 0.1,
    weight_decay: Hyper = 0.0,
    *,
    nesterov: bool = False,
    project_momentum: bool = True,
    channel_axis: ChannelAxisSpec = None,
    accumulator_dtype=None,
    mask: DecayMask = None,
) -> optax.GradientTransformation:
    """SGDP's direction: the projected momentum step plus the decoupled weight decay
    `weight_decay * r * params / (1 - momentum)`. Multiply by the learning rate after it
    (`sgdp` does). Needs `params`. Every numeric hyperparameter may be a schedule.

    Args:
      momentum, dampening: as torch SGD, except that the buffer starts at 0 (the reference's
        rule; torch SGD starts it at g, which differs only when dampening > 0).
      eps, delta, wd_ratio: the projection's constants.
      weight_decay: decoupled weight decay, >= 0, divided by (1 - momentum) as the reference.
      nesterov: d = g + momentum * buf.
      project_momentum: the reference's in-place projection of the buffer (see module doc).
      channel_axis: None (Flax layout), an int, a pytree or a callable; see `projection`.
      accumulator_dtype: dtype of the momentum buffer (None: the parameters').
      mask: which leaves get weight decay, as `optax.adamw`'s `mask` (a static tree of bools
        shaped like, or a prefix of, the params, or a callable params -> such a tree). False
        leaves are updated exactly as with weight_decay = 0; None decays every leaf.
    """
    check_hyper("momentum", momentum, low=0.0, high=1.0)
    check_hyper("dampening", dampening, low=0.0, high=1.0, high_open=False)
    check_projection_hypers(delta, wd_ratio, eps, weight_decay)

    def init_fn(params):
        resolve_channel_axes(channel_axis, params)
        decay_mask_tree(mask, params)
        return ScaleBySGDPState(
            jnp.zeros([], jnp.int32), optax.tree.zeros_like(params, dtype=accumulator_dtype)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        axes = resolve_channel_axes(channel_axis, params)
        c = state.count
        mom, damp = hyper(momentum, c), hyper(dampening, c)
        buf = jax.tree.map(
            lambda b, g: (mom * b + (1 - damp) * g).astype(b.dtype), state.momentum, updates
        )

        # The step as a function of (g, old buffer): the projection recomputes it where needed,
        # so neither the new buffer nor d is stored as a temporary (see `projection`).
        def direction(g, b):
            new = (mom * b + (1 - damp) * g).astype(b.dtype).astype(g.dtype)
            return g + mom * new if nesterov else new

        projected = project_tree(
            params,
            updates,
            axes,
            delta=hyper(delta, c),
            wd_ratio=hyper(wd_ratio, c),
            eps=hyper(eps, c),
            direction=direction,
            parts=(updates, state.momentum),
        )
        d, ratios = split_projected(projected, updates)
        if project_momentum and not nesterov:
            buf = jax.tree.map(lambda x, b: x.astype(b.dtype), d, buf)
        wds = leaf_decays(hyper(weight_decay, c), decay_mask_tree(mask, params), params)
        out = jax.tree.map(lambda x, r, p, wd: x + wd * r * p / (1 - mom), d, ratios, params, wds)
        return out, ScaleBySGDPState(optax.safe_increment(c), buf)

    return optax.GradientTransformation(init_fn, update_fn)


def sgdp(
    learning_rate: Hyper,
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    eps: Hyper = 1e-8,
    delta: Hyper = 0.1,
    wd_ratio: Hyper = 0.1,
    *,
    nesterov: bool = False,
    project_momentum: bool = True,
    channel_axis: ChannelAxisSpec = None,
    accumulator_dtype=None,
    mask: DecayMask = None,
) -> optax.GradientTransformationExtraArgs:
    """SGDP: `chain(scale_by_sgdp(...), scale_by_learning_rate(learning_rate))`.

    The learning rate is required, as in the reference. With dampening 0 and no projection
    firing this is `optax.sgd(learning_rate, momentum)` plus decoupled weight decay (`mask`:
    which leaves get it, as in `optax.adamw`).

        >>> import jax.numpy as jnp, optax
        >>> from alignjax.optim import sgdp
        >>> params = {"kernel": jnp.ones((4, 3))}
        >>> tx = sgdp(0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(params, state, params)

    References: Heo et al., ICLR 2021, arXiv:2006.08217; github.com/clovaai/AdamP.
    """
    check_hyper("learning_rate", learning_rate)
    return optax.chain(
        scale_by_sgdp(
            momentum,
            dampening,
            eps,
            delta,
            wd_ratio,
            weight_decay,
            nesterov=nesterov,
            project_momentum=project_momentum,
            channel_axis=channel_axis,
            accumulator_dtype=accumulator_dtype,
            mask=mask,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
