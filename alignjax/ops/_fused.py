"""The fused LM head: per-token statistics from hidden states, never holding `[B, T, V]`.

One kernel computes any subset of {policy log-prob of the label, policy entropy, reference
log-prob of the label, KL(ref || policy)} from `hidden @ unembed (+ bias)`, with optional logit
soft-capping (`cap * tanh(u / cap)`, Gemma 2) and temperature (`z / T`), in that order.

Layout. The sequence axis is walked in chunks of `chunk_size` positions by dynamic slices of
the caller's arrays (no transposed or padded copies), keeping the batch axis whole so that a
batch-sharded input stays sharded through the loop. Inside a chunk the vocabulary is optionally
cut into blocks of `vocab_chunk_size` entries and reduced with an online (running-max)
logsumexp, as in flash-attention. A trailing partial chunk or block is handled as its own
static block, so nothing (in particular `unembed`) is ever padded. With a mask (`span`), the
chunks cover only the positions from the first to the last one any row keeps (`span_loop`, its
last partial chunk in quarter chunks), so the prompt positions of [prompt | completion] rows
cost nothing, forward or backward.

Memory. The forward pass keeps only `[B, T]` statistics (max, log-sum, entropy); the backward
pass recomputes each chunk's logits and accumulates `d unembed` (in the compute dtype, in column
blocks so that no `[D, V]` temporary exists besides the accumulator). Working memory is
O(B * chunk * vocab_block) instead of O(B * T * V): 129 MiB against naive's 6-8 GiB at
B*T = 4096, D = 2048, V = 128k (benchmarks/logprobs.py, README).

Cost. Recomputation makes this 4 LM-head matmuls per forward + backward instead of the naive 3
(6 instead of 4 with a reference side). Measured on 2 CPU cores it is still 0.42-0.89x naive's
time for log-probs and 0.57-1.18x for the KL, because naive streams several `[B, T, V]` tensors
through memory. The backward pass is exact:
dz = g_lp (onehot - p) - g_ent p (log p + H) + g_kl (p - p_ref).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK_ELEMENTS = 2**24  # logits entries per chunk: 64 MiB in float32


class HeadConfig(NamedTuple):
    """Static configuration of the fused head (hashable: it is a `nondiff_argnums` entry)."""

    chunk_size: int
    vocab_chunk_size: int
    grad_block: int  # columns of d unembed accumulated per matmul in the backward pass
    soft_cap: float | None
    temperature: float
    precision: Any
    want_logps: bool
    want_entropy: bool
    want_ref_logps: bool
    want_kl: bool

    @property
    def needs_ref(self) -> bool:
        return self.want_ref_logps or self.want_kl


def auto_chunk_size(batch: int, length: int, vocab_width: int, budget: int) -> int:
    """Largest chunk (in positions) with batch * chunk * vocab_width <= budget, balanced over T."""
    c = max(1, min(length, budget // max(1, batch * vocab_width)))
    n = -(-length // c)
    return -(-length // n)


# --------------------------------------------------------------------------- layout helpers


def blocked_loop(body, carry, total: int, block: int):
    """Apply `body(carry, start, size)` over [0, total) in blocks: full blocks in a fori_loop
    (dynamic `start`), then the remainder as one static block; a single block runs inline."""
    n, rem = divmod(total, block)
    if n == 1 and rem == 0:
        return body(carry, 0, total)
    if n:
        carry = lax.fori_loop(0, n, lambda i, c: body(c, i * block, block), carry)
    if rem:
        carry = body(carry, n * block, rem)
    return carry


def kept_span(keep: jax.Array) -> jax.Array:
    """int32 (lo, hi): the positions [lo, hi) between the first and the last position that any
    row of `keep` ([B, T] bool) keeps; (0, 0) when none is kept."""
    any_row = jnp.any(keep, axis=0)
    length = keep.shape[1]
    lo = jnp.argmax(any_row)
    hi = length - jnp.argmax(any_row[::-1])
    found = jnp.any(any_row)
    return jnp.stack([jnp.where(found, lo, 0), jnp.where(found, hi, 0)]).astype(jnp.int32)


SPAN_TAIL_SPLIT = 4  # the span's last, partial chunk runs in blocks of chunk / 4 (rounded up)


def span_loop(body, carry, total: int, block: int, span):
    """`blocked_loop` over the positions [lo, hi) of `span` only (None: all of [0, total)), for
    `body(carry, start, size, fresh)`. Whole blocks of `block` positions start at lo,
    lo + block, ... (a traced trip count); the rest of the span, fewer than `block` positions,
    runs in blocks of ceil(block / SPAN_TAIL_SPLIT), so that at most that many positions past hi
    are computed. A block that would run past `total` is moved back to end there, and `fresh`
    ([size] bool, None on the static path) marks the positions that no earlier block covered,
    so that a body writes, and accumulates, each position exactly once."""
    if span is None or total <= block:
        return blocked_loop(lambda c, s, n: body(c, s, n, None), carry, total, block)
    lo, hi = span[0], span[1]

    def run(carry, first, count, size: int):
        offsets = jnp.arange(size)

        def step(i, c):
            want = first + i * size
            start = jnp.minimum(want, total - size)
            return body(c, start, size, start + offsets >= want)

        return lax.fori_loop(0, count, step, carry)

    tail = -(-block // SPAN_TAIL_SPLIT)
    if tail == block:  # blocks too small to split
        return run(carry, lo, (hi - lo + block - 1) // block, block)
    whole = (hi - lo) // block
    carry = run(carry, lo, whole, block)
    rest = lo + whole * block
    return run(carry, rest, (hi - rest + tail - 1) // tail, tail)


def _slice(x, start, size: int, axis: int):
    if x is None:
        return None
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _logits(h, w, b, cfg: HeadConfig, dt):
    u = jnp.einsum("bcd,dv->bcv", h, w, precision=cfg.precision, preferred_element_type=dt)
    if b is not None:
        u = u + b.astype(dt)
    z = u
    if cfg.soft_cap is not None:
        z = cfg.soft_cap * jnp.tanh(u / cfg.soft_cap)
    if cfg.temperature != 1.0:
        z = z / cfg.temperature
    return z


def _dz_du(z, cfg: HeadConfig):
    """d z / d u expressed through z (no need to keep u)."""
    d = 1.0 / cfg.temperature
    if cfg.soft_cap is not None:
        t = z * (cfg.temperature / cfg.soft_cap)  # = tanh(u / cap)
        d = d * (1.0 - t * t)
    return d


def _accumulate_columns(dw, start, h, du, cfg: HeadConfig, dt):
    """dw[:, start:start+size] += h^T du, in column blocks of `cfg.grad_block`.

    XLA:CPU does not fuse the add into the matmul, so one `h^T du` over a whole vocabulary
    block would be a [D, size] temporary (as large as d unembed itself without vocab chunking).
    """
    size = du.shape[-1]

    def body(acc, col, width):
        part = jnp.einsum(
            "bcd,bcv->dv",
            h,
            _slice(du, col, width, 2),
            precision=cfg.precision,
            preferred_element_type=dt,
        )
        at = start + col
        return lax.dynamic_update_slice_in_dim(acc, _slice(acc, at, width, 1) + part, at, 1)

    return blocked_loop(body, dw, size, min(cfg.grad_block, size))


def _online_update(m, s, z):
    """Running logsumexp step: returns (m_new, s_new, scale, e) with e = exp(z - m_new).

    `m` starts at finfo.min rather than -inf so that it stays finite (no inf - inf) even for
    blocks of -inf logits; exp(finfo.min - m_new) underflows to exactly 0.
    """
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(z - m_new[..., None])
    return m_new, s * scale + jnp.sum(e, axis=-1), scale, e


def _label_logit(z, labels, start, size: int):
    """z[label] when the label falls in this vocabulary block [start, start + size), else 0."""
    local = labels - start
    inside = (local >= 0) & (local < size)
    picked = jnp.take_along_axis(z, jnp.clip(local, 0, size - 1)[..., None], axis=-1)[..., 0]
    return jnp.where(inside, picked, 0.0)


# ---------------------------------------------------------------------------------- forward


def _chunk_stats(cfg: HeadConfig, dt, params, h, y, hr):
    """Per-token statistics of one chunk. Returns a dict of [B, C] arrays."""
    w, b, wr, br = params
    zeros = jnp.zeros(h.shape[:2], dt)
    ninf = jnp.full(h.shape[:2], jnp.finfo(dt).min, dt)
    carry = {"m": ninf, "s": zeros}
    if cfg.want_logps:
        carry["t"] = zeros
    if cfg.want_entropy:
        carry["tz"] = zeros
    if cfg.needs_ref:
        carry.update(mr=ninf, sr=zeros)
    if cfg.want_ref_logps:
        carry["tr"] = zeros
    if cfg.want_kl:
        carry["a"] = zeros

    def body(c, start, size):
        c = dict(c)
        z = _logits(h, _slice(w, start, size, 1), _slice(b, start, size, 0), cfg, dt)
        m_old, s_old = c["m"], c["s"]
        c["m"], c["s"], scale, e = _online_update(m_old, s_old, z)
        if cfg.want_entropy:
            # tz = sum e^(z - m) (z - m), re-based to the new running max m.
            shift = jnp.where(s_old > 0, (m_old - c["m"]) * s_old, 0.0)
            fresh = jnp.sum(jnp.where(e > 0, e * (z - c["m"][..., None]), 0.0), axis=-1)
            c["tz"] = scale * (c["tz"] + shift) + fresh
        if cfg.want_logps:
            c["t"] = c["t"] + _label_logit(z, y, start, size)
        if cfg.needs_ref:
            r = _logits(hr, _slice(wr, start, size, 1), _slice(br, start, size, 0), cfg, dt)
            c["mr"], c["sr"], scale_r, er = _online_update(c["mr"], c["sr"], r)
            if cfg.want_ref_logps:
                c["tr"] = c["tr"] + _label_logit(r, y, start, size)
            if cfg.want_kl:
                terms = jnp.where(er > 0, er * (r - z), 0.0)
                c["a"] = c["a"] * scale_r + jnp.sum(terms, axis=-1)
        return c

    c = blocked_loop(body, carry, w.shape[1], cfg.vocab_chunk_size)
    # log p = (z - m) - log s, never z - (m + log s): see alignjax/ops/_dense.py::_shifted.
    ls = jnp.log(c["s"])
    out = {"m": c["m"], "ls": ls}
    if cfg.want_logps:
        out["logps"] = (c["t"] - c["m"]) - ls
    if cfg.want_entropy:
        out["entropy"] = ls - c["tz"] / c["s"]
    if cfg.needs_ref:
        lsr = jnp.log(c["sr"])
        out.update(mr=c["mr"], lsr=lsr)
        if cfg.want_ref_logps:
            out["ref_logps"] = (c["tr"] - c["mr"]) - lsr
        if cfg.want_kl:
            # KL = E_ref[r - z] - lse_r + lse_z, with each lse kept as (max, log-sum).
            out["kl"] = c["a"] / c["sr"] - (c["mr"] - c["m"]) - lsr + ls
    return out


def _compute_dtype(*arrays):
    return jnp.result_type(jnp.float32, *[a.dtype for a in arrays if a is not None])


def _stat_keys(cfg: HeadConfig) -> list[str]:
    keys = ["m", "ls"]
    keys += ["logps"] if cfg.want_logps else []
    keys += ["entropy"] if cfg.want_entropy else []
    keys += ["mr", "lsr"] if cfg.needs_ref else []
    keys += ["ref_logps"] if cfg.want_ref_logps else []
    keys += ["kl"] if cfg.want_kl else []
    return keys


def _forward(
    cfg: HeadConfig, hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span
):
    dt = _compute_dtype(hidden, unembed, bias, ref_hidden, ref_unembed, ref_bias)
    batch, length = hidden.shape[:2]
    params = (unembed, bias, ref_unembed, ref_bias)

    def put(v, new, start, size, fresh):
        if fresh is not None:
            new = jnp.where(fresh, new, _slice(v, start, size, 1))
        return lax.dynamic_update_slice_in_dim(v, new, start, 1)

    def body(acc, start, size, fresh):
        st = _chunk_stats(
            cfg,
            dt,
            params,
            _slice(hidden, start, size, 1),
            _slice(labels, start, size, 1),
            _slice(ref_hidden, start, size, 1),
        )
        return {k: put(v, st[k], start, size, fresh) for k, v in acc.items()}

    init = {k: jnp.zeros((batch, length), dt) for k in _stat_keys(cfg)}
    stats = span_loop(body, init, length, cfg.chunk_size, span)
    outputs = tuple(stats.get(k) for k in ("logps", "entropy", "ref_logps", "kl"))
    return outputs, stats


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_head(cfg, hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span=None):
    """(logps, entropy, ref_logps, kl), each [B, T] or None when not requested by `cfg`.

    `span` (`kept_span` of the caller's mask, or None): only the positions [lo, hi) are
    computed, forward and backward; the values elsewhere are unspecified (zeros) and their
    cotangents must be zero: the caller masks them."""
    args = (hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span)
    return _forward(cfg, *args)[0]


def _fused_head_fwd(cfg, hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span):
    args = (hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span)
    outputs, stats = _forward(cfg, *args)
    keep = {k: v for k, v in stats.items() if k in ("m", "ls", "entropy", "mr", "lsr")}
    # Residuals: the caller's own arrays (no copies) and [B, T] statistics.
    return outputs, (args, keep)


# --------------------------------------------------------------------------------- backward


def _fused_head_bwd(cfg, res, cotangents):
    (hidden, unembed, bias, labels, ref_hidden, ref_unembed, ref_bias, span), keep = res
    g_lp, g_ent, _, g_kl = cotangents
    dt = keep["ls"].dtype
    g_lp = g_lp.astype(dt) if cfg.want_logps else None
    g_ent = g_ent.astype(dt) if cfg.want_entropy else None
    g_kl = g_kl.astype(dt) if cfg.want_kl else None

    def vocab_body_for(h, y, hr, gl, ge, gk, st):
        def body(c, start, size):
            dh, dw, db = c
            wb = _slice(unembed, start, size, 1)
            z = _logits(h, wb, _slice(bias, start, size, 0), cfg, dt)
            logp = (z - st["m"][..., None]) - st["ls"][..., None]
            p = jnp.exp(logp)
            dz = jnp.zeros_like(z)
            if gl is not None:
                local = y - start
                onehot = jnp.arange(size) == local[..., None]  # False outside this block
                dz = dz + jnp.where(onehot, gl[..., None], 0.0) - p * gl[..., None]
            if ge is not None:
                h_term = jnp.where(p > 0, p * (logp + st["entropy"][..., None]), 0.0)
                dz = dz - ge[..., None] * h_term
            if gk is not None:
                wr, br = _slice(ref_unembed, start, size, 1), _slice(ref_bias, start, size, 0)
                r = _logits(hr, wr, br, cfg, dt)
                p_r = jnp.exp((r - st["mr"][..., None]) - st["lsr"][..., None])
                dz = dz + gk[..., None] * (p - p_r)
            du = dz * _dz_du(z, cfg)
            dh = dh + jnp.einsum(
                "bcv,dv->bcd",
                du.astype(wb.dtype),
                wb,
                precision=cfg.precision,
                preferred_element_type=dt,
            )
            dw = _accumulate_columns(dw, start, h, du.astype(h.dtype), cfg, dt)
            if db is not None:
                db_new = _slice(db, start, size, 0) + jnp.sum(du, axis=(0, 1))
                db = lax.dynamic_update_slice_in_dim(db, db_new, start, 0)
            return dh, dw, db

        return body

    def chunk_body(carry, start, size, fresh):
        d_hidden, dw, db = carry

        def rows(x):
            return _slice(x, start, size, 1)

        def fresh_rows(g):
            # A position an earlier block covered has had its cotangent applied there.
            g = rows(g)
            return g if g is None or fresh is None else jnp.where(fresh, g, 0.0)

        h = rows(hidden)
        body = vocab_body_for(
            h,
            rows(labels),
            rows(ref_hidden),
            fresh_rows(g_lp),
            fresh_rows(g_ent),
            fresh_rows(g_kl),
            {k: rows(v) for k, v in keep.items()},
        )
        dh = jnp.zeros(h.shape, dt)
        dh, dw, db = blocked_loop(body, (dh, dw, db), unembed.shape[1], cfg.vocab_chunk_size)
        dh = dh.astype(hidden.dtype)
        if fresh is not None:
            dh = jnp.where(fresh[:, None], dh, rows(d_hidden))
        d_hidden = lax.dynamic_update_slice_in_dim(d_hidden, dh, start, 1)
        return d_hidden, dw, db

    init = (
        jnp.zeros_like(hidden),
        jnp.zeros(unembed.shape, dt),
        None if bias is None else jnp.zeros(bias.shape, dt),
    )
    d_hidden, dw, db = span_loop(chunk_body, init, hidden.shape[1], cfg.chunk_size, span)
    d_bias = None if bias is None else db.astype(bias.dtype)
    # The reference side and the span are constants: None cotangents (zeros, never materialised).
    return d_hidden, dw.astype(unembed.dtype), d_bias, None, None, None, None, None


fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)
