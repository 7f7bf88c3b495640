"""The DPO family with TRL 1.16.0 semantics (specs/losses.md section 2).

`dpo(batch, loss_type=..., ...)` computes the sequence log-probs once (with LD-DPO's weighting
when `ld_alpha` is set), the log-ratios a = pc - rc and b = pr - rr, their f-divergence scores,
then one formula from `FORMULAS`, and WPO's pair weights when `use_weighting`. Each formula is a
small function with its paper equation; the registry in `compose.py` exposes every loss type by
its TRL name. Rewards are beta * a and beta * b (summed log-ratios, detached) for every type, as
in TRL.

Deliberate differences from TRL 1.16.0, each opt-in:
  * `label_smoothing` on `sigmoid` applies conservative DPO (cDPO), the pre-0.29 behaviour; TRL
    1.16 ignores it. Leave it at 0 for TRL-identical `sigmoid`.
  * `axis_name` makes the batch-coupled `aot` / `aot_unpaired` sort over the whole global batch
    under pmap/shard_map; TRL sorts per device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.types import (
    LossOutput,
    PreferenceBatch,
    check_beta,
    lengths,
    masked_sum,
    paired_output,
)
from alignjax.ops import ld_prefix_lengths, ld_sum

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class PairScores(NamedTuple):
    """Per-pair quantities every DPO formula reads (all `[B]`)."""

    pc: jax.Array  # policy log-prob of the chosen completion
    pr: jax.Array
    rc: jax.Array  # reference log-probs
    rr: jax.Array
    a: jax.Array  # chosen log-ratio pc - rc
    b: jax.Array  # rejected log-ratio pr - rr
    sc: jax.Array  # f-divergence scores f'(e^a), f'(e^b)
    sr: jax.Array
    len_c: jax.Array  # completion lengths, clamped at 1
    len_r: jax.Array


class Hyper(NamedTuple):
    beta: float
    label_smoothing: float
    discopop_tau: float
    axis_name: str | None


def f_score(logratio: jax.Array, kind: str, alpha: float = 0.5) -> jax.Array:
    """f'(u) at u = e^r for the f-divergence DPO of Wang et al. 2023 (arXiv:2309.16240), with
    TRL 1.16.0's constants (they matter for the length-normalised ipo / sigmoid_norm)."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1.0 - jnp.exp(-logratio)
    if kind == "js_divergence":
        return jnp.log(2.0) + log_sigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = jnp.minimum((alpha - 1.0) * logratio, 80.0)  # TRL's clamp keeps exp finite
        return jnp.expm1(t) / (alpha - 1.0)
    raise ValueError(f"`f_divergence` must be one of {F_DIVERGENCES}, got {kind!r}")


def _smoothed(z, eps):
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def _global_sort(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Sort over the batch; with `axis_name`, over the global batch, returning this shard."""
    if axis_name is None:
        return jnp.sort(x)
    everything = lax.all_gather(x, axis_name, tiled=True)
    start = lax.axis_index(axis_name) * x.shape[0]
    return lax.dynamic_slice_in_dim(jnp.sort(everything), start, x.shape[0])


# Formulas: (scores, hyper) -> per-pair losses [B].


def sigmoid_loss(s: PairScores, hp: Hyper):
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290) Eq. 7; cDPO when label_smoothing > 0."""
    return _smoothed(hp.beta * (s.sc - s.sr), hp.label_smoothing)


def hinge_loss(s: PairScores, hp: Hyper):
    """SLiC, Zhao et al. 2023 (arXiv:2305.10425): max(0, 1 - beta h)."""
    return jax.nn.relu(1.0 - hp.beta * (s.sc - s.sr))


def ipo_loss(s: PairScores, hp: Hyper):
    """IPO, Azar et al. 2023 (arXiv:2310.12036) Eq. 17 on length-averaged scores (TRL)."""
    return (s.sc / s.len_c - s.sr / s.len_r - 1.0 / (2.0 * hp.beta)) ** 2


def exo_pair_loss(s: PairScores, hp: Hyper):
    """EXO, Ji et al. 2024 (arXiv:2402.00856) Eq. 16, K = 2, target (1 - eps, eps)."""
    z, eps = hp.beta * (s.sc - s.sr), hp.label_smoothing
    return sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps)) + sigmoid(-z) * (
        log_sigmoid(-z) - jnp.log(eps)
    )


def nca_pair_loss(s: PairScores, hp: Hyper):
    """NCA, Chen et al. 2024 (arXiv:2402.05369)."""
    ca, cb = hp.beta * s.a, hp.beta * s.b
    return -log_sigmoid(ca) - 0.5 * log_sigmoid(-ca) - 0.5 * log_sigmoid(-cb)


def robust_loss(s: PairScores, hp: Hyper):
    """rDPO, Chowdhury et al. 2024 (arXiv:2403.00409): unbiased under label-flip rate eps."""
    z, eps = hp.beta * (s.sc - s.sr), hp.label_smoothing
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(s: PairScores, hp: Hyper):
    """BCO pair form, Jung et al. 2024 (arXiv:2404.04656), TRL >= 0.29 (delta = 0)."""
    return -log_sigmoid(hp.beta * s.a) - log_sigmoid(-hp.beta * s.b)


def sppo_hard_loss(s: PairScores, hp: Hyper):
    """SPPO with hard probabilities, Wu et al. 2024 (arXiv:2405.00675) Eq. 4.7, P_w=1, P_l=0."""
    return (s.a - 0.5 / hp.beta) ** 2 + (s.b + 0.5 / hp.beta) ** 2


def aot_loss(s: PairScores, hp: Hyper):
    """AOT, Melnyk et al. 2024 (arXiv:2406.05882): sorted policy vs reference margins."""
    d = _global_sort(s.pc - s.pr, hp.axis_name) - _global_sort(s.rc - s.rr, hp.axis_name)
    return _smoothed(hp.beta * d, hp.label_smoothing)


def aot_unpaired_loss(s: PairScores, hp: Hyper):
    """AOT unpaired: sorted chosen vs sorted rejected log-ratios."""
    d = _global_sort(s.a, hp.axis_name) - _global_sort(s.b, hp.axis_name)
    return _smoothed(hp.beta * d, hp.label_smoothing)


def apo_zero_loss(s: PairScores, hp: Hyper):
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266) Eq. 7."""
    return 1.0 - sigmoid(hp.beta * s.a) + sigmoid(hp.beta * s.b)


def apo_down_loss(s: PairScores, hp: Hyper):
    """APO-down, arXiv:2408.06266 Eq. 8."""
    return sigmoid(hp.beta * s.a) + 1.0 - sigmoid(hp.beta * (s.a - s.b))


def discopop_loss(s: PairScores, hp: Hyper):
    """DiscoPOP / LRML, Chan Lu et al. 2024 (arXiv:2406.08414) Eq. 5.

    The exponential part s(z/tau) e^-z is evaluated as exp(log s(z/tau) - z): the same number,
    but finite for very negative z (where TRL's product is 0 * inf = NaN) whenever tau < 1."""
    z = hp.beta * (s.sc - s.sr)
    tau = hp.discopop_tau
    return sigmoid(-z / tau) * (-log_sigmoid(z)) + jnp.exp(log_sigmoid(z / tau) - z)


def sigmoid_norm_loss(s: PairScores, hp: Hyper):
    """Length-normalised DPO (TRL's `sigmoid_norm`): -log s(beta (sc/|y_w| - sr/|y_l|))."""
    return -log_sigmoid(hp.beta * (s.sc / s.len_c - s.sr / s.len_r))


FORMULAS: dict[str, Callable[[PairScores, Hyper], jax.Array]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}
F_DIVERGENCE_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}


def pair_scores(
    batch: PreferenceBatch, *, ld_alpha=None, f_divergence="reverse_kl", f_alpha=0.5
) -> PairScores:
    """Sequence log-probs (LD-weighted when `ld_alpha` is set), log-ratios and f-scores."""
    if not batch.has_reference:
        raise ValueError(
            "DPO losses need reference log-probs: set `ref_chosen_logps` / "
            "`ref_rejected_logps` (per token or precomputed sums)"
        )
    mc, mr = batch.chosen_mask, batch.rejected_mask

    def seq(values, mask):
        if ld_alpha is None or values.ndim == 1:
            return masked_sum(values, mask)
        return ld_sum(values, mask, ld_prefix_lengths(mc, mr), ld_alpha)

    pc, pr = seq(batch.chosen_logps, mc), seq(batch.rejected_logps, mr)
    rc = lax.stop_gradient(seq(batch.ref_chosen_logps, mc))
    rr = lax.stop_gradient(seq(batch.ref_rejected_logps, mr))
    a, b = pc - rc, pr - rr
    return PairScores(
        pc,
        pr,
        rc,
        rr,
        a,
        b,
        f_score(a, f_divergence, f_alpha),
        f_score(b, f_divergence, f_alpha),
        lengths(mc),
        lengths(mr),
    )


def wpo_weights(batch: PreferenceBatch) -> jax.Array:
    """WPO pair weights, Zhou et al. 2024 (arXiv:2406.11827) Eq. 2, without gradient:
    w(y) = exp(mean_t [log p_t(y_t) - log sum_v p_t(v)^2]), pair weight w(y_w) w(y_l)."""
    if batch.chosen_log_sum_sq is None:
        raise ValueError("`use_weighting=True` needs `chosen_log_sum_sq` / `rejected_log_sum_sq`")

    def w(logps, log_sum_sq, mask):
        return jnp.exp(masked_sum(logps - log_sum_sq, mask) / lengths(mask))

    pair = w(batch.chosen_logps, batch.chosen_log_sum_sq, batch.chosen_mask) * w(
        batch.rejected_logps, batch.rejected_log_sum_sq, batch.rejected_mask
    )
    return lax.stop_gradient(pair)


def _check(loss_type, beta, label_smoothing, f_divergence, use_weighting, discopop_tau):
    if loss_type not in FORMULAS:
        raise ValueError(f"unknown DPO `loss_type` {loss_type!r}; valid: {sorted(FORMULAS)}")
    check_beta(beta)
    if isinstance(label_smoothing, (int, float)):
        if loss_type == "exo_pair" and not 0 < label_smoothing < 1:
            raise ValueError(
                f"`label_smoothing` for exo_pair must lie in (0, 1) (paper: 1e-3), "
                f"got {label_smoothing}"
            )
        if loss_type != "exo_pair" and not 0 <= label_smoothing < 0.5:
            raise ValueError(f"`label_smoothing` must lie in [0, 0.5), got {label_smoothing}")
    if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"`f_divergence={f_divergence!r}` applies to {sorted(F_DIVERGENCE_TYPES)}"
            f", not {loss_type!r}"
        )
    if use_weighting and loss_type in ("aot", "aot_unpaired"):
        raise ValueError("WPO weighting (`use_weighting`) is not defined for the sorted aot losses")
    if isinstance(discopop_tau, (int, float)) and not discopop_tau > 0:
        raise ValueError(f"`discopop_tau` must be > 0, got {discopop_tau}")


def dpo(
    batch: PreferenceBatch,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    axis_name: str | None = None,
) -> LossOutput:
    """One DPO-family loss with TRL 1.16.0 semantics (defaults = DPOConfig's).

    Args:
      batch: per-token policy and reference log-probs with completion masks.
      loss_type: a TRL `loss_type` (see `FORMULAS`).
      beta: KL strength (IPO's tau), > 0.
      label_smoothing: cDPO / robust flip rate / exo_pair epsilon / aot smoothing.
      f_divergence, f_alpha: f-DPO divergence and alpha-divergence coefficient.
      ld_alpha: LD-DPO weight of tokens past the shared length (None: off).
      use_weighting: WPO pair weights (needs the log sum_v p^2 fields).
      discopop_tau: DiscoPOP temperature.
      axis_name: mapped axis over which batch-coupled losses (aot) sort globally.
    """
    _check(loss_type, beta, label_smoothing, f_divergence, use_weighting, discopop_tau)
    s = pair_scores(batch, ld_alpha=ld_alpha, f_divergence=f_divergence, f_alpha=f_alpha)
    losses = FORMULAS[loss_type](s, Hyper(beta, label_smoothing, discopop_tau, axis_name))
    if use_weighting:
        losses = losses * wpo_weights(batch)
    return paired_output(loss_type, losses, beta * s.a, beta * s.b, s.pc, s.pr)
