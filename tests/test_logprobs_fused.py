"""Fused LM-head kernels against float64 NumPy, jax.grad of the naive version, and finite
differences.

Tolerances: values inf-norm relative error <= 1e-6 in float32 (the LM-head matmul adds a few
float32 ulps over D terms), <= 1e-12 in float64; gradients <= 1e-5 against autodiff of the naive
float32 graph (two different float32 summation orders over V and over chunks); finite
differences in float64 <= 1e-7 relative (the O(eps^2) truncation error of central differences).
"""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref as R
from alignjax.ops import logprobs as L

B, T, D, V = 2, 7, 6, 23

# (chunk_size, vocab_chunk_size, soft_cap, temperature, chunk_elements): whole; sequence
# chunks with padding; vocab blocks with a remainder block; one position per chunk; blocks
# dividing V exactly; each paired with one of the two logit transforms (none / soft-cap +
# temperature). A small `chunk_elements` makes the backward pass accumulate d unembed in column
# blocks of chunk_elements / (4 D) (5 of 23 columns: 4 full blocks and a remainder of 3; 3 of a
# 5-wide vocab block: one full block and a remainder of 2).
CONFIGS = [
    (None, None, None, 1.0, 2**24),
    (3, None, 4.0, 0.7, 4 * D * 5),
    (2, 5, None, 1.0, 4 * D * 3),
    (1, 23, 4.0, 0.7, 2**24),
    (7, 4, 4.0, 0.7, 2**24),
    (4, 23, None, 1.0, 4 * D * 5),
]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def make(rng, dtype=np.float32):
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    h, w, b = f(B, T, D), f(D, V), f(V)
    hr, wr, br = f(B, T, D), f(D, V), f(V)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    m = (rng.random((B, T)) > 0.3).astype(np.int32)
    m[1, :] = 0  # an all-masked row
    return h, w, b, hr, wr, br, y, m


def naive_logits(h, w, b, soft_cap, temperature):
    u = h @ w + b
    if soft_cap is not None:
        u = soft_cap * jnp.tanh(u / soft_cap)
    return u / temperature


def naive_stats(h, w, b, hr, wr, br, y, m, soft_cap, temperature):
    """Plain autodiff graph: log_softmax + gather, the textbook way."""
    z = naive_logits(h, w, b, soft_cap, temperature)
    r = jax.lax.stop_gradient(naive_logits(hr, wr, br, soft_cap, temperature))
    lz, lr = jax.nn.log_softmax(z), jax.nn.log_softmax(r)
    keep = m != 0
    lp = jnp.where(keep, jnp.take_along_axis(lz, y[..., None], -1)[..., 0], 0.0)
    ent = jnp.where(keep, -jnp.sum(jnp.exp(lz) * lz, -1), 0.0)
    kl = jnp.where(keep, jnp.sum(jnp.exp(lr) * (lr - lz), -1), 0.0)
    return lp, ent, kl


@partial(jax.jit, static_argnums=(8, 9, 10, 11, 12))
def fused_all(h, w, b, hr, wr, br, y, m, soft_cap, temperature, cs, vc, ce=2**24):
    return L.fused_token_stats(
        h,
        w,
        y,
        m,
        bias=b,
        entropy=True,
        ref_hidden=hr,
        ref_unembed=wr,
        ref_bias=br,
        ref_logps=True,
        kl=True,
        soft_cap=soft_cap,
        temperature=temperature,
        chunk_size=cs,
        vocab_chunk_size=vc,
        chunk_elements=ce,
    )


def reference_stats(z, r, y, m):
    """float64 NumPy (logps, entropy, ref_logps, kl) from policy logits z and reference r."""
    return (
        R.token_logps(z, y, m),
        R.token_entropy(z, m),
        R.token_logps(r, y, m),
        R.token_kl(z, r, m),
    )


def fused_and_naive_grads(c, head, y, m, soft_cap, temperature, cs, vc, ce):
    """Gradients w.r.t. (hidden, unembed, bias) of sum(c0 logps + c1 entropy + c2 kl), through
    the fused kernel and through autodiff of the naive graph (`naive_stats`)."""
    h, w, b, hr, wr, br = head

    def loss_fused(h, w, b):
        s = fused_all(h, w, b, hr, wr, br, y, m, soft_cap, temperature, cs, vc, ce)
        return jnp.sum(c[0] * s.logps + c[1] * s.entropy + c[2] * s.kl)

    def loss_naive(h, w, b):
        lp, ent, kl = naive_stats(h, w, b, hr, wr, br, y, m, soft_cap, temperature)
        return jnp.sum(c[0] * lp + c[1] * ent + c[2] * kl)

    got = jax.jit(jax.grad(loss_fused, (0, 1, 2)))(h, w, b)
    want = jax.jit(jax.grad(loss_naive, (0, 1, 2)))(h, w, b)
    return got, want


@pytest.mark.parametrize("cs,vc,soft_cap,temperature,ce", CONFIGS)
def test_float32_parity_all_stats(rng, cs, vc, soft_cap, temperature, ce):
    h, w, b, hr, wr, br, y, m = make(rng)
    z = R.head_logits(h, w, b, soft_cap, temperature)
    r = R.head_logits(hr, wr, br, soft_cap, temperature)
    s = fused_all(h, w, b, hr, wr, br, y, m, soft_cap, temperature, cs, vc, ce)
    assert rel(s.logps, R.token_logps(z, y, m)) <= 1e-6
    assert rel(s.entropy, R.token_entropy(z, m)) <= 1e-6
    assert rel(s.ref_logps, R.token_logps(r, y, m)) <= 1e-6
    assert rel(s.kl, R.token_kl(z, r, m)) <= 1e-6
    for out in s:
        assert out.dtype == jnp.float32 and out.shape == (B, T)
        assert np.all(np.asarray(out)[m == 0] == 0.0)
    # The single-statistic entry points agree with the combined pass.
    kw = dict(
        bias=b, soft_cap=soft_cap, temperature=temperature, chunk_size=cs, vocab_chunk_size=vc
    )
    assert rel(L.fused_token_logps(h, w, y, m, **kw), s.logps) <= 1e-6
    assert rel(L.fused_token_entropy(h, w, m, **kw), s.entropy) <= 1e-6
    assert rel(L.fused_token_kl(h, w, hr, wr, m, ref_bias=br, **kw), s.kl) <= 1e-6


@pytest.mark.parametrize("cs,vc", [(None, None), (2, 5)])
def test_float64_parity(rng, x64, cs, vc):
    h, w, b, hr, wr, br, y, m = make(rng, np.float64)
    s = fused_all(h, w, b, hr, wr, br, y, m, 3.0, 0.9, cs, vc)
    z, r = R.head_logits(h, w, b, 3.0, 0.9), R.head_logits(hr, wr, br, 3.0, 0.9)
    for out, ref in zip(s, reference_stats(z, r, y, m)):
        assert out.dtype == jnp.float64
        assert rel(out, ref) <= 1e-12


@pytest.mark.parametrize("cs,vc,soft_cap,temperature,ce", CONFIGS)
def test_gradients_match_naive_autodiff(rng, cs, vc, soft_cap, temperature, ce):
    h, w, b, hr, wr, br, y, m = make(rng)
    c = rng.standard_normal((3, B, T)).astype(np.float32)
    head = (h, w, b, hr, wr, br)
    got, want = fused_and_naive_grads(c, head, y, m, soft_cap, temperature, cs, vc, ce)
    for g1, g2, name in zip(got, want, ("hidden", "unembed", "bias")):
        assert g1.dtype == g2.dtype
        assert rel(g1, g2) <= 1e-5, name


def test_reference_side_gets_zero_gradient(rng):
    h, w, b, hr, wr, br, y, m = make(rng)
    f = lambda hr, wr, br: fused_all(h, w, b, hr, wr, br, y, m, None, 1.0, 3, 5).kl.sum()  # noqa: E731
    for g in jax.grad(f, (0, 1, 2))(hr, wr, br):
        assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("which", ["logps", "entropy", "kl"])
def test_finite_differences_float64(rng, x64, which):
    h, w, b, hr, wr, br, y, m = make(rng, np.float64)
    c = rng.standard_normal((B, T))

    @jax.jit
    def f(h, w, b):
        s = fused_all(h, w, b, hr, wr, br, y, m, 2.5, 0.8, 3, 5, 4 * D * 2)
        return jnp.sum(c * getattr(s, which))

    grads = [np.asarray(g) for g in jax.jit(jax.grad(f, (0, 1, 2)))(h, w, b)]
    args = [h, w, b]
    for i in range(3):
        for _ in range(2):
            d = rng.standard_normal(args[i].shape)
            eps = 1e-6
            plus = [a + eps * d if j == i else a for j, a in enumerate(args)]
            minus = [a - eps * d if j == i else a for j, a in enumerate(args)]
            fd = (float(f(*plus)) - float(f(*minus))) / (2 * eps)
            assert abs(fd - np.sum(grads[i] * d)) <= 1e-7 * max(1.0, abs(fd))


def test_bfloat16_inputs(rng):
    h, w, b, hr, wr, br, y, m = make(rng)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = L.fused_token_logps(hb, wb, y, m, chunk_size=3, vocab_chunk_size=5)
    assert out.dtype == jnp.float32
    # Products of bf16 values are exact in float32; only float32 accumulation differs.
    z = R.head_logits(np.asarray(hb, np.float64), np.asarray(wb, np.float64))
    assert rel(out, R.token_logps(z, y, m)) <= 1e-6
    gh, gw = jax.grad(lambda a, c: L.fused_token_logps(a, c, y, m).sum(), (0, 1))(hb, wb)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16


def test_flat_token_layout(rng):
    h, w, b, _, _, _, y, m = make(rng)
    flat = L.fused_token_logps(h.reshape(-1, D), w, y.reshape(-1), m.reshape(-1), bias=b)
    batched = L.fused_token_logps(h, w, y, m, bias=b)
    np.testing.assert_array_equal(np.asarray(flat).reshape(B, T), np.asarray(batched))


def _max_intermediate(jaxpr) -> int:
    """Largest array (in elements) anywhere in a jaxpr, sub-jaxprs included."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in itertools.chain(eqn.invars, eqn.outvars):
            shape = getattr(v.aval, "shape", ())
            best = max(best, int(np.prod(shape)) if shape else 1)
        for p in eqn.params.values():
            subs = p if isinstance(p, (tuple, list)) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _max_intermediate(inner))
    return best


def test_never_materialises_full_logits(rng):
    """Structural check: forward + backward hold no array of B*T*V elements (naive does)."""
    b_, t_, d_, v_ = 2, 16, 4, 64
    h = jnp.ones((b_, t_, d_))
    w = jnp.ones((d_, v_))
    y = jnp.zeros((b_, t_), jnp.int32)
    full = b_ * t_ * v_

    def fused(h, w):
        s = L.fused_token_stats(
            h,
            w,
            y,
            entropy=True,
            ref_hidden=h,
            ref_unembed=w,
            kl=True,
            chunk_size=4,
            vocab_chunk_size=16,
        )
        return jnp.sum(s.logps + s.entropy + s.kl)

    def naive(h, w):
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[..., None], -1))

    fused_max = _max_intermediate(jax.make_jaxpr(jax.value_and_grad(fused, (0, 1)))(h, w).jaxpr)
    naive_max = _max_intermediate(jax.make_jaxpr(jax.value_and_grad(naive, (0, 1)))(h, w).jaxpr)
    assert naive_max >= full
    assert fused_max <= max(b_ * 4 * 16, d_ * v_, b_ * t_ * d_) < full


def test_extreme_logits_and_masked_rows_are_finite(rng):
    h, w, b, hr, wr, br, y, m = make(rng)
    h = np.sign(h) * 2000.0  # logits of order +-1e4
    hr = -np.sign(hr) * 2000.0
    f = lambda h, w: jnp.sum(  # noqa: E731
        sum(fused_all(h, w, b, hr, wr, br, y, m, None, 1.0, 3, 5))
    )
    val, grads = jax.value_and_grad(f, (0, 1))(h, w)
    assert np.isfinite(val) and all(np.all(np.isfinite(g)) for g in grads)
    s = fused_all(h, w, b, hr, wr, br, y, m, None, 1.0, 3, 5)
    z, r = R.head_logits(h, w, b), R.head_logits(hr, wr, br)
    assert np.abs(z).max() > 5e3
    assert rel(s.logps, R.token_logps(z, y, m)) <= 1e-6
    assert rel(s.kl, R.token_kl(z, r, m)) <= 1e-6
    # All rows masked: zeros and zero gradients.
    zero = np.zeros_like(m)
    g = jax.grad(lambda h: L.fused_token_logps(h, w, y, zero).sum())(h)
    assert np.all(np.asarray(g) == 0.0)


def test_bad_inputs_raise_named_errors(rng):
    h, w, b, hr, wr, br, y, m = make(rng)
    cases = [
        (lambda: L.fused_token_logps(h, w[:-1], y, m), "unembed"),
        (lambda: L.fused_token_logps(h, w, y[:, :-1], m), "labels"),
        (lambda: L.fused_token_logps(h, w, np.full_like(y, V), None), "labels"),
        (lambda: L.fused_token_logps(h.astype(np.int32), w, y, m), "hidden"),
        (lambda: L.fused_token_logps(h, w, y, m, bias=b[:-1]), "bias"),
        (lambda: L.fused_token_logps(h, w, y, m[:, :-1]), "mask"),
        (lambda: L.fused_token_logps(h[0, 0], w, y, m), "hidden"),
        (lambda: L.fused_token_logps(h, w, y, m, temperature=0.0), "temperature"),
        (lambda: L.fused_token_logps(h, w, y, m, soft_cap=-1.0), "soft_cap"),
        (lambda: L.fused_token_logps(h, w, y, m, chunk_size=0), "chunk_size"),
        (lambda: L.fused_token_logps(h, w, y, m, vocab_chunk_size=2.5), "vocab_chunk_size"),
        (lambda: L.fused_token_kl(h, w, hr[:, :-1], wr, m), "ref_hidden"),
        (lambda: L.fused_token_kl(h, w, hr, wr[:, :-1], m), "ref_unembed"),
        (lambda: L.fused_token_stats(h, w, y, m, kl=True), "ref_hidden"),
        (lambda: L.fused_token_logps(h, w, None, m), "labels"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_partial_requests(rng):
    """Each statistic on its own (other outputs None), values and gradients."""
    h, w, b, hr, wr, br, y, m = make(rng)
    z, r = R.head_logits(h, w, b), R.head_logits(hr, wr, br)
    s = L.fused_token_stats(
        h,
        w,
        y,
        m,
        bias=b,
        ref_hidden=hr,
        ref_unembed=wr,
        ref_bias=br,
        ref_logps=True,
        chunk_size=3,
        vocab_chunk_size=5,
    )
    assert s.entropy is None and s.kl is None
    assert rel(s.logps, R.token_logps(z, y, m)) <= 1e-6
    assert rel(s.ref_logps, R.token_logps(r, y, m)) <= 1e-6
    e = L.fused_token_stats(h, w, None, m, bias=b, entropy=True)
    assert e.logps is None and e.ref_logps is None and e.kl is None
    assert rel(e.entropy, R.token_entropy(z, m)) <= 1e-6
    g = np.random.default_rng(3).standard_normal((B, T))
    gm = np.where(m != 0, g, 0.0)
    dh = jax.grad(lambda h: jnp.sum(g * L.fused_token_entropy(h, w, m, bias=b)))(h)
    want = np.einsum("btv,dv->btd", R.grad_entropy(z, gm), w.astype(np.float64))
    assert rel(dh, want) <= 1e-5


# ------------------------------------------------------------ the kept span (prompt skipping)

T13 = 13


def span_mask(kind):
    """[B, 13] masks of [prompt | completion | padding] rows: the head runs over the span from
    the first to the last position any row keeps, in chunks starting at its first position."""
    m = np.zeros((B, T13), np.int32)
    if kind == "inside":  # span [4, 10): chunks of 3 at 4, 7
        m[0, 4:9], m[1, 6:10] = 1, 1
    elif kind == "clamped":  # span [5, 13): chunks of 3 at 5, 8, then of 1 at 11, 12
        m[0, 5:13], m[1, 7:11] = 1, 1
    elif kind == "tail":  # chunks of 8: span [2, 13): one at 2, then of 2 at 10 and 11 (moved
        m[0, 2:13], m[1, 4:6] = 1, 1  # back from 12 to end at 13; 11 seen twice)
    elif kind == "one":  # a single kept position
        m[1, 12] = 1
    elif kind == "holes":  # masked positions inside the span are still skipped per position
        m[0, 2:4], m[1, 9:12] = 1, 1
    return m  # "none": nothing kept


@pytest.mark.parametrize("kind", ["inside", "clamped", "tail", "one", "holes", "none"])
def test_kept_span_values_and_gradients(rng, kind):
    """Values against float64 NumPy (1e-6) and gradients against the naive graph (1e-5), as
    above. The span's last partial chunk runs in quarter chunks (`SPAN_TAIL_SPLIT`); one that
    is moved back overlaps the one before it and must not count its positions twice (the
    gradients would double there)."""
    chunk = 8 if kind == "tail" else 3
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    h, w, b, hr, wr, br = f(B, T13, D), f(D, V), f(V), f(B, T13, D), f(D, V), f(V)
    y = rng.integers(0, V, (B, T13)).astype(np.int32)
    m = span_mask(kind)
    c = rng.standard_normal((3, B, T13)).astype(np.float32)
    s = fused_all(h, w, b, hr, wr, br, y, m, 4.0, 0.7, chunk, 5, 4 * D * 3)
    z, r = R.head_logits(h, w, b, 4.0, 0.7), R.head_logits(hr, wr, br, 4.0, 0.7)
    for out, ref in zip(s, reference_stats(z, r, y, m)):
        np.testing.assert_array_equal(np.asarray(out)[m == 0], 0.0)
        if m.any():
            assert rel(out, ref) <= 1e-6

    head = (h, w, b, hr, wr, br)
    got, want = fused_and_naive_grads(c, head, y, m, 4.0, 0.7, chunk, 5, 4 * D * 3)
    for g1, g2, name in zip(got, want, ("hidden", "unembed", "bias")):
        if m.any():
            assert rel(g1, g2) <= 1e-5, name
        else:
            assert np.all(np.asarray(g1) == 0.0), name


def test_kept_span_bounds():
    from alignjax.ops._fused import kept_span

    for kind, want in (
        ("inside", (4, 10)),
        ("clamped", (5, 13)),
        ("tail", (2, 13)),
        ("one", (12, 13)),
        ("none", (0, 0)),
    ):
        assert tuple(np.asarray(kept_span(jnp.asarray(span_mask(kind) != 0)))) == want, kind


def test_kept_span_skips_the_prompt_matmuls(monkeypatch):
    """The LM-head matmuls that run, counted per execution (a callback in `_logits`): 16
    positions in chunks of 4, policy log-probs, forward + backward (one matmul each per chunk).
    A mask keeping the last 4 positions runs 1 chunk each way; no mask runs all 4; a span of 6
    runs one chunk and its last 2 positions in quarter chunks; a mask that also keeps position
    0 spans everything again."""
    from alignjax.ops import _fused

    calls = []
    original = _fused._logits

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return original(*args)

    monkeypatch.setattr(_fused, "_logits", counted)
    h, w = jnp.ones((2, 16, 4)), jnp.ones((4, 8))
    y = jnp.zeros((2, 16), jnp.int32)
    keep = np.zeros((2, 16), np.int32)
    keep[:, 12:] = 1

    def matmuls(mask):
        calls.clear()
        f = lambda h, w: L.fused_token_logps(h, w, y, mask, chunk_size=4).sum()  # noqa: E731
        jax.block_until_ready(jax.jit(jax.value_and_grad(f, (0, 1)))(h, w))
        jax.effects_barrier()
        return len(calls)

    assert matmuls(keep) == 2
    assert matmuls(None) == 8
    keep[0, 10] = 1  # span [10, 16): a chunk of 4, then 2 quarter chunks of 1, each way
    assert matmuls(keep) == 6
    keep[1, 0] = 1
    assert matmuls(keep) == 8
