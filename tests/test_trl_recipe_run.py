"""The same TRL recipe file run by TRL 1.16's DPOTrainer and by `alignjax dpo`: same losses.

`tests/reference/fixtures/trl_recipe/recipe.yaml` is a plain TRL DPO recipe (a tiny random
float32 Llama saved by transformers with the shipped tokenizer, 8 preference pairs as one batch,
4 steps of SGD at a constant 0.5, beta 0.1, max_length 64, float32, CPU). `trl_run.json` holds
what `trl dpo --config recipe.yaml` logged at each step (written by
`tests/reference/generate_trl_recipe_run.py`, whose docstring says how TRL was run). Here the
file itself goes to `alignjax dpo --config`, and every step's `train/loss`, `train/grad_norm`,
`train/rewards/{chosen,rejected,margins,accuracies}` and `train/logps/{chosen,rejected}` must
equal TRL's `loss`, `grad_norm`, `rewards/*`, `logps/*` of that step. Both log, at step k, the
values of the forward on the k-th batch before the k-th update (transformers' Trainer with
logging_steps 1 and no accumulation logs that step's `training_step` loss, unrounded). The
learning rate and the number of completion tokens per step (alignjax's
`train/completion_tokens`, the sum of TRL's collated `completion_mask`: tokenization, EOS and
truncation) must be equal exactly.

Tolerance, from float32 arithmetic (u = 2^-24, the unit roundoff), not from an observed run.
The two programs compute the same function with different kernels and reduction orders, so
every difference is rounding:

- a sequence log-prob s is a sum of at most 64 per-token log-probs, all negative (|s| ~ 130
  here); reordering that sum and evaluating log-softmax with other kernels changes it by about
  sqrt(64) u |s| = 8u|s| (the random-walk size of the rounding of a 64-term sum). Each SGD step
  adds a parameter difference lr * (rounding of the gradient), whose effect on s is of the same
  order (the gradient is itself a float32 reduction, over the batch's <= 1024 tokens), so after
  k-1 updates |ds| <= eps_k |s| with eps_k = 8 k u (k = 1: identical starting weights, forward
  rounding only);
- `logps/x` is a mean of such s: tolerance eps_k |logps/x| (all log-probs are negative, so the
  mean of |s| is |mean s|);
- `rewards/x` = beta * mean(s - r), r the reference's log-prob (r = logps/x - rewards/x / beta
  from the logged means): a difference of two large sums, so its tolerance is absolute,
  beta eps_k (|logps/x| + |r_x|); `rewards/margins` adds the two;
- the sigmoid loss, mean softplus(-m), moves by mean sigma(-m_i) |dm_i| <= (1 - exp(-loss))
  max_i |dm_i| (Jensen: 1 - exp(-x) is concave), and the largest row's |dm_i| exceeds the
  margins tolerance (computed from means) by at most the ratio of the largest pair's completion
  tokens to the mean pair's (1.3 here; the model is near-uniform, every token's log-prob is about
  -log 512), plus the loss's own few-u rounding: 2.4e-5 to 1.2e-4 relative over the 4 steps
  (about 3e-5 per step; "a few 1e-6" would be below the resolution of the log-prob sums, whose
  float32 ulp is 1.5e-5, scaled by beta and sigma(-m)). At step 1 the policy IS the reference, so
  margins are 0 and the loss log 2 (TRL's is checked to be);
- `grad_norm`: a norm of float32 gradients whose reductions run over <= 1024 token terms:
  sqrt(1024) u = 32u relative per step, eps_grad_k = 32 k u;
- `rewards/accuracies` (the fraction of pairs with chosen reward > rejected, strictly) is
  compared exactly: it could only differ if a pair's margin were within its rounding (~1e-6) of
  zero. At step 1 the policy is the reference and TRL's margins are exactly 0 (accuracy 0), so
  this also checks that alignjax's reference forward reproduces its policy forward there; at
  steps 2-4 all 8 of TRL's margins are positive (accuracy 1).

Observed differences are far smaller (at most 2.4e-7 in the loss, one or two float32 ulps in the
log-probs), while a mapping difference is far larger: the learning rate or beta 1% off moves the
losses of steps 2-4 by 1.4e-3 to 4.5e-3, 50 to 200 times the loss tolerance; a token, EOS or
truncation difference changes a log-prob by ~6 (one token) and `train/completion_tokens`.
"""

import hashlib
import json
import math
from pathlib import Path

import pytest

from alignjax import cli
from alignjax.train import metrics

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "reference" / "fixtures" / "trl_recipe"
RECIPE = "tests/reference/fixtures/trl_recipe/recipe.yaml"  # relative to the repo root
U = 2.0**-24  # float32 unit roundoff
BETA = 0.1  # the recipe's beta


def _tolerances(step: int, trl: dict, pairs_ratio: float) -> dict[str, float]:
    """Absolute tolerances at `step` (1-based) for each metric, from TRL's logged values."""
    eps = 8 * step * U
    tol = {}
    for x in ("chosen", "rejected"):
        policy = abs(trl[f"logps/{x}"])
        reference = abs(trl[f"logps/{x}"] - trl[f"rewards/{x}"] / BETA)
        tol[f"logps/{x}"] = eps * policy
        tol[f"rewards/{x}"] = BETA * eps * (policy + reference)
    tol["rewards/margins"] = tol["rewards/chosen"] + tol["rewards/rejected"]
    loss = trl["loss"]
    tol["loss"] = (1 - math.exp(-loss)) * pairs_ratio * tol["rewards/margins"] + 4 * U * loss
    tol["grad_norm"] = 32 * step * U * trl["grad_norm"]
    tol["rewards/accuracies"] = 0.0
    tol["learning_rate"] = 0.0
    return tol


@pytest.mark.slow
def test_trl_recipe_gives_trls_losses(tmp_path, monkeypatch):
    ref = json.loads((FIXTURE / "trl_run.json").read_text())
    meta = ref["meta"]
    for name, digest in meta["sha256"].items():  # the inputs TRL ran on are the ones here
        assert hashlib.sha256((FIXTURE / name).read_bytes()).hexdigest() == digest, (
            f"{name} changed since trl_run.json was written: rerun "
            "tests/reference/generate_trl_recipe_run.py"
        )
    chosen, rejected = meta["completion_tokens"]["chosen"], meta["completion_tokens"]["rejected"]
    per_pair = [c + r for c, r in zip(chosen, rejected)]
    pairs_ratio = max(per_pair) / (sum(per_pair) / len(per_pair))

    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root
    argv = ["dpo", "--config", RECIPE, "--no-progress", "mesh.devices=1", "eval_samples=0",
            "plot=false", f"out_dir={tmp_path}"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]

    assert [r["step"] for r in rows] == [s["step"] for s in ref["steps"]] == [1, 2, 3, 4]
    assert ref["steps"][0]["loss"] == pytest.approx(math.log(2), abs=4 * U)
    failures = []
    for trl, ours in zip(ref["steps"], rows):
        step = trl["step"]
        assert ours["train/completion_tokens"] == sum(chosen) + sum(rejected), step
        for name, tol in _tolerances(step, trl, pairs_ratio).items():
            diff = abs(ours[f"train/{name}"] - trl[name])
            if not diff <= tol:
                failures.append(f"step {step} {name}: alignjax {ours[f'train/{name}']!r}, TRL "
                                f"{trl[name]!r}, |diff| {diff:.3g} > {tol:.3g}")  # fmt: skip
    assert not failures, "\n".join(failures)
