"""Checkpoints written by alignjax, loaded by transformers (the reverse of generate_hf_models.py).

Step 1 (JAX venv): each fixture checkpoint is loaded with `alignjax.models.load_pretrained` and
written back with `save_pretrained` into fixtures/hf_models_alignjax/<family>/.
Step 2 (reference venv): transformers loads each directory and records its logits:

    python tests/reference/save_alignjax_models.py
    for d in tests/reference/fixtures/hf_models_alignjax/*/; do
      /tmp/refvenv/bin/python tests/reference/generate_hf_models.py --check-load "$d" \\
          --out "${d%/}.transformers.npz"
    done

tests/reference/test_hf_models.py re-saves the same checkpoints, checks the committed files are
what the current writer produces, and compares transformers' logits with alignjax's.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from alignjax import models  # noqa: E402

SRC = HERE / "fixtures" / "hf_models"
OUT = HERE / "fixtures" / "hf_models_alignjax"


def save_family(family: str, directory: Path) -> Path:
    target = Path(directory) / family
    if target.exists():
        shutil.rmtree(target)
    return models.save_pretrained(models.load_pretrained(SRC / family), target)


def main():
    for family in sorted(p.name for p in SRC.iterdir() if (p / "config.json").is_file()):
        print("wrote", save_family(family, OUT))


if __name__ == "__main__":
    main()
