"""The reverse direction of the PEFT fixtures: adapters exported by alignjax, loaded by HF PEFT.

Step 1 (JAX venv): each PEFT case of fixtures/peft.npz is imported into alignjax and exported
again with `alignjax.peft.export_adapters` into fixtures/alignjax_exports/<case>/.
Step 2 (reference venv): PEFT loads each directory (`PeftModel.from_pretrained`) and records its
outputs in fixtures/alignjax_exports/<case>.peft.npz:

    python tests/reference/export_alignjax_adapters.py
    for d in tests/reference/fixtures/alignjax_exports/*/; do
      /tmp/refvenv/bin/python tests/reference/generate_peft.py --load-adapter "$d" \\
          --out "${d%/}.peft.npz"
    done

tests/reference/test_peft_reference.py re-exports the same cases, checks the files are what the
current exporter writes, and compares PEFT's recorded outputs with alignjax's.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from peft_cases import FIXTURES, Net, load, write_adapter  # noqa: E402

from alignjax import peft  # noqa: E402

CASES = ["lora", "lora_bias", "dora", "miss", "miss_bat", "miss_mini", "adalora", "bat_trained"]
OUT = FIXTURES / "alignjax_exports"


def train_here(model, data, steps: int = 5):
    """A few adapter-only SGD steps on the block's own inputs (float64), so that the exported
    adapter is one trained by alignjax, not only one passed through it."""
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=peft.AdapterParam)
    names = [n for n, _ in peft.adapters(model)]

    def loss_fn(m):
        outs = [getattr(m, n)(jnp.asarray(data[f"inputs/block/x/{n}"])) for n in names]
        return sum(jnp.mean((o - 0.5) ** 2) for o in outs)

    for _ in range(steps):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, peft.AdapterParam))(model)
        optimizer.update(model, grads)


def export_case(case: str, directory: Path) -> Path:
    """Import the PEFT case into alignjax (for `bat_trained`: fresh Bat adapters trained here),
    then export it to `directory / case`."""
    data, meta = load("peft.npz")
    model = Net(data, meta, "block")
    if case == "bat_trained":
        config = {"peft_type": "MISS"}
        peft.apply(model, [peft.Rule("q_proj|v_proj|up|down", "bat", rank=4)], rngs=nnx.Rngs(0))
        train_here(model, data)
    else:
        config = meta["cases"][case]["config"]
        with tempfile.TemporaryDirectory() as tmp:
            peft.import_adapters(model, write_adapter(Path(tmp), data, meta["cases"][case], case))
    extra = {}
    if config["peft_type"] == "ADALORA":
        keys = (
            "target_r",
            "total_step",
            "tinit",
            "tfinal",
            "deltaT",
            "beta1",
            "beta2",
            "orth_reg_weight",
        )
        extra["adalora"] = {k: config[k] for k in keys}
    target = Path(directory) / case
    if target.exists():
        shutil.rmtree(target)
    return peft.export_adapters(model, target, **extra)


def main():
    with jax.enable_x64(True):
        for case in CASES:
            print("wrote", export_case(case, OUT))


if __name__ == "__main__":
    main()
