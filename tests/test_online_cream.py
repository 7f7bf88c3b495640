"""CREAM (alignjax.online.cream) against scipy, brute-force pair counts and float64 NumPy.

* `kendall_tau`: the official `cal_consistency.py` recipe (ordinal ranks, then
  `scipy.stats.kendalltau`) on scores with many ties, and a brute-force NumPy pair count: 1e-12
  (tau is a ratio of integers <= 21 over 21; float64 gives it to 1 ulp).
* `consistency`: the join by prompt id with a prompt skipped by each model and a NaN score;
  the official script's shifted assignment is reproduced in NumPy and shown NOT to be ours.
* `pair_consistency`: `data.py`'s dyn / avg rules. `preference_pairs`: argmax / argmin, ties.
* `cream_dpo`: per-pair losses, mean, rewards and metrics vs a float64 NumPy derivation of
  C softplus(-u) + (1 - C) softplus(u) to 1e-10 relative (a few dozen float64 operations);
  its gradient vs the NumPy analytic gradient (1e-10) and finite differences (check_grads);
  C = 1 is `losses.dpo` sigmoid bit for bit; the loss in u is stationary at s(u) = C.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax import losses as L
from alignjax import online

stats = pytest.importorskip("scipy.stats")


def brute_tau(a, b):
    """tau-a over ordinal ranks by counting pairs: i ranks below j iff s_i < s_j, or s_i == s_j
    and i < j (rankdata's 'ordinal' tie-break)."""
    n, total = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            total += (1 if a[i] <= a[j] else -1) * (1 if b[i] <= b[j] else -1)
    return total / (n * (n - 1) / 2)


def official_tau(a, b):
    r1, r2 = stats.rankdata(a, method="ordinal"), stats.rankdata(b, method="ordinal")
    return stats.kendalltau(r1, r2).statistic


@pytest.mark.parametrize("n", [2, 5, 7])
def test_kendall_tau_matches_official_recipe(x64, rng, n):
    a = rng.integers(0, 3, (40, n)).astype(np.float64)  # many ties
    b = rng.integers(0, 3, (40, n)).astype(np.float64)
    a[0], b[1] = 1.0, 2.0  # a row of all-equal scores: ranks by position, tau still defined
    b[2] = a[2]  # identical rankings: tau = 1
    a[3], b[3] = np.arange(n), -np.arange(n)  # reversed: tau = -1
    got = np.asarray(online.kendall_tau(a, b))
    np.testing.assert_allclose(got, [official_tau(x, y) for x, y in zip(a, b)], atol=1e-12)
    np.testing.assert_allclose(got, [brute_tau(x, y) for x, y in zip(a, b)], atol=1e-12)
    assert got[2] == 1.0 and got[3] == -1.0
    # Without ties it is plain Kendall tau (tau-a = tau-b) of the raw scores.
    c, d = rng.normal(size=(10, n)), rng.normal(size=(10, n))
    want = [stats.kendalltau(x, y).statistic for x, y in zip(c, d)]
    np.testing.assert_allclose(online.kendall_tau(c, d), want, atol=1e-12)


def official_consistency(file1, file2, key_order):
    """`cal_consistency.py` restated with a fixed iteration order for its `set` of keys:
    skip invalid keys with `continue`, then zip the same keys with the shorter value list."""
    keys = [k for k in key_order if k in file1 and k in file2]
    rates = []
    for key in keys:
        s1, s2 = file1[key], file2[key]
        if len(s1) != len(s2) or np.isnan(s1).any() or np.isnan(s2).any():
            continue
        rates.append((official_tau(s1, s2) + 1) / 2)
    return dict(zip(keys, rates))


# Permutations of 0..4 with k = 0..5 inversions: against ascending scores tau = 1 - k / 5, so
# every prompt below has its own C and a value moved to another prompt cannot go unnoticed.
INVERSIONS = [
    [0, 1, 2, 3, 4],
    [1, 0, 2, 3, 4],
    [2, 0, 1, 3, 4],
    [3, 0, 1, 2, 4],
    [4, 0, 1, 2, 3],
    [4, 1, 0, 2, 3],
]


def test_consistency_joins_by_prompt_id_and_does_not_shift(x64, rng):
    ids_cur = ["p0", "p1", "p2", "p3", "p4", "p5"]
    cur = np.tile(np.arange(5.0), (6, 1)) + rng.normal(0, 0.01, (6, 1))
    # The previous model: another order, no p2, an extra p9, and a NaN score on p4.
    ids_prev = ["p5", "p9", "p3", "p4", "p1", "p0"]
    prev = np.array([INVERSIONS[int(k[1])] if k != "p9" else INVERSIONS[0] for k in ids_prev])
    prev = prev.astype(np.float64)
    prev[3, 1] = np.nan
    got = online.consistency(cur, prev, ids_cur, ids_prev)
    assert got.prompt_ids.tolist() == ["p0", "p1", "p3", "p5"]
    assert sorted(got.skipped_ids.tolist()) == ["p2", "p4", "p9"] and got.num_skipped == 3
    row_prev = {k: i for i, k in enumerate(ids_prev)}
    for key, c, tau in zip(got.prompt_ids, got.consistency, got.tau):
        want = official_tau(cur[ids_cur.index(key)], prev[row_prev[key]])
        np.testing.assert_allclose(want, 1 - int(key[1]) / 5, atol=1e-12)
        np.testing.assert_allclose(tau, want, atol=1e-12)
        np.testing.assert_allclose(c, (want + 1) / 2, atol=1e-12)
    np.testing.assert_allclose(got.mean, np.mean(got.consistency), atol=1e-15)
    # The official script iterates its key set (order fixed here), `continue`s past p4 (NaN),
    # then zips all keys with the shorter list: p4 gets p5's C, p5 gets p0's, p0 gets p3's and
    # p3 none. Ours keeps each C on its own prompt.
    file1 = {k: cur[i] for i, k in enumerate(ids_cur)}
    file2 = {k: prev[i] for i, k in enumerate(ids_prev)}
    shifted = official_consistency(file1, file2, ["p1", "p4", "p5", "p0", "p3"])
    ours = dict(zip(got.prompt_ids.tolist(), np.asarray(got.consistency).tolist()))
    assert shifted["p1"] == pytest.approx(ours["p1"], abs=1e-12)  # before the skip: aligned
    assert shifted["p4"] == pytest.approx(ours["p5"], abs=1e-12)
    assert shifted["p5"] == pytest.approx(ours["p0"], abs=1e-12)
    assert shifted["p0"] == pytest.approx(ours["p3"], abs=1e-12)
    assert "p3" not in shifted and "p4" not in ours
    for key in ("p5", "p0"):
        assert abs(ours[key] - shifted[key]) >= 0.05  # distinct C's differ by multiples of 0.1


def test_preference_pairs_and_pair_consistency(x64):
    scores = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.5, -1.0, 4.0, -1.0]])
    pairs = online.preference_pairs(scores, ["a", "b", "c"])
    assert pairs.prompt_ids.tolist() == ["a", "c"] and pairs.skipped_ids.tolist() == ["b"]
    np.testing.assert_array_equal(pairs.chosen, [1, 2])  # first index on ties
    np.testing.assert_array_equal(pairs.rejected, [3, 1])
    result = online.Consistency(
        np.array(["a", "c", "z"]),
        jnp.zeros(3),
        jnp.array([0.9, 0.3, 0.0]),
        np.array([]),
    )
    # data.py: mean over the training pairs that have a C ("z" has no pair: not in the mean).
    dyn, missing = online.pair_consistency(["c", "q", "a"], result, strategy="dyn")
    np.testing.assert_allclose(dyn, [0.3, 0.6, 0.9], atol=1e-15)
    assert missing == 1
    avg, missing = online.pair_consistency(["c", "q", "a"], result, strategy="avg")
    np.testing.assert_allclose(avg, [0.6, 0.6, 0.6], atol=1e-15)
    assert missing == 1


def test_consistency_input_errors():
    s = np.zeros((3, 4))
    with pytest.raises(ValueError, match="scores_b"):
        online.kendall_tau(s, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="scores_a"):
        online.kendall_tau(np.zeros((3, 1)), np.zeros((3, 1)))  # N < 2
    with pytest.raises(ValueError, match="previous_scores"):
        online.consistency(s, np.zeros((3, 5)), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="current_scores"):
        online.consistency(np.zeros(3), s, [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="prompt_ids_previous"):
        online.consistency(s, s, [0, 1, 2], [0, 1, 1])  # duplicate ids
    with pytest.raises(ValueError, match="prompt_ids_current"):
        online.consistency(s, s, [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="strategy"):
        online.pair_consistency([0], online.consistency(s, s, [0, 1, 2], [0, 1, 2]), strategy="x")
    with pytest.raises(ValueError, match="prompt_ids"):
        online.pair_consistency([7], online.consistency(s, s, [0, 1, 2], [0, 1, 2]))
    with pytest.raises(ValueError, match="scores"):
        online.preference_pairs(np.zeros((2, 1)), [0, 1])


# ----------------------------------------------------------------------------- the loss


def make(rng, b=6, t=7):
    pol = -rng.gamma(2.0, 1.0, (2 * b, t))
    ref = pol + rng.normal(0, 0.5, (2 * b, t))
    mask = (rng.random((2 * b, t)) > 0.3).astype(np.float64)
    batch = L.PreferenceBatch.from_stacked(jnp.asarray(pol), jnp.asarray(mask), jnp.asarray(ref))
    return batch, pol, ref, mask


def numpy_cream(pol, ref, mask, c, beta):
    b = pol.shape[0] // 2
    seq = (pol * mask).sum(1)
    ref_seq = (ref * mask).sum(1)
    a, r = seq[:b] - ref_seq[:b], seq[b:] - ref_seq[b:]
    u = beta * (a - r)
    softplus = lambda z: np.logaddexp(0.0, z)  # noqa: E731
    losses = c * softplus(-u) + (1 - c) * softplus(u)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    dl_du = (-c * sig(-u) + (1 - c) * sig(u)) / b  # of the mean loss
    grad = np.concatenate([(beta * dl_du)[:, None] * mask[:b], (-beta * dl_du)[:, None] * mask[b:]])
    return losses, beta * a, beta * r, u, grad


@pytest.mark.parametrize("scalar", [False, True])
def test_cream_dpo_matches_numpy(x64, rng, scalar):
    batch, pol, ref, mask = make(rng)
    c = np.float64(0.35) if scalar else rng.random(6)
    beta = 0.1
    losses, rc, rr, _, grad = numpy_cream(pol, ref, mask, c, beta)
    out = online.cream_dpo(batch, jnp.asarray(c), beta=beta)
    np.testing.assert_allclose(out.losses, losses, rtol=1e-10)
    np.testing.assert_allclose(out.loss, losses.mean(), rtol=1e-10)
    np.testing.assert_allclose(out.chosen_rewards, rc, rtol=1e-10)
    np.testing.assert_allclose(out.rejected_rewards, rr, rtol=1e-10)
    np.testing.assert_allclose(out.metrics["cream/consistency_mean"], np.mean(c), rtol=1e-12)
    np.testing.assert_allclose(out.metrics["rewards/margins"], np.mean(rc - rr), rtol=1e-10)
    # (accuracies are float32 in `reward_metrics`: one rounding of k/6)
    np.testing.assert_allclose(out.metrics["rewards/accuracies"], np.mean(rc > rr), rtol=1e-7)
    assert set(out.terms) == {"cream_dpo"}

    def loss_of(chosen, rejected):
        b = L.PreferenceBatch(
            chosen,
            rejected,
            batch.chosen_mask,
            batch.rejected_mask,
            batch.ref_chosen_logps,
            batch.ref_rejected_logps,
        )
        return online.cream_dpo(b, jnp.asarray(c), beta=beta).loss

    g = jax.grad(loss_of, argnums=(0, 1))(batch.chosen_logps, batch.rejected_logps)
    np.testing.assert_allclose(np.concatenate(g), grad, rtol=1e-10, atol=1e-14)
    check_grads(loss_of, (batch.chosen_logps, batch.rejected_logps), order=2, modes=["rev"])
    jitted = jax.jit(lambda bb, cc: online.cream_dpo(bb, cc, beta=beta).loss)(batch, c)
    np.testing.assert_allclose(jitted, losses.mean(), rtol=1e-10)


def test_full_consistency_is_dpo_and_optimum_is_logit_c(x64, rng):
    batch, pol, ref, mask = make(rng)
    ours = online.cream_dpo(batch, 1.0, beta=0.1)
    dpo = L.dpo(batch, loss_type="sigmoid", beta=0.1)
    np.testing.assert_array_equal(ours.losses, dpo.losses)
    # C = 1/2: the loss is symmetric in u, so its gradient vanishes where the policy is the
    # reference (u = 0). In general d/du [C sp(-u) + (1-C) sp(u)] = s(u) - C: zero at logit(C).
    zero = online.cream_dpo(
        L.PreferenceBatch(
            batch.ref_chosen_logps,
            batch.ref_rejected_logps,
            batch.chosen_mask,
            batch.rejected_mask,
            batch.ref_chosen_logps,
            batch.ref_rejected_logps,
        ),
        0.5,
    )
    assert float(jnp.max(jnp.abs(zero.losses - np.log(2.0)))) <= 1e-15
    g = jax.grad(
        lambda x: (
            online.cream_dpo(
                L.PreferenceBatch(
                    x,
                    batch.ref_rejected_logps,
                    batch.chosen_mask,
                    batch.rejected_mask,
                    batch.ref_chosen_logps,
                    batch.ref_rejected_logps,
                ),
                0.5,
            ).loss
        )
    )(batch.ref_chosen_logps)
    assert float(jnp.max(jnp.abs(g))) == 0.0
    c = rng.uniform(0.05, 0.95, 6)
    _, _, _, u, _ = numpy_cream(pol, ref, mask, c, 0.1)
    sig = 1 / (1 + np.exp(-u))
    np.testing.assert_allclose(numpy_cream(pol, ref, mask, sig, 0.1)[4], 0.0, atol=1e-15)
    b = batch.chosen_logps.shape[0]
    grad_c = jax.grad(
        lambda x: (
            online.cream_dpo(
                L.PreferenceBatch(
                    x,
                    batch.rejected_logps,
                    batch.chosen_mask,
                    batch.rejected_mask,
                    batch.ref_chosen_logps,
                    batch.ref_rejected_logps,
                ),
                jnp.asarray(sig),
                beta=0.1,
            ).loss
        )
    )(batch.chosen_logps)
    assert float(jnp.max(jnp.abs(grad_c))) <= 1e-15 * b


def test_cream_dpo_input_errors(rng):
    batch, *_ = make(rng)
    with pytest.raises(ValueError, match="consistency"):
        online.cream_dpo(batch, 1.5)
    with pytest.raises(ValueError, match="consistency"):
        online.cream_dpo(batch, jnp.full((6,), -0.1))
    with pytest.raises(ValueError, match="consistency"):
        online.cream_dpo(batch, jnp.full((5,), 0.5))
    with pytest.raises(ValueError, match="beta"):
        online.cream_dpo(batch, 0.5, beta=0.0)
    no_ref = L.PreferenceBatch(
        batch.chosen_logps, batch.rejected_logps, batch.chosen_mask, batch.rejected_mask
    )
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        online.cream_dpo(no_ref, 0.5)
