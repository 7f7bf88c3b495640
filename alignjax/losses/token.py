"""Token-level objectives: TDPO1/2, SparsePO, MaPO and Qi et al.'s token-wise constrained SFT
(specs/losses.md section 5).

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

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.types import (
    LossOutput,
    LossTerm,
    PreferenceBatch,
    check_beta,
    masked_sum,
    paired_output,
)
from alignjax.ops import completion_positions, mapo_activation_mask

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
    pc = masked_sum(batch.chosen_logps, batch.chosen_mask)
    pr = masked_sum(batch.rejected_logps, batch.rejected_mask)
    return paired_output(
        name, losses, chosen_rewards, rejected_rewards, pc, pr, extra_metrics=extra
    )


def tdpo(
    batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 0.5, version: int = 2
) -> LossOutput:
    """TDPO (Zeng et al. 2024, arXiv:2404.11999; official `tdpo_loss`), summed log-probs.

    version 1 uses the sequential KL difference S_l - S_w; version 2 scales it by `alpha` and
    stops the gradient through S_w. Rewards: beta (A + S) per side, as the official code logs.
    """
    check_beta(beta)
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
    batch: PreferenceBatch,
    *,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    halve_common_l1: bool = True,
) -> LossOutput:
    """SparsePO (Christopoulou et al. 2024, arXiv:2410.05102; official HEBO/SparsePO).

    Reward masks `chosen_reward_mask` / `rejected_reward_mask` (m_u) weight the log-ratios; KL
    masks `chosen_kl_mask` / `rejected_kl_mask` (m_d) weight the per-token KL, defaulting to
    the reward masks (the "common mask" variant); two independent heads give "sparse-indp".
    Loss per pair: -log s(beta [(U_w - U_l) - (D_l - D_w)]) + l1_reward (|m_u(y_w)| +
    |m_u(y_l)|) + l1_kl (|m_d(y_w)| + |m_d(y_l)|), L1 norms over completion tokens. Gradients
    reach the masks (the mask head trains through this loss). Rewards: beta (U - D).

    `halve_common_l1`: with the common mask the official trainer halves both L1 weights in its
    constructor ("make up for double adding", since the one mask is penalised through both
    terms), so l1_reward = l1_kl = 0.001 there penalises |m| by 0.001 in total. False gives the
    loss function with the weights as passed.

    Metrics beyond TRL's: `mask/sparsity` (exact zeros of m_u over completion tokens; and
    `mask/kl_sparsity` for m_d), `mask/chosen_mean` / `mask/rejected_mean` (mean m_u over each
    side's completion tokens), `mask/eos` (mean m_u at each row's last completion token: the EOS
    of completions that end with one), and the official `SeqKL` / `WgtSeqKL` as
    `seq_kl/{chosen,rejected}` (sum of KL_t, the same as TDPO logs) and
    `masked_seq_kl/{chosen,rejected}` (sum of m_d KL_t: the D the loss uses).
    """
    check_beta(beta)
    _require(batch, "chosen_kl", "rejected_kl", "chosen_reward_mask", "rejected_reward_mask")
    m_u_w, m_u_l = batch.chosen_reward_mask, batch.rejected_reward_mask
    common = batch.chosen_kl_mask is None
    m_d_w = m_u_w if common else batch.chosen_kl_mask
    m_d_l = m_u_l if common else batch.rejected_kl_mask
    u_w, u_l, d_w, d_l = _masked_terms(batch, m_u_w, m_u_l, m_d_w, m_d_l)
    losses = -log_sigmoid(beta * ((u_w - u_l) - (d_l - d_w)))

    def l1(m_w, m_l):
        return masked_sum(jnp.abs(m_w), batch.chosen_mask) + masked_sum(
            jnp.abs(m_l), batch.rejected_mask
        )

    scale = 0.5 if common and halve_common_l1 else 1.0
    if l1_reward:
        losses = losses + scale * l1_reward * l1(m_u_w, m_u_l)
    if l1_kl:
        losses = losses + scale * l1_kl * l1(m_d_w, m_d_l)
    sg = lax.stop_gradient
    extra = {
        "mask/sparsity": sparsity(m_u_w, m_u_l, batch),
        "mask/chosen_mean": sg(_token_mean(m_u_w, batch.chosen_mask)),
        "mask/rejected_mean": sg(_token_mean(m_u_l, batch.rejected_mask)),
        "mask/eos": sg(_last_token_mean(m_u_w, m_u_l, batch)),
        "seq_kl/chosen": sg(jnp.mean(masked_sum(batch.chosen_kl, batch.chosen_mask))),
        "seq_kl/rejected": sg(jnp.mean(masked_sum(batch.rejected_kl, batch.rejected_mask))),
        "masked_seq_kl/chosen": sg(jnp.mean(d_w)),
        "masked_seq_kl/rejected": sg(jnp.mean(d_l)),
    }
    if not common:
        extra["mask/kl_sparsity"] = sparsity(m_d_w, m_d_l, batch)
    return _output("sparsepo", losses, beta * (u_w - d_w), beta * (u_l - d_l), batch, extra)


def _token_mean(values, mask):
    return jnp.sum(masked_sum(values, mask)) / jnp.maximum(jnp.sum(mask != 0), 1)


def _last_token_mean(m_w, m_l, batch):
    """Mean of the masks at each non-empty row's last completion token."""
    total, rows = 0.0, 0
    for m, mask in ((m_w, batch.chosen_mask), (m_l, batch.rejected_mask)):
        pos = completion_positions(mask)
        last = (pos == jnp.max(pos, axis=-1, keepdims=True)) & (mask != 0)
        total = total + jnp.sum(jnp.where(last, m, 0.0))
        rows = rows + jnp.sum(jnp.any(last, axis=-1))
    return total / jnp.maximum(rows, 1)


def mapo(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """MaPO (official `mapo_loss`): SparsePO's form with m_u = m_d = the detached activation mask
    (`ops.mapo_activation_mask`) in `chosen_reward_mask` / `rejected_reward_mask`, no L1."""
    check_beta(beta)
    _require(batch, "chosen_kl", "rejected_kl", "chosen_reward_mask", "rejected_reward_mask")
    m_w = lax.stop_gradient(batch.chosen_reward_mask)
    m_l = lax.stop_gradient(batch.rejected_reward_mask)
    u_w, u_l, d_w, d_l = _masked_terms(batch, m_w, m_l, m_w, m_l)
    losses = -log_sigmoid(beta * ((u_w - u_l) - (d_l - d_w)))
    return _output("mapo", losses, beta * (u_w - d_w), beta * (u_l - d_l), batch)


def constrained_beta_schedule(
    mask, *, beta=0.1, first_token_factor=5.0, bias_factor=20.0, bias_length=5
):
    """Qi et al.'s per-position beta_t (official `get_beta_list`): beta * first_token_factor at the
    first response token, beta * bias_factor for positions 2..bias_length, beta after. With the
    defaults: 0.5, 2.0 (t = 2..5), 0.1 (t > 5), the paper's values."""
    pos = completion_positions(mask)
    return jnp.where(
        pos == 1, beta * first_token_factor, jnp.where(pos <= bias_length, beta * bias_factor, beta)
    )


def token_constrained_sft(
    batch: PreferenceBatch,
    *,
    beta: float = 0.1,
    first_token_factor: float = 5.0,
    bias_factor: float = 20.0,
    bias_length: int = 5,
    surrogate: bool = False,
) -> LossOutput:
    """Token-wise constrained fine-tuning (Qi et al. 2024, arXiv:2406.05946 Eq. 3; official
    `soft_sft_loss`) on the chosen completions, against the aligned model (the reference).

    objective: mean_t (2 / beta_t) softplus(-beta_t Delta_t) = -mean_t (2/beta_t) log s(beta_t
    Delta_t); small beta_t approaches cross-entropy, large beta_t pins the token to the aligned
    model. `surrogate=True` gives the official code's gradient-equivalent form
    -mean_t sg(w_t) log pi(y_t), w_t = max(2 (1 - s(beta_t Delta_t)), 1e-3). Both are token
    means over the batch, kept as (sum, count).
    """
    check_beta(beta)
    if batch.ref_chosen_logps is None or batch.ref_chosen_logps.ndim != 2:
        raise ValueError("token_constrained_sft needs per-token `ref_chosen_logps` `[B, T]`")
    mask = batch.chosen_mask
    beta_t = constrained_beta_schedule(
        mask,
        beta=beta,
        first_token_factor=first_token_factor,
        bias_factor=bias_factor,
        bias_length=bias_length,
    )
    delta = _delta(batch, "chosen")
    if surrogate:
        w = lax.stop_gradient(jnp.maximum(2.0 * (1.0 - jax.nn.sigmoid(beta_t * delta)), 1e-3))
        per_token = -w * batch.chosen_logps
    else:
        per_token = (2.0 / beta_t) * jax.nn.softplus(-beta_t * delta)
    per_row = masked_sum(per_token, mask)
    count = jnp.sum(mask != 0).astype(per_row.dtype)
    name = "token_constrained_sft"
    zeros = jnp.zeros_like(per_row)
    return LossOutput(
        terms={name: LossTerm(jnp.sum(per_row), count)},
        losses=per_row / jnp.maximum(jnp.sum(mask != 0, axis=-1), 1),
        chosen_rewards=zeros,
        rejected_rewards=zeros,
        metrics={
            "delta/mean": lax.stop_gradient(masked_sum(delta, mask).sum() / jnp.maximum(count, 1.0))
        },
    )


MAPO_GROUPS = ("mlp", "attn", "resid")


@dataclasses.dataclass(frozen=True)
class MaPOMasks:
    """MaPO's mask provider (`losses.needs.MaskProvider`): the reference's activations grouped
    as in the official code (`ops.mapo_activation_mask`); no trainable heads.

    Attributes:
      groups: the activation groups used, a non-empty subset of `MAPO_GROUPS`.
    """

    groups: tuple[str, ...] = MAPO_GROUPS
    reads: ClassVar[str] = "activations"
    mask_names: ClassVar[tuple[str, ...]] = ("reward_mask",)

    def __post_init__(self):
        groups = tuple(self.groups)
        if not groups or set(groups) - set(MAPO_GROUPS):
            raise ValueError(f"`groups` must be a non-empty subset of {MAPO_GROUPS}, got {groups}")
        object.__setattr__(self, "groups", groups)

    def configure(self, **options) -> MaPOMasks:
        from alignjax.losses.sparse_mask import configure

        return configure(self, options)

    def heads(self, config, *, seed: int) -> dict:
        return {}

    def masks(self, heads, reference_output, loss_mask) -> dict:
        acts = reference_output.activations
        groups = {g: [a[g] for a in acts] for g in self.groups}
        return {"reward_mask": mapo_activation_mask(groups, loss_mask)}
