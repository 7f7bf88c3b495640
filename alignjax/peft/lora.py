"""LoRA (Hu et al. 2021, arXiv:2106.09685) and DoRA (Liu et al. 2024, arXiv:2402.09353) with HF
PEFT's exact semantics (specs/peft.md section 1), in the Flax layout.

    y = x K + bias + s * dropout(x) a b,   a (in, r) = PEFT lora_A.weight^T,
                                            b (r, out) = PEFT lora_B.weight^T,
    s = alpha / r  (rsLoRA: alpha / sqrt(r)).

Merge: K += s a b (and bias += s * lora_bias with `lora_bias=True`); unmerge subtracts it.

DoRA (`use_dora=True`) adds a magnitude m (out,), initialised to the column norms of K (the
norms of the torch rows), and computes, with x_d = dropout(x) and n = ||K + s a b||_col
detached (paper section 4.3):

    y = x K + bias + (m / n - 1) * (x_d K) + (m / n) * s * x_d a b

Merge: K <- (m / n) (K + s a b); unmerge uses the norm cached at merge time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.projection import project
from alignjax.peft.base import AdapterLinear, AdapterParam, AdapterState, check_positive

LORA_INITS = ("peft", "gaussian", "he_uniform", "pissa", "none")


class LoRA(AdapterLinear):
    """A LoRA (or DoRA) adapter around an `nnx.Linear`.

    Args:
      base: the layer to adapt.
      rank: r > 0.
      alpha: PEFT's lora_alpha; default `rank` (scale 1, which PEFT's defaults r=8, alpha=8
        also give).
      dropout: dropout rate on the adapter's input.
      use_rslora: scale alpha / sqrt(r) instead of alpha / r.
      use_dora: add DoRA's magnitude vector.
      lora_bias: a trainable bias on the B factor (PEFT `lora_bias`), zero-initialised.
      init: "peft" (A ~ U(+-1/sqrt(in)), i.e. kaiming_uniform(a=sqrt 5); B = 0), "gaussian"
        (A ~ N(0, 1/r^2), B = 0), "he_uniform" (nnx.LoRA's A init, B = 0), "pissa" (the top-r
        SVD of the base kernel moved into the adapter, the residual left in the base), or
        "none" (both factors random, PEFT's `init_lora_weights=False`, for debugging).
      rngs: for the initialisation and dropout.

    Example:
      >>> from flax import nnx
      >>> from alignjax.peft import LoRA
      >>> layer = LoRA(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=2, alpha=4, rngs=nnx.Rngs(1))
      >>> layer(jnp.ones((3, 6))).shape
      (3, 4)
    """

    method = "lora"

    def __init__(
        self,
        base: nnx.Linear,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        init: str = "peft",
        rngs: nnx.Rngs,
    ):
        super().__init__(base)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"`rank` must be a positive int, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        check_positive("alpha", alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout}")
        if init not in LORA_INITS:
            raise ValueError(f"`init` must be one of {LORA_INITS}, got {init!r}")
        self.rank, self.alpha, self.use_rslora, self.use_dora = rank, alpha, use_rslora, use_dora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        n_in, n_out = self.in_features, self.out_features
        dtype = base.kernel.dtype
        k_a, k_b = rngs.params(), rngs.params()
        if init == "gaussian":
            a = jax.random.normal(k_a, (n_in, rank), dtype) / rank
        elif init == "he_uniform":
            a = jax.nn.initializers.he_uniform()(k_a, (n_in, rank), dtype)
        else:  # peft / none: torch's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
            a = jax.random.uniform(k_a, (n_in, rank), dtype, -1.0, 1.0) / math.sqrt(n_in)
        b = jnp.zeros((rank, n_out), dtype)
        if init == "none":
            b = jax.random.uniform(k_b, (rank, n_out), dtype, -1.0, 1.0) / math.sqrt(rank)
        if init == "pissa":
            a, b = self._pissa(base)
        self.lora_a = AdapterParam(a)
        self.lora_b = AdapterParam(b)
        self.lora_bias = AdapterParam(jnp.zeros((n_out,), dtype)) if lora_bias else None
        if lora_bias and base.bias is None:
            raise ValueError("`lora_bias=True` needs a base layer with a bias")
        if lora_bias and use_dora:
            raise ValueError("`lora_bias` is not supported with DoRA (as in PEFT)")
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        if use_dora:
            self.magnitude = AdapterParam(self._column_norm(base.kernel[...]))
            self.merge_norm = AdapterState(jnp.ones((n_out,), dtype))

    def _pissa(self, base):
        """PEFT's `pissa_init` in the Flax layout: K^T = W = V S U^T; a = U_r sqrt(S_r / s),
        b = sqrt(S_r / s) V_r^T, base kernel <- K - s a b."""
        kernel = base.kernel[...]
        v, s, ut = jnp.linalg.svd(kernel.T, full_matrices=False)
        root = jnp.sqrt(s[: self.rank] / self.scaling)
        a = ut[: self.rank].T * root
        b = root[:, None] * v[:, : self.rank].T
        base.kernel[...] = (kernel - self.scaling * a @ b).astype(kernel.dtype)
        return a.astype(kernel.dtype), b.astype(kernel.dtype)

    @staticmethod
    def _column_norm(k):
        return jnp.linalg.norm(k, axis=0)

    def delta_kernel(self) -> jax.Array:
        return self.scaling * self.lora_a[...] @ self.lora_b[...]

    def adapter_output(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype(x)
        xd = self.dropout(x).astype(dt)
        a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
        # Through `project`: on CPU the weight gradients of these thin products contract the
        # token axis, and XLA:CPU then transposes the narrow operand ([N, rank]) instead of the
        # wide cotangent (alignjax/models/projection.py).
        out = self.scaling * project(project(xd, a), b)
        if self.lora_bias is not None:
            out = out + self.scaling * self.lora_bias[...].astype(dt)
        if not self.use_dora:
            return out
        kernel = self.base.kernel[...].astype(dt)
        delta = jax.lax.stop_gradient(self.delta_kernel()).astype(dt)
        norm = jax.lax.stop_gradient(self._column_norm(kernel + delta))
        ratio = self.magnitude[...].astype(dt) / norm
        return (ratio - 1.0) * project(xd, kernel) + ratio * out

    def merged_kernel(self, kernel):
        merged = kernel + self.delta_kernel().astype(kernel.dtype)
        if not self.use_dora:
            return merged
        self.merge_norm[...] = self._column_norm(merged)
        return merged * (self.magnitude[...] / self.merge_norm[...])

    def unmerged_kernel(self, kernel):
        if self.use_dora:
            kernel = kernel / (self.magnitude[...] / self.merge_norm[...])
        return kernel - self.delta_kernel().astype(kernel.dtype)

    def merged_bias(self, bias):
        return bias if self.lora_bias is None else bias + self.scaling * self.lora_bias[...]

    def unmerged_bias(self, bias):
        return bias if self.lora_bias is None else bias - self.scaling * self.lora_bias[...]
