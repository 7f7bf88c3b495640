"""alignjax.train.checkpoint: bitwise round trips (float32, bfloat16, int32 scalars, PRNG keys, an
nnx.State with its adam state), metadata, the save schedule, keep-N and best-by-metric retention
(the latest always kept), asynchronous saves, sharded restores, and saves killed with SIGKILL."""

import inspect
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignjax import models
from alignjax.train import checkpoint


def leaves_bytes(tree):
    """(dtype, shape, raw bytes) of every leaf; typed PRNG keys as their key data."""

    def one(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        x = np.asarray(x)
        return str(x.dtype), x.shape, x.tobytes()

    return [one(x) for x in jax.tree.leaves(tree)]


def assert_bitwise(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert leaves_bytes(got) == leaves_bytes(want)


def mixed_state():
    rng = np.random.default_rng(0)
    return {
        "f32": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
        "bf16": jnp.asarray(rng.standard_normal(7), jnp.bfloat16),
        "step": jnp.int32(123),
        "key_data": jax.random.key_data(jax.random.key(42)),
        "typed_key": jax.random.split(jax.random.key(7), 3),
        "host": rng.standard_normal(4),  # NumPy float64 stays NumPy
    }


@pytest.mark.parametrize("asynchronous", [False, True])
def test_roundtrip_is_bitwise_for_every_target_kind(tmp_path, asynchronous):
    state = mixed_state()
    with checkpoint.Checkpointer(tmp_path, every=1, keep=2, asynchronous=asynchronous) as ckpt:
        assert ckpt.save(5, state, metadata={"step": 5})
        zeros = {**jax.tree.map(jnp.zeros_like, state), "host": np.zeros(4)}
        concrete, meta = ckpt.restore(target=zeros)
        abstract = {**jax.eval_shape(lambda: state), "host": jax.ShapeDtypeStruct((4,), np.float64)}
        abstract, _ = ckpt.restore(5, target=abstract)
        untyped, _ = ckpt.restore()
    assert meta == {"step": 5}
    assert_bitwise(concrete, state)
    assert isinstance(concrete["host"], np.ndarray)
    assert concrete["key_data"].dtype == jnp.uint32 and concrete["step"].shape == ()
    assert jax.random.key_impl(concrete["typed_key"]) == jax.random.key_impl(state["typed_key"])
    abstract["host"] = np.asarray(abstract["host"])  # a ShapeDtypeStruct leaf gives a jax.Array
    assert_bitwise(abstract, state)
    assert_bitwise(untyped, state)  # without a target: the saved dict, dtypes and all


def test_nnx_state_with_adam_state_roundtrip(tmp_path):
    cfg = models.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    # The model's own (eager) initialisation compiles op by op and takes seconds: fill its
    # abstract state with random values instead.
    model = nnx.eval_shape(lambda: models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract_params
    )
    tx = optax.adam(1e-2)

    @jax.jit
    def one_step(params):
        opt_state = tx.init(params)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = one_step(params)
    state = {"params": params, "opt": opt_state, "rng": jax.random.key_data(jax.random.key(1))}
    with checkpoint.Checkpointer(tmp_path, every=10, keep=1) as ckpt:
        assert ckpt.save(10, state, metadata={"config": {"hidden_size": 16}})
    with checkpoint.Checkpointer(tmp_path, every=10, keep=1) as ckpt:
        restored, meta = ckpt.restore(target=jax.eval_shape(lambda: state))
    assert meta == {"config": {"hidden_size": 16}}
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
    assert int(restored["opt"][0].count) == 1
    assert_bitwise(restored, state)
    model = nnx.merge(graphdef, restored["params"])  # the restored state fits the model
    assert_bitwise(nnx.state(model), params)


def test_metadata_roundtrips_through_json(tmp_path):
    meta = {"data": {"epoch": np.int64(2), "offset": jnp.int32(17)}, "sizes": (64, 128), "x": None}
    with checkpoint.Checkpointer(tmp_path, every=1, keep=1, asynchronous=False) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, metadata=meta)
        meta["data"]["epoch"] = 99  # the saved copy is independent of the caller's dict
        _, got = ckpt.restore()
        assert got == {"data": {"epoch": 2, "offset": 17}, "sizes": [64, 128], "x": None}
        with pytest.raises(TypeError, match="metadata"):
            ckpt.save(2, {"w": jnp.ones(2)}, metadata={"bad": object()})
        assert ckpt.all_steps() == [1]


def test_save_schedule_force_and_no_overwrite(tmp_path):
    state = {"w": jnp.arange(3.0)}
    with checkpoint.Checkpointer(tmp_path, every=3, keep=10, asynchronous=False) as ckpt:
        # the first step is not special: orbax's InitialSavePolicy is left out
        assert [ckpt.save(s, state) for s in range(1, 8)] == [
            False, False, True, False, False, True, False,
        ]  # fmt: skip
        assert ckpt.save(7, state, force=True)
        assert not ckpt.save(7, state, force=True)  # never overwritten
        assert not ckpt.save(3, state)
        assert ckpt.all_steps() == [3, 6, 7] and ckpt.latest_step() == 7
        assert ckpt.best_step() is None
    assert sorted(os.listdir(tmp_path)) == ["3", "6", "7"]


def test_keep_latest_n(tmp_path):
    with checkpoint.Checkpointer(tmp_path, every=2, keep=2) as ckpt:
        for step in range(0, 11):
            ckpt.save(step, {"w": jnp.full(3, step)})
        ckpt.wait()
        assert ckpt.all_steps() == [8, 10]
    assert sorted(os.listdir(tmp_path)) == ["10", "8"]
    with checkpoint.Checkpointer(tmp_path, every=2, keep=2) as ckpt:
        state, _ = ckpt.restore(8)
        np.testing.assert_array_equal(state["w"], np.full(3, 8))


def expected_kept(history, keep, mode):
    """Latest + the `keep` best of every checkpoint saved so far (None/NaN rank last)."""
    sign = 1 if mode == "min" else -1

    def rank(item):
        value = item[1]
        return (1, 0) if value is None or not np.isfinite(value) else (0, sign * value)

    best = sorted(history, key=rank)[:keep]
    return sorted({step for step, _ in best} | {history[-1][0]})


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_metric_keeps_best_k_plus_latest(tmp_path, mode):
    values = [5.0, 1.0, 4.0, 2.0, 6.0, 3.0, None, 0.5, float("nan"), 0.7, 7.0]
    history = []
    with checkpoint.Checkpointer(
        tmp_path, every=1, keep=2, best_metric="eval/loss", best_mode=mode, asynchronous=False
    ) as ckpt:
        for step, value in enumerate(values, start=1):
            metrics = None if value is None else {"eval/loss": value, "eval/acc": jnp.float32(1)}
            assert ckpt.save(step, {"w": jnp.full(2, step)}, metrics=metrics)
            history.append((step, value))
            assert ckpt.all_steps() == expected_kept(history, 2, mode), step
            assert ckpt.latest_step() == step
        with pytest.raises(ValueError, match="eval/loss"):
            ckpt.save(12, {"w": jnp.zeros(2)}, metrics={"eval/acc": 1.0})
    best = min if mode == "min" else max
    best_step = 1 + values.index(best(v for v in values if v is not None and np.isfinite(v)))
    assert sorted(int(name) for name in os.listdir(tmp_path)) == expected_kept(history, 2, mode)
    # a new process reads the metrics back from disk and goes on ranking with them
    with checkpoint.Checkpointer(
        tmp_path, every=1, keep=2, best_metric="eval/loss", best_mode=mode
    ) as ckpt:
        assert ckpt.best_step() == best_step
        ckpt.save(12, {"w": jnp.zeros(2)}, metrics={"eval/loss": 100.0 if mode == "min" else -1})
        ckpt.wait()
        history.append((12, 100.0 if mode == "min" else -1.0))
        assert ckpt.all_steps() == expected_kept(history, 2, mode)
        assert ckpt.best_step() == best_step


def test_async_save_survives_donated_buffers(tmp_path):
    x = jnp.arange(1_000_000, dtype=jnp.float32)
    host = np.arange(10.0)
    want = {"x": np.asarray(x).copy(), "host": host.copy()}
    with checkpoint.Checkpointer(tmp_path, every=1, keep=1, asynchronous=True) as ckpt:
        assert ckpt.save(1, {"x": x, "host": host}, metadata={"n": 1})
        x.delete()  # what buffer donation does to the saved arrays
        host[:] = -1
        ckpt.wait()
        assert os.listdir(tmp_path) == ["1"]
        state, meta = ckpt.restore(1)
    assert meta == {"n": 1}
    assert_bitwise(state, want)


def test_restore_into_a_sharded_target(tmp_path):
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    replicated = {"w": jnp.arange(24.0).reshape(4, 6), "count": jnp.int32(3)}
    with checkpoint.Checkpointer(tmp_path, every=1, keep=1) as ckpt:
        ckpt.save(1, replicated)
        rows = NamedSharding(mesh, P("data", None))
        scalar = NamedSharding(mesh, P())
        abstract = {
            "w": jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=rows),
            "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
        }
        got, _ = ckpt.restore(target=abstract)
        assert got["w"].sharding == rows and got["count"].sharding == scalar
        assert_bitwise(got, replicated)
        # a concrete sharded target: its shardings (not its values) are used
        cols = NamedSharding(mesh, P(None, "data"))
        concrete = {"w": jax.device_put(jnp.zeros((4, 6)), cols), "count": jnp.int32(0)}
        got, _ = ckpt.restore(target=concrete)
        assert got["w"].sharding == cols
        assert {s.device for s in got["w"].addressable_shards} == set(jax.devices()[:2])
        assert_bitwise(got, replicated)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="every"):
        checkpoint.Checkpointer(tmp_path, every=0, keep=1)
    with pytest.raises(ValueError, match="keep"):
        checkpoint.Checkpointer(tmp_path, every=1, keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        checkpoint.Checkpointer(tmp_path, every=1, keep=1, best_mode="lowest")
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore()
    ckpt.save(1, {"w": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match=r"available: \[1\]"):
        ckpt.restore(2)
    with pytest.raises(ValueError, match="tree structures do not match"):
        ckpt.restore(target={"v": jnp.ones(2)})
    ckpt.close()
    ckpt.close()
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save(2, {"w": jnp.ones(2)})


# --- SIGKILL during saves -------------------------------------------------------------------

N_FLOATS = 5_000_000  # 20 MB per checkpoint


def state_at(step):
    """What the child saves at `step`: every value a function of the step."""
    w = np.arange(N_FLOATS, dtype=np.float32) + np.float32(step)
    return {
        "w": jnp.asarray(w),
        "key": jax.random.key_data(jax.random.key(step)),
        "step": jnp.int32(step),
    }


CHILD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from alignjax.train import checkpoint
N_FLOATS = {n}
{state_at}
ckpt = checkpoint.Checkpointer(sys.argv[1], every=1, keep=2, asynchronous=True)
step = (ckpt.latest_step() or 0) + 1
print("ready", step, flush=True)
while True:
    ckpt.save(step, state_at(step), metadata={{"step": step}})
    print("saved", step, flush=True)
    step += 1
"""


def read_line(proc, timeout=60.0):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child is silent"
    line = proc.stdout.readline()
    assert line, f"child died: exit code {proc.wait()}"
    return line.split()


def temporary_paths(directory):
    return [p for p in directory.rglob("*") if "tmp" in p.name or p.name == "_deleted"]


@pytest.mark.slow  # kills subprocesses mid-save
def test_sigkill_mid_save_leaves_a_restorable_latest_step(tmp_path):
    directory = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    source = textwrap.dedent(inspect.getsource(state_at))
    script.write_text(CHILD.format(n=N_FLOATS, state_at=source))
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(lambda: state_at(0))
    killed_mid_write = 0
    for life in range(3):
        with open(tmp_path / f"stderr{life}.txt", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), str(directory)],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
            try:
                first = int(read_line(proc)[1])
                n_saves = int(rng.integers(2, 4))
                for _ in range(n_saves):
                    last_returned = int(read_line(proc)[1])
                time.sleep(rng.uniform(0.0, 0.2))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        killed_mid_write += bool(temporary_paths(directory))
        with checkpoint.Checkpointer(directory, every=1, keep=2) as ckpt:
            assert temporary_paths(directory) == []
            latest = ckpt.latest_step()
            # save(s) returns once save(s - 1) is committed
            assert first <= last_returned - 1 <= latest, (life, latest)
            for step in ckpt.all_steps():
                state, meta = ckpt.restore(step, target=abstract)
                assert meta == {"step": step}
                assert_bitwise(state, state_at(step))
    # The kill points are random: this documents that the interesting case really was hit.
    assert killed_mid_write >= 1, "no kill landed inside a save"


def test_metadata_is_plain_json_on_disk(tmp_path):
    with checkpoint.Checkpointer(tmp_path, every=1, keep=1, asynchronous=False) as ckpt:
        ckpt.save(3, {"w": jnp.ones(1)}, metadata={"position": [1, 2]})
    assert json.loads((tmp_path / "3" / "metadata" / "metadata").read_text()) == {
        "position": [1, 2]
    }
