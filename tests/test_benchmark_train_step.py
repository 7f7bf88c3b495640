"""benchmarks/train_step.py works end to end on a tiny model (timings are not asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["online", "precomputed", "LoRA, adapters off", "LoRA, precomputed"]


def test_train_step_benchmark_runs_and_reports_every_reference(tmp_path):
    out = tmp_path / "train_step"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vs online" in proc.stdout and "Target: precomputed step <= 0.8x online" in proc.stdout

    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"]
    assert [r["variant"] for r in rows] == VARIANTS
    assert [r["reference"] for r in rows] == ["frozen", "precomputed", "adapters_disabled",
                                              "precomputed"]  # fmt: skip
    for r in rows:
        for key in ("ms_per_step", "real_tokens_per_s", "completion_tokens_per_s",
                    "model_flops_per_s", "utilisation", "ratio_vs_online"):  # fmt: skip
            assert math.isfinite(r[key]) and r[key] > 0, (r["variant"], key, r[key])
        assert r["real_tokens_per_s"] > r["completion_tokens_per_s"]  # prompts count as real
    assert rows[0]["ratio_vs_online"] == 1.0
    # The same initial weights and data: a precomputed reference gives the online loss, and the
    # reference in the step costs model FLOPs (its forward) that the precomputed step does not.
    assert math.isclose(rows[0]["warmup_loss"], rows[1]["warmup_loss"], rel_tol=1e-4)
    assert math.isclose(rows[2]["warmup_loss"], rows[3]["warmup_loss"], rel_tol=1e-4)
    ref_fwd = res["precompute"]["ref_forward_flops"]
    assert rows[0]["model_flops"] - rows[1]["model_flops"] == ref_fwd
    assert rows[2]["model_flops"] - rows[3]["model_flops"] == ref_fwd
    assert rows[2]["trainable_params"] < rows[0]["trainable_params"]
    assert res["precompute"]["seconds"] > 0 and res["peak_flops_per_s"] > 0
    assert res["target"]["met"] == (rows[1]["ratio_vs_online"] <= 0.8)


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks
