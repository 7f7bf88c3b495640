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


# ------------------------------------------------- CPO / SimPO / AlphaPO, ORPO, KTO (trl_other)

OTHER = np.load(FIXTURE.with_name("trl_other.npz"))
OTHER_META = json.loads(str(OTHER["meta_json"]))
SEQ_CASES = sorted(OTHER_META["cases"]["sequence"])
KTO_CASES = sorted(OTHER_META["cases"]["kto"])


def _seq(name, chosen=None, rejected=None):
    from numpy_other import cpo_losses, orpo_losses

    cfg = OTHER_META["cases"]["sequence"][name]
    c = OTHER["seq/chosen_logps"] if chosen is None else chosen
    r = OTHER["seq/rejected_logps"] if rejected is None else rejected
    if name.startswith("orpo"):
        return orpo_losses(c, r, beta=cfg["beta"])
    return cpo_losses(c, r, **cfg)


@pytest.mark.parametrize("name", SEQ_CASES)
def test_cpo_orpo_match_trl(name):
    # ORPO's loss casts its inputs to float32 (`.float()`) inside TRL; CPO stays float64.
    tol = 1e-6 if name.startswith("orpo") else 1e-12
    out = _seq(name)
    for got, key in zip(out[:3], ("losses", "chosen_rewards", "rejected_rewards")):
        want = OTHER[f"{name}/{key}"]
        assert np.max(np.abs(got - want)) <= tol * max(1.0, np.max(np.abs(want))), key
    if name.startswith("orpo"):
        assert abs(out[3] - float(OTHER[f"{name}/log_odds_ratio"])) <= tol
        assert abs(out[4] - float(OTHER[f"{name}/log_odds_chosen"])) <= tol * 10
    # d sum(losses) / d logps by central differences (each loss depends on its own pair only).
    h = 1e-6
    c, r = OTHER["seq/chosen_logps"], OTHER["seq/rejected_logps"]
    fd_c = (_seq(name, c + h, r)[0] - _seq(name, c - h, r)[0]) / (2 * h)
    fd_r = (_seq(name, c, r + h)[0] - _seq(name, c, r - h)[0]) / (2 * h)
    gtol = 1e-6 if not name.startswith("orpo") else 1e-5  # TRL's ORPO gradient is float32
    np.testing.assert_allclose(fd_c, OTHER[f"{name}/grad_chosen"], rtol=gtol, atol=gtol)
    np.testing.assert_allclose(fd_r, OTHER[f"{name}/grad_rejected"], rtol=gtol, atol=gtol)


def _kto(name, policy=None):
    from numpy_other import kto_case

    inp = {k.split("/", 1)[1]: OTHER[k] for k in OTHER.files if k.startswith("kto_inputs/")}
    return kto_case(
        inp["policy_logps"] if policy is None else policy,
        inp["ref_logps"],
        inp["kl_policy_logps"],
        OTHER[f"{name}/kl_ref_logps"],
        inp["completion_mask"],
        inp["kl_completion_mask"],
        inp["label"],
        OTHER_META["cases"]["kto"][name],
    )


@pytest.mark.parametrize("name", KTO_CASES)
def test_kto_matches_trl(name):
    loss, metrics = _kto(name)
    assert abs(loss - float(OTHER[f"{name}/loss"])) <= 1e-12
    for key, value in metrics.items():
        if f"{name}/{key}" in OTHER.files:
            assert abs(value - float(OTHER[f"{name}/{key}"])) <= 1e-12, key
    if name == "kto_kl_clamped":
        assert float(OTHER[f"{name}/kl"]) == 0.0  # the clamp at 0 binds in this case
    policy = np.asarray(OTHER["kto_inputs/policy_logps"], np.float64)
    shift = OTHER["kto_inputs/completion_mask"][:, 1:] != 0
    got = np.zeros_like(policy)
    for idx in zip(*np.nonzero(shift)):
        plus, minus = policy.copy(), policy.copy()
        plus[idx] += 1e-6
        minus[idx] -= 1e-6
        got[idx] = (_kto(name, plus)[0] - _kto(name, minus)[0]) / 2e-6
    want = OTHER[f"{name}/grad_policy_logps"]
    assert np.max(np.abs(got - want)) <= 1e-6 * max(1.0, np.max(np.abs(want)))
