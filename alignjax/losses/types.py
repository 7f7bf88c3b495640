"""The pytrees every loss reads and returns.

`PreferenceBatch` carries per-token policy (and reference) log-probs of a paired batch with their
completion masks; sequence sums, lengths and averages are derived from it, so IPO, SimPO,
LD-DPO, WPO and token-level losses all read the same structure. Optional fields: per-token
KL(ref || policy) (TDPO, SparsePO), WPO's per-token log sum_v p_v^2, SPPO win probabilities.

`LossOutput` keeps each loss term unreduced, as a (total, count) pair with its weight, so that
averages over micro-batches and devices are exact: sum totals and counts first (psum), divide
last. `loss` is sum_k weight_k * total_k / count_k.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from alignjax.ops import _checks as C
from alignjax.ops import sequence_sum


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferenceBatch:
    """Per-token log-probs of B preference pairs.

    Attributes:
      chosen_logps, rejected_logps: `[B, T]` policy log-probs of the completion tokens (values
        off the mask are ignored).
      chosen_mask, rejected_mask: `[B, T]` 0/1 completion masks.
      ref_chosen_logps, ref_rejected_logps: reference log-probs, `[B, T]` per token or `[B]`
        precomputed sequence sums (used as given, e.g. already LD-weighted); None for
        reference-free losses.
      chosen_kl, rejected_kl: optional `[B, T]` per-token KL(ref || policy).
      chosen_log_sum_sq, rejected_log_sum_sq: optional `[B, T]` log sum_v p_v^2 (WPO).
      chosen_win_prob, rejected_win_prob, win_prob: optional `[B]` SPPO probabilities.
      chosen_reward_mask, rejected_reward_mask: optional `[B, T]` token weights m_u >= 0 on the
        log-ratios (SparsePO's reward mask, MaPO's activation mask).
      chosen_kl_mask, rejected_kl_mask: optional `[B, T]` token weights m_d >= 0 on the KL
        terms (SparsePO's independent KL mask; the reward mask is used when absent).
      score_chosen, score_rejected: optional `[B]` scores the dataset gives each response
        (UltraFeedback's `score_chosen` / `score_rejected`), for losses that use them as
        margins or weights; no built-in loss reads them.
    """

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    chosen_mask: jax.Array
    rejected_mask: jax.Array
    ref_chosen_logps: jax.Array | None = None
    ref_rejected_logps: jax.Array | None = None
    chosen_kl: jax.Array | None = None
    rejected_kl: jax.Array | None = None
    chosen_log_sum_sq: jax.Array | None = None
    rejected_log_sum_sq: jax.Array | None = None
    chosen_win_prob: jax.Array | None = None
    rejected_win_prob: jax.Array | None = None
    win_prob: jax.Array | None = None
    chosen_reward_mask: jax.Array | None = None
    rejected_reward_mask: jax.Array | None = None
    chosen_kl_mask: jax.Array | None = None
    rejected_kl_mask: jax.Array | None = None
    score_chosen: jax.Array | None = None
    score_rejected: jax.Array | None = None

    def __post_init__(self):
        c = self.chosen_logps
        if not hasattr(c, "shape"):
            return  # JAX rebuilding the pytree with placeholder leaves: nothing to validate
        # Leading axes (a device axis for pmap, a micro-batch axis) are allowed: [..., B, T].
        if len(c.shape) < 2:
            raise ValueError(f"`chosen_logps` must be [B, T], got {tuple(c.shape)}")
        shape = tuple(c.shape)
        for name in (
            "rejected_logps",
            "chosen_mask",
            "rejected_mask",
            "chosen_kl",
            "rejected_kl",
            "chosen_log_sum_sq",
            "rejected_log_sum_sq",
        ):
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape) != shape:
                raise ValueError(
                    f"`{name}` must have shape {shape} like `chosen_logps`, got {tuple(v.shape)}"
                )
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape) not in (shape, shape[:-1]):
                raise ValueError(
                    f"`{name}` must be [B, T] {shape} or [B] {shape[:-1]}, got {tuple(v.shape)}"
                )
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            raise ValueError("give both `ref_chosen_logps` and `ref_rejected_logps`, or neither")
        for name in (
            "chosen_win_prob",
            "rejected_win_prob",
            "win_prob",
            "score_chosen",
            "score_rejected",
        ):
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape) != shape[:-1]:
                raise ValueError(f"`{name}` must be [B] {shape[:-1]}, got {tuple(v.shape)}")

    @classmethod
    def from_stacked(cls, logps, mask, ref_logps=None, **fields) -> PreferenceBatch:
        """Split `[chosen; rejected]`-stacked `[2B, T]` arrays (one forward pass) into a batch.

        `fields` may hold further stacked `[2B, ...]` arrays by their base name (`kl`,
        `log_sum_sq`) or `[B]` arrays by their full name (`win_prob`, ...).
        """
        n = logps.shape[0]
        if n % 2:
            raise ValueError(f"`logps` must stack [chosen; rejected] rows, got {n} rows (odd)")
        h = n // 2
        kw = dict(
            chosen_logps=logps[:h],
            rejected_logps=logps[h:],
            chosen_mask=mask[:h],
            rejected_mask=mask[h:],
        )
        if ref_logps is not None:
            kw.update(ref_chosen_logps=ref_logps[:h], ref_rejected_logps=ref_logps[h:])
        for key, value in fields.items():
            if key in ("kl", "log_sum_sq", "reward_mask", "kl_mask"):
                kw[f"chosen_{key}"], kw[f"rejected_{key}"] = value[:h], value[h:]
            else:
                kw[key] = value
        return cls(**kw)

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t values over the mask, float32 at least; `[B]` inputs are taken as sums already.

    `ops.sequence_sum` (the one masked-sum kernel: float32 / float64 accumulation, `mask != 0`
    as a selector, 0 for an empty row, shape and dtype checks) plus the losses' one rule: a 1-D
    `values` is a precomputed sequence sum (`ref_chosen_logps` given as `[B]`), returned as is
    (promoted like a sum) and `mask` unused."""
    values = C.as_array("values", values)
    if values.ndim == 1:
        return values.astype(C.result_dtype(values.dtype))
    return sequence_sum(values, mask)


def lengths(mask: jax.Array) -> jax.Array:
    """Completion lengths clamped at 1 (TRL's convention for averages of empty completions)."""
    return jnp.maximum(jnp.sum(mask != 0, axis=-1), 1).astype(jnp.float32)


class LossTerm(NamedTuple):
    """One additive loss term: weight * total / count, kept unreduced for exact averaging."""

    total: jax.Array
    count: jax.Array
    weight: float = 1.0

    @property
    def value(self) -> jax.Array:
        return self.total / jnp.maximum(self.count, 1e-30)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossOutput:
    """What every loss returns.

    Attributes:
      terms: name -> LossTerm (unreduced total, count, weight).
      losses: `[B]` per-example losses of the combination (for inspection and logging).
      chosen_rewards, rejected_rewards: `[B]` implicit rewards, detached.
      metrics: scalar metrics under TRL's names (`rewards/chosen`, `rewards/accuracies`, ...).
    """

    terms: dict
    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    metrics: dict

    @property
    def loss(self) -> jax.Array:
        return sum(t.weight * t.value for t in self.terms.values())


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's reward and log-prob metrics (batch means)."""
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(chosen_logps),
        "logps/rejected": jnp.mean(rejected_logps),
    }


def check_beta(beta) -> None:
    """Reject a non-positive Python-number `beta` (traced values are not checked)."""
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"`beta` must be > 0, got {beta}")


def mean_term(losses: jax.Array, weight: float = 1.0) -> LossTerm:
    """A per-example loss vector as an unreduced (sum, count) term."""
    return LossTerm(jnp.sum(losses), jnp.asarray(losses.shape[0], losses.dtype), weight)


def paired_output(
    name,
    losses,
    chosen_rewards,
    rejected_rewards,
    chosen_logps,
    rejected_logps,
    *,
    extra_terms=None,
    extra_metrics=None,
) -> LossOutput:
    """The LossOutput of a paired loss: one mean term `name` (plus `extra_terms`), detached
    rewards and TRL's reward metrics (plus `extra_metrics`)."""
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    metrics.update(extra_metrics or {})
    return LossOutput(
        {name: mean_term(losses), **(extra_terms or {})},
        losses,
        chosen_rewards,
        rejected_rewards,
        metrics,
    )
