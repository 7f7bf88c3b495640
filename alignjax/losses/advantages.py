"""Rewards -> advantages for the on-policy losses, with TRL 1.16.0 semantics (specs/online.md
sections 3.2 and 3.3).

Rewards arrive as `[B]` or `[B, K]` (K reward functions) with NaN where a function returned None.
Rows are laid out as TRL's sampler lays them out: consecutive groups of `num_generations`
completions of the same prompt. Everything here is computed without gradient (rewards and
advantages are constants of the loss) and is jit-friendly; `num_generations` and the string
options are static.

TRL computes advantages on the *global* generation batch (rewards gathered over processes),
then keeps each process's slice: call these functions on the gathered rewards (e.g. after
`lax.all_gather(..., tiled=True)`), since group and batch statistics couple rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.ops import _checks as C

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# `torch.isclose(std, 0)` with its default atol: TRL's test for a zero-std group.
ZERO_STD_ATOL = 1e-8


def nanstd(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Bessel-corrected standard deviation ignoring NaN; NaN where fewer than two values are
    present (TRL 1.16 `trainer/utils.py` `nanstd`, same order of operations)."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(x.dtype)
    correction = jnp.where(count > 1, count / (count - 1), jnp.nan)
    std = jnp.sqrt(var * correction)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def _reward_matrix(rewards) -> jax.Array:
    r = C.as_array("rewards", rewards)
    if r.ndim not in (1, 2) or r.shape[0] == 0:
        raise ValueError(f"`rewards` must be [B] or [B, K] with B > 0, got shape {r.shape}")
    r = r.astype(C.result_dtype(r.dtype))
    return r[:, None] if r.ndim == 1 else r


def _weights(reward_weights, k: int, dtype) -> jax.Array:
    if reward_weights is None:
        return jnp.ones((k,), dtype)
    w = jnp.asarray(reward_weights, dtype)
    if w.shape != (k,):
        raise ValueError(f"`reward_weights` must have one weight per reward function ({k}), "
                         f"got shape {w.shape}")  # fmt: skip
    return w


def _groups(batch: int, num_generations) -> int:
    g = num_generations
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
        raise ValueError(f"`num_generations` must be a positive int, got {g!r}")
    if batch % g:
        raise ValueError(
            f"`num_generations`={g} must divide the batch ({batch} rows of consecutive groups)"
        )
    return int(g)


def combine_rewards(rewards, reward_weights=None) -> jax.Array:
    """R_i = nansum_k w_k r_ik over the reward functions (TRL's `sum_then_normalize` sum).

    A row where *every* function returned None (NaN) is unscorable and stays NaN, so the
    nan-aware statistics skip it (TRL 1.16 `grpo_trainer.py` L2756-2764); a row with some
    functions None sums the others. `rewards` `[B]` or `[B, K]`, `reward_weights` `[K]`.
    """
    r = _reward_matrix(rewards)
    w = _weights(reward_weights, r.shape[1], r.dtype)
    total = jnp.nansum(r * w, axis=1)
    return jnp.where(jnp.all(jnp.isnan(r), axis=1), jnp.nan, total)


def reward_metrics(rewards, reward_weights=None, reward_names: Sequence[str] | None = None):
    """TRL's reward metrics: `reward` / `reward_std` (nan-aware mean and Bessel std of the
    weighted sum over scorable rows) and, for `[B, K]` rewards, `rewards/{name}/mean|std` per
    function (names default to the column index)."""
    r = _reward_matrix(rewards)
    total = combine_rewards(r, reward_weights)
    metrics = {"reward": jnp.nanmean(total), "reward_std": nanstd(total)}
    if jnp.ndim(rewards) == 2:
        names = [str(k) for k in range(r.shape[1])] if reward_names is None else reward_names
        if len(names) != r.shape[1]:
            raise ValueError(f"`reward_names` must name the {r.shape[1]} reward functions, "
                             f"got {len(names)}")  # fmt: skip
        for k, name in enumerate(names):
            metrics[f"rewards/{name}/mean"] = jnp.nanmean(r[:, k])
            metrics[f"rewards/{name}/std"] = nanstd(r[:, k])
    return metrics


def _zero_std_fraction(std: jax.Array) -> jax.Array:
    """Fraction of rows whose (group or batch) std is ~0; NaN (too few scorable) is not 0."""
    return jnp.mean((jnp.abs(std) <= ZERO_STD_ATOL).astype(std.dtype))


def group_advantages(
    rewards,
    num_generations: int,
    *,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    reward_weights=None,
    multi_objective_aggregation: str = "sum_then_normalize",
    reward_names: Sequence[str] | None = None,
) -> tuple[jax.Array, dict]:
    """Group-relative advantages of GRPO (Shao et al. 2024, arXiv:2402.03300, Sec. 4.1.2) as
    TRL 1.16 `GRPOTrainer._generate_and_score_completions` computes them (L2756-2810).

    `sum_then_normalize` (default): R = `combine_rewards(...)`, mu_g the nan-mean of R over the
    group, and
        A_i = (R_i - mu_g) / (sigma + eps)
    with sigma the Bessel nan-std of the group (`scale_rewards="group"`), of the whole batch
    (`"batch"`), or no division at all (`"none"`; Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).
    eps is added to the std (TRL 1e-4; Tunix uses 1e-6). With `num_generations=1` the group std
    is 0 (TRL's eval-time branch).

    `normalize_then_sum` (GDPO): each function is z-scored within its group first (eps added to
    its std), the weighted nansum of the z-scores is then z-scored over the batch; TRL ignores
    `scale_rewards` on this path, and so does this function.

    Rows whose rewards are all NaN get advantage 0 and are left out of every statistic; a group
    with a single scorable row has a NaN std and all its advantages are 0 (except under
    `"none"`, where the scorable row's own R - mu = 0 anyway).

    Returns `(advantages [B], metrics)`; metrics: `frac_reward_zero_std` (the fraction of rows
    whose std (group, or batch for "batch" / `normalize_then_sum`) is <= 1e-8: such groups give
    no gradient), `reward`, `reward_std`, `rewards/{name}/mean|std` for `[B, K]` rewards.
    """
    r = _reward_matrix(rewards)
    b, k = r.shape
    g = _groups(b, num_generations)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`scale_rewards` must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if multi_objective_aggregation not in AGGREGATIONS:
        raise ValueError(f"`multi_objective_aggregation` must be one of {AGGREGATIONS}, "
                         f"got {multi_objective_aggregation!r}")  # fmt: skip
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"`eps` must be >= 0, got {eps}")
    w = _weights(reward_weights, k, r.dtype)
    unscorable = jnp.all(jnp.isnan(r), axis=1)

    if multi_objective_aggregation == "sum_then_normalize":
        total = combine_rewards(r, w)
        grouped = total.reshape(-1, g)
        mean = jnp.repeat(jnp.nanmean(grouped, axis=1), g)
        if scale_rewards == "batch":
            std = jnp.broadcast_to(nanstd(total), (b,)) if b > 1 else jnp.zeros((b,), r.dtype)
        else:  # "group", and "none" (where the std is only logged)
            std = jnp.repeat(nanstd(grouped, axis=1), g) if g > 1 else jnp.zeros((b,), r.dtype)
        adv = total - mean
        if scale_rewards != "none":
            adv = adv / (std + eps)
    else:
        grouped = r.reshape(-1, g, k)
        mean_k = jnp.nanmean(grouped, axis=1, keepdims=True)
        std_k = nanstd(grouped, axis=1, keepdims=True) if g > 1 else jnp.zeros_like(mean_k)
        z = ((grouped - mean_k) / (std_k + eps)).reshape(b, k)
        total = jnp.where(unscorable, jnp.nan, jnp.nansum(z * w, axis=1))
        std = jnp.broadcast_to(nanstd(total), (b,)) if b > 1 else jnp.zeros((b,), r.dtype)
        adv = (total - jnp.nanmean(total)) / (std + eps)

    adv = jax.lax.stop_gradient(jnp.nan_to_num(adv, nan=0.0))
    metrics = reward_metrics(rewards, w, reward_names)
    metrics["frac_reward_zero_std"] = _zero_std_fraction(std)
    return adv, jax.tree.map(jax.lax.stop_gradient, metrics)


def rloo_advantages(
    rewards,
    num_generations: int,
    *,
    beta: float = 0.05,
    old_logps=None,
    ref_logps=None,
    mask=None,
    normalize: bool = False,
    reward_weights=None,
    reward_clip_range: tuple[float, float] | None = None,
    eps: float = 1e-4,
    reward_names: Sequence[str] | None = None,
) -> tuple[jax.Array, dict]:
    """REINFORCE leave-one-out advantages with the KL in the reward (Ahmadian et al. 2024,
    arXiv:2402.14740, Eq. 6-7) as TRL 1.16 `RLOOTrainer._generate_and_score_completions`
    computes them (L1650-1700):

        R_i' = clip(R_i) - beta * sum_t m_it (old_logp_it - ref_logp_it)      (k1, sequence sum)
        b_i  = (sum_{j in group, scorable} R_j' - R_i') / (n_scorable - 1)
        A_i  = R_i' - b_i        [then (A - mean) / (std + eps) over the batch if `normalize`]

    R = `combine_rewards(...)` (unscorable rows NaN), clipped to `reward_clip_range` when given.
    `old_logps` are the sampling policy's per-token log-probs (`[B, T]`, no gradient), `ref_logps`
    the reference's, `mask` the completion mask; all three are needed only when beta != 0.
    Unscorable rows, and every row of a group with a single scorable completion (0 / 0), get 0.

    Returns `(advantages [B], metrics)`; metrics: `kl` (token mean of old - ref over the mask,
    when beta != 0), `frac_reward_zero_std` (groups whose std of R' is ~0), `reward`,
    `reward_std` and `rewards/{name}/mean|std` of the raw rewards (before clipping and KL).
    """
    r = _reward_matrix(rewards)
    b = r.shape[0]
    g = _groups(b, num_generations)
    if isinstance(beta, (int, float)) and not beta >= 0:
        raise ValueError(f"`beta` must be >= 0, got {beta}")
    w = _weights(reward_weights, r.shape[1], r.dtype)
    total = combine_rewards(r, w)
    if reward_clip_range is not None:
        lo, hi = reward_clip_range
        total = jnp.clip(total, lo, hi)
    metrics = {}
    if not (isinstance(beta, (int, float)) and beta == 0):
        if old_logps is None or ref_logps is None or mask is None:
            raise ValueError("beta != 0 folds the KL into the reward: give `old_logps`, "
                             "`ref_logps` and `mask` ([B, T])")  # fmt: skip
        old = C.as_array("old_logps", old_logps)
        ref = C.as_array("ref_logps", ref_logps)
        keep = C.as_array("mask", mask) != 0
        for name, v in (("old_logps", old), ("ref_logps", ref), ("mask", keep)):
            if v.ndim != 2 or v.shape[0] != b:
                raise ValueError(f"`{name}` must be [B, T] with B = {b}, got {v.shape}")
        if ref.shape != old.shape or keep.shape != old.shape:
            raise ValueError(f"`old_logps` {old.shape}, `ref_logps` {ref.shape} and `mask` "
                             f"{keep.shape} must have the same shape")  # fmt: skip
        per_token = jnp.where(keep, (old - ref).astype(r.dtype), 0.0)
        total = total - beta * jnp.sum(per_token, axis=1)
        metrics["kl"] = jnp.sum(per_token) / jnp.maximum(jnp.sum(keep), 1)

    grouped = total.reshape(-1, g)
    std = nanstd(grouped, axis=1) if g > 1 else jnp.zeros((b // g,), r.dtype)
    if g > 1:
        scorable = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True).astype(r.dtype)
        baseline = (jnp.nansum(grouped, axis=1, keepdims=True) - grouped) / (scorable - 1)
        adv = total - baseline.reshape(-1)
    else:
        adv = jnp.zeros((b,), r.dtype)
    if normalize:
        adv = (adv - jnp.nanmean(adv)) / (nanstd(adv) + eps)
    adv = jax.lax.stop_gradient(jnp.nan_to_num(adv, nan=0.0))
    metrics.update(reward_metrics(rewards, w, reward_names))
    metrics["frac_reward_zero_std"] = _zero_std_fraction(std)
    return adv, jax.tree.map(jax.lax.stop_gradient, metrics)
