"""JAX's shipped Pallas TPU attention kernels behind `LlamaConfig.attention_implementation`:

- "pallas_splash": splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`):
  block-sparse over a static causal (or causal sliding-window, `LocalMask`) mask, with
  grouped-query heads served natively (its MQA kernel per key/value head, no repeated K/V);
- "pallas_flash": the older flash attention kernel (`...ops.tpu.flash_attention`): causal, no
  grouped-query heads (K/V are repeated to the query heads), no sliding window.

Both take padding and packed rows through the kernels' segment ids: real tokens keep their
segment (0 for unpacked rows), and every padding token gets an id of its own, so that no real
token sees it and it sees only itself. Each row of a real token therefore equals the dense path
(`attention_mask_4d`); a padding row differs where the dense mask lets it see earlier real
tokens (right padding), which no real token ever reads. T is padded to a multiple of the kernels'
128-token blocks internally.

They run on TPU only: `attention` raises a ValueError on any other backend. The tests run them on
CPU in Pallas' TPU interpret mode (`interpret=True`, which JAX 0.10 supports for both kernels),
against the dense path on causal, padded, packed and sliding-window masks, values and
gradients; nothing here has run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["PALLAS_IMPLEMENTATIONS", "pallas_attention"]

PALLAS_IMPLEMENTATIONS = ("pallas_splash", "pallas_flash")
BLOCK = 128  # the kernels' default tile: q, k/v blocks and (splash) lane-aligned compute blocks


def _segments(length: int, padded: int, key_valid, segment_ids, batch: int) -> jax.Array:
    """[B, padded] int32 ids: real tokens keep theirs (0 without packing), each padding token
    (and each slot added to reach `padded`) gets its own id below every real one."""
    ids = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
    ids = jnp.asarray(ids, jnp.int32)
    valid = jnp.ones((batch, length), bool) if key_valid is None else key_valid.astype(bool)
    extra = padded - length
    ids = jnp.pad(ids, ((0, 0), (0, extra)))
    valid = jnp.pad(valid, ((0, 0), (0, extra)))
    own = jnp.min(ids) - 1 - jnp.arange(padded, dtype=jnp.int32)
    return jnp.where(valid, ids, own[None])


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, group: int, window: int | None, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    if window is None:
        head = sa.CausalMask(shape)
    else:  # q - (window - 1) <= k <= q: the causal window of `window` keys
        head = sa.LocalMask(shape, (window - 1, 0), 0)
    sizes = sa.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = sa.MultiHeadMask([head] * group)
    # Concrete mask tables even when first built inside a trace: the kernel is cached.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, ids, window, block, interpret):
    """q [B, KV, G, Tp, d] (scaled), k and v [B, KV, Tp, d], ids [B, Tp]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, _, group, length, _ = q.shape
    kernel = _splash_kernel(length, group, window, block, interpret)

    def one_head(qh, kh, vh, s):
        return kernel(qh, kh, vh, segment_ids=SegmentIds(s, s))

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # key/value heads
    return jax.vmap(per_row)(q, k, v, ids)


def _flash(q, k, v, ids, block, interpret):
    """q, k, v [B, H, Tp, d] (K/V already repeated), ids [B, Tp]."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    sizes = fa.BlockSizes(
        block_q=block, block_k_major=block, block_k=block, block_b=1,
        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
        block_k_major_dq=block, block_k_dq=block, block_q_dq=block,
    )  # fmt: skip
    kw = dict(causal=True, sm_scale=q.shape[-1] ** -0.5, block_sizes=sizes)

    def run(q, k, v, ids):
        return fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(ids, ids), **kw)

    return (_interpreted(run) if interpret else run)(q, k, v, ids)


def _interpreted(fn):
    """`fn` with its forward and backward pass traced under Pallas' TPU interpret mode. The
    flash kernel takes no `interpret` argument, and its backward kernels are traced when the
    gradient is, outside any context the forward call opened."""
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def run(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def forward(*args):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(fn, *args)  # (out, vjp): the vjp is a pytree of residuals

    def backward(vjp, cotangent):
        with pltpu.force_tpu_interpret_mode():
            return vjp(cotangent)

    run.defvjp(forward, backward)
    return run


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    kernel: str = "pallas_splash",
    interpret: bool = False,
    block: int = BLOCK,
) -> jax.Array:
    """Causal self-attention through a Pallas TPU kernel (module docstring).

    Args:
      q: [B, T, H, d] queries; k, v: [B, T, KV, d] keys and values (H a multiple of KV).
      key_valid: [B, T] booleans, True on real tokens (None: all).
      segment_ids: [B, T] int ids >= 0 of the sequences packed in a row (None: one per row).
      window: causal sliding window (key j visible to query i iff i - window < j <= i), as
        Mistral's `sliding_window`; "pallas_splash" only.
      kernel: "pallas_splash" or "pallas_flash".
      interpret: run the kernel in Pallas' TPU interpret mode (any backend; for tests).
      block: the kernels' tile (a multiple of 128).

    Returns:
      [B, T, H, d] in q's dtype. Rows of padding tokens: see the module docstring.

    Raises:
      ValueError: an unknown kernel, a window with "pallas_flash", or (without `interpret`)
        a backend other than TPU.

    Example (in interpret mode, which runs on any backend):
      >>> q = jnp.ones((1, 5, 4, 8)); kv = jnp.ones((1, 5, 2, 8))
      >>> pallas_attention(q, kv, kv, window=3, interpret=True).shape
      (1, 5, 4, 8)
    """
    if kernel not in PALLAS_IMPLEMENTATIONS:
        raise ValueError(f"`kernel` must be one of {PALLAS_IMPLEMENTATIONS}, got {kernel!r}")
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(
            f'attention_implementation="{kernel}" runs JAX\'s Pallas TPU kernels and needs a '
            f'TPU; the backend is {jax.default_backend()!r}. Use "blockwise" (any backend) or '
            '"cudnn" (NVIDIA GPUs).'
        )
    b, t, heads, d = q.shape
    kvh = k.shape[2]
    if heads % kvh:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kvh})")
    if window is not None and kernel == "pallas_flash" and window < t:
        raise ValueError(
            f'"pallas_flash" has no sliding window (window {window} < {t} tokens); use '
            '"pallas_splash"'
        )
    group = heads // kvh
    tp = -(-t // block) * block
    ids = _segments(t, tp, key_valid, segment_ids, b)

    def pad(x):  # [B, T, n, d] -> [B, n, Tp, d]
        return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    if kernel == "pallas_flash":
        rep = (jnp.repeat(x, group, axis=2) for x in (k, v))
        out = _flash(pad(q), *(pad(x) for x in rep), ids, block, interpret)
    else:
        scaled = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
        q5 = pad(scaled).reshape(b, kvh, group, tp, d)
        win = None if window is None or window >= tp else window
        out = _splash(q5, pad(k), pad(v), ids, win, block, interpret).reshape(b, heads, tp, d)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)
