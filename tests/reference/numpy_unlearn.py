"""Float64 NumPy derivations of the official unlearning losses (specs/online.md section 5.1-5.3),
each with its analytic gradient w.r.t. the per-token policy log-probs (and the per-token retain
KL). Written from the official code as the spec describes it, with explicit loops over rows and
tokens; they share no code with alignjax. `generate_numpy_unlearn.py` evaluates them into a
committed fixture.

The official functions, restated on per-token log-probs `lp[i, t]` of the labels with a 0/1
label mask `m[i, t]` (m = 0 where the label is -100):

* `outputs.loss` (HF): -sum_{i,t} m lp / sum_{i,t} m, one token mean over the whole batch.
* `get_batch_loss` (NPO repo): NLL_i = -sum_t m lp, a per-row sum.
* WAGLE `GA`: -outputs.loss(forget); `GA_FT`: -outputs.loss(forget) + gamma outputs.loss(retain).
* NPO `npo` / `npo_grad_diff` / `npo_KL`: Delta_i = NLL_i(theta) - NLL_i(ref),
  L_f = -(2/beta) mean_i logsigmoid(beta Delta_i); L = npo_coeff L_f + coeff * retain term.
* WAGLE `NPO_FT`: Delta from token-mean NLLs (batch size 1 in its configs: per row).
* SimNPO `simnpo_grad_diff`: a_i = NLL_i / |y_i| - gamma,
  L_f = -(2/beta) mean_i logsigmoid(beta a_i).
* retain KL (TOFU `KL`): over the positions given, sum of KL(ref || theta) divided by the number
  of positions ("batchmean" over the flattened positions), or, alignjax's default, by the number
  of retain completion tokens.

The official data has no empty rows. Here a row with no label (all-zero mask) is padding: it is
left out of every mean (per-row means count the non-empty rows only).
"""

from __future__ import annotations

import numpy as np


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def hf_loss(lp, m):
    """HF `outputs.loss` and its gradient w.r.t. lp: -sum m lp / sum m."""
    total, count = 0.0, 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if m[i, t]:
                total -= lp[i, t]
                count += 1
    grad = np.where(m != 0, -1.0 / count, 0.0)
    return total / count, grad


def batch_nll(lp, m):
    """`get_batch_loss`: per-row summed NLL."""
    out = np.zeros(lp.shape[0])
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if m[i, t]:
                out[i] -= lp[i, t]
    return out


def row_lengths(m):
    return np.array([int(sum(1 for t in range(m.shape[1]) if m[i, t])) for i in range(m.shape[0])])


def retain_kl(kl, m, normalization):
    """Retain KL term and its gradient w.r.t. the per-token KL."""
    if normalization == "tokens":
        n = int(np.sum(m != 0))
        return float(np.sum(np.where(m != 0, kl, 0.0))) / n, np.where(m != 0, 1.0 / n, 0.0)
    return float(np.sum(kl)) / kl.size, np.full(kl.shape, 1.0 / kl.size)


def common_metrics(f, fm, r=None, rm=None):
    rows = row_lengths(fm) > 0
    out = dict(forget_nll=hf_loss(f, fm)[0], **{"logps/forget": np.mean(-batch_nll(f, fm)[rows])})
    if r is not None:
        out["retain_nll"] = hf_loss(r, rm)[0]
    return out


def retain_part(retain, weight, r, rm, kl, normalization):
    """(value, grad wrt retain log-probs, grad wrt retain KL, metrics) of the weighted retain
    term."""
    zeros = np.zeros_like(r)
    if retain == "none":
        return 0.0, zeros, zeros, {}
    if retain == "nll":
        value, grad = hf_loss(r, rm)
        return weight * value, weight * grad, zeros, {"retain_nll": value}
    value, grad = retain_kl(kl, rm, normalization)
    return weight * value, zeros, weight * grad, {"retain_kl": value}


def gradient_difference(f, fm, r, rm, kl, retain="nll", weight=1.0, normalization="tokens"):
    """WAGLE `GA_FT` (`retain="nll"`, gamma = weight) and `GA` (`retain="none"`)."""
    loss_f, grad_f = hf_loss(f, fm)
    value, grad_r, grad_kl, extra = retain_part(retain, weight, r, rm, kl, normalization)
    metrics = common_metrics(f, fm, r, rm)
    metrics.update(extra)
    return dict(loss=-loss_f + value, grad_forget=-grad_f, grad_retain=grad_r,
                grad_retain_kl=grad_kl, **_prefix(metrics))  # fmt: skip


def npo(f, ref_f, fm, r, rm, kl, beta, npo_coeff=1.0, retain="nll", weight=1.0,
        delta="sum", normalization="tokens"):  # fmt: skip
    """The official NPO (`delta="sum"`) or WAGLE's NPO_FT (`delta="token_mean"`)."""
    n = row_lengths(fm)
    rows = np.flatnonzero(n > 0)
    nll, nll_ref = batch_nll(f, fm), batch_nll(ref_f, fm)
    if delta == "token_mean":
        nll, nll_ref = nll / np.maximum(n, 1), nll_ref / np.maximum(n, 1)
    d = nll - nll_ref
    loss_f = np.mean([-(2.0 / beta) * log_sigmoid(beta * d[i]) for i in rows])
    grad_f = np.zeros_like(f)
    for i in rows:
        # d/d lp of -(2/beta) logsigmoid(beta Delta) = 2 s(-beta Delta) * (-d Delta / d lp)
        scale = 2.0 * sigmoid(-beta * d[i]) / len(rows)
        if delta == "token_mean":
            scale /= n[i]
        grad_f[i] = np.where(fm[i] != 0, scale, 0.0)
    value, grad_r, grad_kl, extra = retain_part(retain, weight, r, rm, kl, normalization)
    metrics = common_metrics(f, fm, r, rm)
    metrics.update(extra)
    metrics["logratio/forget"] = np.mean(-d[rows])
    return dict(loss=npo_coeff * loss_f + value, grad_forget=npo_coeff * grad_f,
                grad_retain=grad_r, grad_retain_kl=grad_kl, **_prefix(metrics))  # fmt: skip


def simnpo(f, fm, r, rm, kl, beta=2.5, gamma=0.0, npo_coeff=0.1375, retain="nll", weight=1.0,
           normalization="tokens"):  # fmt: skip
    """The official SimNPO (`simnpo_grad_diff`); `gamma` is the code's."""
    n = row_lengths(fm)
    rows = np.flatnonzero(n > 0)
    nll = batch_nll(f, fm)
    a = np.array([nll[i] / n[i] - gamma if n[i] else 0.0 for i in range(len(n))])
    loss_f = np.mean([-(2.0 / beta) * log_sigmoid(beta * a[i]) for i in rows])
    grad_f = np.zeros_like(f)
    for i in rows:
        grad_f[i] = np.where(fm[i] != 0, 2.0 * sigmoid(-beta * a[i]) / n[i] / len(rows), 0.0)
    value, grad_r, grad_kl, extra = retain_part(retain, weight, r, rm, kl, normalization)
    metrics = common_metrics(f, fm, r, rm)
    metrics.update(extra)
    return dict(loss=npo_coeff * loss_f + value, grad_forget=npo_coeff * grad_f,
                grad_retain=grad_r, grad_retain_kl=grad_kl, **_prefix(metrics))  # fmt: skip


def _prefix(metrics):
    return {f"metrics/{k}": v for k, v in metrics.items()}
