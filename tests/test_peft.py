"""alignjax.peft layers against float64 NumPy transcriptions of PEFT's formulas written in the
torch layout (W = K^T, (out, in)), so every Flax-layout translation is checked too; merge /
unmerge round trips; injection by regex; the adapters-disabled view; adapter-only state.
Tolerances: 1e-12 in x64 for the formulas; 1e-6 for merge/unmerge round trips in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import peft


def linear(n_in, n_out, seed=0, bias=True):
    """float64 parameters when x64 is on (the formula tests), float32 otherwise."""
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return nnx.Linear(n_in, n_out, use_bias=bias, param_dtype=dtype, rngs=nnx.Rngs(seed))


def randomize(layer, seed=1, scale=0.1):
    """Non-zero adapter parameters (PEFT zero-initialises one factor: outputs would be trivial)."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.iter_graph(layer):
        if isinstance(v, peft.AdapterParam):
            v[...] = jnp.asarray(rng.normal(0, scale, v.shape), v.dtype)


def torch_w(layer):
    base = layer.base if isinstance(layer, peft.AdapterLinear) else layer
    return np.asarray(base.kernel[...], np.float64).T  # (out, in)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_lora_matches_peft_formula(rslora, lora_bias, x64):
    layer = peft.LoRA(
        linear(6, 5), rank=3, alpha=7.0, use_rslora=rslora, lora_bias=lora_bias, rngs=nnx.Rngs(1)
    )
    randomize(layer)
    x = np.random.default_rng(2).normal(size=(4, 6))
    A, B = np.asarray(layer.lora_a[...]).T, np.asarray(layer.lora_b[...]).T  # (r, in), (out, r)
    s = 7.0 / (np.sqrt(3) if rslora else 3)
    W, b = torch_w(layer), np.asarray(layer.base.bias[...])
    want = x @ W.T + b + s * (x @ A.T @ B.T)
    if lora_bias:
        want = want + s * np.asarray(layer.lora_bias[...])
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    np.testing.assert_allclose(layer.base.kernel[...].T, W + s * B @ A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.base.kernel[...].T, W, rtol=1e-12, atol=1e-14)


def test_dora_matches_peft_formula(x64):
    layer = peft.LoRA(linear(6, 5), rank=2, alpha=4.0, use_dora=True, rngs=nnx.Rngs(1))
    W = torch_w(layer)
    np.testing.assert_allclose(layer.magnitude[...], np.linalg.norm(W, axis=1), rtol=1e-12)
    randomize(layer)
    x = np.random.default_rng(3).normal(size=(4, 6))
    A, B = np.asarray(layer.lora_a[...]).T, np.asarray(layer.lora_b[...]).T
    m, b, s = np.asarray(layer.magnitude[...]), np.asarray(layer.base.bias[...]), 2.0
    norm = np.linalg.norm(W + s * B @ A, axis=1)
    base = x @ W.T + b
    want = base + (m / norm - 1) * (base - b) + (m / norm) * s * (x @ A.T @ B.T)
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    merged = (m / norm)[:, None] * (W + s * B @ A)
    np.testing.assert_allclose(layer.base.kernel[...].T, merged, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.base.kernel[...].T, W, rtol=1e-12, atol=1e-12)


def test_lora_inits(x64):
    W = torch_w(linear(400, 30))
    default = peft.LoRA(linear(400, 30), rank=16, rngs=nnx.Rngs(0))
    a = np.asarray(default.lora_a[...])
    assert np.abs(a).max() <= 1 / np.sqrt(400) and np.abs(a).max() > 0.9 / np.sqrt(400)
    assert np.all(np.asarray(default.lora_b[...]) == 0)
    g = peft.LoRA(linear(400, 30), rank=16, init="gaussian", rngs=nnx.Rngs(0))
    assert abs(np.std(np.asarray(g.lora_a[...])) - 1 / 16) < 0.01
    pissa = peft.LoRA(linear(400, 30), rank=4, alpha=8.0, init="pissa", rngs=nnx.Rngs(0))
    s = 2.0
    A, B = np.asarray(pissa.lora_a[...]).T, np.asarray(pissa.lora_b[...]).T
    # The adapter holds the top-4 singular directions; base + adapter is the original weight.
    np.testing.assert_allclose(torch_w(pissa) + s * B @ A, W, rtol=1e-10, atol=1e-12)
    u, sv, vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(s * B @ A, (u[:, :4] * sv[:4]) @ vt[:4], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_in", [8, 10])  # 10 % 4 != 0: the zero-padded last chunk
def test_bone_matches_peft_formula(n_in, x64):
    layer = peft.Bone(linear(n_in, 6), rank=4, variant="bone", rngs=nnx.Rngs(1))
    randomize(layer)
    x = np.random.default_rng(4).normal(size=(3, n_in))
    blk, W, b = np.asarray(layer.block[...]), torch_w(layer), np.asarray(layer.base.bias[...])
    # PEFT: W'[o, j r + k] = W[o, j r + k] + B[k, o]
    Wp = W.copy()
    for o in range(6):
        for c in range(n_in):
            Wp[o, c] += blk[c % 4, o]
    want = x @ Wp.T + b
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    np.testing.assert_allclose(layer.base.kernel[...].T, Wp, rtol=1e-12, atol=1e-14)
    layer.unmerge()
    np.testing.assert_allclose(layer.base.kernel[...].T, W, rtol=1e-12, atol=1e-14)


def test_bat_matches_peft_formula(x64):
    layer = peft.Bone(linear(8, 12), rank=4, variant="bat", rngs=nnx.Rngs(1))
    randomize(layer, scale=0.3)
    blk, W = np.asarray(layer.block[...]), torch_w(layer)  # (out/r, r, r), (out, in)
    Wp = W.copy()
    for i in range(3):  # output block
        for j in range(2):  # input block
            wij = W[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            Wp[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = wij @ (np.eye(4) + blk[i]) + blk[i]
    x = np.random.default_rng(5).normal(size=(3, 8))
    want = x @ Wp.T + np.asarray(layer.base.bias[...])
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    np.testing.assert_allclose(layer.base.kernel[...].T, Wp, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.base.kernel[...].T, W, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"divisible.*\[r, r\] blocks"):
        peft.Bone(linear(10, 12), rank=4, variant="bat", rngs=nnx.Rngs(0))


def test_mini_and_adalora_match_peft_formulas(x64):
    mini = peft.Bone(linear(8, 6), rank=4, variant="mini", mini_r=2, rngs=nnx.Rngs(1))
    randomize(mini)
    x = np.random.default_rng(6).normal(size=(3, 8))
    blk = np.tile(np.asarray(mini.block[...]), (1, 3))  # (r, out): column o uses o % mini_r
    Wp = torch_w(mini) + np.tile(blk.T, (1, 2))
    want = x @ Wp.T + np.asarray(mini.base.bias[...])
    np.testing.assert_allclose(mini(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)

    ada = peft.AdaLoRA(linear(8, 6), rank=3, alpha=8.0, rngs=nnx.Rngs(1))
    assert np.all(np.asarray(ada.lora_e[...]) == 0)
    randomize(ada)
    A, E, B = (np.asarray(v[...]) for v in (ada.lora_a, ada.lora_e, ada.lora_b))
    A, B = A.T, B.T  # PEFT (r, in), (out, r)
    delta = B @ (A * E[:, None]) * 8.0 / (3 + 1e-5)
    want = x @ (torch_w(ada) + delta).T + np.asarray(ada.base.bias[...])
    np.testing.assert_allclose(ada(jnp.asarray(x)), want, rtol=1e-12, atol=1e-12)


def test_merge_unmerge_round_trip_float32():
    for layer in (
        peft.LoRA(linear(16, 12), rank=4, alpha=8.0, use_dora=True, rngs=nnx.Rngs(1)),
        peft.Bone(linear(16, 12), rank=4, variant="bat", rngs=nnx.Rngs(1)),
        peft.Bone(linear(14, 12), rank=4, variant="bone", rngs=nnx.Rngs(1)),
        peft.AdaLoRA(linear(16, 12), rank=4, rngs=nnx.Rngs(1)),
    ):
        randomize(layer, scale=0.2)
        k0 = np.asarray(layer.base.kernel[...])
        x = jnp.asarray(np.random.default_rng(7).normal(size=(5, layer.in_features)), jnp.float32)
        before = layer(x)
        layer.merge()
        np.testing.assert_allclose(layer(x), before, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        np.testing.assert_allclose(layer.base.kernel[...], k0, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="not merged"):
            layer.unmerge()


class Block(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([self._layer(rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 3, rngs=rngs)

    @staticmethod
    def _layer(rngs):
        layer = nnx.Module()
        layer.q_proj = nnx.Linear(8, 8, rngs=rngs)
        layer.v_proj = nnx.Linear(8, 8, rngs=rngs)
        layer.norm = nnx.LayerNorm(8, rngs=rngs)
        return layer

    def __call__(self, x):
        for layer in self.layers:
            x = layer.norm(x + layer.q_proj(x) + layer.v_proj(x))
        return self.head(x)


def test_apply_rules_first_match_exclusions_and_errors():
    model = Block(nnx.Rngs(0))
    assert peft.linear_paths(model) == [
        "head",
        "layers/0/q_proj",
        "layers/0/v_proj",
        "layers/1/q_proj",
        "layers/1/v_proj",
    ]
    rules = [
        peft.Rule("layers/1/v_proj", method=None),  # excluded
        peft.Rule(r"layers/\d+/q_proj", "bone", rank=4),
        peft.Rule(r"layers/\d+/.*", "lora", rank=2, alpha=4.0),
    ]
    got = peft.apply(model, rules, rngs=nnx.Rngs(1))
    assert got == ["layers/0/q_proj", "layers/0/v_proj", "layers/1/q_proj"]
    kinds = {path: (type(m).__name__, getattr(m, "rank", None)) for path, m in peft.adapters(model)}
    assert kinds == {
        "layers/0/q_proj": ("Bone", 4),
        "layers/0/v_proj": ("LoRA", 2),
        "layers/1/q_proj": ("Bone", 4),
    }
    assert isinstance(model.layers[1].v_proj, nnx.Linear)
    with pytest.raises(ValueError, match=r"no nnx.Linear module.*'head'"):
        peft.apply(Block(nnx.Rngs(0)), [peft.Rule("attn/.*")], rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="rank"):
        peft.Rule(".*", rank=0)
    with pytest.raises(ValueError, match="method"):
        peft.Rule(".*", method="ia3")


def test_disabled_view_is_the_base_model_and_training_touches_only_adapters():
    model = Block(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(4, 8)), jnp.float32)
    reference = model(x)
    peft.apply(
        model,
        [peft.Rule(r".*q_proj", "bat", rank=4), peft.Rule(r".*v_proj", "dora", rank=2)],
        rngs=nnx.Rngs(1),
    )
    randomize(model)
    assert not np.allclose(model(x), reference, atol=1e-4)

    @nnx.jit
    def both(model, x):
        with peft.adapters_disabled(model):
            ref = model(x)
        return model(x), ref

    policy, ref = both(model, x)
    np.testing.assert_allclose(ref, reference, rtol=1e-6, atol=1e-6)
    assert not np.allclose(policy, reference, atol=1e-4)

    frozen_before = jax.tree.map(
        np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(peft.AdapterParam)))
    )
    adapters_before = jax.tree.map(np.asarray, peft.adapter_state(model))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=peft.AdapterParam)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, peft.AdapterParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(2):
        step(model, optimizer, x)
    frozen_after = jax.tree.map(
        np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(peft.AdapterParam)))
    )
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(adapters_before), jax.tree.leaves(peft.adapter_state(model))
        )
    ]
    assert all(changed)


def test_adapter_state_round_trip_and_unload():
    model = Block(nnx.Rngs(0))
    peft.apply(model, [peft.Rule(r".*_proj", "lora", rank=2)], rngs=nnx.Rngs(1))
    randomize(model, seed=3)
    saved = jax.tree.map(np.asarray, peft.adapter_state(model))
    x = jnp.ones((2, 8))
    out = model(x)
    other = Block(nnx.Rngs(0))
    peft.apply(other, [peft.Rule(r".*_proj", "lora", rank=2)], rngs=nnx.Rngs(5))
    peft.load_adapter_state(other, jax.tree.map(jnp.asarray, saved))
    np.testing.assert_allclose(other(x), out, rtol=1e-6)
    peft.unload(other)
    assert not peft.adapters(other) and isinstance(other.layers[0].q_proj, nnx.Linear)
    np.testing.assert_allclose(other(x), out, rtol=1e-5, atol=1e-6)


def test_adalora_training_step_with_the_allocator():
    """One jitted step: loss + orthogonal regulariser, adapter-only update, allocation; the
    allocator's masks land in the layers' e."""
    model = Block(nnx.Rngs(0))
    peft.apply(model, [peft.Rule(r".*_proj", "adalora", rank=4, alpha=8.0)], rngs=nnx.Rngs(1))
    cfg = peft.AdaLoraSchedule(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6)
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=peft.AdapterParam)
    state = peft.init_allocator(peft.adalora_triplets(model))
    x = jnp.asarray(np.random.default_rng(9).normal(size=(8, 8)), jnp.float32)

    @nnx.jit(static_argnums=(4,))
    def step(model, optimizer, state, t, cfg):
        def loss_fn(m):
            reg = peft.orthogonal_regularizer(peft.adalora_triplets(m))
            return jnp.mean((m(x) - 1.0) ** 2) + 0.5 * reg

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, peft.AdapterParam))(model)
        optimizer.update(model, grads)
        params, state, info = peft.update_and_allocate(
            peft.adalora_triplets(model), peft.adalora_triplets(model, grads), state, t, cfg
        )
        peft.set_adalora_e(model, params)
        return state, info

    for t in range(cfg.total_step):
        state, info = step(model, optimizer, state, t, cfg)
    kept = sum(int(jnp.sum(layer.lora_e[...] != 0)) for _, layer in peft.adapters(model))
    assert int(info.budget) == 2 * 4 and kept == 8  # target_r * layers singular values remain
