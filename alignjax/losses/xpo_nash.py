"""XPO and Nash-MD: online preference losses against a second sampler (specs/online.md sections
1.2-1.3), with the semantics of TRL's git snapshot (huggingface/trl @ f2cd5771,
`trl/experimental/xpo/xpo_trainer.py` `_compute_losses` / `_log_statistics`,
`trl/experimental/nash_md/nash_md_trainer.py` `_compute_losses` / `_log_statistics`; neither
trainer is in the trl 1.16 wheel).

Both read per-token log-probs at temperature 1 (TRL scores completions with the raw logits, as
Online DPO) summed over the completion mask; TRL zeroes the pad positions before summing, so its
sums are masked too. Scores are the rows' total rewards as `online_dpo.pair_by_reward` makes
them: a NaN reward (every reward function returned None) counts 0, `missing_eos_penalty` is
subtracted on rows without a stop token. (TRL's own EOS test for the penalty looks for the EOS
id anywhere in prompt + completion; here it is the completion's stop token. TRL takes a single
reward model; here the weighted sum of the run's reward functions.)
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.online_dpo import ONLINE_DPO_LOSS_TYPES, pair_by_reward, pair_losses
from alignjax.losses.policy_gradient import RolloutBatch
from alignjax.losses.types import LossOutput, check_beta, masked_sum, mean_term

__all__ = ["xpo_loss", "nash_md_loss"]


def _halves(batch: RolloutBatch, name: str) -> int:
    n = batch.logps.shape[0]
    if batch.logps.ndim != 2 or n % 2 or n == 0:
        shape = tuple(batch.logps.shape)
        raise ValueError(f"{name} needs `[policy samples; opponent samples]` rows: an even "
                         f"number of [B, T] rows, got shape {shape}")  # fmt: skip
    return n // 2


def _eos_metrics(contains_eos, opponent_eos, dtype) -> dict:
    """TRL's `val/model_contain_eos_token` / `val/ref_contain_eos_token` (the second is the
    reference's sample in XPO, the mixture's in Nash-MD)."""
    if contains_eos is None or opponent_eos is None:
        return {}
    return {
        "val/model_contain_eos_token": jnp.mean(jnp.asarray(contains_eos).astype(dtype)),
        "val/ref_contain_eos_token": jnp.mean(jnp.asarray(opponent_eos).astype(dtype)),
    }


def xpo_loss(
    batch: RolloutBatch,
    rewards,
    *,
    beta: float = 0.1,
    alpha: float = 1e-5,
    loss_type: str = "sigmoid",
    missing_eos_penalty: float | None = None,
    contains_eos=None,
) -> LossOutput:
    """Exploratory Preference Optimization, Xie et al. 2024 (arXiv:2405.21046), Algorithm 1 as
    TRL implements it (defaults = `XPOConfig`'s).

    `batch` holds 2P rows: the policy's sample y of each of P prompts, then the reference's
    sample y' of the same prompts (`[y_1..y_P; y'_1..y'_P]`, policy and reference log-probs of
    both). y is chosen when r(y) >= r(y') (ties: the policy's sample), and with
    h = (pc - pr) - (rc - rr) on the summed log-probs of the (chosen, rejected) pair:

        dpo_i = -log s(beta h)  (sigmoid)   or   (h - 1 / (2 beta))^2  (ipo, unnormalised)
        xpo_i = alpha * sum_t log pi_theta(y'_t)       (the exploration bonus)
        loss  = mean_i (dpo_i + xpo_i)

    alpha = 0 is Online DPO on the pair (y, y'). One term (P pairs).

    Metrics, TRL's names and formulas, quirks included: `loss/dpo`, `loss/xpo` (means),
    `objective/model_scores` / `objective/ref_scores` (mean score of y / y'),
    `objective/scores_margin` (mean r(y) - r(y'), not chosen minus rejected),
    `rewards/chosen|rejected|margins|accuracies` (beta times the pair's log-ratios),
    `logps/chosen` = mean(pc) + mean(rc) and `logps/rejected` = mean(pr) + mean(rr) (TRL logs
    the *sum of the policy's and the reference's means*, not the policy's log-prob),
    `objective/kl` (mean over the 2P rows of sum_t (logp - ref)), `objective/entropy`
    (-mean of sum_t logp over the 2P rows), `alpha`, `beta`, and with `contains_eos` ([2P]
    bool) `val/model_contain_eos_token` / `val/ref_contain_eos_token`.
    """
    if loss_type not in ONLINE_DPO_LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {ONLINE_DPO_LOSS_TYPES}, got {loss_type!r}")
    check_beta(beta)
    if isinstance(alpha, numbers.Real) and not alpha >= 0:
        raise ValueError(f"`alpha` must be >= 0, got {alpha}")
    if batch.ref_logps is None:
        raise ValueError("XPO needs `ref_logps` in the RolloutBatch")
    p = _halves(batch, "XPO")
    chosen, rejected, scores = pair_by_reward(rewards, missing_eos_penalty=missing_eos_penalty,
                                              contains_eos=contains_eos)  # fmt: skip
    if scores.shape[0] != 2 * p:
        raise ValueError(f"`rewards` has {scores.shape[0]} rows, the batch {2 * p}")
    dpo, s = pair_losses(batch, chosen, rejected, beta=beta, loss_type=loss_type)
    policy_sums = masked_sum(batch.logps, batch.mask)
    xpo = alpha * policy_sums[p:]
    losses = dpo + xpo

    sg = lax.stop_gradient
    kl = sg(masked_sum(batch.logps - batch.ref_logps, batch.mask))
    chosen_rewards, rejected_rewards = sg(beta * s.a), sg(beta * s.b)
    margin = chosen_rewards - rejected_rewards
    dtype = kl.dtype
    metrics = {
        "loss/dpo": jnp.mean(dpo),
        "loss/xpo": jnp.mean(xpo),
        "objective/model_scores": jnp.mean(scores[:p]),
        "objective/ref_scores": jnp.mean(scores[p:]),
        "objective/scores_margin": jnp.mean(scores[:p] - scores[p:]),
        "logps/chosen": jnp.mean(s.pc) + jnp.mean(s.rc),
        "logps/rejected": jnp.mean(s.pr) + jnp.mean(s.rr),
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(margin),
        "rewards/accuracies": jnp.mean((margin > 0).astype(dtype)),
        "objective/kl": jnp.mean(kl),
        "objective/entropy": -jnp.mean(policy_sums),
        "alpha": jnp.asarray(alpha, dtype),
        "beta": jnp.asarray(beta, dtype),
    }
    eos = None if contains_eos is None else jnp.asarray(contains_eos)
    metrics.update(_eos_metrics(*((None, None) if eos is None else (eos[:p], eos[p:])), dtype))
    metrics = jax.tree.map(sg, metrics)
    return LossOutput({"xpo": mean_term(losses)}, losses, chosen_rewards, rejected_rewards, metrics)


def nash_md_loss(
    batch: RolloutBatch,
    rewards,
    opponent_rewards,
    *,
    beta: float = 0.1,
    missing_eos_penalty: float | None = None,
    contains_eos=None,
    opponent_contains_eos=None,
) -> LossOutput:
    """Nash-MD, Munos et al. 2023 (arXiv:2312.00886), in the policy-gradient form TRL
    implements (`NashMDTrainer._compute_losses`; defaults = `NashMDConfig`'s).

    `batch` holds P policy samples y (policy and reference log-probs); `rewards` `[P]` their
    scores, `opponent_rewards` `[P]` those of the opponent y' of the same prompt, sampled from
    the geometric mixture pi_mix ∝ pi_theta^(1-c) pi_ref^c (`models.generate_mixture`). With
    P_i = s(r(y_i) - r(y'_i)) (no gradient) and sg the stop-gradient:

        score_i   = (P_i - 1/2) * sum_t log pi_theta(y_t)       (REINFORCE, baseline 1/2)
        kl_term_i = sum_t sg(log pi_theta(y_t) - log pi_ref(y_t)) * log pi_theta(y_t)
        loss      = mean_i (beta * kl_term_i - score_i)

    grad kl_term_i is a per-token score-function estimate of grad KL(pi_theta || pi_ref) (each
    token's own log-ratio, not the sum over the tokens after it); for one-token responses the
    expected gradient is exactly -grad E[P(y > y')] + beta grad KL with the mixture held fixed.
    One term (P rows).

    Metrics, TRL's names with its re-purposed meanings: `loss/score` (mean score_i),
    `loss/kl` (mean sum_t (logp - ref)), `rewards/probabilities` (mean P_i),
    `rewards/chosen` / `rewards/rejected` (mean score of y / of the mixture's y'),
    `logps/chosen` (mean sum_t logp of y), `logps/rejected` (the *reference's* mean log-prob of
    y), `rewards/margins` (mean sum_t (logp - ref)), `rewards/accuracies` (share with a
    positive margin), `objective/entropy`, `beta`, and with both EOS flags
    `val/model_contain_eos_token` / `val/ref_contain_eos_token` (the mixture's).
    `chosen_rewards` / `rejected_rewards` of the output are the scores of y and y'.
    """
    if isinstance(beta, numbers.Real) and not beta >= 0:
        raise ValueError(f"`beta` must be >= 0, got {beta}")
    if batch.ref_logps is None:
        raise ValueError("Nash-MD needs `ref_logps` in the RolloutBatch")
    if batch.logps.ndim != 2:
        raise ValueError(f"Nash-MD's `logps` must be [P, T], got {tuple(batch.logps.shape)}")
    p = batch.logps.shape[0]
    both = jnp.concatenate([jnp.asarray(rewards), jnp.asarray(opponent_rewards)])
    eos = None
    if missing_eos_penalty is not None:
        if contains_eos is None or opponent_contains_eos is None:
            raise ValueError("`missing_eos_penalty` needs `contains_eos` and "
                             "`opponent_contains_eos` ([P] bool each)")  # fmt: skip
        eos = jnp.concatenate([jnp.asarray(contains_eos), jnp.asarray(opponent_contains_eos)])
    _, _, scores = pair_by_reward(both, missing_eos_penalty=missing_eos_penalty,
                                  contains_eos=eos)  # fmt: skip
    if scores.shape[0] != 2 * p:
        raise ValueError(f"`rewards` and `opponent_rewards` must be [P] = [{p}] each, got "
                         f"{jnp.shape(rewards)} and {jnp.shape(opponent_rewards)}")  # fmt: skip
    mine, theirs = scores[:p], scores[p:]
    sg = lax.stop_gradient
    probability = jax.nn.sigmoid(mine - theirs)
    logp = masked_sum(batch.logps, batch.mask)
    ref = sg(masked_sum(batch.ref_logps, batch.mask))
    log_ratio = sg(batch.logps - batch.ref_logps)
    score = (probability - 0.5) * logp
    kl_term = masked_sum(log_ratio * batch.logps, batch.mask)
    losses = beta * kl_term - score

    kl = masked_sum(log_ratio, batch.mask)
    dtype = kl.dtype
    margin = sg(logp) - ref
    metrics = {
        "loss/score": jnp.mean(score),
        "loss/kl": jnp.mean(kl),
        "rewards/probabilities": jnp.mean(probability),
        "rewards/chosen": jnp.mean(mine),
        "rewards/rejected": jnp.mean(theirs),
        "logps/chosen": jnp.mean(logp),
        "logps/rejected": jnp.mean(ref),
        "rewards/margins": jnp.mean(margin),
        "rewards/accuracies": jnp.mean((margin > 0).astype(dtype)),
        "objective/entropy": -jnp.mean(logp),
        "beta": jnp.asarray(beta, dtype),
    }
    metrics.update(_eos_metrics(contains_eos, opponent_contains_eos, dtype))
    metrics = jax.tree.map(sg, metrics)
    return LossOutput({"nash_md": mean_term(losses)}, losses, mine, theirs, metrics)
