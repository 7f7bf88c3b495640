"""Masks, alignment, truncation and MaPO activation masks against hand-worked cases and loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref as R
from alignjax.ops import logprobs as L
from alignjax.ops import masking as M


def loop_alignment(ids, att, comp, seg=None):
    """Reference: label t = ids[t+1] when t, t+1 are real, t+1 is completion, same segment."""
    b_, t_ = ids.shape
    labels, mask = np.zeros_like(ids), np.zeros_like(ids)
    for b in range(b_):
        for t in range(t_ - 1):
            ok = att[b, t] and att[b, t + 1] and comp[b, t + 1]
            if seg is not None:
                ok = ok and seg[b, t] == seg[b, t + 1] and seg[b, t + 1] != 0
            if ok:
                labels[b, t], mask[b, t] = ids[b, t + 1], 1
    return labels, mask


def test_alignment_right_and_left_padding():
    ids = np.array([[5, 6, 7, 8, 0, 0], [0, 0, 5, 6, 7, 8]])
    att = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    comp = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    labels, mask = M.next_token_alignment(ids, att, comp)
    np.testing.assert_array_equal(labels, [[0, 7, 8, 0, 0, 0], [0, 0, 0, 7, 8, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])


def test_alignment_packed_rows():
    ids = np.array([[5, 6, 7, 8, 9, 1, 2, 0]])
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    att = (seg > 0).astype(np.int32)
    labels, mask = M.next_token_alignment(ids, att, None, segment_ids=seg)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(labels, [[6, 7, 0, 9, 1, 2, 0, 0]])


def test_alignment_random_against_loop(rng):
    ids = rng.integers(0, 50, (6, 11))
    att = (rng.random((6, 11)) > 0.2).astype(np.int32)
    comp = (rng.random((6, 11)) > 0.5).astype(np.int32)
    seg = np.sort(rng.integers(0, 4, (6, 11)), axis=1)
    for s in (None, seg):
        got = M.next_token_alignment(ids, att, comp, segment_ids=s)
        want = loop_alignment(ids, att, comp, s)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_alignment_matches_trl_shift(rng):
    """Per-token log-probs equal TRL's `logits[:, :-1]` / `input_ids[:, 1:]` convention."""
    b_, t_, v_ = 3, 8, 17
    ids = rng.integers(0, v_, (b_, t_))
    prompt_len, comp_len = np.array([2, 3, 1]), np.array([4, 2, 6])
    att, comp = M.prompt_completion_masks(prompt_len, comp_len, t_)
    logits = rng.standard_normal((b_, t_, v_)).astype(np.float32)
    labels, mask = M.next_token_alignment(ids, att, comp)
    ours = np.asarray(L.token_logps(logits, labels, mask))
    trl = R.token_logps(logits[:, :-1], ids[:, 1:], np.asarray(comp)[:, 1:])
    np.testing.assert_allclose(ours[:, :-1], trl, rtol=1e-6, atol=1e-6)
    assert np.all(ours[:, -1] == 0)
    np.testing.assert_array_equal(np.asarray(mask).sum(-1), comp_len)


def test_prompt_completion_masks_both_sides():
    att, comp = M.prompt_completion_masks(np.array([2, 1]), np.array([3, 1]), 6)
    np.testing.assert_array_equal(att, [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(comp, [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    att, comp = M.prompt_completion_masks(
        np.array([2, 1]), np.array([3, 1]), 6, padding_side="left"
    )
    np.testing.assert_array_equal(att, [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(comp, [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(M.length_mask(np.array([0, 3]), 4), [[0, 0, 0, 0], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match="lengths"):
        M.prompt_completion_masks(np.array([4]), np.array([3]), 6)
    with pytest.raises(ValueError, match="padding_side"):
        M.length_mask(np.array([1]), 4, padding_side="middle")
    with pytest.raises(ValueError, match="completion_lengths"):
        M.prompt_completion_masks(np.array([1, 2]), np.array([1]), 6)


def test_alignment_bad_inputs():
    ids = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="attention_mask"):
        M.next_token_alignment(ids, np.ones((2, 4)))
    with pytest.raises(ValueError, match="input_ids"):
        M.next_token_alignment(ids.astype(np.float32))
    with pytest.raises(ValueError, match="input_ids"):
        M.next_token_alignment(ids[0])
    with pytest.raises(ValueError, match="segment_ids"):
        M.next_token_alignment(ids, segment_ids=np.ones((2, 5), np.float32))


def test_truncation_modes():
    p, c = list(range(10, 16)), list(range(20, 25))  # 6 prompt, 5 completion
    assert M.truncate_sequence(p, c, max_length=8) == (p, c[:2])
    assert M.truncate_sequence(p, c, max_length=8, mode="keep_end") == (p[3:], c)
    assert M.truncate_sequence(p, c, max_length=3, mode="keep_end") == ([], c[2:])
    assert M.truncate_sequence(p, c, max_prompt_length=2, max_completion_length=3) == (
        p[-2:],
        c[:3],
    )
    assert M.truncate_sequence(p, c, max_length=20) == (p, c)
    assert M.truncate_sequence(p, c, max_prompt_length=4, max_length=6) == (p[-4:], c[:2])


def test_truncation_never_empties_a_completion():
    p, c = list(range(6)), [7, 8]
    with pytest.raises(ValueError, match="row 17.*no completion"):
        M.truncate_sequence(p, c, max_length=6, row=17)
    with pytest.raises(ValueError, match="row 3: the completion is empty"):
        M.truncate_sequence(p, [], row=3)
    with pytest.raises(ValueError, match="mode"):
        M.truncate_sequence(p, c, mode="middle")
    with pytest.raises(ValueError, match="max_length"):
        M.truncate_sequence(p, c, max_length=0)


def test_mapo_rescale_against_official_formula(rng):
    act = rng.standard_normal((4, 7, 5)).astype(np.float32)
    m = (rng.random((4, 7)) > 0.3).astype(np.int32)
    m[1] = 0
    m[1, 2] = 1  # a single completion token: degenerate
    m[2] = 0  # empty
    act[3] = 0.5  # constant activations: degenerate
    m[3, :3] = 1
    got = M.mapo_rescale(act, m)
    want = R.mapo_rescale(act, m)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    g = np.asarray(got)
    assert g.min() >= 0 and g.max() <= 1
    assert np.all(g[m == 0] == 0)
    assert g[0][m[0] == 1].min() == 0 and g[0][m[0] == 1].max() == 1
    np.testing.assert_array_equal(g[1], np.where(m[1] == 1, 1.0, 0.0))


def test_mapo_group_averaging(rng):
    m = np.ones((2, 5), np.int32)
    mlp = [rng.standard_normal((2, 5, 3)) for _ in range(2)]
    attn = [rng.standard_normal((2, 5, 2, 4))]  # [B, T, heads, head_dim]
    logits = rng.standard_normal((2, 5, 11))
    got = M.mapo_activation_mask({"mlp": mlp, "attn": attn, "logits": logits}, m)
    r = lambda a: R.mapo_rescale(np.asarray(a), m)  # noqa: E731
    want = ((r(mlp[0]) + r(mlp[1])) / 2 + r(attn[0]) + r(logits)) / 3
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda a: M.mapo_activation_mask({"x": a}, m).sum())(jnp.asarray(logits))
    assert np.all(np.asarray(grad) == 0)  # detached
    with pytest.raises(ValueError, match="activations"):
        M.mapo_activation_mask({}, m)
    with pytest.raises(ValueError, match="mask"):
        M.mapo_rescale(logits, m[:, :-1])
