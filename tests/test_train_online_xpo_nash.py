"""XPO and Nash-MD under `task: online` (`train.online_pairs`, `models.generate_mixture`).

Step parity: the step's loss and its SGD(lr=1) update equal the registered "xpo" / "nash_md"
loss and its gradient on log-probs computed independently (dense logits at T = 1,
`ops.token_logps`, the whole batch at once), with accumulation over 2 micro-batches: loss 1e-5
relative, gradients 1e-5 of each leaf's largest entry (tests/test_train_tasks.py's tolerance and
reasons). XPO's batch holds both halves [y; y'], Nash-MD's the policy's samples only, each with
its opponent's score and EOS flag.

The mixture sampler: the per-token log-probs `generate_mixture` returns equal a teacher-forced
forward of both models with the mixed logits (1 - c) l + c l_ref at the temperature, to 1e-5
(float32 rounding of the two dense forwards against the cached decode); c = 0 and c = 1 draw
exactly the tokens of `generate` with the policy / the reference under the same key; and with
one new token the empirical distribution of 8192 draws is softmax(mixed / T) within 5 standard
errors per token.

Runs (slow): 3 steps of each method through `trainer.train`: TRL's metric names are logged,
and at the first step (policy = reference) the log-ratios are 0 (XPO's `objective/kl`,
`rewards/*`; Nash-MD's `loss/kl`), so XPO's sigmoid loss is log 2 plus the exploration bonus
and Nash-MD's loss is -`loss/score`. XPO on pmap and Nash-MD on a data mesh and pmap over 8
devices sample the 1-device run's pairs and match its losses and parameters to 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_online import (
    CFG,
    LAYOUTS,
    NEW,
    STOPS,
    dense_jit,
    online_config,
    prompts,
    train_rows,
)
from test_train_tasks import check_step

from alignjax import losses, models, online, ops
from alignjax.train import online_step as OS
from alignjax.train import step as S

# Whole tiny runs through the trainer (compiles dominate: ~40 s cold); the losses' parity and
# oracles are tests/test_losses_xpo_nash.py, in the fast set.
pytestmark = pytest.mark.slow

T = 0.7


@pytest.fixture(scope="module")
def models_():
    return (models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)),
            models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(1)))  # fmt: skip


def pair_rollout(policy, ref):
    """XPO's rows: the policy's sample of each prompt, then the reference's (host arrays)."""
    ids, mask = prompts()
    kw = dict(num_generations=1, max_new_tokens=NEW, temperature=T, stop_tokens=STOPS)
    mine = online.rollout(policy, ids, mask, jax.random.key(3), **kw)
    theirs = online.rollout(ref, ids, mask, jax.random.key(4), **kw)
    r = jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), mine, theirs)
    return r, OS.rollout_rows(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)


@pytest.mark.parametrize(  # xpo's step is online_dpo's (fast in test_train_online) plus a term
    "method", [pytest.param("xpo", marks=pytest.mark.slow), "nash_md"]
)
def test_step_matches_the_registered_loss_on_dense_logps(models_, method):
    policy, ref_model = models_
    r, rows = pair_rollout(policy, ref_model)
    n = len(r.missing_eos)
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=n).astype(np.float32)
    rewards[[1, 6]] = np.nan  # unscorable rows count 0
    eos = ~r.missing_eos
    if method == "nash_md":  # the policy's half, each row with its opponent's score and flag
        p = n // 2
        rows = {k: v[:p] for k, v in rows.items()}
        extra = dict(opponent_rewards=rewards[p:], opponent_contains_eos=eos[p:])
        rewards, eos = rewards[:p], eos[:p]
        kw = {"beta": 0.3, "missing_eos_penalty": 0.5}
    else:
        extra, kw = {}, {"beta": 0.1, "alpha": 0.05, "missing_eos_penalty": 0.5}
    tokens = OS.OnlineBatch(valid=None, advantages=None, rewards=None, contains_eos=None,
                            **jax.tree.map(jnp.asarray, rows))  # fmt: skip
    ref = dense_jit(ref_model, tokens, 1.0)
    zeros = np.zeros(len(rewards), np.float32)
    fields = dict(rows, advantages=zeros, rewards=rewards, contains_eos=eos,
                  ref_logps=np.asarray(ref), **extra)  # fmt: skip
    batch = OS.online_batch(fields, pairs=method == "xpo", accum=2)
    batch = jax.tree.map(jnp.asarray, batch)
    state = S.init_state(policy, optax.sgd(1.0), reference="none", loss=method)
    spec = S.StepSpec(task="online", loss=method, loss_kwargs=kw, temperature=1.0,
                      reference="precomputed")  # fmt: skip

    def direct(params):
        lp = dense_jit(S.model_of(state, params), tokens, 1.0)
        lb = losses.ScoredRolloutBatch(
            logps=lp, mask=tokens.loss_mask, ref_logps=ref, rewards=jnp.asarray(rewards),
            contains_eos=jnp.asarray(eos), **jax.tree.map(jnp.asarray, extra),
        )  # fmt: skip
        return losses.get(method)(lb, **kw).loss

    _, m = check_step(spec, state, batch, jax.jit(direct))
    assert np.isfinite(float(m["loss"]))


# ------------------------------------------------------------------------ the mixture sampler


def mixture_rollout(policy, ref, coef, key=5, **kw):
    ids, mask = prompts()
    return online.rollout(policy, ids, mask, jax.random.key(key), num_generations=2,
                          max_new_tokens=NEW, temperature=T, stop_tokens=STOPS,
                          mixture_with=ref, mixture_coef=coef, **kw)  # fmt: skip


@nnx.jit
def mixed_logits(policy, ref, ids, attention, coef):
    logits = [m.logits(m(ids, attention).last_hidden_state) for m in (policy, ref)]
    return models.mixture_logits(*logits, coef)


@pytest.mark.parametrize("coef", [0.5, 0.2])
def test_mixture_sampler_logps_equal_teacher_forced_mixture(models_, coef):
    policy, ref = models_
    r = mixture_rollout(policy, ref, coef)
    assert 0 < int(r.missing_eos.sum()) < len(r.missing_eos)
    rows = OS.rollout_rows(*map(np.asarray, (r.prompt_ids, r.prompt_mask, r.completion_ids,
                                             r.completion_mask)))  # fmt: skip
    logits = mixed_logits(policy, ref, jnp.asarray(rows["input_ids"]),
                          jnp.asarray(rows["attention_mask"]), coef)  # fmt: skip
    forced = ops.token_logps(logits / T, jnp.asarray(rows["labels"]),
                             jnp.asarray(rows["loss_mask"]))  # fmt: skip
    p = r.prompt_ids.shape[1]
    np.testing.assert_allclose(forced[:, p - 1 : p - 1 + NEW], r.logps, atol=1e-5)
    assert float(jnp.max(jnp.abs(r.logps))) > 1.0  # not trivially 0


def test_mixture_ends_are_the_two_models(models_):
    policy, ref = models_
    ids, mask = prompts()
    kw = dict(num_generations=2, max_new_tokens=NEW, temperature=T, stop_tokens=STOPS)
    for coef, model in ((0.0, policy), (1.0, ref)):
        got = mixture_rollout(policy, ref, coef)
        want = online.rollout(model, ids, mask, jax.random.key(5), **kw)
        np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
        np.testing.assert_allclose(got.logps, want.logps, atol=1e-6)
    other = mixture_rollout(policy, ref, 0.5)
    assert not np.array_equal(other.completion_ids, want.completion_ids)


def test_mixture_samples_the_geometric_mixture(models_):
    policy, ref = models_
    n, coef = 8192, 0.4
    ids = jnp.tile(jnp.asarray([[11, 12, 13]], jnp.int32), (n, 1))
    gen = models.generate_mixture(policy, ref, ids, jnp.ones_like(ids), jax.random.key(9), coef,
                                  max_new_tokens=1, temperature=T)  # fmt: skip
    z = mixed_logits(policy, ref, ids[:1], jnp.ones_like(ids[:1]), coef)[0, -1]
    probs = np.asarray(jax.nn.softmax(z / T))
    tokens = np.asarray(gen.tokens[:, 0])
    freq = np.bincount(tokens, minlength=CFG.vocab_size) / n
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * se + 1e-4), np.max(np.abs(freq - probs) / se)
    # logps_mode="model": the mixture's own log-probs at T = 1
    np.testing.assert_allclose(gen.logps[:, 0], jax.nn.log_softmax(z)[tokens], atol=1e-5)


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, match", [
    (["online.method=xpo", "online.num_generations=4"], r"is 2 for xpo"),
    (["online.method=nash_md", "online.num_generations=2", "online.alpha=0.1"],
     r"`online.alpha`=0.1 means nothing for online.method='nash_md'"),
    (["online.method=xpo", "online.num_generations=2", "online.mixture_coef=0.3"],
     r"`online.mixture_coef`=0.3 means nothing for online.method='xpo'"),
    (["online.method=online_dpo", "online.num_generations=2", "online.alpha=0.1"],
     r"`online.alpha`=0.1 means nothing"),
    (["online.method=nash_md", "online.num_generations=2", "online.mixture_coef=1.5"],
     r"`online.mixture_coef` must be in \[0, 1\]"),
    (["online.method=xpo", "online.num_generations=2", "online.alpha=-1"],
     r"`online.alpha` must be >= 0"),
    (["online.method=nash_md", "online.num_generations=2", "online.loss_type=ipo"],
     r"`online.loss_type` for nash_md must be one of \[None\]"),
    (["online.method=xpo", "online.num_generations=2", "optim.grad_accum=8"],
     r"`optim.grad_accum`=8 must divide the step's prompts"),
])  # fmt: skip
def test_config_errors_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        online_config(tmp_path, *overrides)


def test_defaults_are_trl_snapshot_configs(tmp_path):
    from alignjax.train.online_step import method_kwargs, online_spec

    for method, extra in (("xpo", {"alpha": 1e-5, "loss_type": "sigmoid"}),
                          ("nash_md", {})):  # fmt: skip
        cfg = online_config(tmp_path / method, f"online.method={method}",
                            "online.num_generations=2")  # fmt: skip
        o = cfg.online.resolved()
        assert (o.temperature, o.beta, o.max_new_tokens) == (0.9, 0.1, 6)  # 6: online_config's
        assert o.layout == "halves" and online_spec(cfg).temperature == 1.0
        assert method_kwargs(o) == {"beta": 0.1, "missing_eos_penalty": None, **extra}
        assert o.mixture_coef == (0.5 if method == "nash_md" else None)


# ------------------------------------------------------------------------ whole runs


@pytest.mark.slow  # whole runs: ~20 s each
@pytest.mark.parametrize("method", ["xpo", "nash_md"])
def test_three_steps_log_trl_metrics(tmp_path, method):
    cfg = online_config(
        tmp_path, f"online.method={method}", "online.num_generations=2", "steps=3",
        "log_every=1", "checkpoint.every=3", "optim.learning_rate=1e-2", "optim.warmup_steps=0",
        "optim.schedule=constant", "optim.grad_accum=2", "online.missing_eos_penalty=1.0",
        *(["online.alpha=0.05"] if method == "xpo" else ["online.mixture_coef=0.3"]),
    )  # fmt: skip
    rows, _ = train_rows(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    common = {"train/loss", "train/reward", "train/completions/mean_length", "train/beta",
              "train/objective/entropy", "train/rewards/chosen", "train/rewards/rejected",
              "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen",
              "train/logps/rejected", "train/val/model_contain_eos_token",
              "train/val/ref_contain_eos_token"}  # fmt: skip
    if method == "xpo":
        keys = {"train/loss/dpo", "train/loss/xpo", "train/objective/kl", "train/alpha",
                "train/objective/model_scores", "train/objective/ref_scores",
                "train/objective/scores_margin"}  # fmt: skip
        assert common | keys <= set(first), sorted(set(first))
        assert abs(first["train/objective/kl"]) < 1e-4  # policy = reference at step 1
        assert abs(first["train/rewards/margins"]) < 1e-5
        np.testing.assert_allclose(first["train/loss/dpo"], np.log(2), rtol=1e-5)
        np.testing.assert_allclose(
            first["train/loss"], first["train/loss/dpo"] + first["train/loss/xpo"], rtol=1e-5
        )
        assert first["train/alpha"] == pytest.approx(0.05) and first["train/loss/xpo"] < 0
    else:
        keys = {"train/loss/score", "train/loss/kl", "train/rewards/probabilities",
                "train/mixture_coef"}  # fmt: skip
        assert common | keys <= set(first), sorted(set(first))
        assert abs(first["train/loss/kl"]) < 1e-4
        np.testing.assert_allclose(first["train/loss"], -first["train/loss/score"], atol=1e-5)
        assert first["train/mixture_coef"] == pytest.approx(0.3)
    assert all(np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in rows)


@pytest.mark.slow  # whole runs on 1 and 8 devices
@pytest.mark.parametrize("method, layout", [("xpo", "pmap8"), ("nash_md", "data8"),
                                            ("nash_md", "pmap8")])  # fmt: skip
def test_same_losses_and_parameters_as_one_device(tmp_path, method, layout):
    """As test_train_online's: the same pairs are sampled on 8 devices (the mesh's sampler, or
    pmap's first replica), and losses / parameters match the 1-device run to 1e-5."""
    assert jax.device_count() == 8

    def run(name, devices):
        cfg = online_config(
            tmp_path / name, f"online.method={method}", "online.num_generations=2",
            "data.batch_size=16", "steps=3", "log_every=1", "checkpoint.every=3",
            "checkpoint.asynchronous=false", "optim.name=sgd", "optim.learning_rate=0.2",
            "optim.warmup_steps=0", "optim.schedule=constant", *devices,
        )  # fmt: skip
        return train_rows(cfg)

    rows, state = run("many", LAYOUTS[layout])
    ref_rows, ref_state = run("one", LAYOUTS["one_device"])
    for r, q in zip(rows, ref_rows, strict=True):
        assert r["train/reward"] == q["train/reward"]
        assert r["train/rewards/rejected"] == pytest.approx(q["train/rewards/rejected"], abs=1e-6)
        np.testing.assert_allclose(r["train/loss"], q["train/loss"], rtol=1e-5, atol=1e-6)
    got, want = jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])
    assert len(got) == len(want) > 10
    for p, q in zip(got, want, strict=True):
        assert np.max(np.abs(np.asarray(p) - q)) <= 1e-5 * np.max(np.abs(q))
