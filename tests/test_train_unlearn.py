"""Task unlearn through the trainer's parts: the `[forget; retain]` loader, the step for every
unlearning loss against the registered loss on independently computed log-probs, WAGLE's score
pass against direct gradients, 1 vs 8 devices, the masked optimizer, and config errors.

Tolerances: the step against dense log-probs as tests/test_train_tasks.py derives them (loss
1e-5 relative; gradients 1e-5 of each leaf's largest entry): the step uses the fused LM-head
kernel, the reference a dense log-softmax, so float32 rounding differs. The score pass against
`jax.grad` of the dense NLL: 1e-5 of each leaf's largest entry (the same two kernels). 1 vs 8
devices: 1e-5 relative, the float32 reduction order of batch sums split over devices (as
tests/test_train_parallel.py).
"""

import dataclasses
import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_tasks import CFG, check_step, dense_pair_stats

from alignjax import data, losses, models, ops
from alignjax.optim import importance as I
from alignjax.train import config as C
from alignjax.train import importance as TI
from alignjax.train import sharding as SH
from alignjax.train import step as S
from alignjax.train.placement import MeshPlacement

datasets.disable_progress_bars()


def texts(start, n):
    return data.shipped_dataset("sft").select(range(start, start + n)).to_list()


def tokenized(rows):
    return data.tokenize_dataset(datasets.Dataset.from_list(rows), data.shipped_tokenizer(),
                                 config=data.TokenizeConfig(max_length=48))  # fmt: skip


@pytest.fixture(scope="module")
def sets():
    return tokenized(texts(0, 10)), tokenized(texts(10, 6))


def loader(sets, batch_size=2, **kw):
    config = data.LoaderConfig(batch_size=batch_size, buckets=(48,), **kw)
    return data.UnlearnLoader(*sets, config)


def ids_of(batch, rows):
    """The token ids of batch rows (real tokens only)."""
    return [tuple(np.asarray(batch.input_ids[r])[np.asarray(batch.attention_mask[r]) == 1])
            for r in rows]  # fmt: skip


def test_loader_pairs_each_forget_batch_with_the_next_retain_batch(sets):
    forget, retain = sets
    ld = loader(sets)
    assert len(ld) == 5  # 10 forget rows / 2; the retain set (6 rows) is 3 batches an epoch
    f_ids = {tuple(r["input_ids"]) for r in forget.dataset}
    r_ids = [tuple(r["input_ids"]) for r in retain.dataset]
    seen_f, seen_r = [], []
    for epoch in range(2):
        for _, b in ld.epoch(epoch):
            assert b.input_ids.shape == (4, 48) and b.valid.tolist() == [1, 1]
            seen_f += ids_of(b, [0, 1])
            seen_r += ids_of(b, [2, 3])
            assert np.all(b.loss_mask.sum(axis=1) > 0)
    assert set(seen_f) == f_ids and len(seen_f) == 20  # each forget row once per epoch
    # 10 steps = 3 whole retain epochs (each row once in each, a fresh order) + 1 batch
    for k in range(3):
        assert sorted(seen_r[6 * k : 6 * k + 6]) == sorted(r_ids)
    assert seen_r[:6] != seen_r[6:12]  # reshuffled (seed + 1, epoch)


def test_loader_resumes_at_any_position(sets):
    ld = loader(sets)
    whole = [(e, k, b) for e in range(2) for k, b in ld.epoch(e)]
    for e, start in ((0, 3), (1, 0), (1, 4)):
        resumed = [(e, k, b) for k, b in loader(sets).epoch(e, start=start)]
        expected = [w for w in whole if w[0] == e and w[1] >= start]
        assert len(resumed) == len(expected)
        for (_, k, b), (_, k2, b2) in zip(resumed, expected):
            assert k == k2
            jax.tree.map(np.testing.assert_array_equal, b, b2)


def test_loader_slices_hosts_like_a_paired_batch(sets):
    config = data.LoaderConfig(batch_size=4, buckets=(48,))
    whole = next(data.UnlearnLoader(*sets, config).epoch(0))[1]
    parts = [next(data.UnlearnLoader(*sets, config, process_index=i, process_count=2).epoch(0))[1]
             for i in range(2)]  # fmt: skip
    # host i holds [forget_i; retain_i] of its own 2 examples
    assert ids_of(parts[0], [0, 1]) + ids_of(parts[1], [0, 1]) == ids_of(whole, [0, 1, 2, 3])
    assert ids_of(parts[0], [2, 3]) + ids_of(parts[1], [2, 3]) == ids_of(whole, [4, 5, 6, 7])


def test_loader_errors_name_the_set(sets):
    forget, retain = sets
    with pytest.raises(ValueError, match=r"forget \(data.train\) set has 10 rows"):
        loader(sets, batch_size=16)
    with pytest.raises(ValueError, match=r"retain \(data.retain\) set has 6 rows"):
        loader(sets, batch_size=8)
    with pytest.raises(ValueError, match="packing"):
        loader(sets, packing=True)


# ------------------------------------------------------------------------------ the step


def first_batch(sets, batch_size=4):
    return jax.tree.map(jnp.asarray, next(loader(sets, batch_size).epoch(0))[1])


def unlearn_state(loss, reference="frozen"):
    model = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    state = S.init_state(model, optax.sgd(1.0), reference=reference, loss=loss)
    if reference == "frozen":  # a different reference, so the log-ratios are not all zero
        other = nnx.state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(1)), nnx.Param)
        state = state.replace(ref=other)
    return state


def dense_unlearn_batch(state, params, batch):
    lp, rl, kl, _ = dense_pair_stats(state, params, batch)
    n, m = batch.valid.shape[0], batch.loss_mask
    return losses.UnlearnBatch(lp[:n], m[:n], lp[n:], m[n:], rl[:n], rl[n:], kl[n:])


# The step's two reference modes with and without the retain KL: npo (frozen), grad_diff + KL
# (frozen, KL), grad_ascent (none). npo + KL and simnpo take the same step paths (their loss
# formulas are tests/test_losses_unlearn.py's): with the slow set.
@pytest.mark.parametrize("loss,kwargs", [
    ("npo", {}),
    pytest.param("npo", {"retain": "kl", "log_ratio": "token_mean"}, marks=pytest.mark.slow),
    ("grad_diff", {"retain": "kl", "retain_weight": 0.5}),
    pytest.param("simnpo", {"gamma": 0.5}, marks=pytest.mark.slow),
    ("grad_ascent", {}),
])  # fmt: skip
def test_step_matches_the_loss_on_dense_logps(sets, loss, kwargs):
    spec = S.StepSpec(task="unlearn", loss=loss, loss_kwargs=kwargs)
    reference = "none" if spec.reference == "none" else "frozen"
    assert (reference == "frozen") == (loss == "npo" or kwargs.get("retain") == "kl")
    state = unlearn_state(loss, reference)
    batch = first_batch(sets)
    fn = losses.get(loss)

    def direct(params):
        lb = dense_unlearn_batch(state, params, batch) if reference == "frozen" else None
        if lb is None:  # reference-free: the policy's dense log-probs only
            model = S.model_of(state, params)
            logits = model.logits(model(**batch.model_inputs()).last_hidden_state)
            lp = ops.token_logps(logits, batch.labels, batch.loss_mask)
            n, m = batch.valid.shape[0], batch.loss_mask
            lb = losses.UnlearnBatch(lp[:n], m[:n], lp[n:], m[n:])
        return fn(lb, **kwargs).loss

    _, m = check_step(spec, state, batch, jax.jit(direct))
    assert np.isfinite(float(m["forget_nll"])) and np.isfinite(float(m["retain_nll"]))


def test_needs_follow_the_retain_term():
    assert S.StepSpec(task="unlearn", loss="grad_diff").reference == "none"
    kl = S.StepSpec(task="unlearn", loss="grad_diff", loss_kwargs={"retain": "kl"})
    assert kl.needs.kl and kl.reference == "frozen"
    assert S.StepSpec(task="unlearn").loss == "npo"
    with pytest.raises(ValueError, match="reads unlearn batches"):
        S.StepSpec(task="paired", loss="npo")
    with pytest.raises(ValueError, match="precomputed"):
        S.StepSpec(task="unlearn", loss="npo", reference="precomputed")


# ------------------------------------------------------------------------------ score pass


@pytest.fixture(scope="module")
def score_pass(sets):
    """A reference-free state, its loader and the score pass over it (shared: deterministic)."""
    state = unlearn_state("grad_ascent", "none")
    ld = loader(sets, batch_size=4)
    return state, ld, TI.nll_gradients(state, ld)


def test_score_pass_sums_each_batch_token_mean_nll_gradient(score_pass):
    state, ld, (g_f, g_r) = score_pass

    def nll(params, batch, part):
        model = S.model_of(state, params)
        logits = model.logits(model(**batch.model_inputs()).last_hidden_state)
        lp = ops.token_logps(logits, batch.labels, batch.loss_mask)
        n, m = batch.valid.shape[0], batch.loss_mask
        rows = slice(0, n) if part == "forget" else slice(n, None)
        return -jnp.sum(lp[rows] * m[rows]) / jnp.sum(m[rows])

    batches = [jax.tree.map(jnp.asarray, b) for _, b in ld.epoch(0)]
    assert len(batches) == 2
    grad = jax.jit(jax.grad(nll), static_argnums=2)
    for part, got in (("forget", g_f), ("retain", g_r)):
        want = jax.tree.map(lambda *g: sum(g), *[grad(state.params, b, part) for b in batches])
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            scale = float(np.max(np.abs(b)))
            assert scale > 0 and np.max(np.abs(np.asarray(a) - b)) <= 1e-5 * scale, path


@pytest.fixture(scope="module")
def big_sets():
    return tokenized(texts(0, 16)), tokenized(texts(16, 8))


# (1, 8): the parameters sharded instead of the batch, the sharding rules
# tests/test_train_sharding.py checks for the step: with the slow set.
@pytest.mark.parametrize("layout", [(8, 1), pytest.param((1, 8), marks=pytest.mark.slow)])
def test_score_pass_and_step_on_8_devices_equal_one(big_sets, layout):
    assert jax.device_count() == 8
    spec = S.StepSpec(task="unlearn", loss="npo")
    ld = data.UnlearnLoader(*big_sets, data.LoaderConfig(batch_size=8, buckets=(48,)))
    batch = next(ld.epoch(0))[1]
    results = []
    for placement in (None, MeshPlacement(SH.make_mesh(*layout, 1))):
        state = unlearn_state("npo")
        kw, put = {}, lambda b: jax.tree.map(jnp.asarray, b)
        if placement is not None:
            state, put = placement.put_state(state), placement.put_batch
            replicated = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec())
            kw = {"out_shardings": (placement.shardings, replicated)}
        g_f, g_r = TI.nll_gradients(state, ld, placement=placement, max_batches=1)
        new, m = S.build_step(spec, optax.sgd(0.5), donate=False, **kw)(state, put(batch))
        results.append(jax.tree.map(np.asarray, (g_f, g_r, new.params, float(m["loss"]))))
    one, many = results
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(many), jax.tree.leaves(one)):
        scale = max(float(np.max(np.abs(b))), 1e-30)
        assert np.max(np.abs(a - b)) <= 1e-5 * scale, (jax.tree_util.keystr(path), layout)


# ------------------------------------------------------------------------------ masks


def test_masked_updates_keep_weights_bitwise_and_gradient_mode_decays(sets):
    batch = first_batch(sets)
    spec = S.StepSpec(task="unlearn", loss="grad_diff")
    state0 = unlearn_state("grad_diff", "none")
    mask = TI.compute_mask(C.MaskConfig(score="random", ratio=0.3, seed=1), state0)
    frac = sum(int(m.sum()) for m in jax.tree.leaves(mask)) / sum(
        m.size for m in jax.tree.leaves(mask))  # fmt: skip
    assert abs(frac - 0.3) < 1e-3
    lr, wd = 0.01, 0.1
    for mode in ("updates", "gradients"):
        tx = TI.mask_optimizer(optax.adamw(lr, weight_decay=wd), mask, mode)
        state = state0.replace(opt_state=tx.init(state0.params))
        step = S.build_step(spec, tx, donate=False)
        for _ in range(3):
            prev = jax.tree.map(np.asarray, state.params)
            state, _ = step(state, batch)
        new = jax.tree.map(np.asarray, state.params)
        for p, q, m in zip(jax.tree.leaves(prev), jax.tree.leaves(new), jax.tree.leaves(mask)):
            if mode == "updates":
                np.testing.assert_array_equal(q[~m], p[~m])  # bitwise, decay included
            else:  # zero gradients, zero moments: only the decoupled decay -lr * wd * theta,
                # which optax rounds in another order than this line: 1 float32 ulp apart
                want = p[~m] - np.float32(lr * wd) * p[~m]
                np.testing.assert_array_max_ulp(q[~m], want, maxulp=1)
                assert np.all(q[~m][p[~m] != 0] != p[~m][p[~m] != 0])  # and they did move
        moved = sum(
            int(np.sum(q[m] != p[m]))
            for p, q, m in zip(jax.tree.leaves(prev), jax.tree.leaves(new), jax.tree.leaves(mask))
        )
        assert moved > 0.9 * sum(int(m.sum()) for m in jax.tree.leaves(mask))


def test_wagle_mask_is_the_top_ratio_of_the_score(score_pass):
    state, ld, (g_f, g_r) = score_pass
    cfg = C.MaskConfig(score="wagle", ratio=0.25)
    mask = TI.compute_mask(cfg, state, ld)
    want = I.top_ratio_mask(I.wagle_scores(state.params, g_f, g_r, mu=1e-6), 0.25)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), mask, want)


# ------------------------------------------------------------------------------ config


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.retain"):
        C.load_config(None, ["task=unlearn"])
    with pytest.raises(ValueError, match="data.retain"):
        C.load_config(None, ["data.retain=x.jsonl"])
    base = ["task=unlearn", "data.retain=x.jsonl"]
    for override, key in (("mask.ratio=0", "mask.ratio"), ("mask.ratio=1.5", "mask.ratio"),
                          ("mask.score=fisher", "mask.score"), ("mask.mode=both", "mask.mode"),
                          ("mask.mu=0", "mask.mu")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            C.load_config(None, [*base, override])
    with pytest.raises(ValueError, match="needs task=unlearn"):
        C.load_config(None, ["mask.score=wagle"])
    with pytest.raises(ValueError, match="not both"):
        C.load_config(None, [*base, "mask.score=random", "mask.path=m.npz"])
    cfg = C.load_config(None, [*base, "mask.ratio=1.0"])
    assert cfg.mask.ratio == 1.0 and cfg.loss.beta is None


def test_a_mask_file_that_does_not_match_the_parameters_names_the_path(tmp_path, sets):
    state = unlearn_state("grad_ascent", "none")
    bad = tmp_path / "bad.npz"
    I.save_mask(str(bad), {"w": np.ones(3, bool)})
    cfg = C.load_config(None, ["mask.path=" + str(bad)])
    with pytest.raises(ValueError, match="mask.path"):
        TI.run_mask(cfg, state, None, placement=None, out_dir=tmp_path, is_main=True)


# ------------------------------------------------------------------------------ end to end


def write_sets(tmp_path):
    for name, rows in (("forget", texts(0, 16)), ("retain", texts(16, 12))):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def unlearn_cfg(tmp_path, name, steps, *extra):
    return C.load_config(None, [
        "task=unlearn", f"data.train={tmp_path / 'forget.jsonl'}",
        f"data.retain={tmp_path / 'retain.jsonl'}", f"steps={steps}", f"out_dir={tmp_path / name}",
        "log_every=1", "eval_every=2", "eval_samples=0", "plot=false",
        "checkpoint.export_hf=false", "checkpoint.every=2", "checkpoint.asynchronous=false",
        "data.batch_size=8", "data.max_length=48", "data.buckets=[48]", "optim.warmup_steps=0",
        "optim.weight_decay=0.1", "model.preset=tiny", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_trainer_unlearns_with_a_wagle_mask_and_resumes_bitwise(tmp_path):
    from alignjax.train import checkpoint, metrics, trainer

    write_sets(tmp_path)
    # a constant rate: the 2-step run and the 4-step run share their first two updates
    extra = ["loss.name=npo", "mask.score=wagle", "mask.ratio=0.1", "optim.schedule=constant"]
    whole = trainer.train(unlearn_cfg(tmp_path, "whole", 4, *extra), progress=False)
    assert whole["eval"]["forget/nll"] > 0 and whole["eval"]["retain/nll"] > 0
    trainer.train(unlearn_cfg(tmp_path, "split", 2, *extra), progress=False)
    trainer.train(unlearn_cfg(tmp_path, "split", 4, *extra), progress=False)  # resumes
    rows = {n: [r for r in metrics.read_jsonl(tmp_path / n / "metrics.jsonl") if "train/loss" in r]
            for n in ("whole", "split")}  # fmt: skip
    assert [r["train/loss"] for r in rows["whole"]] == [r["train/loss"] for r in rows["split"]]
    states = []
    for n in ("whole", "split"):
        with checkpoint.Checkpointer(tmp_path / n / "checkpoints", every=2, keep=3) as ck:
            states.append(ck.restore()[0]["params"])
    jax.tree.map(np.testing.assert_array_equal, *states)
    # the masked weights never moved (update masking, weight decay 0.1): step 0 vs step 4
    run = trainer.open_run(tmp_path / "whole")
    initial, final = run.initial_state.params, run.state.params
    mask = I.load_mask(str(tmp_path / "whole" / "mask.npz"), initial)
    jax.tree.map(np.testing.assert_array_equal, mask, run.mask)
    frac = np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(mask)]))
    assert abs(frac - 0.1) < 1e-3
    moved = 0
    for a, b, m in zip(jax.tree.leaves(initial), jax.tree.leaves(final), jax.tree.leaves(mask)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(a[~m], b[~m])
        moved += int(np.sum(a[m] != b[m]))
    assert moved > 0


def test_an_empty_forget_or_retain_file_names_its_key(tmp_path):
    from alignjax.train.session import setup

    write_sets(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    for key in ("data.train", "data.retain"):
        cfg = dataclasses.replace(
            unlearn_cfg(tmp_path, "e", 1),
            data=dataclasses.replace(unlearn_cfg(tmp_path, "e", 1).data,
                                     **{key.split(".")[1]: str(tmp_path / "empty.jsonl")}),
        )  # fmt: skip
        with pytest.raises(ValueError, match=rf"`{key}.*is empty"):
            setup(cfg)


def test_unlearn_batches_refuse_packing_and_an_uneven_accumulation(tmp_path):
    from alignjax.train import trainer
    from alignjax.train.session import setup

    write_sets(tmp_path)
    for extra in ("data.packing=true", "optim.grad_accum=3"):
        session = setup(unlearn_cfg(tmp_path, "p", 1, extra))
        with pytest.raises(ValueError, match=extra.split(".")[1].split("=")[0]):
            trainer.train_loader(session)
