"""alignjax.train.sharding: spec assignment for every parameter of a tiny Llama (and a
LoRA-wrapped one) against a hand-written table, divisibility fallbacks, and the same loss and
gradient under every mesh layout and under pmap as on one device.

Tolerance: 1e-5 relative (gradients: per leaf, relative to the leaf's largest entry). The math
is identical; only the float32 reduction order changes (the batch sum is split across devices
and all-reduced, matmuls contracting over a sharded dimension add partial products in another
order). Observed: losses equal, gradients within 2.3e-6, the same size as the single-device
float32 result's own distance from float64 (2.4e-6) or from a recompile at another optimisation
level (1.9e-6).
"""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alignjax import peft
from alignjax.models import LlamaConfig, LlamaForCausalLM
from alignjax.train import sharding

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    qkv_bias=True,  # Qwen2-style biases exercise the bias rule
)
BATCH, TOKENS = 8, 16
RTOL = 1e-5
# LLVM codegen at -O0 halves compile time; the SPMD partitioner, which is what is under test,
# runs in full either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# Written out by hand from the Megatron layout, independent of the rules' regexes.
COL, ROW = P("fsdp", "tensor"), P("tensor", "fsdp")
LAYER = {
    "input_layernorm/weight": P(),
    "post_attention_layernorm/weight": P(),
    "self_attn/q_proj/kernel": COL,
    "self_attn/k_proj/kernel": COL,
    "self_attn/v_proj/kernel": COL,
    "self_attn/q_proj/bias": P("tensor"),
    "self_attn/k_proj/bias": P("tensor"),
    "self_attn/v_proj/bias": P("tensor"),
    "self_attn/o_proj/kernel": ROW,
    "mlp/gate_proj/kernel": COL,
    "mlp/up_proj/kernel": COL,
    "mlp/down_proj/kernel": ROW,
}
EXPECTED = {
    "model/embed_tokens/embedding": P("tensor", "fsdp"),
    "model/norm/weight": P(),
    "lm_head/kernel": COL,
    **{f"model/layers/{i}/{k}": v for i in range(2) for k, v in LAYER.items()},
}


def flat(tree) -> dict:
    """'/'-joined path -> leaf of an nnx.State (written independently of the module's naming)."""
    return {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(tree)}


def tiny_model(cfg=CFG):
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def abstract_state(cfg=CFG):
    return nnx.split(nnx.eval_shape(lambda: tiny_model(cfg)))


@pytest.fixture(scope="module")
def problem():
    """Random parameters drawn in NumPy into the abstract model (eager NNX initialisation
    compiles dozens of small kernels; this compiles none), every bias and norm non-trivial."""
    rng = np.random.default_rng(0)
    graphdef, state = abstract_state()
    state = jax.tree.map(
        lambda x: jnp.asarray((x.ndim == 1) + rng.normal(0, 0.2, x.shape), x.dtype), state
    )
    ids = rng.integers(0, CFG.vocab_size, (BATCH, TOKENS), dtype=np.int32)
    mask = np.ones((BATCH, TOKENS), np.int32)
    mask[::3, -4:] = 0  # some right padding
    # One function object for every jit below, so that its trace is cached and reused.
    value_and_grad = jax.value_and_grad(lambda s, b: loss_fn(graphdef, s, b))
    return graphdef, state, {"input_ids": ids, "attention_mask": mask}, value_and_grad


def mesh_222():
    return sharding.make_mesh(data=2, fsdp=2, tensor=2)


def test_docstring_examples_run():
    result = doctest.testmod(sharding)
    assert result.attempted > 0 and result.failed == 0


# -- meshes -----------------------------------------------------------------------------------


def test_make_mesh_shapes():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    mesh = sharding.make_mesh(data=-1, tensor=2, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"data": 2, "fsdp": 2, "tensor": 1}, r"= 4 devices, but there are 8"),
        ({"data": 4, "fsdp": 4}, r"= 16 devices, but there are 8"),
        ({"data": -1, "fsdp": 3}, r"product 3 does not divide the 8 devices"),
        ({"data": -1, "fsdp": -1}, r"only one mesh axis may be -1"),
        ({"data": 0}, r"`data` must be a positive int or -1"),
    ],
)
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(**kwargs)


# -- spec assignment --------------------------------------------------------------------------


def test_specs_for_every_parameter():
    _, state = abstract_state()
    specs = sharding.param_specs(state, mesh_222())
    assert jax.tree.structure(specs) == jax.tree.structure(state)
    assert flat(specs) == EXPECTED
    assert sharding.explain_specs(state, mesh_222()) == []


def test_specs_tied_embeddings_abstract_state():
    """No lm_head when tied; an abstract state (nnx.eval_shape) needs no parameters in memory."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    _, state = abstract_state(cfg)
    specs = flat(sharding.param_specs(state, mesh_222()))
    assert specs == {k: v for k, v in EXPECTED.items() if k != "lm_head/kernel"}


def test_specs_lora_wrapped():
    def build():
        model = tiny_model()
        rule = peft.Rule(r".*/(q_proj|v_proj|down_proj)", "lora", rank=4, dropout=0.1)
        assert len(peft.apply(model, [rule], rngs=nnx.Rngs(1))) == 6
        return model

    _, state = nnx.split(nnx.eval_shape(build))
    got = flat(sharding.param_specs(state, mesh_222()))
    want = dict(EXPECTED)
    for i in range(2):
        layer = f"model/layers/{i}"
        for name in ("self_attn/q_proj", "self_attn/v_proj"):
            want[f"{layer}/{name}/base/kernel"] = want.pop(f"{layer}/{name}/kernel")
            want[f"{layer}/{name}/base/bias"] = want.pop(f"{layer}/{name}/bias")
            want[f"{layer}/{name}/lora_a"] = P("fsdp", None)  # [in, r]
            want[f"{layer}/{name}/lora_b"] = P(None, "tensor")  # [r, out]
        want[f"{layer}/mlp/down_proj/base/kernel"] = want.pop(f"{layer}/mlp/down_proj/kernel")
        want[f"{layer}/mlp/down_proj/lora_a"] = P("tensor", None)
        want[f"{layer}/mlp/down_proj/lora_b"] = P(None, "fsdp")
        for name in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj"):
            want[f"{layer}/{name}/dropout/rngs/key"] = P()
            want[f"{layer}/{name}/dropout/rngs/count"] = P()
    assert got == want


def test_specs_for_optimizer_moments():
    """Paths of optax moments end in the parameter's path, so the same rules place them."""
    _, state = abstract_state()
    params = nnx.state(state, nnx.Param)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    specs = sharding.param_specs(opt_state, mesh_222())
    adam = specs[0]
    assert adam.count == P()
    assert flat(adam.mu) == EXPECTED and flat(adam.nu) == EXPECTED


def test_non_divisible_dimension_falls_back_and_is_reported(caplog):
    cfg = dataclasses.replace(CFG, vocab_size=65, num_hidden_layers=1)
    _, state = abstract_state(cfg)
    mesh = mesh_222()
    with caplog.at_level("WARNING", logger="alignjax.train.sharding"):
        specs = flat(sharding.param_specs(state, mesh))
    assert specs["model/embed_tokens/embedding"] == P(None, "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", None)
    assert specs["model/layers/0/mlp/up_proj/kernel"] == COL  # unaffected
    assert sharding.explain_specs(state, mesh) == [
        sharding.Fallback("lm_head/kernel", 1, 65, ("tensor",), 2),
        sharding.Fallback("model/embed_tokens/embedding", 0, 65, ("tensor",), 2),
    ]
    assert "2 dimension(s) replicated" in caplog.text and "lm_head/kernel dim 1" in caplog.text


def test_joint_axes_divisibility():
    """An entry naming several axes needs their product to divide the dimension."""
    state = {"w": jnp.zeros((6, 8))}
    rules = [("w", P(("data", "fsdp"), ("fsdp", "tensor")))]
    got = sharding.explain_specs(state, mesh_222(), rules)
    assert got == [sharding.Fallback("w", 0, 6, ("data", "fsdp"), 4)]
    assert sharding.param_specs(state, mesh_222(), rules)["w"] == P(None, ("fsdp", "tensor"))


def test_spec_longer_than_ndim_names_the_path():
    _, state = abstract_state()
    rules = [(r"model/norm/weight$", P("fsdp", "tensor")), *sharding.DEFAULT_RULES]
    with pytest.raises(ValueError, match=r"'model/norm/weight'.*2 entries.*1 dimensions"):
        sharding.param_specs(state, mesh_222(), rules)
    with pytest.raises(ValueError, match=r"mesh axis 'model'"):
        sharding.param_specs(state, mesh_222(), [("norm", P("model"))])


# -- the same loss and gradient under every layout --------------------------------------------


def loss_fn(graphdef, state, batch):
    """Sum over the batch of next-token cross entropy on real tokens."""
    model = nnx.merge(graphdef, state)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model.logits(model(ids, mask).last_hidden_state)[:, :-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    return -jnp.sum(logp * mask[:, 1:])


@pytest.fixture(scope="module")
def reference(problem):
    _, state, batch, value_and_grad = problem
    step = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)
    loss, grads = step(state, jax.tree.map(jnp.asarray, batch))
    return float(loss), jax.tree.map(np.asarray, grads)


def assert_same(loss, grads, reference):
    ref_loss, ref_grads = reference
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL)
    # Per leaf, relative to its largest entry: an elementwise rtol is meaningless for entries
    # that cancel to ~0.
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        err = np.max(np.abs(np.asarray(g) - r)) / np.max(np.abs(r))
        assert err < RTOL, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize(
    "axes",
    [
        {"data": 8},
        {"data": 1, "fsdp": 8},
        {"data": 2, "fsdp": 2, "tensor": 2},
        # data x tensor without fsdp: the axes d2f2t2 combines, with the slow set
        pytest.param({"data": 4, "tensor": 2}, marks=pytest.mark.slow),
    ],
    ids=["data8", "fsdp8", "d2f2t2", "d4t2"],
)
def test_sharded_loss_and_grad_match_single_device(problem, reference, axes):
    _, state, batch, value_and_grad = problem
    mesh = sharding.make_mesh(**axes)
    specs = sharding.param_specs(state, mesh)
    shardings = sharding.state_shardings(mesh, specs)
    params = sharding.shard_state(state, mesh, specs)
    global_batch = sharding.shard_batch(batch, mesh)

    got = flat(params)
    layer0 = "model/layers/0"
    for path in (f"{layer0}/self_attn/q_proj/kernel", f"{layer0}/mlp/down_proj/kernel"):
        assert got[path].sharding.spec == EXPECTED[path]
    # Actually split: the per-device piece of a column-parallel kernel [32, 64] is smaller.
    piece = got[f"{layer0}/mlp/up_proj/kernel"].addressable_shards[0].data.shape
    assert piece == (32 // mesh.shape["fsdp"], 64 // mesh.shape["tensor"])
    ids = global_batch["input_ids"]
    np.testing.assert_array_equal(ids, batch["input_ids"])  # rows in order (a sum would hide it)
    assert ids.sharding.spec == sharding.batch_spec(2)
    assert ids.addressable_shards[0].data.shape == (
        BATCH // (mesh.size // mesh.shape["tensor"]),
        16,
    )

    batch_shardings = jax.tree.map(lambda x: x.sharding, global_batch)
    step = jax.jit(
        value_and_grad,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(NamedSharding(mesh, P()), shardings),
        compiler_options=FAST_COMPILE,
    )
    loss, grads = step(params, global_batch)
    assert_same(loss, grads, reference)
    for (path, g), spec in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(specs), strict=True
    ):
        assert g.sharding.is_equivalent_to(NamedSharding(mesh, spec), g.ndim), path


def test_pmap_pmean_matches_single_device(problem, reference):
    graphdef, state, batch, _ = problem
    n = jax.local_device_count()

    def per_device(s, b):
        # pmean over n devices of the gradient of n * (local sum) = gradient of the global sum.
        loss, grads = jax.value_and_grad(lambda s: n * loss_fn(graphdef, s, b))(s)
        return jax.lax.pmean(loss, "batch"), jax.lax.pmean(grads, "batch")

    replicated = sharding.replicate(state)
    leaf = jax.tree.leaves(replicated)[0]
    assert leaf.shape[0] == n and len(leaf.addressable_shards) == n
    split = sharding.split_for_pmap(batch, n)
    assert split["input_ids"].shape == (n, BATCH // n, TOKENS)
    step = jax.pmap(per_device, axis_name="batch").lower(replicated, split)
    loss, grads = step.compile(FAST_COMPILE)(replicated, split)
    np.testing.assert_array_equal(loss, np.full(n, loss[0]))  # every replica agrees
    loss, grads = sharding.unreplicate((loss, grads))
    assert_same(loss, grads, reference)


# -- batch errors -----------------------------------------------------------------------------


def test_shard_batch_errors_on_non_divisible_batch():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)  # batch split 4 ways
    with pytest.raises(ValueError, match=r"'input_ids' has leading dimension 6.*data x fsdp = 4"):
        sharding.shard_batch({"input_ids": np.zeros((6, 3), np.int32)}, mesh)
    with pytest.raises(ValueError, match=r"scalar"):
        sharding.shard_batch({"n": np.float32(1)}, mesh)


def test_shard_batch_tensor_axis_replicates():
    mesh = sharding.make_mesh(data=4, tensor=2)
    x = np.arange(8 * 3).reshape(8, 3)
    got = sharding.shard_batch(x, mesh)
    np.testing.assert_array_equal(got, x)
    assert got.addressable_shards[0].data.shape == (2, 3)  # 4 batch shards, 2 copies each


def test_split_for_pmap_errors():
    with pytest.raises(ValueError, match=r"'ids' of shape \(6, 2\).*n_devices=4"):
        sharding.split_for_pmap({"ids": np.zeros((6, 2))}, 4)
    with pytest.raises(ValueError, match=r"\(\).*n_devices=2"):
        sharding.split_for_pmap(np.float32(0), 2)


def test_replicate_roundtrip():
    tree = {"w": np.arange(6.0).reshape(2, 3), "key": jax.random.key(0), "step": 3}
    rep = sharding.replicate(tree, jax.devices()[:4])
    assert rep["w"].shape == (4, 2, 3) and rep["step"].shape == (4,)
    for shard in rep["w"].addressable_shards:
        np.testing.assert_array_equal(shard.data[0], tree["w"])
    back = sharding.unreplicate(rep)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert int(back["step"]) == 3
    np.testing.assert_array_equal(
        jax.random.key_data(back["key"]), jax.random.key_data(tree["key"])
    )
