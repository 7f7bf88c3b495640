"""Float64 NumPy derivations of TRL 1.16's CPO / SimPO / AlphaPO, ORPO and KTO losses, written
from specs/losses.md section 3; checked against TRL fixtures in test_reference_fixtures.py."""

from __future__ import annotations

import numpy as np
from numpy_dpo import log_sigmoid, sigmoid


def cpo_losses(chosen, rejected, *, loss_type, beta, label_smoothing, simpo_gamma, alpha):
    """Per-pair CPO-family losses and rewards. AlphaPO: r = (1 - p^-alpha) / alpha, p = e^logp."""
    if alpha != 0.0:
        rw = (1.0 - np.exp(-alpha * chosen)) / alpha
        rl = (1.0 - np.exp(-alpha * rejected)) / alpha
    else:
        rw, rl = chosen, rejected
    h = rw - rl
    eps = label_smoothing
    if loss_type == "simpo":
        h = h - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    return losses, beta * rw, beta * rl


def log1mexp(x):
    """log(1 - e^x) for x < 0."""
    return np.log(-np.expm1(x))


def orpo_losses(chosen_avg, rejected_avg, *, beta):
    """ORPO's odds-ratio term beta * log s(log odds(y_w) - log odds(y_l)) (to be subtracted)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio = log_sigmoid(log_odds)
    return beta * ratio, beta * chosen_avg, beta * rejected_avg, ratio.mean(), log_odds.mean()


def kto_case(policy, ref, kl_policy, kl_ref, mask, kl_mask, labels, cfg):
    """KTO / APO-zero-unpaired loss (nanmean over [desirable; undesirable]) and metrics."""
    seq = np.where(mask[:, 1:] != 0, policy, 0.0).sum(1)
    ref_seq = np.where(mask[:, 1:] != 0, ref, 0.0).sum(1)
    kl_seq = np.where(kl_mask[:, 1:] != 0, kl_policy, 0.0).sum(1)
    kl_ref_seq = np.where(kl_mask[:, 1:] != 0, kl_ref, 0.0).sum(1)
    beta = cfg["beta"]
    if cfg["loss_type"] == "kto":
        z0 = max(np.mean(kl_seq - kl_ref_seq), 0.0)
    else:
        z0 = 0.0
    logratio = seq - ref_seq
    a, b = logratio[labels], logratio[~labels]
    if cfg["loss_type"] == "kto":
        lc, lr = 1 - sigmoid(beta * (a - z0)), 1 - sigmoid(beta * (z0 - b))
    else:
        lc, lr = 1 - sigmoid(beta * a), sigmoid(beta * b)
    losses = np.concatenate([cfg["desirable_weight"] * lc, cfg["undesirable_weight"] * lr])
    metrics = {
        "rewards/chosen": np.mean(beta * a),
        "rewards/rejected": np.mean(beta * b),
        "rewards/margins": np.mean(beta * a) - np.mean(beta * b),
        "logps/chosen": np.mean(seq[labels]),
        "logps/rejected": np.mean(seq[~labels]),
        "kl": z0,
    }
    return np.nanmean(losses), metrics
