"""Token-level pairwise objectives: TDPO1/2, SparsePO and MaPO (specs/losses.md section 5).

With Delta_t = log pi(y_t) - log pi_ref(y_t) and KL_t = KL(pi_ref || pi)(. | x, y_<t) per
completion token (`chosen_kl` / `rejected_kl`, e.g. from `ops.fused_token_stats(kl=True)`):

    TDPO1:    -log s(beta [ (A_w - A_l) - (S_l - S_w) ])
    TDPO2:    -log s(beta [ (A_w - A_l) - alpha (S_l - sg(S_w)) ])
    SparsePO: -log s(beta [ (U_w - U_l) - (D_l - D_w) ]) + L1 penalties on the masks
    MaPO:     SparsePO's form with one detached activation mask and no L1 term

where A = sum_t Delta_t, S = sum_t KL_t, U = sum_t m_u,t Delta_t, D = sum_t m_d,t KL_t over the
completion. SparsePO with m_u = m_d = 1 is TDPO1 exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.types import LossOutput, LossTerm, PreferenceBatch, masked_sum, reward_metrics

log_sigmoid = jax.nn.log_sigmoid


def _require(batch: PreferenceBatch, *names):
    for name in names:
        if getattr(batch, name) is None:
            raise ValueError(f"this loss needs `{name}` in the batch")
    if batch.ref_chosen_logps is None or batch.ref_chosen_logps.ndim != 2:
        raise ValueError("token-level losses need per-token reference log-probs `[B, T]`")


def _delta(batch, side):
    logps = getattr(batch, f"{side}_logps")
    ref = lax.stop_gradient(getattr(batch, f"ref_{side}_logps"))
    return logps - ref


def _output(name, losses, chosen_rewards, rejected_rewards, batch, extra=None) -> LossOutput:
    chosen_rewards, rejected_rewards = (
        lax.stop_gradient(chosen_rewards),
        lax.stop_gradient(rejected_rewards),
    )
    pc = masked_sum(batch.chosen_logps, batch.chosen_mask)
    pr = masked_sum(batch.rejected_logps, batch.rejected_mask)
    metrics = reward_metrics(chosen_rewards, rejected_rewards, pc, pr)
    metrics.update(extra or {})
    terms = {name: LossTerm(jnp.sum(losses), jnp.asarray(losses.shape[0], losses.dtype))}
    return LossOutput(terms, losses, chosen_rewards, rejected_rewards, metrics)


def _check(beta):
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"`beta` must be > 0, got {beta}")


def tdpo(
    batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 0.5, version: int = 2
) -> LossOutput:
    """TDPO (Zeng et al. 2024, arXiv:2404.11999; official `tdpo_loss`), summed log-probs.

    version 1 uses the sequential KL difference S_l - S_w; version 2 scales it by `alpha` and
    stops the gradient through S_w. Rewards: beta (A + S) per side, as the official code logs.
    """
    _check(beta)
    if version not in (1, 2):
        raise ValueError(f"`version` must be 1 or 2, got {version}")
    _require(batch, "chosen_kl", "rejected_kl")
    a_w = masked_sum(_delta(batch, "chosen"), batch.chosen_mask)
    a_l = masked_sum(_delta(batch, "rejected"), batch.rejected_mask)
    s_w = masked_sum(batch.chosen_kl, batch.chosen_mask)
    s_l = masked_sum(batch.rejected_kl, batch.rejected_mask)
    if version == 1:
        margin = (a_w - a_l) - (s_l - s_w)
    else:
        margin = (a_w - a_l) - alpha * (s_l - lax.stop_gradient(s_w))
    losses = -log_sigmoid(beta * margin)
    extra = {
        "seq_kl/chosen": lax.stop_gradient(jnp.mean(s_w)),
        "seq_kl/rejected": lax.stop_gradient(jnp.mean(s_l)),
    }
    return _output(f"tdpo{version}", losses, beta * (a_w + s_w), beta * (a_l + s_l), batch, extra)


def _masked_terms(batch, m_u_w, m_u_l, m_d_w, m_d_l):
    u_w = masked_sum(m_u_w * _delta(batch, "chosen"), batch.chosen_mask)
    u_l = masked_sum(m_u_l * _delta(batch, "rejected"), batch.rejected_mask)
    d_w = masked_sum(m_d_w * batch.chosen_kl, batch.chosen_mask)
    d_l = masked_sum(m_d_l * batch.rejected_kl, batch.rejected_mask)
    return u_w, u_l, d_w, d_l


def sparsity(mask_w, mask_l, batch: PreferenceBatch) -> jax.Array:
    """Fraction of exactly-zero mask entries over the completion tokens of both sides."""
    zeros = masked_sum((mask_w == 0).astype(jnp.float32), batch.chosen_mask) + masked_sum(
        (mask_l == 0).astype(jnp.float32), batch.rejected_mask
    )
    total = jnp.sum(batch.chosen_mask != 0) + jnp.sum(batch.rejected_mask != 0)
    return lax.stop_gradient(jnp.sum(zeros) / jnp.maximum(total, 1))


def sparsepo(
    batch: PreferenceBatch, *, beta: float = 0.1, l1_reward: float = 0.0, l1_kl: float = 0.0
) -> LossOutput:
    """SparsePO (Christopoulou et al. 2024, arXiv:2410.05102; official HEBO/SparsePO).

    Reward masks `chosen_reward_mask` / `rejected_reward_mask` (m_u) weight the log-ratios; KL
    masks `chosen_kl_mask` / `rejected_kl_mask` (m_d) weight the per-token KL, defaulting to
    the reward masks (the "common mask" variant); two independent heads give "sparse-indp".
    Loss per pair: -log s(beta [(U_w - U_l) - (D_l - D_w)]) + l1_reward (|m_u(y_w)| +
    |m_u(y_l)|) + l1_kl (|m_d(y_w)| + |m_d(y_l)|), L1 norms over completion tokens. Gradients
    reach the masks (the mask head trains through this loss). Rewards: beta (U - D).
    """
    _check(beta)
    _require(batch, "chosen_kl", "rejected_kl", "chosen_reward_mask", "rejected_reward_mask")
    m_u_w, m_u_l = batch.chosen_reward_mask, batch.rejected_reward_mask
    m_d_w = m_u_w if batch.chosen_kl_mask is None else batch.chosen_kl_mask
    m_d_l = m_u_l if batch.rejected_kl_mask is None else batch.rejected_kl_mask
    u_w, u_l, d_w, d_l = _masked_terms(batch, m_u_w, m_u_l, m_d_w, m_d_l)
    losses = -log_sigmoid(beta * ((u_w - u_l) - (d_l - d_w)))

    def l1(m_w, m_l):
        return masked_sum(jnp.abs(m_w), batch.chosen_mask) + masked_sum(
            jnp.abs(m_l), batch.rejected_mask
        )

    if l1_reward:
        losses = losses + l1_reward * l1(m_u_w, m_u_l)
    if l1_kl:
        losses = losses + l1_kl * l1(m_d_w, m_d_l)
    extra = {"mask/sparsity": sparsity(m_u_w, m_u_l, batch)}
    if batch.chosen_kl_mask is not None:
        extra["mask/kl_sparsity"] = sparsity(m_d_w, m_d_l, batch)
    return _output("sparsepo", losses, beta * (u_w - d_w), beta * (u_l - d_l), batch, extra)


def mapo(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """MaPO (official `mapo_loss`): SparsePO's form with m_u = m_d = the detached activation mask
    (`ops.mapo_activation_mask`) in `chosen_reward_mask` / `rejected_reward_mask`, no L1."""
    _check(beta)
    _require(batch, "chosen_kl", "rejected_kl", "chosen_reward_mask", "rejected_reward_mask")
    m_w = lax.stop_gradient(batch.chosen_reward_mask)
    m_l = lax.stop_gradient(batch.rejected_reward_mask)
    u_w, u_l, d_w, d_l = _masked_terms(batch, m_w, m_l, m_w, m_l)
    losses = -log_sigmoid(beta * ((u_w - u_l) - (d_l - d_w)))
    return _output("mapo", losses, beta * (u_w - d_w), beta * (u_l - d_l), batch)
