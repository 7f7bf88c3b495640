"""Weight importance for unlearning: WAGLE scores, top-ratio masks, masked optax transforms.

WAGLE (Jia et al., NeurIPS 2024, arXiv:2410.17509; official OPTML-Group/WAGLE,
`src/unlearn/generate_mask.py::snip_advanced`) picks the weights to unlearn with:

1. `accumulate_gradients`: the gradient of the forget NLL `g_f` and of the retain NLL `g_r`,
   each summed over a pass of the data;
2. `wagle_scores`: S = |(theta - g_r / mu) * g_f| per parameter element (or a baseline:
   `gradient_scores`, `magnitude_scores`, `random_scores`);
3. `top_ratio_mask`: True on the top `ratio` fraction of S, over all parameters or per leaf;
4. `masked_updates(tx, mask)` (zero the updates after the whole chain: masked weights are
   bitwise unchanged) or `masked_gradients(tx, mask)` (WAGLE's own behaviour: zero the gradients
   before the chain, so decoupled weight decay still shrinks masked weights);
5. `save_mask` / `load_mask`: the mask on disk, one array per `path_string` of its leaf.

    g_f = accumulate_gradients(forget_nll, params, forget_batches)
    g_r = accumulate_gradients(retain_nll, params, retain_batches)
    mask = top_ratio_mask(wagle_scores(params, g_f, g_r), 0.95)
    tx = masked_updates(optax.adamw(1e-5, weight_decay=0.1), mask)

A mask is a pytree with the structure of `params` and a bool (or 0/1) array per leaf of the
leaf's shape (a scalar flag per leaf is accepted by the transforms); True = trained.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from alignjax.optim.labels import path_string

WAGLE_MU = 1e-6  # every released WAGLE config (the function default in unlearn_model.py is 1e-3)


# ----------------------------------------------------------------------------- checks


def _paths(tree: Any) -> list[str]:
    return [path_string(p) for p, _ in jtu.tree_flatten_with_path(tree)[0]]


def _check_like(tree: Any, like: Any, name: str, like_name: str, *, scalar_ok: bool = False):
    """Raises a ValueError naming the first path or shape where `tree` differs from `like`."""
    if jax.tree.structure(tree) != jax.tree.structure(like):
        got, want = _paths(tree), _paths(like)
        missing = [p for p in want if p not in set(got)]
        extra = [p for p in got if p not in set(want)]
        detail = (
            f"missing {missing[0]!r}"
            if missing
            else f"unexpected {extra[0]!r}"
            if extra
            else f"structure {jax.tree.structure(tree)} != {jax.tree.structure(like)}"
        )
        raise ValueError(f"`{name}` does not match the structure of `{like_name}`: {detail}")
    flat = jtu.tree_flatten_with_path(tree)[0]
    for (path, leaf), ref in zip(flat, jax.tree.leaves(like)):
        shape, want = np.shape(leaf), np.shape(ref)
        if shape != want and not (scalar_ok and shape == ()):
            raise ValueError(
                f"`{name}` leaf {path_string(path)!r} has shape {shape}, `{like_name}` has {want}"
            )


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)):
        raise TypeError(f"`ratio` must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:  # NaN fails too
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _as_bool_mask(mask: Any) -> Any:
    """Bool arrays; concrete 0/1 (or bool) values are checked, traced ones taken as `!= 0`."""

    def convert(path, m):
        m = jnp.asarray(m)
        if m.dtype != jnp.bool_:
            if not isinstance(m, jax.core.Tracer) and not bool(jnp.all((m == 0) | (m == 1))):
                raise ValueError(f"`mask` leaf {path_string(path)!r} holds values other than 0/1")
            m = m != 0
        return m

    return jtu.tree_map_with_path(convert, mask)


# ----------------------------------------------------------------------------- gradients


def accumulate_gradients(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    *,
    reduction: str = "sum",
) -> Any:
    """Sum (default, as WAGLE's `snip_advanced`) or mean over `batches` of grad loss_fn(params, b).

    `loss_fn(params, batch) -> scalar` is differentiated with respect to `params`; for WAGLE it is
    the forget NLL (HF token mean per batch) for `g_f` and the retain NLL for `g_r`. One jitted
    step adds a batch's gradient to the running sum, traced and compiled once per batch shape
    (pad the batches to one shape to compile once). The sum is accumulated in the gradient dtype.
    `reduction="mean"` divides by the number of batches. An empty `batches` is an error.

    Example:
      >>> loss = lambda p, b: jnp.sum((p["w"] * b) ** 2)
      >>> g = accumulate_gradients(loss, {"w": jnp.ones(2)}, [jnp.ones(2), 2 * jnp.ones(2)])
      >>> g["w"].tolist()  # 2 w b^2 summed: 2 + 8
      [10.0, 10.0]
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}")
    grad_fn = jax.grad(loss_fn)
    step = jax.jit(lambda acc, p, b: jax.tree.map(jnp.add, acc, grad_fn(p, b)))
    # -0.0 + g == g bitwise (signed zeros included): the first batch's sum is its gradient.
    total = jax.tree.map(lambda p: jnp.full(np.shape(p), -0.0, jnp.result_type(p)), params)
    count = 0
    for batch in batches:
        total = step(total, params, batch)
        count += 1
    if count == 0:
        raise ValueError("`batches` is empty: no gradient to accumulate")
    if reduction == "mean":
        total = jax.tree.map(lambda g: (g / count).astype(g.dtype), total)
    return total


# ----------------------------------------------------------------------------- scores


def _score_dtype(*xs: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def wagle_scores(params: Any, g_forget: Any, g_retain: Any, mu: float = WAGLE_MU) -> Any:
    """WAGLE's released score S = |(theta - g_r / mu) * g_f| per parameter element.

    Spec `online.md` 5.4 (`snip_advanced`, official L664-725): `g_f` = the gradient of the forget
    NLL (the loss whose *ascent* is the unlearning objective: pass the NLL's gradient, not that of
    -NLL; the absolute value makes the sign of `g_f` immaterial) and `g_r` = the gradient of the
    retain NLL (its sign matters: `theta - g_r / mu` is one descent step of size 1/mu on the
    retain loss). Both are sums over the data pass (`accumulate_gradients`). `mu` = 1e-6 in every
    released config. Computed in at least float32. The official code stores -S and sorts it
    ascending; `top_ratio_mask` ranks S descending, the same order.
    """
    _check_like(g_forget, params, "g_forget", "params")
    _check_like(g_retain, params, "g_retain", "params")
    if not mu > 0:
        raise ValueError(f"`mu` must be > 0, got {mu!r}")

    def score(theta, gf, gr):
        dt = _score_dtype(theta, gf, gr)
        theta, gf, gr = (jnp.asarray(x, dt) for x in (theta, gf, gr))
        return jnp.abs((theta - gr / mu) * gf)

    return jax.tree.map(score, params, g_forget, g_retain)


def gradient_scores(g_forget: Any) -> Any:
    """Baseline `gradient` of WAGLE's `generate_mask.py`: |g_f|."""
    return jax.tree.map(lambda g: jnp.abs(jnp.asarray(g, _score_dtype(g))), g_forget)


def magnitude_scores(params: Any) -> Any:
    """Baseline `weight` of WAGLE's `generate_mask.py`: |theta|."""
    return jax.tree.map(lambda p: jnp.abs(jnp.asarray(p, _score_dtype(p))), params)


def random_scores(params: Any, seed: int | jax.Array) -> Any:
    """Baseline `random`: i.i.d. U[0, 1) float32 per element, a function of `seed` (an int or a
    PRNG key) and the tree structure only; one key per leaf from `jax.random.split`."""
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    scores = [jax.random.uniform(k, np.shape(p)) for k, p in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, scores)


# ----------------------------------------------------------------------------- masks


def _top_count_masks(leaves: list[jax.Array], k: int) -> list[jax.Array]:
    """True on the k largest of the concatenated (raveled) leaves, ties broken by flattened
    index (earlier first): threshold t = k-th largest, then every s > t and the first
    k - #{s > t} elements equal to t."""
    n = sum(int(np.size(s)) for s in leaves)
    if k == 0 or n == 0:
        return [jnp.zeros(np.shape(s), bool) for s in leaves]
    dt = _score_dtype(*leaves)
    flats = [jnp.ravel(jnp.asarray(s, dt)) + 0.0 for s in leaves]  # -0.0 -> +0.0
    threshold = jnp.sort(jnp.concatenate(flats))[n - k]
    above = [f > threshold for f in flats]
    remaining = k - sum(int(jnp.sum(a)) for a in above)
    out = []
    for f, a, s in zip(flats, above, leaves):
        tie = f == threshold
        rank = jnp.cumsum(tie, dtype=jnp.int32)  # 1-based rank among the ties in this leaf
        take = tie & (rank <= remaining)
        remaining = max(remaining - int(jnp.sum(tie)), 0)
        out.append((a | take).reshape(np.shape(s)))
    return out


def top_ratio_mask(scores: Any, ratio: float, *, per_matrix: bool = False) -> Any:
    """True on the top `ratio` fraction of `scores`: a bool array per leaf of `scores`.

    Global (default, WAGLE): exactly k = int(N * ratio) Trues over all N elements of all leaves,
    `int` of the float64 product as in the official code (spec 5.4: `mask_i = 1` iff
    `rank_i < floor(N * ratio)`, `ranks = argsort(argsort(-S))`). `per_matrix=True`: the same per
    leaf, int(n_leaf * ratio) Trues in each (vectors such as biases and norms included).

    Ties: stable by flattened index, the leaves in `jax.tree.leaves` order, each raveled in C
    order; among equal scores the earlier element is kept. (The official `torch.argsort` is not
    stable, so its tie order is unspecified.) -0.0 equals 0.0; NaN scores are an error.
    `ratio` outside (0, 1] is an error.

    Example:
      >>> top_ratio_mask({"a": jnp.array([3.0, 1.0]), "b": jnp.array([2.0, 2.0])}, 0.5)
      {'a': Array([ True, False], dtype=bool), 'b': Array([ True, False], dtype=bool)}
    """
    ratio = _check_ratio(ratio)
    leaves, treedef = jax.tree.flatten(scores)
    for path, s in jtu.tree_flatten_with_path(scores)[0]:
        if bool(jnp.any(jnp.isnan(jnp.asarray(s, _score_dtype(s))))):
            raise ValueError(f"`scores` leaf {path_string(path)!r} contains NaN")
    if per_matrix:
        masks = [_top_count_masks([s], int(np.size(s) * ratio))[0] for s in leaves]
    else:
        n = sum(int(np.size(s)) for s in leaves)
        masks = _top_count_masks(leaves, int(n * ratio))
    return jax.tree.unflatten(treedef, masks)


# ----------------------------------------------------------------------------- transforms


class ImportanceMaskState(NamedTuple):
    """State of the mask step of `masked_updates` / `masked_gradients`: the bool mask, held as
    state (an argument of the jitted step, sharded like the parameters, in checkpoints) rather
    than baked into the compiled program as a parameter-sized constant."""

    mask: Any


def _mask_transform(mask: Any, fill: float) -> optax.GradientTransformation:
    bool_mask = _as_bool_mask(mask)

    def init_fn(params):
        _check_like(mask, params, "mask", "params", scalar_ok=True)
        return ImportanceMaskState(bool_mask)

    def update_fn(updates, state, params=None):
        _check_like(state.mask, updates, "mask", "updates", scalar_ok=True)
        out = jax.tree.map(
            lambda m, u: jnp.where(m, u, jnp.asarray(fill, u.dtype)), state.mask, updates
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def masked_updates(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """`tx`, then the updates set to -0.0 where `mask` is False: masked weights stay bitwise
    unchanged (x + (-0.0) == x for every x, -0.0 included), weight decay and every other part of
    `tx` included. alignjax's default way to apply an importance mask (spec 5.4, "Pitfall").

    `tx`'s state still evolves on masked leaves (their moments see the gradients), which does
    not touch the weights. `mask`: bools or 0/1 per element (or one per leaf), the structure of
    `params` (checked at `init`, naming the first mismatching path or shape).

    Example:
      >>> params = {"w": jnp.ones(2)}
      >>> tx = masked_updates(optax.adamw(0.1, weight_decay=0.1), {"w": jnp.array([True, False])})
      >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> bool(u["w"][1] == 0)
      True
    """
    return optax.chain(tx, _mask_transform(mask, -0.0))


def masked_gradients(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """WAGLE's own behaviour (`base.py::mask_gradient`, applied after clipping and before
    `optimizer.step()`): the gradients are zeroed where `mask` is False, then `tx` runs. With a
    decoupled decay (`optax.adamw`) the masked weights still move: with zero moments Adam's
    step is 0, so each step is theta <- theta + (-lr) * (wd * theta) exactly. Use
    `masked_updates` to keep them unchanged. (The official code multiplies by the mask; a
    select is used here, so a NaN gradient on a masked weight becomes 0 rather than NaN.)
    """
    return optax.chain(_mask_transform(mask, 0.0), tx)


# ----------------------------------------------------------------------------- disk


def _labelled(tree: Any, name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        key = path_string(path)
        if key in out:
            raise ValueError(f"`{name}` has two leaves with the path {key!r}")
        out[key] = np.asarray(leaf)
    return out


def save_mask(path: str, mask: Any) -> None:
    """Writes `mask` (any pytree of arrays with NumPy dtypes) to `path`, exactly that file name,
    as an .npz archive with one array per leaf keyed by its `path_string` (e.g.
    "layers/0/mlp/kernel"). Read it with `load_mask` or `np.load`."""
    arrays = _labelled(mask, "mask")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(key + ".npy", buffer.getvalue())


def load_mask(path: str, like: Any) -> Any:
    """The pytree saved by `save_mask` as NumPy arrays (bitwise the saved ones, any dtype),
    with the structure of `like` (e.g. `params`). The stored keys must be the `path_string`s of
    `like`'s leaves and each array must have its leaf's shape; otherwise a ValueError names the
    first mismatch."""
    with np.load(path, allow_pickle=False) as archive:
        stored = {key: archive[key] for key in archive.files}
    flat, treedef = jtu.tree_flatten_with_path(like)
    keys = [path_string(p) for p, _ in flat]
    for key in keys:
        if key not in stored:
            raise ValueError(f"{path!r} has no array for `like` leaf {key!r}")
    for key in stored:
        if key not in set(keys):
            raise ValueError(f"{path!r} holds {key!r}, which is not a leaf of `like`")
    for key, (_, leaf) in zip(keys, flat):
        if stored[key].shape != np.shape(leaf):
            raise ValueError(
                f"{path!r} leaf {key!r} has shape {stored[key].shape}, `like` has {np.shape(leaf)}"
            )
    return jax.tree.unflatten(treedef, [stored[key] for key in keys])


__all__ = [
    "WAGLE_MU",
    "ImportanceMaskState",
    "accumulate_gradients",
    "gradient_scores",
    "load_mask",
    "magnitude_scores",
    "masked_gradients",
    "masked_updates",
    "random_scores",
    "save_mask",
    "top_ratio_mask",
    "wagle_scores",
]
