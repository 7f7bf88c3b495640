"""Task online (`train.online`, `train.online_step`): a batch of scored rollouts through the same
jitted step as every other task, the rollout phase, and whole runs.

Step parity: for grpo (dapo on-policy; grpo with the k3 KL and stored old log-probs; dr_grpo),
rloo, reinforce_kl and online_dpo (sigmoid, ipo), the step's loss and its SGD(lr=1) update equal
the registered loss and its gradient evaluated on log-probs computed independently (dense
logits / T, `ops.token_logps`, the whole batch at once, in the rollout's row layout), with
accumulation over 2 micro-batches where given: loss 1e-5 relative, gradients 1e-5 of each
leaf's largest entry (tests/test_train_tasks.py's tolerance and reasons: the step's fused LM
head against a dense log-softmax, float32 sums rounded differently). The reference's and the
sampler's log-probs placed in the batch's layout match the dense ones to 1e-5 (rollout
log-probs at T equal teacher forcing to 1e-5, tests/test_online_rollout.py).

Runs (slow): a tiny GRPO run on a verifiable reward raises its mean reward, with the logged
loss ~0 (|loss| < 1e-6: beta = 0, mu = 1, loss_type grpo, centred advantages) while
grad_norm > 0 (TRL's pitfall); 1 vs 8 devices (data and fsdp meshes, pmap): the same losses and
parameters (1e-5, tests/test_train_parallel.py's reasons, the sampled tokens identical); a run
stopped and resumed equals the uninterrupted one bitwise (metrics, parameters, rollouts.jsonl).
"""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_tasks import check_step

from alignjax import data, losses, models, online, ops
from alignjax.train import checkpoint, metrics, session, trainer
from alignjax.train import config as C
from alignjax.train import online as O
from alignjax.train import online_step as OS
from alignjax.train import step as S

datasets.disable_progress_bars()

CFG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)  # fmt: skip
B, G, P, NEW, T = 4, 4, 6, 8, 0.7
STOPS = (5, 6, 7)  # some completions stop early, some run to NEW


def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 64, (B, P)).astype(np.int32)
    mask = (np.arange(P)[None, :] >= np.array([0, 2, 3, 1])[:, None]).astype(np.int32)
    return ids * mask, mask


@pytest.fixture(scope="module")
def models_():
    return (models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)),
            models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(1)))  # fmt: skip


def dense(model, batch, temperature):
    logits = model.logits(model(**batch.model_inputs()).last_hidden_state) / temperature
    return ops.token_logps(logits, batch.labels, batch.loss_mask)


dense_jit = nnx.jit(dense, static_argnames="temperature")  # one compilation, not one per op


def rollouts(model, layout):
    """A rollout of the B prompts in `layout` and its token rows (host arrays)."""
    ids, mask = prompts()
    r = online.rollout(model, ids, mask, jax.random.key(3), num_generations=G, layout=layout,
                       max_new_tokens=NEW, temperature=T, stop_tokens=STOPS)  # fmt: skip
    r = jax.tree.map(np.asarray, r)
    assert 0 < r.missing_eos.sum() < len(r.missing_eos)
    return r, OS.rollout_rows(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)


@pytest.mark.slow  # suite budget
def test_rows_align_sampler_and_reference_logps_with_the_labels(models_):
    policy, ref = models_
    r, rows = rollouts(policy, "grouped")
    tokens = OS.OnlineBatch(valid=None, advantages=None, rewards=None, contains_eos=None,
                            **jax.tree.map(jnp.asarray, rows))  # fmt: skip
    np.testing.assert_array_equal(rows["loss_mask"].sum(1), r.completion_mask.sum(1))
    old = OS.completion_to_rows(r.logps, P, P + NEW)
    np.testing.assert_allclose(old, dense_jit(policy, tokens, T), atol=1e-5)
    state = S.init_state(policy, optax.sgd(1.0), reference="none")
    got = OS.reference_logps(state, nnx.state(ref, nnx.Param), tokens, adapters_off=False,
                             temperature=T)  # fmt: skip
    np.testing.assert_allclose(got, dense_jit(ref, tokens, T), atol=1e-5)


CASES = {  # name: (loss, kwargs, layout, with old log-probs, with reference, accumulation)
    "grpo_dapo": ("grpo", {"loss_type": "dapo", "beta": 0.0}, "grouped", False, False, 1),
    "grpo_kl_old": ("grpo", {"loss_type": "grpo", "beta": 0.04, "epsilon": 0.1},
                    "grouped", True, True, 2),
    "dr_grpo": ("grpo", {"loss_type": "dr_grpo", "beta": 0.0, "max_completion_length": NEW},
                "grouped", True, False, 2),
    "rloo": ("rloo", {"epsilon": 0.1}, "grouped", True, False, 2),
    "reinforce_kl": ("reinforce_kl", {"beta": 0.05, "num_generations": G}, "grouped", False,
                     True, 2),
    "online_dpo": ("online_dpo", {"beta": 0.1, "missing_eos_penalty": 0.5}, "halves", False,
                   True, 2),
    "online_dpo_ipo": ("online_dpo", {"beta": 0.1, "loss_type": "ipo"}, "halves", False, True, 1),
}  # fmt: skip


FAST_CASES = ("grpo_kl_old", "online_dpo")  # the rest run with the slow set (suite budget)


@pytest.mark.parametrize(
    "case",
    [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
)
def test_step_matches_the_registered_loss_on_dense_logps(models_, case):
    loss, kw, layout, with_old, with_ref, accum = CASES[case]
    policy, ref_model = models_
    r, rows = rollouts(policy, layout)
    n = len(r.missing_eos)
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=n).astype(np.float32)
    rewards[[1, 6]] = np.nan  # unscorable rows: advantage 0 (grpo), 0 reward (online_dpo)
    if loss == "reinforce_kl":
        rewards = np.nan_to_num(rewards)
    temperature = 1.0 if loss == "online_dpo" else T  # TRL scores its pairs at T = 1
    tokens = OS.OnlineBatch(valid=None, advantages=None, rewards=None, contains_eos=None,
                            **jax.tree.map(jnp.asarray, rows))  # fmt: skip
    ref = dense_jit(ref_model, tokens, temperature) if with_ref else None
    old = None
    if with_old:  # a stale sampler: the ratios leave the clip range
        noise = rng.normal(scale=0.3, size=r.logps.shape) * r.completion_mask
        old = OS.completion_to_rows(r.logps + noise, P, P + NEW)
    adv = np.zeros(n, np.float32)
    if loss == "grpo":
        adv = np.asarray(losses.group_advantages(rewards, G)[0])
    elif loss == "rloo":
        adv = np.asarray(losses.rloo_advantages(rewards, G, beta=0.0)[0])
    assert adv[1] == 0 or loss not in ("grpo", "rloo")
    fields = dict(rows, advantages=adv, rewards=rewards, contains_eos=~r.missing_eos,
                  old_logps=old, ref_logps=None if ref is None else np.asarray(ref))  # fmt: skip
    batch = jax.tree.map(jnp.asarray, OS.online_batch(fields, pairs=layout == "halves",
                                                       accum=accum))  # fmt: skip
    state = S.init_state(policy, optax.sgd(1.0), reference="none", loss=loss)
    spec = S.StepSpec(task="online", loss=loss, loss_kwargs=kw, temperature=temperature,
                      reference="precomputed" if with_ref else "none")  # fmt: skip

    def direct(params):
        lp = dense(S.model_of(state, params), tokens, temperature)
        lb = losses.ScoredRolloutBatch(
            logps=lp, mask=tokens.loss_mask, advantages=jnp.asarray(adv),
            old_logps=None if old is None else jnp.asarray(old), ref_logps=ref,
            rewards=jnp.asarray(rewards), contains_eos=jnp.asarray(~r.missing_eos),
        )  # fmt: skip
        return losses.get(loss)(lb, **kw).loss

    _, m = check_step(spec, state, batch, jax.jit(direct))
    if with_old:
        assert float(m["clip_ratio/region_mean"]) > 0  # the clip was exercised


# ------------------------------------------------------------------------ config and errors


def write_prompts(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t, "answer": str(i)}) + "\n"
                            for i, t in enumerate(texts)))  # fmt: skip
    return path


def shipped_prompts(n):
    return [r["prompt"] for r in data.shipped_dataset("train").select(range(n))]


def online_config(tmp_path, *overrides, n=24):
    source = write_prompts(tmp_path / "prompts.jsonl", shipped_prompts(n))
    return C.load_config(None, [
        "task=online", f"data.train={source}", f"out_dir={tmp_path / 'run'}", "data.eval=null",
        "data.batch_size=8", "data.buckets=[32]", "online.num_generations=4",
        "online.max_new_tokens=6", "plot=false", "eval_samples=0", "checkpoint.export_hf=false",
        "mesh.devices=1", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize("overrides, match", [
    (["online.num_generations=3"], r"`online.num_generations`=3 must divide `data.batch_size`=8"),
    (["online.method=ppo"], r"`online.method` must be one of"),
    (["online.rewards=[sentiment, nope]"], r"`online.rewards\[1\]` 'nope' is not a registered"),
    (["online.method=online_dpo", "online.num_generations=4"], r"is 2 for online_dpo"),
    (["optim.grad_accum=3"], r"`optim.grad_accum`=3 must divide"),
    (["online.method=online_dpo", "online.num_generations=2", "reference.mode=none"],
     r"`reference.mode`='none'"),
    (["online.method=reinforce_kl", "online.num_iterations=2"], r"must be 1 for reinforce_kl"),
    (["online.num_iterations=3", "checkpoint.every=4"], r"`checkpoint.every`=4 must be a multiple"),
    (["loss.name=sigmoid"], r"leave loss.name"),
])  # fmt: skip
def test_config_errors_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        online_config(tmp_path, *overrides)


def test_empty_prompt_row_is_named(tmp_path):
    cfg = online_config(tmp_path)
    bad = write_prompts(tmp_path / "bad.jsonl", ["a good prompt", "another", "", "last"])
    with pytest.raises(ValueError, match=r"row 2, field 'prompt': empty text"):
        session.setup(C.apply_overrides(cfg, [f"data.train={bad}"]))


def wrong_count(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def answer_or_none(prompts, completions, answer, completion_ids, **kwargs):
    """The row's `answer` column where it is even, None (no reward) on odd answers."""
    assert all(isinstance(c, str) for c in completions) and len(completion_ids) == len(answer)
    return [float(a) if int(a) % 2 == 0 else None for a in answer]


for _fn in (wrong_count, nan_reward, answer_or_none):
    online.register_reward(_fn.__name__, _fn, overwrite=True)


@pytest.fixture(scope="module")
def phase(tmp_path_factory):
    cfg = online_config(tmp_path_factory.mktemp("phase"),
                        "online.rewards=[sentiment, answer_or_none]")  # fmt: skip
    return session.setup(cfg).rollouts


def fake_sample(n=8):
    ids = np.random.default_rng(0).integers(3, 500, (n, 6)).astype(np.int32)
    return dict(
        rows=np.arange(n),
        completion_ids=ids,
        completion_mask=np.ones_like(ids),
        missing_eos=np.ones(n, bool),
        logps=np.full(ids.shape, -1.0, np.float32),
    )


def test_scores_pass_dataset_columns_and_none_gives_zero_advantage(phase):
    s = fake_sample()
    scores, prompts_, texts = phase.score(s, phase.cfg.data.train)
    assert prompts_ == shipped_prompts(8) and len(texts) == 8
    assert np.isnan(scores.per_function[1::2, 1]).all()
    np.testing.assert_array_equal(scores.per_function[::2, 1], [0, 2, 4, 6])
    _, m = phase.advantages(scores, s, None)
    assert set(m) >= {"reward", "reward_std", "frac_reward_zero_std",
                      "rewards/sentiment/mean", "rewards/answer_or_none/std"}  # fmt: skip
    assert m["rewards/answer_or_none/mean"] == 3.0  # None ignored, as TRL's nanmean
    column = scores.per_function[:, 1:]
    only = scores._replace(per_function=column, total=column[:, 0], names=scores.names[1:])
    adv, _ = phase.advantages(only, s, None)  # unscorable rows: advantage 0, out of the stats
    np.testing.assert_allclose(adv, np.array([-1, 0, 1, 0, -1, 0, 1, 0]) / np.sqrt(2), atol=1e-4)


def test_conversational_prompts_reach_rewards_as_messages(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q {i}"}]})
                              + "\n" for i in range(8)))  # fmt: skip
    phase = session.setup(online_config(tmp_path, f"data.train={source}")).rollouts
    scores, prompts_, texts = phase.score(fake_sample(), str(source))
    assert prompts_[3] == [{"role": "user", "content": "q 3"}]
    assert all(t[0]["role"] == "assistant" and isinstance(t[0]["content"], str) for t in texts)


@pytest.mark.parametrize("fn, match", [
    ("wrong_count", r"reward function 'wrong_count' returned 7 rewards, but 8 were expected"),
    ("nan_reward", r"reward function 'nan_reward' returned nan at row 0"),
])  # fmt: skip
def test_bad_reward_functions_are_named(phase, fn, match):
    phase.reward_fns = [online.get_reward(fn)]
    try:
        with pytest.raises(ValueError, match=match):
            phase.score(fake_sample(), phase.cfg.data.train)
    finally:
        phase.reward_fns = [online.get_reward(n) for n in phase.o.rewards]


def test_prompt_loader_serves_each_batch_mu_times_and_resumes(phase):
    base = phase.loader().loader
    loader = O.PromptLoader(base, 3)
    whole = [(k, b.rows.tolist()) for k, b in loader.epoch(0)]
    assert [k for k, _ in whole] == list(range(3 * len(base)))
    assert whole[0][1] == whole[2][1] != whole[3][1]
    assert [(k, b.rows.tolist()) for k, b in loader.epoch(0, start=4)] == whole[4:]


# ------------------------------------------------------------------------------ whole runs

TARGET = frozenset(range(300, 316))  # 16 of the shipped tokenizer's 512 tokens


def hits(prompts, completions, completion_ids, **kwargs):
    """A verifiable reward: 1 when the completion holds one of the TARGET tokens."""
    return [float(any(t in TARGET for t in ids)) for ids in completion_ids]


online.register_reward("hits", hits, overwrite=True)


def train_rows(cfg):
    trainer.train(cfg, progress=False)
    out = cfg.out_dir
    rows = [r for r in metrics.read_jsonl(f"{out}/metrics.jsonl") if "train/loss" in r]
    with checkpoint.Checkpointer(f"{out}/checkpoints", every=1, keep=1) as ck:
        state, meta = ck.restore()
    assert meta["step"] == cfg.steps
    return rows, state


@pytest.mark.slow  # a whole run: ~25 s
def test_grpo_raises_a_verifiable_reward_with_a_zero_loss(tmp_path):
    cfg = online_config(
        tmp_path, "steps=20", "data.batch_size=32", "online.num_generations=8",
        "online.max_new_tokens=8", "online.rewards=[hits]", "online.loss_type=grpo",
        "log_every=1", "checkpoint.every=20", "optim.learning_rate=3e-3",
        "optim.warmup_steps=0", "optim.schedule=constant", n=64,
    )  # fmt: skip
    rows, _ = train_rows(cfg)
    reward = np.array([r["train/reward"] for r in rows])
    print("reward per step:", reward.round(3).tolist())
    assert reward[-5:].mean() >= reward[:5].mean() + 0.5, reward
    # beta = 0, mu = 1: rho = 1 and the advantages are centred per group, so the loss is 0 up to
    # float rounding at every step while the gradient is not (TRL #2703, #3452)
    assert all(abs(r["train/loss"]) < 1e-6 for r in rows)
    learning = [r for r in rows if r["train/frac_reward_zero_std"] < 1]
    assert len(learning) >= 5 and all(r["train/grad_norm"] > 0.1 for r in learning)


LAYOUTS = {
    "one_device": ["mesh.devices=1"],
    "data8": ["mesh.devices=-1", "mesh.data=8"],
    "fsdp8": ["mesh.devices=-1", "mesh.data=1", "mesh.fsdp=8"],
    "pmap8": ["mesh.devices=-1", "mesh.pmap=true"],
}
METHODS = {
    "grpo_kl": ["online.method=grpo", "online.beta=0.04", "data.batch_size=16"],
    "online_dpo": ["online.method=online_dpo", "online.num_generations=2",
                   "data.batch_size=16"],
}  # fmt: skip


def parallel_run(tmp_path, method, layout):
    cfg = online_config(
        tmp_path / f"{method}_{layout}", "steps=3", "log_every=1", "checkpoint.every=3",
        "checkpoint.asynchronous=false", "optim.name=sgd", "optim.learning_rate=0.2",
        "optim.b1=0.9", "optim.warmup_steps=0", "optim.schedule=constant",
        *METHODS[method], *LAYOUTS[layout],
    )  # fmt: skip
    rows, state = train_rows(cfg)
    return np.array([r["train/loss"] for r in rows]), rows, state["params"]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return {m: parallel_run(tmp, m, "one_device") for m in METHODS}


@pytest.mark.slow  # whole runs on 1 and 8 devices
@pytest.mark.parametrize(
    "method, layout",
    [("grpo_kl", "data8"), ("grpo_kl", "fsdp8"), ("online_dpo", "pmap8"), ("online_dpo", "data8")],
)
def test_same_losses_and_parameters_as_one_device(single_runs, tmp_path, method, layout):
    assert jax.device_count() == 8
    losses_, rows, params = parallel_run(tmp_path, method, layout)
    ref_losses, ref_rows, ref_params = single_runs[method]
    for r, q in zip(rows, ref_rows, strict=True):  # the same rollouts were sampled
        assert r["train/reward"] == q["train/reward"]
        assert r["train/completions/mean_length"] == q["train/completions/mean_length"]
    # atol: GRPO's first loss is a sum of centred O(1) advantages, ~1e-8 (float32 rounding)
    np.testing.assert_allclose(losses_, ref_losses, rtol=1e-5, atol=1e-6)
    flat = jax.tree_util.tree_leaves_with_path(params)
    ref = jax.tree.leaves(ref_params)
    assert len(flat) == len(ref) > 10
    errors = []
    for (path, p), q in zip(flat, ref, strict=True):
        errors.append(np.max(np.abs(np.asarray(p) - q)) / np.max(np.abs(q)))
        assert errors[-1] <= 1e-5, (jax.tree_util.keystr(path), errors[-1])
    print(
        f"{method} {layout}: losses within {np.max(np.abs(losses_ - ref_losses)):.1e}, "
        f"parameters within {max(errors):.1e} of the leaf's largest entry"
    )


def saved_steps(directory):
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow  # subprocesses killed and resumed
def test_sigkill_and_resume_is_bitwise(tmp_path):
    """Killed (SIGKILL) twice after a checkpoint, rerun: the rollout rng and the prompt position
    come back with the state, so metrics, parameters, optimizer state and the written rollouts
    are bitwise the uninterrupted run's. GRPO with the KL and mu = 2 (checkpoints on rollout
    boundaries), asynchronous checkpoints every 2 steps."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    def config(name):
        cfg = online_config(
            tmp_path / name, "steps=8", "log_every=1", "online.beta=0.04",
            "online.num_iterations=2", "checkpoint.every=2", "checkpoint.keep=2",
            f"out_dir={tmp_path / name / 'run'}",
        )  # fmt: skip
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(C.to_dict(cfg)))
        return cfg, path

    cfg, path = config("killed")
    run = tmp_path / "killed" / "run"
    cmd = [sys.executable, "-m", "alignjax.cli", "train", "--config", str(path), "--no-progress"]
    kills, log = 0, []
    for attempt, target in enumerate((2, 4)):
        with open(tmp_path / f"log{attempt}.txt", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                if (saved_steps(run / "checkpoints") or [0])[-1] >= target:
                    time.sleep(0.05)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    log.append(saved_steps(run / "checkpoints"))
                    break
                time.sleep(0.02)
            else:
                if proc.poll() is None:
                    proc.kill()
                    raise AssertionError(f"attempt {attempt} timed out")
    print("checkpoints after each kill:", log)
    assert kills == 2, (tmp_path / "log0.txt").read_text()[-3000:]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]

    straight, _ = config("straight")
    rows, state = train_rows(straight)
    got = [r for r in metrics.read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in got] == list(range(1, 9)), log
    for key in ("train/loss", "train/grad_norm", "train/reward", "train/kl", "train/entropy"):
        assert [r[key] for r in got] == [r[key] for r in rows], key
    with checkpoint.Checkpointer(run / "checkpoints", every=1, keep=2) as ck:
        killed_state, meta = ck.restore()
    assert meta["step"] == 8
    leaves, ref = jax.tree.leaves(killed_state), jax.tree.leaves(state)
    assert len(leaves) == len(ref) > 10
    for x, y in zip(leaves, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    samples = (run / O.SAMPLES_FILE).read_text()
    assert samples == (tmp_path / "straight" / "run" / O.SAMPLES_FILE).read_text()
    assert len(samples.splitlines()) == 8 * 4  # log_samples rows for each of the 8 steps
