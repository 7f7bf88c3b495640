"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback",
arXiv:2402.04792) with TRL 1.16.0 `OnlineDPOTrainer.training_step` semantics (specs/online.md
section 1.1): two samples per prompt, the better-scored one is chosen, then DPO on the pair.

The batch is a `RolloutBatch` of 2P rows laid out as TRL's generation lays them out,
`[first samples of the P prompts; second samples]`, with reference log-probs. The DPO formulas
are `losses.dpo`'s; only the pairing and the on-policy metrics are new here.

Deliberate difference from TRL 1.16: the `objective/*` metrics sum log-probs over the completion
mask; TRL's sum every position of the padded completion, pads after the EOS included (the loss
itself is masked in both). They agree when the log-probs off the mask are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.dpo import Hyper, ipo_loss, pair_scores, sigmoid_loss
from alignjax.losses.policy_gradient import RolloutBatch
from alignjax.losses.types import LossOutput, PreferenceBatch, check_beta, masked_sum, paired_output
from alignjax.ops import _checks as C

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")


def pair_by_reward(rewards, *, reward_weights=None, missing_eos_penalty=None, contains_eos=None):
    """TRL's Online DPO pairing (`training_step` L1216-1227):
    `(chosen_idx [P], rejected_idx [P], scores [2P])`.

    scores = nansum_k w_k r_k (a row whose functions all returned None scores 0, TRL's nansum),
    minus `missing_eos_penalty` on rows without an EOS (`contains_eos` `[2P]` bool). Sample 1
    of prompt i (row i) is chosen when its score >= sample 2's (row P + i): ties go to the first.
    """
    r = C.as_array("rewards", rewards)
    if r.ndim not in (1, 2) or r.shape[0] % 2 or r.shape[0] == 0:
        raise ValueError(f"`rewards` must be [2P] or [2P, K] (first samples, then second "
                         f"samples), got shape {r.shape}")  # fmt: skip
    r = r.astype(C.result_dtype(r.dtype))
    r = r[:, None] if r.ndim == 1 else r
    w = jnp.ones((r.shape[1],), r.dtype) if reward_weights is None else jnp.asarray(reward_weights)
    if w.shape != (r.shape[1],):
        raise ValueError(f"`reward_weights` must have shape ({r.shape[1]},), got {w.shape}")
    scores = jnp.nansum(r * w.astype(r.dtype), axis=1)
    if missing_eos_penalty is not None:
        if contains_eos is None:
            raise ValueError("`missing_eos_penalty` needs `contains_eos` ([2P] bool)")
        eos = jnp.asarray(contains_eos)
        if eos.shape != scores.shape:
            raise ValueError(f"`contains_eos` must be [2P] {scores.shape}, got {eos.shape}")
        scores = scores - missing_eos_penalty * (~eos.astype(bool)).astype(scores.dtype)
    p = scores.shape[0] // 2
    first_wins = scores[:p] >= scores[p:]
    idx = jnp.arange(p)
    chosen = idx + jnp.where(first_wins, 0, p)
    rejected = idx + jnp.where(first_wins, p, 0)
    return chosen, rejected, lax.stop_gradient(scores)


def pair_losses(batch: RolloutBatch, chosen, rejected, *, beta: float, loss_type: str):
    """`(losses [P], PairScores)`: DPO (`sigmoid`) or IPO (`ipo`) on the summed log-probs of the
    pairs (rows `chosen[i]`, `rejected[i]` of `batch`), as `online_dpo_loss` states them."""
    pairs = PreferenceBatch(
        chosen_logps=batch.logps[chosen],
        rejected_logps=batch.logps[rejected],
        chosen_mask=batch.mask[chosen],
        rejected_mask=batch.mask[rejected],
        ref_chosen_logps=batch.ref_logps[chosen],
        ref_rejected_logps=batch.ref_logps[rejected],
    )
    s = pair_scores(pairs)
    hyper = Hyper(beta, 0.0, 0.05, None)
    if loss_type == "sigmoid":
        return sigmoid_loss(s, hyper), s
    ones = jnp.ones_like(s.len_c)
    return ipo_loss(s._replace(len_c=ones, len_r=ones), hyper), s


def online_dpo_loss(
    batch: RolloutBatch,
    rewards,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    reward_weights=None,
    missing_eos_penalty: float | None = None,
    contains_eos=None,
) -> LossOutput:
    """Online DPO on the pairs of `pair_by_reward`, with summed log-probs (defaults =
    `OnlineDPOConfig`'s). With h = (pc - pr) - (rc - rr):

        sigmoid: -log s(beta h)              (DPO, arXiv:2305.18290 Eq. 7; `dpo.sigmoid_loss`)
        ipo:     (h - 1 / (2 beta))^2        (IPO, arXiv:2310.12036 Eq. 17) on *summed*
                 log-probs: `dpo.ipo_loss` with unit lengths (TRL's DPOTrainer length-normalises,
                 its OnlineDPOTrainer does not)

    One term (sum over pairs, P). Metrics: TRL's `rewards/*` (beta times the summed log-ratios)
    and `logps/chosen|rejected`, and over all 2P samples `objective/kl` (mean_i sum_t m (logp -
    ref)), `objective/entropy` (-mean_i sum_t m logp), `objective/non_score_reward` (-beta times
    objective/kl), `objective/rlhf_reward` (mean of score + non-score reward),
    `objective/scores`, `objective/scores_margin` (mean chosen - rejected score), `beta`,
    `val/contain_eos_token` when `contains_eos` is given.
    """
    if loss_type not in ONLINE_DPO_LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {ONLINE_DPO_LOSS_TYPES}, got {loss_type!r}")
    check_beta(beta)
    if batch.ref_logps is None:
        raise ValueError("online DPO needs `ref_logps` in the RolloutBatch")
    if batch.old_logps is not None:
        raise ValueError("online DPO reads no sampler log-probs: `old_logps` must be None")
    chosen, rejected, scores = pair_by_reward(
        rewards,
        reward_weights=reward_weights,
        missing_eos_penalty=missing_eos_penalty,
        contains_eos=contains_eos,
    )
    if scores.shape[0] != batch.logps.shape[0]:
        raise ValueError(f"`rewards` has {scores.shape[0]} rows, the batch {batch.logps.shape[0]}")
    losses, s = pair_losses(batch, chosen, rejected, beta=beta, loss_type=loss_type)

    kl = lax.stop_gradient(masked_sum(batch.logps - batch.ref_logps, batch.mask))
    non_score = -beta * kl
    extra = {
        "objective/kl": jnp.mean(kl),
        "objective/entropy": -jnp.mean(masked_sum(batch.logps, batch.mask)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(scores + non_score),
        "objective/scores": jnp.mean(scores),
        "objective/scores_margin": jnp.mean(scores[chosen] - scores[rejected]),
        "beta": jnp.asarray(beta, kl.dtype),
    }
    if contains_eos is not None:
        extra["val/contain_eos_token"] = jnp.mean(jnp.asarray(contains_eos).astype(kl.dtype))
    extra = jax.tree.map(lax.stop_gradient, extra)
    return paired_output(loss_type, losses, beta * s.a, beta * s.b, s.pc, s.pr, extra_metrics=extra)
