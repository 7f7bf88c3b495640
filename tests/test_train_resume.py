"""A real `alignjax train` process killed with SIGKILL at random moments, several times, then
resumed by rerunning the same command: the final parameters, optimizer state, rng and data
position are bitwise those of an uninterrupted run, every logged step's loss too, and no
temporary or half-deleted checkpoint is left behind.

The run is DPO + LoRA with the adapters-disabled reference and adapter-only checkpoints (the
frozen base is rebuilt from the model source on resume), asynchronous saves every step, so
kills land during steps, during background checkpoint writes and during retirement of old
checkpoints. The kill times are drawn from a seeded generator (reported on failure).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from alignjax.train import checkpoint, metrics, trainer
from alignjax.train import config as C

STEPS = 10
OVERRIDES = {
    "task": "paired", "steps": STEPS, "log_every": 1, "eval_samples": 0, "plot": False,
    "data": {"eval": None, "batch_size": 4, "max_length": 64, "buckets": [64]},
    "peft": {"method": "lora", "r": 4},
    "reference": {"mode": "adapters_disabled"},
    "optim": {"learning_rate": 0.01, "warmup_steps": 2},
    "checkpoint": {"every": 1, "keep": 2, "adapters_only": True, "export_hf": False},
    "mesh": {"devices": 1},
}  # fmt: skip


def write_config(path, out_dir):
    cfg = {**OVERRIDES, "out_dir": str(out_dir)}
    path.write_text(yaml.safe_dump(cfg))
    return path


def saved_steps(directory):
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def final_state(out_dir):
    with checkpoint.Checkpointer(out_dir / "checkpoints", every=1, keep=2) as ck:
        state, meta = ck.restore()
    assert meta["step"] == STEPS
    return state


def test_sigkill_and_resume_is_bitwise(tmp_path):
    killed = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", killed)
    cmd = [sys.executable, "-m", "alignjax.cli", "train", "--config", str(config), "--no-progress"]
    # Restarted processes reuse the first one's compiled programs through JAX's persistent
    # cache (conftest.py): the same executables, so the bitwise comparison is unaffected.
    env = dict(os.environ)
    rng = np.random.default_rng(7)
    log, kills = [], 0
    for attempt in range(6):
        if kills == 3:
            break
        before = saved_steps(killed / "checkpoints")
        target = (before[-1] if before else 0) + int(rng.integers(1, 4))
        delay = float(rng.uniform(0.0, 0.15))
        with open(tmp_path / f"log{attempt}.txt", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                steps = saved_steps(killed / "checkpoints")
                if steps and steps[-1] >= target:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    log.append((target, round(delay, 3), saved_steps(killed / "checkpoints")))
                    break
                time.sleep(0.02)
            else:
                if proc.poll() is None:
                    proc.kill()
                    raise AssertionError(f"attempt {attempt} timed out")
        if proc.returncode == 0:  # finished before the kill point
            break
    print("kills (target step, delay s, steps on disk after the kill):", log)
    assert kills >= 2, log
    # Finish the run: the same command resumes from the latest checkpoint.
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    straight_dir = tmp_path / "straight"
    trainer.train(C.load_config(write_config(tmp_path / "straight.yaml", straight_dir)),
                  progress=False)  # fmt: skip

    # No temporary or half-deleted checkpoint is left; the kept ones all restore.
    ckdir = killed / "checkpoints"
    leftovers = [p.name for p in ckdir.iterdir() if not p.name.isdigit()]
    assert leftovers == [] or leftovers == ["_deleted"] and not any((ckdir / "_deleted").iterdir())
    with checkpoint.Checkpointer(ckdir, every=1, keep=2) as ck:
        kept = ck.all_steps()
        assert kept[-1] == STEPS and len(kept) <= 2
        for step in kept:
            ck.restore(step)

    a, b = final_state(killed), final_state(straight_dir)
    assert a["rest"] is None  # adapter-only: the frozen base is not in the checkpoint
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(log))
    # Every step was logged once, with the uninterrupted run's loss bit for bit.
    rows = [r for r in metrics.read_jsonl(killed / "metrics.jsonl") if "train/loss" in r]
    ref = [r for r in metrics.read_jsonl(straight_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), log
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref]
    assert [r["train/grad_norm"] for r in rows] == [r["train/grad_norm"] for r in ref]


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks
