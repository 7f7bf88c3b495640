"""PCGrad, MGDA and per-term gradients, against hand-derived values and float64 NumPy references
(a direct transcription of PCGrad's Algorithm 1 and an exact min-norm solver that enumerates
the faces of the simplex)."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.losses import LossOutput, LossTerm, PreferenceBatch, combine
from alignjax.ops import token_logps
from alignjax.optim.multi_objective import mgda, pcgrad, pcgrad_projections, term_gradients

# ------------------------------------------------------------------------------------- helpers


def as_tree(vectors):
    """[K, n] (or [n]) rows as a pytree split over two leaves of different shapes, so every
    check also covers inner products across leaves."""
    v = jnp.asarray(vectors)
    return {"a": v[..., :1], "b": {"c": v[..., 1:]}}


def as_flat(tree):
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"]["c"])], axis=-1)


def np_project(g, i, order):
    """Algorithm 1 of Yu et al. 2020, literally, in float64: g_i projected against g_j, j in
    `order`."""
    gi = g[i].astype(np.float64).copy()
    for j in order:
        dot = gi @ g[j]
        if dot < 0:
            gi -= dot / (g[j] @ g[j]) * g[j]
    return gi


def np_pcgrad_rows(g, orders):
    return np.stack([np_project(g, i, order) for i, order in enumerate(orders)])


def fixed_orders(k):
    return [[j for j in range(k) if j != i] for i in range(k)]


def np_min_norm(g):
    """argmin_{alpha in simplex} ||alpha @ g||^2 exactly: on each face S, the KKT system
    2 G_SS a + mu 1 = 0, 1.a = 1; keep feasible solutions, return the best."""
    gram = g @ g.T
    k = len(g)
    best_value, best_alpha = np.inf, None
    for size in range(1, k + 1):
        for face in itertools.combinations(range(k), size):
            face = list(face)
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = 2 * gram[np.ix_(face, face)]
            system[:size, size] = system[size, :size] = 1
            rhs = np.r_[np.zeros(size), 1.0]
            solution, *_ = np.linalg.lstsq(system, rhs, rcond=None)
            alpha = np.zeros(k)
            alpha[face] = solution[:size]
            if np.all(alpha >= -1e-12) and abs(alpha.sum() - 1) < 1e-9:
                value = alpha @ gram @ alpha
                if value < best_value - 1e-15:
                    best_value, best_alpha = value, alpha
    return best_alpha


@functools.partial(jax.jit, static_argnames="reduction")
def surgery(tree, key=None, reduction="sum"):
    """PCGrad's projected rows and its direction, in one compiled call."""
    return pcgrad_projections(tree, key=key), pcgrad(tree, key=key, reduction=reduction)


def assert_min_norm_kkt(g, d, alpha, atol):
    """d . g_k >= ||d||^2 for every k (the min-norm optimality condition) and alpha in the
    simplex."""
    g, d, alpha = np.asarray(g), np.asarray(d), np.asarray(alpha)
    assert np.all(alpha >= 0)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(d, alpha @ g, atol=1e-12)
    assert np.all(g @ d >= d @ d - atol), (g @ d, d @ d)


# ------------------------------------------------------------------------------------- PCGrad


def test_pcgrad_two_conflicting_by_hand(x64):
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1
    # g1' = g1 - (-1 / 2) g2 = (1/2, 1/2);  g2' = g2 - (-1 / 1) g1 = (0, 1)
    expected = np.array([[0.5, 0.5], [0.0, 1.0]])
    projected, total = surgery(as_tree(g))
    np.testing.assert_allclose(as_flat(projected), expected, atol=1e-15)
    np.testing.assert_allclose(as_flat(total), [0.5, 1.5], atol=1e-15)
    _, mean = surgery(as_tree(g), reduction="mean")
    np.testing.assert_allclose(as_flat(mean), [0.25, 0.75], atol=1e-15)


def test_pcgrad_projection_is_orthogonal_to_the_conflicting_gradient(x64, rng):
    g = rng.normal(size=(2, 7))
    g[1] -= ((g[0] @ g[1]) / (g[0] @ g[0]) + 1) * g[0]  # now g1 . g2 = -||g1||^2
    assert g[0] @ g[1] < -1
    projected = as_flat(surgery(as_tree(g))[0])
    assert abs(projected[0] @ g[1]) < 1e-12
    assert abs(projected[1] @ g[0]) < 1e-12
    np.testing.assert_allclose(projected, np_pcgrad_rows(g, fixed_orders(2)), atol=1e-13)


def test_pcgrad_aligned_gradients_are_unchanged(x64):
    g = np.array([[1.0, 2.0], [3.0, -1.0]])  # g1 . g2 = 1 > 0
    projected, total = surgery(as_tree(g))
    np.testing.assert_allclose(as_flat(total), [4.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(as_flat(projected), g, atol=1e-15)


def test_pcgrad_three_objectives_fixed_order_by_hand(x64):
    g = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    # i = 1: (1,0) -[g2, dot -1]-> (1/2,1/2) -[g3, dot -1/2]-> (1/2, 0)
    # i = 2: (-1,1) -[g1, dot -1]-> (0,1) -[g3, dot -1]-> (0, 0)
    # i = 3: (0,-1) -[g1, dot 0: kept]-> (0,-1) -[g2, dot -1]-> (-1/2,-1/2)
    expected = np.array([[0.5, 0.0], [0.0, 0.0], [-0.5, -0.5]])
    projected, total = surgery(as_tree(g))
    np.testing.assert_allclose(as_flat(projected), expected, atol=1e-15)
    np.testing.assert_allclose(as_flat(total), [0.0, -0.5], atol=1e-15)


def test_pcgrad_fixed_order_matches_numpy_algorithm(x64, rng):
    g = rng.normal(size=(4, 9))
    reference = np_pcgrad_rows(g, fixed_orders(4))
    projected, total = surgery(as_tree(g))
    np.testing.assert_allclose(as_flat(projected), reference, atol=1e-12)
    np.testing.assert_allclose(as_flat(total), reference.sum(0), atol=1e-12)


def test_pcgrad_random_order_is_one_of_the_valid_orders(x64, rng):
    k = 4
    g = rng.normal(size=(k, 5))
    # Row i may come from any order of the other objectives.
    candidates = [
        np.stack([np_project(g, i, order) for order in itertools.permutations(others)])
        for i, others in enumerate(fixed_orders(k))
    ]
    both = jax.jit(lambda tree, key: (pcgrad_projections(tree, key=key), pcgrad(tree, key=key)))
    seen = set()
    for seed in range(8):
        projected, combined = both(as_tree(g), jax.random.key(seed))
        rows = as_flat(projected)
        choice = []
        for i in range(k):
            distance = np.abs(candidates[i] - rows[i]).max(axis=1)
            assert distance.min() < 1e-12, (i, rows[i], candidates[i])
            choice.append(int(distance.argmin()))
        seen.add(tuple(choice))
        np.testing.assert_allclose(as_flat(combined), rows.sum(0), atol=1e-12)
    assert len(seen) > 1  # the key does change the order
    assert both._cache_size() == 1


def test_pcgrad_zero_gradients_stay_finite(x64):
    g = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    expected = np_pcgrad_rows(g, fixed_orders(3))  # a zero g_j never projects
    np.testing.assert_allclose(as_flat(surgery(as_tree(g))[0]), expected)
    projected, total = surgery(as_tree(np.zeros((3, 2))))
    np.testing.assert_array_equal(as_flat(projected), np.zeros((3, 2)))
    np.testing.assert_array_equal(as_flat(total), np.zeros(2))


def test_pcgrad_keeps_leaf_dtypes_and_compiles_once(rng):
    tree = {"w": jnp.ones((3, 4, 2), jnp.bfloat16), "b": jnp.ones((3, 2), jnp.float32)}
    step = jax.jit(lambda tree: pcgrad(tree, reduction="mean"))
    for _ in range(2):
        tree = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)
        out = step(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, jax.tree.map(lambda x: x[0], tree))
    assert step._cache_size() == 1
    # Values: the float64 NumPy algorithm on the same (bfloat16-rounded) inputs, to bf16 precision.
    rows = np.concatenate(
        [np.asarray(x, np.float64).reshape(3, -1) for x in jax.tree.leaves(tree)], 1
    )
    expected = np_pcgrad_rows(rows, fixed_orders(3)).mean(0)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(out)])
    np.testing.assert_allclose(flat, expected, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------- MGDA


@pytest.mark.parametrize(
    "g, alpha, d",
    [
        # alpha_1 = ((g2 - g1) . g2) / ||g1 - g2||^2
        ([[1.0, 0.0], [-1.0, 2.0]], [0.75, 0.25], [0.5, 0.5]),  # (5 + 1) / 8
        ([[1.0, 0.0], [-1.0, 1.0]], [0.6, 0.4], [0.2, 0.4]),  # (2 + 1) / 5
        ([[1.0, 0.0], [2.0, 0.0]], [1.0, 0.0], [1.0, 0.0]),  # (4 - 2) / 1 clipped: g1 wins
        ([[2.0, 0.0], [1.0, 0.0]], [0.0, 1.0], [1.0, 0.0]),  # (1 - 2) / 1 clipped: g2 wins
        ([[1.0, 3.0], [1.0, 3.0]], [0.5, 0.5], [1.0, 3.0]),  # g1 == g2: 0/0 -> 1/2
        ([[1.0, -2.0], [-1.0, 2.0]], [0.5, 0.5], [0.0, 0.0]),  # g1 = -g2: Pareto-stationary
    ],
)
def test_mgda_two_objectives_closed_form_by_hand(x64, g, alpha, d):
    out, weights = jax.jit(mgda)(as_tree(g))
    np.testing.assert_allclose(np.asarray(weights), alpha, atol=1e-15)
    np.testing.assert_allclose(as_flat(out), d, atol=1e-15)
    assert_min_norm_kkt(g, as_flat(out), weights, atol=1e-14)


def _face_case():
    """K = 3 with the min-norm point on the edge g1-g2: g3 gets no weight."""
    return np.array([[1.0, 0.2, 0.0], [-1.0, 1.0, 0.3], [3.0, 3.0, 1.0]])


@pytest.mark.parametrize("case", ["face", "random3", "random4", "random5"])
def test_mgda_matches_exact_min_norm(x64, rng, case):
    g = _face_case() if case == "face" else rng.normal(size=(int(case[-1]), 8))
    reference = np_min_norm(g)
    if case == "face":
        assert reference[2] == 0 and np.all(reference[:2] > 0)
    solve = jax.jit(functools.partial(mgda, max_iters=2000, tol=1e-14))
    d, alpha = solve(as_tree(g))
    np.testing.assert_allclose(np.asarray(alpha), reference, atol=1e-6)
    np.testing.assert_allclose(as_flat(d), reference @ g, atol=1e-6)
    assert_min_norm_kkt(g, as_flat(d), alpha, atol=1e-12)


def test_mgda_paper_frank_wolfe_without_away_steps(x64):
    # (0, 0) lies inside the triangle of the first two coordinates, so d = (0, 0, 1) with all
    # weights positive: an interior optimum, where plain Frank-Wolfe converges linearly.
    g = np.array([[1.0, 0.0, 1.0], [-0.5, 0.8, 1.0], [-0.6, -0.9, 1.0]])
    reference = np_min_norm(g)
    np.testing.assert_allclose(reference @ g, [0, 0, 1], atol=1e-12)
    assert np.all(reference > 0.05)
    d, alpha = mgda(as_tree(g), max_iters=2000, tol=1e-14, away_steps=False)
    np.testing.assert_allclose(np.asarray(alpha), reference, atol=1e-6)
    # On a face plain Frank-Wolfe stalls short of the optimum; away steps reach it.
    _, stalled = mgda(as_tree(_face_case()), max_iters=200, tol=0.0, away_steps=False)
    _, exact = mgda(as_tree(_face_case()), max_iters=200, tol=0.0)
    assert np.asarray(stalled)[2] > 1e-4
    assert np.asarray(exact)[2] == 0


def test_mgda_default_tolerance_gives_min_norm_conditions(x64, rng):
    g = rng.normal(size=(6, 20))
    d, alpha = jax.jit(mgda)(as_tree(g))
    # The stopping rule: ||d||^2 - min_k d . g_k <= tol * max_k ||g_k||^2, tol = 1e-6.
    assert_min_norm_kkt(g, as_flat(d), alpha, atol=1e-6 * np.max(np.sum(g**2, axis=1)))


def test_mgda_pareto_stationary_three_objectives(x64):
    s = np.sqrt(3) / 2
    g = np.array([[1.0, 0.0], [-0.5, s], [-0.5, -s]])  # 0 is the centroid
    d, alpha = jax.jit(mgda)(as_tree(g))
    np.testing.assert_allclose(as_flat(d), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.asarray(alpha), np.full(3, 1 / 3), atol=1e-12)


def test_zero_gradients_and_a_single_objective(x64):
    d, alpha = mgda(as_tree(np.zeros((3, 2))))
    assert np.all(np.isfinite(np.asarray(alpha))) and np.all(as_flat(d) == 0)
    d, alpha = mgda(as_tree([[2.0, -1.0]]))
    np.testing.assert_array_equal(np.asarray(alpha), [1.0])
    np.testing.assert_array_equal(as_flat(d), [2.0, -1.0])
    np.testing.assert_array_equal(as_flat(pcgrad(as_tree([[2.0, -1.0]]), key=None)), [2.0, -1.0])
    out = pcgrad(as_tree([[2.0, -1.0]]), key=jax.random.key(0), reduction="mean")
    np.testing.assert_array_equal(as_flat(out), [2.0, -1.0])


def test_mgda_weights_are_constants_under_grad(x64, rng):
    g = as_tree(rng.normal(size=(3, 4)))
    _, alpha = mgda(g)
    # d(sum d)/dg_k = alpha_k everywhere: alpha is not differentiated, as in the paper.
    grad = jax.grad(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(mgda(t)[0])))(g)
    np.testing.assert_allclose(as_flat(grad), np.repeat(np.asarray(alpha)[:, None], 4, 1))


def test_mgda_compiles_once(rng):
    solve = jax.jit(lambda tree: mgda(tree))
    for _ in range(2):
        d, alpha = solve(as_tree(rng.normal(size=(4, 6)).astype(np.float32)))
    chex.assert_shape(alpha, (4,))
    chex.assert_tree_all_finite(d)
    assert solve._cache_size() == 1


# ----------------------------------------------------------------------- per-term gradients

B, T, D, V = 2, 5, 3, 7


def _policy_loss(params, hidden, labels, mask, ref_logps, *, loss):
    logps = token_logps(hidden @ params["w"], labels, mask)  # [2B, T], chosen rows first
    return loss(PreferenceBatch.from_stacked(logps, mask, ref_logps))


def _problem(rng):
    hidden = jnp.asarray(rng.normal(size=(2 * B, T, D)))
    labels = jnp.asarray(rng.integers(0, V, size=(2 * B, T)))
    mask = jnp.asarray((np.arange(T) < np.array([[5], [3], [4], [2]])).astype(np.float64))
    ref_logps = jnp.asarray(-rng.uniform(0.5, 3.0, size=(2 * B, T)))
    params = {"w": jnp.asarray(rng.normal(size=(D, V)))}
    return params, (hidden, labels, mask, ref_logps)


def test_term_gradients_of_a_composed_loss(x64, rng):
    loss_fn = functools.partial(_policy_loss, loss=combine([("sigmoid", 1.0), ("sft", 0.5)]))
    params, data = _problem(rng)

    def weighted_term(p, name):
        term = loss_fn(p, *data).terms[name]
        return term.weight * term.value

    @jax.jit
    def run(p):
        per_term = {name: jax.grad(weighted_term)(p, name) for name in ("sigmoid", "sft")}
        total = jax.grad(lambda q: loss_fn(q, *data).loss)(p)
        return term_gradients(loss_fn, p, *data), total, per_term, loss_fn(p, *data).loss

    (grads, names, output), total, per_term, loss = run(params)
    # The names cross the jit boundary as static data, in combine's part order.
    assert names == ("sigmoid", "sft") and set(output.terms) == set(names)
    chex.assert_shape(grads["w"], (2, D, V))
    # The rows add up to grad(loss) and each is the gradient of its own weighted term.
    np.testing.assert_allclose(grads["w"].sum(0), total["w"], rtol=1e-10, atol=1e-14)
    for k, name in enumerate(names):
        np.testing.assert_allclose(grads["w"][k], per_term[name]["w"], rtol=1e-10, atol=1e-14)
    assert output.terms["sft"].weight == 0.5
    np.testing.assert_allclose(output.loss, loss, rtol=1e-12)


def test_term_gradients_by_hand_in_the_loss_term_order(x64):
    def loss_fn(params, scale):
        x = params["x"]
        terms = {  # deliberately not in sorted order
            "b": LossTerm(jnp.sum(x**2), jnp.asarray(2.0), 3.0),  # grad: 3 * 2x / 2 = 3x
            "a": LossTerm(scale * jnp.sum(x), jnp.asarray(4.0), 0.5),  # grad: 0.5 * scale / 4
        }
        zeros = jnp.zeros(1)
        return LossOutput(terms, zeros, zeros, zeros, {})

    params = {"x": jnp.array([1.0, -2.0, 0.5])}
    grads, names, output = term_gradients(loss_fn, params, 2.0)
    assert names == tuple(output.terms) == ("b", "a")
    np.testing.assert_allclose(grads["x"], [[3.0, -6.0, 1.5], [0.25, 0.25, 0.25]], rtol=1e-15)
    np.testing.assert_allclose(output.loss, 3.0 * 5.25 / 2 + 0.5 * 2.0 * -0.5 / 4, rtol=1e-15)


def test_term_gradients_pcgrad_and_mgda_end_to_end_under_jit(x64, rng):
    loss_fn = functools.partial(_policy_loss, loss=combine([("sigmoid", 1.0), ("sft", 0.5)]))

    @jax.jit
    def step(params, data, key):
        result = term_gradients(loss_fn, params, *data)
        return result, pcgrad(result.grads, key=key), mgda(result.grads)

    for seed in range(2):
        params, data = _problem(rng)
        result, combined, (direction, alpha) = step(params, data, jax.random.key(seed))
        assert result.names == ("sigmoid", "sft")
        g = np.asarray(result.grads["w"]).reshape(2, -1)  # K = 2: one order per objective
        expected = np_pcgrad_rows(g, fixed_orders(2)).sum(0)
        np.testing.assert_allclose(np.ravel(combined["w"]), expected, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(np.asarray(alpha), np_min_norm(g), atol=1e-10)
        assert_min_norm_kkt(g, np.ravel(direction["w"]), alpha, atol=1e-12)
    assert step._cache_size() == 1


def test_term_gradients_rejects_a_non_loss_output(rng):
    with pytest.raises(TypeError, match="loss_fn"):
        term_gradients(lambda p: jnp.sum(p["w"]), {"w": jnp.ones(3)})


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [pcgrad, pcgrad_projections, lambda g: mgda(g)])
@pytest.mark.parametrize(
    "grads, message",
    [
        ({"a": np.zeros((0, 3))}, "K >= 1"),
        ({"a": np.zeros((2, 3)), "b": np.zeros((3,))}, "disagree"),
        ({"a": np.zeros((2, 3)), "b": np.zeros(())}, "scalar"),
        ({}, "no array leaves"),
    ],
)
def test_bad_grads_are_rejected(fn, grads, message):
    with pytest.raises(ValueError, match=f"`grads`.*{message}"):
        fn(grads)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda g: pcgrad(g, reduction="max"), "reduction"),
        (lambda g: mgda(g, max_iters=0), "max_iters"),
        (lambda g: mgda(g, max_iters=-3), "max_iters"),
        (lambda g: mgda(g, max_iters=2.5), "max_iters"),
        (lambda g: mgda(g, tol=-1e-3), "tol"),
    ],
)
def test_bad_options_are_rejected(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(as_tree(np.ones((3, 2), np.float32)))
