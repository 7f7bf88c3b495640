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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from peft_cases import FIXTURES, Net, load, write_adapter  # noqa: E402

from alignjax import peft  # noqa: E402

CASES = ["lora", "lora_bias", "dora", "miss", "miss_bat", "miss_mini", "adalora"]
OUT = FIXTURES / "alignjax_exports"


def export_case(case: str, directory: Path) -> Path:
    """Import the PEFT case into alignjax, then export it to `directory / case`."""
    data, meta = load("peft.npz")
    config = meta["cases"][case]["config"]
    model = Net(data, meta, "block")
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
