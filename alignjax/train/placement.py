"""Where a run's state and batches live: one abstraction for one device, a mesh, pmap and
several processes.

    placement = make_placement(cfg.mesh)            # SingleDevice, MeshPlacement, PmapPlacement
    state = placement.put_state(state)
    step_fn = placement.build_step(spec, optimizer, learning_rate=schedule)
    state, metrics = step_fn(state, placement.put_batch(host_batch))
    host = placement.host_state(state)              # whole arrays on this host (export)

A placement owns: putting the state (`put_state`) and batches (`put_batch`), the step's
arguments (`build_step`: out_shardings under a mesh, the pmap axis), the data position, what a
checkpoint stores and how a restored one is placed again, and host transfer (a collective in a
multi-process run). The base `Placement` leaves arrays where they are (a state that already
carries its shardings); the loop uses it when none is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.train import sharding as SH
from alignjax.train.forward import swap_row_blocks
from alignjax.train.step import build_step

__all__ = [
    "Placement",
    "SingleDevice",
    "MeshPlacement",
    "PmapPlacement",
    "make_placement",
    "split_batch_for_pmap",
]


class Placement:
    """State and batches as they are (one device, or arrays that carry their shardings)."""

    def put_state(self, state):
        return state

    def put_batch(self, batch):
        return jax.tree.map(jnp.asarray, batch)

    def build_step(self, spec, optimizer, *, learning_rate=None):
        return build_step(spec, optimizer, learning_rate=learning_rate)

    def host_position(self, state) -> tuple[int, int, int]:
        """(step, epoch, next batch) of the state, as Python ints."""
        epoch, start = (int(x) for x in np.asarray(state.position))
        return int(state.step), epoch, start

    def with_position(self, state, epoch: int, start: int):
        """The state at a new data position, placed like the old one (a global array under a
        multi-process mesh, which orbax needs to save it)."""
        position = np.asarray([epoch, start], np.int32)
        sharding = getattr(state.position, "sharding", None)
        if sharding is None:
            return state.replace(position=jnp.asarray(position))
        return state.replace(position=jax.device_put(position, sharding))

    def to_checkpoint(self, state):
        """What a checkpoint stores (a pytree of arrays)."""
        return state

    def from_checkpoint(self, restored, state):
        """A restored checkpoint placed like `state`."""
        return restored

    def host_state(self, state):
        """The state with every array whole on this host (a collective across processes: every
        process must call it)."""
        state = self.to_checkpoint(state)
        if jax.process_count() > 1:
            from alignjax.train.distributed import fetch

            state = fetch(state)
        return state

    def eval_inputs(self, state):
        """(state, put_batch) for the evaluation step (`evaluate.build_eval_step`, a plain jit)."""
        return state, self.put_batch

    def metrics(self, metrics):
        """A step's metrics as scalars (one replica under pmap)."""
        return metrics


class SingleDevice(Placement):
    """Everything committed to one device (committed like the state each step returns, so the
    second step does not compile again)."""

    def __init__(self, device=None):
        self.device = device or jax.devices()[0]

    def put_state(self, state):
        return jax.device_put(state, self.device)

    def put_batch(self, batch):
        return jax.device_put(batch, self.device)


class MeshPlacement(Placement):
    """A ("data", "fsdp", "tensor") mesh (`sharding.make_mesh`), the state sharded by the
    partition rules and kept in that layout by the step's out_shardings; batches global arrays
    built from each process's rows (`sharding.shard_batch`)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.shardings = None

    def put_state(self, state):
        specs = SH.param_specs(state, self.mesh)
        self.shardings = SH.state_shardings(self.mesh, specs)
        return SH.shard_state(state, self.mesh, specs)

    def put_batch(self, batch):
        return SH.shard_batch(batch, self.mesh)

    def build_step(self, spec, optimizer, *, learning_rate=None):
        if self.shardings is None:
            raise ValueError("MeshPlacement.build_step needs put_state first (the shardings)")
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return build_step(spec, optimizer, learning_rate=learning_rate,
                          out_shardings=(self.shardings, replicated))  # fmt: skip


class PmapPlacement(Placement):
    """A state replicated over this process's devices (`sharding.replicate`), for `jax.pmap`
    steps; each device gets `[chosen; rejected]` of its own examples (`split_batch_for_pmap`)."""

    def __init__(self, devices: Sequence | None = None):
        self.devices = list(jax.local_devices() if devices is None else devices)

    def put_state(self, state):
        return SH.replicate(state, self.devices)

    def put_batch(self, batch):
        return split_batch_for_pmap(batch, len(self.devices))

    def build_step(self, spec, optimizer, *, learning_rate=None):
        return build_step(spec, optimizer, learning_rate=learning_rate, axis_name="batch")

    def host_position(self, state):
        epoch, start = (int(x) for x in np.asarray(state.position[0]))
        return int(state.step[0]), epoch, start

    def with_position(self, state, epoch, start):
        position = SH.replicate(np.asarray([epoch, start], np.int32), self.devices)
        return state.replace(position=position)

    def to_checkpoint(self, state):
        return jax.tree.map(lambda x: x[0], state)

    def from_checkpoint(self, restored, state):
        return SH.replicate(restored, self.devices)

    def eval_inputs(self, state):
        return self.host_state(state), Placement().put_batch  # the host copy, a plain jit

    def metrics(self, metrics):
        return jax.tree.map(lambda x: x[0], metrics)


def make_placement(mesh_cfg) -> Placement:
    """The placement a `config.MeshConfig` asks for: pmap, a mesh over several devices, or one
    device (`devices`: how many of the global devices, -1 for all)."""
    devices = jax.devices()
    if mesh_cfg.devices != -1:
        if not 1 <= mesh_cfg.devices <= len(devices):
            raise ValueError(f"`mesh.devices`={mesh_cfg.devices}: there are {len(devices)}")
        devices = devices[: mesh_cfg.devices]
    if mesh_cfg.pmap:
        return PmapPlacement([d for d in devices if d.process_index == jax.process_index()])
    if len(devices) > 1:
        m = mesh_cfg
        return MeshPlacement(SH.make_mesh(m.data, m.fsdp, m.tensor, devices=devices))
    return SingleDevice(devices[0])


def split_batch_for_pmap(batch, n: int):
    """`[k E, ...]` rows (k blocks of E examples: `[chosen; rejected]`) and `[E]` per-example
    arrays -> `[n, ...]` per device, each device holding `[chosen; rejected]` of its own E / n
    examples (a plain split of the rows would pair one device's chosen rows with another's)."""
    examples = batch.valid.shape[0]
    if examples % n:
        raise ValueError(f"a batch of {examples} examples does not split over {n} devices")
    rows = batch.input_ids.shape[0]
    sides = rows // examples

    def one(x):
        x = np.asarray(x)
        if x.ndim and x.shape[0] == rows and sides > 1:
            return swap_row_blocks(x, sides, n).reshape(n, rows // n, *x.shape[1:])
        return SH.split_for_pmap(x, n)

    return jax.tree.map(one, batch)
