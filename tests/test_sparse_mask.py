"""The SparsePO mask head (NNX) against a float64 NumPy transcription of the official
`mask_models.py`, in eval mode (dropout off), using the module's own parameters. Tolerance 1e-5
relative: float32 parameters and arithmetic against float64."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import losses as L
from alignjax.losses import sparse_mask
from alignjax.losses.sparse_mask import SparseMaskHead

NL, B, T, D = 3, 2, 5, 8


def layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def numpy_head(head, h):
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    scale, bias, eps = p(head.norm.scale), p(head.norm.bias), head.norm.epsilon
    layers = [h[-1]] if head.variant == "last" else list(h)
    outs = []
    for i, x in enumerate(layers):
        x = layer_norm(np.asarray(x, np.float64), scale, bias, eps)
        if head.variant == "mlp":
            x = x @ p(head.ff1[i].kernel) + p(head.ff1[i].bias)
            x = x @ p(head.ff2[i].kernel) + p(head.ff2[i].bias)
        else:
            x = x @ p(head.proj[i].kernel) + p(head.proj[i].bias)
        outs.append(relu(x)[..., 0])
    if head.variant == "last":
        return outs[0]
    return relu(np.stack(outs, -1) @ p(head.mixer.kernel))[..., 0]


@pytest.mark.parametrize("variant", ["all", "last", "mlp"])
def test_matches_numpy_official_forward(variant):
    head = SparseMaskHead(NL, D, variant=variant, mlp_width=7, rngs=nnx.Rngs(0))
    head.eval()
    h = np.random.default_rng(1).normal(0, 1, (NL, B, T, D)).astype(np.float32)
    got = np.asarray(head(jnp.asarray(h)))
    np.testing.assert_allclose(got, numpy_head(head, h), rtol=1e-5, atol=1e-6)
    assert got.min() >= 0.0
    assert np.asarray(head([jnp.asarray(x) for x in h])).shape == (B, T)  # list input


def test_dropout_train_vs_eval_and_sparsity():
    head = SparseMaskHead(NL, D, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    h = jnp.asarray(np.random.default_rng(2).normal(0, 1, (NL, 4, 16, D)), jnp.float32)
    head.eval()
    a, b = head(h), head(h)
    np.testing.assert_array_equal(a, b)  # deterministic in eval mode
    head.train()
    c, d = head(h), head(h)
    assert not np.array_equal(np.asarray(c), np.asarray(d))  # fresh dropout masks per call
    # ReLU gives exact zeros: learned sparsity is measurable from the start.
    assert 0.0 < float(np.mean(np.asarray(a) == 0.0)) < 1.0


def test_trains_through_sparsepo_without_touching_the_reference():
    rng = np.random.default_rng(3)
    head = SparseMaskHead(NL, D, rngs=nnx.Rngs(0))
    head.eval()
    states = jnp.asarray(rng.normal(0, 1, (NL, 2 * B, T, D)), jnp.float32)
    pol = jnp.asarray(-rng.gamma(2.0, 1.0, (2 * B, T)), jnp.float32)
    ref = pol + jnp.asarray(rng.normal(0, 0.3, (2 * B, T)), jnp.float32)
    kl = jnp.asarray(rng.uniform(0, 0.2, (2 * B, T)), jnp.float32)
    mask = jnp.ones((2 * B, T), jnp.int32)

    def loss(head, states):
        m = head(states)
        batch = L.PreferenceBatch.from_stacked(pol, mask, ref, kl=kl, reward_mask=m)
        return L.sparsepo(batch, beta=0.8, l1_reward=1e-3).loss

    grads = nnx.jit(nnx.grad(loss))(head, states)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
    assert sum(norms) > 0.0
    d_states = nnx.jit(lambda head, s: jax.grad(lambda s: loss(head, s))(s))(head, states)
    assert np.all(np.asarray(d_states) == 0.0)


def test_bad_inputs_and_docs():
    with pytest.raises(ValueError, match="variant"):
        SparseMaskHead(NL, D, variant="binary", rngs=nnx.Rngs(0))
    head = SparseMaskHead(NL, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_states"):
        head(jnp.ones((B, T, D)))
    with pytest.raises(ValueError, match="layers"):
        head(jnp.ones((NL + 1, B, T, D)))
    assert doctest.testmod(sparse_mask).failed == 0
