"""`mask=` of AdamP / SGDP: which leaves get weight decay, with `optax.adamw`'s semantics.

AdamP and SGDP act leaf by leaf, so a leaf's trajectory depends only on its own parameters,
gradients and hyperparameters. Hence, bitwise and over several jitted steps: a mask of all True
is the unmasked run, a masked-out leaf is the weight_decay = 0 run's leaf and a masked-in leaf
is the decayed run's leaf. The tree has a scale-invariant kernel (gradients orthogonal to every
output channel, so the projection fires and the decay is scaled by wd_ratio), a plain kernel
(the projection does not fire) and vectors (never projected).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import optim

STEPS = 4
WD = 0.1


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(bits(x), bits(y))


def init_params():
    rng = np.random.default_rng(0)
    return {
        "inv": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=5)},
        "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
        "ln": {"scale": 1.0 + rng.normal(size=3)},
    }


def grads_for(params, noise):
    """Gradients from NumPy: `inv/kernel` orthogonal to each output channel (axis -1)."""
    g = {k: dict(v) for k, v in noise.items()}
    w = np.asarray(params["inv"]["kernel"], np.float64)
    n = noise["inv"]["kernel"]
    g["inv"]["kernel"] = n - w * (n * w).sum(0) / (w * w).sum(0)
    return g


def trajectory(tx, dtype, *, jit=True):
    """Updates and parameters after each of STEPS steps, the gradients a NumPy function of the
    run's own parameters and fixed noise."""
    rng = np.random.default_rng(1)
    p0 = init_params()
    noises = [jax.tree.map(lambda x: rng.normal(size=x.shape), p0) for _ in range(STEPS)]
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), p0)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for noise in noises:
        g = jax.tree.map(lambda x: jnp.asarray(x, dtype), grads_for(params, noise))
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append((u, params))
    return out


_UNMASKED = {}


def unmasked(opt, dtype, weight_decay=WD, jit=True):
    """`trajectory(make(opt, weight_decay=weight_decay), dtype, jit=jit)`, the runs without a
    mask the tests compare against: deterministic, so computed once and shared."""
    key = (opt, jnp.dtype(dtype).name, weight_decay, jit)
    if key not in _UNMASKED:
        _UNMASKED[key] = trajectory(make(opt, weight_decay=weight_decay), dtype, jit=jit)
    return _UNMASKED[key]


def pick(tree, keep):
    """The leaves of `tree` at the paths where `keep(path)` (a non-empty selection)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = [leaf for path, leaf in flat if keep(jax.tree_util.keystr(path))]
    assert 0 < len(out) < len(flat)
    return out


MASK = {
    "inv": {"kernel": True, "bias": False},
    "dense": {"kernel": False, "bias": True},
    "ln": {"scale": False},
}


def decayed_paths(path):
    return path.endswith(("['inv']['kernel']", "['dense']['bias']"))


OPTS = ["adamp", "adamp_nesterov", "sgdp", "sgdp_nesterov"]


# Nesterov changes the update direction, not which leaves decay (the mask code is the same):
# test_masked_out_leaves_are_the_no_decay_run checks the masks with nesterov under jit in the
# everyday loop, the other mask tests run the nesterov variants with the slow set.
def nesterov_slow(opt, *more):
    """pytest.param(opt, *more), with the slow set for a nesterov variant."""
    return pytest.param(opt, *more, marks=pytest.mark.slow if opt.endswith("_nesterov") else ())


SLOW_NESTEROV = [nesterov_slow(o) for o in OPTS]


def make(opt, weight_decay=WD, **kw):
    nesterov = opt.endswith("_nesterov")
    if opt.startswith("adamp"):
        return optim.adamp(3e-2, weight_decay=weight_decay, nesterov=nesterov, **kw)
    return optim.sgdp(3e-2, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov, **kw)


@pytest.fixture(params=["float32", pytest.param("float64", marks=pytest.mark.slow)])
def dtype(request):
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


def test_projection_fires_on_the_invariant_kernel_only(dtype):
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), init_params())
    rng = np.random.default_rng(1)
    g = grads_for(params, jax.tree.map(lambda x: rng.normal(size=x.shape), init_params()))
    views = {
        name: int(
            optim.radial_projection(
                params[name]["kernel"],
                jnp.asarray(g[name]["kernel"], dtype),
                jnp.asarray(g[name]["kernel"], dtype),
                -1,
            ).view
        )
        for name in ("inv", "dense")
    }
    assert views == {"inv": 1, "dense": 0}  # 1: the channel view fired, 0: none


@pytest.mark.parametrize("opt", SLOW_NESTEROV)
def test_all_true_mask_is_the_unmasked_run(opt, dtype):
    ones = jax.tree.map(lambda _: True, MASK)
    assert_bitwise(trajectory(make(opt, mask=ones), dtype), unmasked(opt, dtype))
    # A prefix mask: one bool for the whole tree.
    assert_bitwise(trajectory(make(opt, mask=True), dtype), unmasked(opt, dtype))


@pytest.mark.parametrize(
    "opt,jit", [(o, True) for o in OPTS] + [nesterov_slow(o, False) for o in OPTS]
)
def test_masked_out_leaves_are_the_no_decay_run(opt, dtype, jit):
    masked = trajectory(make(opt, mask=MASK), dtype, jit=jit)
    decayed = unmasked(opt, dtype, jit=jit)
    plain = unmasked(opt, dtype, weight_decay=0.0, jit=jit)
    for got, on, off in zip(masked, decayed, plain):
        assert_bitwise(pick(got, decayed_paths), pick(on, decayed_paths))
        assert_bitwise(
            pick(got, lambda p: not decayed_paths(p)), pick(off, lambda p: not decayed_paths(p))
        )
    # The decay matters on both kinds of leaf, so the comparisons above can tell them apart.
    u_on, u_off = jax.tree.leaves(decayed[0][0]), jax.tree.leaves(plain[0][0])
    assert len(u_on) == 5 and all(not np.array_equal(a, b) for a, b in zip(u_on, u_off))


@pytest.mark.parametrize("opt", SLOW_NESTEROV)
def test_callable_and_prefix_masks(opt, dtype):
    want = trajectory(make(opt, mask=MASK), dtype)

    def mask_fn(params):
        assert jax.tree.structure(params) == jax.tree.structure(MASK)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: decayed_paths(jax.tree_util.keystr(path)), params
        )

    assert_bitwise(trajectory(make(opt, mask=mask_fn), dtype), want)
    # A prefix: `ln` as one bool for its subtree.
    prefix = {**MASK, "ln": False}
    assert_bitwise(trajectory(make(opt, mask=prefix), dtype), want)
    # alignjax's own no-decay mask (HF convention: matrices decay, vectors do not).
    params = init_params()
    hf = optim.decay_mask(params)
    assert hf == {
        "inv": {"kernel": True, "bias": False},
        "dense": {"kernel": True, "bias": False},
        "ln": {"scale": False},
    }
    matrices = trajectory(make(opt, mask=hf), dtype)
    decayed, plain = unmasked(opt, dtype), unmasked(opt, dtype, weight_decay=0.0)
    is_matrix = lambda p: p.endswith("['kernel']")  # noqa: E731
    assert_bitwise(pick(matrices, is_matrix), pick(decayed, is_matrix))
    assert_bitwise(
        pick(matrices, lambda p: not is_matrix(p)), pick(plain, lambda p: not is_matrix(p))
    )


@pytest.mark.parametrize("opt", SLOW_NESTEROV)
def test_masks_under_inject_hyperparams(opt, dtype):
    fn = optim.adamp if opt.startswith("adamp") else optim.sgdp
    extra = {} if opt.startswith("adamp") else {"momentum": 0.9}

    def factory(**kw):
        return optax.inject_hyperparams(fn, static_args=("mask",))(
            learning_rate=3e-2, nesterov=opt.endswith("_nesterov"), **extra, **kw
        )

    def mask_fn(params):
        off = jax.tree.map(lambda _: False, params)
        return off | {
            "inv": {"kernel": True, "bias": False},
            "dense": {"kernel": False, "bias": True},
        }

    decayed = trajectory(factory(weight_decay=WD), dtype)
    plain = trajectory(factory(weight_decay=0.0), dtype)
    for mask in (MASK, mask_fn):
        got = trajectory(factory(weight_decay=WD, mask=mask), dtype)
        for g, on, off in zip(got, decayed, plain):
            assert_bitwise(pick(g, decayed_paths), pick(on, decayed_paths))
            assert_bitwise(
                pick(g, lambda p: not decayed_paths(p)),
                pick(off, lambda p: not decayed_paths(p)),
            )
    # A tree mask needs no static_args: inject_hyperparams keeps non-numeric arguments as is.
    tx = optax.inject_hyperparams(fn)(learning_rate=3e-2, weight_decay=WD, mask=MASK, **extra)
    params = jax.tree.map(jnp.asarray, init_params())
    u, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))


def test_mask_errors():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="mask"):
        optim.adamp(1e-3, weight_decay=WD, mask={"w": True}).init(params)
    with pytest.raises(ValueError, match="mask"):
        optim.sgdp(1e-3, weight_decay=WD, mask={"w": True, "c": False}).init(params)
    tx = optim.adamp(1e-3, weight_decay=WD)
    state = tx.init(params)

    @jax.jit
    def traced(m):
        bad = optim.adamp(1e-3, weight_decay=WD, mask={"w": m, "b": False})
        return bad.update(params, state, params)[0]

    with pytest.raises(TypeError, match="static"):
        traced(jnp.asarray(True))
    # Concrete arrays are fine (as in optax's `if m`), also inside jit as constants.
    concrete = optim.adamp(1e-3, weight_decay=WD, mask={"w": np.bool_(True), "b": jnp.asarray(0)})
    want = optim.adamp(1e-3, weight_decay=WD, mask={"w": True, "b": False})
    assert_bitwise(
        jax.jit(concrete.update)(params, state, params)[0],
        jax.jit(want.update)(params, state, params)[0],
    )
