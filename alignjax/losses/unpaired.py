"""Unpaired losses: KTO and APO-zero-unpaired (specs/losses.md section 3), TRL 1.16.0 semantics,
and BCO (Jung et al. 2024, arXiv:2404.04656) with TRL 0.28's experimental BCOTrainer semantics.

Each row is one (prompt, completion) with a binary label: desirable (1) or undesirable (0).
KTO's reference point z0 is the policy/reference KL estimated on mismatched completions y'
(each prompt paired with another row's completion), averaged over the batch (and over devices
with `axis_name`, as TRL's gather-mean does), clamped at 0 and detached.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.needs import CarriedState
from alignjax.losses.types import LossOutput, check_beta, masked_sum, mean_term

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnpairedBatch:
    """N labelled completions.

    Attributes:
      logps: `[N, T]` policy per-token log-probs; mask: `[N, T]` completion mask.
      labels: `[N]` 1/True for desirable completions, 0/False for undesirable ones.
      ref_logps: `[N, T]` or precomputed `[N]` reference log-probs.
      kl_logps, ref_kl_logps: policy / reference log-probs of the mismatched completions,
        `[N, T']` per token (with `kl_mask`) or `[N]` sums; needed by `kto` only.
      kl_mask: `[N, T']` completion mask of the mismatched completions.
    """

    logps: jax.Array
    mask: jax.Array
    labels: jax.Array
    ref_logps: jax.Array | None = None
    kl_logps: jax.Array | None = None
    ref_kl_logps: jax.Array | None = None
    kl_mask: jax.Array | None = None

    def __post_init__(self):
        if not hasattr(self.logps, "shape"):
            return  # JAX rebuilding the pytree with placeholder leaves
        if len(self.logps.shape) < 2:
            raise ValueError(f"`logps` must be [N, T], got {tuple(self.logps.shape)}")
        rows = tuple(self.logps.shape[:-1])  # (N,), or with leading (device, ...) axes
        if tuple(self.mask.shape) != tuple(self.logps.shape):
            raise ValueError(
                f"`mask` must have shape {tuple(self.logps.shape)}, got {tuple(self.mask.shape)}"
            )
        if hasattr(self.labels, "shape") and tuple(self.labels.shape) != rows:
            raise ValueError(f"`labels` must be [N] = {rows}, got {tuple(self.labels.shape)}")
        for name in ("ref_logps", "kl_logps", "ref_kl_logps"):
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape[: len(rows)]) != rows:
                raise ValueError(f"`{name}` must have N = {rows} rows, got {tuple(v.shape)}")


def _labelled_metrics(desirable, rewards, seq) -> dict:
    """TRL's per-kind averages: each kind over its own rows (0 when the batch has none)."""
    n_d = jnp.sum(desirable).astype(rewards.dtype)
    n_u = jnp.sum(~desirable).astype(rewards.dtype)

    def mean_d(x):
        return jnp.sum(jnp.where(desirable, x, 0.0)) / jnp.maximum(n_d, 1.0)

    def mean_u(x):
        return jnp.sum(jnp.where(desirable, 0.0, x)) / jnp.maximum(n_u, 1.0)

    return {
        "rewards/chosen": mean_d(rewards),
        "rewards/rejected": mean_u(rewards),
        "rewards/margins": mean_d(rewards) - mean_u(rewards),
        "logps/chosen": lax.stop_gradient(mean_d(seq)),
        "logps/rejected": lax.stop_gradient(mean_u(seq)),
    }


def kto(
    batch: UnpairedBatch,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    axis_name: str | None = None,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306 Eq. 7) or APO-zero-unpaired (arXiv:2408.06266).

    r = logp - logp_ref (sums). kto: desirable w_d (1 - s(beta (r - z0))), undesirable
    w_u (1 - s(beta (z0 - r))), z0 = max(0, mean(logp(y') - logp_ref(y'))) without gradient.
    apo_zero_unpaired: desirable w_d (1 - s(beta r)), undesirable w_u s(beta r). The loss is
    the mean over all rows. `chosen_rewards` / `rejected_rewards` hold beta * r on desirable /
    undesirable rows and 0 on the others; the metrics average each kind over its own rows.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO `loss_type` {loss_type!r}; valid: {list(KTO_LOSS_TYPES)}")
    check_beta(beta)
    if batch.ref_logps is None:
        raise ValueError("KTO needs `ref_logps`")
    desirable = batch.labels != 0
    seq = masked_sum(batch.logps, batch.mask)
    r = seq - lax.stop_gradient(masked_sum(batch.ref_logps, batch.mask))
    if loss_type == "kto":
        if batch.kl_logps is None or batch.ref_kl_logps is None:
            raise ValueError(
                "`kto` needs `kl_logps` and `ref_kl_logps` (mismatched completions); "
                "use loss_type='apo_zero_unpaired' for no KL term"
            )
        gap = jnp.mean(
            masked_sum(batch.kl_logps, batch.kl_mask)
            - masked_sum(batch.ref_kl_logps, batch.kl_mask)
        )
        if axis_name is not None:
            gap = lax.pmean(gap, axis_name)
        z0 = lax.stop_gradient(jnp.maximum(gap, 0.0))
        losses = jnp.where(
            desirable,
            desirable_weight * (1 - jax.nn.sigmoid(beta * (r - z0))),
            undesirable_weight * (1 - jax.nn.sigmoid(beta * (z0 - r))),
        )
    else:
        z0 = jnp.zeros((), r.dtype)
        losses = jnp.where(
            desirable,
            desirable_weight * (1 - jax.nn.sigmoid(beta * r)),
            undesirable_weight * jax.nn.sigmoid(beta * r),
        )
    rewards = lax.stop_gradient(beta * r)
    metrics = _labelled_metrics(desirable, rewards, seq)
    metrics["kl"] = z0
    return LossOutput(
        terms={loss_type: mean_term(losses)},
        losses=losses,
        chosen_rewards=jnp.where(desirable, rewards, 0.0),
        rejected_rewards=jnp.where(desirable, 0.0, rewards),
        metrics=metrics,
    )


class RewardMoments(NamedTuple):
    """BCO's running reward statistics (TRL's `RunningMoments`): mean, population variance and
    count, starting at (0, 1, 1e-24). A pytree: keep it in the train state."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_reward_moments(dtype=jnp.float32) -> RewardMoments:
    """TRL's initial state. TRL holds the statistics in float32; pass float64 to do better."""
    return RewardMoments(jnp.zeros((), dtype), jnp.ones((), dtype), jnp.asarray(1e-24, dtype))


def update_reward_moments(
    state: RewardMoments,
    rewards: jax.Array,
    mask: jax.Array | None = None,
    *,
    axis_name: str | None = None,
) -> RewardMoments:
    """Fold a batch of rewards into the running moments (Chan et al.'s parallel update, as TRL).

    `mask` ([N], optional) selects the rows that count; with `axis_name` the batch statistics
    are taken over all devices (TRL's cross-rank `get_global_statistics`). The result is
    detached and has the dtype of `state`.
    """
    rewards = lax.stop_gradient(jnp.asarray(rewards))
    if rewards.ndim != 1:
        raise ValueError(f"`rewards` must be [N], got shape {tuple(rewards.shape)}")
    m = jnp.ones_like(rewards) if mask is None else jnp.asarray(mask, rewards.dtype)
    if m.shape != rewards.shape:
        raise ValueError(f"`mask` must have shape {tuple(rewards.shape)}, got {tuple(m.shape)}")
    total, n = jnp.sum(rewards * m), jnp.sum(m)
    if axis_name is not None:
        total, n = lax.psum(total, axis_name), lax.psum(n, axis_name)
    batch_mean = total / jnp.maximum(n, 1.0)
    sq = jnp.sum(jnp.square(rewards - batch_mean) * m)
    if axis_name is not None:
        sq = lax.psum(sq, axis_name)
    batch_var = sq / jnp.maximum(n, 1.0)
    dt = state.mean.dtype
    batch_mean, batch_var, n = batch_mean.astype(dt), batch_var.astype(dt), n.astype(dt)
    delta = batch_mean - state.mean
    count = state.count + n
    m2 = state.var * state.count + delta**2 * state.count * n / count + batch_var * n
    new = RewardMoments(state.mean + delta * n / count, m2 / count, count)
    # An empty batch (n = 0) leaves the state unchanged.
    return jax.tree.map(lambda a, b: jnp.where(n > 0, a, b), new, state)


def bco_udm_weights(
    prob_desirable: jax.Array, *, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0
) -> jax.Array:
    """BCO's underlying-distribution-matching weights from a prompt classifier's P(desirable):
    clip(p / (1 - p + 1e-8), min_density_ratio, max_density_ratio) (TRL's `_get_udm_weight`;
    defaults are BCOConfig's). The classifier itself (TRL fits a logistic regression on prompt
    embeddings) is the caller's."""
    p = jnp.asarray(prob_desirable)
    return jnp.clip(p / (1 - p + 1e-8), min_density_ratio, max_density_ratio)


def bco(
    batch: UnpairedBatch,
    *,
    beta: float = 0.1,
    delta: jax.Array | float | None = None,
    udm_weights: jax.Array | None = None,
    axis_name: str | None = None,
) -> LossOutput:
    """BCO, unpaired (arXiv:2404.04656 Eq. 8; TRL 0.28 `BCOTrainer.bco_loss`).

    r = beta (logp - logp_ref) (sums). Desirable rows: -log s(r - delta); undesirable rows:
    -log s(-(r - delta)), times `udm_weights` ([N], used on undesirable rows only) when given.
    The loss is the mean over all rows.

    `delta` is the running mean of all rewards, detached. TRL first folds the current batch's
    rewards into its running moments and then uses their mean; do the same with
    `update_reward_moments(state, bco_rewards(batch, beta))` and pass `delta=state.mean`.
    Without `delta` the mean reward of this batch (over devices with `axis_name`) is used,
    which is what TRL's first step computes.
    """
    check_beta(beta)
    if batch.ref_logps is None:
        raise ValueError("BCO needs `ref_logps`")
    desirable = batch.labels != 0
    seq = masked_sum(batch.logps, batch.mask)
    r = beta * (seq - lax.stop_gradient(masked_sum(batch.ref_logps, batch.mask)))
    if delta is None:
        total, n = jnp.sum(r), jnp.asarray(r.shape[0], r.dtype)
        if axis_name is not None:
            total, n = lax.psum(total, axis_name), lax.psum(n, axis_name)
        delta = total / n
    delta = lax.stop_gradient(jnp.asarray(delta, r.dtype))
    if delta.shape != ():
        raise ValueError(f"`delta` must be a scalar, got shape {tuple(delta.shape)}")
    losses = jnp.where(desirable, -jax.nn.log_sigmoid(r - delta), -jax.nn.log_sigmoid(delta - r))
    if udm_weights is not None:
        w = jnp.asarray(udm_weights, r.dtype)
        if w.shape != r.shape:
            raise ValueError(f"`udm_weights` must be [N] = {tuple(r.shape)}, got {tuple(w.shape)}")
        losses = jnp.where(desirable, losses, w * losses)
    rewards = lax.stop_gradient(r)
    metrics = _labelled_metrics(desirable, rewards, seq)
    metrics["delta"] = delta
    return LossOutput(
        terms={"bco": mean_term(losses)},
        losses=losses,
        chosen_rewards=jnp.where(desirable, rewards, 0.0),
        rejected_rewards=jnp.where(desirable, 0.0, rewards),
        metrics=metrics,
    )


def bco_rewards(batch: UnpairedBatch, beta: float = 0.1) -> jax.Array:
    """beta (logp - logp_ref) per row, detached: what BCO's running moments are fed."""
    if batch.ref_logps is None:
        raise ValueError("BCO needs `ref_logps`")
    seq = masked_sum(batch.logps, batch.mask) - masked_sum(batch.ref_logps, batch.mask)
    return lax.stop_gradient(beta * seq)


def _fold_bco_rewards(state, batch, valid, kwargs, axis_name=None):
    """TRL's order: fold this batch's rewards into the running moments first."""
    rewards = bco_rewards(batch, kwargs.get("beta", 0.1))
    return update_reward_moments(state, rewards, valid, axis_name=axis_name)


def _bco_delta(state, kwargs) -> dict:
    return {**kwargs, "delta": state.mean}


BCO_MOMENTS = CarriedState(init=init_reward_moments, update=_fold_bco_rewards, apply=_bco_delta)
"""BCO's running reward mean (TRL's `RunningMoments`) as a loss's carried state: folded in
before every step's loss, which then uses delta = the running mean."""
