"""The reward-model loss: Bradley-Terry on scalar scores, TRL 1.16 `RewardTrainer.compute_loss`.

A reward model r(x, y) scores whole sequences (a value head on the last real token,
`models.reward`). On a preference pair (y_c > y_r | x), with an optional per-pair margin m
(the dataset's `margin` column) and TRL's `center_rewards_coefficient` c (Eisenstein et al.
2023, arXiv:2312.09244, "Helping or Herding?", which centres rewards at zero):

    loss = mean_i -log sigmoid(r_c,i - r_r,i - m_i)  +  c * mean_i (r_c,i + r_r,i)^2

(Bradley and Terry 1952; Ouyang et al. 2022, arXiv:2203.02155, Eq. 1; the margin is Llama 2's,
Touvron et al. 2023, arXiv:2307.09288, Eq. 2). Both means are kept as (sum, count) terms, so
micro-batch and multi-device accumulation is exact; padding pairs (`valid` 0) count in neither.

Metrics under TRL's names: `accuracy` (fraction with r_c > r_r, ties count as wrong), `margin`
(mean r_c - r_r, the margin column not subtracted), `min_reward` / `mean_reward` /
`max_reward` over all 2B scores.

    >>> import jax.numpy as jnp
    >>> from alignjax.losses.reward import bradley_terry_reward_loss
    >>> out = bradley_terry_reward_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]))
    >>> round(float(out.loss), 4), float(out.metrics["accuracy"])
    (0.5032, 0.5)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from alignjax.losses.types import LossOutput, LossTerm

__all__ = ["RewardBatch", "bradley_terry_reward_loss", "reward_loss", "REWARD_METRICS"]

REWARD_METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """B preference pairs scored by a reward model (`task: reward`).

    Attributes:
      chosen_rewards, rejected_rewards: `[B]` scalar scores r(x, y_c), r(x, y_r).
      margin: `[B]` the dataset's `margin` column (TRL's `margin`), or None.
      valid: `[B]` 1 for real pairs, 0 for padding pairs (None: all real).
    """

    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    margin: jax.Array | None = None
    valid: jax.Array | None = None

    def __post_init__(self):
        c, r = self.chosen_rewards, self.rejected_rewards
        if not hasattr(c, "shape"):
            return  # JAX rebuilding the pytree with placeholder leaves
        if c.ndim != 1 or tuple(r.shape) != tuple(c.shape):
            raise ValueError(f"`chosen_rewards` and `rejected_rewards` must both be [B], got "
                             f"{tuple(c.shape)} and {tuple(r.shape)}")  # fmt: skip
        for name in ("margin", "valid"):
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape) != tuple(c.shape):
                raise ValueError(f"`{name}` must be [B] = {tuple(c.shape)}, got {tuple(v.shape)}")


def bradley_terry_reward_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_rewards_coefficient: float | None = None,
    valid: jax.Array | None = None,
) -> LossOutput:
    """TRL's reward loss on `[B]` scores (see the module docstring).

    Args:
      chosen_rewards, rejected_rewards: `[B]` scores of the chosen / rejected sequences.
      margin: `[B]` margins subtracted inside the sigmoid (None: no margin, as a dataset
        without the column).
      center_rewards_coefficient: c of the centring term (None or 0: off; TRL's default None).
      valid: `[B]` weights of real pairs (1) and padding pairs (0); None: all real.

    Returns:
      A `LossOutput` with terms "bradley_terry" (and "center_rewards", weight c), the
      per-pair losses, the scores as chosen / rejected rewards, and TRL's metrics.
    """
    rc, rr = chosen_rewards, rejected_rewards
    if center_rewards_coefficient is not None and isinstance(center_rewards_coefficient, float):
        if center_rewards_coefficient < 0:
            raise ValueError(f"`center_rewards_coefficient` must be >= 0 or None, got "
                             f"{center_rewards_coefficient}")  # fmt: skip
    w = jnp.ones_like(rc) if valid is None else jnp.asarray(valid).astype(rc.dtype)
    diff = rc - rr
    logits = diff if margin is None else diff - jnp.asarray(margin, rc.dtype)
    bt = -jax.nn.log_sigmoid(logits)
    count = jnp.sum(w)
    terms = {"bradley_terry": LossTerm(jnp.sum(w * bt), count)}
    losses = bt
    if center_rewards_coefficient:
        centre = (rc + rr) ** 2
        terms["center_rewards"] = LossTerm(
            jnp.sum(w * centre), count, float(center_rewards_coefficient)
        )
        losses = bt + center_rewards_coefficient * centre
    sc, sr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    n = jnp.maximum(count, 1.0)
    both = jnp.concatenate([sc, sr])
    w2 = jnp.concatenate([w, w]) > 0
    metrics = {
        "accuracy": jnp.sum(w * (sc > sr).astype(rc.dtype)) / n,
        "margin": jnp.sum(w * (sc - sr)) / n,
        "min_reward": jnp.min(jnp.where(w2, both, jnp.inf)),
        "mean_reward": jnp.sum(jnp.where(w2, both, 0.0)) / (2 * n),
        "max_reward": jnp.max(jnp.where(w2, both, -jnp.inf)),
    }
    return LossOutput(terms, losses, sc, sr, metrics)


def reward_loss(batch: RewardBatch, *, center_rewards_coefficient: float | None = None):
    """The registered "reward" loss: `bradley_terry_reward_loss` on a `RewardBatch`."""
    return bradley_terry_reward_loss(
        batch.chosen_rewards,
        batch.rejected_rewards,
        margin=batch.margin,
        center_rewards_coefficient=center_rewards_coefficient,
        valid=batch.valid,
    )
