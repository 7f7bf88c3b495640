"""benchmarks/device_check.py: the CPU smoke run end to end (every benchmark, dtype and
implementation; cuDNN's cases record JAX's error, as they do wherever cuDNN is absent), and the
blockwise / cuDNN ratios on hand-made rows. Timings are not asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_every_case(tmp_path):
    out = tmp_path / "device_check.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "device_check.py"),
        "--smoke",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["platform"] == "cpu" and res["jax"] and res["device"]
    got = {(c["benchmark"], c["dtype"], c["implementation"]) for c in res["cases"]}
    assert got == {
        (b, d, i)
        for b in ("attention", "model", "dpo_step")
        for d in ("bfloat16", "float32")
        for i in ("cudnn", "blockwise")
    }
    for case in res["cases"]:
        if case["implementation"] == "blockwise":
            assert "error" not in case, case
            assert case["ms"] > 0 and case["temp_mib"] > 0
        else:
            assert "cuDNN" in case["error"] or "cudnn" in case["error"], case
    dpo = [c for c in res["cases"] if c["benchmark"] == "dpo_step" and "loss" in c]
    # log 2 at the first step (policy = reference); the timed steps train on the same pair
    assert dpo and all(0.0 < c["loss"] < math.log(2) for c in dpo)
    assert res["skipped"] == [] and res["ratios"] == []  # no cuDNN on CPU: nothing to divide


def test_ratios_divide_blockwise_by_cudnn():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from device_check import ratios

    def row(impl, ms, mib, dtype="bfloat16"):
        return dict(benchmark="model", tokens=512, dtype=dtype, implementation=impl, ms=ms,
                    temp_mib=mib)  # fmt: skip

    failed = dict(benchmark="model", tokens=512, dtype="float32", implementation="cudnn", error="x")
    rows = [row("cudnn", 2.0, 100.0), row("blockwise", 3.0, 50.0)]
    rows += [row("blockwise", 9.0, 1.0, "float32"), failed]
    (r,) = ratios(rows)
    assert (r["dtype"], r["time_blockwise_over_cudnn"], r["temp_blockwise_over_cudnn"]) == (
        "bfloat16",
        1.5,
        0.5,
    )
