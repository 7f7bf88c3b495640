"""Reward models (`task: reward`): TRL 1.16 RewardTrainer's loss, the value-head step, a tiny
run, the exported scorer, and bad input.

Tolerances:
- parity with TRL's own `RewardTrainer.compute_loss` (fixture `trl_reward.npz`, float64 on
  both sides, x64): loss, gradient w.r.t. the 2B scores and metrics to 1e-10 relative to
  max(1, |TRL|) (only summation order differs, ~1e-16); TRL's `accuracy` is a mean of
  `.float()` (float32) indicators, so 1e-7.
- the step against the pure loss on scores from an independent dense forward (the last real
  token found by `sum(attention_mask) - 1`, the head applied by hand): loss 1e-5 relative,
  gradients 1e-5 of each leaf's largest entry floored at 1e-2 of the largest overall, as
  `test_train_tasks.py` derives for float32 jitted-vs-eager rounding.
- the exported scorer against the trained state's scores on the same rows: 1e-5 absolute
  (float32 forward, the same graph jitted at a different padded width: ~1e-7 observed).
"""

import json
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import data, losses, models, online
from alignjax.models.reward import HEAD_NAME, ValueHead
from alignjax.online.reward_model import save_reward_head
from alignjax.train import config as C
from alignjax.train import forward as F
from alignjax.train import metrics, trainer
from alignjax.train import step as S

datasets.disable_progress_bars()

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_reward.npz"
CFG = models.LlamaConfig(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= tol * max(1.0, float(np.max(np.abs(want))))


# -- parity with TRL 1.16's RewardTrainer.compute_loss ------------------------------------------

FIX = np.load(FIXTURE)
META = json.loads(str(FIX["meta_json"]))


@pytest.mark.parametrize("name", sorted(META["cases"]))
def test_loss_matches_trl_reward_trainer(name, x64):
    case, b = META["cases"][name], META["B"]
    scores = jnp.asarray(FIX["scores"], jnp.float64)
    margin = jnp.asarray(FIX["margin"], jnp.float64) if case["margin"] else None

    def loss(s):
        out = losses.bradley_terry_reward_loss(
            s[:b], s[b:], margin=margin, center_rewards_coefficient=case["center"]
        )
        return out.loss, out

    (value, out), grad = jax.value_and_grad(loss, has_aux=True)(scores)
    want = case["values"]
    assert value.dtype == jnp.float64
    close(value, want["loss"], 1e-10)
    close(grad, FIX[f"{name}/grad"], 1e-10)
    assert set(out.metrics) == set(losses.reward.REWARD_METRICS) == set(want) - {"loss"}
    for key, v in out.metrics.items():
        close(v, want[key], 1e-7 if key == "accuracy" else 1e-10)
    # the registered loss on a RewardBatch is the same function
    batch = losses.RewardBatch(scores[:b], scores[b:], margin)
    reg = losses.get("reward")(batch, center_rewards_coefficient=case["center"])
    close(reg.loss, want["loss"], 1e-10)


def test_padding_pairs_count_nowhere():
    r = jnp.array([1.0, -2.0, 5.0])
    out = losses.bradley_terry_reward_loss(r, r[::-1] * 0.5, valid=jnp.array([1, 1, 0]),
                                           center_rewards_coefficient=0.5)  # fmt: skip
    ref = losses.bradley_terry_reward_loss(r[:2], (r[::-1] * 0.5)[:2],
                                           center_rewards_coefficient=0.5)  # fmt: skip
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)
    assert float(out.metrics["max_reward"]) == 2.5  # not the padding pair's 5.0
    assert losses.needs_of("reward").tasks == ("reward",)
    assert not losses.needs_of("reward").reference


# -- the step: value head at the last real token, exact against the pure loss ------------------


def reward_rows(n=8, margin=True):
    rows = data.shipped_dataset("train").select(range(n)).to_list()
    out = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    if margin:
        for i, r in enumerate(out):
            r["margin"] = 0.25 * (i % 4)
    return out


def first_batch(rows, length=64):
    tok = data.shipped_tokenizer()
    tokenized = data.tokenize_dataset(
        datasets.Dataset.from_list(rows), tok, config=data.TokenizeConfig(max_length=length)
    )
    cfg = data.LoaderConfig(batch_size=len(rows), buckets=(length,), shuffle=False)
    _, batch = next(data.DataLoader(tokenized, cfg).epoch(0))
    return jax.tree.map(jnp.asarray, batch)


def reward_state(optimizer=None):
    model = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    heads = {HEAD_NAME: ValueHead(CFG.hidden_size, seed=3, init_std=0.5)}
    return S.init_state(model, optimizer or optax.sgd(1.0), reference="none", heads=heads)


def dense_scores(state, params, batch):
    """r of every row, computed without `models.reward`: the hidden state at sum(mask) - 1."""
    model = S.model_of(state, params)
    h = model(**batch.model_inputs()).last_hidden_state
    last = jnp.sum(batch.attention_mask, axis=-1) - 1
    kernel = params["heads"][HEAD_NAME]["kernel"][...]
    return (h[jnp.arange(h.shape[0]), last] @ kernel)[:, 0]


@pytest.mark.slow  # a compiled train step / export (suite budget)
def test_step_matches_the_loss_on_dense_scores():
    batch = first_batch(reward_rows(8))
    assert batch.margin is not None and float(batch.margin[3]) == 0.75
    state = reward_state()
    spec = S.StepSpec(task="reward", loss_kwargs={"center_rewards_coefficient": 0.1})
    assert spec.loss == "reward" and spec.reference == "none"

    def direct(params):
        r = dense_scores(state, params, batch)
        return losses.bradley_terry_reward_loss(
            r[:8], r[8:], margin=batch.margin, center_rewards_coefficient=0.1
        ).loss

    want_loss, want_grad = jax.value_and_grad(direct)(state.params)
    before = jax.tree.map(np.asarray, state.params)
    new, m = S.build_step(spec, optax.sgd(1.0), donate=False)(state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-5)
    got = jax.tree.map(lambda a, b: a - np.asarray(b), before, new.params)
    largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_grad))
    head_grad = want_grad["heads"][HEAD_NAME]["kernel"]
    assert float(np.max(np.abs(np.asarray(head_grad)))) > 0  # the head is trained
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree.leaves(want_grad), strict=True):  # fmt: skip
        scale = max(float(np.max(np.abs(w))), 1e-2 * largest)
        err = float(np.max(np.abs(g - np.asarray(w)))) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)
    assert set(losses.reward.REWARD_METRICS) <= set(m)


# -- export and scorer -------------------------------------------------------------------------


@pytest.mark.slow  # a compiled train step / export (suite budget)
def test_exported_scorer_matches_the_state(tmp_path):
    rows = reward_rows(6, margin=False)
    batch = first_batch(rows)
    state = reward_state()
    spec = S.StepSpec(task="reward")
    want = np.asarray(F.token_stats(spec, state, state.params, batch).logps)
    out = tmp_path / "export" / "merged"
    models.save_pretrained(S.model_of(state), out)
    data.shipped_tokenizer().save_pretrained(str(out))
    cfg = C.load_config(None, ["task=reward", "data.max_length=64"])
    save_reward_head(state, cfg, out)
    scorer = online.reward_model_scorer(tmp_path, batch_size=4)  # a run directory
    prompts = [r["prompt"] for r in rows]
    got = scorer(prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    scores = online.score([scorer], prompts, [r["chosen"] for r in rows])  # a reward function
    np.testing.assert_allclose(scores.total, want[:6], atol=1e-5)
    # an empty completion (the policy stopped at once) is scored as prompt + EOS: the state's
    # score of that row, tokenized by hand
    tok = data.shipped_tokenizer()
    ids = tok(prompts[0])["input_ids"] + [tok.eos_token_id]
    batch = jax.tree.map(jnp.asarray, data.collate(
        [{"row": 0, "input_ids": ids, "prompt_length": len(ids) - 1, "length": len(ids)}],
        16, pad_id=tok.pad_token_id or 0, batch_size=1))  # fmt: skip
    empty = dense_scores(state, state.params, batch)
    np.testing.assert_allclose(scorer(prompts[:1], [""]), np.asarray(empty), atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------


def run_config(tmp_path, rows, *extra):
    path = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    return C.load_config(None, [
        "task=reward", f"out_dir={tmp_path / 'run'}", f"data.train={path}", "data.eval=null",
        "data.max_length=64", "mesh.devices=1", *extra,
    ])  # fmt: skip


def test_bad_input_names_the_row_and_column(tmp_path):
    from alignjax.train.data import load_split

    tok = data.shipped_tokenizer()
    rows = reward_rows(4)
    for r in rows:
        r["margin"] = str(r["margin"])  # a text column
    cfg = run_config(tmp_path, rows)
    with pytest.raises(ValueError, match=r"row 0, field 'margin': expected a number, got str"):
        load_split(cfg.data.train, cfg, tok, "reward")
    rows = reward_rows(4)
    rows[2]["margin"] = None
    cfg = run_config(tmp_path, rows)
    with pytest.raises(ValueError, match=r"row 2, field 'margin': missing margin"):
        load_split(cfg.data.train, cfg, tok, "reward")
    rows = reward_rows(4, margin=False)
    del rows[1]["rejected"]
    rows[1]["rejected"] = None
    cfg = run_config(tmp_path, rows)
    with pytest.raises(ValueError, match=r"row 1, field 'rejected': missing"):
        load_split(cfg.data.train, cfg, tok, "reward")
    lm = [{"text": r["prompt"] + r["chosen"]} for r in reward_rows(4)]
    cfg = run_config(tmp_path, lm)
    with pytest.raises(ValueError, match="task='reward' needs paired rows"):
        load_split(cfg.data.train, cfg, tok, "reward")
    with pytest.raises(ValueError, match="data.packing"):
        run_config(tmp_path, reward_rows(4), "data.packing=true")
    with pytest.raises(ValueError, match="loss.name"):
        run_config(tmp_path, reward_rows(4), "loss.name=sigmoid")


# -- a tiny run --------------------------------------------------------------------------------


@pytest.mark.slow  # ~30 s: 30 steps, two evaluations of 200 pairs, export
def test_tiny_run_learns_the_shipped_preferences(tmp_path):
    cfg = C.load_config(None, [
        "task=reward", f"out_dir={tmp_path / 'run'}", "steps=30", "data.batch_size=16",
        "data.eval_batch_size=64", "data.max_length=64", "data.buckets=[64]", "log_every=10",
        "eval_every=30", "eval_samples=0", "plot=false", "mesh.devices=1",
        "optim.learning_rate=1e-3", "optim.warmup_steps=3", "checkpoint.asynchronous=false",
    ])  # fmt: skip
    summary = trainer.train(cfg, progress=False)
    logged = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    before = next(r for r in logged if r["step"] == 0 and "eval/accuracy" in r)
    after = summary["eval"]
    assert after["examples"] == 200
    assert after["accuracy"] > 0.6 and after["accuracy"] > before["eval/accuracy"] + 0.1
    assert after["margin"] > 0 and after["loss"] < before["eval/loss"]
    # the export scores the held-out pairs as the trained model does
    session = trainer.open_run(tmp_path / "run")
    examples, _ = session.eval_examples()
    scorer = online.reward_model_scorer(tmp_path / "run")
    held = data.shipped_dataset("test").select(range(16)).to_list()
    got = scorer([r["prompt"] for r in held], [r["chosen"] for r in held])
    np.testing.assert_allclose(got, examples["chosen_rewards"][:16], atol=1e-5)
