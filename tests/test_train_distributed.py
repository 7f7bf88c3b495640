"""alignjax.train.distributed: a 2-process `jax.distributed` run on 127.0.0.1 (2 CPU devices per
process, 4 in all) of the real trainer (`trainer.train`, 5 DPO steps and an evaluation at steps
0 and 5) trains and evaluates like one device: the same per-step losses, the same evaluation
metrics and the same parameters in the final checkpoint, under a data x FSDP mesh. Each
process loads only its half of every global batch (its `DataLoader` slice),
`sharding.shard_batch` concatenates the halves, `StepSpec(row_blocks=2)` puts the
per-token results back into the `[chosen; rejected]` loss layout, and the evaluation gathers
its per-example results to every process (`distributed.fetch`). Plus `initialize`'s resolution
from arguments / environment and its errors.

The workers are `tests/distributed_worker.py` subprocesses (the parent's 8-device XLA_FLAGS
from conftest must not reach them, and `jax.distributed.initialize` must precede any other JAX
call); they run each layout of `LAYOUTS` one after the other (one `initialize`), into a run
directory shared by the two processes (orbax checkpoints are collective; only process 0
writes metrics.jsonl). The single-device reference, the same config with `mesh.devices=1`,
runs here while they run.

Tolerance: 1e-5 relative; losses and evaluation metrics elementwise, parameters per leaf
relative to the leaf's largest entry (an elementwise rtol means nothing for entries near 0).
The programs compute the same math; only the float32 reduction order differs (batch sums
split across devices and processes and all-reduced, FSDP's gathers and reduce-scatters).
Observed (data=4 / data=2 x fsdp=2, the first layout since dropped for time): losses within
1.3e-6 / 1.0e-6, evaluation metrics within 2.5e-7 / 1.5e-6, parameters within 2.1e-7 / 2.7e-7.

The optimizer is SGD with momentum, as in tests/test_train_parallel.py. Adam with optax's
default eps = 1e-8 makes its first update lr * g / (|g| + eps), essentially lr * sign(g): an
entry whose gradient cancels to the level of float32 rounding moves by +-lr depending on that
rounding, a property of Adam rather than of the layout. Measured with AdamW after 5 steps of
the bare step on a smaller model (parameters, max over leaves relative to the leaf's max):
2-process runs 2.6e-4 / 3.4e-4 (data4 / data2_fsdp2), a 1-process 4-device mesh 1.7e-4, and
even the same 1-device step compiled at another XLA optimisation level 5.6e-5, while the
losses agreed to 5e-7 in every case.
"""

from __future__ import annotations

import doctest
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as W
import jax
import numpy as np
import pytest

from alignjax.train import checkpoint, config, distributed, metrics, trainer

HERE = Path(__file__).resolve().parent
RTOL = 1e-5
TIMEOUT = 240  # seconds, both workers together (~65 s on 2 shared cores)
EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen")
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


def worker_env() -> dict:
    """The parent's environment without its device count or distributed settings."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "XLA_FLAGS"}
    flags = ["--xla_force_host_platform_device_count=2"]
    # conftest's -O0 (compile time dominates), unless the run asked for the default.
    flags += [f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" in f]
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p
        ),
    )
    return env


def start_workers(out: Path, logs: Path, worker=W) -> list[tuple[subprocess.Popen, Path]]:
    """`worker.PROCESSES` copies of the worker module's script (default: distributed_worker)."""
    address = f"127.0.0.1:{free_port()}"
    workers = []
    for pid in range(worker.PROCESSES):
        log = logs / f"worker{pid}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(Path(worker.__file__).resolve()), str(out), address, str(pid)],
                env=worker_env(),
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


def results(out: Path, like=None) -> dict:
    """A run directory's train losses, evaluations (step -> metrics), final state and
    parameters. `like`: a restored state to take the structure and placement from (a
    checkpoint of the 4-device 2-process mesh cannot be restored here by its own shardings)."""
    rows = metrics.read_jsonl(out / "metrics.jsonl")
    losses = np.asarray([r["train/loss"] for r in rows if "train/loss" in r])
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    with checkpoint.Checkpointer(out / "checkpoints", every=W.STEPS, keep=1) as ck:
        state, meta = ck.restore(target=like)
    assert meta["step"] == W.STEPS
    params = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    return {"loss": losses, "eval": evals, "state": state, "params": params}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    started = time.monotonic()
    workers = start_workers(tmp, tmp)
    try:
        ref_dir = tmp / "one_device"
        cfg = config.load_config(None, W.overrides(ref_dir, ["mesh.devices=1"]))
        summary = trainer.train(cfg, progress=False)
    finally:
        wait_workers(workers, started)
    reference = results(ref_dir) | {"summary": summary}
    return tmp, reference


@pytest.mark.parametrize("layout", list(W.LAYOUTS))
def test_two_processes_train_like_one_device(runs, layout):
    tmp, ref = runs
    out = tmp / layout
    got = results(out, like=ref["state"])

    assert len(ref["loss"]) == W.STEPS and np.ptp(ref["loss"]) > 1e-3  # the parameters move
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=RTOL)

    # The evaluation before the first step and after the last, over the same 8 pairs.
    assert sorted(got["eval"]) == sorted(ref["eval"]) == [0, W.STEPS]
    for step, want in ref["eval"].items():
        assert got["eval"][step]["eval/examples"] == want["eval/examples"] == 8
        for key in EVAL_KEYS:
            np.testing.assert_allclose(got["eval"][step][key], want[key], rtol=RTOL, err_msg=key)
    assert ref["eval"][W.STEPS]["eval/loss"] < ref["eval"][0]["eval/loss"] - 1e-3
    # Every process returns the gathered evaluation, not its own half.
    for pid in range(W.PROCESSES):
        summary = json.loads((out / f"summary{pid}.json").read_text())
        assert summary["eval"]["examples"] == 8
        np.testing.assert_allclose(summary["eval"]["loss"], ref["summary"]["eval"]["loss"], RTOL)

    assert set(got["params"]) == set(ref["params"]) and len(ref["params"]) > 10
    for name, want in ref["params"].items():
        err = np.max(np.abs(got["params"][name] - want)) / np.max(np.abs(want))
        assert err <= RTOL, (name, err)


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
        distributed.choose_cpu_collectives(None)
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        distributed.choose_cpu_collectives("mpi")
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", old)


def test_single_process_fetch_is_numpy():
    tree = {"a": jax.numpy.arange(4.0), "b": [jax.numpy.ones((2, 3), jax.numpy.int32)]}
    got = distributed.fetch(tree)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got))
    np.testing.assert_array_equal(got["a"], np.arange(4.0))
    assert got["b"][0].dtype == np.int32 and got["b"][0].shape == (2, 3)


def test_single_process_gather_rows_keeps_dtypes():
    rows = {"i": np.arange(3, dtype=np.int64) + 2**40, "x": np.full((3, 2), 0.1, np.float64)}
    got = distributed.gather_rows(rows)
    assert got["i"].dtype == np.int64 and got["x"].dtype == np.float64
    np.testing.assert_array_equal(got["i"], rows["i"])
    np.testing.assert_array_equal(got["x"], rows["x"])


def test_docstring_examples_run(clean_env):
    result = doctest.testmod(distributed)
    assert result.attempted > 0 and result.failed == 0


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks
