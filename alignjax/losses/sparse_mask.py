"""SparsePO's learned token-mask head as a Flax NNX module (specs/losses.md section 5.2).

Official HEBO/SparsePO `mask_models.py`. Input: the *reference* model's hidden states of layers
1..L (embeddings excluded), aligned with the labels, without gradient. Variants:

  "all"  (SimpleMaskAllLayers): one shared LayerNorm; per layer g_l = Dropout(ReLU(LN(h_l) w_l
         + b_l)); mask = Dropout(ReLU(sum_l c_l g_l)) with a bias-free mixer c.
  "last" : the per-layer map on the last layer only, mask = Dropout(ReLU(LN(h_L) w + b)).
  "mlp"  (DoubleFFMaskAllLayers): per layer Dropout(ReLU(ff2(Dropout(ff1(LN(h_l)))))), ff1 of
         width 200 with no activation before ff2 (as in the official code); mixer, then ReLU (no
         dropout after the mixer there).

ReLU makes exact zeros: the learned sparsity that `losses.token.sparsity` reports.
`model.eval()` / `model.train()` switch dropout off / on.

Initialisation (`init`):
  "torch"  PyTorch's nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)): what the official
           module's constructor draws.
  "normal" what the official run actually trains from: the heads are submodules of the
           transformers model, whose `post_init` re-draws every Linear as N(0, 0.02) with zero
           biases (LayerNorm: scale 1, bias 0). At GPT-2-large's width that gives a mean initial
           mask of ~0.03; at a width of 64 and 2 layers, ~0.001.
  "scaled" "normal", but the last linear map (the mixer; the projection itself for "last") gets
           the standard deviation that makes the expected initial mask `init_mean` (default 0.03,
           the official magnitude) at this width and depth (`scaled_std`). The expectation is over
           initialisations: one head's mean mask varies around it, and a head whose output is 0 on
           every token (e.g. both mixer weights of a 2-layer head negative) is "dead": it passes no
           gradient and never trains (`dead_heads`).

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
import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.ops import completion_positions

VARIANTS = ("all", "last", "mlp")
INITS = ("torch", "normal", "scaled")
KINDS = ("learned", "ones", "random")
LAYOUTS = ("prenorm", "postnorm")
NORMAL_STD = 0.02  # transformers' initializer_range (GPT-2's default)


def torch_default_init(fan_in: int):
    """PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scaled_std(
    variant: str,
    num_layers: int,
    hidden_size: int,
    *,
    init_mean: float = 0.03,
    std: float = NORMAL_STD,
    mlp_width: int = 200,
) -> float:
    """Standard deviation of the head's last linear map that makes the expected initial mask
    `init_mean` (over initialisations, at any token) when every other weight is N(0, std) with
    zero biases.

    The shared LayerNorm (scale 1, bias 0) gives each token a vector x with |x|^2 = D, so a
    per-layer projection x . w, w ~ N(0, std^2), is N(0, s^2) with s = std sqrt(D), independent
    across layers (independent w_l). E[ReLU(N(0, s^2))] = s / sqrt(2 pi). "last": the mask is
    that ReLU, so the projection's std is init_mean sqrt(2 pi / D). Otherwise the mixer's
    c ~ N(0, sigma^2) gives, for per-layer outputs g, N(0, sigma^2 |g|^2), whose ReLU has mean
    sigma E|g| / sqrt(2 pi); |g| = s chi_k where k ~ Binomial(L, 1/2) layers are non-zero, so
    E|g| = s sum_k C(L, k) 2^-L E[chi_k], E[chi_k] = sqrt(2) G((k + 1) / 2) / G(k / 2). "mlp"
    (two maps, approximately Gaussian): s = std^2 sqrt(D W).
    """
    if init_mean <= 0 or std <= 0:
        raise ValueError(f"`init_mean` and `std` must be > 0, got {init_mean}, {std}")
    root_2pi = math.sqrt(2.0 * math.pi)
    if variant == "last":
        return init_mean * root_2pi / math.sqrt(hidden_size)
    s = (
        std * math.sqrt(hidden_size)
        if variant == "all"
        else std**2 * math.sqrt(hidden_size * mlp_width)
    )
    chi = sum(
        math.comb(num_layers, k)
        / 2.0**num_layers
        * math.sqrt(2.0)
        * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))
        for k in range(1, num_layers + 1)
    )
    return init_mean * root_2pi / (s * chi)


def _linear(n_in, n_out, *, use_bias=True, init="torch", std=NORMAL_STD, rngs):
    if init == "torch":
        kernel = bias = torch_default_init(n_in)
    else:
        kernel, bias = nnx.initializers.normal(std), nnx.initializers.zeros_init()
    return nnx.Linear(n_in, n_out, use_bias=use_bias, kernel_init=kernel, bias_init=bias,
                      rngs=rngs)  # fmt: skip


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
      init: "torch", "normal" or "scaled" (module docstring).
      init_mean: the expected initial mask of init="scaled".
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
        init: str = "torch",
        init_mean: float = 0.03,
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}, got {init!r}")
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(
                f"`num_layers` and `hidden_size` must be >= 1, got {num_layers}, {hidden_size}"
            )
        self.variant = variant
        self.num_layers = num_layers if variant != "last" else 1
        self.norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, rngs=rngs)
        n = self.num_layers
        last_std = NORMAL_STD
        if init == "scaled":
            last_std = scaled_std(variant, n, hidden_size, init_mean=init_mean, mlp_width=mlp_width)
        lin = functools.partial(_linear, init=init, rngs=rngs)
        proj_std = last_std if variant == "last" else NORMAL_STD
        if variant == "mlp":
            self.ff1 = nnx.List([lin(hidden_size, mlp_width) for _ in range(n)])
            self.ff2 = nnx.List([lin(mlp_width, 1) for _ in range(n)])
        else:
            self.proj = nnx.List([lin(hidden_size, 1, std=proj_std) for _ in range(n)])
        self.mixer = lin(n, 1, use_bias=False, std=last_std) if variant != "last" else None
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
    layer outputs (embeddings excluded), trained with the policy; or the controls.

    Attributes:
      independent: two heads, "reward" (m_u) and "kl" (m_d) ("sparse-indp"); False: the
        "reward" head serves both (the common mask).
      variant: the head variant (`VARIANTS`).
      kind: "learned" (the heads); "ones" (m = 1 on every token: SparsePO is then TDPO1
        exactly); "random" (a fixed random mask, U(0, 1) per token, no heads: a hash of the
        token's input embedding, its position in the completion and `random_seed`, so the same
        prefix token at the same position always gets the same weight). The official
        `mask_model="random"` draws fresh U(0, 1) noise at every forward instead.
      init: head initialisation, "torch" / "normal" / "scaled" (module docstring).
      init_mean: the expected initial mask of init="scaled" (the official magnitude, ~0.03).
      last_state: "prenorm" feeds the last layer's raw output (as `hidden_states` holds it);
        "postnorm" the state after the final norm, as the official GPT-2 pipeline does (its
        `hidden_states[-1]` is after `ln_f`).
      head_seed: the heads' seed (None: the run's seed + 2, as `heads(seed=...)` gives).
      random_seed: the seed of kind="random".
    """

    independent: bool = False
    variant: str = "all"
    kind: str = "learned"
    init: str = "torch"
    init_mean: float = 0.03
    last_state: str = "prenorm"
    head_seed: int | None = None
    random_seed: int = 0
    reads: ClassVar[str] = "hidden_states"

    def __post_init__(self):
        for name, allowed in (("variant", VARIANTS), ("kind", KINDS), ("init", INITS),
                              ("last_state", LAYOUTS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.init_mean > 0:
            raise ValueError(f"`init_mean` must be > 0, got {self.init_mean}")

    @property
    def head_names(self) -> tuple[str, ...]:
        return ("reward", "kl") if self.independent else ("reward",)

    @property
    def mask_names(self) -> tuple[str, ...]:
        return tuple(f"{n}_mask" for n in self.head_names)

    def configure(self, **options) -> SparsePOMasks:
        return configure(self, options)

    def heads(self, config, *, seed: int) -> dict:
        """One `SparseMaskHead` per head name, dropout off (the step carries no dropout rng);
        {} for kind "ones" / "random"."""
        if self.kind != "learned":
            return {}
        seed = seed if self.head_seed is None else self.head_seed
        return {
            name: SparseMaskHead(
                config.num_hidden_layers,
                config.hidden_size,
                variant=self.variant,
                dropout=0.0,
                init=self.init,
                init_mean=self.init_mean,
                rngs=nnx.Rngs(seed + k),
            )
            for k, name in enumerate(self.head_names)
        }

    def head_inputs(self, reference_output) -> jax.Array:
        """`[L, R, T, D]`: the reference's layer outputs the heads read (no gradient)."""
        hidden = list(reference_output.hidden_states[1:])
        if self.last_state == "postnorm":
            hidden[-1] = reference_output.last_hidden_state
        return jnp.stack(hidden)

    def masks(self, heads, reference_output, loss_mask) -> dict:
        if self.kind == "ones":
            one = jnp.ones(loss_mask.shape, jnp.float32)
            return {name: one for name in self.mask_names}
        if self.kind == "random":
            emb = reference_output.hidden_states[0]
            return {name: fixed_random_mask(emb, loss_mask, seed=self.random_seed + k)
                    for k, name in enumerate(self.mask_names)}  # fmt: skip
        if heads is None:
            raise ValueError(f"the state has no heads; SparsePO needs {self.head_names} "
                             "(init_state(..., heads=provider.heads(...)))")  # fmt: skip
        missing = [n for n in self.head_names if not hasattr(heads, n)]
        if missing:
            raise ValueError(f"SparsePO needs heads {self.head_names}; the state lacks {missing}")
        hidden = self.head_inputs(reference_output)
        return {f"{n}_mask": getattr(heads, n)(hidden) for n in self.head_names}


def fixed_random_mask(embeddings: jax.Array, loss_mask: jax.Array, *, seed: int) -> jax.Array:
    """U(0, 1) weights `[R, T]`, a fixed function of each position's input embedding (its float
    bits: exact, the embedding is a table lookup), its position in the completion and `seed`:
    random with respect to the preference, the same whenever the same token follows the same
    number of completion tokens. 0 outside the completion."""
    bits = jax.lax.bitcast_convert_type(embeddings[..., :2].astype(jnp.float32), jnp.uint32)
    pos = completion_positions(loss_mask).astype(jnp.uint32)
    h = bits[..., 0] * jnp.uint32(0x9E3779B1) ^ bits[..., 1] ^ pos * jnp.uint32(0x85EBCA77)
    h = h ^ jnp.uint32(seed & 0xFFFFFFFF) * jnp.uint32(0xC2B2AE3D)
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):  # a 32-bit finaliser
        h = h ^ (h >> jnp.uint32(shift))
        if mul is not None:
            h = h * jnp.uint32(mul)
    u = (h >> jnp.uint32(8)).astype(jnp.float32) / jnp.float32(1 << 24)
    return jnp.where(loss_mask != 0, u, 0.0)


def dead_heads(heads: dict, hidden_states: jax.Array, loss_mask: jax.Array) -> dict:
    """name -> True where a head's mask is exactly 0 on every completion token of
    `hidden_states` (`[L, R, T, D]`, e.g. `SparsePOMasks.head_inputs`): such a head passes no
    gradient to itself or to the policy's log-ratios, so nothing it weights ever trains."""
    keep = jnp.asarray(loss_mask) != 0
    return {name: bool(jnp.all(jnp.where(keep, head(hidden_states), 0.0) == 0))
            for name, head in heads.items()}  # fmt: skip


def configure(provider, options: dict):
    """`dataclasses.replace(provider, **options)`, naming an option the provider lacks."""
    fields = [f.name for f in dataclasses.fields(provider)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"mask option {unknown[0]!r} does not apply to "
                         f"{type(provider).__name__}; its options: {fields}")  # fmt: skip
    return dataclasses.replace(provider, **options)
