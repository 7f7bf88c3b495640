"""Unpaired (KTO with its mismatched KL rows; BCO with its running reward moments) and SPPO
(win-probability) batches through the same step builder as DPO: the step's loss and gradient
equal the registered loss evaluated on log-probs computed independently (dense logits of every
row, `ops.token_logps`, the batch split by hand), and the trainer runs these tasks end to end.

Tolerances: loss 1e-5 relative, gradients 1e-5 relative to each leaf's largest entry, floored
at 1e-2 of the largest entry overall (the step uses the fused LM-head kernel, the reference
dense log-softmax: float32 rounding differs). The losses read float32 sequence log-probs,
sums of <= 64 per-token values which the step and the reference (two programs) round
differently (per token up to 3 ulps, sums 1 ulp apart on 4 of 32 rows, measured); one ulp
(<= 2^-16 at |s| < 256) on every sum moves L by up to sum_i |dL/ds_i| ulp(s_i), relative
7.0e-6 for SPPO (dL/da = (a - (P - 1/2)/beta) / n, |a - (P - 1/2)/beta| up to 14 at beta 0.1),
3.9e-6 sigmoid, 2.1e-6 BCO, 1.5e-6 KTO: 1e-6 was below that (SPPO measured at 6.0e-7).
"""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import data, losses, models, ops
from alignjax.train import config as C
from alignjax.train import metrics, trainer
from alignjax.train import step as S

datasets.disable_progress_bars()

CFG = models.LlamaConfig(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def pairs(n=8):
    return data.shipped_dataset("train").select(range(n)).to_list()


def unpaired_rows(n=8):
    out = []
    for r in pairs(n):
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def sppo_rows(n=8):
    out = []
    for r in pairs(n):
        p = 1 / (1 + np.exp(-(r["chosen_score"] - r["rejected_score"])))
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                    "chosen_win_prob": float(p), "rejected_win_prob": float(1 - p)})  # fmt: skip
    return out


def first_batch(rows, kto_kl=False):
    tok = data.shipped_tokenizer()
    tokenized = data.tokenize_dataset(
        datasets.Dataset.from_list(rows), tok, config=data.TokenizeConfig(max_length=64)
    )
    cfg = data.LoaderConfig(batch_size=8, buckets=(64,), shuffle=False, kto_kl=kto_kl)
    _, batch = next(data.DataLoader(tokenized, cfg).epoch(0))
    return jax.tree.map(jnp.asarray, batch)


def state_with_other_reference(loss, heads=None):
    """Policy and reference differ (another init), so rewards are not all zero."""
    state = S.init_state(
        models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), optax.sgd(1.0), loss=loss, heads=heads
    )
    other = nnx.state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(1)), nnx.Param)
    return state.replace(ref=other)


def dense_logps(state, params, batch):
    model = S.model_of(state, params)
    logits = model.logits(model(**batch.model_inputs()).last_hidden_state)
    return ops.token_logps(logits, batch.labels, batch.loss_mask)


def dense_pair_stats(state, params, batch, **ref_outputs):
    """Policy and reference log-probs and KL(ref || policy) from dense logits, plus the
    reference's model output (with the hidden states / activations asked for)."""
    policy, ref = S.model_of(state, params), S.model_of(state, state.ref)
    inputs = batch.model_inputs()
    logits = policy.logits(policy(**inputs).last_hidden_state)
    ref_out = ref(**inputs, **ref_outputs)
    ref_logits = jax.lax.stop_gradient(ref.logits(ref_out.last_hidden_state))
    m = batch.loss_mask
    lp = ops.token_logps(logits, batch.labels, m)
    rl = ops.token_logps(ref_logits, batch.labels, m)
    return lp, rl, ops.token_kl(logits, ref_logits, m), ref_out


def check_step(spec, state, batch, direct):
    """The step's reported loss and its SGD(lr=1) update against `direct(params)`."""
    want_loss, want_grad = jax.value_and_grad(direct)(state.params)
    before = jax.tree.map(np.asarray, state.params)
    new, m = S.build_step(spec, optax.sgd(1.0), donate=False)(state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-5)  # module doc
    got_grad = jax.tree.map(lambda a, b: a - np.asarray(b), before, new.params)
    largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want_grad))
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got_grad), jax.tree.leaves(want_grad), strict=True
    ):
        # Relative to the leaf's largest entry, floored at 1e-2 of the largest gradient entry
        # overall: a leaf whose gradient is a sum of cancelling terms 1e3x smaller than the rest
        # (a mask head's LayerNorm bias: 1e-4 against 0.3) carries float32 rounding of the
        # terms' size (observed 1.5e-8 absolute there, 5e-8 of the largest entry).
        scale = max(float(np.max(np.abs(w))), 1e-2 * largest)
        err = float(np.max(np.abs(g - np.asarray(w)))) / scale
        assert err < 1e-5, (jax.tree_util.keystr(path), err)
    return new, m


def test_kto_with_mismatched_rows_matches_the_loss_on_dense_logps():
    batch = first_batch(unpaired_rows(), kto_kl=True)
    n = batch.valid.shape[0]
    assert batch.input_ids.shape[0] == 2 * n  # [matched; mismatched]
    state = state_with_other_reference("kto")

    def direct(params):
        lp = dense_logps(state, params, batch)
        rl = jax.lax.stop_gradient(dense_logps(state, state.ref, batch))
        m = batch.loss_mask
        ub = losses.UnpairedBatch(logps=lp[:n], mask=m[:n], labels=batch.label,
                                  ref_logps=rl[:n], kl_logps=lp[n:], kl_mask=m[n:],
                                  ref_kl_logps=rl[n:])  # fmt: skip
        return losses.get("kto")(ub, beta=0.1).loss

    spec = S.StepSpec(task="unpaired", loss="kto", loss_kwargs={"beta": 0.1}, kto_kl=True)
    check_step(spec, state, batch, jax.jit(direct))


def test_bco_carries_trl_running_moments():
    batch = first_batch(unpaired_rows())
    n = batch.valid.shape[0]
    state = state_with_other_reference("bco")
    assert float(state.loss_state.count) == pytest.approx(1e-24)

    def unpaired(params):
        lp = dense_logps(state, params, batch)
        rl = jax.lax.stop_gradient(dense_logps(state, state.ref, batch))
        return losses.UnpairedBatch(logps=lp[:n], mask=batch.loss_mask[:n], labels=batch.label,
                                    ref_logps=rl[:n])  # fmt: skip

    moments = losses.update_reward_moments(
        state.loss_state, losses.bco_rewards(jax.jit(unpaired)(state.params), 0.1)
    )

    def direct(params):
        return losses.get("bco")(unpaired(params), beta=0.1, delta=moments.mean).loss

    spec = S.StepSpec(task="unpaired", loss="bco", loss_kwargs={"beta": 0.1})
    new, _ = check_step(spec, state, batch, jax.jit(direct))
    # The batch mean of rewards beta (s_i - s_ref_i) of float32 sequence sums (module doc): one
    # ulp (<= 2^-16) on each sum moves it by <= 2 beta 2^-16 = 3.1e-6 for any n, which is 1.2e-5
    # of |mean| = 0.25 here as the rewards cancel (measured 3.6e-7 at -O0, 3.0e-6 at -O3).
    np.testing.assert_allclose(new.loss_state.mean, moments.mean, rtol=1e-6, atol=2 * 0.1 * 2**-16)
    assert float(new.loss_state.count) == pytest.approx(n)
    assert abs(float(moments.mean)) > 1e-3  # a non-trivial delta was exercised


@pytest.mark.parametrize("loss", ["sppo", "sigmoid"])
def test_sppo_batches_match_the_loss_on_dense_logps(loss):
    batch = first_batch(sppo_rows())
    assert batch.chosen_win_prob is not None
    state = state_with_other_reference(loss)
    kw = {"beta": 0.1}

    def direct(params):
        lp = dense_logps(state, params, batch)
        rl = jax.lax.stop_gradient(dense_logps(state, state.ref, batch))
        pb = losses.PreferenceBatch.from_stacked(
            lp, batch.loss_mask, rl, chosen_win_prob=batch.chosen_win_prob,
            rejected_win_prob=batch.rejected_win_prob,
        )  # fmt: skip
        return losses.get(loss)(pb, **kw).loss

    spec = S.StepSpec(task="paired", loss=loss, loss_kwargs=kw)
    check_step(spec, state, batch, jax.jit(direct))


@pytest.mark.slow  # whole runs through the trainer
@pytest.mark.parametrize(
    "rows, overrides",
    [
        (unpaired_rows(24), ["task=unpaired", "loss.name=kto"]),
        (unpaired_rows(24), ["task=unpaired", "loss.name=bco", "reference.mode=precomputed"]),
        (sppo_rows(24), ["task=paired", "loss.name=sppo", "loss.beta=0.1"]),
    ],
    ids=["kto", "bco_precomputed", "sppo"],
)
def test_trainer_runs_unpaired_and_sppo(tmp_path, rows, overrides):
    path = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(path))
    cfg = C.load_config(None, [
        f"out_dir={tmp_path / 'run'}", "steps=3", f"data.train={path}", f"data.eval={path}",
        "data.batch_size=8", "data.eval_batch_size=16", "data.max_length=64",
        "data.buckets=[64]", "log_every=1", "eval_every=0", "eval_samples=0", "plot=false",
        "checkpoint.export_hf=false", "mesh.devices=1", *overrides,
    ])  # fmt: skip
    summary = trainer.train(cfg, progress=False)
    rows_logged = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses_logged = [r["train/loss"] for r in rows_logged if "train/loss" in r]
    assert len(losses_logged) == 3 and np.all(np.isfinite(losses_logged))
    ev = summary["eval"]
    assert ev["examples"] == len(rows) and np.isfinite(ev["loss"])
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(ev)


# -- token-mask losses: SparsePO's learned heads and MaPO's activation masks -------------------


def paired_rows(n=8):
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs(n)]


@pytest.mark.parametrize("independent", [False, True], ids=["common", "independent"])
def test_sparsepo_trains_its_mask_heads_like_the_loss(independent):
    """SparsePO through the step: the heads see the reference's layer outputs (embeddings
    excluded, no gradient), and the loss / gradients of the policy and of the heads equal the
    loss written out by hand on dense log-probs and KL."""
    from alignjax.losses.sparse_mask import SparseMaskHead

    batch = first_batch(paired_rows())
    names = ("reward", "kl") if independent else ("reward",)
    # Seeds whose one-layer mixer weight is positive: with a negative one ReLU zeroes the whole
    # mask from the start and the head never trains (the official head behaves the same).
    heads = {n: SparseMaskHead(CFG.num_hidden_layers, CFG.hidden_size, dropout=0.0,
                               rngs=nnx.Rngs(seed)) for n, seed in zip(names, (5, 9))}  # fmt: skip
    state = state_with_other_reference(None, heads=heads)
    kw = {"beta": 0.5, "l1_reward": 1e-3}

    def direct(params):
        lp, rl, kl, ref_out = dense_pair_stats(state, params, batch, output_hidden_states=True)
        m = batch.loss_mask
        hidden = jax.lax.stop_gradient(jnp.stack(ref_out.hidden_states[1:]))
        hd = S.heads_of(state, params)
        masks = {"reward_mask": hd.reward(hidden)}
        if independent:
            masks["kl_mask"] = hd.kl(hidden)
        pb = losses.PreferenceBatch.from_stacked(lp, m, rl, kl=kl, **masks)
        return losses.get("sparsepo")(pb, **kw).loss

    spec = S.StepSpec(loss="sparsepo", loss_kwargs=kw, independent_masks=independent)
    new, m = check_step(spec, state, batch, jax.jit(direct))
    for name in names:  # every head trains (none is dead: ReLU can zero a whole head)
        diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                            state.params["heads"][name], new.params["heads"][name])  # fmt: skip
        assert max(jax.tree.leaves(diff)) > 1e-4, name
    assert 0.0 <= float(m["mask/sparsity"]) <= 1.0


def test_mapo_reads_the_reference_activations():
    batch = first_batch(paired_rows())
    state = state_with_other_reference(None)
    kw = {"beta": 0.5}

    def direct(params):
        lp, rl, kl, ref_out = dense_pair_stats(state, params, batch, output_activations=True)
        m = batch.loss_mask
        acts = jax.lax.stop_gradient(ref_out.activations)
        groups = {g: [a[g] for a in acts] for g in ("mlp", "attn", "resid")}
        mask = ops.mapo_activation_mask(groups, m)
        pb = losses.PreferenceBatch.from_stacked(lp, m, rl, kl=kl, reward_mask=mask)
        return losses.get("mapo")(pb, **kw).loss

    check_step(S.StepSpec(loss="mapo", loss_kwargs=kw), state, batch, jax.jit(direct))


def test_token_mask_losses_need_the_reference_in_the_step():
    for loss in ("sparsepo", "mapo", "tdpo2"):
        with pytest.raises(ValueError, match="reference must run in the step"):
            S.StepSpec(loss=loss, reference="precomputed")
    state = S.init_state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), optax.sgd(1.0))
    step = S.build_step(S.StepSpec(loss="sparsepo"), optax.sgd(1.0), donate=False)
    with pytest.raises(ValueError, match="no heads"):
        step(state, first_batch(paired_rows()))


@pytest.mark.slow  # whole runs through the trainer
@pytest.mark.parametrize(
    "overrides",
    [["loss.name=sparsepo", "loss.independent_masks=true", "peft.method=lora",
      "reference.mode=adapters_disabled"],
     ["loss.name=mapo"]],
    ids=["sparsepo_indp_lora", "mapo"],
)  # fmt: skip
def test_trainer_runs_token_mask_losses(tmp_path, overrides):
    path = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list(paired_rows(16)).to_json(str(path))
    cfg = C.load_config(None, [
        f"out_dir={tmp_path / 'run'}", "steps=2", f"data.train={path}", "data.eval=null",
        "data.batch_size=8", "data.max_length=64", "data.buckets=[64]", "log_every=1",
        "eval_samples=0", "plot=false", "mesh.devices=1", *overrides,
    ])  # fmt: skip
    summary = trainer.train(cfg, progress=False)
    rows = [r for r in metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
    assert (tmp_path / "run" / "export" / "merged" / "model.safetensors").is_file()
    assert summary["skipped"] == 0
