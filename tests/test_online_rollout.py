"""Rollouts (`alignjax.online.rollout`): sampling log-probs at the temperature against teacher
forcing and a NumPy log-softmax of the full forward's logits, the completion mask through the
stop token and the missing-EOS flag against a NumPy derivation, TRL's row layouts against
explicit NumPy indexing, determinism in the key, and the errors of bad input.

One tiny model; every jitted program compiles once per shape (one `generate` per temperature).
"""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import CFG  # the tiny GQA Llama the model tests use

from alignjax import models, online

# Left-padded prompts of lengths 2, 4 and 5.
PROMPTS = np.array([[0, 0, 0, 11, 12], [0, 21, 22, 23, 24], [31, 32, 33, 34, 35]], np.int32)
PROMPT_MASK = (np.arange(5)[None, :] >= np.array([3, 1, 0])[:, None]).astype(np.int32)
G, NEW = 4, 6
STOPS = tuple(range(40, 50))  # 10 of 50 tokens: some rows stop early, some run to NEW
PAD = 1


@pytest.fixture(scope="module")
def model():
    return models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, ids, mask):
    return model.logits(model(ids, mask).last_hidden_state)


@nnx.jit(static_argnames="temperature")
def _teacher(model, r, temperature):
    return online.teacher_forced_logps(model, r, temperature=temperature)


def _rollout(model, temperature, key=0, layout="grouped", **kw):
    kw = {"stop_tokens": STOPS, **kw}
    return online.rollout(
        model, jnp.asarray(PROMPTS), jnp.asarray(PROMPT_MASK), jax.random.key(key),
        num_generations=G, layout=layout, max_new_tokens=NEW, temperature=temperature,
        pad_id=PAD, **kw,
    )  # fmt: skip


def _numpy_stop_masks(tokens, stops):
    """Completion mask through the first stop token, and the rows without one."""
    is_stop = np.isin(tokens, stops)
    missing = ~is_stop.any(1)
    first = np.where(missing, tokens.shape[1], is_stop.argmax(1) + 1)
    return (np.arange(tokens.shape[1])[None, :] < first[:, None]).astype(np.int32), missing


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_logps_at_temperature_equal_teacher_forcing(model, temperature):
    """`Rollout.logps` = log softmax(logits / T) at the sampled tokens, from the KV-cache path;
    `teacher_forced_logps(T)` = the same from one fused forward of prompt + completion; and a
    float64 NumPy log-softmax of the full forward's logits / T. Tolerance 1e-5 in float32: the
    cached decode and the full forward compute the same attention and logsumexp with their
    sums in a different order (and the fused head chunks its logsumexp), so the values agree
    to a few float32 ulps of logits of size ~1-10, not bit for bit."""
    r = _rollout(model, temperature)
    tokens, mask = np.asarray(r.completion_ids), np.asarray(r.completion_mask)
    lengths = mask.sum(1)
    # The case this test is about: left padding of three lengths, rows that stop early and
    # rows that run to max_new_tokens (both present for this key at every T).
    assert (lengths < NEW).any() and np.asarray(r.missing_eos).any()
    teacher = np.asarray(_teacher(model, r, temperature))
    logps = np.asarray(r.logps)
    np.testing.assert_allclose(logps, teacher, rtol=0, atol=1e-5)
    assert (logps[mask == 0] == 0).all() and (teacher[mask == 0] == 0).all()

    full = np.asarray(_logits(model, r.input_ids, r.attention_mask), np.float64) / temperature
    z = full[:, PROMPTS.shape[1] - 1 : -1]  # the logits that predict completion token t
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    ref = ref - z.max(-1, keepdims=True)
    ref = np.take_along_axis(ref, tokens[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(logps, ref, rtol=0, atol=1e-5)
    if temperature != 1.0:  # the temperature is really applied: T = 1 log-probs differ
        plain = np.asarray(_teacher(model, r, 1.0))
        assert np.abs(plain - teacher)[mask == 1].max() > 1e-2


def test_completion_mask_includes_the_stop_token_and_nothing_after(model):
    r = _rollout(model, 1.3)
    tokens = np.asarray(r.completion_ids)
    mask, missing = _numpy_stop_masks(tokens, STOPS)
    np.testing.assert_array_equal(r.completion_mask, mask)
    np.testing.assert_array_equal(r.missing_eos, missing)
    np.testing.assert_array_equal(r.completion_lengths, mask.sum(1))
    assert (tokens[mask == 0] == PAD).all()
    ends = mask.sum(1) - 1
    stopped = ~missing
    assert np.isin(tokens[stopped, ends[stopped]], STOPS).all()  # the stop token is in
    np.testing.assert_array_equal(r.attention_mask, np.concatenate([r.prompt_mask, mask], 1))


def test_a_stop_on_the_last_token_is_not_missing(model):
    """A row whose stop token is its last new token has length max_new_tokens but an EOS:
    `missing_eos` cannot be read off the length alone. The same key draws the same tokens up to
    the stop, so a free run tells which stop token ends a row exactly at the last step."""
    free = np.asarray(_rollout(model, 1.3, stop_tokens=()).completion_ids)
    row = next(i for i in range(len(free)) if free[i, -1] not in free[i, :-1])
    stop = int(free[row, -1])
    r = _rollout(model, 1.3, stop_tokens=(stop,))
    exp_mask, exp_missing = _numpy_stop_masks(free, (stop,))
    assert exp_mask[row].sum() == NEW and not exp_missing[row]
    np.testing.assert_array_equal(r.completion_mask, exp_mask)
    np.testing.assert_array_equal(r.missing_eos, exp_missing)
    np.testing.assert_array_equal(np.asarray(r.completion_ids)[exp_mask == 1], free[exp_mask == 1])


def test_layouts_place_samples_as_trl():
    """grouped = torch `repeat_interleave(G)` (RepeatSampler), halves = torch `repeat(G, 1)`
    (Online DPO, G = 2: first samples in rows 0..B-1)."""
    b, p = PROMPTS.shape
    for g in (1, 2, 3):
        ids, mask = online.repeat_prompts(PROMPTS, PROMPT_MASK, g, "grouped")
        np.testing.assert_array_equal(ids, np.repeat(PROMPTS, g, axis=0))
        np.testing.assert_array_equal(mask, np.repeat(PROMPT_MASK, g, axis=0))
        ids, mask = online.repeat_prompts(PROMPTS, PROMPT_MASK, g, "halves")
        np.testing.assert_array_equal(ids, np.tile(PROMPTS, (g, 1)))
        np.testing.assert_array_equal(mask, np.tile(PROMPT_MASK, (g, 1)))
        values = np.arange(b * g) * 10
        for layout in online.LAYOUTS:
            prompt, sample = online.row_indices(b, g, layout)
            grouped = np.asarray(online.by_prompt(values, g, layout))
            assert grouped.shape == (b, g)
            for row in range(b * g):
                assert grouped[prompt[row], sample[row]] == values[row]
    prompt, sample = online.row_indices(3, 2, "halves")
    np.testing.assert_array_equal(prompt, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(sample, [0, 0, 0, 1, 1, 1])
    prompt, sample = online.row_indices(3, 2, "grouped")
    np.testing.assert_array_equal(prompt, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(sample, [0, 1, 0, 1, 0, 1])


def test_same_key_same_rollout_and_groups_differ(model):
    a, b = _rollout(model, 1.3, key=0), _rollout(model, 1.3, key=0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    c = _rollout(model, 1.3, key=1)
    assert not np.array_equal(a.completion_ids, c.completion_ids)
    for r in (a, _rollout(model, 1.3, key=0, layout="halves")):
        np.testing.assert_array_equal(r.prompt_ids, PROMPTS[np.asarray(r.prompt_index)])
        groups = np.asarray(online.by_prompt(r.completion_ids, G, r.layout))  # [B, G, NEW]
        for samples in groups:  # independent draws (one shared key per row would repeat)
            assert len({tuple(s) for s in samples}) > 1


def test_bad_input(model):
    ids, mask = jnp.asarray(PROMPTS), jnp.asarray(PROMPT_MASK)
    key = jax.random.key(0)
    kw = dict(max_new_tokens=2, temperature=1.0)
    for g in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_generations"):
            online.rollout(model, ids, mask, key, num_generations=g, **kw)
    with pytest.raises(ValueError, match="layout"):
        online.rollout(model, ids, mask, key, num_generations=2, layout="interleaved", **kw)
    empty = mask.at[1].set(0)
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        online.rollout(model, ids, empty, key, num_generations=2, **kw)
    right = mask.at[2].set(jnp.asarray([1, 1, 1, 1, 0]))
    with pytest.raises(ValueError, match="row 2 ends in padding"):
        online.rollout(model, ids, right, key, num_generations=2, **kw)
    with pytest.raises(ValueError, match="prompt_mask"):
        online.repeat_prompts(ids, mask[:, 1:], 2)
    with pytest.raises(ValueError, match="num_generations=4"):
        online.by_prompt(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="logps_mode"):
        online.rollout(model, ids, mask, key, num_generations=1, logps_mode="raw", **kw)


def test_sampler_logps_are_the_filtered_distribution(model):
    """logps_mode="sampler" with top_k = 5: log softmax over the 5 largest logits / T (the
    distribution the tokens were drawn from), from NumPy on the full forward's logits; every
    sampled token is among those 5."""
    t, k = 0.8, 5
    r = _rollout(model, t, logps_mode="sampler", top_k=k)
    tokens, mask = np.asarray(r.completion_ids), np.asarray(r.completion_mask)
    z = np.asarray(_logits(model, r.input_ids, r.attention_mask), np.float64) / t
    z = z[:, PROMPTS.shape[1] - 1 : -1]
    kth = np.sort(z, -1)[..., -k][..., None]
    z = np.where(z >= kth, z, -np.inf)
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    ref = ref - z.max(-1, keepdims=True)
    picked = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
    assert np.isfinite(picked[mask == 1]).all()
    np.testing.assert_allclose(np.asarray(r.logps), np.where(mask == 1, picked, 0), atol=1e-5)


def test_docstring_example_runs():
    result = doctest.testmod(importlib.import_module("alignjax.online.rollout"))
    assert result.attempted > 0 and result.failed == 0
