"""Reference-free paired losses: CPO, SimPO, AlphaPO and ORPO (specs/losses.md section 3).

TRL 1.16.0 semantics (`trl.experimental.cpo`, `trl.experimental.orpo`). The batch needs no
reference log-probs. Each loss returns two terms: the preference term (mean over pairs) and an
NLL term on the chosen completions (token mean, weighted by `cpo_alpha` for CPO; weight 1 for
ORPO), kept as (total, count) so that micro-batch and device averages stay exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from alignjax.losses.sft import nll_term
from alignjax.losses.types import (
    LossOutput,
    LossTerm,
    PreferenceBatch,
    check_beta,
    lengths,
    masked_sum,
    paired_output,
)

log_sigmoid = jax.nn.log_sigmoid
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def alphapo_reward(logps: jax.Array, alpha: float) -> jax.Array:
    """AlphaPO's reward (1 - p^-alpha) / alpha with p = e^logp (Gupta et al. 2025,
    arXiv:2501.03884); alpha = 0 gives logp itself."""
    if alpha == 0.0:
        return logps
    return -jnp.expm1(-alpha * logps) / alpha


def cpo(
    batch: PreferenceBatch,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv:2401.08417 Eq. 3) and its SimPO / AlphaPO variants.

    r(y) = logp(y) (length-averaged for `ipo` and `simpo`, summed otherwise), or AlphaPO's
    reward when `alpha != 0`; h = r_w - r_l, minus simpo_gamma / beta for `simpo` (SimPO, Meng
    et al. 2024, arXiv:2405.14734 Eq. 6). sigmoid / simpo: -(1-eps) log s(beta h) - eps log
    s(-beta h); hinge: max(0, 1 - beta h); ipo: (h - 1/(2 beta))^2. Total = mean preference
    loss + cpo_alpha * NLL(y_w). SimPO proper is `loss_type="simpo", cpo_alpha=0`.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO `loss_type` {loss_type!r}; valid: {list(CPO_LOSS_TYPES)}")
    check_beta(beta)
    if isinstance(label_smoothing, (int, float)) and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"`label_smoothing` must lie in [0, 0.5), got {label_smoothing}")
    pc = masked_sum(batch.chosen_logps, batch.chosen_mask)
    pr = masked_sum(batch.rejected_logps, batch.rejected_mask)
    if loss_type in ("ipo", "simpo"):
        pc, pr = pc / lengths(batch.chosen_mask), pr / lengths(batch.rejected_mask)
    rw, rl = alphapo_reward(pc, alpha), alphapo_reward(pr, alpha)
    h = rw - rl
    if loss_type == "simpo":
        h = h - simpo_gamma / beta
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    nll = nll_term(batch)
    extra = {"nll": LossTerm(nll.total, nll.count, float(cpo_alpha))} if cpo_alpha else None
    return paired_output(
        loss_type,
        losses,
        beta * rw,
        beta * rl,
        pc,
        pr,
        extra_terms=extra,
        extra_metrics={"nll_loss": lax.stop_gradient(nll.value)},
    )


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, switching at -ln 2 between log(-expm1(x)) and log1p(-e^x)
    (Maechler 2012) for accuracy at both ends."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo(batch: PreferenceBatch, *, beta: float = 0.1, nll_mask: jax.Array | None = None):
    """ORPO (Hong et al. 2024, arXiv:2403.07691 Eqs. 4-7).

    log odds(y) = logp(y) - log(1 - e^logp(y)) on length-averaged log-probs; the odds-ratio term
    is -beta log s(log odds(y_w) - log odds(y_l)) per pair; total = NLL(y_w) + its mean. TRL
    computes the NLL over the chosen prompt *and* completion: pass `nll_mask` (a `[B, T]` mask
    over those tokens, with `chosen_logps` filled there) to reproduce it; the default is the
    completion. TRL casts the averages to float32 first; here they keep the input precision.
    Averages above -eps are capped there for log(1 - p) (finite odds for empty completions).
    """
    check_beta(beta)
    pc = masked_sum(batch.chosen_logps, batch.chosen_mask) / lengths(batch.chosen_mask)
    pr = masked_sum(batch.rejected_logps, batch.rejected_mask) / lengths(batch.rejected_mask)
    # An empty completion (average 0) or one whose probability rounds to 1 has infinite odds;
    # capping the average at -eps (the log of the largest float below 1) keeps the loss and its
    # gradient finite and changes nothing where TRL's value is finite.
    cap = -jnp.finfo(pc.dtype).eps
    log_odds = (pc - pr) - (log1mexp(jnp.minimum(pc, cap)) - log1mexp(jnp.minimum(pr, cap)))
    ratio = log_sigmoid(log_odds)
    losses = -beta * ratio
    nll = nll_term(batch, nll_mask)
    metrics = {
        "nll_loss": lax.stop_gradient(nll.value),
        "log_odds_ratio": lax.stop_gradient(jnp.mean(ratio)),
        "log_odds_chosen": lax.stop_gradient(jnp.mean(log_odds)),
    }
    return paired_output(
        "orpo",
        losses,
        beta * pc,
        beta * pr,
        pc,
        pr,
        extra_terms={"nll": nll},
        extra_metrics=metrics,
    )
