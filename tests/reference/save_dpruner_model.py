"""A D-Pruner-pruned checkpoint written by alignjax, loaded by transformers (spec online.md 5.5).

The tiny Llama fixture (fixtures/hf_models/llama) goes through the whole pipeline of
`alignjax.optim.dpruner_model`, deterministically and in float64 (so that no mask entry sits
within rounding of its threshold): general importance G from a fixed calibration batch
(`general_importance`, SparseGPT-based, sequential, sparsity 0.52), three steps of domain
training on a fixed batch with `optax.chain(generality_regularised(G, lr), clip_by_global_norm(1),
sgd(lr))` (lr 0.03 as `args_lomo.yaml`), the dual importance I, per-matrix 52% masks
(`dpruner_masks`), then the ORIGINAL float32 weights pruned and written by `export_pruned`
into fixtures/hf_models_alignjax/llama_dpruner/ (with `dpruner_report.json`: the sparsity).

Step 1 (JAX venv), step 2 (reference venv with torch==2.13.0, transformers==5.23.0):

    python tests/reference/save_dpruner_model.py
    /tmp/ref/bin/python tests/reference/generate_hf_models.py --check-load \\
        tests/reference/fixtures/hf_models_alignjax/llama_dpruner \\
        --out tests/reference/fixtures/hf_models_alignjax/llama_dpruner.transformers.npz

tests/reference/test_dpruner_export.py re-creates the checkpoint, checks the committed files are
what the current code writes and the zeros are where the masks say, and compares transformers'
logits with alignjax's.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from alignjax import models  # noqa: E402
from alignjax.optim import dpruner  # noqa: E402
from alignjax.optim import dpruner_model as dm  # noqa: E402

SRC = HERE / "fixtures" / "hf_models" / "llama"
OUT = HERE / "fixtures" / "hf_models_alignjax" / "llama_dpruner"
SEED, LR, STEPS, SPARSITY = 0, 0.03, 3, dpruner.DPRUNER_SPARSITY


def fixed_batch(seed: int, rows: int = 4, length: int = 16, vocab: int = 96):
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, length), np.int32)
    mask[1, :3] = 0  # one left-padded row
    ids = np.where(mask == 1, rng.integers(3, vocab, (rows, length)), 0).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def _nll(params, graphdef, rest, ids, mask):
    model = nnx.merge(graphdef, params, rest)
    logits = model.logits(model(ids, mask).last_hidden_state)[:, :-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    return -jnp.sum(logp * mask[:, 1:]) / jnp.sum(mask[:, 1:])


def dpruner_masks() -> dict[str, np.ndarray]:
    """The D-Pruner masks of the fixture model (False = pruned), computed in float64."""
    with jax.enable_x64(True):
        model = models.load_pretrained(SRC, param_dtype=jnp.float64)
        G = dm.general_importance(model, [fixed_batch(SEED)], sparsity=SPARSITY)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.chain(
            dm.generality_regularised(G, LR), optax.clip_by_global_norm(1.0), optax.sgd(LR)
        )
        ids, mask = fixed_batch(SEED + 1)

        @jax.jit
        def step(params, opt_state):
            grads = jax.grad(_nll)(params, graphdef, rest, ids, mask)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        opt_state = tx.init(params)
        for _ in range(STEPS):
            params, opt_state = step(params, opt_state)
        masks = dm.dpruner_masks(dm.dual_importance(opt_state), SPARSITY, model=model)
        return {k: np.asarray(v) for k, v in masks.items()}


def save_pruned(directory: Path) -> tuple[Path, dict]:
    """Write the pruned checkpoint into `directory` (replaced); returns it and the report."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    report = dm.export_pruned(models.load_pretrained(SRC), dpruner_masks(), directory)
    (directory / "dpruner_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return directory, report


def main():
    directory, report = save_pruned(OUT)
    print("wrote", directory, "projections sparsity", report["projections"])


if __name__ == "__main__":
    main()
