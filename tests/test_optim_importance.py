"""WAGLE importance (`alignjax.optim.importance`) against NumPy oracles on a tiny 2-layer MLP.

The gradients of the forget and retain NLL are derived by hand in float64 NumPy (backprop of
tanh -> softmax cross-entropy, token mean per batch), checked against central finite
differences, then compared with `accumulate_gradients` under x64. Scores, global and per-matrix
masks (exactly int(N * ratio) Trues, ties stable by flattened index) are compared with NumPy's
stable argsort. The transforms are checked bitwise over several jitted adamw steps: masked
weights unchanged under `masked_updates`, moved by exactly theta * (-lr) * wd per step under
`masked_gradients` (WAGLE's behaviour), unmasked weights equal to the plain adamw run's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import optim

D_IN, D_HID, D_OUT, B = 3, 4, 2, 5
RELEASED_RATIOS = (0.1, 0.2, 0.4, 0.6, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def init_params(rng):
    return {
        "l1": {"w": rng.normal(size=(D_IN, D_HID)), "b": rng.normal(size=D_HID)},
        "l2": {"w": rng.normal(size=(D_HID, D_OUT)), "b": rng.normal(size=D_OUT)},
    }


def make_batches(rng, n):
    return [(rng.normal(size=(B, D_IN)), rng.integers(0, D_OUT, size=B)) for _ in range(n)]


def np_loss(p, batch):
    x, y = batch
    z = np.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]
    logp = (
        z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1)[:, None]
    )
    return -logp[np.arange(len(y)), y].mean()


def np_grad(p, batch):
    """Hand backprop of `np_loss` (the NLL, token mean over the batch)."""
    x, y = batch
    h = np.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    z = h @ p["l2"]["w"] + p["l2"]["b"]
    prob = np.exp(z - z.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    dz = (prob - np.eye(D_OUT)[y]) / len(y)
    da = (dz @ p["l2"]["w"].T) * (1.0 - h**2)
    return {"l1": {"w": x.T @ da, "b": da.sum(0)}, "l2": {"w": h.T @ dz, "b": dz.sum(0)}}


def jax_loss(p, batch):
    x, y = batch
    z = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]
    logp = jax.nn.log_softmax(z)
    return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()


def tree_sum(trees):
    return jax.tree.map(lambda *xs: np.sum(xs, axis=0), *trees)


def np_top_mask(score_leaves, k):
    """Oracle: ranks = stable argsort of -S over the concatenation; True iff rank < k."""
    flat = np.concatenate([np.ravel(s) for s in score_leaves])
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    out, start = [], 0
    for s in score_leaves:
        out.append(mask[start : start + np.size(s)].reshape(np.shape(s)))
        start += np.size(s)
    return out


@pytest.fixture
def setup(rng):
    params = init_params(rng)
    return params, make_batches(rng, 3), make_batches(rng, 2)


def test_hand_gradient_matches_finite_differences(setup):
    params, forget, _ = setup
    analytic = np_grad(params, forget[0])
    eps = 1e-6
    for layer in params:
        for name, w in params[layer].items():
            numeric = np.zeros_like(w)
            for idx in np.ndindex(w.shape):
                plus = jax.tree.map(np.copy, params)
                minus = jax.tree.map(np.copy, params)
                plus[layer][name][idx] += eps
                minus[layer][name][idx] -= eps
                numeric[idx] = (np_loss(plus, forget[0]) - np_loss(minus, forget[0])) / (2 * eps)
            np.testing.assert_allclose(analytic[layer][name], numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulate_gradients_matches_numpy(setup, x64, reduction):
    params, forget, _ = setup
    got = optim.accumulate_gradients(jax_loss, params, iter(forget), reduction=reduction)
    want = tree_sum([np_grad(params, b) for b in forget])
    if reduction == "mean":
        want = jax.tree.map(lambda g: g / len(forget), want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)


def test_accumulate_gradients_traces_once_per_batch_shape(setup):
    params, forget, _ = setup
    traces = []

    def loss(p, batch):
        traces.append(batch[0].shape)
        return jax_loss(p, batch)

    one = optim.accumulate_gradients(loss, params, forget[:1])
    assert traces == [(B, D_IN)]
    traces.clear()
    short = (forget[0][0][:2], forget[0][1][:2])
    optim.accumulate_gradients(loss, params, forget + [short, short])
    assert traces == [(B, D_IN), (2, D_IN)]
    want = np_grad(params, forget[0])  # one batch: its gradient (float32 here)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_wagle_scores_and_baselines_match_numpy(setup, x64):
    params, forget, retain = setup
    g_f = optim.accumulate_gradients(jax_loss, params, forget)
    g_r = optim.accumulate_gradients(jax_loss, params, retain)
    np_gf = tree_sum([np_grad(params, b) for b in forget])
    np_gr = tree_sum([np_grad(params, b) for b in retain])
    mu = 1e-6
    want = jax.tree.map(lambda t, gf, gr: np.abs((t - gr / mu) * gf), params, np_gf, np_gr)
    got = optim.wagle_scores(params, g_f, g_r)  # mu = 1e-6 by default, as released
    assert optim.WAGLE_MU == mu
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(optim.gradient_scores(g_f)), jax.tree.leaves(np_gf)):
        np.testing.assert_allclose(a, np.abs(b), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(optim.magnitude_scores(params)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.abs(b))
    # The sign of g_f does not matter (forget NLL or its ascent); the sign of g_r does.
    neg = jax.tree.map(jnp.negative, g_f)
    for a, b in zip(jax.tree.leaves(optim.wagle_scores(params, neg, g_r)), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    flipped = optim.wagle_scores(params, g_f, jax.tree.map(jnp.negative, g_r), mu=1.0)
    plain = optim.wagle_scores(params, g_f, g_r, mu=1.0)
    assert not np.allclose(flipped["l1"]["w"], plain["l1"]["w"])


@pytest.mark.parametrize("ratio", RELEASED_RATIOS + (0.5, 0.29))
def test_global_mask_matches_oracle(setup, x64, ratio):
    params, forget, retain = setup
    scores = optim.wagle_scores(
        params,
        optim.accumulate_gradients(jax_loss, params, forget),
        optim.accumulate_gradients(jax_loss, params, retain),
    )
    mask = optim.top_ratio_mask(scores, ratio)
    n = sum(np.size(s) for s in jax.tree.leaves(scores))
    assert n == 26
    k = int(n * ratio)  # 0.29 * 26 = 7.54: floor 7; 0.1 * 26 = 2.6: floor 2
    want = np_top_mask([np.asarray(s) for s in jax.tree.leaves(scores)], k)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for m, w, p in zip(jax.tree.leaves(mask), want, jax.tree.leaves(params)):
        assert m.dtype == np.bool_ and m.shape == p.shape
        np.testing.assert_array_equal(m, w)
    assert sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) == k


def test_ties_are_stable_by_flattened_index():
    scores = {"a": np.array([1.0, 2.0, 2.0, 0.0]), "b": np.array([[2.0, 2.0], [1.0, 2.0]])}
    mask = optim.top_ratio_mask(scores, 0.5)  # k = 4 of the five 2.0s: the first four
    np.testing.assert_array_equal(mask["a"], [False, True, True, False])
    np.testing.assert_array_equal(mask["b"], [[True, True], [False, False]])
    want = np_top_mask(jax.tree.leaves(scores), 4)
    for m, w in zip(jax.tree.leaves(mask), want):
        np.testing.assert_array_equal(m, w)
    # All equal (signed zeros included): the first int(N * ratio) elements.
    zeros = {"z": np.array([0.0, -0.0, 0.0, -0.0, 0.0])}
    np.testing.assert_array_equal(optim.top_ratio_mask(zeros, 0.4)["z"], [1, 1, 0, 0, 0])
    ties = {"a": np.full(3, 5.0), "b": np.full(3, 5.0)}
    per = optim.top_ratio_mask(ties, 0.5, per_matrix=True)
    np.testing.assert_array_equal(per["a"], [True, False, False])
    np.testing.assert_array_equal(per["b"], [True, False, False])


def test_per_matrix_vs_global():
    scores = {"big": np.array([10.0, 13.0, 11.0, 12.0]), "small": np.array([1.0, 4.0, 2.0, 3.0])}
    glob = optim.top_ratio_mask(scores, 0.5)
    np.testing.assert_array_equal(glob["big"], [True] * 4)
    np.testing.assert_array_equal(glob["small"], [False] * 4)
    per = optim.top_ratio_mask(scores, 0.5, per_matrix=True)
    np.testing.assert_array_equal(per["big"], [False, True, False, True])
    np.testing.assert_array_equal(per["small"], [False, True, False, True])


def test_per_matrix_matches_oracle(rng):
    scores = {"w": rng.normal(size=(7, 5)), "v": rng.integers(0, 3, size=11).astype(float)}
    for ratio in RELEASED_RATIOS:
        mask = optim.top_ratio_mask(scores, ratio, per_matrix=True)
        for key, s in scores.items():
            (want,) = np_top_mask([s], int(s.size * ratio))
            np.testing.assert_array_equal(mask[key], want)
            assert int(np.sum(mask[key])) == int(s.size * ratio)


def test_random_scores_seeded(setup):
    params = setup[0]
    a, b = optim.random_scores(params, 0), optim.random_scores(params, 0)
    c = optim.random_scores(params, 1)
    for x, y, z, p in zip(*map(jax.tree.leaves, (a, b, c, params))):
        assert x.shape == p.shape and x.dtype == jnp.float32
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
        assert np.all((x >= 0) & (x < 1))


STEPS, LR, WD = 5, 0.1, 0.1


def run(tx, p0, grads):
    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    params = jax.tree.map(jnp.asarray, p0)
    state = tx.init(params)
    for g in grads:
        params, state = step(params, state, g)
    return params


def training_case(rng):
    p0 = jax.tree.map(lambda x: x.astype(np.float32), init_params(rng))
    mask = optim.top_ratio_mask(optim.random_scores(p0, 3), 0.5)
    p0["l1"]["b"][np.flatnonzero(~np.asarray(mask["l1"]["b"]))[0]] = -0.0  # a masked -0.0
    grads = [
        jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p0)
        for _ in range(STEPS)
    ]
    return p0, mask, grads


def test_masked_updates_keep_masked_weights_bitwise(rng):
    p0, mask, grads = training_case(rng)
    adamw = optax.adamw(LR, weight_decay=WD)
    got = run(optim.masked_updates(adamw, mask), p0, grads)
    plain = run(adamw, p0, grads)
    for g, w, p, m in zip(*map(jax.tree.leaves, (got, plain, p0, mask))):
        m = np.asarray(m)
        np.testing.assert_array_equal(bits(g)[~m], bits(p)[~m])  # unchanged, -0.0 included
        np.testing.assert_array_equal(bits(g)[m], bits(w)[m])  # Adam is elementwise
        assert np.all(np.asarray(g)[m] != p[m])


def test_masked_gradients_move_by_exactly_the_decay(rng):
    p0, mask, grads = training_case(rng)
    adamw = optax.adamw(LR, weight_decay=WD)
    got = run(optim.masked_gradients(adamw, mask), p0, grads)
    zeroed = [jax.tree.map(lambda g, m: np.where(m, g, 0), g, mask) for g in grads]
    plain = run(adamw, p0, zeroed)
    want = jax.tree.map(np.copy, p0)
    zero, neg_lr, wd = np.float32(0.0), np.float32(-LR), np.float32(WD)
    for _ in range(STEPS):  # zero moments: Adam's step is +0.0, the update -lr * (0 + wd * theta)
        want = jax.tree.map(lambda t: t + neg_lr * (zero + wd * t), want)
    for g, w, p, m, q in zip(*map(jax.tree.leaves, (got, want, p0, mask, plain))):
        m = np.asarray(m)
        np.testing.assert_array_equal(bits(g)[~m], bits(w)[~m])
        assert np.all(np.asarray(g)[~m & (p != 0)] != p[~m & (p != 0)])
        np.testing.assert_array_equal(bits(g)[m], bits(q)[m])


def test_bad_inputs_name_the_argument(setup):
    params, forget, retain = setup
    scores = optim.magnitude_scores(params)
    for ratio in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="`ratio`"):
            optim.top_ratio_mask(scores, ratio)
    with pytest.raises(TypeError, match="`ratio`"):
        optim.top_ratio_mask(scores, True)
    with pytest.raises(ValueError, match="`batches` is empty"):
        optim.accumulate_gradients(jax_loss, params, iter([]))
    with pytest.raises(ValueError, match="`reduction`"):
        optim.accumulate_gradients(jax_loss, params, forget, reduction="max")
    with pytest.raises(ValueError, match="`scores` leaf 'l1/b' contains NaN"):
        optim.top_ratio_mask({**scores, "l1": {**scores["l1"], "b": np.full(4, np.nan)}}, 0.5)
    g = optim.accumulate_gradients(jax_loss, params, forget)
    with pytest.raises(ValueError, match="`g_retain`.*missing 'l2/b'"):
        optim.wagle_scores(params, g, {"l1": g["l1"], "l2": {"w": g["l2"]["w"]}})
    with pytest.raises(ValueError, match="`mu`"):
        optim.wagle_scores(params, g, g, mu=0.0)

    mask = optim.top_ratio_mask(scores, 0.5)
    adamw = optax.adamw(LR, weight_decay=WD)
    missing = {"l1": mask["l1"], "l2": {"w": mask["l2"]["w"]}}
    extra = {**mask, "l3": {"w": np.ones(2, bool)}}
    wrong_shape = {**mask, "l1": {"w": mask["l1"]["w"].T, "b": mask["l1"]["b"]}}
    for make in (optim.masked_updates, optim.masked_gradients):
        with pytest.raises(ValueError, match="`mask`.*missing 'l2/b'"):
            make(adamw, missing).init(params)
        with pytest.raises(ValueError, match="`mask`.*unexpected 'l3/w'"):
            make(adamw, extra).init(params)
        with pytest.raises(ValueError, match=r"`mask` leaf 'l1/w' has shape \(4, 3\).*\(3, 4\)"):
            make(adamw, wrong_shape).init(params)
        with pytest.raises(ValueError, match="`mask` leaf 'l2/b' holds values other than 0/1"):
            make(adamw, {**mask, "l2": {**mask["l2"], "b": np.array([0.0, 2.0])}})
    # 0/1 floats and one flag per leaf are accepted
    ones = jax.tree.map(lambda m: np.asarray(m, np.float32), mask)
    optim.masked_updates(adamw, ones).init(params)
    optim.masked_updates(adamw, jax.tree.map(lambda m: True, mask)).init(params)


def test_save_load_round_trip_and_mismatch(setup, tmp_path):
    params = setup[0]
    mask = optim.top_ratio_mask(optim.random_scores(params, 0), 0.4)
    scores = jax.tree.map(lambda s: np.asarray(s).copy(), optim.random_scores(params, 1))
    scores["l1"]["b"][:2] = [-0.0, np.nan]
    for tree in (mask, scores):
        path = str(tmp_path / "mask.bin")  # the exact file name, no ".npz" appended
        optim.save_mask(path, tree)
        loaded = optim.load_mask(path, like=params)
        assert jax.tree.structure(loaded) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
            assert a.dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(bits(a), bits(b))
        assert sorted(np.load(path).files) == ["l1/b", "l1/w", "l2/b", "l2/w"]
    other = {**params, "l3": {"w": np.ones(2)}}
    with pytest.raises(ValueError, match="no array for `like` leaf 'l3/w'"):
        optim.load_mask(path, like=other)
    with pytest.raises(ValueError, match="holds 'l2/b', which is not a leaf of `like`"):
        optim.load_mask(path, like={"l1": params["l1"], "l2": {"w": params["l2"]["w"]}})
    wrong = {**params, "l2": {"w": params["l2"]["w"].T, "b": params["l2"]["b"]}}
    with pytest.raises(ValueError, match=r"leaf 'l2/w' has shape \(4, 2\), `like` has \(2, 4\)"):
        optim.load_mask(path, like=wrong)


def test_mask_is_state_not_a_compiled_constant(setup):
    """The mask travels in the optimizer state, so a new mask of the same shapes reuses the
    compiled step (one trace) and gives that mask's result."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), setup[0])
    grads = jax.tree.map(jnp.ones_like, params)
    traces = []

    @jax.jit
    def step(g, state, p):
        traces.append(1)
        return optim.masked_updates(optax.sgd(1.0), first).update(g, state, p)[0]

    first = optim.top_ratio_mask(optim.random_scores(params, 0), 0.5)
    second = jax.tree.map(jnp.logical_not, first)
    for mask in (first, second):
        state = optim.masked_updates(optax.sgd(1.0), mask).init(params)
        u = step(grads, state, params)
        for leaf, m in zip(jax.tree.leaves(u), jax.tree.leaves(mask)):
            np.testing.assert_array_equal(leaf, np.where(m, -1.0, 0.0))
    assert len(traces) == 1
