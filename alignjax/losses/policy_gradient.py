"""Policy-gradient losses on sampled completions: TRL 1.16.0's GRPO family and RLOO, and the
KL-regularised REINFORCE of Korbak et al. (specs/online.md sections 3.1-3.3).

A `RolloutBatch` holds per-token log-probs of B sampled completions under the policy being
trained (with gradient), under the sampling policy (`old_logps`; None = on-policy, i.e. the
stop-gradient of `logps`, TRL's choice when generation and optimisation steps are aligned) and
under the reference, with the completion mask and per-row advantages (see
`losses.advantages`). Losses return a `LossOutput` whose single term is an unreduced
(total, count) pair: summing totals and counts over micro-batches and devices before dividing
gives the loss of the whole batch exactly (see each loss for its count).

    >>> import jax, jax.numpy as jnp
    >>> from alignjax import losses as L
    >>> adv, metrics = L.group_advantages(jnp.array([1.0, 0.0, 0.5, 0.5]), num_generations=2)
    >>> [round(float(a), 4) for a in adv], float(metrics["frac_reward_zero_std"])
    ([0.707, -0.707, 0.0, 0.0], 0.5)
    >>> def loss(logps):
    ...     batch = L.RolloutBatch(logps=logps, mask=jnp.ones((4, 2)), advantages=adv)
    ...     return L.grpo_loss(batch, loss_type="grpo").loss
    >>> value, grad = jax.value_and_grad(loss)(jnp.full((4, 2), -1.0))
    >>> abs(float(value)) < 1e-7, round(float(grad[0, 0]), 4)  # on-policy: value 0, gradient not
    (True, -0.0884)

Numerics: importance ratios exponentiate log-ratios with `kl_estimators.clamped_exp` (exponent
clamped above at `MAX_LOG_RATIO` = 20), as the k3 estimator does: values and gradients stay
finite in float32 for any input; TRL, which does not clamp, agrees whenever the log-ratio is
<= 20.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.kl_estimators import clamped_exp, kl_k1, kl_k3
from alignjax.losses.types import LossOutput, LossTerm
from alignjax.ops import _checks as C

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """B sampled completions, per token.

    Attributes:
      logps: `[B, T]` log-probs of the sampled tokens under the policy being trained (at the
        sampling temperature; values off the mask are ignored).
      mask: `[B, T]` 0/1 completion mask (1 through the stop token).
      advantages: `[B]` per-completion advantages (no gradient flows into them).
      old_logps: `[B, T]` log-probs under the policy that sampled the batch (no gradient);
        None = on-policy (`stop_gradient(logps)`, ratio 1 with the gradient of log pi).
      ref_logps: `[B, T]` reference log-probs (no gradient), for the KL terms.
      entropy: `[B, T]` per-token entropies of the policy, only logged (`entropy` metric).
    """

    logps: jax.Array
    mask: jax.Array
    advantages: jax.Array | None = None
    old_logps: jax.Array | None = None
    ref_logps: jax.Array | None = None
    entropy: jax.Array | None = None

    def __post_init__(self):
        if not hasattr(self.logps, "shape"):
            return  # JAX rebuilding the pytree with placeholder leaves: nothing to validate
        C.check_floating("logps", self.logps)
        if self.mask is None:
            raise ValueError("`mask` ([B, T] completion mask) is required")
        shape = tuple(self.logps.shape)
        # Leading axes (a device axis for pmap, a micro-batch axis) are allowed: [..., B, T].
        if len(shape) < 2:
            raise ValueError(f"`logps` must be [B, T], got shape {shape}")
        expected = dict.fromkeys(("mask", "old_logps", "ref_logps", "entropy"), shape)
        for name, want in dict(expected, advantages=shape[:-1]).items():
            v = getattr(self, name)
            if hasattr(v, "shape") and tuple(v.shape) != want:
                raise ValueError(f"`{name}` must have shape {want}, got {tuple(v.shape)}")


def _is_zero(x) -> bool:
    return isinstance(x, numbers.Real) and x == 0


def _check_positive(name: str, value) -> None:
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")


def _check_beta(beta) -> None:
    if isinstance(beta, numbers.Real) and not beta >= 0:
        raise ValueError(f"`beta` must be >= 0, got {beta}")


def _check_clip(epsilon, epsilon_high):
    _check_positive("epsilon", epsilon)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    _check_positive("epsilon_high", epsilon_high)
    return epsilon_high


def _prepare(batch: RolloutBatch, need_advantages: bool = True):
    if batch.logps.ndim != 2:
        raise ValueError(f"a loss reads one [B, T] batch, `logps` has shape {batch.logps.shape}: "
                         "map leading axes with vmap / pmap / scan")  # fmt: skip
    dtype = C.result_dtype(batch.logps.dtype)
    logps = batch.logps.astype(dtype)
    old = logps if batch.old_logps is None else batch.old_logps.astype(dtype)
    keep = batch.mask != 0
    if need_advantages and batch.advantages is None:
        raise ValueError("this loss needs `advantages` ([B]) in the RolloutBatch")
    adv = None if batch.advantages is None else lax.stop_gradient(batch.advantages.astype(dtype))
    return logps, lax.stop_gradient(old), keep, adv


def _masked_mean(x, keep, axis_name):
    total, count = jnp.sum(jnp.where(keep, x, 0.0)), jnp.sum(keep).astype(x.dtype)
    if axis_name is not None:
        total, count = lax.psum((total, count), axis_name)
    return total / jnp.maximum(count, 1.0)


def _rows_min_max(values, rows, axis_name):
    """(min, max) over the rows selected by `rows`, NaN when there are none."""
    lo = jnp.min(jnp.where(rows, values, jnp.inf))
    hi = jnp.max(jnp.where(rows, values, -jnp.inf))
    if axis_name is not None:
        lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
    return jnp.where(jnp.isinf(lo), jnp.nan, lo), jnp.where(jnp.isinf(hi), jnp.nan, hi)


def _clip_metrics(ratio, adv, eps_low, eps_high, keep, per_token, axis_name) -> dict:
    """TRL's clip fractions. `per_token`: `ratio` is `[B, T]`, means run over the completion
    tokens and min / max over the non-empty rows' means; otherwise `ratio` is `[B, 1]` or `[B]`
    and everything runs over all rows."""
    low = ((ratio < 1 - eps_low) & (adv < 0)).astype(ratio.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).astype(ratio.dtype)
    region = jnp.maximum(low, high)
    if per_token:
        n = jnp.sum(keep, axis=1)
        rows, sel = n > 0, keep
        row_low = jnp.sum(jnp.where(keep, low, 0.0), 1) / jnp.maximum(n, 1)
        row_high = jnp.sum(jnp.where(keep, high, 0.0), 1) / jnp.maximum(n, 1)
    else:
        low, high, region = (x.reshape(-1) for x in (low, high, region))
        rows = sel = jnp.ones(low.shape, bool)
        row_low, row_high = low, high
    return {
        "clip_ratio/low_mean": _masked_mean(low, sel, axis_name),
        "clip_ratio/low_min": _rows_min_max(row_low, rows, axis_name)[0],
        "clip_ratio/high_mean": _masked_mean(high, sel, axis_name),
        "clip_ratio/high_max": _rows_min_max(row_high, rows, axis_name)[1],
        "clip_ratio/region_mean": _masked_mean(region, sel, axis_name),
    }


def _pg_output(name, term, per_row, metrics) -> LossOutput:
    zeros = jnp.zeros(per_row.shape, per_row.dtype)
    metrics = {k: lax.stop_gradient(v) for k, v in metrics.items()}
    return LossOutput({name: term}, per_row, zeros, zeros, metrics)


def grpo_per_token_loss(
    batch: RolloutBatch,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    importance_sampling_level: str = "token",
):
    """The per-token GRPO objective of TRL 1.16 `GRPOTrainer._compute_loss` (L3083-3150):

        w_t   = log pi_t - log pi_old,t                     (token level), or
        w     = sum_t m_t (log pi_t - log pi_old,t) / max(|y|, 1)   (sequence level, GSPO,
                Zheng et al. 2025, arXiv:2507.18071)
        rho   = e^w,   l_t = -min(min(rho, delta) A, clip(rho, 1 - eps, 1 + eps_high) A)
                (PPO clip, Schulman et al. 2017, arXiv:1707.06347; `delta`: INTELLECT-2's
                two-sided clip, arXiv:2505.07291; eps_high != eps: DAPO's clip-higher,
                arXiv:2503.14476)
        l_t  += beta * k3_t   (times rho, before `delta`, when `use_bias_correction_kl`)

    Returns `(per_token_loss [B, T], ratio, kl)`: `ratio` is min(rho, delta) (what TRL's clip
    metrics read), `[B, T]` or `[B, 1]` by level; `kl` the per-token KL term `[B, T]` (None when
    beta is a concrete 0, where no reference is needed). Values off the mask are not zeroed.
    """
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"`importance_sampling_level` must be one of {IS_LEVELS}, "
                         f"got {importance_sampling_level!r}")  # fmt: skip
    _check_beta(beta)
    epsilon_high = _check_clip(epsilon, epsilon_high)
    if delta is not None:
        _check_positive("delta", delta)
    logps, old, keep, adv = _prepare(batch)
    log_w = logps - old
    if importance_sampling_level == "sequence":
        n = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1).astype(logps.dtype)
        log_w = jnp.sum(jnp.where(keep, log_w, 0.0), axis=-1, keepdims=True) / n
    rho = clamped_exp(log_w)
    a = adv[:, None]
    clipped = jnp.clip(rho, 1.0 - epsilon, 1.0 + epsilon_high)
    ratio = rho if delta is None else jnp.minimum(rho, delta)
    per_token = -jnp.minimum(ratio * a, clipped * a)
    kl = None
    if not _is_zero(beta):
        if batch.ref_logps is None:
            raise ValueError("beta != 0 needs `ref_logps` in the RolloutBatch")
        kl = kl_k3(logps, lax.stop_gradient(batch.ref_logps.astype(logps.dtype)))
        if use_bias_correction_kl:
            kl = kl * rho
        per_token = per_token + beta * kl
    return jnp.broadcast_to(per_token, logps.shape), ratio, kl


def grpo_loss(
    batch: RolloutBatch,
    *,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    axis_name: str | None = None,
) -> LossOutput:
    """GRPO-family loss with TRL 1.16.0 semantics (defaults = `GRPOConfig`'s): the per-token
    objective of `grpo_per_token_loss`, aggregated (`_compute_loss` L3153-3185) as one
    (total, count) term named `loss_type`:

      * `dapo` (DAPO, arXiv:2503.14476): (sum m l, sum m), the token mean over the global batch,
        which is what TRL's `num_items_in_batch` normaliser yields after accumulation and DDP.
      * `grpo` (arXiv:2402.03300): (sum_i [sum_t m l / max(|y_i|, 1)], B), the mean over rows
        (empty rows included, as in TRL) of per-row token means.
      * `dr_grpo` (Dr. GRPO, arXiv:2503.20783): (sum m l, B * max_completion_length); needs
        `max_completion_length` (the configured maximum, not the realised length).
      * `bnpo`: (sum m l / max(sum m, 1), 1), the token mean of *this* micro-batch. TRL divides
        by the local token count and averages micro-batches and processes, so its value depends
        on how the batch is split; summing these terms reproduces exactly that average (it is
        not the token mean of the whole batch unless every micro-batch has as many tokens).

    Metrics (TRL names; stop-gradient): `kl` (token mean of the KL term, when beta != 0),
    `entropy` (token mean, when `batch.entropy` is given), `clip_ratio/low_mean`,
    `clip_ratio/high_mean`, `clip_ratio/region_mean` (fractions of completion tokens, or of rows
    at the sequence level, with rho < 1 - eps and A < 0 / rho > 1 + eps_high and A > 0 / either),
    `clip_ratio/low_min` and `clip_ratio/high_max` (min / max over rows of each row's clipped
    fraction; rows without tokens are skipped at the token level). Means are (sum, count) over
    this batch, or over every device when `axis_name` is given (psum, exactly TRL's gathered
    mean); min / max are pmin / pmax over `axis_name`. Across micro-batches, reduce min / max
    with min / max: TRL's nanmin / nanmax over the gathered rows.

    `losses` holds each row's token-mean loss; chosen/rejected rewards are zeros (no implicit
    reward).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs `max_completion_length`")
        _check_positive("max_completion_length", max_completion_length)
    per_token, ratio, kl = grpo_per_token_loss(
        batch,
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        delta=delta,
        use_bias_correction_kl=use_bias_correction_kl,
        importance_sampling_level=importance_sampling_level,
    )
    keep = batch.mask != 0
    dtype = per_token.dtype
    row_sum = jnp.sum(jnp.where(keep, per_token, 0.0), axis=-1)
    n = jnp.sum(keep, axis=-1).astype(dtype)
    per_row = row_sum / jnp.maximum(n, 1.0)
    rows = jnp.asarray(per_token.shape[0], dtype)
    if loss_type == "grpo":
        term = LossTerm(jnp.sum(per_row), rows)
    elif loss_type == "bnpo":
        term = LossTerm(jnp.sum(row_sum) / jnp.maximum(jnp.sum(n), 1.0), jnp.ones((), dtype))
    elif loss_type == "dr_grpo":
        term = LossTerm(jnp.sum(row_sum), rows * max_completion_length)
    else:
        term = LossTerm(jnp.sum(row_sum), jnp.sum(n))

    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = lax.stop_gradient(batch.advantages.astype(dtype))[:, None]
    per_token_level = importance_sampling_level == "token"
    metrics = _clip_metrics(ratio, adv, epsilon, eps_high, keep, per_token_level, axis_name)
    if kl is not None:
        metrics["kl"] = _masked_mean(kl, keep, axis_name)
    if batch.entropy is not None:
        metrics["entropy"] = _masked_mean(batch.entropy.astype(dtype), keep, axis_name)
    return _pg_output(loss_type, term, per_row, metrics)


def rloo_loss(
    batch: RolloutBatch,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    axis_name: str | None = None,
) -> LossOutput:
    """RLOO's clipped sequence-level surrogate, TRL 1.16 `RLOOTrainer._compute_loss`
    (L1794-1863), with advantages from `rloo_advantages` (KL already in the reward):

        rho_i = exp(sum_t m (log pi_t - log pi_old,t)),
        l_i   = -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps_high) A_i),
        L     = mean_i l_i                       -> term (sum_i l_i, B)

    On-policy (rho = 1) this is REINFORCE on the summed log-prob, -mean_i A_i log pi(y_i)'s
    gradient. Metrics: `clip_ratio/*` over rows (as `grpo_loss` at the sequence level),
    `entropy` (token mean) when given. `losses` holds l_i.
    """
    epsilon_high = _check_clip(epsilon, epsilon_high)
    logps, old, keep, adv = _prepare(batch)
    seq = jnp.sum(jnp.where(keep, logps, 0.0), axis=-1)
    old_seq = jnp.sum(jnp.where(keep, old, 0.0), axis=-1)
    rho = clamped_exp(seq - old_seq)
    per_row = -jnp.minimum(rho * adv, jnp.clip(rho, 1.0 - epsilon, 1.0 + epsilon_high) * adv)
    term = LossTerm(jnp.sum(per_row), jnp.asarray(per_row.shape[0], per_row.dtype))
    metrics = _clip_metrics(rho, adv, epsilon, epsilon_high, keep, False, axis_name)
    if batch.entropy is not None:
        metrics["entropy"] = _masked_mean(batch.entropy.astype(logps.dtype), keep, axis_name)
    return _pg_output("rloo", term, per_row, metrics)


def reinforce_kl_loss(
    batch: RolloutBatch,
    rewards,
    *,
    beta: float = 0.05,
    baseline=None,
    num_generations: int | None = None,
) -> LossOutput:
    """REINFORCE with the KL penalty in the reward: the on-policy score-function estimator of
    J(theta) = E_{y~pi}[r(y)] - beta KL(pi || ref) (Korbak, Perez, Buckley 2022,
    arXiv:2205.11275, Sec. 2; specs/online.md 3.1):

        r'_i = r_i - beta * sg(sum_t m (log pi_t - log ref_t))        (k1 in the reward)
        L    = -mean_i sg(r'_i - b_i) * sum_t m log pi_t

    E_{y~pi}[grad L] = -grad J exactly (the KL's own score term has E[grad log pi] = 0), and the
    maximiser of J is pi* proportional to ref * exp(r / beta). `baseline`: None (b = 0),
    "loo" (leave-one-out mean of r' within groups of `num_generations` rows, default the whole
    batch; unbiased), or a `[B]` array (taken as constant). On-policy only: `old_logps` must be
    None. Metrics (TRL's online names): `objective/kl` (mean summed k1),
    `objective/non_score_reward` (-beta times it), `objective/scores` (mean r),
    `objective/rlhf_reward` (mean r'). `losses` holds the per-row surrogates.
    """
    _check_beta(beta)
    if batch.old_logps is not None:
        raise ValueError("reinforce_kl_loss is on-policy: `old_logps` must be None")
    logps, _, keep, _ = _prepare(batch, need_advantages=False)
    r = C.as_array("rewards", rewards).astype(logps.dtype)
    if r.shape != logps.shape[:1]:
        raise ValueError(f"`rewards` must be [B] {logps.shape[:1]}, got {r.shape}")
    seq = jnp.sum(jnp.where(keep, logps, 0.0), axis=-1)
    kl = jnp.zeros_like(seq)
    if not _is_zero(beta):
        if batch.ref_logps is None:
            raise ValueError("beta != 0 needs `ref_logps` in the RolloutBatch")
        ref = batch.ref_logps.astype(logps.dtype)
        kl = lax.stop_gradient(jnp.sum(jnp.where(keep, kl_k1(logps, ref), 0.0), axis=-1))
    shaped = r - beta * kl
    if baseline is None:
        b = jnp.zeros_like(shaped)
    elif isinstance(baseline, str):
        if baseline != "loo":
            raise ValueError(f"`baseline` must be None, 'loo' or a [B] array, got {baseline!r}")
        g = shaped.shape[0] if num_generations is None else num_generations
        if not isinstance(g, int) or g < 2 or shaped.shape[0] % g:
            raise ValueError(f"`num_generations` must be an int >= 2 dividing the batch "
                             f"({shaped.shape[0]} rows) for baseline='loo', got {g!r}")  # fmt: skip
        grouped = shaped.reshape(-1, g)
        b = ((jnp.sum(grouped, 1, keepdims=True) - grouped) / (g - 1)).reshape(-1)
    else:
        b = C.as_array("baseline", baseline).astype(shaped.dtype)
        if b.shape != shaped.shape:
            raise ValueError(f"`baseline` must be [B] {shaped.shape}, got {b.shape}")
    adv = lax.stop_gradient(shaped - b)
    per_row = -adv * seq
    term = LossTerm(jnp.sum(per_row), jnp.asarray(per_row.shape[0], per_row.dtype))
    metrics = {
        "objective/kl": jnp.mean(kl),
        "objective/non_score_reward": -beta * jnp.mean(kl),
        "objective/scores": jnp.mean(r),
        "objective/rlhf_reward": jnp.mean(shaped),
    }
    return _pg_output("reinforce_kl", term, per_row, metrics)
