"""The trainer as composable parts: a loss registered here (outside alignjax/) with its needs
trains through `alignjax train`; registries validate config choices; parameter groups, decay
masks, AdaLoRA's rank allocation, relative run directories and the default evaluation split."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import cli, data, losses, models
from alignjax.losses.types import LossOutput, LossTerm, check_beta
from alignjax.optim import path_string
from alignjax.train import builders, metrics, trainer
from alignjax.train import config as C
from alignjax.train import step as S


def kl_penalised_dpo(batch, *, beta=0.1, kl_weight=0.5):
    """DPO's sigmoid loss plus `kl_weight` x the token-mean KL(ref || policy) of both sides
    (registered for the whole test session, so it meets the registry tests' contract too)."""
    check_beta(beta)

    def summed(x, mask):
        return jnp.sum(jnp.where(mask != 0, x, 0.0), axis=-1)

    cw = summed(batch.chosen_logps - batch.ref_chosen_logps, batch.chosen_mask)
    rw = summed(batch.rejected_logps - batch.ref_rejected_logps, batch.rejected_mask)
    per_example = -jax.nn.log_sigmoid(beta * (cw - rw))
    kl = summed(batch.chosen_kl, batch.chosen_mask) + summed(batch.rejected_kl, batch.rejected_mask)
    tokens = jnp.sum(batch.chosen_mask != 0) + jnp.sum(batch.rejected_mask != 0)
    n = jnp.asarray(per_example.shape[0], jnp.float32)
    return LossOutput(
        terms={
            "dpo": LossTerm(jnp.sum(per_example), n),
            "kl": LossTerm(jnp.sum(kl), tokens.astype(jnp.float32), kl_weight),
        },
        losses=per_example,
        chosen_rewards=jax.lax.stop_gradient(beta * cw),
        rejected_rewards=jax.lax.stop_gradient(beta * rw),
        metrics={"kl/mean": jax.lax.stop_gradient(jnp.sum(kl) / jnp.maximum(tokens, 1))},
    )


losses.register("test_kl_dpo", kl_penalised_dpo, needs=losses.LossNeeds(kl=True), overwrite=True)

TINY_RUN = ["model.preset=tiny", "data.max_length=64", "data.batch_size=4", "data.eval=null",
            "eval_samples=0", "plot=false", "checkpoint.export_hf=false", "mesh.devices=1",
            "log_every=1", "optim.warmup_steps=0", "optim.schedule=constant"]  # fmt: skip


def _dense_kl_dpo(policy, ref, batch, beta, kl_weight):
    """The loss above from materialised float64 logits of both models."""

    def token_logps(model):
        out = model(**jax.tree.map(jnp.asarray, batch).model_inputs())
        logits = np.asarray(out.last_hidden_state @ model.unembed(), np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    lp, lr = token_logps(policy), token_logps(ref)
    labels, mask = np.asarray(batch.labels), np.asarray(batch.loss_mask) != 0
    gather = lambda x: np.take_along_axis(x, labels[..., None], -1)[..., 0]  # noqa: E731
    delta = np.where(mask, gather(lp) - gather(lr), 0.0).sum(-1)
    kl = np.where(mask, (np.exp(lr) * (lr - lp)).sum(-1), 0.0)
    b = batch.valid.shape[0]
    per_example = np.logaddexp(0.0, -beta * (delta[:b] - delta[b:]))
    return per_example.mean() + kl_weight * kl.sum() / mask.sum(), kl.sum() / mask.sum()


@pytest.mark.slow
def test_user_loss_with_kl_trains_through_the_cli_in_a_relative_run_dir(tmp_path, monkeypatch):
    """Registered in this file with LossNeeds(kl=True): the step supplies the per-token KL, the
    logged loss at step 2 equals a dense float64 recomputation from the restored step-1 policy
    and the frozen reference (float32 fused LM head vs float64 dense: 1e-5 relative), and the
    relative out_dir checkpoints and resumes."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "--no-progress", "out_dir=runs/kl", "loss.name=test_kl_dpo",
            "loss.kwargs={kl_weight: 0.5}", "optim.name=sgd", "optim.b1=0.0",
            "optim.learning_rate=0.5", "optim.clip_norm=null", "checkpoint.every=1",
            "checkpoint.keep=3", *TINY_RUN]  # fmt: skip
    assert cli.main([*args, "steps=2"]) == 0
    assert cli.main([*args, "steps=3"]) == 0  # resumes from step 2
    rows = metrics.read_jsonl(tmp_path / "runs/kl/metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert sorted(int(p.name) for p in (tmp_path / "runs/kl/checkpoints").iterdir()) == [1, 2, 3]

    run = trainer.open_run("runs/kl", step=1)
    cfg = C.load_config(tmp_path / "runs/kl/config.yaml")
    batches = trainer.train_loader(trainer.setup(cfg)).epoch(0)
    next(batches)
    _, batch = next(batches)  # the batch of step 2
    policy = run.policy()
    ref = S.model_of(run.host_state(), run.host_state().ref)
    want, want_kl = _dense_kl_dpo(policy, ref, batch, beta=0.1, kl_weight=0.5)
    step2 = next(r for r in rows if r["step"] == 2)
    assert want_kl > 1e-4  # one update moved the policy: the KL term is live
    assert step2["train/kl/mean"] == pytest.approx(want_kl, rel=1e-4)
    assert step2["train/loss"] == pytest.approx(want, rel=1e-5)


def test_loss_needs_are_read_from_the_registry():
    assert losses.needs_of("tdpo2").kl and not losses.needs_of("sigmoid").kl
    assert losses.needs_of("sparsepo").masks.reads == "hidden_states"
    assert losses.needs_of("mapo").masks.reads == "activations"
    assert losses.needs_of("bco").state is losses.BCO_MOMENTS
    assert not losses.needs_of("simpo").reference
    combined = losses.combine([("test_kl_dpo", 1.0), ("sft", 1.0)])
    assert losses.needs_of(combined).kl and losses.needs_of(combined).tasks == ("paired",)
    assert S.StepSpec(loss="test_kl_dpo").needs.kl
    with pytest.raises(ValueError, match="unpaired"):
        S.StepSpec(task="paired", loss="kto")
    with pytest.raises(ValueError, match="per-token KL"):
        S.StepSpec(loss="test_kl_dpo", reference="precomputed")
    with pytest.raises(ValueError, match="reference-free"):
        S.StepSpec(loss="sigmoid", reference="none")
    with pytest.raises(ValueError, match="do not apply"):
        S.StepSpec(loss="sigmoid", independent_masks=True)
    with pytest.raises(ValueError, match="SparsePOMasks"):
        S.StepSpec(loss="sparsepo", mask_options={"nope": 1})
    spec = S.StepSpec(loss="sparsepo", independent_masks=True)
    assert spec.head_names == ("reward", "kl") and spec.masks.mask_names == (
        "reward_mask",
        "kl_mask",
    )


def test_config_choices_are_validated_against_the_registries():
    bad = ["optim.name=lamb2", "optim.schedule=step", "model.preset=huge", "peft.method=ia3",
           "loss.name=dpo_typo"]  # fmt: skip
    for override in bad:
        key = override.split("=")[0]
        with pytest.raises(ValueError, match=f"`{key}` must be one of"):
            C.load_config(None, [override])
    builders.register_optimizer(
        "test_plain_sgd", lambda o, lr, wd, mask: optax.sgd(lr), overwrite=True
    )
    cfg = C.load_config(None, ["optim.name=test_plain_sgd", "optim.learning_rate=0.25",
                               "optim.warmup_steps=0", "optim.schedule=constant",
                               "optim.clip_norm=null"])  # fmt: skip
    tx, _ = builders.build_optimizer(cfg)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 2.0)}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], -0.5)  # plain SGD: -lr g, no momentum or decay
    with pytest.raises(ValueError, match="frozen group"):
        C.load_config(None, ["optim.groups=[{match: x, frozen: true, learning_rate: 0.1}]"])
    with pytest.raises(ValueError, match="label"):
        C.load_config(None, ["optim.groups=[{label: norms}]"])


@pytest.mark.parametrize("name", ["adamw", "adamp", "sgdp", "sgd"])
def test_weight_decay_skips_norms_and_biases(name):
    """Zero gradients, so only decay moves anything: every RMSNorm scale stays bitwise, every
    kernel shrinks."""
    cfg = C.load_config(None, [f"optim.name={name}", "optim.weight_decay=0.1",
                               "optim.learning_rate=0.1", "optim.warmup_steps=0",
                               "optim.schedule=constant", "optim.clip_norm=null"])  # fmt: skip
    tx, _ = builders.build_optimizer(cfg)
    model = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=8,
                                    intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2), rngs=nnx.Rngs(0))  # fmt: skip
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    moved = dict((path_string(k), v) for k, v in jax.tree_util.tree_flatten_with_path(new)[0])
    norms = [k for k, _ in flat if "norm" in path_string(k)]
    assert len(norms) == 3
    for k, v in flat:
        p = path_string(k)
        if "norm" in p:
            np.testing.assert_array_equal(moved[p], v, err_msg=p)
        elif name == "adamw":  # zero Adam direction: p - lr wd p, one float32 rounding each
            np.testing.assert_allclose(moved[p], np.asarray(v) * (1 - 0.1 * 0.1), rtol=1e-6)
        else:
            assert np.max(np.abs(np.asarray(moved[p]) - np.asarray(v))) > 0, p


def _leaves(params):
    return {
        path_string(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }


@pytest.mark.slow
def test_parameter_groups_at_lr_zero_and_frozen_stay_bitwise(tmp_path):
    groups = "optim.groups=[{match: 'layers/0/', learning_rate: 0.0}, {match: embed, frozen: true}]"
    cfg = C.load_config(None, [f"out_dir={tmp_path / 'g'}", "steps=3", groups,
                               "optim.weight_decay=0.1", *TINY_RUN])  # fmt: skip
    trainer.train(cfg, progress=False)
    run = trainer.open_run(tmp_path / "g")
    before, after = _leaves(run.initial_state.params), _leaves(run.host_state().params)
    fixed = [p for p in before if "layers/0/" in p or "embed" in p]
    trained = [p for p in before if p not in fixed]
    assert fixed and trained
    for p in fixed:
        np.testing.assert_array_equal(after[p], before[p], err_msg=p)
    assert all(np.any(after[p] != before[p]) for p in trained if "norm" not in p)


@pytest.mark.slow
def test_adalora_allocates_rank_through_the_trainer(tmp_path):
    """4 x 2 attention projections at init_r 4: the budget falls from 32 to target_r x 8 = 16,
    the orthogonal penalty is in the loss, and the exported adapter carries the rank pattern."""
    out = tmp_path / "ada"
    cfg = C.load_config(None, [f"out_dir={out}", "steps=8", "peft.method=adalora", "peft.r=4",
                               "peft.alpha=8", "peft.kwargs={target_r: 2, tinit: 1, tfinal: 2}",
                               "reference.mode=adapters_disabled", "optim.learning_rate=0.02",
                               *TINY_RUN, "checkpoint.export_hf=true"])  # fmt: skip
    trainer.train(cfg, progress=False)
    rows = [r for r in metrics.read_jsonl(out / "metrics.jsonl") if "peft/rank_total" in r]
    ranks = [r["peft/rank_total"] for r in rows]
    assert ranks[0] == 32 and ranks[-1] == 16 and len(set(ranks)) >= 3
    train_rows = [r for r in metrics.read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert all(r["train/regularizer"] > 0 for r in train_rows)
    config = json.loads((out / "export/adapter/adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert len(pattern) == 8 and sum(sum(v) for v in pattern.values()) == 16
    assert config["target_r"] == 2 and config["total_step"] == 8


def test_eval_defaults_to_a_held_out_slice_of_the_users_data(tmp_path, caplog):
    rows = [data.shipped_dataset("train")[i] for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = C.load_config(None, [f"data.train={path}", "data.max_length=64"])
    tok = data.shipped_tokenizer()
    from alignjax.train.data import load_data

    with caplog.at_level("WARNING"):
        train, held = load_data(cfg, tok)
    assert len(held) == 2 and len(train) == 38
    assert not set(train.dataset["row"]) & set(held.dataset["row"])
    assert "held out of training" in caplog.text
    shipped_train, shipped_test = load_data(C.load_config(None, ["data.max_length=64"]), tok)
    assert len(shipped_test) == 200 and len(shipped_train) == 1000
    assert load_data(C.load_config(None, [f"data.train={path}", "data.eval=null"]), tok)[1] is None


def test_group_labels_select_heads_adapters_and_vectors():
    """SparsePO's mask heads in their own group: frozen heads get zero updates, the policy its
    own; "1d" and regex groups label the leaves they name, the rest stays "default"."""
    params = {
        "policy": {"layers": {"0": {"kernel": jnp.ones((2, 2)), "norm": jnp.ones(2)}}},
        "heads": {"reward": {"proj": jnp.ones((2, 1))}},
    }
    groups = (C.ParamGroup(label="heads", frozen=True), C.ParamGroup(label="1d"),
              C.ParamGroup(match="kernel$", learning_rate=0.5))  # fmt: skip
    labels = builders.group_labels(groups)(params)
    assert labels == {"policy": {"layers": {"0": {"kernel": "group2", "norm": "group1"}}},
                      "heads": {"reward": {"proj": "group0"}}}  # fmt: skip
    cfg = C.load_config(None, ["optim.name=sgd", "optim.b1=0.0", "optim.learning_rate=0.1",
                               "optim.warmup_steps=0", "optim.schedule=constant",
                               "optim.clip_norm=null"])  # fmt: skip
    import dataclasses

    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, groups=groups))
    tx, _ = builders.build_optimizer(cfg)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["heads"]["reward"]["proj"], 0.0)
    np.testing.assert_allclose(updates["policy"]["layers"]["0"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["policy"]["layers"]["0"]["norm"], -0.1)


def test_imports_register_user_parts_before_the_config_is_checked(tmp_path, monkeypatch):
    """A plugin file named in `imports` (relative: made absolute, so `alignjax eval` finds it
    again from another directory) registers a loss and a preset the config may then name."""
    plugin = tmp_path / "my_parts.py"
    plugin.write_text(
        "from alignjax import losses\n"
        "from alignjax.train import builders\n"
        "losses.register('plugin_sigmoid', losses.get('sigmoid'), overwrite=True)\n"
        "builders.register_preset('plugin_tiny', overwrite=True, hidden_size=32,\n"
        "    intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)\n"
    )
    with pytest.raises(ValueError, match="`loss.name` must be one of"):
        C.load_config(None, ["loss.name=plugin_sigmoid_missing"])
    monkeypatch.chdir(tmp_path)
    cfg = C.load_config(None, ["imports=[my_parts.py]", "loss.name=plugin_sigmoid",
                               "model.preset=plugin_tiny"])  # fmt: skip
    assert cfg.imports == (str(plugin),)
    assert C.from_dict(C.TrainConfig, C.to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="imports"):
        C.load_config(None, ["imports=[no_such_module_here]"])


def test_reference_free_losses_skip_the_reference_forward():
    """SimPO with the default frozen reference: no reference forward in the step (the loss
    does not read it), so its token stats carry no reference log-probs."""
    model = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=8,
                                    intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2), rngs=nnx.Rngs(0))  # fmt: skip
    state = S.init_state(model, optax.sgd(0.1))
    ids = jnp.arange(2 * 6).reshape(2, 6) % 32
    batch = data.Batch(input_ids=ids, attention_mask=jnp.ones_like(ids),
                       positions=jnp.broadcast_to(jnp.arange(6), (2, 6)),
                       labels=jnp.roll(ids, -1, axis=1), loss_mask=jnp.ones_like(ids),
                       valid=jnp.ones((1,), jnp.int32),
                       rows=jnp.zeros((1,), jnp.int32))  # fmt: skip
    simpo = S.token_stats(S.StepSpec(loss="simpo"), state, state.params, batch)
    dpo = S.token_stats(S.StepSpec(loss="sigmoid"), state, state.params, batch)
    assert simpo.ref_logps is None and dpo.ref_logps is not None
    np.testing.assert_array_equal(simpo.logps, dpo.logps)


def test_dataset_scores_reach_a_user_loss():
    """UltraFeedback's score_chosen / score_rejected columns travel from the rows through the
    batch into the loss (`PreferenceBatch.score_chosen` / `score_rejected`): a user loss that
    weights DPO's per-pair losses by the score gap gives, through the step's token stats, the
    weighted mean computed here from the same per-pair losses."""
    import datasets

    from alignjax import losses

    def gap_weighted(batch, *, beta=0.1):
        out = losses.get("sigmoid")(batch, beta=beta)
        w = batch.score_chosen - batch.score_rejected
        total = jnp.sum(w * out.losses)
        n = jnp.asarray(out.losses.shape[0], jnp.float32)
        return losses.LossOutput(terms={"loss": losses.LossTerm(total, n)}, losses=w * out.losses,
                                 chosen_rewards=out.chosen_rewards,
                                 rejected_rewards=out.rejected_rewards, metrics={})  # fmt: skip

    u = {"role": "user", "content": "how was the soup?"}
    rows = [
            {"prompt": u["content"], "chosen": [u, {"role": "assistant", "content": c}],
             "rejected": [u, {"role": "assistant", "content": r}],
             "score_chosen": sc, "score_rejected": sr}
            for c, r, sc, sr in (("great", "cold", 9.0, 2.0), ("fine", "bad", 5.0, 4.5))
            ]  # fmt: skip
    tok = data.shipped_tokenizer()
    tokenized = data.tokenize_dataset(datasets.Dataset.from_list(rows), tok)
    batch = data.collate([tokenized[0], tokenized[1]], 32, pad_id=tokenized.pad_id)
    np.testing.assert_array_equal(batch.score_chosen, [9.0, 5.0])
    np.testing.assert_array_equal(batch.score_rejected, [2.0, 4.5])
    arch = models.LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    state = S.init_state(models.LlamaForCausalLM(arch, rngs=nnx.Rngs(0)), optax.sgd(0.1),
                         reference="frozen")  # fmt: skip
    spec = S.StepSpec(loss=gap_weighted)
    batch = jax.tree.map(jnp.asarray, batch)
    moved = jax.tree.map(lambda p: p * 1.5, state.params)  # policy != reference
    stats = jax.jit(lambda *a: S.token_stats(spec, *a))(state, moved, batch)
    pb = S.loss_batch(spec, batch, stats.logps, stats.mask, stats.ref_logps)
    got = gap_weighted(pb).loss
    per_pair = losses.get("sigmoid")(pb).losses
    assert abs(float(per_pair[0] - per_pair[1])) > 1e-4
    np.testing.assert_allclose(got, (7.0 * per_pair[0] + 0.5 * per_pair[1]) / 2, rtol=1e-6)
