"""experiments/sentiment_control (issue 8): the --quick study end to end, its outputs, and the
pieces it is built from (prompts, Bradley-Terry pairs, SPPO win probabilities, KL estimates)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `experiments` is imported from the checkout
    sys.path.insert(0, str(ROOT))

from experiments.sentiment_control import data as SD  # noqa: E402
from experiments.sentiment_control import study  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"method", "beta", "seed", "trained", "reward", "reward_se", "kl", "kl_se",
            "bounded_reward", "bounded_reward_se", "train_seconds", "logp_check",
            "positive_share", "mean_length", "vs_dpo_reward", "vs_dpo_bounded_reward",
            "dead_head"}  # fmt: skip
FIGURES = ("frontier", "frontier_sparsepo", "frontier_online", "masks", "trajectories",
           "dynamics", "mask_training")  # fmt: skip
ONLINE = {"grpo", "sppo_iter", "online_dpo_rm"}  # the --quick study's on-policy rows


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentiment_control")
    summary = study.main(["--quick", "--out", str(out), "--no-progress"])
    return out, summary


def test_quick_study_writes_well_formed_outputs(quick):
    out, _ = quick
    summary = json.loads((out / "summary.json").read_text())
    for key in ("config", "data", "reference", "runs", "configs", "masks", "dynamics", "frontier",
                "verdict", "figures"):  # fmt: skip
        assert key in summary, key
    for name in FIGURES:
        path = out / f"{name}.png"
        assert summary["figures"][name] == path.name
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, name
    runs = summary["runs"]
    assert {r["method"] for r in runs} == {"dpo", "sppo", "sparsepo", "mapo"} | ONLINE
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        for key in ("reward", "reward_se", "kl", "kl_se", "train_seconds", "mean_length"):
            assert math.isfinite(r[key]), (r["method"], key, r[key])
        assert r["reward_se"] > 0 and r["kl_se"] > 0
        assert 0.0 < r["bounded_reward"] < 1.0 and r["bounded_reward_se"] > 0
    # one training seed: the configuration rows are the runs, with no seed interval
    assert [(c["method"], c["beta"]) for c in summary["configs"]] == [
        (r["method"], r["beta"]) for r in runs
    ]
    assert all(c["reward_ci"] is None for c in summary["configs"])
    # table.md: the reference row and one row per run, then the mask table.
    runs_table = (out / "table.md").read_text().split("\n\n")[0].splitlines()
    body = runs_table[2:]
    assert len(body) == 1 + len(runs) and body[0].startswith("| reference (SFT) |")
    for row, r in zip(body[1:], runs):
        assert row.startswith(f"| {r['label']} | {r['beta']:g} |")
    data = summary["data"]["train"]
    assert data["pairs"] > 100 and 0.0 <= data["label_noise_rate"] < 0.5
    assert summary["data"]["heldout"]["pairs"] > 0
    assert (out / "runs" / "data" / "train_pairs.jsonl").is_file()


def test_trained_policies_beat_the_reference_and_kl_is_sane(quick):
    _, summary = quick
    ref = summary["reference"]
    assert ref["kl"] == 0.0 and ref["kl_se"] == 0.0  # the same forward pass on both sides
    runs = {r["method"]: r for r in summary["runs"]}
    dpo = runs["dpo"]
    assert dpo["reward"] - ref["reward"] > 2 * math.hypot(dpo["reward_se"], ref["reward_se"])
    for r in runs.values():
        assert r["reward"] > ref["reward"], r["method"]
        assert r["kl"] > 0.1, r["method"]  # trained policies moved away from the reference
        # The sampler's log-probs of its own tokens = a forward pass of the policy on them.
        assert r["logp_check"] < 1e-4, (r["method"], r["logp_check"])
    assert ref["logp_check"] < 1e-4


def test_on_policy_rows(quick):
    """GRPO + KL and the SPPO self-play loop on the gold reward, online DPO on the study's
    reward model: each trained with the offline rows' sequence budget, evaluated like them."""
    out, summary = quick
    cfg = study.QUICK
    runs = {r["method"]: r for r in summary["runs"]}
    for name in ONLINE:
        assert runs[name]["online"] is not None and runs[name]["scorer"] in ("gold", "rm")
    assert runs["online_dpo_rm"]["scorer"] == "rm" and runs["grpo"]["scorer"] == "gold"
    # GRPO: steps x 2 x batch completions (the offline rows' sequences), G = 4 per prompt
    assert runs["grpo"]["online"] == dict(method="grpo", steps=cfg.steps)
    grpo_dir = out / "runs" / f"grpo_beta{runs['grpo']['beta']:g}_seed0"
    grpo = yaml.safe_load((grpo_dir / "config.yaml").read_text())
    assert grpo["task"] == "online" and grpo["online"]["method"] == "grpo"
    assert grpo["data"]["batch_size"] == 2 * cfg.batch_size and grpo["steps"] == cfg.steps
    assert grpo["online"]["num_generations"] == 4 and grpo["online"]["beta"] > 0
    it = runs["sppo_iter"]["online"]
    assert it["iterations"] == 3 and it["steps"] == 3 * (cfg.steps // 3)
    assert len(it["pairs"]) == 3 and all(n > 0 for n in it["pairs"])
    assert len(it["sample_gold_reward"]) == 3
    # the reward model, trained on the noisy train pairs, orders held-out completions like
    # the gold reward more often than not
    rm = summary["reward_model"]
    assert rm["heldout_pairs"] == summary["data"]["heldout"]["pairs"]
    assert rm["gold_correlation"] > 0.2 and rm["accuracy_gold"] > 0.5
    # the frontier figures re-drawn from summary.json alone (`--replot`)
    assert set(study.replot(out)) == {"frontier", "frontier_sparsepo", "frontier_online"}
    assert (out / "frontier_online.png").read_bytes()[:8] == PNG
    rollouts = grpo_dir / "rollouts.jsonl"
    assert rollouts.is_file() and all(
        math.isfinite(json.loads(line)["reward"]) for line in rollouts.read_text().splitlines()
    )


def test_mask_statistics(quick):
    _, summary = quick
    rows = summary["masks"]
    kinds = {(r["method"], r["mask"], r["state"]) for r in rows}
    sparse = next(r for r in summary["runs"] if r["method"] == "sparsepo")
    assert sparse["dead_head"] is False  # the default head seed is alive on this reference
    assert kinds == {("sparsepo", "reward", "trained"), ("sparsepo", "reward", "init"),
                     ("mapo", "reward", "reference activations")}  # fmt: skip
    for r in rows:
        s = r["stats"]
        assert 0.0 <= s["zero_fraction"] <= 1.0
        assert s["tokens_lexicon"] > 0 and s["tokens_neutral"] > 0
        assert min(s["lexicon"], s["neutral"]) >= 0.0
    mapo = next(r["stats"] for r in rows if r["method"] == "mapo")
    assert mapo["zero_fraction"] < 0.2 and max(mapo["lexicon"], mapo["neutral"]) <= 1.0


def test_pair_generation_is_reproducible(quick, tmp_path):
    """The same seed gives byte-identical pairs files (sampling, rewards, BT draws)."""
    out, _ = quick
    cfg = study.QUICK
    first = study.build_data(cfg, out / "runs" / "sft", tmp_path / "a")
    study.build_data(cfg, out / "runs" / "sft", tmp_path / "b")
    for name in ("train_pairs.jsonl", "heldout_pairs.jsonl", "probe.jsonl"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes()
        assert a == (out / "runs" / "data" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "train_pairs.jsonl").open()]
    assert len(rows) == first["train"]["pairs"]
    for row in rows:
        assert row["chosen"] != row["rejected"] and row["chosen_score"] != row["rejected_score"]


def test_prompts_are_disjoint_and_seeded():
    train = SD.draw_prompts("train", 200, 0)
    heldout = SD.draw_prompts("heldout", 100, 0, frozenset(train))
    assert len(set(train)) == 200 and len(set(heldout)) == 100 and not set(train) & set(heldout)
    assert SD.draw_prompts("train", 200, 0) == train
    assert SD.draw_prompts("train", 200, 1) != train


def test_bradley_terry_pairs_and_win_probabilities():
    prompts = ["p0", "p1"]
    texts = [[" a", " b", " c"], [" d", " e", " f"]]
    scores = [[2, -1, 2], [0, 1, 3]]
    tau = 0.5
    rows, stats = SD.make_pairs(prompts, texts, scores, tau=tau, seed=0)
    # p0: (a, c) tie dropped; p1: all three pairs differ.
    assert stats["pairs"] == 5 and stats["ties_dropped"] == 1
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    for r in scores:
        win = SD.win_probabilities(r, tau)
        expected = [np.mean([sig((a - b) / tau) for b in r]) for a in r]
        np.testing.assert_allclose(win, expected, rtol=1e-12)
        assert win[int(np.argmax(r))] > 0.5 > win[int(np.argmin(r))]
    for row in rows:
        k = texts[prompts.index(row["prompt"])]
        s = scores[prompts.index(row["prompt"])]
        w = SD.win_probabilities(s, tau)
        assert row["chosen_win_prob"] == w[k.index(row["chosen"])]
        assert row["rejected_win_prob"] == w[k.index(row["rejected"])]
    # Label noise follows the BT model: almost none at a tiny temperature, half at a huge one.
    many = [[float(i % 5) for i in range(8)]] * 300
    names = [f"q{i}" for i in range(300)]
    words = [[f" w{j}" for j in range(8)]] * 300
    _, cold = SD.make_pairs(names, words, many, tau=1e-3, seed=0)
    _, hot = SD.make_pairs(names, words, many, tau=1e3, seed=0)
    assert cold["label_noise_rate"] == 0.0
    assert abs(hot["label_noise_rate"] - 0.5) < 0.03
    assert abs(hot["expected_label_noise_rate"] - 0.5) < 1e-3


def test_dynamics_and_mask_training_are_logged(quick):
    """The trajectory runs log the DPO-dynamics diagnostics at every evaluation (all 0 at step
    0), and SparsePO's train step logs its mask and KL metrics."""
    out, summary = quick
    labels = {r["label"] for r in summary["dynamics"]}
    assert {"DPO", "SPPO"} <= labels and any(lbl.startswith("SparsePO") for lbl in labels)
    for row in summary["dynamics"]:
        assert 0.0 <= row["dynamics/displacement"] <= 1.0
        assert math.isfinite(row["dynamics/probe/entropy"]) and row["dynamics/probe/entropy"] > 0
    metrics = out / "runs" / "sparsepo_beta0.8_seed0" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.open()]
    first = next(r for r in rows if "eval/dynamics/delta_logps/chosen" in r)
    assert first["step"] == 0 and first["eval/dynamics/delta_logps/chosen"] == 0.0
    train = [r for r in rows if "train/mask/chosen_mean" in r]
    keys = ("mask/rejected_mean", "mask/eos", "mask/sparsity", "seq_kl/chosen",
            "masked_seq_kl/chosen")  # fmt: skip
    assert train and all(math.isfinite(r[f"train/{k}"]) for r in train for k in keys)


def test_seed_aggregation():
    """Seed means and Student-t intervals of `report.aggregate` against a hand computation."""
    from experiments.sentiment_control import report as R

    ref = dict(reward=0.0, bounded_reward=0.5)
    base = dict(label="x", loss="sigmoid", trained="full", positive_share=0.5, mean_length=10.0,
                train_seconds=1.0, reward_se=0.1, kl_se=0.1, bounded_reward_se=0.01)  # fmt: skip
    runs = [
        dict(base, method="dpo", beta=1.0, seed=s, reward=r, kl=k, bounded_reward=b)
        for s, (r, k, b) in enumerate([(2.0, 4.0, 0.8), (2.2, 4.4, 0.82), (1.8, 3.6, 0.78)])
    ]
    runs += [dict(base, method="m", beta=1.0, seed=s, reward=r, kl=2.0, bounded_reward=0.6)
             for s, r in enumerate([1.0, 1.2, 1.4])]  # fmt: skip
    dpo, m = R.aggregate(runs, ref)
    assert dpo["reward"] == pytest.approx(2.0) and dpo["kl"] == pytest.approx(4.0)
    assert dpo["reward_ci"] == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    # DPO's frontier at KL 2 is half-way from the reference (0, 0) to (4, 2): 1.0
    assert m["vs_dpo_reward"] == pytest.approx(0.2) and m["vs_dpo_reward_ci"] == pytest.approx(
        4.303 * 0.2 / math.sqrt(3))  # fmt: skip
    assert m["vs_dpo_bounded_reward"] == pytest.approx(0.6 - (0.5 + 0.5 * 0.3))


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks


def test_redraw_dead_retrains_with_another_head_seed(tmp_path, monkeypatch):
    """`--redraw-dead`: a SparsePO run whose head is dead at init is re-trained with head seed
    + 1000 (labelled in the run and the config it trained with). The dead check is forced on the
    first draw, since no head of the quick configuration's seeds is dead."""
    calls = []
    real = study._dead_at_init

    def first_dead(rows, method, seed):
        calls.append(seed)
        return True if len(calls) == 1 else real(rows, method, seed)

    monkeypatch.setattr(study, "_dead_at_init", first_dead)
    summary = study.main(["--quick", "--out", str(tmp_path), "--no-progress", "--redraw-dead",
                          "--methods", "sparsepo"])  # fmt: skip
    (run,) = summary["runs"]
    assert len(calls) == 2 and run["redrawn_head_seed"] == 0 + 2 + 1000
    assert run["dead_head"] is False
    cfg = (tmp_path / "runs" / "sparsepo_beta0.8_seed0" / "config.yaml").read_text()
    assert "head_seed: 1002" in cfg
    table = (tmp_path / "table.md").read_text()
    assert "0/1 (1 re-drawn)" in table
