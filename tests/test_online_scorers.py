"""Scorers (`alignjax.online.scorers`): the weighted nansum of reward functions against NumPy
(None -> NaN, all-None rows NaN, the missing-EOS penalty), every bad-output error naming the
function and the row, the shipped sentiment reward on decoded completions, and Bradley-Terry win
rates / pair selection against a NumPy transcription of SPPO's `compute_prob.py`."""

import doctest
import functools
import importlib

import jax
import numpy as np
import pytest

from alignjax import data, losses, online
from alignjax.data.synthetic import sentiment_score


def _table_fn(table, name):
    """A reward function returning the fixed column `table` (None where NaN)."""

    def fn(prompts, completions, **kw):
        return [None if np.isnan(v) else float(v) for v in table]

    fn.__name__ = name
    return fn


def test_weighted_nansum_matches_numpy(rng):
    n, f = 12, 3
    table = rng.normal(size=(n, f))
    table[rng.random((n, f)) < 0.3] = np.nan
    table[4] = np.nan  # a row every function declines
    weights = [0.5, -1.25, 2.0]
    fns = [_table_fn(table[:, k], f"r{k}") for k in range(f)]
    s = online.score(fns, ["p"] * n, ["c"] * n, weights=weights)
    np.testing.assert_array_equal(np.isnan(s.per_function), np.isnan(table))
    np.testing.assert_allclose(s.per_function, table.astype(np.float32), rtol=0, atol=0)
    expected = np.nansum(table * np.asarray(weights), axis=1)
    expected[np.isnan(table).all(1)] = np.nan
    np.testing.assert_allclose(s.total, expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(s.total[4]) and np.isfinite(np.delete(s.total, 4)).all()
    assert s.names == ("r0", "r1", "r2") and s.per_function.dtype == np.float32
    unweighted = online.score(fns, ["p"] * n, ["c"] * n)
    expected = np.nansum(table, axis=1)
    expected[np.isnan(table).all(1)] = np.nan
    np.testing.assert_allclose(unweighted.total, expected, rtol=1e-6, atol=1e-6)


def test_columns_and_completion_ids_reach_the_functions():
    seen = {}

    def exact(prompts, completions, answer, completion_ids, **kw):
        seen.update(prompts=prompts, ids=completion_ids, kw=kw)
        return [float(c == a) for c, a in zip(completions, answer)]

    s = online.score(
        exact, ["1+1", "2+2"], ["2", "5"], columns={"answer": ["2", "4"], "level": [1, 2]},
        completion_ids=np.array([[7, 2], [8, 0]]),
    )  # fmt: skip
    np.testing.assert_array_equal(s.total, [1.0, 0.0])
    assert seen == {"prompts": ["1+1", "2+2"], "ids": [[7, 2], [8, 0]], "kw": {"level": [1, 2]}}


def test_missing_eos_penalty():
    table = np.array([1.0, 2.0, np.nan, 4.0])
    fn = _table_fn(table, "r")
    missing = np.array([True, False, True, False])
    s = online.score(fn, list("abcd"), list("abcd"), missing_eos=missing, missing_eos_penalty=1.5)
    np.testing.assert_allclose(s.total, [-0.5, 2.0, np.nan, 4.0])
    np.testing.assert_allclose(s.per_function[:, 0], table)  # the penalty is on the total only
    same = online.score(fn, list("abcd"), list("abcd"), missing_eos=missing)
    np.testing.assert_allclose(same.total, table)
    with pytest.raises(ValueError, match="`missing_eos_penalty` needs `missing_eos`"):
        online.score(fn, list("abcd"), list("abcd"), missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match=r"`missing_eos` must have shape \(4,\)"):
        online.score(fn, list("abcd"), list("abcd"), missing_eos=missing[:3])


def test_bad_reward_outputs_name_the_function_and_row():
    p, c = ["p"] * 3, ["x", "y", "z"]

    def short(prompts, completions, **kw):
        return [1.0, 2.0]

    def nan_at_1(prompts, completions, **kw):
        return [1.0, float("nan"), 0.0]

    def inf_at_2(prompts, completions, **kw):
        return [1.0, 0.0, np.inf]

    def text_at_2(prompts, completions, **kw):
        return [1.0, 0.0, "good"]

    def scalar(prompts, completions, **kw):
        return 1.0

    with pytest.raises(ValueError, match=r"'short' returned 2 rewards, but 3 were expected"):
        online.score(short, p, c)
    with pytest.raises(ValueError, match=r"'nan_at_1' returned nan at row 1.*None"):
        online.score(nan_at_1, p, c)
    with pytest.raises(ValueError, match=r"'inf_at_2' returned inf at row 2"):
        online.score(inf_at_2, p, c)
    with pytest.raises(TypeError, match=r"'text_at_2' returned str 'good' at row 2"):
        online.score(text_at_2, p, c)
    with pytest.raises(TypeError, match=r"'scalar' returned float"):
        online.score(scalar, p, c)
    with pytest.raises(ValueError, match=r"'short' returned 2"):  # named through partial
        online.score([functools.partial(short)], p, c)
    ok = _table_fn(np.zeros(3), "ok")
    with pytest.raises(ValueError, match=r"`weights` must have one entry per reward function"):
        online.score([ok, ok], p, c, weights=[1.0])
    with pytest.raises(ValueError, match=r"`columns\['answer'\]` must have 3 entries"):
        online.score(ok, p, c, columns={"answer": [1, 2]})
    with pytest.raises(ValueError, match=r"`prompts` has 2 entries but `completions` has 3"):
        online.score(ok, p[:2], c)
    with pytest.raises(ValueError, match="reward_fns"):
        online.score([], p, c)
    # numbers of any kind are fine: ints, bools, NumPy and JAX scalars
    fn = _table_fn(np.zeros(3), "zeros")

    def mixed(prompts, completions, **kw):
        return [1, np.float32(2.5), jax.numpy.asarray(-1.0)]

    s = online.score([fn, mixed], p, c)
    np.testing.assert_array_equal(s.total, [1.0, 2.5, -1.0])


def test_sentiment_reward_on_decoded_completions():
    tok = data.shipped_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    texts = [
        "the food was great and the staff friendly",
        "the soup was cold",
        "the bed was dirty and the music was noisy and the coffee was stale",  # never stopped
    ]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [rows[0] + [eos], rows[1] + [eos], rows[2]]
    width = len(rows[2])  # the row without EOS ran to max_new_tokens
    ids = np.full((3, width), pad, np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    with_mask = online.decode_completions(tok, ids, mask)
    assert with_mask == texts
    cut = online.decode_completions(tok, np.where(mask == 1, ids, eos))  # cut at the first EOS
    assert cut == texts
    kept = online.decode_completions(tok, ids, mask, skip_special_tokens=False)
    assert kept[:2] == [t + tok.eos_token for t in texts[:2]]
    rewards = online.sentiment_reward(["p"] * 3, with_mask)
    assert rewards == [2.0, -1.0, -3.0]  # great + friendly; cold; dirty + noisy + stale
    assert rewards == [float(sentiment_score(t)) for t in texts]
    chat = online.decode_completions(tok, ids, mask, conversational=True)
    assert chat[0] == [{"role": "assistant", "content": texts[0]}]
    assert online.sentiment_reward(["p"] * 3, chat) == rewards
    left = np.array([[pad, pad] + rows[1][:-1]], np.int32)
    left_mask = (left != pad).astype(np.int32)
    assert online.decode_prompts(tok, left, left_mask) == [texts[1]]
    with pytest.raises(TypeError, match="completion 1"):
        online.sentiment_reward(["p"] * 2, ["fine", 3])


def _compute_prob(scores):
    """NumPy transcription of uclaml/SPPO scripts/compute_prob.py (from_ranks, prepare_score)
    for one prompt, K samples: prb[i][j] = 1 / (1 + exp(s_j - s_i)); chosen / rejected =
    argmax / argmin of the scores; P_w, P_l = row sums / K; chosen_probs = prb[w][l]."""
    k = len(scores)
    prb = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            prb[i][j] = 1 / (1 + np.exp(scores[j] - scores[i]))
    w, l = np.argmax(scores), np.argmin(scores)
    return prb, w, l, prb.sum(axis=1)[w] / k, prb.sum(axis=1)[l] / k, prb[w][l]


@pytest.mark.parametrize("k", [5, 3])
def test_bradley_terry_win_rates_match_compute_prob(rng, k):
    scores = rng.normal(scale=2.0, size=(6, k))
    scores[1, :] = 0.7  # all tied: chosen == rejected == 0, as the official pipeline
    scores[2, 1] = scores[2, k - 1] = scores[2].max() + 1  # a tie for the max
    scores[3, 0] = scores[3, 2] = scores[3].min() - 1  # a tie for the min
    p = np.asarray(online.bradley_terry_win_rates(scores.astype(np.float32)))
    wr = np.asarray(online.win_rate_vs_policy(p))
    pairs = online.max_min_pairs(scores.astype(np.float32))
    wp = losses.win_probabilities(scores.astype(np.float32))
    for row, s in enumerate(scores):
        prb, w, l, pw, pl, pwl = _compute_prob(s)
        np.testing.assert_allclose(p[row], prb, atol=1e-6)
        np.testing.assert_allclose(np.diag(p[row]), 0.5)
        np.testing.assert_allclose(p[row] + p[row].T, 1.0, atol=1e-6)
        np.testing.assert_allclose(wr[row], prb.sum(axis=1) / k, atol=1e-6)
        assert (int(pairs.chosen[row]), int(pairs.rejected[row])) == (w, l)
        # the loss's inputs (`losses.win_probabilities`) are these same numbers
        np.testing.assert_allclose([wr[row, w], wr[row, l], p[row, w, l]], [pw, pl, pwl], atol=1e-6)
        np.testing.assert_allclose(
            [wp.chosen_win_prob[row], wp.rejected_win_prob[row], wp.win_prob[row]],
            [pw, pl, pwl], atol=1e-6,
        )  # fmt: skip
    assert (int(pairs.chosen[1]), int(pairs.rejected[1])) == (0, 0)
    assert int(pairs.chosen[2]) == 1 and int(pairs.rejected[3]) == 0
    far = np.asarray(online.bradley_terry_win_rates(np.array([[0.0, 1000.0]])))
    np.testing.assert_array_equal(far[0], [[0.5, 0.0], [1.0, 0.5]])  # no overflow
    jitted = jax.jit(online.bradley_terry_win_rates)(scores.astype(np.float32))
    np.testing.assert_allclose(jitted, p, atol=1e-7)


def test_win_rate_inputs_are_checked():
    with pytest.raises(ValueError, match=r"`scores` must be \[P, K\]"):
        online.bradley_terry_win_rates(np.zeros(3))
    with pytest.raises(ValueError, match="`scores` row 1 is not finite"):
        online.max_min_pairs(np.array([[0.0, 1.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"`win_rates` must be \[P, K, K\]"):
        online.win_rate_vs_policy(np.zeros((2, 3, 4)))


def test_first_second_pairs_follow_online_dpo():
    """TRL Online DPO: `mask = first_half >= second_half`, chosen rows `b + B * ~mask`,
    rejected rows `b + B * mask` (ties: the first sample is chosen)."""
    r = np.array([1.0, 0.0, 2.0, 3.0, 1.0, 0.0, 2.5, -1.0])
    b = 4
    mask = r[:b] >= r[b:]
    pairs = online.first_second_pairs(r)
    np.testing.assert_array_equal(pairs.chosen, np.arange(b) + b * ~mask)
    np.testing.assert_array_equal(pairs.rejected, np.arange(b) + b * mask)
    np.testing.assert_array_equal(pairs.chosen, [0, 1, 6, 3])  # rows 1 and 5 tie: first wins
    with pytest.raises(ValueError, match="`rewards` row 5 is NaN"):
        online.first_second_pairs(np.array([1.0, 0.0, 2.0, 3.0, 1.0, np.nan]))
    with pytest.raises(ValueError, match=r"\[2B\]"):
        online.first_second_pairs(np.zeros(3))


def test_docstring_example_runs():
    result = doctest.testmod(importlib.import_module("alignjax.online.scorers"))
    assert result.attempted > 0 and result.failed == 0
