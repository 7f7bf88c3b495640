"""benchmarks/rollout.py runs end to end (--quick, without --ref-python: the alignjax rows only;
the transformers rows need the `[ref]` environment, which the test suite never needs). Timings are
not asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rollout_quick_run_reports_the_alignjax_rows(tmp_path):
    out = tmp_path / "rollout"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["sides"] == ["alignjax"] and "alignjax rows only" in res["note"]
    rows = {(r["batch"], r["new_tokens"], r["mode"]) for r in res["results"]}
    assert rows == {(b, 16, m) for b in (1, 4) for m in ("sample", "greedy")}
    for r in res["results"]:
        assert set(r["sides"]) == {"alignjax"} and "ratio" not in r
        side = r["sides"]["alignjax"]
        assert side["tokens_per_s"] > 0 and side["compile_s"] > 0 and r["load_1min"]
    o = res["online"]
    assert o["method"] == "grpo" and len(o["steps"]) == 1
    assert o["rollout_s"]["median"] > 0 and o["train_s"]["median"] > 0
    assert 0 < o["rollout_share"]["median"] < 1
    assert o["sample_s"]["median"] <= o["rollout_s"]["median"]
    assert "alignjax rows only" in out.with_suffix(".md").read_text()
