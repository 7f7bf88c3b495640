"""experiments/unlearning.py (issue 16): the --quick study end to end in a subprocess (one
device, as a user runs it), its outputs' structure and sanity."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ("forget_nll", "forget_extraction", "retain_nll", "retain_extraction", "review_ppl",
           "mia_auc")  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("unlearning")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one host device
    cmd = [sys.executable, str(ROOT / "experiments" / "unlearning.py"), "--quick",
           "--out", str(out / "results"), "--work", str(out / "runs")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "results", json.loads((out / "results" / "summary.json").read_text())


def test_quick_study_writes_every_row_with_finite_numbers(quick):
    out, summary = quick
    for key in ("config", "before", "rows", "per_seed", "dpruner", "verdict", "curves", "seconds"):
        assert key in summary, key
    cfg = summary["config"]
    variants = ["dense", *(f"wagle {r:g}" for r in cfg["wagle_ratios"])]
    variants += [f"{s} {cfg['baseline_ratio']:g}" for s in cfg["baselines"]]
    got = {(r["loss"], r["variant"]) for r in summary["rows"]}
    want = {(loss, v) for loss in cfg["losses"] for v in variants}
    assert got == want | {(loss, "dense") for loss in cfg["extra_dense"]}
    assert len(summary["per_seed"]) == len(got) * len(cfg["seeds"])
    for row in [summary["before"], *summary["per_seed"]]:
        for key in METRICS:
            assert math.isfinite(row[key]), (row.get("loss"), key)
        for key in ("forget_extraction", "retain_extraction", "mia_auc"):
            assert 0.0 <= row[key] <= 1.0
        assert row["forget_nll"] >= 0 and row["retain_nll"] >= 0 and row["review_ppl"] >= 1
    for curve in summary["curves"].values():  # from each run's metrics.jsonl
        assert len(curve) >= 2 and all(math.isfinite(x) for point in curve for x in point)
    assert {r["method"] for r in summary["dpruner"]} == {"unpruned", "d-pruner", "magnitude"}
    for r in summary["dpruner"]:
        assert math.isfinite(r["general_ppl"]) and math.isfinite(r["domain_ppl"])
        want = 0.0 if r["method"] == "unpruned" else cfg["dpruner_sparsity"]
        assert abs(r["projection_sparsity"] - want) < 0.02
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG
    table = (out / "table.md").read_text()
    assert "| grad_ascent | dense |" in table and "d-pruner" in table


def test_quick_study_forgets_with_gradient_ascent(quick):
    _, summary = quick
    before = summary["before"]
    assert before["forget_extraction"] > 0.3  # the SFT model has memorised some facts
    ga = next(r for r in summary["rows"] if (r["loss"], r["variant"]) == ("grad_ascent", "dense"))
    assert ga["forget_extraction"] < before["forget_extraction"]
    assert ga["forget_nll"] > before["forget_nll"]
