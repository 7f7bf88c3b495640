"""Pure loss functions: `(PreferenceBatch, **hyperparameters) -> LossOutput`, a registry by TRL
`loss_type` name, and weighted combinations. Families: the DPO family (every TRL
1.16 loss type, f-divergences, WPO, LD-DPO), CPO/SimPO/AlphaPO, ORPO, KTO, BCO, SPPO, and the
token-level TDPO, SparsePO, MaPO and token-wise constrained SFT; the unlearning losses GA,
GradDiff, NPO and SimNPO on an `UnlearnBatch`; the on-policy GRPO, RLOO, REINFORCE-KL, online
DPO, XPO and Nash-MD on a `ScoredRolloutBatch` of sampled completions."""

from alignjax.losses import reference_free
from alignjax.losses.advantages import (
    combine_rewards,
    group_advantages,
    reward_metrics,
    rloo_advantages,
)
from alignjax.losses.compose import available, combine, get, needs_of, register
from alignjax.losses.dpo import FORMULAS, dpo, f_score, pair_scores, wpo_weights
from alignjax.losses.kl_estimators import kl_k1, kl_k2, kl_k3, kl_k3_ratio
from alignjax.losses.needs import CarriedState, LossNeeds, MaskProvider
from alignjax.losses.online import ScoredRolloutBatch
from alignjax.losses.online_dpo import online_dpo_loss, pair_by_reward
from alignjax.losses.policy_gradient import (
    RolloutBatch,
    grpo_loss,
    grpo_per_token_loss,
    reinforce_kl_loss,
    rloo_loss,
)
from alignjax.losses.reference_free import alphapo_reward, cpo, orpo
from alignjax.losses.reward import RewardBatch, bradley_terry_reward_loss, reward_loss
from alignjax.losses.sft import sft
from alignjax.losses.sparse_mask import SparseMaskHead, SparsePOMasks
from alignjax.losses.sppo import sppo, sppo_single, win_probabilities
from alignjax.losses.token import (
    MaPOMasks,
    constrained_beta_schedule,
    mapo,
    sparsepo,
    tdpo,
    token_constrained_sft,
)
from alignjax.losses.types import LossOutput, LossTerm, PreferenceBatch
from alignjax.losses.unlearn import UnlearnBatch, grad_ascent, grad_diff, npo, simnpo
from alignjax.losses.unpaired import (
    BCO_MOMENTS,
    RewardMoments,
    UnpairedBatch,
    bco,
    bco_rewards,
    bco_udm_weights,
    init_reward_moments,
    kto,
    update_reward_moments,
)
from alignjax.losses.xpo_nash import nash_md_loss, xpo_loss

__all__ = [
    "FORMULAS",
    "RewardBatch",
    "bradley_terry_reward_loss",
    "reward_loss",
    "alphapo_reward",
    "cpo",
    "orpo",
    "LossOutput",
    "LossTerm",
    "PreferenceBatch",
    "SparseMaskHead",
    "SparsePOMasks",
    "MaPOMasks",
    "LossNeeds",
    "MaskProvider",
    "CarriedState",
    "needs_of",
    "UnpairedBatch",
    "UnlearnBatch",
    "grad_ascent",
    "grad_diff",
    "npo",
    "simnpo",
    "RewardMoments",
    "bco",
    "bco_rewards",
    "bco_udm_weights",
    "init_reward_moments",
    "update_reward_moments",
    "BCO_MOMENTS",
    "kto",
    "mapo",
    "sparsepo",
    "tdpo",
    "token_constrained_sft",
    "constrained_beta_schedule",
    "available",
    "combine",
    "dpo",
    "f_score",
    "get",
    "pair_scores",
    "reference_free",
    "register",
    "sft",
    "sppo",
    "sppo_single",
    "win_probabilities",
    "wpo_weights",
    "RolloutBatch",
    "ScoredRolloutBatch",
    "combine_rewards",
    "group_advantages",
    "grpo_loss",
    "grpo_per_token_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_ratio",
    "online_dpo_loss",
    "xpo_loss",
    "nash_md_loss",
    "pair_by_reward",
    "reinforce_kl_loss",
    "reward_metrics",
    "rloo_advantages",
    "rloo_loss",
]
