"""Tree surgery: put adapters into any NNX model by regex on module paths, merge / unmerge them,
run the base model with adapters disabled, and save / load adapter-only state.

Module paths are the attribute paths joined with "/", as `nnx.iter_graph` reports them
("layers/0/attn/q_proj"). A rule's pattern must `re.fullmatch` the path; the first rule that
matches decides (an exclusion rule, `Rule(pattern, method=None)`, placed first protects a
module). Only `nnx.Linear` modules are adapted.

    >>> from flax import nnx
    >>> from alignjax import peft
    >>> class Block(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(8, 8, rngs=rngs)
    ...         self.v_proj = nnx.Linear(8, 8, rngs=rngs)
    ...         self.out = nnx.Linear(8, 2, rngs=rngs)
    >>> model = Block(nnx.Rngs(0))
    >>> peft.apply(model, [peft.Rule(r".*_proj", "lora", rank=2, alpha=4)], rngs=nnx.Rngs(1))
    ['q_proj', 'v_proj']
    >>> with peft.adapters_disabled(model):  # the base model: DPO's implicit reference
    ...     pass
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
from flax import nnx

from alignjax.optim.labels import path_string
from alignjax.peft.adalora import AdaLoRA
from alignjax.peft.base import AdapterLinear, AdapterParam
from alignjax.peft.bone import Bone
from alignjax.peft.lora import LoRA

METHODS = ("lora", "dora", "bone", "bat", "mini", "adalora")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Adapt the `nnx.Linear` modules whose path fully matches `pattern`.

    Attributes:
      pattern: a regex, `re.fullmatch`-ed against the '/'-joined module path.
      method: "lora", "dora" (LoRA with DoRA's magnitude), "bone", "bat", "mini" (Bone
        variants; `rank` is the block size), "adalora" (`rank` is init_r), or None to exclude.
      rank: LoRA / AdaLoRA rank, or the Bone block size.
      alpha: the scaling numerator (LoRA: alpha / r; AdaLoRA: alpha / init_r); None: the
        method's default (LoRA: rank; AdaLoRA: 8).
      dropout: dropout rate on the adapter input.
      options: further keyword arguments of the layer (`use_rslora`, `init`, `lora_bias`,
        `mini_r`, ...).
    """

    pattern: str
    method: str | None = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"bad regex in Rule({self.pattern!r}): {err}") from None
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS} or None, got {self.method!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"`rank` must be a positive int, got {self.rank!r}")

    def build(self, base: nnx.Linear, rngs: nnx.Rngs) -> AdapterLinear:
        kw = dict(self.options)
        if self.method in ("lora", "dora"):
            kw.setdefault("use_dora", self.method == "dora")
            return LoRA(
                base, rank=self.rank, alpha=self.alpha, dropout=self.dropout, rngs=rngs, **kw
            )
        if self.method in ("bone", "bat", "mini"):
            return Bone(
                base, rank=self.rank, variant=self.method, dropout=self.dropout, rngs=rngs, **kw
            )
        alpha = 8.0 if self.alpha is None else self.alpha
        return AdaLoRA(base, rank=self.rank, alpha=alpha, dropout=self.dropout, rngs=rngs, **kw)


def _modules(model: nnx.Module, kind: type) -> list[tuple[tuple, nnx.Module]]:
    return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, kind) and p]


def linear_paths(model: nnx.Module) -> list[str]:
    """Paths of the `nnx.Linear` modules an adapter can wrap (not those already inside one)."""
    adapted = {id(m.base) for _, m in _modules(model, AdapterLinear)}
    return [path_string(p) for p, m in _modules(model, nnx.Linear) if id(m) not in adapted]


def _set(model, path: tuple, value) -> None:
    parent = model
    # Integer keys index sequences (nnx.List, list); string keys are attributes or dict keys.
    for key in path[:-1]:
        parent = (
            parent[key]
            if isinstance(key, int) or isinstance(parent, dict)
            else getattr(parent, key)
        )
    key = path[-1]
    if isinstance(key, int) or isinstance(parent, dict):
        parent[key] = value
    else:
        setattr(parent, key, value)


def apply(model: nnx.Module, rules: Sequence[Rule], *, rngs: nnx.Rngs) -> list[str]:
    """Wrap every matching `nnx.Linear` of `model` in place; returns the adapted paths.

    Raises ValueError when no module matches (listing the paths that exist), or when a rule
    matches nothing at all (a typo would otherwise silently train less than intended).
    """
    if not rules:
        raise ValueError("`rules` is empty")
    rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
    adapted_bases = {id(m.base) for _, m in _modules(model, AdapterLinear)}
    candidates = [(p, m) for p, m in _modules(model, nnx.Linear) if id(m) not in adapted_bases]
    used = [False] * len(rules)
    plan = []
    for path, module in candidates:
        for i, rule in enumerate(rules):
            if re.fullmatch(rule.pattern, path_string(path)):
                used[i] = True
                if rule.method is not None:
                    plan.append((path, module, rule))
                break
    existing = [path_string(p) for p, _ in candidates]
    unused = [r.pattern for r, u in zip(rules, used) if not u]
    if unused or not plan:
        what = f"rules {unused} match" if unused else "the rules select"
        raise ValueError(f"{what} no nnx.Linear module; the module paths are: {existing}")
    for path, module, rule in plan:
        _set(model, path, rule.build(module, rngs))
    return [path_string(p) for p, _, _ in plan]


def adapters(model: nnx.Module) -> list[tuple[str, AdapterLinear]]:
    """(path, adapter layer) for every adapter in `model`."""
    return [(path_string(p), m) for p, m in _modules(model, AdapterLinear)]


def merge(model: nnx.Module) -> None:
    """Fold every adapter into its base kernel (in place)."""
    for _, layer in adapters(model):
        layer.merge()


def unmerge(model: nnx.Module) -> None:
    """Undo `merge` (in place)."""
    for _, layer in adapters(model):
        layer.unmerge()


def unload(model: nnx.Module, *, merge_first: bool = True) -> nnx.Module:
    """Replace every adapter layer by its base `nnx.Linear` (merged first by default: PEFT's
    `merge_and_unload`; `merge_first=False` drops the adapters)."""
    for path, layer in adapters(model):
        if merge_first and not layer.merged:
            layer.merge()
        if not merge_first and layer.merged:
            layer.unmerge()
        _set(model, tuple(_split(path)), layer.base)
    return model


def _split(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split("/")]


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Run `model` as its base model: every adapter layer returns its base output. No copy of
    any parameter is made, so this is the free reference model of DPO with adapters. Merged
    adapters cannot be disabled (their update lives in the base kernel): a ValueError says so.
    """
    layers = [layer for _, layer in adapters(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("unmerge the adapters before disabling them")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapter-only state (`nnx.state(model, AdapterParam)`), e.g. for a checkpoint."""
    return nnx.state(model, AdapterParam)


def load_adapter_state(model: nnx.Module, state: nnx.State) -> None:
    """Load adapter-only state into a model with the same adapters (in place)."""
    nnx.update(model, state)


def adalora_triplets(model: nnx.Module, grads: nnx.State | None = None) -> dict[str, tuple]:
    """`{path: (a, e, b)}` of the model's AdaLoRA layers, the input of
    `adalora_allocator.update_and_allocate`; with `grads` (an `nnx.State` of the same model,
    e.g. from `nnx.grad(..., argnums=nnx.DiffState(0, AdapterParam))`), the gradients at the
    same places instead."""
    out = {}
    for path, layer in adapters(model):
        if not isinstance(layer, AdaLoRA):
            continue
        if grads is None:
            out[path] = (layer.lora_a[...], layer.lora_e[...], layer.lora_b[...])
            continue
        node = grads
        for key in _split(path):
            node = node[key]
        out[path] = tuple(jnp.asarray(node[k][...]) for k in ("lora_a", "lora_e", "lora_b"))
    if not out:
        raise ValueError("`model` has no AdaLoRA layers")
    return out


def set_adalora_e(model: nnx.Module, triplets: dict[str, tuple]) -> None:
    """Write the singular values `e` of `triplets` (as returned by the allocator) back into the
    model's AdaLoRA layers, in place."""
    layers = dict(adapters(model))
    for path, (_, e, _) in triplets.items():
        layers[path].lora_e[...] = e
