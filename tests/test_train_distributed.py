"""alignjax.train.distributed: a 2-process `jax.distributed` run on 127.0.0.1 (2 CPU devices per
process, 4 in all; each process loads only its half of every global batch) trains like one
device: the same losses and parameters after 5 DPO steps, under a data-parallel mesh and a
data x FSDP one. Plus `initialize`'s resolution from arguments / environment and its errors.

The workers are `tests/distributed_worker.py` subprocesses (the parent's 8-device XLA_FLAGS
from conftest must not reach them, and `jax.distributed.initialize` must precede any other JAX
call); the single-device reference runs here, while they run.

Tolerance: 1e-5 relative; losses relative to their value, parameters per leaf relative to the
leaf's largest entry (an elementwise rtol means nothing for entries near 0). The math is the
same; float32 sums are split across devices and processes and all-reduced in another order.
Observed: losses within 3e-7, parameters within 1.1e-6.

The optimizer is AdamW with eps = 1e-4 (tests/distributed_worker.py). With optax's default
eps = 1e-8, Adam's first update is lr * g / (|g| + eps), essentially lr * sign(g): an entry
whose gradient cancels to the level of float32 rounding moves by +-lr depending on that
rounding. Measured after 5 steps (max over leaves, relative to the leaf's max): this 2-process
run 2.6e-4 / 3.4e-4 (data4 / data2_fsdp2), a 1-process 4-device mesh 1.7e-4, and even the
same 1-device step compiled at another XLA optimisation level 5.6e-5; with eps = 1e-5 these
are 2.5e-6 / 3.7e-6, with eps = 1e-4 5.2e-7 / 1.1e-6, while the losses agree to 5e-7 in every
case. The parameters still move by ~1e-3 per entry, far above the tolerance (asserted).
"""

from __future__ import annotations

import doctest
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as W
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.train import distributed, sharding
from alignjax.train import step as S

HERE = Path(__file__).resolve().parent
RTOL = 1e-5
TIMEOUT = 180  # seconds, both workers together (they take ~40 s on 2 shared cores)
ENV_VARS = (
    "ALIGNJAX_COORDINATOR",
    "ALIGNJAX_NUM_PROCESSES",
    "ALIGNJAX_PROCESS_ID",
    "ALIGNJAX_LOCAL_DEVICE_IDS",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(port: int, process_id: int) -> dict:
    """The parent's environment without its device count or distributed settings."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "XLA_FLAGS"}
    flags = ["--xla_force_host_platform_device_count=2"]
    # conftest's -O0 (compile time dominates), unless the run asked for the default.
    flags += [f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" in f]
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        ALIGNJAX_COORDINATOR=f"127.0.0.1:{port}",
        ALIGNJAX_NUM_PROCESSES="2",
        ALIGNJAX_PROCESS_ID=str(process_id),
        PYTHONPATH=os.pathsep.join(
            p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p
        ),
    )
    return env


def start_workers(out: Path, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    port = free_port()
    workers = []
    for pid in range(2):
        log = logs / f"worker{pid}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "distributed_worker.py"), str(out)],
                env=worker_env(port, pid),
                cwd=HERE.parent,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        workers.append((proc, log))
    return workers


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def wait_workers(workers, started: float) -> None:
    try:
        for proc, _ in workers:
            proc.wait(timeout=max(1.0, started + TIMEOUT - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        logs = "\n".join(f"--- worker {i} ---\n{tail(log)}" for i, (_, log) in enumerate(workers))
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT} s:\n{logs}")
    for i, (proc, log) in enumerate(workers):
        assert proc.returncode == 0, f"worker {i} exited {proc.returncode}:\n{tail(log)}"


def single_device_run():
    """The same 5 steps on one device, from one loader of the whole global batches."""
    opt = W.optimizer()
    init = S.init_state(W.tiny_model(), opt, reference="frozen", seed=0)
    initial = W.flat(init.params)
    step = S.build_step(W.step_spec(), opt)
    state, losses, first = init, [], None
    for k, batch in W.loader(process_index=0, process_count=1).epoch(0):
        if k == W.STEPS:
            break
        first = batch if first is None else first
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
        losses.append(float(metrics["loss"]))
    return {"loss": np.asarray(losses), "params": W.flat(state.params), "batch0": first}, initial


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    out = tmp / "run.npz"
    started = time.monotonic()
    workers = start_workers(out, tmp)
    try:
        reference, initial = single_device_run()
    finally:
        wait_workers(workers, started)
    with np.load(out) as f:
        got = dict(f)
    return got, reference, initial


@pytest.mark.parametrize("layout", list(W.LAYOUTS))
def test_two_processes_match_one_device(runs, layout):
    got, ref, initial = runs
    # Per-host loading: each process collated only its 4 of the 8 pairs ...
    assert int(got[f"{layout}/host_examples"]) == W.BATCH // 2
    # ... and the assembled global batch is the one a single loader builds, [chosen; rejected].
    for field in ("input_ids", "loss_mask", "rows"):
        np.testing.assert_array_equal(
            got[f"{layout}/batch0/{field}"], getattr(ref["batch0"], field)
        )

    np.testing.assert_allclose(got[f"{layout}/loss"], ref["loss"], rtol=RTOL)
    assert len(set(np.round(ref["loss"], 4))) == W.STEPS  # distinct batches, a moving model

    prefix = f"{layout}/param"
    assert {k[len(prefix) :] for k in got if k.startswith(prefix)} == set(ref["params"])
    for name, want in ref["params"].items():
        scale = np.max(np.abs(want))
        err = np.max(np.abs(got[prefix + name] - want)) / scale
        assert err <= RTOL, (name, err)
        moved = np.max(np.abs(want - initial[name])) / scale
        assert moved > 100 * RTOL, (name, moved)  # the comparison is not vacuous


# -- initialize -------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_is_a_noop(clean_env):
    jax.devices()  # the backend exists: anything but a no-op would raise
    info = distributed.initialize()
    assert (info.process_index, info.process_count) == (0, 1)
    assert info.device_count == info.local_device_count == jax.device_count()
    assert info.coordinator_address is None and info.is_main and info.platform == "cpu"
    assert distributed.initialize(num_processes=1, process_id=0) == info
    clean_env.setenv("ALIGNJAX_NUM_PROCESSES", "1")
    assert distributed.initialize() == info
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    "args,env,match",
    [
        (("127.0.0.1", 2, 0), {}, r"'host:port'.*no port"),
        ((":1234", 2, 0), {}, r"no host"),
        (("127.0.0.1:0", 2, 0), {}, r"port must be in 1\.\.65535"),
        (("127.0.0.1:http", 2, 0), {}, r"port must be in 1\.\.65535, got 'http'"),
        (("127.0.0.1:1234", 2, 2), {}, r"`process_id` 2 is not in \[0, 2\)"),
        (("127.0.0.1:1234", 2, -1), {}, r"`process_id` -1 is not in \[0, 2\)"),
        (("127.0.0.1:1234", 0, 0), {}, r"`num_processes` must be >= 1"),
        ((None, 1, 1), {}, r"`process_id` 1 is not in \[0, 1\)"),
        ((None, 2, 0), {}, r"also needs `coordinator_address` \(or \$ALIGNJAX_COORDINATOR\)"),
        (("127.0.0.1:1234", 2, None), {}, r"also needs `process_id`"),
        ((), {"ALIGNJAX_NUM_PROCESSES": "two"}, r"got 'two' \(from \$ALIGNJAX_NUM_PROCESSES\)"),
        (
            (),
            {"ALIGNJAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
            r"`process_id` 5 \(from \$JAX_PROCESS_ID\) is not in \[0, 2\)",
        ),
        (
            (),
            {"JAX_COORDINATOR_ADDRESS": "host", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            r"got 'host' \(from \$JAX_COORDINATOR_ADDRESS\): no port",
        ),
    ],
)
def test_initialize_errors(clean_env, args, env, match):
    for var, value in env.items():
        clean_env.setenv(var, value)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args)


def test_argument_wins_over_environment(clean_env):
    clean_env.setenv("ALIGNJAX_NUM_PROCESSES", "4")
    clean_env.setenv("ALIGNJAX_PROCESS_ID", "3")
    assert distributed.initialize(num_processes=1, process_id=0).process_count == 1


def test_after_the_backend_exists_is_an_error(clean_env):
    jax.devices()
    with pytest.raises(RuntimeError, match=r"must run before any other JAX call"):
        distributed.initialize(f"127.0.0.1:{free_port()}", 2, 0)
    assert not jax.distributed.is_initialized()


def test_cpu_collectives_default_to_gloo():
    old = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)
        distributed._ensure_cpu_collectives(None)
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        distributed._ensure_cpu_collectives("mpi")
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", old)


def test_single_process_shard_host_batch_is_shard_batch():
    batch = next(iter(W.loader(0, 1).epoch(0)))[1]
    mesh = sharding.make_mesh(data=-1)
    got = distributed.shard_host_batch(batch, mesh)
    for field in ("input_ids", "valid", "rows"):
        np.testing.assert_array_equal(getattr(got, field), getattr(batch, field))
        assert getattr(got, field).sharding.spec == sharding.batch_spec(getattr(batch, field).ndim)
    np.testing.assert_array_equal(distributed.fetch(got.labels), batch.labels)


def test_docstring_examples_run(clean_env):
    result = doctest.testmod(distributed)
    assert result.attempted > 0 and result.failed == 0
