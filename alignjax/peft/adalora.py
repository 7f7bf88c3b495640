"""AdaLoRA's SVD-form adapter layer (Zhang et al. 2023, arXiv:2303.10512; HF PEFT `SVDLinear`,
specs/peft.md section 3.2), in the Flax layout:

    y = x K + bias + ((dropout(x) a) * e) b * scaling / (ranknum + 1e-5)

with a (in, r) = PEFT lora_A^T (right singular vectors), e (r,) the singular values (PEFT stores
(r, 1)), b (r, out) = PEFT lora_B^T, scaling = alpha (or r when alpha <= 0) and ranknum = the
initial rank, which PEFT never changes (pruning only zeroes entries of e). The rank allocator
(budget schedule, importance scores, masking) is `adalora_allocator`; the orthogonal
regulariser is `adalora_allocator.orthogonal_regularizer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.projection import project
from alignjax.peft.base import AdapterLinear, AdapterParam


class AdaLoRA(AdapterLinear):
    """An AdaLoRA adapter around an `nnx.Linear`.

    Args:
      base: the layer to adapt.
      rank: the initial rank (PEFT's `init_r`, default 12 there).
      alpha: PEFT's lora_alpha (default 8 there); <= 0 means scaling = rank.
      dropout: dropout rate on the adapter input.
      init: "peft" (e = 0, a and b ~ N(0, 0.02^2)) or "random" (all three ~ N(0, 1), PEFT's
        `init_lora_weights=False`).
      rngs: for the initialisation and dropout.

    Example:
      >>> from flax import nnx
      >>> from alignjax.peft import AdaLoRA
      >>> layer = AdaLoRA(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=3, alpha=8, rngs=nnx.Rngs(1))
      >>> layer.lora_a.shape, layer.lora_e.shape, layer.lora_b.shape
      ((6, 3), (3,), (3, 4))
    """

    method = "adalora"

    def __init__(
        self,
        base: nnx.Linear,
        *,
        rank: int,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: str = "peft",
        rngs: nnx.Rngs,
    ):
        super().__init__(base)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"`rank` must be a positive int, got {rank!r}")
        if init not in ("peft", "random"):
            raise ValueError(f"`init` must be 'peft' or 'random', got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout}")
        n_in, n_out, dtype = self.in_features, self.out_features, base.kernel.dtype
        std = 0.02 if init == "peft" else 1.0
        self.rank, self.alpha = rank, float(alpha)
        self.ranknum = float(rank)
        self.scaling = float(alpha) if alpha > 0 else float(rank)
        self.lora_a = AdapterParam(std * jax.random.normal(rngs.params(), (n_in, rank), dtype))
        e = jnp.zeros((rank,), dtype)
        if init == "random":
            e = jax.random.normal(rngs.params(), (rank,), dtype)
        self.lora_e = AdapterParam(e)
        self.lora_b = AdapterParam(std * jax.random.normal(rngs.params(), (rank, n_out), dtype))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    @property
    def factor(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)

    def delta_kernel(self) -> jax.Array:
        return (self.lora_a[...] * self.lora_e[...]) @ self.lora_b[...] * self.factor

    def adapter_output(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype(x)
        xd = self.dropout(x).astype(dt)
        a, e, b = (v[...].astype(dt) for v in (self.lora_a, self.lora_e, self.lora_b))
        return project(project(xd, a) * e, b) * self.factor  # `project`: see lora.py

    def merged_kernel(self, kernel):
        return kernel + self.delta_kernel().astype(kernel.dtype)

    def unmerged_kernel(self, kernel):
        return kernel - self.delta_kernel().astype(kernel.dtype)
