"""The radial (scale-invariant) projection of AdamP / SGDP, the channel-axis specification, and
`project_radial`, which applies the projection to any inner transform's update.

Heo et al. 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights", arXiv:2006.08217, Algorithm 1-2; reference code clovaai/AdamP (= PyPI adamp 0.3.0,
`_projection`). For a weight w, its raw gradient g and a candidate update u:

    for view in (channel, layer):                 # the channel view is tried first
        c_i = |cos(G_i, W_i)|                     # one row per output channel / one row in all
        if max_i c_i < delta / sqrt(row length):  # strict, over all rows
            U_i <- U_i - Wh_i <Wh_i, U_i>,  Wh_i = W_i / (||W_i|| + eps)
            return U, wd_ratio
    return u, 1

Only parameters with more than one dimension are ever projected. In JAX the test of both views
needs only per-channel <g, w>, |g|^2 and |w|^2 (the layer's are their sums): one pass over the
weight and the gradient. The outcome is a scalar, so a `lax.cond` runs the second pass, per-channel
<w, u>, only where a view fired (no recompilation either way), and the projected update is an
elementwise expression that XLA fuses into the parameter update. Where nothing fires the step
costs one reduction over (w, g) beyond the inner optimizer's; where it fires, a second one over
the weight and the parts of the update.

Channel axes. PyTorch keeps output channels on axis 0; Flax `Dense` kernels are `(in, out)` and
`Conv` kernels `(..., in, out)`, so their channel axis is the last one, while `Embed` tables are
`(vocab, features)` with rows on axis 0. `channel_axis` accepts None (this Flax default), one
int for every matrix, a pytree of int-or-None matching the parameters (None: never project),
or a callable `params -> such pytree`, as optax's `MuonDimensionNumbers` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from alignjax.optim.constraints import NO_PARAMS_MSG
from alignjax.optim.labels import _key, path_string

ChannelAxisSpec = int | None | Any | Callable[[Any], Any]
Hyper = float | Callable[[jax.Array], jax.Array]


def flax_channel_axes(params) -> Any:
    """The Flax-layout default: axis 0 for `embedding` tables, the last axis for other
    parameters with more than one dimension, None (never projected) for 1-D parameters."""

    def axis(path, leaf):
        if jnp.ndim(leaf) <= 1:
            return None
        return 0 if path and str(_key(path[-1])) == "embedding" else -1

    return jax.tree_util.tree_map_with_path(axis, params)


def resolve_channel_axes(channel_axis: ChannelAxisSpec, params) -> Any:
    """A pytree of int-or-None with the structure of `params`, validated against each leaf."""
    if channel_axis is None:
        axes = flax_channel_axes(params)
    elif callable(channel_axis):
        axes = channel_axis(params)
    elif isinstance(channel_axis, int):
        axes = jax.tree.map(lambda p: channel_axis if jnp.ndim(p) > 1 else None, params)
    else:
        axes = channel_axis
    flat_params, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        flat_axes = treedef.flatten_up_to(axes)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"`channel_axis` must be None, an int, a callable or a pytree matching the "
            f"parameters: {err}"
        ) from None
    out = []
    for (path, leaf), ax in zip(flat_params, flat_axes):
        ndim = jnp.ndim(leaf)
        if ndim <= 1 or ax is None:
            out.append(None)
            continue
        if not isinstance(ax, int) or not -ndim <= ax < ndim:
            raise ValueError(
                f"`channel_axis` for parameter {path_string(path)!r} of shape {jnp.shape(leaf)} "
                f"must be an int in [-{ndim}, {ndim}) or None, got {ax!r}"
            )
        out.append(ax % ndim)
    return jax.tree_util.tree_unflatten(treedef, out)


def _cos(dot, g_sq, w_sq, eps):
    """|cos| from a dot product and squared norms, as torch's F.cosine_similarity:
    x.y / (max(|x|, eps) max(|y|, eps))."""
    return jnp.abs(dot / (jnp.maximum(jnp.sqrt(g_sq), eps) * jnp.maximum(jnp.sqrt(w_sq), eps)))


def _real_dot(a, b):
    """Re(conj(a) b) elementwise: a * b for real arrays. With it a complex vector's inner
    products, norms and cosines equal those of its stacked (real, imag) parts, as optax treats
    complex parameters (`optax.tree.vdot`, |g|^2 in `scale_by_adam`)."""
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
        return a.real * b.real + a.imag * b.imag
    return a * b


# Rows per reduction for channel-last matrices, elements per block for channel-first ones.
ROW_BLOCK = 8
CHANNEL_BLOCK = 2**19
LANES = 32  # partial sums per row of a channel-first block (a multiple of the vector width)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _channel_sums(products: Callable, arrays, axis: int, dtype):
    """Per-channel sums of the elementwise `products(*arrays)` (a tuple of arrays shaped like
    the inputs), as vectors of length `arrays[0].shape[axis]` in `dtype`.

    One fused pass over the arrays: XLA:CPU runs a variadic reduction over all the products
    about as fast as a single one, but reduces over a long leading axis ten times more slowly
    than along rows, and it would store a product that two fusions share. So a channel-last
    (rows, c) matrix (Flax kernels, the LM head) is reduced ROW_BLOCK rows at a time and a
    channel-first (c, row) one (embeddings) a block of channels at a time, both in a loop whose
    body computes the products from slices: nothing the products need (Adam's direction, say)
    is ever stored. A channel-first row is first summed in LANES strided partial sums, which
    vectorises (about twice as fast here as one sum per row).
    """
    first = arrays[0]
    c = first.shape[axis]
    if axis not in (0, first.ndim - 1):
        arrays = tuple(jnp.moveaxis(x, axis, -1) for x in arrays)
        axis = first.ndim - 1
    shape = (c, -1) if axis == 0 else (-1, c)
    arrays = tuple(x.reshape(shape) for x in arrays)
    axis = 0 if axis == 0 else 1
    count = len(jax.eval_shape(products, *arrays))
    zero = jnp.zeros((), dtype)

    row = arrays[0].shape[1]
    lanes = next((k for k in (LANES, LANES // 2) if axis == 0 and row % k == 0 and row > k), None)

    def sums(start, size):
        blocks = (lax.dynamic_slice_in_dim(x, start, size, axis=0) for x in arrays)
        if lanes is None:
            return lax.reduce(products(*blocks), (zero,) * count, _add, (1 - axis,))
        # Rows of a channel-first block are summed LANES apart first, so that the long sum
        # runs across vector lanes, then each row's LANES partial sums.
        blocks = (x.reshape(size, row // lanes, lanes) for x in blocks)
        part = lax.reduce(products(*blocks), (zero,) * count, _add, (1,))
        return lax.reduce(part, (zero,) * count, _add, (1,))

    rows = arrays[0].shape[0]
    if axis == 1:  # sum ROW_BLOCK rows at a time, then the remaining rows
        n = rows // ROW_BLOCK
        acc = tuple(jnp.zeros((c,), dtype) for _ in range(count))
        if n:
            acc = lax.fori_loop(0, n, lambda i, a: _add(a, sums(i * ROW_BLOCK, ROW_BLOCK)), acc)
        if rows % ROW_BLOCK:
            acc = _add(acc, sums(n * ROW_BLOCK, rows % ROW_BLOCK))
        return acc
    width = max(1, CHANNEL_BLOCK // row)
    if c <= width:
        return sums(0, c)
    n = -(-c // width)
    width = -(-c // n)  # n near-equal blocks; the last one starts earlier, overlapping

    def body(i, acc):
        start = jnp.minimum(i * width, c - width)
        return tuple(
            lax.dynamic_update_slice_in_dim(a, s, start, axis=0)
            for a, s in zip(acc, sums(start, width))
        )

    return lax.fori_loop(0, n, body, tuple(jnp.zeros((c,), dtype) for _ in range(count)))


def _test_sums(w, g, axis: int, dtype):
    """Per-channel <g, w>, |g|^2 and |w|^2: the projection test needs nothing else."""

    def products(w, g):
        w, g = w.astype(dtype), g.astype(dtype)
        return _real_dot(g, w), _real_dot(g, g), _real_dot(w, w)

    return _channel_sums(products, (w, g), axis, jnp.finfo(dtype).dtype)


def _radial_sums(w, direction, parts, axis: int, dtype):
    """Per-channel <w, u> for u = direction(*parts), computed from slices (never stored), and
    |w|^2. The second sum is not needed (`_test_sums` has it) but keeps the reduction variadic:
    XLA:CPU hands a single-operand one to a library routine that sums a few rows ten times more
    slowly (measured 134 ms against 16 ms on the 768 x 32000 LM head)."""

    def products(w, *parts):
        w = w.astype(dtype)
        return _real_dot(w, direction(*parts)), _real_dot(w, w)

    return _channel_sums(products, (w, *parts), axis, jnp.finfo(dtype).dtype)


class Projected(NamedTuple):
    """A projected update, the decay factor to use (wd_ratio or 1) and which view fired
    (0: none, 1: channel, 2: layer), plus each view's max |cos| / threshold."""

    update: jax.Array
    ratio: jax.Array
    view: jax.Array
    channel_score: jax.Array
    layer_score: jax.Array


def _identity(u):
    return u


def radial_projection(
    param: jax.Array,
    grad: jax.Array,
    update: jax.Array,
    channel_axis: int | None,
    *,
    delta=0.1,
    wd_ratio=0.1,
    eps=1e-8,
) -> Projected:
    """AdamP's `_projection` on one leaf. `channel_axis` None means "do not project" (1-D
    parameters and leaves excluded by the spec): the update passes through with ratio 1.
    Complex leaves use Re<a, b> and |x|, as if each were its stacked (real, imag) parts."""
    return project_direction(
        param, grad, _identity, (update,), channel_axis, delta=delta, wd_ratio=wd_ratio, eps=eps
    )


def project_direction(
    param, grad, direction: Callable, parts, channel_axis, *, delta=0.1, wd_ratio=0.1, eps=1e-8
) -> Projected:
    """`radial_projection` of the update `direction(*parts)`, an elementwise function of arrays
    shaped like `param` (Adam's m / (sqrt(v) + eps) from (g, m, v)).

    The test needs only reductions of the weight and the gradient: one pass over the two.
    Only where a view fires (a `lax.cond` on the scalar outcome) does a second pass compute
    <w, u> per channel, with u recomputed from slices of the parts. The projected update is then
    one elementwise expression in the parts, so XLA fuses it into its consumers (the
    parameter update) instead of storing it."""
    if channel_axis is None or param.ndim <= 1:
        update = direction(*parts)
        one, zero = (jnp.asarray(x, jnp.finfo(update.dtype).dtype) for x in (1, 0))
        return Projected(update, one, jnp.zeros((), jnp.int32), zero, zero)
    axis = channel_axis % param.ndim
    dtype = jax.eval_shape(direction, *parts).dtype
    # The barriers keep XLA from rewriting the layer totals below as fresh full reductions.
    dot_gw, g_sq, w_sq = lax.optimization_barrier(_test_sums(param, grad, axis, dtype))
    real = dot_gw.dtype
    # A complex row of length n is a real one of length 2n (its stacked parts), thresholds too.
    dof = 2 if jnp.iscomplexobj(param) or jnp.iscomplexobj(grad) else 1
    row_c = dof * param.size // param.shape[axis]
    chan_score = jnp.max(_cos(dot_gw, g_sq, w_sq, eps)) * math.sqrt(row_c) / delta
    layer_score = _cos(jnp.sum(dot_gw), jnp.sum(g_sq), jnp.sum(w_sq), eps)
    layer_score = layer_score * math.sqrt(dof * param.size) / delta
    chan_ok, layer_ok = chan_score < 1.0, layer_score < 1.0
    dot_wu = lax.cond(
        chan_ok | layer_ok,
        lambda: lax.optimization_barrier(_radial_sums(param, direction, parts, axis, dtype))[0],
        lambda: jnp.zeros_like(dot_gw),
    )
    coef_chan = dot_wu / jnp.square(jnp.sqrt(w_sq) + eps)
    coef_layer = jnp.sum(dot_wu) / jnp.square(jnp.sqrt(jnp.sum(w_sq)) + eps)
    coef = jnp.where(chan_ok, coef_chan, jnp.where(layer_ok, coef_layer, 0.0))
    shape = [1] * param.ndim
    shape[axis] = param.shape[axis]
    update = direction(*parts)
    out = update - param.astype(update.dtype) * coef.reshape(shape).astype(update.dtype)
    ratio = jnp.where(chan_ok | layer_ok, jnp.asarray(wd_ratio, real), jnp.ones((), real))
    view = jnp.where(chan_ok, 1, jnp.where(layer_ok, 2, 0)).astype(jnp.int32)
    return Projected(out, ratio, view, chan_score, layer_score)


def hyper(value: Hyper, count: jax.Array):
    """A hyperparameter's value at step `count`: schedules are called, constants returned."""
    return value(count) if callable(value) else value


def check_hyper(name: str, value, *, low=None, high=None, low_open=False, high_open=True):
    """ValueError for non-finite or out-of-range constant hyperparameters. Schedules and traced
    values (as under `optax.inject_hyperparams`) are not inspected."""
    if callable(value) or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"`{name}` must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"`{name}` must be {'<' if high_open else '<='} {high}, got {value}")


def check_projection_hypers(delta, wd_ratio, eps, weight_decay):
    check_hyper("delta", delta, low=0.0, low_open=True)
    check_hyper("wd_ratio", wd_ratio, low=0.0)
    check_hyper("eps", eps, low=0.0)
    check_hyper("weight_decay", weight_decay, low=0.0)


def project_tree(params, grads, axes, *, delta, wd_ratio, eps, direction=_identity, parts=()):
    """`project_direction` on every leaf: the update of a leaf is `direction` of the leaves of
    the trees in `parts` (with the default identity, `parts = (updates,)`). A tree of
    `Projected`."""

    def one(p, g, a, *ps):
        return project_direction(p, g, direction, ps, a, delta=delta, wd_ratio=wd_ratio, eps=eps)

    return jax.tree.map(one, params, grads, axes, *parts, is_leaf=lambda x: x is None)


def split_projected(tree, like):
    """(updates, ratios) trees from a tree of `Projected` shaped like `like`."""
    treedef = jax.tree.structure(like)
    flat = treedef.flatten_up_to(tree)
    return (
        jax.tree.unflatten(treedef, [p.update for p in flat]),
        jax.tree.unflatten(treedef, [p.ratio for p in flat]),
    )


class ProjectRadialState(NamedTuple):
    count: jax.Array
    inner_state: optax.OptState


def project_radial(
    inner: optax.GradientTransformation,
    *,
    delta: Hyper = 0.1,
    wd_ratio: Hyper = 0.1,
    weight_decay: Hyper = 0.0,
    eps: Hyper = 1e-8,
    channel_axis: ChannelAxisSpec = None,
) -> optax.GradientTransformationExtraArgs:
    """Remove the radial component of `inner`'s update on scale-invariant weights.

    The test runs on the raw gradient, the projection on `inner`'s output, per leaf, with the
    pre-step parameters. `weight_decay` (decoupled, as AdamW) is added after the projection as
    `weight_decay * r * params`, with r = `wd_ratio` where the projection fired and 1 elsewhere;
    then `inner` should be a direction transform with the learning rate applied after:

        >>> import optax
        >>> from alignjax.optim import project_radial
        >>> tx = optax.chain(
        ...     project_radial(optax.scale_by_lion(), weight_decay=1e-2),
        ...     optax.scale_by_learning_rate(1e-4),
        ... )

    With `weight_decay=0` any full optimizer works as `inner` (`project_radial(optax.sgd(0.1))`),
    since the projection is linear in the update. `project_radial(optax.scale_by_adam())`
    differs from `adamp` only in Adam's nesterov variant (see `scale_by_adamp`).
    """
    check_projection_hypers(delta, wd_ratio, eps, weight_decay)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        resolve_channel_axes(channel_axis, params)  # fail early on a bad spec
        return ProjectRadialState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        axes = resolve_channel_axes(channel_axis, params)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        c = state.count
        projected = project_tree(
            params,
            updates,
            axes,
            delta=hyper(delta, c),
            wd_ratio=hyper(wd_ratio, c),
            eps=hyper(eps, c),
            parts=(inner_updates,),
        )
        new, ratios = split_projected(projected, updates)
        wd = hyper(weight_decay, c)
        new = jax.tree.map(lambda u, r, p: u + wd * r * p.astype(u.dtype), new, ratios, params)
        return new, ProjectRadialState(optax.safe_increment(c), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
