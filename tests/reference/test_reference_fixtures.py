"""The float64 NumPy DPO derivations reproduce TRL 1.16.0's own outputs (committed fixtures).

Losses and metrics: relative error <= 1e-10 for float64 cases, <= 1e-5 for the float32 ones
(TRL's alpha-divergence has no float64 path). Gradients w.r.t. the per-token policy log-probs:
central finite differences of the NumPy loss (h = 1e-6, truncation error ~1e-12) against TRL's
autograd, <= 1e-6 relative (1e-3 for float32 cases).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from numpy_dpo import dpo_case

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "trl_dpo.npz"
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["meta_json"]))
CASES = sorted(META["cases"])


def test_fixture_provenance():
    assert META["trl"] == "1.16.0" and META["torch"].startswith("2.13.0")
    expected = {
        "sigmoid",
        "hinge",
        "ipo",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
        "exo_pair",
        "robust",
    }
    covered = {lt for case in META["cases"].values() for lt in case["loss_types"]}
    assert covered == expected


def _run(name, policy=None, wpo_policy=None):
    case = META["cases"][name]
    return dpo_case(
        DATA["policy_logps"] if policy is None else policy,
        DATA["ref_logps"],
        DATA["log_sum_sq_probs"],
        DATA["completion_mask"],
        case["loss_types"],
        case["loss_weights"],
        case["config"],
        wpo_policy=wpo_policy,
    )


@pytest.mark.parametrize("name", CASES)
def test_losses_and_metrics_match_trl(name):
    tol = 1e-10 if META["cases"][name]["config"]["dtype"] == "float64" else 1e-5
    loss, metrics = _run(name)
    want = float(DATA[f"{name}/loss"])
    assert abs(loss - want) <= tol * max(1.0, abs(want)), (loss, want)
    for key, value in metrics.items():
        ref = float(DATA[f"{name}/{key}"])
        # TRL builds the accuracy with `.float()`: float32 whatever the default dtype.
        k_tol = max(tol, 1e-7) if key == "rewards/accuracies" else tol
        assert abs(value - ref) <= k_tol * max(1.0, abs(ref)), (key, value, ref)


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_trl_autograd(name):
    tol = 1e-6 if META["cases"][name]["config"]["dtype"] == "float64" else 1e-3
    policy = np.asarray(DATA["policy_logps"], np.float64)
    shift = DATA["completion_mask"][:, 1:] != 0
    want = DATA[f"{name}/grad_policy_logps"]
    assert np.all(want[~shift] == 0.0)  # masked positions get no gradient in TRL either
    got = np.zeros_like(policy)
    h = 1e-6
    for idx in zip(*np.nonzero(shift)):
        plus, minus = policy.copy(), policy.copy()
        plus[idx] += h
        minus[idx] -= h
        got[idx] = (_run(name, plus, policy)[0] - _run(name, minus, policy)[0]) / (2 * h)
    assert np.max(np.abs(got - want)) <= tol * max(1.0, np.max(np.abs(want)))
