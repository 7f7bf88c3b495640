"""Per-token statistics from materialised logits `[..., T, V]`.

Each kernel has a custom VJP whose backward pass is one elementwise expression over the logits
(for example `g * (onehot(y) - softmax(z))` for log-probs), instead of the scatter, exp, sub and
mul chain that autodiff of `take_along_axis(log_softmax(z))` produces. Residuals are the
caller's own logits (kept in their dtype, bf16 included) plus `[..., T]` statistics.

Both passes walk the sequence axis in row chunks of about `ROW_CHUNK_ELEMENTS` logits (dynamic
slices of the caller's array: no copy). Backends fuse elementwise producers into reductions to
different degrees (XLA:CPU materialises `z - max`, `p_ref` and the KL terms as full `[B, T, V]`
buffers); chunking bounds those temporaries by the chunk whatever the backend does, so a kernel
holds its inputs, its `[..., T, V]` cotangent and O(chunk) more.

Vocabulary entries at -inf (masked-out tokens) have probability 0 and contribute 0 to
entropies and KLs, instead of the NaN that `0 * -inf` would give.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.ops._checks import result_dtype
from alignjax.ops._fused import blocked_loop

ROW_CHUNK_ELEMENTS = 2**22  # logits per row chunk: 16 MiB in float32


def _shifted(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z - m, m, log sum exp(z - m)) with m the row max (0 for an all -inf row).

    Keeping m and the log-sum apart matters at large |logits|: log p = (z - m) - log s is exact
    to float32 rounding of each term, whereas z - (m + log s) rounds log s at the magnitude of m
    (at logits ~1e4 that is an absolute error ~1e-3 in every log-prob).
    """
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    zs = z - m
    return zs, m[..., 0], jnp.log(jnp.sum(jnp.exp(zs), axis=-1))


def _xlogy_terms(p: jax.Array, logp: jax.Array) -> jax.Array:
    """p * logp with the 0 * -inf = 0 convention."""
    return jnp.where(p > 0, p * logp, 0.0)


def _map_rows(fn, token_inputs, row_inputs, outputs):
    """outputs[..., rows] = fn(*token_inputs[..., rows], *row_inputs[..., rows, :]) per chunk.

    `token_inputs` are `[..., T]`, `row_inputs` are `[..., T, V]`; `outputs` are zero-filled
    buffers, `[..., T]` (ndim of a token input) or `[..., T, V]`, updated in place chunk by chunk.
    """
    lead = row_inputs[0].shape[:-2]
    length, vocab = row_inputs[0].shape[-2:]
    per_row = max(1, vocab * math.prod(lead))
    chunk = max(1, min(length, ROW_CHUNK_ELEMENTS // per_row))
    tok_nd = len(lead) + 1

    def body(outs, start, size):
        toks = [lax.dynamic_slice_in_dim(x, start, size, axis=-1) for x in token_inputs]
        rows = [lax.dynamic_slice_in_dim(x, start, size, axis=-2) for x in row_inputs]
        res = fn(*toks, *rows)
        return tuple(
            lax.dynamic_update_slice_in_dim(
                o, r.astype(o.dtype), start, axis=-1 if o.ndim == tok_nd else -2
            )
            for o, r in zip(outs, res)
        )

    return blocked_loop(body, tuple(outputs), length, chunk)


def _as_rows(fn):
    """Lift a `[..., T, V]` kernel to also accept a single `[V]` row."""

    def wrapped(*args):
        squeeze = args[0].ndim == 1
        if squeeze:
            args = tuple(None if a is None else a[None] for a in args)
        out = fn(*args)
        return jax.tree.map(lambda x: x[0], out) if squeeze else out

    return wrapped


# --------------------------------------------------------------------------------- log-probs


def _logps_stats(labels, logits):
    zs, m, ls = _shifted(logits.astype(result_dtype(logits.dtype)))
    target = jnp.take_along_axis(zs, labels[..., None], axis=-1)[..., 0]
    return target - ls, m, ls


@jax.custom_vjp
def dense_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logit[label] - logsumexp(logits); `labels` already clipped to [0, V)."""
    return _dense_logps_fwd(logits, labels)[0]


@_as_rows
def _logps_forward(logits, labels):
    dt = result_dtype(logits.dtype)
    zeros = jnp.zeros(labels.shape, dt)
    return _map_rows(_logps_stats, [labels], [logits], [zeros, zeros, zeros])


def _dense_logps_fwd(logits, labels):
    lp, m, ls = _logps_forward(logits, labels)
    return lp, (logits, labels, m, ls)


@_as_rows
def _logps_backward(logits, labels, m, ls, g):
    def grad_rows(labels, m, ls, g, logits):
        z = logits.astype(ls.dtype)
        onehot = jnp.arange(z.shape[-1]) == labels[..., None]
        p = jnp.exp((z - m[..., None]) - ls[..., None])
        return (g[..., None] * (onehot.astype(z.dtype) - p),)

    return _map_rows(
        grad_rows, [labels, m, ls, g.astype(ls.dtype)], [logits], [jnp.zeros_like(logits)]
    )[0]


def _dense_logps_bwd(res, g):
    logits, labels, m, ls = res
    return _logps_backward(logits, labels, m, ls, g), None


dense_logps.defvjp(_dense_logps_fwd, _dense_logps_bwd)


# ----------------------------------------------------------------------------------- entropy


def _entropy_stats(logits):
    zs, m, ls = _shifted(logits.astype(result_dtype(logits.dtype)))
    logp = zs - ls[..., None]
    return -jnp.sum(_xlogy_terms(jnp.exp(logp), logp), axis=-1), m, ls


@jax.custom_vjp
def dense_entropy(logits: jax.Array) -> jax.Array:
    """H = -sum_v p_v log p_v."""
    return _dense_entropy_fwd(logits)[0]


@_as_rows
def _entropy_forward(logits):
    zeros = jnp.zeros(logits.shape[:-1], result_dtype(logits.dtype))
    return _map_rows(_entropy_stats, [], [logits], [zeros, zeros, zeros])


def _dense_entropy_fwd(logits):
    ent, m, ls = _entropy_forward(logits)
    return ent, (logits, m, ls, ent)


@_as_rows
def _entropy_backward(logits, m, ls, ent, g):
    # dH/dz_k = -p_k (log p_k + H)
    def grad_rows(m, ls, ent, g, logits):
        logp = (logits.astype(ls.dtype) - m[..., None]) - ls[..., None]
        p = jnp.exp(logp)
        return (-g[..., None] * jnp.where(p > 0, p * (logp + ent[..., None]), 0.0),)

    return _map_rows(
        grad_rows, [m, ls, ent, g.astype(ls.dtype)], [logits], [jnp.zeros_like(logits)]
    )[0]


def _dense_entropy_bwd(res, g):
    logits, m, ls, ent = res
    return (_entropy_backward(logits, m, ls, ent, g),)


dense_entropy.defvjp(_dense_entropy_fwd, _dense_entropy_bwd)


# ---------------------------------------------------------------------------------------- KL


def _kl_stats(policy_logits, ref_logits):
    dt = result_dtype(policy_logits.dtype, ref_logits.dtype)
    zs, mz, lz = _shifted(policy_logits.astype(dt))
    rs, mr, lr = _shifted(ref_logits.astype(dt))
    logp_r = rs - lr[..., None]
    p_r = jnp.exp(logp_r)
    kl = jnp.sum(jnp.where(p_r > 0, p_r * (logp_r - (zs - lz[..., None])), 0.0), axis=-1)
    return kl, mz, lz, mr, lr


@jax.custom_vjp
def dense_kl(policy_logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
    """KL(ref || policy) = sum_v p_ref (log p_ref - log p_policy); gradient to the policy only."""
    return _dense_kl_fwd(policy_logits, ref_logits)[0]


@_as_rows
def _kl_forward(policy_logits, ref_logits):
    dt = result_dtype(policy_logits.dtype, ref_logits.dtype)
    zeros = jnp.zeros(policy_logits.shape[:-1], dt)
    return _map_rows(_kl_stats, [], [policy_logits, ref_logits], [zeros] * 5)


def _dense_kl_fwd(policy_logits, ref_logits):
    kl, *stats = _kl_forward(policy_logits, ref_logits)
    return kl, (policy_logits, ref_logits, tuple(stats))


@_as_rows
def _kl_backward(policy_logits, ref_logits, mz, lz, mr, lr, g):
    # dKL/dz = p_policy - p_ref; the reference side is a constant.
    def grad_rows(mz, lz, mr, lr, g, z, r):
        p_z = jnp.exp((z.astype(lz.dtype) - mz[..., None]) - lz[..., None])
        p_r = jnp.exp((r.astype(lz.dtype) - mr[..., None]) - lr[..., None])
        return (g[..., None] * (p_z - p_r),)

    return _map_rows(
        grad_rows,
        [mz, lz, mr, lr, g.astype(lz.dtype)],
        [policy_logits, ref_logits],
        [jnp.zeros_like(policy_logits)],
    )[0]


def _dense_kl_bwd(res, g):
    policy_logits, ref_logits, stats = res
    # None for the reference: a zero cotangent without a [B, T, V] buffer.
    return _kl_backward(policy_logits, ref_logits, *stats, g), None


dense_kl.defvjp(_dense_kl_fwd, _dense_kl_bwd)

__all__ = ["dense_logps", "dense_entropy", "dense_kl", "ROW_CHUNK_ELEMENTS"]
