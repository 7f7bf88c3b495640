"""Unpaired losses: KTO and APO-zero-unpaired (specs/losses.md section 3), TRL 1.16.0 semantics.

Each row is one (prompt, completion) with a binary label: desirable (1) or undesirable (0).
KTO's reference point z0 is the policy/reference KL estimated on mismatched completions y'
(each prompt paired with another row's completion), averaged over the batch (and over devices
with `axis_name`, as TRL's gather-mean does), clamped at 0 and detached.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

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
        n = self.logps.shape[0]
        if tuple(self.mask.shape) != tuple(self.logps.shape):
            raise ValueError(
                f"`mask` must have shape {tuple(self.logps.shape)}, got {tuple(self.mask.shape)}"
            )
        if hasattr(self.labels, "shape") and tuple(self.labels.shape) != (n,):
            raise ValueError(f"`labels` must be [N] = ({n},), got {tuple(self.labels.shape)}")
        for name in ("ref_logps", "kl_logps", "ref_kl_logps"):
            v = getattr(self, name)
            if hasattr(v, "shape") and v.shape[0] != n:
                raise ValueError(f"`{name}` must have N = {n} rows, got {tuple(v.shape)}")


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
    n_d = jnp.sum(desirable).astype(r.dtype)
    n_u = jnp.sum(~desirable).astype(r.dtype)

    def mean_d(x):
        return jnp.sum(jnp.where(desirable, x, 0.0)) / jnp.maximum(n_d, 1.0)

    def mean_u(x):
        return jnp.sum(jnp.where(desirable, 0.0, x)) / jnp.maximum(n_u, 1.0)

    metrics = {
        "rewards/chosen": mean_d(rewards),
        "rewards/rejected": mean_u(rewards),
        "rewards/margins": mean_d(rewards) - mean_u(rewards),
        "logps/chosen": lax.stop_gradient(mean_d(seq)),
        "logps/rejected": lax.stop_gradient(mean_u(seq)),
        "kl": z0,
    }
    return LossOutput(
        terms={loss_type: mean_term(losses)},
        losses=losses,
        chosen_rewards=jnp.where(desirable, rewards, 0.0),
        rejected_rewards=jnp.where(desirable, 0.0, rewards),
        metrics=metrics,
    )
