"""Parameter labels: path strings, regex rules, adapter-only, no-decay masks, Half Fine-Tuning.

Labelling functions return one label per array (an `nnx.Variable` counts as one array): the
structure of `nnx.as_pure(state)`, a prefix of `nnx.state(model, wrt)`. So one label tree serves
`optax.partition`, `optax.masked` and `adamw(mask=...)` on pytrees, on `nnx.State` and inside
`nnx.Optimizer` (which calls `init` on Variables but `update` on pure arrays).

Freezing uses the labels "trainable" / "frozen", applied in one of two ways:
- `train_only(tx, labels)`: static `optax.partition`; frozen leaves hold no optimizer state.
- `masked_train(inner, trainable)`: the mask is optimizer state, so `set_trainable` swaps it
  between stages without recompiling, checkpoints record it, and frozen leaves keep their Adam
  moments paused (not reset). `hft` (Half Fine-Tuning) builds on it.
Neither saves the backward pass of frozen leaves: for that, differentiate only trainable
Variables (`nnx.grad` with `nnx.DiffState(0, filter)`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from flax import nnx

TRAINABLE = "trainable"
FROZEN = "frozen"

# Path components delimited by "/" so that e.g. "backbone" is not mistaken for a Bone adapter.
DEFAULT_ADAPTER_PATTERN = r"(?i)(?:^|/)(?:[^/]*_)?(?:lora|adapter|bone)(?:_[^/]*)?(?:/|$)"
DEFAULT_NO_DECAY_PATTERN = r"(?i)(?:^|/)(?:bias|[^/]*norm[^/]*|ln_?[a-z0-9]*)(?:/|$)"
DEFAULT_EMBEDDING_PATTERN = r"(?i)(?:^|/)[^/]*(?:embed|wte|wpe)[^/]*(?:/|$)"
DEFAULT_HFT_BLOCK_PATTERN = r"(?:^|/)(?:layers|layer|blocks|block|h)/(\d+)/"
DEFAULT_HFT_CATEGORIES: dict[str, str] = {
    "attention": r"(?:^|/)(?:q_proj|k_proj|v_proj|o_proj|query|key|value|out)(?=/|$)",
    "mlp": r"(?:^|/)(?:gate_proj|up_proj|down_proj|fc1|fc2)(?=/|$)",
    "norm": r"(?:^|/)(?:[^/]*norm[^/]*|ln_?\d*)(?=/|$)",
}

LabelTree = Any  # the params structure with a label (str or bool) per array


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _key(k: Any) -> Any:  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    return next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)


def path_string(path: Sequence[Any]) -> str:
    """Joins a JAX key path (or an NNX graph path of names and indices) with "/":
    `(DictKey("h"), SequenceKey(0))` -> "h/0". The trailing "value" attribute an `nnx.Variable`
    flattens to is not part of the name. The one key-path-to-string helper of the package."""
    parts = [str(_key(k)) for k in path]
    if parts and parts[-1] == "value" and isinstance(path[-1], jtu.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def _tree(params: Any, wrt: Any) -> Any:
    return nnx.state(params, wrt) if isinstance(params, nnx.Module) else params


def _map(fn: Callable[[tuple, str, Any], Any], params: Any) -> LabelTree:
    """`fn(path_keys, path_str, leaf)` per leaf, a Variable being one leaf (pure structure)."""
    visit = lambda path, leaf: fn(tuple(_key(k) for k in path), path_string(path), leaf)  # noqa: E731
    return jtu.tree_map_with_path(visit, params, is_leaf=_is_variable)


def param_paths(params: Any, *, wrt: Any = nnx.Param) -> LabelTree:
    """Tree of paths such as "layers/0/attn/q_proj/kernel".

    `params`: a pytree, an `nnx.State`, or an `nnx.Module` (read as `nnx.state(model, wrt)`); the
    same holds for every labelling function below.
    """
    return _map(lambda keys, path, leaf: path, _tree(params, wrt))


def label_by_regex(
    params: Any,
    rules: Mapping[str, Any] | Sequence[tuple[str, Any]],
    default: Any,
    *,
    wrt: Any = nnx.Param,
) -> LabelTree:
    """Labels each leaf by the first regex in `rules` that `re.fullmatch`-es its path.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.zeros((2, 2))
      >>> label_by_regex({"enc": {"w": x}, "head": {"w": x}}, {r"head/.*": "adam"}, "sgd")
      {'enc': {'w': 'sgd'}, 'head': {'w': 'adam'}}
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    try:
        compiled = [(re.compile(pattern), label) for pattern, label in items]
    except (re.error, TypeError, ValueError) as e:
        raise ValueError(f"`rules` must be (regex, label) pairs: {e}") from e

    def label(keys, path, leaf):
        return next((lab for rx, lab in compiled if rx.fullmatch(path)), default)

    return _map(label, _tree(params, wrt))


def adapter_labels(
    params_or_model: Any,
    *,
    adapter_filter: Any = None,
    pattern: str = DEFAULT_ADAPTER_PATTERN,
    wrt: Any = nnx.Param,
) -> LabelTree:
    """Labels adapters "trainable", the rest "frozen"; ValueError if there is no adapter.

    Variables are adapters when they match the nnx filter `adapter_filter` (default
    `nnx.LoRAParam` and subclasses, which alignjax adapters are). Plain arrays match a path-based
    `adapter_filter` if given (e.g. `nnx.PathContains("lora")`), else `re.search(pattern, path)`:
    path components `lora`, `lora_a`, `q_lora`, `adapter*`, `bone*` (not `backbone`). If the
    optimizer may see only the adapters, `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` is simpler.

    Example:
      >>> model = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
      >>> labels = adapter_labels(nnx.state(model, nnx.Param))
      >>> sorted(set(jax.tree.leaves(labels)))
      ['frozen', 'trainable']
      >>> tx = optax.partition({"trainable": optax.adam(1e-3), "frozen": optax.set_to_zero()},
      ...                      labels)  # same as train_only(optax.adam(1e-3), labels)
    """
    flt = nnx.LoRAParam if adapter_filter is None else adapter_filter
    predicate = nnx.filterlib.to_predicate(flt)
    regex = re.compile(pattern)

    def label(keys, path, leaf):
        if _is_variable(leaf) or adapter_filter is not None:
            hit = predicate(keys, leaf)
        else:
            hit = regex.search(path) is not None
        return TRAINABLE if hit else FROZEN

    labels = _map(label, _tree(params_or_model, wrt))
    if TRAINABLE not in jax.tree.leaves(labels):
        raise ValueError("`params_or_model` has no adapter (per `adapter_filter` / `pattern`)")
    return labels


def decay_mask(
    params: Any,
    *,
    min_ndim: int = 2,
    no_decay_pattern: str | None = DEFAULT_NO_DECAY_PATTERN,
    decay_embeddings: bool = True,
    embedding_pattern: str = DEFAULT_EMBEDDING_PATTERN,
    wrt: Any = nnx.Param,
) -> LabelTree:
    """True where weight decay applies, for `optax.adamw(..., mask=decay_mask(params))`.

    As HF Trainer / TRL: no decay on biases and norm weights, decay elsewhere, embeddings
    included. Excluded: `ndim < min_ndim`, or `re.search(no_decay_pattern, path)` (components
    `bias`, `*norm*`, `ln*`; catches stacked `nnx.scan` layers where a bias is `[L, D]`), and with
    `decay_embeddings=False` also `embedding_pattern` (`*embed*`, `wte`, `wpe`).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> decay_mask(params)
      {'dense': {'bias': False, 'kernel': True}}
      >>> tx = optax.adamw(1e-3, weight_decay=0.1, mask=decay_mask(params))
    """
    if min_ndim < 0:
        raise ValueError(f"`min_ndim` must be >= 0, got {min_ndim}")
    no_decay = re.compile(no_decay_pattern) if no_decay_pattern else None
    embedding = re.compile(embedding_pattern)

    def decays(keys, path, leaf):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        ndim = len(value.shape) if hasattr(value, "shape") else np.ndim(value)
        if ndim < min_ndim or (no_decay is not None and no_decay.search(path)):
            return False
        return decay_embeddings or embedding.search(path) is None

    return _map(decays, _tree(params, wrt))


def _round_half_down(x: float) -> int:
    return max(0, math.ceil(x - 0.5 - 1e-9))


def _hft_groups(paths: list[str], block_pattern: str, categories: Mapping[str, str]):
    """({category: {block: {member: [leaf index]}}}, [indices outside blocks]), ordered."""
    block_rx = re.compile(block_pattern)
    category_rx = [(name, re.compile(p)) for name, p in categories.items()]
    groups: dict[str, dict[str, dict[str, list[int]]]] = {}
    outside: list[int] = []
    for i, path in enumerate(paths):
        m = block_rx.search(path)
        if m is None:
            outside.append(i)
            continue
        block, rest = path[: m.end()], path[m.end() :]
        hits = ((c, rx.search(rest)) for c, rx in category_rx)
        category, hit = next(((c, h) for c, h in hits if h is not None), ("other", None))
        member = rest[: hit.end()] if hit is not None else rest.rsplit("/", 1)[0]
        groups.setdefault(category, {}).setdefault(block, {}).setdefault(member, []).append(i)
    return groups, outside


def hft_labels(
    params: Any,
    *,
    seed: int,
    stage: int = 0,
    fraction: float = 0.5,
    block_pattern: str = DEFAULT_HFT_BLOCK_PATTERN,
    category_patterns: Mapping[str, str] | None = None,
    train_outside_blocks: bool = True,
    wrt: Any = nnx.Param,
) -> LabelTree:
    """Half Fine-Tuning labels: in each block and category, a random `fraction` is trainable.

    Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models", arXiv:2404.18466 (ACL
    2025), category-level selection, their best variant. Per layer: 2 of the 4 attention matrices
    (W_Q, W_K, W_V, W_O); of the 3 MLP matrices, 2 in a random half of the layers and 1 in the
    other half; half of the norms; embeddings and LM head trained (`train_outside_blocks`). Rule
    taken from secondary summaries of the paper; no authors' code was found to check it.

    Generic rule. `re.search(block_pattern, path)` puts a leaf in the block named by the path up
    to the match end; the rest is searched with `category_patterns` (first hit wins) and the rest
    up to that hit names the member ("self_attn/q_proj": kernel and bias decide together).
    Uncategorised in-block leaves form category "other", one member per parent module. With
    `n_b` members in block b, `floor(fraction * n_b)` are trainable, plus one in a random
    `round_half_down(sum_b frac(fraction * n_b))` of the blocks. No block at all: a random
    `round_half_down(fraction * n_leaves)` leaves are trainable. The draw uses NumPy seeded with
    `(seed, stage)`, on paths only (outside jit): deterministic, and new at every stage.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.zeros((2, 2))
      >>> layer = {p: {"kernel": w} for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
      >>> labels = hft_labels({"layers": {"0": layer}}, seed=0, stage=1)
      >>> sorted(jax.tree.leaves(labels))  # half of the attention projections train
      ['frozen', 'frozen', 'trainable', 'trainable']
    """
    for name, value in (("seed", seed), ("stage", stage)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be in [0, 1], got {fraction}")
    categories = DEFAULT_HFT_CATEGORIES if category_patterns is None else category_patterns
    rng = np.random.default_rng([int(seed), int(stage)])
    tree = _tree(params, wrt)
    paths = jax.tree.leaves(param_paths(tree))
    groups, outside = _hft_groups(paths, block_pattern, categories)
    trainable = np.zeros(len(paths), dtype=bool)
    if groups:
        trainable[outside] = train_outside_blocks
    else:
        k = _round_half_down(fraction * len(paths))
        trainable[rng.choice(len(paths), size=k, replace=False)] = True
    for blocks in groups.values():
        per_block = list(blocks.values())  # [{member: [leaf index, ...]}, ...]
        targets = [fraction * len(members) for members in per_block]
        base = [math.floor(t + 1e-9) for t in targets]
        rems = [t - b for t, b in zip(targets, base)]
        candidates = [j for j, r in enumerate(rems) if r > 1e-9]
        n_extra = min(len(candidates), _round_half_down(sum(rems)))
        extra = set(rng.choice(candidates, size=n_extra, replace=False).tolist())
        for j, members in enumerate(per_block):
            leaves = list(members.values())
            for pick in rng.choice(len(leaves), size=base[j] + (j in extra), replace=False):
                trainable[leaves[pick]] = True
    flat = iter(TRAINABLE if t else FROZEN for t in trainable)
    return _map(lambda keys, path, leaf: next(flat), tree)


def _as_labels(labels: Any) -> LabelTree:
    def convert(leaf):
        if isinstance(leaf, str) and leaf not in (TRAINABLE, FROZEN):
            raise ValueError(f"labels must be {TRAINABLE!r}/{FROZEN!r} or bools, got {leaf!r}")
        return leaf if isinstance(leaf, str) else (TRAINABLE if bool(leaf) else FROZEN)

    if callable(labels):
        return lambda params: jax.tree.map(convert, labels(params))
    return jax.tree.map(convert, labels)


def train_only(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """`tx` on "trainable" leaves, zero updates on "frozen" ones (which hold no optimizer state).

    `labels`: labels, bools (True = trainable) or a callable on params returning either. For
    labels that change during training, use `masked_train`.

    Example:
      >>> model = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
      >>> tx = train_only(optax.adamw(1e-4), adapter_labels(model))
    """
    return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, _as_labels(labels))


class MaskedTrainState(NamedTuple):
    """State of `masked_train`: the inner state and one bool scalar per parameter leaf."""

    inner_state: optax.OptState
    trainable: Any


def _bool_mask(trainable: Any, reference_structure: Any, name: str) -> Any:
    labels = _as_labels(trainable)
    mask = jax.tree.map(lambda lab: jnp.asarray(lab == TRAINABLE), labels)
    if jax.tree.structure(mask) != reference_structure:
        got = jax.tree.structure(mask)
        raise ValueError(
            f"`{name}` must have the params structure {reference_structure}, got {got}"
        )
    return mask


def _keep_frozen_state(mask: Any, new: Any, old: Any) -> Any:
    """Old state on frozen leaves of every sub-tree with the params structure (`MaskedNode`s
    as leaves, so the partial moment trees inside `optax.partition` / `optax.masked` count)."""
    params_def = jax.tree.structure(mask)
    is_masked = lambda z: isinstance(z, optax.MaskedNode)  # noqa: E731

    def is_params_like(x):
        return jax.tree.structure(x, is_leaf=is_masked) == params_def

    def select(n, o):
        keep = lambda m, a, b: a if is_masked(a) else jnp.where(m, a, b)  # noqa: E731
        return jax.tree.map(keep, mask, n, o) if is_params_like(n) else n

    return jax.tree.map(select, new, old, is_leaf=is_params_like)


def masked_train(
    inner: optax.GradientTransformation, trainable: Any
) -> optax.GradientTransformationExtraArgs:
    """`inner` on trainable leaves only, with the mask held in the state (swappable, no retrace).

    On frozen leaves the update is zero and every params-shaped part of the inner state (Adam
    `mu`/`nu`, ...) keeps its value, so a leaf resumes with its moments when unfrozen; scalars
    such as Adam's `count` advance every step (bias correction is global). `trainable`: labels,
    bools, or a callable on params returning either. Swap it with `set_trainable`.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = {p: {"kernel": jnp.ones((2, 2))} for p in ("q_proj", "k_proj")}
      >>> params = {"layers": {"0": layer}}
      >>> tx = masked_train(optax.adam(1e-3), hft_labels(params, seed=0, stage=0))
      >>> state = tx.init(params)
      >>> state = set_trainable(state, hft_labels(params, seed=0, stage=1))  # next stage
    """
    inner = optax.with_extra_args_support(inner)  # so extra args reach e.g. a line search

    def init_fn(params):
        labels = trainable(params) if callable(trainable) else trainable
        structure = jax.tree.structure(params, is_leaf=_is_variable)
        return MaskedTrainState(inner.init(params), _bool_mask(labels, structure, "trainable"))

    def update_fn(updates, state, params=None, **extra_args):
        mask = state.trainable
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(
            lambda m, u: jnp.where(m, u, 0).astype(u.dtype), mask, new_updates
        )
        new_inner = _keep_frozen_state(mask, new_inner, state.inner_state)
        return new_updates, MaskedTrainState(new_inner, mask)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_trainable(opt_state: Any, trainable: Any) -> Any:
    """Replaces the mask of every `MaskedTrainState` in `opt_state` (e.g. the next HFT stage).

    Returns the new state; an `nnx.Optimizer.opt_state` (Variables) is updated in place.

    Example:
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, hft(optax.adam(1e-3), seed=0), wrt=nnx.Param)
      >>> _ = set_trainable(optimizer.opt_state, hft_labels(model, seed=0, stage=1))
    """
    found = []

    def replace(node):
        if not isinstance(node, MaskedTrainState):
            return node
        found.append(node)
        structure = jax.tree.structure(node.trainable, is_leaf=_is_variable)
        new = _bool_mask(trainable, structure, "trainable")
        old_leaves = jax.tree.leaves(node.trainable, is_leaf=_is_variable)
        if old_leaves and all(_is_variable(v) for v in old_leaves):
            for variable, value in zip(old_leaves, jax.tree.leaves(new)):
                variable.set_value(value)
            return node
        return node._replace(trainable=new)

    is_leaf = lambda x: isinstance(x, MaskedTrainState) or _is_variable(x)  # noqa: E731
    out = jax.tree.map(replace, opt_state, is_leaf=is_leaf)
    if not found:
        raise ValueError("`opt_state` contains no MaskedTrainState (use masked_train or hft)")
    return out


def hft(
    inner: optax.GradientTransformation, *, seed: int, stage: int = 0, **rule: Any
) -> optax.GradientTransformationExtraArgs:
    """Half Fine-Tuning: `masked_train(inner, hft_labels(params_at_init, seed=, stage=, **rule))`.

    Next stage: `set_trainable(state, hft_labels(params, seed=seed, stage=stage + 1, **rule))`,
    which keeps every leaf's moments and does not recompile.

    Example:
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> tx = hft(optax.adamw(1e-5), seed=0)
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    """
    hft_labels(0.0, seed=seed, stage=stage, **rule)  # validate arguments now
    return masked_train(inner, functools.partial(hft_labels, seed=seed, stage=stage, **rule))
