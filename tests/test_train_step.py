"""alignjax.train.step: exact gradient accumulation, the three references, the non-finite guard,
and a DPO run that learns the shipped preference."""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import data, losses, models, ops, peft
from alignjax.train import step as S

datasets.disable_progress_bars()

CFG = models.LlamaConfig(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,  # compile time dominates these tests
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def batches():
    tok = data.shipped_tokenizer()
    raw = data.shipped_dataset("train").select(range(16))
    tokenized = data.tokenize_dataset(raw, tok, config=data.TokenizeConfig(max_length=64))
    loader = data.DataLoader(
        tokenized, data.LoaderConfig(batch_size=8, shuffle=False, buckets=(64,))
    )
    return [jax.tree.map(jnp.asarray, b) for _, b in loader.epoch(0)]


def halves(batch):
    """The batch of 8 pairs as 2 micro-batches of 4 (rows [chosen; rejected] each)."""

    def part(x, i):
        if x.shape[0] == 16:  # [chosen; rejected] rows
            return jnp.concatenate([x[4 * i : 4 * i + 4], x[8 + 4 * i : 8 + 4 * i + 4]])
        return x[4 * i : 4 * i + 4]

    return S.stack_microbatches([jax.tree.map(lambda x, i=i: part(x, i), batch) for i in range(2)])


@pytest.mark.parametrize("task,loss", [("paired", "sigmoid"), ("sft", "sft")])
def test_accumulation_is_exact(batches, task, loss):
    """2 micro-batches of 4 pairs update the parameters as one batch of 8 (float32: 1e-6 of the
    update; sft averages over tokens, whose counts differ between the halves)."""
    opt = optax.sgd(1.0)
    spec = S.StepSpec(task=task, loss=loss, reference="frozen" if task != "sft" else "none")
    step = S.build_step(spec, opt, donate=False)
    state = S.init_state(
        models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), opt, reference=spec.reference
    )
    one, m1 = step(state, batches[0])
    two, m2 = step(state, halves(batches[0]))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    delta1 = jax.tree.map(jnp.subtract, one.params, state.params)
    delta2 = jax.tree.map(jnp.subtract, two.params, state.params)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(delta1))
    for a, b in zip(jax.tree.leaves(delta1), jax.tree.leaves(delta2)):
        np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=0)


def test_counts_do_not_depend_on_logps():
    """The accumulation relies on every loss's counts being functions of the masks only."""
    rng = np.random.default_rng(0)
    mask = jnp.asarray(rng.integers(0, 2, (4, 6)))
    lp = jnp.asarray(-rng.random((4, 6)), jnp.float32)
    checked = []
    for name in losses.available():
        fn = losses.get(name)
        kw = {}
        if name in ("sppo", "sppo_hard"):
            kw = dict(chosen_win_prob=jnp.full(2, 0.7), rejected_win_prob=jnp.full(2, 0.2))
        if name == "sppo_single":
            kw = dict(win_prob=jnp.full(2, 0.7))

        def batch(x, kw=kw):
            return losses.PreferenceBatch.from_stacked(x, mask, x, kl=jnp.abs(x), **kw)

        try:
            a, b = fn(batch(lp)), fn(batch(jnp.zeros_like(lp)))
        except (ValueError, TypeError, AttributeError):
            continue  # unpaired or needs other inputs; covered by its own tests
        for k in a.terms:
            assert float(a.terms[k].count) == float(b.terms[k].count), name
        checked.append(name)
    assert len(checked) >= 20, checked  # the paired losses, not a vacuous pass


def test_adapters_disabled_reference_equals_a_frozen_base_copy(batches):
    """With trained (non-zero) LoRA adapters, the adapters-disabled reference log-probs equal
    those of an explicit frozen copy of the base model (same weights, no adapters)."""
    base = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    policy = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    peft.apply(
        policy, [peft.Rule(r".*(q_proj|v_proj)", "lora", rank=4, alpha=8.0)], rngs=nnx.Rngs(1)
    )
    for _, layer in peft.adapters(policy):  # move away from the zero-init B
        layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b[...].shape) * 0.1
    opt = optax.adam(1e-3)
    state = S.init_state(policy, opt, wrt=peft.AdapterParam, reference="adapters_disabled")
    spec = S.StepSpec(reference="adapters_disabled")
    b = batches[0]
    stats = jax.jit(lambda st, b: S.token_stats(spec, st, st.params, b)[:2])(state, b)
    logps, ref_logps = stats

    @nnx.jit
    def base_logps(model, b):
        h = model(**b.model_inputs()).last_hidden_state
        return ops.fused_token_logps(h, model.unembed(), b.labels, b.loss_mask)

    want = base_logps(base, b)
    np.testing.assert_allclose(ref_logps, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(logps - want))) > 1e-3  # the policy itself differs


def test_non_finite_gradients_skip_the_update(batches):
    def broken(batch, **kw):
        out = losses.get("sigmoid")(batch, **kw)
        t = out.terms["sigmoid"]
        return out.__class__({"sigmoid": t._replace(total=t.total * jnp.nan)}, out.losses,
                             out.chosen_rewards, out.rejected_rewards, out.metrics)  # fmt: skip

    opt = optax.adam(1e-2)
    state = S.init_state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), opt)
    step = S.build_step(S.StepSpec(loss=broken), opt, donate=False)
    new, metrics = step(state, batches[0])
    assert int(new.skipped) == 1 and int(new.step) == 1 and float(metrics["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_dpo_with_lora_learns_the_preference(batches):
    policy = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    peft.apply(
        policy,
        [peft.Rule(r".*(q_proj|v_proj|up_proj)", "lora", rank=4, alpha=8.0)],
        rngs=nnx.Rngs(1),
    )
    opt = optax.adam(1e-2)
    state = S.init_state(policy, opt, wrt=peft.AdapterParam, reference="adapters_disabled")
    step = S.build_step(
        S.StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.1}, reference="adapters_disabled"), opt
    )
    first = None
    for i in range(8):
        state, metrics = step(state, batches[i % 2])
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first - 0.05 and float(metrics["rewards/accuracies"]) > 0.5
    assert int(state.step) == 8 and int(state.skipped) == 0


def test_precomputed_reference_is_cached_and_equals_the_frozen_one(batches, tmp_path):
    from alignjax.train import reference

    tok = data.shipped_tokenizer()
    raw = data.shipped_dataset("train").select(range(16))
    tokenized = data.tokenize_dataset(raw, tok, config=data.TokenizeConfig(max_length=64))
    model = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    cache = reference.precompute(model, tokenized, cache_dir=tmp_path, batch_size=8, length=64)
    assert not cache.loaded and cache.path.is_file()
    again = reference.precompute(model, tokenized, cache_dir=tmp_path, batch_size=8, length=64)
    assert again.loaded and again.key == cache.key  # a rerun reuses the file
    np.testing.assert_array_equal(again.values, cache.values)
    other = data.tokenize_dataset(
        raw.select(range(15)), tok, config=data.TokenizeConfig(max_length=64)
    )
    assert reference.cache_key(other, "w") != reference.cache_key(tokenized, "w")  # data changed
    changed = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(1))
    assert reference.precompute(changed, tokenized, cache_dir=tmp_path).key != cache.key

    opt = optax.sgd(0.1)
    state = S.init_state(model, opt, reference="frozen")
    frozen = S.build_step(S.StepSpec(reference="frozen"), opt, donate=False)
    pre = S.build_step(S.StepSpec(reference="precomputed"), opt, donate=False)
    b = batches[0]
    _, m1 = frozen(state, b)
    _, m2 = pre(state, jax.tree.map(jnp.asarray, cache.attach(jax.tree.map(np.asarray, b))))
    for k in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6)


def test_tr_dpo_reference_sync(batches):
    """TRL's SyncRefModelCallback rule: after update k with k % 2 == 0, ref <- 0.6 pi + 0.4 ref."""
    opt = optax.sgd(0.5)
    state = S.init_state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), opt, reference="frozen")
    step = S.build_step(S.StepSpec(sync_every=2, sync_alpha=0.6), opt, donate=False)
    s1, _ = step(state, batches[0])
    for a, b in zip(jax.tree.leaves(s1.ref), jax.tree.leaves(state.ref)):
        np.testing.assert_array_equal(a, b)  # not yet
    s2, _ = step(s1, batches[1])
    for r, p, r0 in zip(*map(jax.tree.leaves, (s2.ref, s2.params, state.ref))):
        np.testing.assert_allclose(r, 0.6 * p + 0.4 * r0, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="needs reference='frozen'"):
        S.StepSpec(sync_every=2, reference="adapters_disabled")
