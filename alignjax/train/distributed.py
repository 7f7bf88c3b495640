"""Multi-process (multi-host) runs through `jax.distributed`.

Every process runs the same program (SPMD, "multi-controller"). `initialize` connects the
processes before any other JAX call; after it, `jax.devices()` lists the devices of every
process and a `sharding.make_mesh` spans them all. The trainer does this from the config
(`mesh.coordinator_address`, `mesh.num_processes`, `mesh.process_id`, or the environment
below), so `alignjax train` needs nothing more; by hand:

    import jax
    from alignjax import data
    from alignjax.train import distributed, sharding
    from alignjax.train import step as S

    info = distributed.initialize()           # from the environment; a no-op for one process
    mesh = sharding.make_mesh(data=-1)        # every device of every process
    state = S.init_state(model, optimizer, reference="frozen", seed=0)  # the same everywhere
    state = sharding.shard_state(state, mesh, sharding.param_specs(state, mesh))
    spec = S.StepSpec(task="paired", row_blocks=jax.process_count())
    step = S.build_step(spec, optimizer)
    loader = data.DataLoader(tokenized, data.LoaderConfig(batch_size=64))  # this host's slice
    for _, host_batch in loader.epoch(0):
        state, metrics = step(state, sharding.shard_batch(host_batch, mesh))
    params = distributed.fetch(state.params)  # NumPy, the full values, on every process

Per-host loading. Each process collates only its slice of every global batch (`DataLoader`
takes `jax.process_index()` / `jax.process_count()` by default; the global batch size must
divide evenly), and `sharding.shard_batch` concatenates the slices into global arrays
(`jax.make_array_from_process_local_data`). A paired slice stacks its own `[chosen; rejected]`
rows, so the global batch is `[c_0; r_0; c_1; r_1]`, one block per process;
`StepSpec(row_blocks=jax.process_count())` tells the step so, and it puts the per-token
results back into the loss's layout `[c_0; c_1; r_0; r_1]` after the model (which is
row-independent). Packed batches index their host's own rows: the trainer refuses them across
processes (`data.packing=false`). Results that live on several processes' devices (evaluation
outputs, the final state) are read with `fetch`, a collective; `gather_rows` concatenates host
(NumPy) rows of every process on every process (the rollout phase of `task: online` gathers its
prompts and rewards so).

Launch N copies with the coordinator address (process 0's host and a free port), N and each
copy's index, as arguments or in the environment:

    ALIGNJAX_COORDINATOR=10.0.0.1:1234 ALIGNJAX_NUM_PROCESSES=2 ALIGNJAX_PROCESS_ID=0 python run.py
    ALIGNJAX_COORDINATOR=10.0.0.1:1234 ALIGNJAX_NUM_PROCESSES=2 ALIGNJAX_PROCESS_ID=1 python run.py

Each value comes from the argument, else `ALIGNJAX_*`, else JAX's own variable name
(`JAX_COORDINATOR_ADDRESS`, which `jax.distributed` reads itself, and by the same convention
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS`). On a cluster that JAX detects
by itself (Slurm, Open MPI, Kubernetes, Cloud TPU, or mpi4py with `cluster_detection_method`),
pass `cluster_detection_method` (e.g. "slurm") and leave the rest unset.

CPU. Cross-process collectives on the CPU backend need a collectives implementation chosen
before the backend is created (`jax_cpu_collectives_implementation`, "gloo" or "mpi"). jax
0.10 defaults to "gloo"; `initialize` sets "gloo" when it is unset (older defaults, or an
explicit None), since without it every computation spanning processes fails with
"Multiprocess computations aren't implemented on the CPU backend".
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "choose_cpu_collectives",
    "ENV_LOCAL_DEVICE_IDS",
    "DistributedInfo",
    "initialize",
    "info",
    "fetch",
    "gather_rows",
]

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "ALIGNJAX_COORDINATOR"
ENV_NUM_PROCESSES = "ALIGNJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ALIGNJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ALIGNJAX_LOCAL_DEVICE_IDS"
# Fallbacks, in order after ours: JAX's own names.
_ENV = {
    "coordinator_address": (ENV_COORDINATOR, "JAX_COORDINATOR_ADDRESS"),
    "num_processes": (ENV_NUM_PROCESSES, "JAX_NUM_PROCESSES"),
    "process_id": (ENV_PROCESS_ID, "JAX_PROCESS_ID"),
    "local_device_ids": (ENV_LOCAL_DEVICE_IDS, "JAX_LOCAL_DEVICE_IDS"),
}


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands.

    Attributes:
      process_index, process_count: `jax.process_index()`, `jax.process_count()`.
      local_device_count, device_count: this process's devices, all processes' devices.
      coordinator_address: "host:port" of the coordinator, None for a single process.
      platform: the default backend ("cpu", "gpu", "tpu").
    """

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    coordinator_address: str | None
    platform: str

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes logs, metrics and checkpoints' metadata."""
        return self.process_index == 0


def info() -> DistributedInfo:
    """The current `DistributedInfo` (initialises the backend if nothing has yet)."""
    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        coordinator_address=_running_coordinator(),
        platform=jax.default_backend(),
    )


def _running_coordinator() -> str | None:
    if not jax.distributed.is_initialized():
        return None
    try:  # jax keeps the address only in its private state
        from jax._src.distributed import global_state
    except ImportError:  # pragma: no cover - a jax that moved it
        return None
    return global_state.coordinator_address


def _from_env(name: str) -> tuple[str | None, str | None]:
    for var in _ENV[name]:
        value = os.environ.get(var)
        if value is not None and value.strip() != "":
            return value.strip(), var
    return None, None


def _as_int(value, what: str, source: str | None) -> int:
    where = f" (from ${source})" if source else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise TypeError(f"`{what}` must be an int, got {value!r}{where}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"`{what}` must be an int, got {value!r}{where}") from None


def _check_address(address: str, source: str | None) -> str:
    where = f" (from ${source})" if source else ""
    if not isinstance(address, str):
        raise TypeError(f"`coordinator_address` must be a 'host:port' string, got {address!r}")
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port or not host:
        raise ValueError(
            f"`coordinator_address` must be 'host:port' (IPv6: '[addr]:port'), got "
            f"{address!r}{where}: no {'host' if sep and port else 'port'}"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"`coordinator_address` {address!r}{where}: the port must be in 1..65535, got {port!r}"
        )
    return address


def _local_ids(value, source: str | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (int, np.integer)):
        value = [value]
    return [_as_int(v, "local_device_ids", source) for v in value]


def choose_cpu_collectives(implementation: str | None) -> None:
    """Choose the CPU cross-process collectives before the CPU client exists."""
    if implementation is not None:
        jax.config.update("jax_cpu_collectives_implementation", implementation)
    elif jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cluster_detection_method: str | None = None,
    cpu_collectives: str | None = None,
    initialization_timeout: int = 300,
) -> DistributedInfo:
    """Join a multi-process run (`jax.distributed.initialize`), or do nothing for one process.

    Call it first, before any other JAX call (anything that creates the backend: computing,
    `jax.devices()`, `jax.device_put`, ...).

    Args:
      coordinator_address: "host:port" of process 0, where it serves the coordinator (any
        free port all processes agree on); else $ALIGNJAX_COORDINATOR, $JAX_COORDINATOR_ADDRESS.
      num_processes: how many processes; else $ALIGNJAX_NUM_PROCESSES, $JAX_NUM_PROCESSES.
        None or 1 (and no `cluster_detection_method`): a single-process run, nothing to join.
      process_id: this process's index in [0, num_processes); else $ALIGNJAX_PROCESS_ID,
        $JAX_PROCESS_ID.
      local_device_ids: restrict this process to these local accelerator ids (GPU); else
        $ALIGNJAX_LOCAL_DEVICE_IDS, $JAX_LOCAL_DEVICE_IDS ("0,1").
      cluster_detection_method: let JAX detect the unset values from a cluster environment
        ("slurm", "ompi", "mpi4py", "k8s", ...): passed to `jax.distributed.initialize`.
      cpu_collectives: CPU cross-process collectives, "gloo" or "mpi"; None keeps JAX's
        choice, or sets "gloo" when there is none (see the module docstring).
      initialization_timeout: seconds to wait for every process to connect.

    Returns:
      a `DistributedInfo`. Calling again once initialised returns it (the values given, if
      any, must agree with the running ones).

    Raises:
      ValueError / TypeError: an address without a port, a non-integer count or id, a
        process id outside [0, num_processes), a missing address or id for several processes.
      RuntimeError: the backend was already created, or the values disagree with the
        running distributed system.

    >>> initialize(num_processes=1).process_count
    1
    """
    addr_src = nproc_src = pid_src = ids_src = None
    if coordinator_address is None:
        coordinator_address, addr_src = _from_env("coordinator_address")
    if num_processes is None:
        num_processes, nproc_src = _from_env("num_processes")
    if process_id is None:
        process_id, pid_src = _from_env("process_id")
    if local_device_ids is None:
        local_device_ids, ids_src = _from_env("local_device_ids")

    if num_processes is not None:
        num_processes = _as_int(num_processes, "num_processes", nproc_src)
        if num_processes < 1:
            raise ValueError(
                f"`num_processes` must be >= 1, got {num_processes}"
                + (f" (from ${nproc_src})" if nproc_src else "")
            )
    if process_id is not None:
        process_id = _as_int(process_id, "process_id", pid_src)
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(
                f"`process_id` {process_id}"
                + (f" (from ${pid_src})" if pid_src else "")
                + f" is not in [0, {num_processes}) for num_processes={num_processes}"
            )
    if coordinator_address is not None:
        coordinator_address = _check_address(coordinator_address, addr_src)
    local_device_ids = _local_ids(local_device_ids, ids_src)

    if jax.distributed.is_initialized():
        current = info()
        mismatch = [
            f"{name}={want} (running: {have})"
            for name, want, have in (
                ("num_processes", num_processes, current.process_count),
                ("process_id", process_id, current.process_index),
                ("coordinator_address", coordinator_address, current.coordinator_address),
            )
            if want is not None and want != have
        ]
        if mismatch:
            raise RuntimeError(
                "jax.distributed is already initialised with other values: " + ", ".join(mismatch)
            )
        return current

    if cluster_detection_method is None and (num_processes is None or num_processes == 1):
        if process_id not in (None, 0):
            raise ValueError(f"`process_id` {process_id} is not in [0, 1) for a single process")
        return info()

    if cluster_detection_method is None:
        missing = [
            f"`{name}` (or ${_ENV[name][0]})"
            for name, value in (
                ("coordinator_address", coordinator_address),
                ("process_id", process_id),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"num_processes={num_processes} also needs " + " and ".join(missing))

    choose_cpu_collectives(cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
            cluster_detection_method=cluster_detection_method,
            initialization_timeout=initialization_timeout,
        )
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "alignjax.train.distributed.initialize must run before any other JAX call (the "
                f"backend already exists): {e}"
            ) from e
        raise
    current = info()
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global %s devices, coordinator %s",
        current.process_index,
        current.process_count,
        current.local_device_count,
        current.device_count,
        current.platform,
        current.coordinator_address,
    )
    return current


def fetch(tree):
    """Every leaf's full value as a NumPy array on every process (`process_allgather`; a
    collective: every process must call it)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def gather_rows(tree):
    """Every process's host rows concatenated in process order, on every process (a
    collective; NumPy as it is in one process). Each leaf has the same shape on every process
    and travels as its bytes, so int64 / float64 survive without `jax_enable_x64` (which
    `process_allgather` would narrow to 32 bits)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    def one(x):
        x = np.ascontiguousarray(x)
        if x.ndim < 1:
            raise ValueError(f"gather_rows needs a leading row axis, got shape {x.shape}")
        raw = x.reshape(x.shape[0], -1).view(np.uint8)
        got = np.ascontiguousarray(multihost_utils.process_allgather(raw, tiled=True))
        return got.view(x.dtype).reshape(-1, *x.shape[1:])

    return jax.tree.map(one, tree)
