"""The NNX Llama-family decoder: invariances that any correct implementation has (left padding,
packing with segment ids, GQA against repeated heads, remat), llama3 RoPE scaling against the
formula, and bad input. Parity with transformers is in tests/reference/test_hf_models.py."""

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


def logits(model, ids, mask=None, **kw):
    out = model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask), **kw)
    return np.asarray(model.logits(out.last_hidden_state))


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
    out = model(jnp.asarray(ids), output_hidden_states=True, output_activations=True)
    assert len(out.hidden_states) == CFG.num_hidden_layers + 1
    assert out.activations[0]["mlp"].shape == (2, 6, CFG.intermediate_size)
    assert out.activations[0]["attn"].shape == (2, 6, CFG.hidden_size)
    remat = models.LlamaForCausalLM(CFG, remat=True, rngs=nnx.Rngs(0))
    g1 = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)).last_hidden_state ** 2))(model)
    g2 = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)).last_hidden_state ** 2))(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


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
