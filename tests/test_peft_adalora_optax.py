"""`with_rank_allocation` (AdaLoRA's allocator as an optax wrapper) against the manual loop of
experiments/bone_vs_lora.py: optimizer step, then `update_and_allocate` on the updated params
with that step's grads, then `set_adalora_e`. Both run the same float32 operations on the same
values (the inner update, `p + u`, the allocator; a pruned `e` is `p + (-p) = +0.0` in one and
`zeros_like` in the other), so they are compared bitwise.
"""

import collections
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_peft import Block  # the two-layer q/v block the PEFT tests adapt

from alignjax import peft
from alignjax.peft import adalora_optax

SCHED = peft.AdaLoraSchedule(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8)
STEPS = 10  # two steps past T: the fixed phase re-zeroes regrown e
CLIP = 0.05  # small enough to clip these grads (asserted)


def adalora_model(method="adalora", **options):
    model = Block(nnx.Rngs(0))
    rule = peft.Rule(r".*_proj", method, rank=4, alpha=8.0, options=options)
    peft.apply(model, [rule], rngs=nnx.Rngs(1))
    return model


def setup(with_heads):
    """Trainable tree (all nnx.Param: base kernels and the head pass through the allocator),
    a loss of (tree, t) with the orthogonal penalty, and a function tree -> policy model."""
    model = adalora_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    head_def, head_params = nnx.split(nnx.Linear(3, 1, rngs=nnx.Rngs(2)))
    tree = {"policy": params, "heads": head_params} if with_heads else params

    def policy(tree):
        return nnx.merge(graphdef, tree["policy"] if with_heads else tree, rest)

    def loss(tree, t):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(3), t), (16, 8))
        out = policy(tree)(x)
        if with_heads:
            out = nnx.merge(head_def, tree["heads"])(out)
        target = jnp.sin(3.0 * x[:, : out.shape[1]])
        return jnp.mean((out - target) ** 2) + 0.5 * peft.orthogonal_penalty(tree)

    return model, tree, policy, loss


def equal_trees(a, b, what):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


@pytest.mark.parametrize(
    "with_heads, clip", [(False, False), pytest.param(True, True, marks=pytest.mark.slow)]
)
def test_matches_the_manual_peft_loop(with_heads, clip):
    model, tree, policy, loss = setup(with_heads)
    adam = optax.adam(0.05)
    inner = optax.chain(optax.clip_by_global_norm(CLIP), adam) if clip else adam
    tx = peft.with_rank_allocation(adam, SCHED)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), tx) if clip else tx

    @jax.jit
    def ours(tree, opt, t):
        updates, opt = tx.update(jax.grad(loss)(tree, t), opt, tree)
        return optax.apply_updates(tree, updates), opt

    @jax.jit
    def manual(tree, opt, alloc, t):
        grads = jax.grad(loss)(tree, t)
        updates, opt = inner.update(grads, opt, tree)
        tree = optax.apply_updates(tree, updates)
        if clip:  # PEFT's Trainer clips the .grad the allocator reads, in place
            grads = optax.clip_by_global_norm(CLIP).update(grads, optax.EmptyState())[0]
        m = policy(tree)
        g = grads["policy"] if with_heads else grads
        now, grad = peft.adalora_triplets(m), peft.adalora_triplets(m, g)
        new, alloc, info = peft.update_and_allocate(now, grad, alloc, t, SCHED)
        peft.set_adalora_e(m, new)
        p = nnx.state(m, nnx.Param)
        return ({"policy": p, "heads": tree["heads"]} if with_heads else p), opt, alloc, info

    if clip:
        assert float(optax.tree.norm(jax.grad(loss)(tree, 0))) > 2 * CLIP
    opt, ref, ref_opt = tx.init(tree), tree, inner.init(tree)
    alloc = peft.init_allocator(peft.adalora_triplets(model))
    patterns = set()
    for t in range(STEPS):
        tree, opt = ours(tree, opt, t)
        ref, ref_opt, alloc, ref_info = manual(ref, ref_opt, alloc, t)
        equal_trees(tree, ref, f"params, step {t}")
        state = peft.allocation_state(opt)
        equal_trees(state.allocator, alloc, f"allocator, step {t}")
        equal_trees(state.info, ref_info, f"info, step {t}")
        assert int(state.count) == t + 1
        pattern = {n: np.asarray(m) for n, m in state.allocator.rank_pattern.items()}
        patterns.add(tuple(tuple(m.tolist()) for _, m in sorted(pattern.items())))
        if bool(state.info.allocated) or t > SCHED.final_step:
            for name, (_, e_path, _) in peft.adalora_triplet_paths(tree).items():
                e = np.asarray(dict(jax.tree_util.tree_flatten_with_path(tree)[0])[e_path])
                masked = e[~pattern[name]]
                assert np.all(masked == 0.0) and not np.any(np.signbit(masked)), (t, name)
    assert ours._cache_size() == 1  # the state keeps its avals: one compilation for all steps
    assert len(patterns) >= 3  # all kept, then two or more budgets (16 -> 12 -> 9 -> 8)
    final = peft.rank_pattern(tree)
    assert set(final) == set(peft.adalora_triplets(model))  # module paths, "policy/" dropped
    assert sum(int(m.sum()) for m in final.values()) == SCHED.target_r * 4
    assert int(peft.allocation_state(opt).info.budget) == SCHED.target_r * 4
    equal_trees(final, {n: np.asarray(m) for n, m in state.allocator.rank_pattern.items()}, "")


def test_triplet_paths_in_any_pytree():
    model = adalora_model()
    params = nnx.state(model, peft.AdapterParam)
    names = list(peft.adalora_triplets(model))
    for tree in (params, {"policy": params, "heads": {}}, nnx.to_pure_dict(params)):
        paths = peft.adalora_triplet_paths(tree)
        assert sorted(paths) == sorted(names)
        leaves = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
        a, e, b = (leaves[p] for p in paths["layers/1/v_proj"])
        assert (a.shape, e.shape, b.shape) == ((8, 4), (4,), (4, 8))
    # a plain nested dict with a list; LoRA's (lora_a, lora_b) pairs are not triplets
    z = jnp.zeros
    tree = {
        "blocks": [{"attn": {"lora_a": z((3, 2)), "lora_e": z(2), "lora_b": z((2, 5))}}],
        "lora_layer": {"lora_a": z((3, 2)), "lora_b": z((2, 5))},
        "policy_like": {"policy": z(1)},
    }
    assert list(peft.adalora_triplet_paths(tree)) == ["blocks/0/attn"]
    triplet = collections.namedtuple("Triplet", "lora_a lora_e lora_b")(
        *tree["blocks"][0]["attn"].values()
    )
    assert list(peft.adalora_triplet_paths({"policy": {"q": triplet}})) == ["q"]


def test_inside_multi_transform():
    # only the adapters go through the wrapper; the other partition sees MaskedNodes
    params = nnx.state(adalora_model(), nnx.Param)
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "lora" in str(p), params)
    ada = peft.with_rank_allocation(optax.adam(0.05), SCHED)
    tx = optax.multi_transform({True: ada, False: optax.sgd(0.1)}, labels)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.cos, p), s, p))
    opt = tx.init(params)
    for _ in range(SCHED.total_step):
        updates, opt = step(params, opt)
        params = optax.apply_updates(params, updates)
    state = peft.allocation_state(opt)
    assert int(state.count) == SCHED.total_step and int(state.info.budget) == 8
    assert sum(int(m.sum()) for m in peft.rank_pattern(params).values()) == 8


def test_orthogonal_penalty_equals_the_regulariser_of_the_model():
    model = adalora_model(init="random")
    want = peft.orthogonal_regularizer(peft.adalora_triplets(model))
    params = nnx.state(model, nnx.Param)
    # the same 8 terms; the mean could only differ by summation order (here it is the same)
    for tree in (
        params,
        {"policy": params, "heads": nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))},
    ):
        got = peft.orthogonal_penalty(tree)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        assert float(got) > 1.0
    # the gradient reaches a and b only
    grads = jax.grad(peft.orthogonal_penalty)(nnx.state(model, peft.AdapterParam))
    assert float(jnp.abs(grads["layers"][0]["q_proj"]["lora_a"][...]).max()) > 0
    assert float(jnp.abs(grads["layers"][0]["q_proj"]["lora_e"][...]).max()) == 0


def test_bad_inputs_raise_clear_errors():
    params = nnx.state(adalora_model(), peft.AdapterParam)
    tx = peft.with_rank_allocation(optax.sgd(0.1), SCHED)
    state = tx.init(params)
    with pytest.raises(ValueError, match="`params` is required"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="`params` is None"):
        tx.init(None)
    lora = nnx.state(adalora_model("lora"), peft.AdapterParam)
    for fn in (tx.init, peft.orthogonal_penalty, peft.rank_pattern, peft.adalora_triplet_paths):
        with pytest.raises(ValueError, match="no AdaLoRA triplets"):
            fn(lora)
    broken = {"x": {"lora_a": jnp.zeros((3, 2)), "lora_e": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"'x' has lora_e but no \['lora_b'\]"):
        tx.init(broken)
    with pytest.raises(ValueError, match="holds 0 with_rank_allocation states"):
        peft.allocation_state(optax.sgd(0.1).init(params))
    assert int(peft.allocation_state((optax.EmptyState(), state)).count) == 0


def test_docstring_example_runs():
    result = doctest.testmod(adalora_optax)
    assert result.attempted > 0 and result.failed == 0
