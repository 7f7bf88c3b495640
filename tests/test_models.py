"""The NNX Llama-family decoder: invariances that any correct implementation has (left padding,
packing with segment ids, GQA against repeated heads, remat), attention against a float64
reference, llama3 RoPE scaling against the formula, bfloat16 compute against float32, and bad
input. Parity with transformers is in tests/reference/test_hf_models.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import models

CFG = models.LlamaConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@nnx.jit
def _logits(model, ids, mask, kw):
    return model.logits(model(ids, mask, **kw).last_hidden_state)


def logits(model, ids, mask=None, **kw):
    """The model's logits, compiled (one program per shape: the per-op programs of an eager
    forward cost more to build than the forward costs to run)."""
    mask = None if mask is None else jnp.asarray(mask)
    kw = {k: jnp.asarray(v) for k, v in kw.items()}
    return np.asarray(_logits(model, jnp.asarray(ids), mask, kw))


@pytest.fixture(scope="module")
def model():
    return models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


def test_left_padding_and_packing_are_invisible(model):
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 50, 5), rng.integers(1, 50, 3)
    ref_a, ref_b = logits(model, a[None])[0], logits(model, b[None])[0]
    # Left padding: the real tokens' logits do not change.
    padded = np.concatenate([[0, 0, 0], a])[None]
    got = logits(model, padded, np.array([[0, 0, 0, 1, 1, 1, 1, 1]]))[0, 3:]
    np.testing.assert_allclose(got, ref_a, rtol=2e-5, atol=2e-5)
    # Packing two sequences in one row with segment ids: each sees only itself.
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 5 + [2] * 3])
    got = logits(model, packed, np.ones_like(packed), segment_ids=jnp.asarray(seg))[0]
    np.testing.assert_allclose(got[:5], ref_a, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[5:], ref_b, rtol=2e-5, atol=2e-5)


def test_remat_and_hidden_states(model):
    ids = np.random.default_rng(1).integers(0, 50, (2, 6))
    out = nnx.eval_shape(
        lambda m: m(jnp.asarray(ids), output_hidden_states=True, output_activations=True), model
    )
    assert len(out.hidden_states) == CFG.num_hidden_layers + 1
    assert out.activations[0]["mlp"].shape == (2, 6, CFG.intermediate_size)
    assert out.activations[0]["attn"].shape == (2, 6, CFG.hidden_size)
    remat = models.LlamaForCausalLM(CFG, remat=True, rngs=nnx.Rngs(0))
    grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)).last_hidden_state ** 2)))
    g1, g2 = grad(model), grad(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_with_weights_from_different_traces():
    """Gradient checkpointing where the layer's weights come from different traces, as in the
    training step (a LoRA policy's frozen base weights are jit-level constants, its adapters the
    differentiated arguments; a frozen reference runs under the same jit): the gradient equals
    the one without remat (same float32 ops recomputed: 1e-5), and adapter dropout still draws
    from the layer's RNG stream."""
    from alignjax import peft

    ids = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 6)))
    grads = []
    for remat in (False, True):
        m = models.LlamaForCausalLM(CFG, remat=remat, rngs=nnx.Rngs(0))
        peft.apply(m, [peft.Rule(".*(q_proj|v_proj)", "lora", rank=2, alpha=4.0)],
                   rngs=nnx.Rngs(1))  # fmt: skip
        graphdef, adapters, rest = nnx.split(m, nnx.LoRAParam, ...)
        adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B: a real gradient

        @jax.jit
        def grad(adapters, rest, graphdef=graphdef):
            def loss(a):
                out = nnx.merge(graphdef, a, rest)(ids).last_hidden_state
                return jnp.sum(out**2)

            return jax.grad(loss)(adapters)

        grads.append(grad(adapters, rest))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(a)).max() > 0
    # dropout under remat (outside the step): two calls draw two masks
    m = models.LlamaForCausalLM(CFG, remat=True, rngs=nnx.Rngs(0))
    peft.apply(m, [peft.Rule(".*q_proj", "lora", rank=2, alpha=4.0, dropout=0.5)],
               rngs=nnx.Rngs(1))  # fmt: skip
    for _, v in nnx.iter_graph(m):
        if isinstance(v, nnx.LoRAParam):
            v.value = v.value + 0.1
    forward = nnx.jit(lambda m: m(ids).last_hidden_state)  # advances the module's RNG state
    first, second = (np.asarray(forward(m)) for _ in range(2))
    assert np.abs(first - second).max() > 0


def test_attention_matches_float64_reference():
    """Grouped-query attention, whole and in causal query blocks (130 queries in blocks of 32, 33,
    32 and 33, each against the keys up to its end), equals softmax(q k^T / sqrt(d), masked) v in
    float64 with every key/value head repeated for its query heads (transformers' repeat_kv), on
    a mask with left padding in one row and two packed segments in the other."""
    rng = np.random.default_rng(5)
    b, t, heads, kv, d = 2, 130, 4, 2, 8
    q = rng.standard_normal((b, t, heads, d))
    k, v = rng.standard_normal((2, b, t, kv, d))
    attention_mask = np.ones((b, t), np.int32)
    attention_mask[0, :9] = 0
    segment_ids = np.ones((b, t), np.int32)
    segment_ids[1, 70:] = 2
    mask = np.asarray(models.attention_mask_4d(*map(jnp.asarray, (attention_mask, segment_ids))))

    kr, vr = np.repeat(k, heads // kv, axis=2), np.repeat(v, heads // kv, axis=2)
    scores = np.where(mask, np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(d), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhts,bshd->bthd", probs / probs.sum(-1, keepdims=True), vr)

    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(mask)]
    whole = jax.jit(models.grouped_query_attention)(*args)
    blocks = jax.jit(functools.partial(models.causal_attention, block=32))(*args)
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocks, want, rtol=1e-5, atol=1e-5)
    for impl in ("jax", "auto"):  # jax.nn.dot_product_attention (the path GPUs / TPUs take)
        got = jax.jit(functools.partial(models.attention, implementation=impl, causal=True))(*args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_implementations_give_the_same_model(model):
    """The model with jax.nn.dot_product_attention equals the default (CPU: grouped) model,
    on packed rows and in KV-cache generation (float32 rounding: 2e-5)."""
    cfg = models.LlamaConfig(**{**CFG.__dict__, "attention_implementation": "jax"})
    other = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    ids = np.random.default_rng(1).integers(1, 50, (2, 9))
    seg = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9])
    for kw in ({}, {"segment_ids": seg}):
        np.testing.assert_allclose(
            logits(other, ids, **kw), logits(model, ids, **kw), rtol=2e-5, atol=2e-5
        )
    mask = jnp.ones((2, 9), jnp.int32)
    a = models.generate(model, jnp.asarray(ids), mask, max_new_tokens=3)
    b = models.generate(other, jnp.asarray(ids), mask, max_new_tokens=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    assert "attention_implementation" not in cfg.to_hf()
    with pytest.raises(ValueError, match="attention_implementation"):
        models.LlamaConfig(**{**CFG.__dict__, "attention_implementation": "flash"})


def test_llama3_rope_scaling_matches_formula():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,  # every branch: kept, blended and scaled
    }
    cfg = models.LlamaConfig(**{**CFG.__dict__, "rope_scaling": scaling, "rope_theta": 10000.0})
    got = np.asarray(models.rope_frequencies(cfg), np.float64)
    d = cfg.dim_per_head
    branches = set()
    for i, f in enumerate(10000.0 ** (-np.arange(0, d, 2) / d)):
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4.0:
            want, branch = f, "kept"
        elif wavelen > 64 / 1.0:
            want, branch = f / 8.0, "scaled"
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want, branch = (1 - smooth) * f / 8.0 + smooth * f, "blended"
        branches.add(branch)
        assert math.isclose(got[i], want, rel_tol=1e-5), (i, got[i], want)
    assert branches == {"kept", "scaled", "blended"}


def test_bad_input(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="model_type"):
        models.LlamaConfig.from_hf({"model_type": "gpt2"})
    windowed = models.LlamaForCausalLM(
        models.LlamaConfig(**{**CFG.__dict__, "model_type": "mistral", "sliding_window": 4}),
        rngs=nnx.Rngs(0),
    )
    windowed(jnp.zeros((1, 4), jnp.int32))  # within the window: exact
    with pytest.raises(ValueError, match="sliding window 4"):
        windowed(jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="multiple"):
        models.LlamaConfig(**{**CFG.__dict__, "num_key_value_heads": 3})


def test_sampling_is_consistent_with_the_full_forward(model):
    """Sampled tokens' log-probs from the KV-cache path equal a teacher-forced full forward on
    [prompt; tokens]; top_k=1 is greedy; generation stops at a stop token."""
    rng = np.random.default_rng(3)
    prompts = jnp.asarray(rng.integers(1, 50, (2, 4)))
    mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]])
    gen = models.generate(
        model, prompts, mask, jax.random.key(0), max_new_tokens=5, temperature=1.0, top_p=0.9
    )
    full = jnp.concatenate([prompts, gen.tokens], 1)
    full_mask = jnp.concatenate([mask, jnp.ones((2, 5), jnp.int32)], 1)
    logp = jax.nn.log_softmax(logits(model, full, full_mask), -1)
    teacher = np.take_along_axis(logp[:, 3:-1], np.asarray(gen.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(gen.logps, teacher, rtol=1e-4, atol=1e-4)
    greedy = models.generate(model, prompts, mask, max_new_tokens=5)
    top1 = models.generate(
        model, prompts, mask, jax.random.key(1), max_new_tokens=5, temperature=0.7, top_k=1
    )
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    stop = int(greedy.tokens[0, 1])
    stopped = models.generate(model, prompts, mask, max_new_tokens=5, stop_tokens=(stop,))
    assert int(stopped.lengths[0]) <= 2 and np.all(np.asarray(stopped.tokens[0, 2:]) == 0)


def test_bfloat16_compute_keeps_float32_parameters_and_gradients(model):
    """dtype=bfloat16 with param_dtype=float32: parameters and their gradients stay float32, every
    activation is bfloat16, log-probs follow the float32 model with the same weights, and the
    gradient is the float32 loss's (a central difference along it)."""
    bf16 = nnx.eval_shape(
        lambda: models.LlamaForCausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    nnx.update(bf16, nnx.state(model, nnx.Param))  # the float32 model's weights
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 50, (2, 7)))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7])

    def nll(m):
        logits = m.logits(m(ids, mask).last_hidden_state)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tok = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
        return -jnp.sum(tok * mask[:, 1:]) / jnp.sum(mask[:, 1:]), (logits, logp)

    (_, (logits, logp)), grads = nnx.jit(nnx.value_and_grad(nll, has_aux=True))(bf16)
    graph, params = nnx.split(model)

    @jax.jit
    def forward32(step):  # the float32 model at params + step * grads: one compilation
        shifted = jax.tree.map(lambda p, d: p + step * d, params, grads)
        loss, (logits, logp) = nll(nnx.merge(graph, shifted))
        return logits, logp, loss

    logits32, logp32, _ = forward32(0.0)

    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
    out = nnx.eval_shape(
        lambda m: m(ids, mask, output_hidden_states=True, output_activations=True), bf16
    )
    assert {x.dtype for x in jax.tree.leaves((out, logits))} == {jnp.dtype("bfloat16")}
    assert len(out.hidden_states) == len(out.activations) + 1 == CFG.num_hidden_layers + 1
    # bfloat16 keeps 8 significant bits: a rounding is off by at most u = 2^-8 relatively, by
    # u / sqrt(3) rms. About 30 roundings (two layers of projections, norms, attention, MLP and
    # residual adds, then the head) lie between the ids and a logit; independent, they add up to
    # ~sqrt(30 / 3) u ~ 3u of a logit's size, and log-probs (softmax in float32) move about as
    # much. Hence at most 8u of the largest logit anywhere, and u of it on average (most logits
    # are several times smaller than the largest).
    real = np.asarray(mask, bool)
    err = np.abs(np.asarray(logp) - np.asarray(logp32))[real]
    scale = max(1.0, float(np.max(np.abs(np.asarray(logits32)))))
    assert err.max() <= 8 * 2**-8 * scale, (err.max(), scale)
    assert err.mean() <= 2**-8 * scale, (err.mean(), scale)

    g = jax.tree.leaves(grads)
    assert {x.dtype for x in g} == {jnp.dtype("float32")}
    assert all(np.all(np.isfinite(x)) for x in g)
    # Along the unit direction of the bfloat16 gradient g, the float32 loss changes at rate |g| up
    # to the bfloat16 error of g (a few u); a step of 1e-2 keeps the central difference's own
    # error (third order, and the float32 rounding of a loss ~4) far below that.
    norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in g)))
    ahead, behind = (float(forward32(e / norm)[2]) for e in (1e-2, -1e-2))
    slope = (ahead - behind) / 2e-2
    assert abs(slope - norm) <= 12 * 2**-8 * norm, (slope, norm)


def test_dtype_spellings_and_load_pretrained_give_one_graphdef_and_one_compilation(tmp_path):
    """A model built with the default param_dtype, with `jnp.dtype("float32")` (the trainer's
    spelling), with `jnp.float32`, with "float32", and one saved and read back by
    `load_pretrained` (whose config.json spells out head_dim and num_key_value_heads) have equal
    and equally hashed graph definitions, so `generate` (jitted, the graphdef static) compiles
    once for all of them. Before the dtypes were canonicalised, "float32" and the loaded model
    each compiled again (3 compilations), and `jnp.dtype("float32")` hashed differently."""
    cfg = models.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    built = [
        models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)),
        models.LlamaForCausalLM(cfg, param_dtype=jnp.dtype("float32"), rngs=nnx.Rngs(0)),
        models.LlamaForCausalLM(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0)),
        models.LlamaForCausalLM(cfg, dtype=None, param_dtype="float32", rngs=nnx.Rngs(0)),
    ]
    models.save_pretrained(built[0], tmp_path)
    loaded = [
        models.load_pretrained(tmp_path),
        models.load_pretrained(tmp_path, param_dtype=jnp.dtype("float32")),
    ]
    assert loaded[0].config.head_dim == 8 and cfg.head_dim is None  # spelled out, yet equal
    assert loaded[0].config == cfg and hash(loaded[0].config) == hash(cfg)
    assert models.LlamaConfig(**{**cfg.__dict__, "hidden_size": 32}).dim_per_head == 16
    graphs = [nnx.graphdef(m) for m in built + loaded]
    assert all(g == graphs[0] and hash(g) == hash(graphs[0]) for g in graphs)

    ids = jnp.asarray([[3, 1, 4]])
    mask = jnp.ones_like(ids)
    before = models.generate.jitted_fn._cache_size()
    tokens = [models.generate(m, ids, mask, max_new_tokens=2).tokens for m in built + loaded]
    assert models.generate.jitted_fn._cache_size() == before + 1
    for t in tokens[1:]:
        np.testing.assert_array_equal(t, tokens[0])

    # The compute dtype too: bfloat16 however spelled, directly or through load_pretrained.
    bf16 = [
        models.LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
        models.LlamaForCausalLM(cfg, dtype="bfloat16", param_dtype=np.float32, rngs=nnx.Rngs(0)),
        models.load_pretrained(tmp_path, dtype=jnp.dtype("bfloat16")),
    ]
    assert {m.dtype for m in bf16} == {jnp.dtype("bfloat16")}
    assert all(nnx.graphdef(m) == nnx.graphdef(bf16[0]) for m in bf16)
    assert len({hash(nnx.graphdef(m)) for m in bf16}) == 1
    assert nnx.graphdef(bf16[0]) != graphs[0]


def test_llama_satisfies_the_causal_lm_protocol(model):
    assert isinstance(model, models.CausalLM)

    class NoHead:  # everything the protocol names but `unembed`
        config = CFG
        dtype = None

        def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
            raise NotImplementedError

        def logits(self, hidden):
            raise NotImplementedError

        def step_with_cache(self, input_ids, positions, mask, caches, index):
            raise NotImplementedError

    assert not isinstance(NoHead(), models.CausalLM)
    NoHead.unembed = lambda self: None
    assert isinstance(NoHead(), models.CausalLM)
