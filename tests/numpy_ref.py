"""Float64 NumPy derivations of the ops, written from the definitions (specs/losses.md).

They share no code with alignjax: loops and textbook formulas, chosen for obviousness.
"""

import numpy as np


def log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def head_logits(h, w, b=None, soft_cap=None, temperature=1.0):
    u = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        u = u + np.asarray(b, np.float64)
    if soft_cap is not None:
        u = soft_cap * np.tanh(u / soft_cap)
    return u / temperature


def token_logps(z, y, mask=None):
    lp = np.take_along_axis(log_softmax(z), np.asarray(y)[..., None], -1)[..., 0]
    return lp if mask is None else np.where(np.asarray(mask) != 0, lp, 0.0)


def token_entropy(z, mask=None):
    lp = log_softmax(z)
    h = -(np.exp(lp) * lp).sum(-1)
    return h if mask is None else np.where(np.asarray(mask) != 0, h, 0.0)


def token_kl(z_policy, z_ref, mask=None):
    """KL(ref || policy) = sum_v p_ref (log p_ref - log p_policy)."""
    lr, lz = log_softmax(z_ref), log_softmax(z_policy)
    kl = (np.exp(lr) * (lr - lz)).sum(-1)
    return kl if mask is None else np.where(np.asarray(mask) != 0, kl, 0.0)


# Analytic gradients w.r.t. the (policy) logits, for a cotangent g of shape [...].
def grad_logps(z, y, g):
    p = np.exp(log_softmax(z))
    onehot = np.eye(z.shape[-1])[np.asarray(y)]
    return np.asarray(g, np.float64)[..., None] * (onehot - p)


def grad_entropy(z, g):
    lp = log_softmax(z)
    p = np.exp(lp)
    h = -(p * lp).sum(-1, keepdims=True)
    return -np.asarray(g, np.float64)[..., None] * p * (lp + h)


def grad_kl(z_policy, z_ref, g):
    return np.asarray(g, np.float64)[..., None] * (
        np.exp(log_softmax(z_policy)) - np.exp(log_softmax(z_ref))
    )


def sequence_sum(v, mask):
    return np.array([sum(float(a) for a, m in zip(row, mrow) if m) for row, mrow in zip(v, mask)])


def sequence_mean(v, mask):
    out = []
    for row, mrow in zip(v, mask):
        sel = [float(a) for a, m in zip(row, mrow) if m]
        out.append(sum(sel) / len(sel) if sel else 0.0)
    return np.array(out)


def segment_sums(v, seg, num_segments, mask=None):
    v = np.asarray(v, np.float64)
    out = np.zeros(v.shape[:-1] + (num_segments,))
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if seg[b, t] > 0 and (mask is None or mask[b, t]):
                out[b, seg[b, t] - 1] += v[b, t]
    return out


def ld_sum(v, mask, lp, alpha):
    out = []
    for row, mrow, l_p in zip(v, mask, lp):
        pos, total = 0, 0.0
        for a, m in zip(row, mrow):
            if m:
                pos += 1
                total += float(a) if pos <= l_p else alpha * float(a)
        out.append(total)
    return np.array(out)


def mapo_rescale(act, mask):
    """The official zn_rescale, row by row, in float64 (degenerate rows -> 1 on the mask)."""
    x = np.asarray(act, np.float64).reshape(act.shape[0], act.shape[1], -1).mean(-1)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        sel = np.asarray(mask[b]) != 0
        vals = x[b, sel]
        if len(vals) == 0:
            continue
        if len(vals) < 2 or vals.max() == vals.min():
            out[b, sel] = 1.0
            continue
        z = (vals - vals.mean()) / (vals.std(ddof=1) + 1e-12)
        out[b, sel] = (z - z.min()) / (z.max() - z.min())
    return out
