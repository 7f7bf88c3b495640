"""Whole training runs (`trainer.train`) on 1 device against 8 devices under the DP, FSDP and
DP x TP meshes and under pmap: the same per-step losses and the same parameters after 5 steps.

Tolerance: 1e-5 relative (losses: elementwise; parameters: per leaf, relative to the leaf's
largest entry). The programs compute the same math; only the float32 reduction order differs
(batch sums split across devices and all-reduced, matmuls over a sharded dimension adding
partial products in another order), which tests/test_train_sharding.py measures at ~2e-6 for
one gradient. The optimizer is SGD with momentum: Adam's first update is sign(g) * lr, which
turns float32 rounding noise in near-zero gradient entries into full-size steps, a property of
Adam rather than of the parallel layout.
"""

import jax
import numpy as np
import pytest

from alignjax.train import checkpoint, metrics, trainer
from alignjax.train import config as C

RTOL = 1e-5
LAYOUTS = {
    "one_device": ["mesh.devices=1"],
    "data8": ["mesh.data=8"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
    "data4_tensor2": ["mesh.data=4", "mesh.tensor=2"],
    "pmap8": ["mesh.pmap=true"],
}


def run(tmp_path, name):
    out = tmp_path / name
    cfg = C.load_config(None, [
        "task=paired", "steps=5", f"out_dir={out}", "log_every=1", "data.eval=null",
        "eval_samples=0", "plot=false", "checkpoint.export_hf=false", "checkpoint.every=5",
        "checkpoint.asynchronous=false", "data.batch_size=8", "data.max_length=64",
        "data.buckets=[64]", "optim.name=sgd", "optim.learning_rate=0.2", "optim.b1=0.9",
        "optim.warmup_steps=0", "optim.schedule=constant", *LAYOUTS[name],
    ])  # fmt: skip
    trainer.train(cfg, progress=False)
    losses = [r["train/loss"] for r in metrics.read_jsonl(out / "metrics.jsonl")]
    with checkpoint.Checkpointer(out / "checkpoints", every=5, keep=1) as ck:
        state, meta = ck.restore()
    assert meta["step"] == 5
    return np.asarray(losses), state["params"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "one_device")


@pytest.mark.parametrize("layout", ["data8", "fsdp8", "data4_tensor2", "pmap8"])
def test_same_losses_and_parameters_as_one_device(single, tmp_path, layout):
    assert jax.device_count() == 8
    losses, params = run(tmp_path, layout)
    ref_losses, ref_params = single
    assert len(losses) == 5 and np.ptp(losses) > 1e-3  # the parameters move
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    flat = jax.tree_util.tree_leaves_with_path(params)
    ref = jax.tree.leaves(ref_params)
    assert len(flat) == len(ref) > 10
    for (path, p), r in zip(flat, ref, strict=True):
        err = np.max(np.abs(np.asarray(p) - r)) / np.max(np.abs(r))
        assert err <= RTOL, (jax.tree_util.keystr(path), err)


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks
