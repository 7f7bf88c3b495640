"""project_params: projected steps land on the constraint set, checked against NumPy float64
projections (l2 ball: x * r / max(r, ||x||); simplex: the sort-based algorithm of Held et al.
1974 / Duchi et al. 2008), with and without jit, per leaf and on the whole tree, with masks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax.optim.constraints import project_params

l2_ball = functools.partial(optax.projections.projection_l2_ball, scale=1.5)
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def np_l2_ball(x, r=1.5):
    x = np.asarray(x, np.float64)
    return x * r / max(r, np.linalg.norm(x))


def np_simplex(x, s=1.0):
    """Euclidean projection onto {w >= 0, sum w = s} by sorting."""
    x = np.asarray(x, np.float64)
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - s
    k = np.arange(1, x.size + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(x - css[rho] / (rho + 1), 0.0)


def run(tx, params, grads, steps, *, jit):
    """`steps` optimizer steps with fixed grads; returns the params after each step."""
    update = jax.jit(tx.update) if jit else tx.update
    state, history = tx.init(params), []
    for _ in range(steps):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


@JIT
def test_l2_ball_per_leaf_matches_numpy_every_step(jit):
    lr = 0.3
    params = {"w": jnp.array([[0.5, -0.2], [0.1, 0.3]]), "b": jnp.array([0.2, 0.1, -0.4])}
    grads = {"w": jnp.array([[-2.0, 1.0], [0.5, -1.5]]), "b": jnp.array([-1.0, -3.0, 2.0])}
    tx = optax.chain(optax.sgd(lr), project_params(l2_ball))
    expected = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    for got in run(tx, params, grads, 4, jit=jit):
        expected = jax.tree.map(lambda p, g: np_l2_ball(p - lr * np.asarray(g)), expected, grads)
        for name in params:
            np.testing.assert_allclose(got[name], expected[name], rtol=2e-6, atol=1e-7)
            assert np.linalg.norm(got[name]) <= 1.5 * (1 + 1e-6)
    assert np.linalg.norm(expected["w"]) == pytest.approx(1.5)  # the ball is active


@JIT
def test_simplex_mixture_weights_match_sort_projection(jit):
    lr = 0.5
    params = {"mix": jnp.full((5,), 0.2)}
    grads = {"mix": jnp.array([0.9, -0.4, 0.3, -1.2, 0.1])}
    tx = optax.chain(optax.sgd(lr), project_params(optax.projections.projection_simplex))
    expected = np.full(5, 0.2)
    for got in run(tx, params, grads, 3, jit=jit):
        expected = np_simplex(expected - lr * np.asarray(grads["mix"], np.float64))
        np.testing.assert_allclose(got["mix"], expected, atol=2e-7)
        assert float(jnp.sum(got["mix"])) == pytest.approx(1.0, abs=1e-6)
        assert bool(jnp.all(got["mix"] >= 0))
    assert np.count_nonzero(expected == 0) >= 1  # a face of the simplex is reached


@pytest.mark.parametrize("how", ["tree", "prefix", "callable"])
def test_mask_selects_constrained_leaves(how):
    lr = 1.0
    params = {"enc": {"w": jnp.array([3.0, 4.0]), "v": jnp.array([1.0, 2.0])}, "mix": jnp.ones(3)}
    grads = {"enc": {"w": jnp.array([4.0, 1.0]), "v": jnp.array([5.0, -5.0])}, "mix": jnp.ones(3)}
    mask = {
        "tree": {"enc": {"w": True, "v": False}, "mix": False},
        "prefix": {"enc": True, "mix": False},
        "callable": lambda p: jax.tree.map(lambda x: x.shape == (2,), p),
    }[how]
    tx = optax.chain(
        optax.sgd(lr), project_params(optax.projections.projection_non_negative, mask=mask)
    )
    (got,) = run(tx, params, grads, 1, jit=True)
    np.testing.assert_array_equal(got["enc"]["w"], [0.0, 3.0])  # from [-1, 3]
    np.testing.assert_array_equal(got["mix"], np.zeros(3))  # unconstrained: the plain sgd step
    v_expected = [0.0, 7.0] if how != "tree" else [-4.0, 7.0]
    np.testing.assert_array_equal(got["enc"]["v"], v_expected)


def test_whole_tree_projection_uses_global_norm():
    params = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0, 4.0])}
    zero = jax.tree.map(jnp.zeros_like, params)
    whole = project_params(l2_ball, per_leaf=False)
    (got,) = run(optax.chain(optax.sgd(1.0), whole), params, zero, 1, jit=True)
    np.testing.assert_allclose(got["a"], [0.9, 0.0], rtol=1e-6)  # 5 -> 1.5 as one vector
    np.testing.assert_allclose(got["b"], [0.0, 1.2], rtol=1e-6)
    (per_leaf,) = run(
        optax.chain(optax.sgd(1.0), project_params(l2_ball)), params, zero, 1, jit=True
    )
    np.testing.assert_allclose(per_leaf["a"], [1.5, 0.0], rtol=1e-6)


def test_inject_hyperparams_alias_in_chain_under_jit():
    params = {"x": jnp.array([0.5, 0.5, -0.5])}
    grads = {"x": jnp.array([-3.0, 2.0, 4.0])}
    box = functools.partial(optax.projections.projection_box, lower=-1.0, upper=1.0)
    tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), project_params(box))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for lr in (0.1, 0.4):  # a hyperparameter is state: new value, no recompilation; 0.4 clips
        state[0].hyperparams["learning_rate"] = jnp.asarray(lr)
        updates, state = step(grads, state, params)
        new = optax.apply_updates(params, updates)
        expected = np.clip(np.asarray(params["x"]) - lr * np.asarray(grads["x"]), -1, 1)
        np.testing.assert_allclose(new["x"], expected, rtol=1e-6)
    assert step._cache_size() == 1


def test_projection_inside_nnx_optimizer():
    class Mixture(nnx.Module):
        def __init__(self):
            self.logits_w = nnx.Param(jnp.full((4,), 0.25))

    model = Mixture()
    tx = optax.chain(optax.sgd(0.5), project_params(optax.projections.projection_simplex))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.State({"logits_w": nnx.Param(jnp.array([1.0, -1.0, 0.0, 0.5]))})
    optimizer.update(model, grads)
    expected = np_simplex(0.25 - 0.5 * np.array([1.0, -1.0, 0.0, 0.5]))
    np.testing.assert_allclose(model.logits_w[...], expected, atol=1e-7)


def test_errors_name_the_argument():
    tx = project_params(l2_ball)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params), None)
    with pytest.raises(ValueError, match="`projection`"):
        project_params("l2")
    bad = project_params(l2_ball, mask={"v": True})
    with pytest.raises(ValueError, match="`mask`"):
        bad.update(params, bad.init(params), params)
