"""The package, its install metadata, the README commands and the main job stay consistent."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import alignjax

ROOT = Path(__file__).resolve().parents[1]


def _setup_lists():
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("INSTALL_REQUIRES", "EXTRAS"):
                values[name] = ast.literal_eval(node.value)
    return values["INSTALL_REQUIRES"], values["EXTRAS"]


def _constraints():
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def _readme_block(marker):
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```\n<!-- /{marker} -->", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1).strip()


def test_version():
    assert Version(alignjax.__version__) >= Version("0.1.0")


def test_constraints_satisfy_declared_ranges():
    install, extras = _setup_lists()
    pins = _constraints()
    for spec in install + extras["dev"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in .ci/constraints.txt"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} violates {req.specifier}"


def test_torch_is_only_an_exact_ref_pin():
    install, extras = _setup_lists()
    for spec in install + extras["dev"]:
        assert Requirement(spec).name != "torch", "torch must never be a runtime/test dependency"
    torch = [Requirement(s) for s in extras["ref"] if Requirement(s).name == "torch"]
    assert len(torch) == 1 and str(torch[0].specifier) == "==2.13.0"
    assert "torch" not in _constraints()


def test_readme_commands_and_ci():
    main, tests = _readme_block("main-command"), _readme_block("test-command")
    assert main.endswith(".venv/bin/python -m experiments.sentiment_control.study")
    assert (ROOT / "experiments" / "sentiment_control" / "study.py").exists()
    assert "alignjax = alignjax.cli:entry" in (ROOT / "setup.py").read_text()  # alignjax demo
    assert '".[dev]"' in tests and "pytest" in tests
    for cmd in (main, tests):
        assert cmd.startswith("python3 -m venv .venv && ")
        assert "-c .ci/constraints.txt" in cmd
    # .ci/run extracts exactly this line.
    extracted = subprocess.run(
        [
            "bash",
            "-c",
            "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
            "| grep -v -e '^<!--' -e '^```'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == tests
    assert "eval" in (ROOT / ".ci" / "run").read_text()


def run_script(relative: str, *args: str) -> subprocess.CompletedProcess:
    """Run a repository script with this interpreter; fail with its stderr if it fails."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / relative), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


# The dense token_* kernels are covered by their own tests; one subprocess per variant is what
# makes this test slow, so the smoke run times the naive and fused ones.
SMOKE_VARIANTS = "naive_logps,fused_logps,naive_kl,fused_kl"


@pytest.mark.slow  # runs a script in a subprocess
@pytest.mark.parametrize("variants", [SMOKE_VARIANTS])
def test_benchmark_runs_and_reports_ratios(tmp_path, variants):
    """The main job's script works end to end on a tiny size (numbers are not asserted)."""
    out = tmp_path / "bench"
    proc = run_script(
        "benchmarks/logprobs.py",
        *("--bt", "64", "--d", "16", "--v", "512", "--reps", "1"),
        *("--variants", variants, "--out", str(out)),
    )
    assert "time / naive" in proc.stdout and "temp / naive" in proc.stdout

    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert {r["variant"] for r in results} == set(variants.split(","))
    for r in results:
        # Same inputs, same objective: the loss values agree across implementations.
        assert r["value_rel_err"] <= 1e-5, r


@pytest.mark.parametrize(
    "module",
    [
        "alignjax.ops.logprobs",
        "alignjax.losses.compose",
        "alignjax.optim.adamp",
        "alignjax.optim.sgdp",
        "alignjax.optim.projection",
        "alignjax.optim.labels",
        "alignjax.optim.constraints",
        "alignjax.optim.importance",
        "alignjax.optim.dpruner",
        "alignjax.optim.dpruner_model",
        "alignjax.optim.multi_objective",
        "alignjax.peft.lora",
        "alignjax.peft.bone",
        "alignjax.peft.adalora",
        "alignjax.peft.inject",
        "alignjax.peft.adalora_allocator",
        "alignjax.models.llama",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, module


@pytest.mark.slow  # runs a script in a subprocess
@pytest.mark.parametrize(
    "script,key,expected",
    [
        ("adamp_effective_step.py", "optimizer", {"adam", "adamp", "sgd", "sgdp"}),
        ("bone_vs_lora.py", "method", {"full", "lora", "bat", "adalora"}),
    ],
)
def test_experiment_quick_run(tmp_path, script, key, expected):
    """The experiments run end to end on their quick settings and write their outputs."""
    run_script(f"experiments/{script}", "--quick", "--out", str(tmp_path))
    assert (tmp_path / "curves.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r[key] for r in summary["rows"]} == expected


@pytest.mark.slow  # runs a script in a subprocess
def test_optim_benchmark_runs(tmp_path):
    """benchmarks/optim.py works end to end on a tiny tree (numbers are not asserted)."""
    out = tmp_path / "optim"
    proc = run_script(
        "benchmarks/optim.py",
        *("--size", "tiny", "--reps", "1", "--variants", "adamw,adamp", "--out", str(out)),
    )
    assert "adamw" in proc.stdout and "x |" in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"adamp", "adamw"}


@pytest.mark.slow  # runs a script in a subprocess
def test_model_benchmark_runs(tmp_path):
    """benchmarks/model.py works end to end on a tiny config (numbers are not asserted)."""
    out = tmp_path / "model"
    proc = run_script("benchmarks/model.py", "--size", "tiny", "--reps", "1", "--out", str(out))
    assert "tokens/s" in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows[0]["variant"] == "alignjax (JAX)" and rows[0]["seconds"] > 0


@pytest.mark.slow  # runs a script in a subprocess
def test_packing_benchmark_runs(tmp_path):
    """benchmarks/packing.py works end to end on a few pairs; every variant sees every token,
    the shared-prompt one each prompt once (all but its last token, which both branches hold)."""
    from alignjax import data

    out = tmp_path / "packing"
    args = ("--pairs", "24", "--reps", "1", "--width", "32", "--out", str(out))
    proc = run_script("benchmarks/packing.py", *args)
    assert "speed-up" in proc.stdout
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["variant"] for r in results] == [
        "padded (one length)", "bucketed + sorted", "packed", "packed, shared prompt"
    ]  # fmt: skip
    assert len({r["real_tokens"] for r in results[:3]}) == 1  # same examples in every layout
    pairs = data.tokenize_dataset(data.shipped_dataset("train").select(range(24)),
                                  data.shipped_tokenizer())  # fmt: skip
    saved = sum(pairs[i]["chosen_prompt_length"] - 1 for i in range(24))
    assert results[3]["real_tokens"] == results[2]["real_tokens"] - saved > 0


def test_the_console_command_restarts_once_with_the_heap_tunables(monkeypatch):
    """`alignjax` (cli.entry) re-executes itself with GLIBC_TUNABLES = cli.GLIBC_HEAP on Linux,
    and does not when the variable is set already (the restarted process) or opted out."""
    import sys

    from alignjax import cli

    calls = []

    class Restarted(Exception):
        pass

    def execve(path, args, env):
        calls.append((path, args, env))
        raise Restarted

    monkeypatch.setattr(cli.os, "execve", execve)
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "argv", ["alignjax", "train", "steps=1"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("ALIGNJAX_GLIBC_TUNABLES", raising=False)
    with pytest.raises(Restarted):
        cli.entry()
    path, args, env = calls[0]
    assert path == sys.executable and args[1:] == ["-m", "alignjax.cli", "train", "steps=1"]
    assert env["GLIBC_TUNABLES"] == cli.GLIBC_HEAP
    monkeypatch.setenv("GLIBC_TUNABLES", cli.GLIBC_HEAP)  # the restarted process
    assert cli.entry() == 0 and len(calls) == 1
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("ALIGNJAX_GLIBC_TUNABLES", "0")
    assert cli.entry() == 0 and len(calls) == 1
