"""Multi-objective gradient combination: per-term gradients of a composed loss, PCGrad and MGDA.

A composed alignjax loss (`alignjax.losses.combine`) keeps its terms apart, so each term k has its
own gradient g_k = grad(w_k * total_k / count_k). `term_gradients` computes all of them in one
traced function and stacks them on a leading axis K. `pcgrad` and `mgda` take such a stacked
pytree and return one update direction (a pytree without the K axis) to hand to any optax
optimizer in place of grad(loss) = sum_k g_k.

Inner products and norms are over the whole pytree (every leaf flattened together), as in the
papers. Both methods only need the K x K Gram matrix G_jk = g_j . g_k: the result is a fixed
combination sum_k c_k g_k whose weights are found on the Gram matrix, so the parameter-sized
work is one Gram matrix and one weighted sum, whatever K is.

In a train step (`loss_fn(params, batch) -> LossOutput`, e.g. a forward pass followed by
`combine([("sigmoid", 1.0), ("sft", 0.5)])`):

    grads, names, output = term_gradients(loss_fn, params, batch)
    direction = pcgrad(grads, key=step_key)          # or: direction, alpha = mgda(grads)
    updates, opt_state = optimizer.update(direction, opt_state, params)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses.types import LossOutput

_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs otherwise reduce float32 matmuls to bfloat16 passes


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["grads", "output"], meta_fields=["names"]
)
@dataclasses.dataclass(frozen=True)
class TermGradients:
    """What `term_gradients` returns; unpacks as `grads, names, output = ...`.

    A pytree whose term names are static metadata, so it can be returned from `jax.jit`.

    Attributes:
      grads: the parameter pytree with a leading axis K on every leaf; row k is the gradient of
        term `names[k]`'s weighted value w_k * total_k / count_k.
      names: the K term names, in the order in which `loss_fn`'s output lists its `terms`.
        Index rows by these names: a dict returned through `jax.jit` has its keys sorted.
      output: the `LossOutput` at `params`.
    """

    grads: Any
    names: tuple[str, ...]
    output: LossOutput

    def __iter__(self) -> Iterator[Any]:
        return iter((self.grads, self.names, self.output))


def term_gradients(
    loss_fn: Callable[..., LossOutput], params: Any, *args: Any, **kwargs: Any
) -> TermGradients:
    """The gradient of each weighted loss term, stacked on a leading axis K.

    For `output = loss_fn(params, *args, **kwargs)` with terms k = 1..K,

        g_k = grad_params (w_k * total_k / count_k),   sum_k g_k = grad_params output.loss,

    computed as the Jacobian of the [K] vector of weighted term values (`jax.jacrev`: one
    forward pass, K vector-Jacobian products batched with vmap) inside one traced function, so
    it works under `jax.jit` and costs K gradients of memory.

    Args:
      loss_fn: `(params, *args, **kwargs) -> LossOutput`, e.g. a model forward pass followed
        by a loss from `alignjax.losses.combine`.
      params: the pytree to differentiate with respect to.
      *args, **kwargs: passed to `loss_fn` unchanged (not differentiated).

    Returns:
      `TermGradients(grads, names, output)`; unpacks as a 3-tuple.
    """
    names: list[tuple[str, ...]] = []

    def weighted_terms(p):
        output = loss_fn(p, *args, **kwargs)
        if not isinstance(output, LossOutput):
            raise TypeError(f"`loss_fn` must return a LossOutput, got {type(output).__name__}")
        if not output.terms:
            raise ValueError("`loss_fn` returned a LossOutput without terms")
        # Names are read here, in the pass that fixes the row order: flattening the LossOutput
        # later sorts the terms dict.
        names.append(tuple(output.terms))
        values = jnp.stack([term.weight * term.value for term in output.terms.values()])
        return values, output

    grads, output = jax.jacrev(weighted_terms, has_aux=True)(params)
    # The aux output went through tree flattening, which sorts dict keys; restore the loss's
    # own order so that `names == tuple(output.terms)` (until a later jit boundary re-sorts).
    terms = {name: output.terms[name] for name in names[-1]}
    return TermGradients(grads, names[-1], dataclasses.replace(output, terms=terms))


def _num_objectives(grads: Any) -> int:
    """K, the leading axis shared by every leaf of `grads`; ValueError otherwise."""
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    if not leaves:
        raise ValueError("`grads` has no array leaves; expected leaves of shape [K, ...]")
    sizes = {}
    for path, leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                f"`grads` leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                "leading objective axis K"
            )
        sizes.setdefault(jnp.shape(leaf)[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        found = ", ".join(f"{k} at {p}" for k, p in sizes.items())
        raise ValueError(f"`grads` leaves disagree on the leading objective axis K: {found}")
    (k,) = sizes
    if k < 1:
        raise ValueError(f"`grads` needs K >= 1 objectives on the leading axis, got K = {k}")
    return k


def _gram(grads: Any, k: int) -> jax.Array:
    """G_ij = g_i . g_j over all leaves together, in float32 at least."""
    leaves = jax.tree.leaves(grads)
    dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
    flat = [jnp.reshape(leaf, (k, -1)).astype(dtype) for leaf in leaves]
    return sum(jnp.matmul(f, f.T, precision=_HIGHEST) for f in flat)


def _combine(coefficients: jax.Array, grads: Any) -> Any:
    """sum_k c_k g_k per leaf: `[K]` coefficients drop the K axis, `[M, K]` ones give M rows."""

    def apply(leaf):
        # Weights stay in the Gram dtype (bfloat16 would round them to 3 digits); the result
        # goes back to the leaf's dtype.
        combined = jnp.tensordot(coefficients, leaf, axes=1, precision=_HIGHEST)
        return combined.astype(leaf.dtype)

    return jax.tree.map(apply, grads)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where denominator <= 0 (no NaN even in unused branches)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


# ----------------------------------------------------------------------------------- PCGrad


def _pcgrad_orders(key: jax.Array | None, k: int) -> Any:
    """Row i: the order in which objective i is projected against the others (j != i)."""
    fixed = np.array([[j for j in range(k) if j != i] for i in range(k)], dtype=np.int32)
    if key is None or k == 1:
        return jnp.asarray(fixed).reshape(k, k - 1)
    # One shuffle per i, as Algorithm 1 reads and the common PyTorch ports do (the official
    # TensorFlow code applies a single order, including j == i, to every objective).
    keys = jax.random.split(key, k)
    return jax.vmap(jax.random.permutation)(keys, jnp.asarray(fixed))


def _pcgrad_coefficients(gram: jax.Array, orders: Any) -> jax.Array:
    """C with g'_i = sum_k C_ik g_k. A projection step only changes g'_i's coefficient on g_j,
    and g'_i . g_j = (C G)_ij, so the surgery runs on the K x K Gram matrix; every i takes its
    p-th step at once."""
    k = gram.shape[0]
    coefficients = jnp.eye(k, dtype=gram.dtype)  # g'_i = g_i
    for position in range(k - 1):
        j = orders[:, position]  # objective i projects against g_{j[i]}
        dots = jnp.take_along_axis(coefficients @ gram, j[:, None], axis=1)[:, 0]
        # dot < 0 implies ||g_j|| > 0 in exact arithmetic; _safe_divide keeps a zero gradient
        # (or a rounding-negative dot against it) from dividing by zero.
        scale = jnp.where(dots < 0, _safe_divide(dots, jnp.diagonal(gram)[j]), 0)
        coefficients = coefficients - scale[:, None] * jax.nn.one_hot(j, k, dtype=gram.dtype)
    return coefficients


def pcgrad_projections(grads: Any, *, key: jax.Array | None = None) -> Any:
    """The projected per-objective gradients g'_i of PCGrad, still stacked on axis K.

    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", arXiv:2001.06782, Algorithm 1:

        g'_i = g_i
        for j != i, in random order:
            if g'_i . g_j < 0:  g'_i <- g'_i - (g'_i . g_j / ||g_j||^2) g_j

    Dot products and norms are over the whole pytree. A zero g_j never projects.

    Args:
      grads: pytree whose leaves have a leading objective axis K (e.g. `term_gradients`).
      key: PRNG key for the random orders (one independent shuffle per i). None uses the fixed
        order j = 0, 1, ..., K-1 (skipping i) for every i, which makes the result deterministic.

    Returns:
      A pytree like `grads` (leading axis K) holding g'_1..g'_K.
    """
    k = _num_objectives(grads)
    coefficients = _pcgrad_coefficients(_gram(grads, k), _pcgrad_orders(key, k))
    return _combine(coefficients, grads)


def pcgrad(grads: Any, *, key: jax.Array | None = None, reduction: str = "sum") -> Any:
    """PCGrad's update direction sum_i g'_i (or the mean with `reduction="mean"`).

    Yu et al. 2020, arXiv:2001.06782, Algorithm 1; see `pcgrad_projections` for the surgery and
    `key`. "sum" matches the paper (and grad(loss) = sum_k g_k when nothing conflicts).

    Args:
      grads: pytree whose leaves have a leading objective axis K.
      key: PRNG key for the projection orders; None: fixed order 0..K-1 skipping i.
      reduction: "sum" or "mean" over the K projected gradients.

    Returns:
      A pytree like one row of `grads` (no K axis).

    Example:
      >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # g_1 . g_2 = -1 < 0
      >>> pcgrad(grads)["w"]  # (1/2, 1/2) + (0, 1)
      Array([0.5, 1.5], dtype=float32)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f'`reduction` must be "sum" or "mean", got {reduction!r}')
    k = _num_objectives(grads)
    coefficients = _pcgrad_coefficients(_gram(grads, k), _pcgrad_orders(key, k)).sum(axis=0)
    if reduction == "mean":
        coefficients = coefficients / k
    return _combine(coefficients, grads)


# ------------------------------------------------------------------------------------- MGDA


def _min_norm_pair(aa: jax.Array, ab: jax.Array, bb: jax.Array) -> jax.Array:
    """gamma in [0, 1] minimising ||gamma a + (1 - gamma) b||^2, from a.a, a.b, b.b.

    Sener & Koltun 2018, Algorithm 1: gamma = clip((b - a) . b / ||a - b||^2, 0, 1); 1/2 when
    a == b, where every gamma gives the same point.
    """
    difference = aa - 2 * ab + bb  # ||a - b||^2
    gamma = jnp.clip(_safe_divide(bb - ab, difference), 0, 1)
    return jnp.where(difference > 0, gamma, 0.5)


def _frank_wolfe(gram: jax.Array, max_iters: int, tol: float, away_steps: bool) -> jax.Array:
    """argmin over the simplex of alpha^T G alpha (Sener & Koltun 2018, Algorithm 2)."""
    k = gram.shape[0]
    index = jnp.arange(k)
    # The gap is in squared-gradient units; scaling by the largest ||g_k||^2 makes `tol` relative.
    threshold = tol * jnp.max(jnp.diagonal(gram))

    def gaps(alpha):
        r = gram @ alpha  # r_k = g_k . d, half the gradient of alpha^T G alpha
        current = alpha @ r  # ||d||^2
        toward = jnp.argmin(r)
        away = jnp.argmax(jnp.where(alpha > 0, r, -jnp.inf))
        return r, current, toward, away, current - r[toward], r[away] - current

    def cond(state):
        iteration, alpha = state
        return (iteration < max_iters) & (gaps(alpha)[4] > threshold)

    def body(state):
        iteration, alpha = state
        r, current, toward, away, toward_gap, away_gap = gaps(alpha)
        # Toward step (the paper's): the closest point to 0 on the segment [d, g_toward].
        gamma = 1 - _min_norm_pair(current, r[toward], gram[toward, toward])
        stepped = (1 - gamma) * alpha + gamma * jax.nn.one_hot(toward, k, dtype=alpha.dtype)
        if away_steps:
            # Away step: move weight off the worst vertex in use, by exact line search up to
            # dropping it. Plain Frank-Wolfe zigzags when the min-norm point lies on a face of
            # the simplex (gap ~1e-3 after 1000 steps for random K = 3); away steps make the
            # convergence linear (Lacoste-Julien & Jaggi 2015, arXiv:1511.05932).
            mass = alpha[away]
            limit = _safe_divide(mass, 1 - mass)
            curvature = current - 2 * r[away] + gram[away, away]  # ||d - g_away||^2
            step = jnp.where(curvature > 0, _safe_divide(away_gap, curvature), limit)
            step = jnp.clip(step, 0, limit)
            moved = (1 + step) * alpha - step * jax.nn.one_hot(away, k, dtype=alpha.dtype)
            moved = jnp.where((index == away) & (step >= limit), 0, moved)
            stepped = jnp.where(away_gap > toward_gap, moved, stepped)
        return iteration + 1, jnp.maximum(stepped, 0)

    alpha = jnp.full((k,), 1 / k, gram.dtype)  # the paper's start: uniform weights
    _, alpha = jax.lax.while_loop(cond, body, (jnp.asarray(0), alpha))
    return alpha / jnp.sum(alpha)


def mgda(
    grads: Any, *, max_iters: int = 250, tol: float = 1e-6, away_steps: bool = True
) -> tuple[Any, jax.Array]:
    """MGDA's common descent direction: the min-norm point of the convex hull of the g_k.

    Desideri 2012 (C. R. Math. 350); Sener & Koltun 2018, "Multi-Task Learning as
    Multi-Objective Optimization", arXiv:1810.04650, Eq. 3 and Algorithms 1-2:

        alpha* = argmin_{alpha in simplex} ||sum_k alpha_k g_k||^2,   d = sum_k alpha*_k g_k.

    -d is a descent direction for every objective (d . g_k >= ||d||^2), and d = 0 means the
    point is Pareto-stationary. K = 2 uses the closed form alpha_1 = clip((g_2 - g_1) . g_2 /
    ||g_1 - g_2||^2, 0, 1) (1/2 when g_1 == g_2). K > 2 runs Frank-Wolfe from uniform weights
    on the K x K Gram matrix with exact line search, stopping when the duality gap
    ||d||^2 - min_k d . g_k <= tol * max_k ||g_k||^2 or after `max_iters` steps. alpha is held
    constant (not differentiated), as in the paper.

    Args:
      grads: pytree whose leaves have a leading objective axis K.
      max_iters: Frank-Wolfe step limit (K > 2), >= 1. The reference code uses 250.
      tol: relative duality-gap tolerance (K > 2), >= 0.
      away_steps: also take away steps (linear convergence on faces); False runs the paper's
        Algorithm 2 exactly.

    Returns:
      `(d, alpha)`: d like one row of `grads` (no K axis) and the `[K]` simplex weights.

    Example:
      >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 2.0]])}
      >>> d, alpha = mgda(grads)  # alpha_1 = (5 + 1) / (1 + 2 + 5); d . g_k = ||d||^2 = 1/2
      >>> alpha, d["w"]
      (Array([0.75, 0.25], dtype=float32), Array([0.5, 0.5], dtype=float32))
    """
    if not isinstance(max_iters, (int, np.integer)) or isinstance(max_iters, bool):
        raise ValueError(f"`max_iters` must be a positive int, got {max_iters!r}")
    if max_iters < 1:
        raise ValueError(f"`max_iters` must be a positive int, got {max_iters}")
    if isinstance(tol, (int, float)) and not tol >= 0:
        raise ValueError(f"`tol` must be >= 0, got {tol}")
    k = _num_objectives(grads)
    gram = jax.lax.stop_gradient(_gram(grads, k))
    if k == 1:
        alpha = jnp.ones((1,), gram.dtype)
    elif k == 2:
        alpha_1 = _min_norm_pair(gram[0, 0], gram[0, 1], gram[1, 1])
        alpha = jnp.stack([alpha_1, 1 - alpha_1])
    else:
        alpha = _frank_wolfe(gram, int(max_iters), tol, away_steps)
    return _combine(alpha, grads), alpha
