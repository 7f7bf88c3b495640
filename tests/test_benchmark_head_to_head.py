"""benchmarks/trl_head_to_head.py runs end to end (--quick, the alignjax rows only: the TRL and
PyTorch rows need the `[ref]` environment, which the test suite never needs). Timings are not
asserted; the shared-prompt row's loss is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_head_to_head_quick_run_reports_the_alignjax_rows(tmp_path):
    out = tmp_path / "h2h"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_head_to_head.py"), "--quick",
           "--skip", "TRL DPOTrainer", "PyTorch loop", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["length"] for r in res["results"]] == [32, 64]
    for r in res["results"]:
        fw = r["frameworks"]
        assert set(fw) == {"alignjax", "alignjax shared prompt", "alignjax blockwise"}
        assert all(f["s_per_step"] > 0 for f in fw.values())
        # the shared-prompt row trains on the same pairs: the same loss after its two untimed
        # steps, to float32 rounding (beta 0.1 times the error of sums of ~32 log-probs of ~6)
        assert abs(fw["alignjax shared prompt"]["loss"] - fw["alignjax"]["loss"]) < 1e-5
        assert (
            fw["alignjax shared prompt"]["completion_tokens"] == fw["alignjax"]["completion_tokens"]
        )
    assert out.with_suffix(".md").is_file()
