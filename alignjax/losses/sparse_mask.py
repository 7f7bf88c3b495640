"""SparsePO's learned token-mask head as a Flax NNX module (specs/losses.md section 5.2).

Official HEBO/SparsePO `mask_models.py`. Input: the *reference* model's hidden states of layers
1..L (embeddings excluded), aligned with the labels, without gradient. Variants:

  "all"  (SimpleMaskAllLayers): one shared LayerNorm; per layer g_l = Dropout(ReLU(LN(h_l) w_l
         + b_l)); mask = Dropout(ReLU(sum_l c_l g_l)) with a bias-free mixer c.
  "last" : the per-layer map on the last layer only, mask = Dropout(ReLU(LN(h_L) w + b)).
  "mlp"  (DoubleFFMaskAllLayers): per layer Dropout(ReLU(ff2(Dropout(ff1(LN(h_l)))))), ff1 of
         width 200 with no activation before ff2 (as in the official code); mixer, then ReLU (no
         dropout after the mixer there).

ReLU makes exact zeros: the learned sparsity that `losses.token.sparsity` reports. Linear layers
use PyTorch's default initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the official head.
`model.eval()` / `model.train()` switch dropout off / on.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from alignjax.losses.sparse_mask import SparseMaskHead
    >>> head = SparseMaskHead(num_layers=2, hidden_size=8, rngs=nnx.Rngs(0))
    >>> head(jnp.ones((2, 3, 5, 8))).shape   # [L, B, T, D] -> [B, T]
    (3, 5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

VARIANTS = ("all", "last", "mlp")


def torch_default_init(fan_in: int):
    """PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(n_in, n_out, *, use_bias=True, rngs):
    init = torch_default_init(n_in)
    return nnx.Linear(n_in, n_out, use_bias=use_bias, kernel_init=init, bias_init=init, rngs=rngs)


class SparseMaskHead(nnx.Module):
    """Token mask m >= 0 `[B, T]` from per-layer hidden states `[L, B, T, D]`.

    Args:
      num_layers: L, the number of hidden layers fed in (the model's layers, embeddings excluded).
      hidden_size: D.
      variant: "all" (the paper's SparsePO head), "last" or "mlp".
      dropout: dropout rate of the per-layer and mixer outputs (official default 0.01 via
        `mask_dropout`); "mlp" uses it for all its dropouts.
      mlp_width: hidden width of the "mlp" variant (official: 200).
      layer_norm_eps: epsilon of the shared LayerNorm (the reference model's).
      rngs: `nnx.Rngs` with "params" and "dropout" streams.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        *,
        variant: str = "all",
        dropout: float = 0.01,
        mlp_width: int = 200,
        layer_norm_eps: float = 1e-5,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(
                f"`num_layers` and `hidden_size` must be >= 1, got {num_layers}, {hidden_size}"
            )
        self.variant = variant
        self.num_layers = num_layers if variant != "last" else 1
        self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, rngs=rngs)
        n = self.num_layers
        if variant == "mlp":
            self.ff1 = nnx.List([_linear(hidden_size, mlp_width, rngs=rngs) for _ in range(n)])
            self.ff2 = nnx.List([_linear(mlp_width, 1, rngs=rngs) for _ in range(n)])
        else:
            self.proj = nnx.List([_linear(hidden_size, 1, rngs=rngs) for _ in range(n)])
        self.mixer = _linear(n, 1, use_bias=False, rngs=rngs) if variant != "last" else None
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, hidden_states: jax.Array | Sequence[jax.Array]) -> jax.Array:
        if isinstance(hidden_states, (list, tuple)):
            hidden_states = jnp.stack(hidden_states)
        h = jnp.asarray(hidden_states)
        if h.ndim != 4:
            raise ValueError(f"`hidden_states` must be [L, B, T, D], got shape {h.shape}")
        if self.variant == "last":
            h = h[-1:]
        if h.shape[0] != self.num_layers:
            raise ValueError(
                f"`hidden_states` has {h.shape[0]} layers, the head was built for {self.num_layers}"
            )
        h = jax.lax.stop_gradient(h)  # the reference model's states: no gradient into it
        per_layer = []
        for i in range(self.num_layers):
            x = self.norm(h[i])
            if self.variant == "mlp":
                x = self.ff2[i](self.drop(self.ff1[i](x)))
            else:
                x = self.proj[i](x)
            per_layer.append(self.drop(jax.nn.relu(x))[..., 0])
        if self.variant == "last":
            return per_layer[0]
        mixed = self.mixer(jnp.stack(per_layer, axis=-1))[..., 0]
        mixed = jax.nn.relu(mixed)
        return mixed if self.variant == "mlp" else self.drop(mixed)


@dataclasses.dataclass(frozen=True)
class SparsePOMasks:
    """SparsePO's mask provider (`losses.needs.MaskProvider`): learned heads on the reference's
    layer outputs (embeddings excluded), trained with the policy.

    Attributes:
      independent: two heads, "reward" (m_u) and "kl" (m_d) ("sparse-indp"); False: the
        "reward" head serves both (the common mask).
      variant: the head variant (`VARIANTS`).
    """

    independent: bool = False
    variant: str = "all"
    reads: ClassVar[str] = "hidden_states"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def head_names(self) -> tuple[str, ...]:
        return ("reward", "kl") if self.independent else ("reward",)

    @property
    def mask_names(self) -> tuple[str, ...]:
        return tuple(f"{n}_mask" for n in self.head_names)

    def configure(self, **options) -> SparsePOMasks:
        return configure(self, options)

    def heads(self, config, *, seed: int) -> dict:
        """One `SparseMaskHead` per head name, dropout off (the step carries no dropout rng)."""
        return {
            name: SparseMaskHead(
                config.num_hidden_layers,
                config.hidden_size,
                variant=self.variant,
                dropout=0.0,
                rngs=nnx.Rngs(seed + k),
            )
            for k, name in enumerate(self.head_names)
        }

    def masks(self, heads, reference_output, loss_mask) -> dict:
        if heads is None:
            raise ValueError(f"the state has no heads; SparsePO needs {self.head_names} "
                             "(init_state(..., heads=provider.heads(...)))")  # fmt: skip
        missing = [n for n in self.head_names if not hasattr(heads, n)]
        if missing:
            raise ValueError(f"SparsePO needs heads {self.head_names}; the state lacks {missing}")
        hidden = jnp.stack(reference_output.hidden_states[1:])  # [L, R, T, D], no gradient
        return {f"{n}_mask": getattr(heads, n)(hidden) for n in self.head_names}


def configure(provider, options: dict):
    """`dataclasses.replace(provider, **options)`, naming an option the provider lacks."""
    fields = [f.name for f in dataclasses.fields(provider)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"mask option {unknown[0]!r} does not apply to "
                         f"{type(provider).__name__}; its options: {fields}")  # fmt: skip
    return dataclasses.replace(provider, **options)
