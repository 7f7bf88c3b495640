"""SparsePO as the official trainer runs it (issue 17): the m = 1 control equals TDPO1 through
the step, a mask head at learning rate 0 stays bitwise at its initialisation, the "scaled"
initialisation's expected mask, dead heads, the fixed random mask, the official input layout
(last state after the final norm), the official L1 halving and the mask / KL metrics.

Tolerances: SparsePO with m = 1 multiplies every per-token term by exactly 1.0, so the loss and
the SGD(lr=1) update equal TDPO1's up to XLA fusing the two graphs differently (float32
reassociation of the same sums): 1e-6 relative, the issue's bound. Metrics against float64 NumPy:
1e-6 (float32 sums of <= 64 terms of magnitude <= 10).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train_tasks import CFG, first_batch, paired_rows, state_with_other_reference

from alignjax import losses, models
from alignjax.losses import sparse_mask as SM
from alignjax.train import builders
from alignjax.train import config as C
from alignjax.train import step as S


def _sgd_step(spec, state, batch):
    new, m = S.build_step(spec, optax.sgd(1.0), donate=False)(state, batch)
    return new, m


def test_sparsepo_with_ones_equals_tdpo1_through_the_step():
    batch = first_batch(paired_rows())
    state = state_with_other_reference(None)
    got, gm = _sgd_step(
        S.StepSpec(loss="sparsepo", loss_kwargs={"beta": 0.8}, mask_options={"kind": "ones"}),
        state,
        batch,
    )
    want, wm = _sgd_step(S.StepSpec(loss="tdpo1", loss_kwargs={"beta": 0.8}), state, batch)
    np.testing.assert_allclose(float(gm["loss"]), float(wm["loss"]), rtol=1e-6)
    assert float(gm["loss"]) != pytest.approx(math.log(2.0), abs=1e-3)  # rewards are not all 0
    largest = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params))
    )
    assert largest > 1e-4  # the update is not trivially zero
    for (path, a), b, p0 in zip(
        jax.tree_util.tree_leaves_with_path(got.params),
        jax.tree.leaves(want.params),
        jax.tree.leaves(state.params),
    ):
        ga, gb = np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b)
        scale = max(float(np.max(np.abs(gb))), 1e-3 * largest)
        assert float(np.max(np.abs(ga - gb))) <= 1e-6 * scale, jax.tree_util.keystr(path)
    # (the logged rewards differ by design: TDPO's code logs beta (A + S), SparsePO's beta (U - D))
    for name in ("seq_kl/chosen", "seq_kl/rejected", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(gm[name]), float(wm[name]), rtol=1e-6, atol=1e-6)
    assert float(gm["mask/chosen_mean"]) == 1.0 and float(gm["mask/sparsity"]) == 0.0


def _head_run(head_lr: float):
    """Two AdamW steps of the trainer's optimizer (groups, clipping, schedule) on SparsePO with
    a live head; returns (initial state, final state)."""
    cfg = C.TrainConfig(
        steps=4,
        optim=C.OptimConfig(
            learning_rate=1e-3,
            warmup_steps=0,
            weight_decay=0.0,
            groups=(C.ParamGroup(label="heads", learning_rate=head_lr, weight_decay=0.01),),
        ),
    )
    tx, _ = builders.build_optimizer(cfg)
    provider = SM.SparsePOMasks(init="scaled", head_seed=3)
    heads = provider.heads(CFG, seed=0)
    state = S.init_state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), tx, heads=heads)
    other = nnx.state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(1)), nnx.Param)
    state = state.replace(ref=other)
    spec = S.StepSpec(loss="sparsepo", mask_options={"init": "scaled", "head_seed": 3})
    step = S.build_step(spec, tx, donate=False)
    batch = first_batch(paired_rows())
    new = state
    for _ in range(2):
        new, m = step(new, batch)
    assert float(m["mask/sparsity"]) < 1.0  # a live head: it receives gradient
    return state, new


@pytest.mark.slow  # four compiled AdamW steps (suite budget)
def test_head_at_learning_rate_zero_stays_bitwise_at_its_initialisation():
    init, frozen = _head_run(0.0)
    for a, b in zip(jax.tree.leaves(init.params["heads"]), jax.tree.leaves(frozen.params["heads"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(init.params["policy"]), jax.tree.leaves(frozen.params["policy"])
        )
    ]
    assert max(moved) > 1e-4  # the policy trained
    _, trained = _head_run(1e-3)  # the control: the same head at a positive rate moves
    diff = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(init.params["heads"]), jax.tree.leaves(trained.params["heads"])
        )
    ]
    assert max(diff) > 1e-5


def test_scaled_init_gives_the_expected_initial_mask():
    """Over 80 head seeds on isotropic hidden states, the mean mask is `init_mean` within 4
    standard errors of the sample (the derivation in `scaled_std` is exact for the projection
    and mixer given |LN(h)|^2 = D; "last" has no mixer)."""
    h = jax.random.normal(jax.random.key(1), (2, 4, 16, 64))
    for variant, target in (("all", 0.03), ("last", 0.05)):

        @jax.jit  # one program per variant for the 80 seeds
        def mean_mask(seed, variant=variant, target=target):
            head = SM.SparseMaskHead(
                2,
                64,
                variant=variant,
                dropout=0.0,
                init="scaled",
                init_mean=target,
                rngs=nnx.Rngs(jax.random.key(seed)),  # = nnx.Rngs(seed), traced
            )
            return jnp.mean(head(h))

        means = [float(mean_mask(seed)) for seed in range(80)]
        se = np.std(means, ddof=1) / np.sqrt(len(means))
        assert abs(np.mean(means) - target) < 4 * se, (variant, np.mean(means), se)
    normal = SM.SparseMaskHead(2, 64, dropout=0.0, init="normal", rngs=nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(normal.proj[0].bias[...]))) == 0.0  # transformers: zero biases
    assert float(jnp.std(normal.proj[0].kernel[...])) == pytest.approx(0.02, rel=0.4)
    # the closed form: E[chi_k] mixture for L = 2 is 0.5 sqrt(2/pi) + 0.25 sqrt(pi/2)
    chi = 0.5 * math.sqrt(2 / math.pi) + 0.25 * math.sqrt(math.pi / 2)
    want = 0.03 * math.sqrt(2 * math.pi) / (0.02 * 8 * chi)
    assert SM.scaled_std("all", 2, 64) == pytest.approx(want, rel=1e-12)


def test_dead_heads_are_detected():
    h = jax.random.normal(jax.random.key(2), (2, 3, 8, 16))
    mask = jnp.ones((3, 8))
    head = SM.SparseMaskHead(2, 16, dropout=0.0, init="scaled", rngs=nnx.Rngs(0))
    kernel = head.mixer.kernel[...]
    head.mixer.kernel[...] = -jnp.abs(kernel)  # both mixer weights negative: 0 everywhere
    alive = SM.SparseMaskHead(2, 16, dropout=0.0, init="scaled", rngs=nnx.Rngs(1))
    alive.mixer.kernel[...] = jnp.abs(alive.mixer.kernel[...])
    assert SM.dead_heads({"dead": head, "alive": alive}, h, mask) == {"dead": True, "alive": False}


def test_fixed_random_mask_is_a_function_of_token_and_position():
    emb = jax.random.normal(jax.random.key(0), (50, 8))
    ids = jax.random.randint(jax.random.key(1), (4, 12), 0, 50)
    mask = (jnp.arange(12)[None, :] >= jnp.array([[2], [5], [0], [11]])).astype(jnp.int32)
    fixed_random_mask = jax.jit(SM.fixed_random_mask, static_argnames="seed")  # integer hashing
    m = fixed_random_mask(emb[ids], mask, seed=0)
    assert m.shape == (4, 12)
    assert float(jnp.max(jnp.where(mask == 0, m, 0.0))) == 0.0
    inside = np.asarray(m)[np.asarray(mask) == 1]
    assert inside.min() >= 0.0 and inside.max() < 1.0
    # the same (token, completion position) in another row and batch gives the same weight
    shifted = jnp.roll(ids, 1, axis=0), jnp.roll(mask, 1, axis=0)
    np.testing.assert_array_equal(
        fixed_random_mask(emb[shifted[0]], shifted[1], seed=0), jnp.roll(m, 1, axis=0)
    )
    other = fixed_random_mask(emb[ids], mask, seed=1)
    assert float(jnp.mean(jnp.abs(other - m))) > 0.1
    big = fixed_random_mask(
        jax.random.normal(jax.random.key(3), (64, 256, 8)), jnp.ones((64, 256), jnp.int32), seed=0
    )
    # U(0, 1): mean 1/2 and variance 1/12 within 5 standard errors of 16384 draws
    assert abs(float(jnp.mean(big)) - 0.5) < 5 * math.sqrt(1 / 12 / big.size)
    assert abs(float(jnp.var(big)) - 1 / 12) < 5 * math.sqrt(1 / 180 / big.size)


def test_postnorm_layout_feeds_the_state_after_the_final_norm():
    model = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    ids = jnp.arange(10)[None, :] % 50
    out = nnx.jit(lambda m, ids: m(ids, jnp.ones_like(ids), output_hidden_states=True))(model, ids)
    pre = SM.SparsePOMasks().head_inputs(out)
    post = SM.SparsePOMasks(last_state="postnorm").head_inputs(out)
    assert pre.shape == post.shape == (CFG.num_hidden_layers, 1, 10, CFG.hidden_size)
    np.testing.assert_array_equal(post[-1], out.last_hidden_state)
    np.testing.assert_array_equal(pre[-1], out.hidden_states[-1])
    assert float(jnp.max(jnp.abs(pre[-1] - post[-1]))) > 1e-3


def test_sparsepo_halves_l1_for_the_common_mask_only():
    rng = np.random.default_rng(0)
    b, t = 3, 6
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    m = jnp.ones((2 * b, t))
    fields = dict(kl=jnp.abs(f(2 * b, t)), reward_mask=jnp.abs(f(2 * b, t)))
    common = losses.PreferenceBatch.from_stacked(f(2 * b, t), m, f(2 * b, t), **fields)
    halved = losses.sparsepo(common, l1_reward=2e-3, l1_kl=4e-3)
    plain = losses.sparsepo(common, l1_reward=1e-3, l1_kl=2e-3, halve_common_l1=False)
    np.testing.assert_allclose(halved.losses, plain.losses, rtol=1e-6)
    indp = losses.PreferenceBatch.from_stacked(
        f(2 * b, t), m, f(2 * b, t), kl_mask=jnp.abs(f(2 * b, t)), **fields
    )
    a = losses.sparsepo(indp, l1_reward=1e-3, l1_kl=2e-3)
    c = losses.sparsepo(indp, l1_reward=1e-3, l1_kl=2e-3, halve_common_l1=False)
    np.testing.assert_array_equal(a.losses, c.losses)


def test_sparsepo_mask_and_kl_metrics_match_numpy():
    rng = np.random.default_rng(1)
    b, t = 4, 7
    lengths = np.array([7, 3, 5, 0, 6, 2, 7, 4])  # one empty completion
    m = (np.arange(t)[None, :] >= t - lengths[:, None]).astype(np.float32)  # left-aligned end
    mu = np.where(rng.random((2 * b, t)) < 0.3, 0.0, rng.random((2 * b, t))).astype(np.float32)
    kl = np.abs(rng.normal(size=(2 * b, t))).astype(np.float32)
    pol, ref = (rng.normal(size=(2 * b, t)).astype(np.float32) for _ in range(2))
    batch = losses.PreferenceBatch.from_stacked(
        jnp.asarray(pol),
        jnp.asarray(m),
        jnp.asarray(ref),
        kl=jnp.asarray(kl),
        reward_mask=jnp.asarray(mu),
    )
    met = losses.sparsepo(batch, beta=0.5).metrics
    m64, mu64, kl64 = (x.astype(np.float64) for x in (m, mu, kl))
    side = {"chosen": slice(0, b), "rejected": slice(b, 2 * b)}
    for name, rows in side.items():
        want = (mu64[rows] * m64[rows]).sum() / m64[rows].sum()
        assert float(met[f"mask/{name}_mean"]) == pytest.approx(want, rel=1e-6)
        assert float(met[f"seq_kl/{name}"]) == pytest.approx(
            (kl64 * m64)[rows].sum(1).mean(), rel=1e-6
        )
        assert float(met[f"masked_seq_kl/{name}"]) == pytest.approx(
            (kl64 * m64 * mu64)[rows].sum(1).mean(), rel=1e-6
        )
    last = [mu64[r, t - 1] for r in range(2 * b) if lengths[r] > 0]  # the last token is at t - 1
    assert float(met["mask/eos"]) == pytest.approx(np.mean(last), rel=1e-6)
    zeros = ((mu64 == 0) & (m64 == 1)).sum() / m64.sum()
    assert float(met["mask/sparsity"]) == pytest.approx(zeros, rel=1e-6)


def test_bad_mask_options_name_the_option():
    with pytest.raises(ValueError, match="`kind` must be one of"):
        SM.SparsePOMasks(kind="uniform")
    with pytest.raises(ValueError, match="`init` must be one of"):
        SM.SparsePOMasks(init="xavier")
    with pytest.raises(ValueError, match="`last_state` must be one of"):
        SM.SparsePOMasks(last_state="final")
    with pytest.raises(ValueError, match="mask option 'seed'"):
        S.StepSpec(loss="sparsepo", mask_options={"seed": 1})
    with pytest.raises(ValueError, match="init_mean"):
        SM.SparsePOMasks(init_mean=0.0)
