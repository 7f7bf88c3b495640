"""Parameter labels: paths, regex rules, adapters, no-decay masks, Half Fine-Tuning, masked_train.

Expected labels are written out by hand; optimizer behaviour is checked bitwise (frozen leaves)
or against a float64 NumPy Adam (moments kept across an HFT stage switch).
"""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax.optim.labels import (
    FROZEN,
    TRAINABLE,
    MaskedTrainState,
    adapter_labels,
    decay_mask,
    hft,
    hft_labels,
    label_by_regex,
    masked_train,
    param_paths,
    path_string,
    set_trainable,
    train_only,
)

T, F = TRAINABLE, FROZEN
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_norm", "post_norm")


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        for name in ATTN + MLP:
            setattr(self, name, nnx.Linear(d, d, rngs=rngs))
        self.input_norm = nnx.RMSNorm(d, rngs=rngs)
        self.post_norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x):
        y = self.input_norm(x)
        x = x + self.o_proj(jnp.tanh(self.q_proj(y) * self.k_proj(y)) + self.v_proj(y))
        y = self.post_norm(x)
        return x + self.down_proj(nnx.silu(self.gate_proj(y)) * self.up_proj(y))


class TinyLM(nnx.Module):
    def __init__(self, n_layers: int = 2, d: int = 4, vocab: int = 7, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List([Block(d, rngs) for _ in range(n_layers)])
        self.final_norm = nnx.RMSNorm(d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.final_norm(x))


IDS = jnp.array([[1, 2, 3], [4, 5, 6]])


def from_numpy(make, seed: int = 0):
    """Random NumPy values: no init program to compile (shapes-only tests use nnx.eval_shape)."""
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    values = jax.tree.map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype),
        nnx.as_pure(nnx.state(model)),
    )
    nnx.update(model, values)
    return model


def lm_loss(model):
    return -jnp.mean(jax.nn.log_softmax(model(IDS))[..., 0])


def dict_lm(n_layers: int) -> dict:
    """A plain pytree shaped like TinyLM (Linear: kernel + bias, norms: scale)."""
    lin = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    layer = {n: dict(lin) for n in ATTN + MLP} | {n: {"scale": jnp.ones(2)} for n in NORMS}
    return {
        "embed": {"embedding": jnp.ones((5, 2))},
        "layers": [dict(layer) for _ in range(n_layers)],
        "final_norm": {"scale": jnp.ones(2)},
        "lm_head": dict(lin),
    }


def flat(tree) -> dict:
    return {path_string(p): v for p, v in jtu.tree_flatten_with_path(tree)[0]}


def snapshot(model) -> dict:
    return {k: np.asarray(v) for k, v in flat(nnx.as_pure(nnx.state(model, nnx.Param))).items()}


def test_path_string_handles_every_key_type():
    path = (jtu.DictKey("a"), jtu.GetAttrKey("b"), jtu.SequenceKey(3), jtu.FlattenedIndexKey(7))
    assert path_string(path) == "a/b/3/7"
    assert param_paths({"w": [jnp.ones(1), {"x": jnp.ones(1)}]}) == {"w": ["w/0", {"x": "w/1/x"}]}


def test_param_paths_of_nnx_state_are_module_paths_with_pure_structure():
    model = nnx.eval_shape(lambda: TinyLM(rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    paths = param_paths(state)
    assert jax.tree.structure(paths) == jax.tree.structure(nnx.as_pure(state))
    leaves = jax.tree.leaves(paths)
    assert "layers/0/q_proj/kernel" in leaves and "layers/1/post_norm/scale" in leaves
    assert not any(p.endswith("value") for p in leaves)
    assert jax.tree.leaves(param_paths(model)) == leaves  # a Module means nnx.state(model, Param)


def test_label_by_regex_first_fullmatch_wins():
    p = {"enc": {"q_proj": {"kernel": 1.0, "bias": 2.0}}, "head": {"kernel": 3.0}}
    rules = [(r".*/bias", "nodecay"), (r"enc/.*", "enc"), (r"head/.*", "head"), (r"kernel", "no")]
    expected = {"enc": {"q_proj": {"kernel": "enc", "bias": "nodecay"}}, "head": {"kernel": "head"}}
    assert label_by_regex(p, rules, "other") == expected
    # fullmatch, not search: "q_proj" alone does not label "enc/q_proj/kernel"
    assert label_by_regex(p, {"q_proj": "x"}, "other") == jax.tree.map(lambda _: "other", p)
    with pytest.raises(ValueError, match="`rules`"):
        label_by_regex(p, [("(", "x")], "other")


def test_adapter_labels_plain_tree_by_path():
    w = jnp.ones((2, 2))
    p = {
        "backbone": {"kernel": w},
        "q_proj": {"kernel": w, "lora_a": w, "lora_B": w},
        "mlp": {"adapter_down": {"kernel": w}, "bone_a": w, "bones": w},
        "lora": {"a": w},
    }
    expected = {
        "backbone": {"kernel": F},
        "q_proj": {"kernel": F, "lora_a": T, "lora_B": T},
        "mlp": {"adapter_down": {"kernel": T}, "bone_a": T, "bones": F},
        "lora": {"a": T},
    }
    assert adapter_labels(p) == expected
    with pytest.raises(ValueError, match="no adapter"):
        adapter_labels({"backbone": {"kernel": w}})


class MyAdapter(nnx.LoRAParam):
    pass


class AdaptedNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(7, 4, rngs=rngs)
        self.proj = nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.gain = MyAdapter(jnp.full((4,), 1.5))
        self.head = nnx.Linear(4, 7, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.norm(self.proj(self.embed(ids))) * self.gain[...])


ADAPTED_LABELS = {
    "embed": {"embedding": F},
    "gain": T,
    "head": {"bias": F, "kernel": F},
    "norm": {"bias": F, "scale": F},
    "proj": {"bias": F, "kernel": F, "lora": {"lora_a": T, "lora_b": T}},
}


def test_adapter_labels_nnx_variable_types_and_user_filter():
    model = nnx.eval_shape(lambda: AdaptedNet(nnx.Rngs(0)))
    labels = adapter_labels(model)
    assert nnx.to_pure_dict(labels) == ADAPTED_LABELS
    assert nnx.to_pure_dict(adapter_labels(nnx.state(model, nnx.Param))) == ADAPTED_LABELS
    only_mine = nnx.to_pure_dict(adapter_labels(model, adapter_filter=MyAdapter))
    assert jax.tree.leaves(only_mine).count(T) == 1 and only_mine["gain"] == T


def test_train_only_adapters_in_nnx_optimizer_and_plain_partition():
    model = from_numpy(lambda: AdaptedNet(nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    labels = adapter_labels(state)
    tx = optax.partition({T: optax.adam(1e-2), F: optax.set_to_zero()}, labels)
    tx.init(state)  # labels are a prefix of the Variable state
    optimizer = nnx.Optimizer(model, train_only(optax.adam(1e-2), labels), wrt=nnx.Param)
    before = snapshot(model)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(IDS) ** 2))(model))

    for _ in range(2):
        step(model, optimizer)
    after = snapshot(model)
    for path, label in flat(labels).items():
        same = np.array_equal(before[path], after[path])
        assert same == (label == F), path


def test_decay_mask_excludes_1d_norm_and_bias_keeps_embeddings():
    o = jnp.ones
    p = {
        "embed": {"embedding": o((5, 3))},
        "attn": {"kernel": o((3, 3)), "bias": o(3)},
        "ln_f": {"scale": o(3)},
        "gain": o(3),
        # nnx.scan layers carry a leading layer axis: bias and norm are excluded by name
        "stacked": {"bias": o((2, 3)), "rms_norm": {"scale": o((2, 3))}, "kernel": o((2, 3))},
    }
    expected = {
        "embed": {"embedding": True},
        "attn": {"kernel": True, "bias": False},
        "ln_f": {"scale": False},
        "gain": False,
        "stacked": {"bias": False, "rms_norm": {"scale": False}, "kernel": True},
    }
    assert decay_mask(p) == expected
    assert decay_mask(p, decay_embeddings=False)["embed"]["embedding"] is False
    with pytest.raises(ValueError, match="`min_ndim`"):
        decay_mask(p, min_ndim=-1)
    m = flat(decay_mask(nnx.eval_shape(lambda: TinyLM(rngs=nnx.Rngs(0)))))
    assert m["layers/0/q_proj/kernel"] and m["embed/embedding"] and m["lm_head/kernel"]
    assert not (m["layers/0/q_proj/bias"] or m["layers/1/post_norm/scale"] or m["final_norm/scale"])


def test_adamw_with_decay_mask_matches_closed_form():
    lr, wd = 0.1, 0.5
    p = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0), "norm": {"scale": jnp.full(2, 3.0)}}
    zero = jax.tree.map(jnp.zeros_like, p)  # Adam step is 0: only the decay moves params
    tx = optax.adamw(lr, weight_decay=wd, mask=decay_mask(p))
    updates, _ = jax.jit(tx.update)(zero, tx.init(p), p)
    new = optax.apply_updates(p, updates)
    np.testing.assert_allclose(new["w"], 2.0 * (1 - lr * wd), rtol=1e-6)
    np.testing.assert_array_equal(new["b"], p["b"])
    np.testing.assert_array_equal(new["norm"]["scale"], p["norm"]["scale"])
    plain = optax.adamw(lr, weight_decay=wd)  # without the mask the 1-D leaves would decay
    unmasked = optax.apply_updates(p, plain.update(zero, plain.init(p), p)[0])
    np.testing.assert_allclose(unmasked["b"], 2.0 * (1 - lr * wd), rtol=1e-6)


def check_hft_counts(labels: dict, n_layers: int, *, outside: str = T) -> None:
    f = flat(labels)
    for i in range(n_layers):
        pre = f"layers/{i}/"
        for name in ATTN + MLP:  # a Linear's kernel and bias share one decision
            assert f[pre + name + "/kernel"] == f[pre + name + "/bias"]
        assert sum(f[pre + n + "/kernel"] == T for n in ATTN) == 2
        assert sum(f[pre + n + "/scale"] == T for n in NORMS) == 1
    per_layer_mlp = [sum(f[f"layers/{i}/{n}/kernel"] == T for n in MLP) for i in range(n_layers)]
    assert set(per_layer_mlp) <= {1, 2}
    assert sum(per_layer_mlp) == int(np.ceil(1.5 * n_layers - 0.5))  # half, ties round down
    for path in ("embed/embedding", "final_norm/scale", "lm_head/kernel", "lm_head/bias"):
        assert f[path] == outside


@pytest.mark.parametrize("n_layers", [2, 3, 4])
def test_hft_half_of_each_category_per_layer(n_layers):
    for stage in range(4):
        check_hft_counts(hft_labels(dict_lm(n_layers), seed=1, stage=stage), n_layers)
    frozen_outside = hft_labels(dict_lm(n_layers), seed=1, train_outside_blocks=False)
    check_hft_counts(frozen_outside, n_layers, outside=F)


def test_hft_on_nnx_state_same_rule():
    model = nnx.eval_shape(lambda: TinyLM(n_layers=4, rngs=nnx.Rngs(0)))
    labels = hft_labels(nnx.state(model, nnx.Param), seed=3, stage=2)
    assert jax.tree.structure(labels) == jax.tree.structure(nnx.as_pure(nnx.state(model)))
    check_hft_counts(labels, 4)


def test_hft_deterministic_per_seed_and_stage():
    p = dict_lm(4)
    assert hft_labels(p, seed=7, stage=1) == hft_labels(p, seed=7, stage=1)
    by_stage = [jax.tree.leaves(hft_labels(p, seed=7, stage=s)) for s in range(5)]
    assert len({tuple(x) for x in by_stage}) >= 4
    assert hft_labels(p, seed=8, stage=1) != hft_labels(p, seed=7, stage=1)


def test_hft_fraction_other_category_and_fallback():
    quarter = flat(hft_labels(dict_lm(2), seed=0, fraction=0.25))
    for i in range(2):
        assert sum(quarter[f"layers/{i}/{n}/kernel"] == T for n in ATTN) == 1
    # 3 MLP members x 0.25 = 0.75 per layer: 1.5 over 2 layers rounds down to 1 extra
    assert sum(quarter[f"layers/{i}/{n}/kernel"] == T for i in range(2) for n in MLP) == 1
    # in-block leaves of no category: one member per parent module, half of them
    p = {"layers": [{"a": {"w": 1.0, "b": 2.0}, "c": {"w": 3.0}} for _ in range(2)]}
    other = flat(hft_labels(p, seed=0, category_patterns={}))
    for i in range(2):
        assert other[f"layers/{i}/a/w"] == other[f"layers/{i}/a/b"]
        assert (other[f"layers/{i}/a/w"] == T) + (other[f"layers/{i}/c/w"] == T) == 1
    # no block matches: a random half of the leaves, ties rounded down
    labels = hft_labels({f"w{i}": jnp.ones(2) for i in range(5)}, seed=0)
    assert jax.tree.leaves(labels).count(T) == 2


@pytest.mark.parametrize("name, value", [("seed", -1), ("stage", 1.5), ("fraction", 2)])
def test_hft_invalid_arguments(name, value):
    kwargs = {"seed": 0, name: value}
    with pytest.raises(ValueError, match=f"`{name}`"):
        hft_labels(dict_lm(2), **kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        hft(optax.sgd(0.1), **kwargs)


def numpy_adam(g, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
    """float64 Adam displacement for a constant gradient, fresh moments, global step counts."""
    x, mu, nu = np.zeros_like(g), 0.0, 0.0
    for t in steps:
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        x -= lr * (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    return x


def test_masked_train_stage_switch_keeps_moments_without_retrace():
    lr, k = 0.01, 4
    p = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(3)}
    grads = np.array([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0], [2.0, 1.0, 1.0]])
    g = {name: jnp.asarray(grads[i], jnp.float32) for i, name in enumerate("abc")}
    tx = masked_train(optax.adam(lr), {"a": T, "b": F, "c": True})
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params, state = p, tx.init(p)
    for _ in range(k):
        params, state = step(params, state)
    np.testing.assert_array_equal(params["b"], p["b"])
    np.testing.assert_array_equal(state.inner_state[0].mu["b"], 0.0)
    c_mu, c_nu, c_stage0 = state.inner_state[0].mu["c"], state.inner_state[0].nu["c"], params["c"]

    state = set_trainable(state, {"a": T, "b": T, "c": F})
    for _ in range(k):
        params, state = step(params, state)
    assert len(traces) == 1

    np.testing.assert_allclose(params["a"] - 1, numpy_adam(grads[0], range(1, 2 * k + 1), lr), 1e-5)
    # b starts moving at the switch with fresh moments and the global count k + 1, ...
    np.testing.assert_allclose(
        params["b"] - 1, numpy_adam(grads[1], range(k + 1, 2 * k + 1), lr), 1e-5
    )
    # ... while c stops and keeps its moments for a later stage
    np.testing.assert_array_equal(params["c"], c_stage0)
    np.testing.assert_array_equal(state.inner_state[0].mu["c"], c_mu)
    np.testing.assert_array_equal(state.inner_state[0].nu["c"], c_nu)


def test_hft_in_nnx_optimizer_frozen_bitwise_and_stage_switch():
    model = from_numpy(lambda: TinyLM(rngs=nnx.Rngs(0)))
    tx = hft(optax.adamw(1e-2, weight_decay=0.1), seed=0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer):
        traces.append(None)
        optimizer.update(model, nnx.grad(lm_loss)(model))

    stage_labels = [flat(hft_labels(model, seed=0, stage=s)) for s in (0, 1)]
    for stage, labels in enumerate(stage_labels):
        if stage:  # in place: the jitted step sees the new mask without retracing
            set_trainable(optimizer.opt_state, hft_labels(model, seed=0, stage=1))
        before = snapshot(model)
        for _ in range(2):
            step(model, optimizer)
        after = snapshot(model)
        for path, label in labels.items():
            assert np.array_equal(before[path], after[path]) == (label == F), (stage, path)
    assert stage_labels[0] != stage_labels[1]
    assert len(traces) == 1


def test_masked_train_pauses_partition_states_and_errors():
    p = {"a": jnp.ones(2), "b": jnp.ones(2)}
    inner = optax.partition({"x": optax.adam(0.1), "y": optax.sgd(0.1, 0.9)}, {"a": "x", "b": "y"})
    tx = masked_train(inner, {"a": F, "b": F})  # moments live in partial (MaskedNode) trees
    _, state = tx.update(p, tx.init(p), p)
    assert not any(np.any(x) for x in jax.tree.leaves(state) if x.dtype == jnp.float32)
    with pytest.raises(ValueError, match="`trainable`"):
        masked_train(optax.sgd(0.1), {"a": T}).init(p)
    with pytest.raises(ValueError, match="labels must be"):
        masked_train(optax.sgd(0.1), {"a": T, "b": "maybe"}).init(p)
    state = masked_train(optax.sgd(0.1), lambda params: {"a": T, "b": F}).init(p)
    assert isinstance(state, MaskedTrainState)
    with pytest.raises(ValueError, match="`trainable`"):
        set_trainable(state, {"a": T})
    with pytest.raises(ValueError, match="no MaskedTrainState"):
        set_trainable(optax.sgd(0.1).init(p), {"a": T, "b": F})
