"""The on-policy losses as registered losses (`losses.get("grpo")`, ...), on a `ScoredRolloutBatch`:
a `RolloutBatch` that also carries each completion's reward and whether it holds a stop token.
This is what the training step builds from a batch of rollouts (`task: online`,
`train.online_step`), and what a loss registered for that batch kind reads.

    "grpo"          `policy_gradient.grpo_loss` (advantages in the batch)
    "rloo"          `policy_gradient.rloo_loss` (advantages with the KL folded in)
    "reinforce_kl"  `policy_gradient.reinforce_kl_loss` on the batch's rewards
    "online_dpo"    `online_dpo.online_dpo_loss` on the batch's rewards, pairs in two halves
    "xpo"           `xpo_nash.xpo_loss`: halves [policy samples; reference samples]
    "nash_md"       `xpo_nash.nash_md_loss`: policy samples, each with its opponent's score

The formulas live in those modules; the functions here only read the batch's extra fields.
"""

from __future__ import annotations

import dataclasses

import jax

from alignjax.losses.needs import LossNeeds
from alignjax.losses.online_dpo import online_dpo_loss
from alignjax.losses.policy_gradient import RolloutBatch, reinforce_kl_loss
from alignjax.losses.types import LossOutput
from alignjax.losses.xpo_nash import nash_md_loss, xpo_loss

__all__ = ["ScoredRolloutBatch", "reinforce_kl", "online_dpo", "xpo", "nash_md", "ONLINE_NEEDS"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoredRolloutBatch(RolloutBatch):
    """A `RolloutBatch` with per-completion scores.

    Attributes (besides `RolloutBatch`'s):
      rewards: `[B]` total reward of each completion (NaN where every reward function
        returned None).
      contains_eos: `[B]` bool, the completion ends with a stop token.
      opponent_rewards, opponent_contains_eos: `[B]` the score and EOS flag of the sample each
        row is compared with (Nash-MD's mixture sample of the same prompt), or None.
    """

    rewards: jax.Array | None = None
    contains_eos: jax.Array | None = None
    opponent_rewards: jax.Array | None = None
    opponent_contains_eos: jax.Array | None = None

    def __post_init__(self):
        super().__post_init__()
        if not hasattr(self.logps, "shape"):
            return
        for name in ("rewards", "contains_eos", "opponent_rewards", "opponent_contains_eos"):
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape) != tuple(self.logps.shape[:-1]):
                raise ValueError(f"`{name}` must have shape {tuple(self.logps.shape[:-1])}, "
                                 f"got {tuple(v.shape)}")  # fmt: skip


def _rewards(batch) -> jax.Array:
    rewards = getattr(batch, "rewards", None)
    if rewards is None:
        raise ValueError("this loss reads the completions' rewards: pass a ScoredRolloutBatch")
    return rewards


def reinforce_kl(
    batch: ScoredRolloutBatch,
    *,
    beta: float = 0.05,
    baseline: str | None = "loo",
    num_generations: int | None = None,
) -> LossOutput:
    """`policy_gradient.reinforce_kl_loss` on `batch.rewards` (rows in groups of
    `num_generations` for the leave-one-out baseline)."""
    return reinforce_kl_loss(
        batch, _rewards(batch), beta=beta, baseline=baseline, num_generations=num_generations
    )


def online_dpo(
    batch: ScoredRolloutBatch,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    missing_eos_penalty: float | None = None,
) -> LossOutput:
    """`online_dpo.online_dpo_loss` on `batch.rewards` (rows `[first samples; second samples]`),
    with the EOS flags for `missing_eos_penalty` and the `val/contain_eos_token` metric."""
    return online_dpo_loss(
        batch,
        _rewards(batch),
        beta=beta,
        loss_type=loss_type,
        missing_eos_penalty=missing_eos_penalty,
        contains_eos=batch.contains_eos,
    )


def xpo(
    batch: ScoredRolloutBatch,
    *,
    beta: float = 0.1,
    alpha: float = 1e-5,
    loss_type: str = "sigmoid",
    missing_eos_penalty: float | None = None,
) -> LossOutput:
    """`xpo_nash.xpo_loss` on `batch.rewards` (rows `[policy samples; reference samples]`), with
    the EOS flags for `missing_eos_penalty` and the `val/*_contain_eos_token` metrics."""
    return xpo_loss(batch, _rewards(batch), beta=beta, alpha=alpha, loss_type=loss_type,
                    missing_eos_penalty=missing_eos_penalty,
                    contains_eos=batch.contains_eos)  # fmt: skip


def nash_md(
    batch: ScoredRolloutBatch,
    *,
    beta: float = 0.1,
    missing_eos_penalty: float | None = None,
) -> LossOutput:
    """`xpo_nash.nash_md_loss` on the policy samples' `rewards` and their mixture opponents'
    `opponent_rewards` (and both EOS flags)."""
    if getattr(batch, "opponent_rewards", None) is None:
        raise ValueError("nash_md reads each sample's opponent score: a ScoredRolloutBatch with "
                         "`opponent_rewards`")  # fmt: skip
    return nash_md_loss(batch, _rewards(batch), batch.opponent_rewards, beta=beta,
                        missing_eos_penalty=missing_eos_penalty,
                        contains_eos=batch.contains_eos,
                        opponent_contains_eos=batch.opponent_contains_eos)  # fmt: skip


def _beta_needs(default: float):
    """Reference log-probs unless beta is 0 (GRPO's default: no reference is kept)."""
    free = LossNeeds(tasks=("online",), reference=False)
    with_ref = LossNeeds(tasks=("online",), reference=True)

    def depends(kwargs):
        return free if kwargs.get("beta", default) == 0 else with_ref

    return dataclasses.replace(free, depends=depends)


# name -> what the step must provide (the reference's log-probs come with the rollouts)
ONLINE_NEEDS = {
    "grpo": _beta_needs(0.0),
    "rloo": LossNeeds(tasks=("online",), reference=False),  # the KL is in the advantages
    "reinforce_kl": _beta_needs(0.05),
    "online_dpo": LossNeeds(tasks=("online",), reference=True),
    "xpo": LossNeeds(tasks=("online",), reference=True),
    "nash_md": LossNeeds(tasks=("online",), reference=True),
}
