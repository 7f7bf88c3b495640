"""Memory-efficient attention in pure JAX: key/value blocks with an online softmax, for every
backend (no fused kernel needed).

Forward (Rabe & Staats 2021, arXiv:2112.05682; FlashAttention, Dao et al. 2022,
arXiv:2205.14135, Algorithm 1): for each query block, walk the key/value blocks it can see with
a running row maximum m and sum l (float32),

    m' = max(m, rowmax(S)),  l' = l e^(m - m') + rowsum(e^(S - m')),
    acc' = acc e^(m - m') + e^(S - m') V,   O = acc / l,   L = m + log l.

Backward (FlashAttention-2, Dao 2023, arXiv:2307.08691, Algorithm 2): from the saved (O, L) the
probabilities of each block are recomputed, P = e^(S - L), and with D = rowsum(dO * O)

    dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ += dS K / sqrt(d),  dK += dS^T Q / sqrt(d).

Memory is O(T * block) besides the inputs, outputs and gradients: no [T, S] array exists in
either pass. Grouped-query heads are not repeated: the H/KV query heads of one key/value head
are stacked along the query axis, as in `grouped_query_attention`. Only the key blocks a query
block can see are visited (a `lax.fori_loop` with traced bounds): under causality the blocks
above the diagonal and, with a sliding window, those left of it are never computed.

Visibility of key j from query i (positions p, default 0, 1, ...):

    (not causal or p_k[j] <= p_q[i]) and (window is None or p_q[i] - window < p_k[j])
    and key_valid[j] and segment_k[j] in (segment_q[i], prefix_q[i]),   or p_k[j] == p_q[i]

(the last term is the diagonal). `prefix_q` (default: `segment_q`) lets the completion
branches of a pair packed behind one shared prompt see that prompt's segment as well
(`data.pack(..., share_prompt=True)`). The diagonal term is `attention_mask_4d`'s: a padding
query, which sees no real key, attends to itself, so every row stays finite and equal to the
dense path.

Each visited block pair is classified once, from per-block ranges of positions, segments and
key validity over the batch: "full" pairs (every key visible to every query, e.g. below the
causal diagonal in an unpadded row) skip the mask, pairs with no visible key (another segment,
all keys padding) skip the block, and only the rest are masked element by element.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["SequenceMask", "blockwise_attention", "default_block"]


class SequenceMask(NamedTuple):
    """The 2-D form of a self-attention mask (what `attention_mask_4d` expands): `key_valid`
    [B, T] (True on real tokens), `segment_ids` [B, T] (packed rows) or None, and
    `prefix_ids` [B, T] (the shared-prompt segment each token also sees) or None."""

    key_valid: jax.Array
    segment_ids: jax.Array | None = None
    prefix_ids: jax.Array | None = None


SKIP, FULL, PARTIAL = 0, 1, 2  # block pair classes (`_block_classes`)


def check_prefix_ids(prefix_ids, segment_ids, shape) -> None:
    """`prefix_ids` (None, or [B, T] = `shape`) needs the `segment_ids` it refers to."""
    if prefix_ids is None:
        return
    if segment_ids is None:
        raise ValueError("`prefix_ids` needs `segment_ids` (the segments they refer to)")
    if tuple(prefix_ids.shape) != tuple(shape):
        raise ValueError(f"`prefix_ids` must have shape {tuple(shape)}, got {prefix_ids.shape}")


class _Blocks(NamedTuple):
    """Static layout (hashable: a `nondiff_argnums` entry)."""

    causal: bool
    window: int | None
    q_block: int
    kv_block: int
    kv_length: int  # keys before padding: later slots are invisible, even on the diagonal


def _pad(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _positions(pos, batch: int, length: int, padded: int):
    """[B, padded] int32 positions: `pos` ([T] or [B, T], default 0..T-1) continued by +1 steps."""
    if pos is None:
        return jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (batch, padded))
    pos = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (batch, length))
    tail = pos[:, -1:] + jnp.arange(1, padded - length + 1, dtype=jnp.int32)
    return jnp.concatenate([pos, tail], axis=1)


def _block_ranges(lay: _Blocks, qpos, kpos):
    """`needed` [nq, nk]: the block pairs holding a visible (query, key) pair, from each block's
    position range over the batch (conservative, so exact for any positions). Returns, per query
    block, the first and one-past-last needed key block, and the same per key block."""
    b = qpos.shape[0]
    qp = qpos.reshape(b, -1, lay.q_block)
    kp = kpos.reshape(b, -1, lay.kv_block)
    q_min, q_max = qp.min((0, 2)), qp.max((0, 2))
    k_min, k_max = kp.min((0, 2)), kp.max((0, 2))
    needed = jnp.ones((q_min.shape[0], k_min.shape[0]), bool)
    if lay.causal:
        needed &= k_min[None, :] <= q_max[:, None]
    if lay.window is not None:
        needed &= k_max[None, :] > q_min[:, None] - lay.window

    def span(rows):  # [first, last + 1) of the True entries of each row; empty rows: [0, 0)
        n = rows.shape[1]
        idx = jnp.arange(n)
        first = jnp.min(jnp.where(rows, idx, n), axis=1)
        last = jnp.max(jnp.where(rows, idx + 1, 0), axis=1)
        return jnp.minimum(first, last), last

    return span(needed), span(needed.T)


def _block_classes(lay: _Blocks, qpos, kpos, qseg, kseg, qpre, kvalid):
    """[nq, nk] int32: SKIP where no query of the block pair sees a key of it in any row,
    FULL where every query sees every key in every row, PARTIAL otherwise. Conservative (from
    per-row ranges of each block), so exact for any inputs: PARTIAL is always correct."""
    b = qpos.shape[0]

    def ranges(x, block):  # [B, n] minimum and maximum of each block, per row
        x = x.reshape(b, -1, block)
        return x.min(2)[:, :, None], x.max(2)[:, :, None]  # queries: [B, nq, 1]

    (q_min, q_max), (k_min, k_max) = ranges(qpos, lay.q_block), ranges(kpos, lay.kv_block)
    k_min, k_max = k_min.swapaxes(1, 2), k_max.swapaxes(1, 2)  # keys: [B, 1, nk]
    nk = k_min.shape[2]
    skip = jnp.zeros((b, q_min.shape[1], nk), bool)
    full = jnp.ones_like(skip)
    if lay.causal:
        skip |= k_min > q_max
        full &= k_max <= q_min
    if lay.window is not None:
        skip |= k_max <= q_min - lay.window
        full &= k_min > q_max - lay.window
    # Skipping by segment or padding must keep the diagonal term: only where no key position
    # equals a query position.
    off_diagonal = (k_min > q_max) | (k_max < q_min)
    kv = kvalid.reshape(b, nk, lay.kv_block)
    skip |= off_diagonal & ~kv.any(2)[:, None, :]
    in_range = (jnp.arange(1, nk + 1) * lay.kv_block <= lay.kv_length)[None, None, :]
    full &= kv.all(2)[:, None, :] & in_range
    if qseg is not None:
        (qs_min, qs_max), (ks_min, ks_max) = ranges(qseg, lay.q_block), ranges(kseg, lay.kv_block)
        qp_min, qp_max = (qs_min, qs_max) if qpre is None else ranges(qpre, lay.q_block)
        ks_min, ks_max = ks_min.swapaxes(1, 2), ks_max.swapaxes(1, 2)

        def disjoint(lo, hi):
            return (ks_max < lo) | (ks_min > hi)

        skip |= off_diagonal & disjoint(qs_min, qs_max) & disjoint(qp_min, qp_max)
        one_key_segment = ks_min == ks_max
        full &= one_key_segment & (
            ((qs_min == qs_max) & (qs_min == ks_min)) | ((qp_min == qp_max) & (qp_min == ks_min))
        )
    return jnp.where(skip.all(0), SKIP, jnp.where(full.all(0), FULL, PARTIAL)).astype(jnp.int32)


def _scores(
    lay: _Blocks, scale, q, k, qpos, kpos, qseg, kseg, kvalid, k_start, qpre=None, *, masked=True
):
    """Masked float32 scores of one block pair: q [B, KV, G, qb, d], k [B, KV, kb, d] ->
    [B, KV, G, qb, kb], -inf where hidden."""
    b, kvh, g, qb, d = q.shape
    s = jnp.einsum(
        "bkqd,bksd->bkqs", q.reshape(b, kvh, g * qb, d), k, preferred_element_type=jnp.float32
    )
    s = s.reshape(b, kvh, g, qb, -1) * scale
    if not masked:
        return s
    qp, kp = qpos[:, :, None], kpos[:, None, :]
    visible = kvalid[:, None, :]
    if lay.causal:
        visible &= kp <= qp
    if lay.window is not None:
        visible &= kp > qp - lay.window
    if qseg is not None:
        same = qseg[:, :, None] == kseg[:, None, :]
        if qpre is not None:
            same |= qpre[:, :, None] == kseg[:, None, :]
        visible &= same
    in_range = (k_start + jnp.arange(k.shape[2])) < lay.kv_length
    visible |= (kp == qp) & in_range[None, None, :]
    return jnp.where(visible[:, None, None], s, -jnp.inf)


def _slice(x, start, size: int, axis: int):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis)


def _forward(lay: _Blocks, q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid):
    """q [B, KV, G, Tp, d], k and v [B, KV, Sp, d] -> (out like q, lse [B, KV, G, Tp] f32,
    the block pair classes [nq, nk], which the backward pass reuses)."""
    b, kvh, g, tp, d = q.shape
    qb, kb = lay.q_block, lay.kv_block
    scale = d**-0.5
    (lo, hi), _ = _block_ranges(lay, qpos, kpos)
    classes = _block_classes(lay, qpos, kpos, qseg, kseg, qpre, kvalid)

    def q_step(_, i):
        qs = i * qb
        qi, qp, qsg = _slice(q, qs, qb, 3), _slice(qpos, qs, qb, 1), _slice(qseg, qs, qb, 1)
        qpr = _slice(qpre, qs, qb, 1)

        def block(masked):
            def run(j, carry):
                acc, m, l = carry
                ks = j * kb
                s = _scores(
                    lay, scale, qi, _slice(k, ks, kb, 2), qp, _slice(kpos, ks, kb, 1), qsg,
                    _slice(kseg, ks, kb, 1), _slice(kvalid, ks, kb, 1), ks, qpr, masked=masked,
                )  # fmt: skip
                # m starts finite, so e^(m - m_new) and e^(-inf - m_new) never see inf - inf.
                m_new = jnp.maximum(m, s.max(-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                pv = jnp.einsum(
                    "bkgqs,bksd->bkgqd", p.astype(v.dtype), _slice(v, ks, kb, 2),
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                return acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)

            return run

        def kv_step(j, carry):
            branches = [lambda j, c: c, block(False), block(True)]  # SKIP, FULL, PARTIAL
            return lax.switch(classes[i, j], branches, j, carry)

        init = (
            jnp.zeros((b, kvh, g, qb, d), jnp.float32),
            jnp.full((b, kvh, g, qb), jnp.finfo(jnp.float32).min),
            jnp.zeros((b, kvh, g, qb), jnp.float32),
        )
        acc, m, l = lax.fori_loop(lo[i], hi[i], kv_step, init)
        # A row that sees no key at all (only possible with positions absent from the keys):
        # output 0 and lse +inf, so that the backward pass recomputes P = 0, not NaN.
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(q_step, None, jnp.arange(tp // qb))
    # [nq, B, KV, G, qb, ...] -> [B, KV, G, Tp, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kvh, g, tp, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, tp)
    return out, lse, classes


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(lay, q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid):
    return _forward(lay, q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid)[0]


def _flash_fwd(lay, q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid):
    out, lse, classes = _forward(lay, q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid)
    return out, (q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid, out, lse, classes)


def _flash_bwd(lay, res, d_out):
    q, k, v, qpos, kpos, qseg, kseg, qpre, kvalid, out, lse, classes = res
    b, kvh, g, tp, d = q.shape
    sp = k.shape[2]
    qb, kb = lay.q_block, lay.kv_block
    scale = d**-0.5
    _, (lo, hi) = _block_ranges(lay, qpos, kpos)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def kv_step(dq, j):
        ks = j * kb
        kj, vj = _slice(k, ks, kb, 2), _slice(v, ks, kb, 2)
        kp, ksg, kvl = _slice(kpos, ks, kb, 1), _slice(kseg, ks, kb, 1), _slice(kvalid, ks, kb, 1)

        def block(masked):
            def run(i):  # -> this block pair's (dQ, dK^T, dV^T) terms
                qs = i * qb
                qi, doi = _slice(q, qs, qb, 3), _slice(d_out, qs, qb, 3)
                s = _scores(
                    lay, scale, qi, kj, _slice(qpos, qs, qb, 1), kp, _slice(qseg, qs, qb, 1), ksg,
                    kvl, ks, _slice(qpre, qs, qb, 1), masked=masked,
                )  # fmt: skip
                p = jnp.exp(s - _slice(lse, qs, qb, 3)[..., None])  # [B, KV, G, qb, kb]
                # dV and dK are accumulated transposed ([d, kb]): the products contract over
                # the queries, and XLA:CPU's fast matmul wants the contracted axis last on its
                # left operand, so it transposes the small [q, d] operand, not P / dS ([q, kb]).
                dv = jnp.einsum(
                    "bkgqd,bkgqs->bkds", doi, p.astype(d_out.dtype),
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - _slice(delta, qs, qb, 3)[..., None]) * scale).astype(q.dtype)
                dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
                dk = jnp.einsum("bkgqd,bkgqs->bkds", qi, ds, preferred_element_type=jnp.float32)
                return dqi, dk, dv

            return run

        def skip(i):
            zeros = jnp.zeros((b, kvh, d, kb), jnp.float32)
            return jnp.zeros((b, kvh, g, qb, d), jnp.float32), zeros, zeros

        def q_step(i, carry):
            # The switch returns only this block pair's terms: the accumulators stay outside it
            # (a conditional that passed the whole dQ through would copy it at every block).
            dq, dk, dv = carry
            branches = [skip, block(False), block(True)]  # SKIP, FULL, PARTIAL
            dqi, dki, dvi = lax.switch(classes[i, j], branches, i)
            qs = i * qb
            dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, qs, qb, 3) + dqi, qs, 3)
            return dq, dk + dki, dv + dvi

        zeros = jnp.zeros((b, kvh, d, kb), jnp.float32)
        dq, dk, dv = lax.fori_loop(lo[j], hi[j], q_step, (dq, zeros, zeros))
        return dq, (dk.swapaxes(-1, -2), dv.swapaxes(-1, -2))

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(kv_step, dq0, jnp.arange(sp // kb))
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kvh, sp, d)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, kvh, sp, d)
    none = (None,) * 6  # positions, segments, prefixes, key validity: integer / bool
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *none)


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_block(length: int) -> int:
    """The default block size for `length` queries or keys: 128, or 256 from 1024 on. Measured
    on 2 CPU cores (forward + backward, 8 query / 4 key-value heads of 32, causal): 256 is
    1.3-1.4x faster than 128 at 1024-4096 positions and slower below 1024, where it leaves
    fewer blocks for causality to skip and pads more."""
    return 256 if length >= 1024 else 128


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_valid: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    prefix_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    q_block: int | None = None,
    kv_block: int | None = None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(d), masked) v without materialising the scores (module docstring).

    Args:
      q: [B, T, H, d] queries (float32 or bfloat16).
      k, v: [B, S, KV, d] keys and values; H a multiple of KV (key/value head j serves query
        heads j * H/KV .. (j + 1) * H/KV - 1, as transformers' `repeat_kv`).
      key_valid: [B, S] booleans, True on real tokens (None: all).
      segment_ids: packed rows: one [B, T] array for self-attention (T == S), or a pair
        ([B, T] query ids, [B, S] key ids); a query sees keys of its own segment only.
      prefix_ids: [B, T] int ids, with `segment_ids`: the one other segment each query also
        sees (the shared prompt of a completion branch, `data.pack(..., share_prompt=True)`);
        None: none (as `prefix_ids = segment_ids`).
      causal: key j visible to query i only if p_k[j] <= p_q[i].
      window: sliding window: additionally p_q[i] - window < p_k[j].
      q_block, kv_block: block sizes (T and S are padded to multiples internally); default
        (None) `default_block(T)` / `default_block(S)`: 128, or 256 from 1024 positions on.
      q_positions, k_positions: [T] / [B, T] and [S] / [B, S] int positions for the causal and
        window tests (default 0, 1, ...; e.g. an offset for queries after a cache).

    Returns:
      [B, T, H, d] in q's dtype; statistics and accumulators are float32.

    Example:
      >>> q = jnp.ones((1, 5, 4, 8)); kv = jnp.ones((1, 5, 2, 8))
      >>> blockwise_attention(q, kv, kv, q_block=2, kv_block=2).shape
      (1, 5, 4, 8)
    """
    b, t, heads, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if heads % kvh:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kvh})")
    g = heads // kvh
    q_block = default_block(t) if q_block is None else q_block
    kv_block = default_block(s) if kv_block is None else kv_block
    qb, kb = min(q_block, t), min(kv_block, s)
    tp, sp = -(-t // qb) * qb, -(-s // kb) * kb
    if isinstance(segment_ids, tuple | list):
        qseg, kseg = segment_ids
    else:
        qseg = kseg = segment_ids
    check_prefix_ids(prefix_ids, qseg, (b, t))
    if prefix_ids is not None:
        prefix_ids = _pad(jnp.asarray(prefix_ids, jnp.int32), 1, tp)
    if qseg is not None:
        qseg = _pad(jnp.asarray(qseg, jnp.int32), 1, tp)
        kseg = _pad(jnp.asarray(kseg, jnp.int32), 1, sp)
    kvalid = jnp.ones((b, s), bool) if key_valid is None else key_valid.astype(bool)
    kvalid = _pad(kvalid, 1, sp, False)
    qpos = _positions(q_positions, b, t, tp)
    kpos = _positions(k_positions, b, s, sp)
    q5 = _pad(q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4), 3, tp)
    k4 = _pad(k.transpose(0, 2, 1, 3), 2, sp)
    v4 = _pad(v.transpose(0, 2, 1, 3), 2, sp)
    lay = _Blocks(bool(causal), window, qb, kb, s)
    out = _flash(lay, q5, k4, v4, qpos, kpos, qseg, kseg, prefix_ids, kvalid)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)
