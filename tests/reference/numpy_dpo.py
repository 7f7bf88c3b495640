"""Float64 NumPy derivations of TRL 1.16's DPO loss types, written from specs/losses.md section 2.

They are the oracle for alignjax's DPO losses, and are themselves checked against fixtures made
by TRL's own code (tests/reference/test_reference_fixtures.py). Inputs use TRL's layout: rows
[chosen (B); rejected (B)], per-token arrays [2B, T'] already zero off the completion mask.
"""

from __future__ import annotations

import numpy as np


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def sequence_logps(per_token, mask, ld_alpha=None):
    """Per-row sums. LD-DPO: weight 1 on the first l_p = min(|y_w|, |y_l|) tokens, then ld_alpha."""
    per_token, mask = np.asarray(per_token, np.float64), np.asarray(mask) != 0
    if ld_alpha is None:
        return np.where(mask, per_token, 0.0).sum(1)
    b = mask.shape[0] // 2
    lengths = mask.sum(1)
    shared = np.minimum(lengths[:b], lengths[b:])
    shared = np.concatenate([shared, shared])
    out = np.zeros(mask.shape[0])
    for row in range(mask.shape[0]):
        pos = 0
        for t in range(mask.shape[1]):
            if mask[row, t]:
                pos += 1
                w = 1.0 if pos <= shared[row] else ld_alpha
                out[row] += w * per_token[row, t]
    return out


def f_scores(logratio, kind, alpha=0.5):
    """f'(e^r) per TRL 1.16 (constants kept: they matter for length-normalised losses)."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1.0 - np.exp(-logratio)
    if kind == "js_divergence":
        return np.log(2.0) + log_sigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = np.minimum((alpha - 1.0) * logratio, 80.0)
        return (np.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(kind)


def per_sequence_loss(loss_type, *, a, b, pc, pr, rc, rr, sc, sr, len_c, len_r, sft_nll, cfg):
    """One loss type's per-pair losses [B] (specs/losses.md section 2 table)."""
    beta, eps = cfg["beta"], cfg["label_smoothing"]
    h = sc - sr
    z = beta * h
    if loss_type == "sigmoid":
        return -log_sigmoid(z)
    if loss_type == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if loss_type == "ipo":
        return (sc / len_c - sr / len_r - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":
        return sigmoid(z) * (log_sigmoid(z) - np.log1p(-eps)) + sigmoid(-z) * (
            log_sigmoid(-z) - np.log(eps)
        )
    if loss_type == "nca_pair":
        return -log_sigmoid(beta * a) - 0.5 * log_sigmoid(-beta * a) - 0.5 * log_sigmoid(-beta * b)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * a) - log_sigmoid(-beta * b)
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = np.sort(pc - pr) - np.sort(rc - rr)
        else:
            d = np.sort(a) - np.sort(b)
        return -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
    if loss_type == "apo_zero":
        return 1 - sigmoid(beta * a) + sigmoid(beta * b)
    if loss_type == "apo_down":
        return sigmoid(beta * a) + 1 - sigmoid(beta * (a - b))
    if loss_type == "discopop":
        mod = sigmoid(z / cfg["discopop_tau"])
        return (1 - mod) * (-log_sigmoid(z)) + mod * np.exp(-z)
    if loss_type == "sft":
        return np.full(a.shape, sft_nll)
    if loss_type == "sigmoid_norm":
        return -log_sigmoid(beta * (sc / len_c - sr / len_r))
    raise ValueError(loss_type)


def dpo_case(
    policy, ref, log_sum_sq, completion_mask, loss_types, loss_weights, cfg, wpo_policy=None
):
    """Total loss and TRL's logged reward metrics for one fixture case.

    WPO weights are computed without gradient in TRL; `wpo_policy` (default: `policy`) is the
    policy they are computed from, so finite differences can hold them fixed."""
    shift = np.asarray(completion_mask)[:, 1:]
    n = shift.shape[0] // 2
    logps = sequence_logps(policy, shift, cfg["ld_alpha"])
    ref_logps = sequence_logps(ref, shift, cfg["ld_alpha"])
    pc, pr, rc, rr = logps[:n], logps[n:], ref_logps[:n], ref_logps[n:]
    a, b = pc - rc, pr - rr
    sc = f_scores(a, cfg["f_divergence_type"], cfg["f_alpha_divergence_coef"])
    sr = f_scores(b, cfg["f_divergence_type"], cfg["f_alpha_divergence_coef"])
    lengths = np.maximum(np.asarray(completion_mask).sum(1), 1.0)  # TRL: unshifted mask, clamp 1
    len_c, len_r = lengths[:n], lengths[n:]
    chosen_mask = shift[:n] != 0
    sft_nll = -np.asarray(policy)[:n][chosen_mask].mean()
    weights = np.ones(n)
    if cfg["use_weighting"]:
        comp = np.maximum(shift.sum(1), 1)
        base = policy if wpo_policy is None else wpo_policy
        mean = (np.where(shift != 0, base - log_sum_sq, 0.0)).sum(1) / comp
        w = np.exp(mean)
        weights = w[:n] * w[n:]
    total = 0.0
    for lt, weight in zip(loss_types, loss_weights):
        per = per_sequence_loss(
            lt,
            a=a,
            b=b,
            pc=pc,
            pr=pr,
            rc=rc,
            rr=rr,
            sc=sc,
            sr=sr,
            len_c=len_c,
            len_r=len_r,
            sft_nll=sft_nll,
            cfg=cfg,
        )
        total += weight * np.mean(per * weights)
    beta = cfg["beta"]
    metrics = {
        "rewards/chosen": np.mean(beta * a),
        "rewards/rejected": np.mean(beta * b),
        "rewards/accuracies": np.mean((beta * a > beta * b).astype(np.float64)),
        "rewards/margins": np.mean(beta * a - beta * b),
        "logps/chosen": np.mean(pc),
        "logps/rejected": np.mean(pr),
    }
    return total, metrics
