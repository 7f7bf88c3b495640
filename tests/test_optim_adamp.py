"""AdamP / SGDP against trajectories of PyPI adamp 0.3.0 (torch 2.13.0, float64), replayed with
the reference's own gradients (teacher forcing), plus identities with optax and input errors.

Parameters are converted to the Flax layout (kernels (in, out), conv (kh, kw, in, out)) and run
with the default channel axes, so the test also checks that the Flax default picks the same
channels as the reference's axis 0. Tolerance: every parameter after every step to <= 1e-10
relative to max(1, |reference|) in x64 (the same float64 arithmetic in another order).
"""

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import optim

DATA = np.load(Path(__file__).resolve().parent / "reference" / "fixtures" / "adamp.npz")
META = json.loads(str(DATA["meta_json"]))
STEPS = META["steps"]
NEAR = 0.005  # a projection test within 0.5% of its threshold is reported


def to_flax(name: str, x: np.ndarray):
    """torch parameter name and array -> (flax path, array in Flax layout)."""
    module, kind = name.rsplit(".", 1)
    if kind == "bias":
        return (module, "bias"), x
    if x.ndim == 1:  # norm gains
        return (module, "scale"), x
    if x.ndim == 2:
        return (module, "kernel"), x.T
    return (module, "kernel"), np.transpose(x, (2, 3, 1, 0))


def tree(prefix: str, step=None):
    out = {}
    for name in META["params"]:
        x = DATA[f"{prefix}{name}"]
        x = x if step is None else x[step]
        (module, leaf), value = to_flax(name, x)
        out.setdefault(module, {})[leaf] = jnp.asarray(value)
    return out


def make_tx(cfg):
    kw = {k: v for k, v in cfg.items() if k not in ("opt", "lr")}
    return (optim.adamp if cfg["opt"] == "AdamP" else optim.sgdp)(cfg["lr"], **kw)


def close(got, want, tol):
    got, want = np.asarray(got), np.asarray(want)
    return np.max(np.abs(got - want)) <= tol * max(1.0, np.max(np.abs(want)))


@pytest.mark.parametrize("name", sorted(META["configs"]))
def test_matches_reference_trajectory(name, x64):
    cfg = META["configs"][name]
    tx = make_tx(cfg)
    params = tree("init/")
    state = tx.init(params)
    step_fn = jax.jit(tx.update)
    for step in range(STEPS):
        grads = tree(f"{name}/grad/", step)
        updates, state = step_fn(grads, state, params)
        params = optax.apply_updates(params, updates)
        want = tree(f"{name}/param/", step)
        for module in want:
            for leaf in want[module]:
                assert close(params[module][leaf], want[module][leaf], 1e-10), (
                    name,
                    step,
                    module,
                    leaf,
                )
    assert step_fn._cache_size() == 1
    scores = DATA[f"{name}/scores"]
    near = np.argwhere(np.abs(scores - 1.0) < NEAR)
    if len(near):
        where = [(int(s), META["matrices"][int(m)], ("channel", "layer")[v]) for s, m, v in near]
        msg = f"{name}: projection tests within {NEAR:.1%} of the threshold at {where}"
        warnings.warn(msg, stacklevel=1)


def test_projection_scores_match_reference(x64):
    """Our per-view cosine scores (Flax layout, default axes) equal the reference's (torch
    layout, axis 0) on the first step of every configuration, and the fixture exercises both
    outcomes on the invariant and the non-invariant matrices."""
    fired = set()
    # compiled: one program per matrix shape, shared by the configurations (the eager path is
    # test_radial_projection_matches_numpy_reference's)
    projection = jax.jit(optim.radial_projection, static_argnums=3)
    for name in META["configs"]:
        params, grads = tree("init/"), tree(f"{name}/grad/", 0)
        axes = optim.flax_channel_axes(params)
        for i, torch_name in enumerate(META["matrices"]):
            module = torch_name.rsplit(".", 1)[0]
            p = projection(
                params[module]["kernel"],
                grads[module]["kernel"],
                grads[module]["kernel"],
                axes[module]["kernel"],
            )
            want = DATA[f"{name}/scores"][0, i]
            np.testing.assert_allclose([p.channel_score, p.layer_score], want, rtol=1e-9)
        scores = DATA[f"{name}/scores"]
        for i, torch_name in enumerate(META["matrices"]):
            fired.add((torch_name, bool(np.any(scores[:, i].min(-1) < 1))))
    assert ("head.weight", False) in fired or ("head.weight", True) in fired
    assert ("lin1.weight", True) in fired and ("conv.weight", True) in fired


def test_adamp_equals_adamw_where_projection_never_fires(x64):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 4))), "b": jnp.asarray(rng.normal(size=4))}
    # delta -> 0 makes the threshold unreachable: the projection never fires.
    ours = optim.adamp(3e-2, weight_decay=0.1, delta=1e-300)
    ref = optax.adamw(3e-2, weight_decay=0.1)
    p1, p2, s1, s2 = params, params, ours.init(params), ref.init(params)
    update1, update2 = jax.jit(ours.update), jax.jit(ref.update)
    for _ in range(10):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
        u1, s1 = update1(g, s1, p1)
        u2, s2 = update2(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for k in params:
            assert close(p1[k], p2[k], 1e-13)


def test_sgdp_equals_sgd_without_projection_and_decay(x64):
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(5, 4)))}
    ours, ref = optim.sgdp(0.1, momentum=0.9, delta=1e-300), optax.sgd(0.1, momentum=0.9)
    p1, p2, s1, s2 = params, params, ours.init(params), ref.init(params)
    for _ in range(10):
        g = {"w": jnp.asarray(rng.normal(size=(5, 4)))}
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert close(p1["w"], p2["w"], 1e-13)


def test_project_radial_around_scale_by_adam_is_adamp(x64):
    """AdamP without nesterov is exactly the projection of optax's Adam direction."""
    params, cfg = tree("init/"), META["configs"]["adamp_wd"]
    wrapped = optax.chain(
        optim.project_radial(optax.scale_by_adam(), weight_decay=cfg["weight_decay"]),
        optax.scale_by_learning_rate(cfg["lr"]),
    )
    ref = make_tx(cfg)
    p1, p2, s1, s2 = params, params, wrapped.init(params), ref.init(params)
    update1, update2 = jax.jit(wrapped.update), jax.jit(ref.update)
    for step in range(5):
        g = tree("adamp_wd/grad/", step)
        u1, s1 = update1(g, s1, p1)
        u2, s2 = update2(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert close(a, b, 1e-12)


def test_project_radial_projects_any_inner_update(x64):
    """With an invariant weight (gradient orthogonal to each channel), the projected SGD step
    has no radial component: <w_c, u_c> = 0 per channel."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(6, 4)))
    g = jnp.asarray(rng.normal(size=(6, 4)))
    g = g - w * jnp.sum(g * w, 0) / jnp.sum(w * w, 0)  # orthogonal per output channel (axis -1)
    tx = optim.project_radial(optax.sgd(0.5, momentum=0.9))
    state = tx.init({"w": w})
    for _ in range(3):
        u, state = tx.update({"w": g}, state, {"w": w})
        np.testing.assert_allclose(jnp.sum(u["w"] * w, 0), 0.0, atol=1e-12)


def test_sgdp_momentum_projection_flag(x64):
    params, cfg = tree("init/"), META["configs"]["sgdp_mom_wd"]
    kw = {k: v for k, v in cfg.items() if k not in ("opt", "lr")}
    outs = {}
    for flag in (True, False):
        tx = optim.sgdp(cfg["lr"], project_momentum=flag, **kw)
        state = tx.init(params)
        _, state = tx.update(tree("sgdp_mom_wd/grad/", 0), state, params)
        outs[flag] = state[0].momentum
    g0 = tree("sgdp_mom_wd/grad/", 0)
    # Unprojected buffer after one step = (1 - dampening) g; projected differs on lin1.
    np.testing.assert_array_equal(outs[False]["lin1"]["kernel"], g0["lin1"]["kernel"])
    assert not np.allclose(outs[True]["lin1"]["kernel"], g0["lin1"]["kernel"])
    np.testing.assert_array_equal(outs[True]["head"]["bias"], g0["head"]["bias"])


def test_schedules_and_inject_hyperparams(x64):
    params, g = tree("init/"), tree("adamp_wd/grad/", 0)
    constant = optim.adamp(1e-2, weight_decay=0.1)
    scheduled = optim.adamp(lambda c: 1e-2 + 0.0 * c, weight_decay=lambda c: 0.1 + 0.0 * c)
    injected = optax.inject_hyperparams(optim.adamp, static_args=("nesterov",))(
        learning_rate=1e-2, weight_decay=0.1
    )
    results = []
    for tx in (constant, scheduled, injected):
        u, _ = tx.update(g, tx.init(params), params)
        results.append(u)
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            assert close(a, b, 1e-15)
    state = injected.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
    u2, _ = injected.update(g, state, params)
    np.testing.assert_allclose(u2["head"]["bias"], 2 * results[0]["head"]["bias"], rtol=1e-12)
    sg = optax.inject_hyperparams(optim.sgdp)(learning_rate=0.1, momentum=0.9)
    u, _ = jax.jit(sg.update)(g, sg.init(params), params)
    assert np.all(np.isfinite(u["conv"]["kernel"]))


def test_channel_axis_specs(x64):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(4, 6)))
    g = jnp.asarray(rng.normal(size=(4, 6)))
    g0 = g - w * jnp.sum(g * w, 1, keepdims=True) / jnp.sum(w * w, 1, keepdims=True)
    # Gradient orthogonal to each *row*: the channel axis is 0 (torch layout).
    for spec in (0, {"w": 0}, lambda p: {"w": 0}):
        tx = optim.adamp(1e-2, channel_axis=spec)
        u, _ = tx.update({"w": g0}, tx.init({"w": w}), {"w": w})
        # Not exactly 0: the reference normalises by ||w|| + eps, leaving ~eps/||w|| radially.
        cos = jnp.sum(u["w"] * w, 1) / (
            jnp.linalg.norm(u["w"], axis=1) * jnp.linalg.norm(w, axis=1)
        )
        np.testing.assert_allclose(cos, 0.0, atol=1e-7)
    embed = {"embedding": w}
    assert optim.flax_channel_axes(embed) == {"embedding": 0}
    assert optim.resolve_channel_axes({"w": None}, {"w": w}) == {"w": None}
    with pytest.raises(ValueError, match="channel_axis.*'w'"):
        optim.adamp(1e-2, channel_axis=2).init({"w": w})
    with pytest.raises(ValueError, match="channel_axis"):
        optim.adamp(1e-2, channel_axis={"v": 0}).init({"w": w})


def test_bad_hyperparameters_and_missing_params():
    for kwargs, match in (
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(b1=1.0), "b1"),
        (dict(eps=float("inf")), "eps"),
        (dict(delta=0.0), "delta"),
        (dict(wd_ratio=-0.1), "wd_ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            optim.adamp(1e-3, **kwargs)
    with pytest.raises(ValueError, match="learning_rate"):
        optim.sgdp(float("nan"))
    with pytest.raises(ValueError, match="momentum"):
        optim.sgdp(0.1, momentum=1.0)
    tx = optim.adamp(1e-3)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def numpy_projection(w, g, u, axis, delta=0.1, wd_ratio=0.1, eps=1e-8):
    """The reference `_projection` (adamp 0.3.0) in NumPy, with the channel axis moved first."""
    w, g, u = (np.moveaxis(np.asarray(x, np.float64), axis, 0) for x in (w, g, u))
    for rows in (lambda x: x.reshape(x.shape[0], -1), lambda x: x.reshape(1, -1)):
        wr, gr = rows(w), rows(g)
        cos = np.abs((wr * gr).sum(1)) / (
            np.maximum(np.linalg.norm(gr, axis=1), eps)
            * np.maximum(np.linalg.norm(wr, axis=1), eps)
        )
        if cos.max() < delta / np.sqrt(wr.shape[1]):
            pn = wr / (np.linalg.norm(wr, axis=1, keepdims=True) + eps)
            ur = rows(u) - pn * (pn * rows(u)).sum(1, keepdims=True)
            return np.moveaxis(ur.reshape(u.shape), 0, axis), wd_ratio
    return np.moveaxis(u, 0, axis), 1.0


@pytest.mark.parametrize(
    "shape,axis,view",
    [
        ((5, 4099), 1, "channel"),  # fewer rows than ROW_BLOCK: the remainder only
        ((19, 37), 1, "channel"),  # 2 blocks of ROW_BLOCK rows and a remainder of 3
        ((5, 4099), 1, "layer"),
        ((4099, 3), 0, "channel"),
        ((300, 64), 0, "channel"),  # rows summed in LANES partial sums first; 10 blocks of 30
        ((300, 48), 0, "layer"),  # 16 partial sums per row
        ((300, 64), 0, "none"),
        ((3, 3, 2, 5), 3, "channel"),
        ((4, 6, 5), 1, "channel"),  # a middle channel axis
        ((6, 7), 1, "none"),
    ],
)
def test_radial_projection_matches_numpy_reference(shape, axis, view, x64, monkeypatch):
    # channel-first leaves in channel blocks of CHANNEL_BLOCK // row elements: a small block
    # makes (4099, 3) take 7 blocks of 586 channels, the last one overlapping its neighbour
    from alignjax.optim import projection

    monkeypatch.setattr(projection, "CHANNEL_BLOCK", 2048)
    rng = np.random.default_rng(sum(shape))
    w, g, u = (rng.normal(size=shape) for _ in range(3))
    wm = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
    gm = np.moveaxis(g, axis, 0).reshape(shape[axis], -1)
    if view == "channel":  # gradient orthogonal to every channel: the channel test fires
        gm = gm - wm * (gm * wm).sum(1, keepdims=True) / (wm * wm).sum(1, keepdims=True)
    elif view == "layer":  # orthogonal to the whole tensor only, channels far from orthogonal
        gm = wm[::-1] + 0.0
        gm = gm - wm * (gm * wm).sum() / (wm * wm).sum()
    rest = [shape[a] for a in range(len(shape)) if a != axis]
    g = np.moveaxis(gm.reshape(shape[axis], *rest), 0, axis)
    want, ratio = numpy_projection(w, g, u, axis)
    got = optim.radial_projection(jnp.asarray(w), jnp.asarray(g), jnp.asarray(u), axis)
    assert int(got.view) == {"none": 0, "channel": 1, "layer": 2}[view]
    np.testing.assert_allclose(got.update, want, rtol=1e-12, atol=1e-12)
    assert float(got.ratio) == ratio
