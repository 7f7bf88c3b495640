"""Device meshes and parameter / batch shardings for the Llama family, plus the pmap path.

One mesh with three named axes, `AXES = ("data", "fsdp", "tensor")`:

- "data": pure data parallelism (parameters replicated, batch split);
- "fsdp": ZeRO-3 / FSDP: the batch is split *and* each matrix is split along the dimension
  that tensor parallelism leaves alone, gathered just in time by XLA;
- "tensor": Megatron-style tensor parallelism (Shoeybi et al. 2019, arXiv:1909.08053, sec. 3):
  q/k/v and gate/up are column-parallel (output features split), o_proj and down_proj are
  row-parallel (input features split), so each attention / MLP block needs one all-reduce;
  the embedding is vocab-parallel and the LM head splits the vocabulary.

A parameter gets its `PartitionSpec` from the first rule in `DEFAULT_RULES` whose regex
`re.search`-es its '/'-joined path ("model/layers/0/self_attn/q_proj/kernel"). Searching rather
than full-matching lets the same rules place LoRA-wrapped layers (".../q_proj/base/kernel") and
optimizer moments whose paths end in a parameter's path ("opt_state/0/mu/model/...").
Unmatched leaves are replicated. A dimension that the product of its mesh axes does not divide
is replicated instead: `explain_specs` lists those fallbacks, `param_specs` logs them.

    >>> import jax.numpy as jnp
    >>> mesh = make_mesh(data=-1)
    >>> state = {"model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.ones((8, 16))}}}}}}
    >>> specs = param_specs(state, mesh)
    >>> specs["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    P('fsdp', 'tensor')
    >>> sharded = shard_state(state, mesh, specs)
    >>> batch = shard_batch({"input_ids": np.zeros((mesh.size, 4), np.int32)}, mesh)
    >>> batch["input_ids"].sharding.spec
    P(('data', 'fsdp'), None)

Jit a step with `in_shardings=(state_shardings(mesh, specs), ...)` and the same shardings as
`out_shardings` for the new state; XLA's SPMD partitioner inserts the collectives.

Why `jax.sharding.AxisType.Auto`: `jax.make_mesh` (jax 0.10) defaults to `Explicit` axes,
where shardings become part of the types and every op must resolve its output sharding
unambiguously; the model code is written for the classic automatic (GSPMD) propagation, so
`make_mesh` asks for `Auto` axes explicitly.

The pmap path (`replicate`, `split_for_pmap`, `unreplicate`) is for code written against
`jax.pmap` (`jax.lax.pmean` over an axis name); `jax.device_put_replicated`, what
`flax.jax_utils.replicate` used, was removed in jax 0.10.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignjax.optim.labels import path_string

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "Fallback",
    "batch_spec",
    "explain_specs",
    "make_mesh",
    "param_specs",
    "replicate",
    "shard_batch",
    "shard_global_batch",
    "shard_state",
    "split_for_pmap",
    "state_shardings",
    "unreplicate",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

logger = logging.getLogger(__name__)

Rules = Sequence[tuple[str, P]]

_COLUMN = r"(self_attn/[qkv]_proj|mlp/(gate|up)_proj)"
_ROW = r"(self_attn/o_proj|mlp/down_proj)"

# Kernels are Flax (in, out). An adapter around a layer splits like it: LoRA's a (in, r) takes the
# kernel's input-dim axis, b (r, out) its output-dim axis, the rank r stays whole.
DEFAULT_RULES: list[tuple[str, P]] = [
    (rf"(^|/){_COLUMN}/(base/)?kernel$", P("fsdp", "tensor")),
    (rf"(^|/){_COLUMN}/(base/)?bias$", P("tensor")),
    (rf"(^|/){_ROW}/(base/)?kernel$", P("tensor", "fsdp")),
    (rf"(^|/){_COLUMN}/lora_a$", P("fsdp", None)),
    (rf"(^|/){_COLUMN}/lora_b$", P(None, "tensor")),
    (rf"(^|/){_ROW}/lora_a$", P("tensor", None)),
    (rf"(^|/){_ROW}/lora_b$", P(None, "fsdp")),
    # Vocab-parallel. Splitting D over "fsdp" too saves the most memory of any matrix, at a
    # price: the lookup's output comes out D-split over "fsdp" while the batch is split over it,
    # and XLA reshards that [B, T, D] activation by a full all-gather (its "Involuntary full
    # rematerialization" warning). Override with P("tensor", None) if activations dominate.
    (r"(^|/)embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"(^|/)lm_head/(base/)?kernel$", P("fsdp", "tensor")),
]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices) with Auto axes.

    One size may be -1: all the devices the others leave. The product must equal the number of
    devices (`jax.make_mesh` alone would silently use a prefix of them).

    >>> mesh = make_mesh(data=-1, fsdp=1, tensor=1)
    >>> mesh.axis_names, mesh.size == jax.device_count()
    (('data', 'fsdp', 'tensor'), True)
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"`{name}` must be a positive int or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free} = -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes' product {fixed} does not divide the {n} devices"
            )
        sizes[free[0]] = n // fixed
    shape = tuple(sizes[a] for a in AXES)
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} "
            f"devices, but there are {n}; use -1 for one axis to take the rest"
        )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


class Fallback(NamedTuple):
    """Dimension `dim` (of size `size`) of the leaf at `path` is replicated instead of split over
    `axes`, whose product `mesh_size` does not divide it."""

    path: str
    dim: int
    size: int
    axes: tuple[str, ...]
    mesh_size: int


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _assign(state, mesh: Mesh, rules: Rules) -> tuple[Any, list[Fallback]]:
    compiled = []
    for pattern, spec in rules:
        if not isinstance(spec, P):
            raise TypeError(f"rule {pattern!r}: the spec must be a PartitionSpec, got {spec!r}")
        for entry in spec:
            for axis in _entry_axes(entry):
                if axis not in mesh.shape:
                    raise ValueError(
                        f"rule {pattern!r} uses mesh axis {axis!r}; the mesh has "
                        f"{tuple(mesh.axis_names)}"
                    )
        compiled.append((re.compile(pattern), pattern, spec))
    fallbacks: list[Fallback] = []

    def one(keypath, leaf):
        path = path_string(keypath)
        shape = tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
        match = next((rule for rule in compiled if rule[0].search(path)), None)
        if match is None:
            return P()
        _, pattern, spec = match
        if len(spec) > len(shape):
            raise ValueError(
                f"rule {pattern!r} gives {path!r} the spec {spec} with {len(spec)} entries, but "
                f"the array has {len(shape)} dimensions (shape {shape})"
            )
        entries = []
        for dim, entry in enumerate(spec):
            axes = _entry_axes(entry)
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                fallbacks.append(Fallback(path, dim, shape[dim], axes, size))
                entry = None
            entries.append(entry)
        return P(*entries)

    return jax.tree_util.tree_map_with_path(one, state), fallbacks


def param_specs(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """A `PartitionSpec` for every leaf of `state`, in the same tree structure.

    Args:
      state: an `nnx.State` (from `nnx.split(model)` or `nnx.eval_shape`), or any pytree of
        arrays / `jax.ShapeDtypeStruct`s.
      mesh: the mesh whose axis sizes decide divisibility.
      rules: (regex, spec) pairs; the first regex that `re.search`-es the '/'-joined path wins,
        no match means replicated, P().

    Raises ValueError when a matching spec has more entries than the array has dimensions, or
    names an axis the mesh lacks. Dimensions that do not divide are replicated and logged at
    WARNING level; `explain_specs` returns them.

    >>> import jax.numpy as jnp
    >>> mesh = make_mesh(data=-1)
    >>> param_specs({"lm_head": {"kernel": jnp.ones((4, 8))}, "norm": jnp.ones(4)}, mesh)
    {'lm_head': {'kernel': P('fsdp', 'tensor')}, 'norm': P()}
    """
    specs, fallbacks = _assign(state, mesh, rules)
    if fallbacks:
        logger.warning(
            "%d dimension(s) replicated because the mesh does not divide them: %s",
            len(fallbacks),
            "; ".join(
                f"{f.path} dim {f.dim} (size {f.size}) over {'x'.join(f.axes)}={f.mesh_size}"
                for f in fallbacks
            ),
        )
    return specs


def explain_specs(state, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> list[Fallback]:
    """The dimensions that `param_specs` replicates because their mesh axes do not divide them.

    Specs only need the mesh's axis sizes, so a target mesh can be checked without its devices:

    >>> mesh = jax.sharding.AbstractMesh((1, 2, 4), AXES)
    >>> state = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((250, 64), np.float32)}}
    >>> explain_specs(state, mesh)
    [Fallback(path='embed_tokens/embedding', dim=0, size=250, axes=('tensor',), mesh_size=4)]
    """
    return _assign(state, mesh, rules)[1]


def state_shardings(mesh: Mesh, specs):
    """`NamedSharding(mesh, spec)` for every spec: jit's `in_shardings` / `out_shardings`, or
    the `out_shardings` of a jitted initialiser to create a model directly sharded."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_state(state, mesh: Mesh, specs):
    """`state` placed on `mesh` as `specs` says (`jax.device_put`). Every process must hold the
    same full values (e.g. the same seed or checkpoint)."""
    return jax.device_put(state, state_shardings(mesh, specs))


def batch_spec(ndim: int) -> P:
    """The batch layout: leading axis split over ("data", "fsdp") jointly, the rest whole.

    >>> batch_spec(2)
    P(('data', 'fsdp'), None)
    """
    if ndim < 1:
        raise ValueError(f"a batch array needs a leading batch axis, got ndim={ndim}")
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def _local_batch_shards(mesh: Mesh) -> int:
    """How many distinct batch slices this process's devices hold."""
    axes = [mesh.axis_names.index(a) for a in BATCH_AXES]
    me = jax.process_index()
    coords = {
        tuple(pos[i] for i in axes)
        for pos, device in np.ndenumerate(mesh.devices)
        if device.process_index == me
    }
    return len(coords)


def shard_batch(batch, mesh: Mesh):
    """Host-local NumPy arrays -> global `jax.Array`s laid out as `batch_spec`.

    Each process passes its own rows (`jax.make_array_from_process_local_data`); in a single
    process they are the whole batch. The global leading dimension is the local one times the
    number of processes that feed distinct rows.

    >>> mesh = make_mesh(data=-1)
    >>> x = shard_batch(np.arange(2 * mesh.size).reshape(mesh.size, 2), mesh)
    >>> x.shape == (mesh.size, 2), x.sharding.spec
    (True, P(('data', 'fsdp'), None))
    """
    missing = [a for a in BATCH_AXES if a not in mesh.shape]
    if missing:
        raise ValueError(f"the mesh needs axes {BATCH_AXES}, it has {tuple(mesh.axis_names)}")
    n_batch = math.prod(mesh.shape[a] for a in BATCH_AXES)
    local_shards = _local_batch_shards(mesh)

    def one(keypath, leaf):
        x = np.asarray(leaf)
        name = path_string(keypath) or "batch"
        if x.ndim < 1:
            raise ValueError(f"batch leaf {name!r} is a scalar; it needs a leading batch axis")
        if x.shape[0] % local_shards:
            where = (
                f"data x fsdp = {n_batch}"
                if local_shards == n_batch
                else f"the {local_shards} batch shards of process {jax.process_index()}"
            )
            raise ValueError(
                f"batch leaf {name!r} has leading dimension {x.shape[0]}, not divisible by {where}"
            )
        global_shape = (x.shape[0] // local_shards * n_batch, *x.shape[1:])
        sharding = NamedSharding(mesh, batch_spec(x.ndim))
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(one, batch)


def shard_global_batch(batch, mesh: Mesh):
    """Host arrays that every process holds whole (the global batch) -> global `jax.Array`s
    laid out as `batch_spec` (`jax.device_put`: each process transfers its own devices'
    shards). `shard_batch` takes each process's own rows instead; in one process they agree.

    >>> mesh = make_mesh(data=-1)
    >>> x = shard_global_batch(np.arange(2 * mesh.size).reshape(mesh.size, 2), mesh)
    >>> x.shape == (mesh.size, 2), x.sharding.spec
    (True, P(('data', 'fsdp'), None))
    """
    n_batch = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def one(keypath, leaf):
        x = np.asarray(leaf)
        name = path_string(keypath) or "batch"
        if x.ndim < 1 or x.shape[0] % n_batch:
            raise ValueError(f"batch leaf {name!r} of shape {x.shape}: the leading dimension "
                             f"must be divisible by data x fsdp = {n_batch}")  # fmt: skip
        return jax.device_put(x, NamedSharding(mesh, batch_spec(x.ndim)))

    return jax.tree_util.tree_map_with_path(one, batch)


def replicate(tree, devices: Sequence[Any] | None = None):
    """Copy every leaf to each device along a new leading axis, as `jax.pmap` expects.

    >>> r = replicate({"w": np.ones(3)})
    >>> r["w"].shape == (jax.local_device_count(), 3)
    True
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("`devices` is empty")
    sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), P("replica"))

    def one(x):
        x = x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, shards)

    return jax.tree.map(one, tree)


def unreplicate(tree):
    """The first replica of every leaf (the inverse of `replicate`)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch, n_devices: int | None = None):
    """Reshape every leaf's leading axis B to [n_devices, B / n_devices, ...].

    >>> split_for_pmap({"ids": np.zeros((8, 5))}, 4)["ids"].shape
    (4, 2, 5)
    """
    n = jax.local_device_count() if n_devices is None else n_devices
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n_devices` must be a positive int, got {n!r}")

    def one(keypath, x):
        name = path_string(keypath) or "batch"
        shape = np.shape(x)
        if not shape or shape[0] % n:
            raise ValueError(
                f"batch leaf {name!r} of shape {shape}: the leading dimension must be divisible "
                f"by n_devices={n}"
            )
        x = x if hasattr(x, "reshape") else np.asarray(x)
        return x.reshape(n, shape[0] // n, *shape[1:])

    return jax.tree_util.tree_map_with_path(one, batch)
