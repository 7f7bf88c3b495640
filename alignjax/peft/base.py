"""Adapter variable types and the shared adapter-layer base class.

Adapters are NNX Variables of the type `AdapterParam` (a subclass of `nnx.LoRAParam`), so
`nnx.state(model, AdapterParam)` is the adapter-only state, `nnx.Optimizer(model, tx,
wrt=AdapterParam)` trains only adapters, and tools that filter on `nnx.LoRAParam` (Tunix,
qwix-style trainers) see them too.

Every adapter layer wraps the original `nnx.Linear` as its child `base` (kernel `(in, out)`,
optional bias), so the base forward pass is the user's own layer, unchanged, and removing the
adapter gives that layer back. An adapter layer is in one of three modes: active (base +
adapter), merged (the adapter folded into `base.kernel`; the forward is the base layer's), or
disabled (the base forward alone, see `inject.adapters_disabled`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """A trainable adapter parameter (LoRA factors, Bone blocks, AdaLoRA triplets, DoRA
    magnitudes)."""


class AdapterState(nnx.Variable):
    """Non-trainable adapter bookkeeping (e.g. DoRA's column norm cached at merge time)."""


def check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}")


class AdapterLinear(nnx.Module):
    """Base class: `base` is the wrapped `nnx.Linear`; subclasses implement `adapter_output`
    (what the adapter adds to the base output) or override `__call__`, and `merged_kernel` /
    `unmerged_kernel` (the kernel with the adapter folded in, and its exact inverse)."""

    method: str = "adapter"

    def __init__(self, base: nnx.Linear):
        if not isinstance(base, nnx.Linear):
            raise TypeError(f"adapters wrap an nnx.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.merged = False
        self.disabled = False

    # -- subclass interface ---------------------------------------------------------------
    def adapter_output(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def merged_kernel(self, kernel: jax.Array) -> jax.Array:
        raise NotImplementedError

    def unmerged_kernel(self, kernel: jax.Array) -> jax.Array:
        raise NotImplementedError

    def merged_bias(self, bias):
        return bias

    def unmerged_bias(self, bias):
        return bias

    # -- shared behaviour ---------------------------------------------------------------
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        return y + self.adapter_output(x).astype(y.dtype)

    def merge(self) -> None:
        """Fold the adapter into `base.kernel` (and bias); the forward becomes the base's."""
        if self.merged:
            raise ValueError(f"{type(self).__name__} is already merged")
        kernel = self.base.kernel[...]
        self.base.kernel[...] = self.merged_kernel(kernel).astype(kernel.dtype)
        if self.base.bias is not None:
            bias = self.base.bias[...]
            self.base.bias[...] = self.merged_bias(bias).astype(bias.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """The exact inverse of `merge` (up to rounding)."""
        if not self.merged:
            raise ValueError(f"{type(self).__name__} is not merged")
        kernel = self.base.kernel[...]
        self.base.kernel[...] = self.unmerged_kernel(kernel).astype(kernel.dtype)
        if self.base.bias is not None:
            bias = self.base.bias[...]
            self.base.bias[...] = self.unmerged_bias(bias).astype(bias.dtype)
        self.merged = False

    def compute_dtype(self, x: jax.Array):
        """The base layer's compute dtype (its `dtype`, else x and kernel promoted)."""
        if self.base.dtype is not None:
            return self.base.dtype
        return jnp.result_type(x.dtype, self.base.kernel.dtype)
