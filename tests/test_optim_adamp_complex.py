"""AdamP / SGDP on complex parameters, as optax treats them: the second moment is |g|^2, inner
products are Re<a, b> = Re(sum conj(a) b) and norms |x|, so a complex row's cosine equals that
of its stacked (real, imag) parts, and its length counts both parts in the threshold.

(a) real inputs: the fused projection still matches PyPI adamp's float64 trajectories;
(b) optax's own complex targets (`alias_test.py`: parabola and Rosenbrock in C, conjugated
    gradients, adam lr 1e-1 and sgd lr 1e-3 with momentum 0.9, 10,000 steps, rtol = atol =
    3e-2), plus a matrix parabola on which the projection runs;
(c) the projection and SGDP on a complex matrix equal those on its split real matrix. AdamP
    does not, in general: its shared |g|^2 differs from separate re^2, im^2 moments. It does
    for real gradients of complex weights (the imaginary moments are then 0), which is tested.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import optim

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "adamp.npz"


def flax_tree(data, meta, prefix, step=None):
    out = {}
    for name in meta["params"]:
        x = data[f"{prefix}{name}"] if step is None else data[f"{prefix}{name}"][step]
        module, kind = name.rsplit(".", 1)
        if x.ndim == 1:
            leaf = "bias" if kind == "bias" else "scale"
        else:
            leaf, x = "kernel", (x.T if x.ndim == 2 else np.transpose(x, (2, 3, 1, 0)))
        out.setdefault(module, {})[leaf] = jnp.asarray(x)
    return out


@pytest.mark.parametrize("name", ["adamp_nesterov_wd", "sgdp_mom_wd"])
def test_real_parameters_still_match_the_reference(name, x64):
    data = np.load(FIXTURE)
    meta = json.loads(str(data["meta_json"]))
    cfg = meta["configs"][name]
    kw = {k: v for k, v in cfg.items() if k not in ("opt", "lr")}
    tx = (optim.adamp if cfg["opt"] == "AdamP" else optim.sgdp)(cfg["lr"], **kw)
    params = flax_tree(data, meta, "init/")
    state, step = tx.init(params), jax.jit(tx.update)
    for t in range(meta["steps"]):
        updates, state = step(flax_tree(data, meta, f"{name}/grad/", t), state, params)
        params = optax.apply_updates(params, updates)
        want = flax_tree(data, meta, f"{name}/param/", t)
        for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            ref = np.asarray(ref)
            assert np.max(np.abs(np.asarray(got) - ref)) <= 1e-10 * max(1.0, np.abs(ref).max())


def abs_sq(x):
    return (x.conj() * x).real


def parabola(shape=(3,)):
    """optax's `_setup_parabola` in C; with a 2-D shape the projection runs on it."""
    init = jnp.array([-1.0, 10.0, 1.0, 2.0, 0.5, -3.0][: int(np.prod(shape))], jnp.complex64)
    final = jnp.array([1.0, -1.0, 1.0, 0.5, 2.0, 1.0][: int(np.prod(shape))], jnp.complex64)
    final = final * (1 + 1j)
    init, final = init.reshape(shape), final.reshape(shape)
    return init, final, lambda p: jnp.sum(abs_sq(p - final))


def rosenbrock():
    a, b = 1.0 * (1 + 1j), 100.0
    init, final = jnp.zeros(2, jnp.complex64), jnp.array([a, a**2], jnp.complex64)

    def objective(p):
        return abs_sq(a - p[0]) + b * abs_sq(p[1] - p[0] ** 2)

    return init, final, objective


def run(tx, init, objective, steps=10_000):
    def body(_, carry):
        params, state = carry
        grads = jax.tree.map(jnp.conj, jax.grad(objective)(params))  # as optax's test
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, tx.init(p)))[0])(init)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["parabola", "rosenbrock", "matrix_parabola"])
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (optim.adamp(1e-1), optax.adam(1e-1)),
        (optim.sgdp(1e-3, momentum=0.9), optax.sgd(1e-3, momentum=0.9)),
    ],
    ids=["adamp", "sgdp"],
)
def test_converges_on_optax_complex_targets(target, ours, theirs):
    init, final, objective = {
        "parabola": parabola,
        "rosenbrock": rosenbrock,
        "matrix_parabola": lambda: parabola((3, 2)),
    }[target]()
    for tx in (theirs, ours):
        got = run(tx, init, objective)
        assert got.dtype == jnp.complex64
        np.testing.assert_allclose(got, final, rtol=3e-2, atol=3e-2)


def split(z):
    """A complex (m, n) matrix as the real (2m, n) one of its stacked parts: each column (a
    channel on the default last axis) becomes the real vector (re, im)."""
    return jnp.concatenate([z.real, z.imag], axis=0)


def complex_case(seed, kind):
    rng = np.random.default_rng(seed)
    w, g, u = (rng.normal(size=(5, 3, 2)) @ np.array([1, 1j]) for _ in range(3))
    if kind in ("channel", "real_grad"):  # Re<w_c, g_c> = 0 for every column: channel fires
        if kind == "real_grad":
            g = g.real + 0j
            g = g - w.real * (np.sum(g.real * w.real, 0) / np.sum(w.real**2, 0))
        else:
            g = g - w * (np.sum((w.conj() * g).real, 0) / np.sum(np.abs(w) ** 2, 0))
    elif kind == "layer":  # orthogonal to the whole matrix only
        g = w[::-1] + 0.0
        g = g - w * np.sum((w.conj() * g).real) / np.sum(np.abs(w) ** 2)
    return tuple(jnp.asarray(x) for x in (w, g, u))


@pytest.mark.parametrize("kind,view", [("channel", 1), ("layer", 2), ("none", 0)])
def test_projection_of_complex_equals_split_real(kind, view, x64):
    w, g, u = complex_case(4, kind)
    got = optim.radial_projection(w, g, u, -1)
    want = optim.radial_projection(split(w), split(g), split(u), -1)
    assert int(got.view) == int(want.view) == view
    np.testing.assert_allclose(split(got.update), want.update, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(
        [got.channel_score, got.layer_score],
        [want.channel_score, want.layer_score],
        rtol=1e-12,
        atol=1e-12,
    )
    assert float(got.ratio) == float(want.ratio)


@pytest.mark.parametrize(
    "make,kind",
    [
        (lambda: optim.sgdp(0.1, momentum=0.9, weight_decay=0.1), "channel"),
        (lambda: optim.sgdp(0.1, momentum=0.9, weight_decay=0.1, nesterov=True), "channel"),
        (lambda: optim.sgdp(0.1, momentum=0.9, dampening=0.5), "none"),
        (lambda: optim.adamp(1e-2, weight_decay=0.1), "real_grad"),
        (lambda: optim.adamp(1e-2, weight_decay=0.1, nesterov=True), "real_grad"),
    ],
)
def test_trajectory_of_complex_equals_split_real(make, kind, x64):
    tx = make()
    w, _, _ = complex_case(5, kind)
    pc, pr = {"w": w}, {"w": split(w)}
    sc, sr = tx.init(pc), tx.init(pr)
    # compiled once each (complex and real avals), not re-lowered at every eager step
    update, projection = jax.jit(tx.update), jax.jit(optim.radial_projection, static_argnums=3)
    fired = []
    for t in range(8):
        _, g, _ = complex_case(10 + t, kind)
        if kind != "none":  # keep the gradient invariant for the current weights
            wc = pc["w"]
            if kind == "real_grad":
                g = g.real - wc.real * jnp.sum(g.real * wc.real, 0) / jnp.sum(wc.real**2, 0)
                g = g + 0j
            else:
                g = g - wc * jnp.sum((wc.conj() * g).real, 0) / jnp.sum(jnp.abs(wc) ** 2, 0)
        proj = projection(pc["w"], g, g, -1)
        fired.append(int(proj.view))
        uc, sc = update({"w": g}, sc, pc)
        ur, sr = update({"w": split(g)}, sr, pr)
        pc, pr = optax.apply_updates(pc, uc), optax.apply_updates(pr, ur)
        np.testing.assert_allclose(split(pc["w"]), pr["w"], rtol=1e-12, atol=1e-12)
    assert set(fired) == ({0} if kind == "none" else {1}), fired
