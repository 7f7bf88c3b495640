"""alignjax.train.trainer and the `alignjax` CLI: the demo end to end (SFT, then DPO + LoRA with
the adapters-disabled reference), the run directory, `eval` / `export` from a checkpoint, the
exports against the trained policy, the precomputed reference cache through the trainer, and
bad configs.

Independent references: the merged HF export and the PEFT export (imported onto the SFT base by
`peft.import_adapters`) against the policy restored from the checkpoint (logits, 2e-5: float32
merge W + s B A vs the unmerged two-path sum); `alignjax eval` against the run's own final
evaluation (the same checkpoint and data: equal to 1e-6); the held-out metrics against a NumPy
recomputation from per-example values.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import cli, data, models, peft
from alignjax.train import config as C
from alignjax.train import metrics, trainer
from alignjax.train import step as S


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_a_complete_run(demo):
    for stage in ("sft", "dpo"):
        run = demo / stage
        for f in ("config.yaml", "metrics.jsonl", "eval.json", "curves.png"):
            assert (run / f).is_file(), (stage, f)
        assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run / "export" / "merged" / "model.safetensors").is_file()
        assert (run / "tb").is_dir() and any((run / "tb").iterdir())
        steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir())
        assert steps and steps[-1] == C.load_config(run / "config.yaml").steps
    rows = metrics.read_jsonl(demo / "dpo" / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in eval_rows] == [0, 5, 10]  # before training, every 5, the end
    names = set(train_rows[0])
    for name in ("loss", "grad_norm", "learning_rate", "skipped", "tokens_per_s", "step_time",
                 "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "completion_tokens"):  # fmt: skip
        assert f"train/{name}" in names, name
    # At step 0 the LoRA policy is its reference (B = 0): every implicit reward is exactly 0.
    assert eval_rows[0]["eval/rewards/margins"] == 0.0
    assert eval_rows[0]["eval/loss"] == pytest.approx(np.log(2), abs=1e-6)
    summary = json.loads((demo / "dpo" / "eval.json").read_text())
    assert summary["eval"]["loss"] == pytest.approx(eval_rows[-1]["eval/loss"], abs=1e-9)
    assert summary["eval"]["loss"] < np.log(2)  # it learned something in 10 steps


def test_eval_command_reproduces_the_final_evaluation(demo, capsys):
    assert cli.main(["eval", "--run", str(demo / "dpo")]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads((demo / "dpo" / "eval.json").read_text())["eval"]
    assert got["step"] == 10 and got["examples"] == want["examples"] == 40
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key


def _policy(run):
    session = trainer.open_run(run)
    return session, session.policy()


def test_exports_equal_the_trained_policy(demo, tmp_path, capsys):
    run = demo / "dpo"
    session, policy = _policy(run)
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "x")]) == 0
    paths = json.loads(capsys.readouterr().out)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 512, (2, 24)), jnp.int32)

    def logits(model):
        return np.asarray(model.logits(model(ids).last_hidden_state))

    want = logits(policy)
    assert np.max(np.abs(want - logits(models.load_pretrained(run / "export" / "merged")))) > 0
    for merged in (run / "export" / "merged", paths["merged"]):
        np.testing.assert_allclose(logits(models.load_pretrained(merged)), want, atol=2e-5)
    # PEFT format: the SFT base + the exported adapters = the policy.
    base = models.load_pretrained(demo / "sft" / "export" / "merged")
    adapted = peft.import_adapters(base, paths["adapter"], rngs=nnx.Rngs(0))
    assert len(adapted) == len(session.adapted) == 14  # 7 projections x 2 layers
    config, _ = peft.read_adapters(paths["adapter"])
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    np.testing.assert_allclose(logits(base), want, atol=2e-5)
    # The run's tokenizer travels with the exports.
    tok = data.load_tokenizer(paths["merged"])
    assert tok("the soup")["input_ids"] == session.tokenizer("the soup")["input_ids"]


def test_eval_metrics_against_numpy(demo):
    """`evaluate.evaluate` against a NumPy recomputation from the eval step's per-example
    values (padding examples of the last batch excluded); 1e-9: float64 sums in another order."""
    from alignjax.train import evaluate as E

    session, _ = _policy(demo / "dpo")
    loader = session.eval_loader()
    step = E.build_eval_step(session.spec)
    parts = [jax.device_get(step(session.state, jax.tree.map(jnp.asarray, b)))
             for _, b in loader.epoch(0)][:1]  # fmt: skip
    got = E.evaluate(session.state, step, loader, max_batches=1)
    p = parts[0]
    w = np.asarray(p["valid"], bool)
    c, r = np.float64(p["chosen_rewards"])[w], np.float64(p["rejected_rewards"])[w]
    assert got["examples"] == w.sum()
    np.testing.assert_allclose(got["loss"], np.mean(np.float64(p["losses"])[w]), rtol=1e-9)
    np.testing.assert_allclose(got["rewards/accuracies"], np.mean(c > r), rtol=1e-9)
    # Margins c - r in float64 on both sides (a float32 subtraction rounds each by up to 2^-24 of
    # itself: 2^-24 sum|m| / |sum m| = 8.9e-8 of the mean here, 7e-9 was observed); then 1e-9
    # covers float64 sums of 40 values in another order (~40 * 2^-53 * 1.5 = 7e-15).
    np.testing.assert_allclose(got["rewards/margins"], np.mean(c - r), rtol=1e-9)
    nll = -np.sum(np.float64(p["chosen_logps"])[w]) / np.sum(np.float64(p["chosen_tokens"])[w])
    np.testing.assert_allclose(got["nll/chosen"], nll, rtol=1e-9)


def test_precomputed_reference_cache_through_the_trainer(demo, tmp_path, caplog):
    """Reference log-probs of the SFT model, cached on the first setup, reused on the second,
    recomputed when the data (max_length) changes; equal to the adapters-disabled reference."""
    base = [f"init_from={demo / 'sft'}", "peft.method=lora", f"out_dir={tmp_path / 'run'}",
            "data.train=shipped:test", "data.eval=null", "mesh.devices=1",
            f"reference.cache_dir={tmp_path / 'cache'}", "data.max_length=64"]  # fmt: skip
    first = trainer.setup(C.load_config(None, base + ["reference.mode=precomputed"]))
    again = trainer.setup(C.load_config(None, base + ["reference.mode=precomputed"]))
    other = trainer.setup(
        C.load_config(None, base[:-1] + ["reference.mode=precomputed", "data.max_length=48"])
    )
    cache, reused, changed = (s.ref_caches[0] for s in (first, again, other))
    assert not cache.loaded and reused.loaded and not changed.loaded
    assert reused.key == cache.key != changed.key
    assert len(list((tmp_path / "cache").iterdir())) == 2
    online = trainer.setup(C.load_config(None, base + ["reference.mode=adapters_disabled"]))
    _, batch = next(trainer.train_loader(online).epoch(0))
    dev = jax.tree.map(jnp.asarray, batch)
    stats = S.token_stats(online.spec, online.state, online.state.params, dev)
    ref_online, mask = stats.ref_logps, stats.mask
    attached = first.to_device(batch)
    np.testing.assert_allclose(attached.ref_logps, np.asarray(ref_online), atol=2e-5)
    assert np.all(np.asarray(attached.ref_logps)[np.asarray(mask) == 0] == 0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "optim.lerning_rate=1e-3"], "unknown key"),
        (["train", "optim.learning_rate=fast"], "optim.learning_rate"),
        (["train", "task=rl"], "`task` must be one of"),
        (["train", "task=sft"], "holds paired rows, but task='sft'"),
        (["train", "reference.mode=adapters_disabled"], "needs adapters"),
        (["train", "model.preset=huge"], "model.preset"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["eval", "--run", "/nonexistent"], "no config.yaml"),
    ],
)
def test_bad_configs_exit_2_with_a_named_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or notebooks
