"""Bone / Bat / MiSS-mini (Kang 2024, arXiv:2409.15371; HF PEFT `MissConfig`, formerly
`BoneConfig`) with PEFT's exact semantics (specs/peft.md section 2), in the Flax layout.

"bone" (PEFT's default, `init_weights=True`; the paper's Block-Affine Adaptation): one block
B (r, out) shared by every r-wide chunk of the (zero-padded) input:

    y = x K + bias + (sum_j pad(x)[..., j r:(j+1) r]) B,     K' = K + tile(B, (ceil(in/r), 1))[:in]

"bat" (PEFT's `init_weights="bat"`; the paper's Block Affine Transformation): B (out/r, r, r),
one r x r block per output block i, W'_ij = W_ij (I + B_i) + B_i on the torch weight. On the
Flax kernel K = W^T that is a LEFT multiplication: K'_ji = K_ji + B_i^T K_ji + B_i^T. Needs
in % r == out % r == 0. The forward rebuilds K' from the (detached) base kernel; unmerge is
K_ji = (I + B_i)^-T (K'_ji - B_i^T).

"mini" (MiSS): B (r, mini_r), tiled to (r, out) along the output axis, then as "bone".

Blocks are stored exactly as PEFT stores `miss_block` / `bone_block`, so checkpoints
interchange without conversion.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.projection import project
from alignjax.peft.base import AdapterLinear, AdapterParam

BONE_VARIANTS = ("bone", "bat", "mini")


def bone_delta(block: jax.Array, n_in: int) -> jax.Array:
    """The (in, out) kernel increment of "bone": tile(B, (ceil(in/r), 1))[:in]."""
    r = block.shape[0]
    return jnp.tile(block, (-(-n_in // r), 1))[:n_in]


def bat_kernel(kernel: jax.Array, block: jax.Array) -> jax.Array:
    """K' for "bat": K'_ji = K_ji + B_i^T K_ji + B_i^T on (in/r, out/r) blocks of K."""
    n_in, n_out = kernel.shape
    r = block.shape[-1]
    kb = kernel.reshape(n_in // r, r, n_out // r, r).transpose(0, 2, 1, 3)  # (j, i, r, r)
    bt = jnp.swapaxes(block, -1, -2)[None]  # (1, i, r, r)
    new = kb + bt @ kb + bt
    return new.transpose(0, 2, 1, 3).reshape(n_in, n_out)


def bat_unmerge(kernel: jax.Array, block: jax.Array) -> jax.Array:
    """The inverse of `bat_kernel`: K_ji = (I + B_i)^-T (K'_ji - B_i^T), inverted in float32
    or wider (PEFT inverts in float32)."""
    n_in, n_out = kernel.shape
    r = block.shape[-1]
    dt = jnp.promote_types(kernel.dtype, jnp.float32)
    kb = kernel.astype(dt).reshape(n_in // r, r, n_out // r, r).transpose(0, 2, 1, 3)
    bt = jnp.swapaxes(block.astype(dt), -1, -2)[None]
    inv_t = jnp.linalg.inv(jnp.eye(r, dtype=dt) + bt)  # (I + B^T)^-1 = (I + B)^-T
    return (inv_t @ (kb - bt)).transpose(0, 2, 1, 3).reshape(n_in, n_out).astype(kernel.dtype)


class Bone(AdapterLinear):
    """A Bone / Bat / MiSS-mini adapter around an `nnx.Linear`.

    Args:
      base: the layer to adapt.
      rank: the block size r (PEFT's `r`, default 64 there), not a LoRA rank.
      variant: "bat" (default: the paper's Block Affine Transformation), "bone" (PEFT's
        default shared block) or "mini".
      mini_r: the number of distinct output columns of the "mini" block.
      dropout: MiSS's dropout on the adapter input ("bone" and "mini").
      init: "zeros" (PEFT's default: the adapter starts as a no-op) or "random" (PEFT's
        `init_weights=False`: kaiming_uniform(a=sqrt 5), i.e. U(+-1/sqrt(fan_in)) with torch's
        fan_in = the block's last axis).
      rngs: for "random" init and dropout.

    Example:
      >>> from flax import nnx
      >>> from alignjax.peft import Bone
      >>> layer = Bone(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), rank=4, variant="bat", rngs=nnx.Rngs(1))
      >>> layer.block.shape  # (out // r, r, r), as PEFT's bone_block
      (1, 4, 4)
    """

    method = "bone"

    def __init__(
        self,
        base: nnx.Linear,
        *,
        rank: int,
        variant: str = "bat",
        mini_r: int = 1,
        dropout: float = 0.0,
        init: str = "zeros",
        rngs: nnx.Rngs,
    ):
        super().__init__(base)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"`rank` (the block size) must be a positive int, got {rank!r}")
        if variant not in BONE_VARIANTS:
            raise ValueError(f"`variant` must be one of {BONE_VARIANTS}, got {variant!r}")
        if init not in ("zeros", "random"):
            raise ValueError(f"`init` must be 'zeros' or 'random', got {init!r}")
        n_in, n_out = self.in_features, self.out_features
        if variant == "bat" and (n_in % rank or n_out % rank):
            raise ValueError(
                f"Bat needs in_features ({n_in}) and out_features ({n_out}) divisible by the "
                f"block size r={rank}: the weight matrix must be fully divisible into [r, r] blocks"
            )
        if variant != "bat" and rank > n_in:
            raise ValueError(f"`rank` {rank} exceeds in_features {n_in}")
        if variant == "mini" and (mini_r <= 0 or n_out % mini_r):
            raise ValueError(f"`mini_r` must divide out_features ({n_out}), got {mini_r}")
        self.rank, self.variant, self.mini_r = rank, variant, mini_r
        shape = {"bone": (rank, n_out), "bat": (n_out // rank, rank, rank), "mini": (rank, mini_r)}
        shape = shape[variant]
        dtype = base.kernel.dtype
        if init == "zeros":
            block = jnp.zeros(shape, dtype)
        else:
            bound = 1.0 / math.sqrt(shape[-1])
            block = jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)
        self.block = AdapterParam(block)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def _shared_block(self) -> jax.Array:
        block = self.block[...]
        if self.variant == "mini":
            block = jnp.tile(block, (1, self.out_features // self.mini_r))
        return block

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.variant != "bat" or self.merged or self.disabled:
            return super().__call__(x)
        base = self.base
        kernel = bat_kernel(jax.lax.stop_gradient(base.kernel[...]), self.block[...])
        dt = self.compute_dtype(x)
        y = project(x.astype(dt), kernel.astype(dt))  # `project`: see lora.py
        return y if base.bias is None else y + base.bias[...].astype(dt)

    def adapter_output(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype(x)
        r, n_in = self.rank, self.in_features
        xd = self.dropout(x).astype(dt)
        pad = (-n_in) % r
        if pad:
            xd = jnp.pad(xd, [(0, 0)] * (xd.ndim - 1) + [(0, pad)])
        chunks = xd.reshape(*xd.shape[:-1], (n_in + pad) // r, r).sum(axis=-2)
        return project(chunks, self._shared_block().astype(dt))

    def merged_kernel(self, kernel):
        if self.variant == "bat":
            return bat_kernel(kernel, self.block[...].astype(kernel.dtype))
        return kernel + bone_delta(self._shared_block(), self.in_features).astype(kernel.dtype)

    def unmerged_kernel(self, kernel):
        if self.variant == "bat":
            return bat_unmerge(kernel, self.block[...])
        return kernel - bone_delta(self._shared_block(), self.in_features).astype(kernel.dtype)
