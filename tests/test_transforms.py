"""Every kernel gives identical results without jit, under jit, under pmap and under jit with a
NamedSharding over an 8-device mesh (values and gradients).

Outputs of the row-local kernels are compared bitwise across data-parallel layouts. The fused
kernels contain a matmul whose M dimension is the per-device batch: XLA:CPU blocks it
differently for 1 row than for 8, so their values agree to a few float32 ulps (rtol 1e-6), not
bitwise. Gradients and the op-by-op (disable_jit) comparison, where XLA may fuse differently,
allow 2 ulps (rtol 2.4e-7) unless a matmul is involved.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignjax.ops import logprobs as L
from alignjax.ops import masking as M

NDEV = 8
B, T, D, V = 8, 6, 5, 19  # B = devices, so pmap and batch sharding split one row per device
ULP2 = dict(rtol=2.4e-7, atol=1e-7)
MATMUL_ULPS = dict(rtol=1e-6, atol=1e-6)


def _data():
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    m = (rng.random((B, T)) > 0.3).astype(np.int32)
    m[2] = 0
    seg = np.sort(rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)
    return dict(
        z=f(B, T, V),
        zr=f(B, T, V),
        h=f(B, T, D),
        hr=f(B, T, D),
        w=f(D, V),
        y=y,
        m=m,
        seg=seg,
        v=f(B, T),
        act=f(B, T, 3),
        c=f(B, T),  # cotangent weights for gradient checks
    )


DATA = _data()


def _value_and_grad(kind):
    """A function of (x, rest...) returning (outputs, gradient w.r.t. x)."""
    fns = {
        "token_logps": lambda d: L.token_logps(d["z"], d["y"], d["m"]),
        "token_entropy": lambda d: L.token_entropy(d["z"], d["m"]),
        "token_kl": lambda d: L.token_kl(d["z"], d["zr"], d["m"]),
        "fused_token_logps": lambda d: L.fused_token_logps(
            d["h"], d["w"], d["y"], d["m"], chunk_size=2, vocab_chunk_size=7
        ),
        "fused_token_entropy": lambda d: L.fused_token_entropy(
            d["h"], d["w"], d["m"], chunk_size=4
        ),
        "fused_token_kl": lambda d: L.fused_token_kl(
            d["h"], d["w"], d["hr"], d["w"], d["m"], vocab_chunk_size=8
        ),
        "sequence_sum": lambda d: L.sequence_sum(d["v"], d["m"]),
        "sequence_mean": lambda d: L.sequence_mean(d["v"], d["m"]),
        "segment_sums": lambda d: L.segment_sums(d["v"], d["seg"], 3, d["m"]),
        "ld_sum": lambda d: L.ld_sum(d["v"], d["m"], jnp.sum(d["m"], -1) // 2, 0.3),
        "mapo_rescale": lambda d: M.mapo_rescale(d["act"], d["m"]),
    }
    diff_arg = {
        "token_logps": "z",
        "token_entropy": "z",
        "token_kl": "z",
        "fused_token_logps": "h",
        "fused_token_entropy": "h",
        "fused_token_kl": "h",
        "sequence_sum": "v",
        "sequence_mean": "v",
        "segment_sums": "v",
        "ld_sum": "v",
        "mapo_rescale": "act",
    }
    f, arg = fns[kind], diff_arg[kind]

    def run(d):
        def scalar(x):
            out = f({**d, arg: x})
            c = d["c"] if out.shape == d["c"].shape else 1.0
            return jnp.sum(out * c), out

        (_, out), grad = jax.value_and_grad(scalar, has_aux=True)(d[arg])
        return out, grad

    return run


KINDS = [
    "token_logps",
    "token_entropy",
    "token_kl",
    "fused_token_logps",
    "fused_token_entropy",
    "fused_token_kl",
    "sequence_sum",
    "sequence_mean",
    "segment_sums",
    "ld_sum",
    "mapo_rescale",
]


@functools.cache  # the op-by-op reference, shared by a kernel's variants
def _eager(kind):
    with jax.disable_jit():
        return _value_and_grad(kind)(DATA)


# pmap of every kernel runs in the everyday loop with the batch split over the devices
# (test_data_parallel_pmap_and_sharding); the replicated pmap variant there for one kernel,
# for the others with the slow set (TransformsPmapTest).
PMAP_KIND = "token_logps"


def _check_variant(test, kind):
    run = _value_and_grad(kind)
    ref = _eager(kind)
    got = test.variant(run)(DATA)
    tol = MATMUL_ULPS if kind.startswith("fused") else ULP2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


@pytest.mark.slow
class TransformsPmapTest(chex.TestCase):
    @chex.variants(with_pmap=True)
    @parameterized.parameters(*[k for k in KINDS if k != PMAP_KIND])
    def test_variants_agree(self, kind):
        """chex's pmap variant (replicated over the devices)."""
        _check_variant(self, kind)


class TransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*KINDS)
    def test_variants_agree(self, kind):
        """chex variants: jit and no jit."""
        _check_variant(self, kind)

    @chex.variants(with_pmap=True)
    @parameterized.parameters((PMAP_KIND,))
    def test_pmap_variant_agrees(self, kind):
        """chex's pmap variant (replicated over the devices)."""
        _check_variant(self, kind)

    @parameterized.parameters(*KINDS)
    def test_data_parallel_pmap_and_sharding(self, kind):
        """pmap over the batch (one row per device) and jit with a batch NamedSharding."""
        self.assertEqual(jax.device_count(), NDEV)
        run = _value_and_grad(kind)
        ref_out, ref_grad = jax.jit(run)(DATA)

        batched = {k for k, v in DATA.items() if v.shape[0] == B and k not in ("w",)}
        split = {
            k: (v.reshape(NDEV, B // NDEV, *v.shape[1:]) if k in batched else v)
            for k, v in DATA.items()
        }
        in_axes = ({k: (0 if k in batched else None) for k in DATA},)
        p_out, p_grad = jax.pmap(run, in_axes=in_axes)(split)
        fused = kind.startswith("fused")
        same = (
            (lambda a, b: np.testing.assert_allclose(a, b, **MATMUL_ULPS))
            if fused
            else (np.testing.assert_array_equal)
        )
        # Every differentiated argument is batched, so per-device gradients are row blocks.
        same(np.asarray(p_out).reshape(ref_out.shape), ref_out)
        np.testing.assert_allclose(
            np.asarray(p_grad).reshape(ref_grad.shape), ref_grad, **(MATMUL_ULPS if fused else ULP2)
        )

        mesh = Mesh(np.array(jax.devices()), ("data",))
        shard = lambda k, v: jax.device_put(  # noqa: E731
            v, NamedSharding(mesh, P("data") if k in batched else P())
        )
        sharded = {k: shard(k, v) for k, v in DATA.items()}
        s_out, s_grad = jax.jit(run)(sharded)
        same(np.asarray(s_out), ref_out)
        np.testing.assert_allclose(np.asarray(s_grad), ref_grad, **(MATMUL_ULPS if fused else ULP2))
        self.assertEqual(len(s_out.sharding.device_set), NDEV)


def _masks(d):
    ids = jnp.asarray(d["y"])
    att = (jnp.asarray(d["seg"]) > 0).astype(jnp.int32)
    labels, loss_mask = M.next_token_alignment(ids, att, d["m"], segment_ids=d["seg"])
    lengths = jnp.sum(att, axis=-1)
    a2, c2 = M.prompt_completion_masks(lengths // 2, lengths - lengths // 2, T)
    return labels, loss_mask, a2, c2, L.completion_positions(d["m"])


def test_masks_agree_across_transforms():
    """Integer mask kernels: bitwise equal without jit, with jit, pmap and batch sharding."""
    with jax.disable_jit():
        ref = _masks(DATA)
    got = [jax.jit(_masks)(DATA)]
    batched = {k for k, v in DATA.items() if v.shape[0] == B and k != "w"}
    split = {
        k: (v.reshape(NDEV, B // NDEV, *v.shape[1:]) if k in batched else v)
        for k, v in DATA.items()
    }
    in_axes = ({k: (0 if k in batched else None) for k in DATA},)
    pm = jax.pmap(_masks, in_axes=in_axes)(split)
    got.append(tuple(np.asarray(x).reshape(B, *x.shape[2:]) for x in pm))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, P("data") if k in batched else P()))
        for k, v in DATA.items()
    }
    got.append(jax.jit(_masks)(sharded))
    for outs in got:
        for a, b in zip(outs, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
