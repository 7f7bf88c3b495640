"""Float64 NumPy derivations of the official SPPO, TDPO, SparsePO, MaPO and Qi et al. formulas
(specs/losses.md sections 4-5), each with its analytic gradient w.r.t. the chosen and rejected
per-token policy log-probs. Written from the spec with loops and textbook formulas; they share no
code with alignjax. `generate_numpy_token.py` evaluates them into a committed fixture.

Per-token arrays are `[B, T]` per side; `m` is the 0/1 completion mask.
"""

from __future__ import annotations

import numpy as np


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def masked_sum(x, m):
    return np.where(m != 0, x, 0.0).sum(-1)


def sppo(pol_w, pol_l, ref_w, ref_l, m_w, m_l, pw, pl, beta):
    """Official `sppo`: 0.5 [(a - (P_w - 1/2)/beta)^2 + (b - (P_l - 1/2)/beta)^2]."""
    a, b = masked_sum(pol_w - ref_w, m_w), masked_sum(pol_l - ref_l, m_l)
    ew, el = a - (pw - 0.5) / beta, b - (pl - 0.5) / beta
    losses = 0.5 * (ew**2 + el**2)
    return dict(
        losses=losses,
        chosen_rewards=beta * a,
        rejected_rewards=beta * b,
        grad_w=np.where(m_w != 0, ew[:, None], 0.0),
        grad_l=np.where(m_l != 0, el[:, None], 0.0),
    )


def sppo_single(pol_w, pol_l, ref_w, ref_l, m_w, m_l, p, beta):
    """Official `sppo_single`: 0.5 [(a - (P - 1/2)/beta)^2 + (b + (P - 1/2)/beta)^2]."""
    a, b = masked_sum(pol_w - ref_w, m_w), masked_sum(pol_l - ref_l, m_l)
    ew, el = a - (p - 0.5) / beta, b + (p - 0.5) / beta
    return dict(
        losses=0.5 * (ew**2 + el**2),
        chosen_rewards=beta * a,
        rejected_rewards=beta * b,
        grad_w=np.where(m_w != 0, ew[:, None], 0.0),
        grad_l=np.where(m_l != 0, el[:, None], 0.0),
    )


def win_probabilities(scores):
    """compute_prob.py: P_jk = 1 / (1 + exp(s_k - s_j)); chosen = argmax, rejected = argmin;
    P_w, P_l = row means of P (self included); P = P_{w l}."""
    out = {
        k: [] for k in ("chosen", "rejected", "chosen_win_prob", "rejected_win_prob", "win_prob")
    }
    for s in scores:
        k = len(s)
        pref = np.empty((k, k))
        for j in range(k):
            for i in range(k):
                pref[j, i] = 1.0 / (1.0 + np.exp(s[i] - s[j]))
        w, lo = int(np.argmax(s)), int(np.argmin(s))
        out["chosen"].append(w)
        out["rejected"].append(lo)
        out["chosen_win_prob"].append(pref[w].mean())
        out["rejected_win_prob"].append(pref[lo].mean())
        out["win_prob"].append(pref[w, lo])
    return {k: np.asarray(v) for k, v in out.items()}


def tdpo(pol_w, pol_l, ref_w, ref_l, kl_w, kl_l, m_w, m_l, beta, alpha, version):
    """Official `tdpo_loss`: u = A_w - A_l; TDPO1 margin u - (S_l - S_w), TDPO2 u - alpha (S_l -
    S_w) (S_w detached, which does not change the gradient w.r.t. the log-probs); the loss is
    -log s(beta margin); rewards beta (A + S)."""
    a_w, a_l = masked_sum(pol_w - ref_w, m_w), masked_sum(pol_l - ref_l, m_l)
    s_w, s_l = masked_sum(kl_w, m_w), masked_sum(kl_l, m_l)
    scale = 1.0 if version == 1 else alpha
    margin = (a_w - a_l) - scale * (s_l - s_w)
    g = -beta * sigmoid(-beta * margin)  # d loss / d margin
    return dict(
        losses=-log_sigmoid(beta * margin),
        chosen_rewards=beta * (a_w + s_w),
        rejected_rewards=beta * (a_l + s_l),
        grad_w=np.where(m_w != 0, g[:, None], 0.0),
        grad_l=np.where(m_l != 0, -g[:, None], 0.0),
    )


def sparsepo(
    pol_w, pol_l, ref_w, ref_l, kl_w, kl_l, m_w, m_l, mu_w, mu_l, md_w, md_l, beta, l1_u, l1_d
):
    """Official SparsePO: U = sum m m_u Delta, D = sum m m_d KL; -log s(beta [(U_w - U_l) -
    (D_l - D_w)]) + l1_u (|m_u(y_w)|_1 + |m_u(y_l)|_1) + l1_d (...); rewards beta (U - D)."""
    u_w, u_l = masked_sum(mu_w * (pol_w - ref_w), m_w), masked_sum(mu_l * (pol_l - ref_l), m_l)
    d_w, d_l = masked_sum(md_w * kl_w, m_w), masked_sum(md_l * kl_l, m_l)
    margin = (u_w - u_l) - (d_l - d_w)
    l1 = l1_u * (masked_sum(np.abs(mu_w), m_w) + masked_sum(np.abs(mu_l), m_l))
    l1 = l1 + l1_d * (masked_sum(np.abs(md_w), m_w) + masked_sum(np.abs(md_l), m_l))
    g = -beta * sigmoid(-beta * margin)
    zero_mu = ((mu_w == 0) & (m_w != 0)).sum() + ((mu_l == 0) & (m_l != 0)).sum()
    return dict(
        losses=-log_sigmoid(beta * margin) + l1,
        chosen_rewards=beta * (u_w - d_w),
        rejected_rewards=beta * (u_l - d_l),
        grad_w=np.where(m_w != 0, g[:, None] * mu_w, 0.0),
        grad_l=np.where(m_l != 0, -g[:, None] * mu_l, 0.0),
        sparsity=np.array(zero_mu / ((m_w != 0).sum() + (m_l != 0).sum())),
    )


def mapo_rescale(act, m):
    """MaPO's `zn_rescale` of one activation, per row over the masked tokens: z-normalise (mean,
    unbiased std + 1e-12), then min-max to [0, 1]; 0 outside the mask (a constant row or a single
    token gets 1, where the official code divides by zero)."""
    x = np.asarray(act, np.float64).reshape(*act.shape[:2], -1).mean(-1)
    out = np.zeros_like(x)
    for row in range(x.shape[0]):
        idx = np.flatnonzero(m[row] != 0)
        if len(idx) == 0:
            continue
        v = x[row, idx]
        std = v.std(ddof=1) if len(idx) > 1 else 0.0
        z = (v - v.mean()) / (std + 1e-12)
        span = z.max() - z.min()
        out[row, idx] = (z - z.min()) / span if span > 0 else 1.0
    return out


def mapo_mask(groups, m):
    """Average of `mapo_rescale` within each activation group, then across groups."""
    return sum(sum(mapo_rescale(a, m) for a in arrs) / len(arrs) for arrs in groups) / len(groups)


def constrained_beta(m, beta, first, bias, bias_length):
    """Official `get_beta_list`: beta * first at response position 1, beta * bias at 2..bias_length,
    beta after (positions count the completion tokens of each row from 1)."""
    out = np.zeros(m.shape)
    for row in range(m.shape[0]):
        pos = 0
        for t in range(m.shape[1]):
            if m[row, t] != 0:
                pos += 1
                out[row, t] = beta * (first if pos == 1 else bias if pos <= bias_length else 1.0)
    return out


def token_constrained_sft(pol, ref, m, beta, first, bias, bias_length):
    """Qi et al. Eq. 3 (official `soft_sft_loss`): mean over the batch's completion tokens of
    (2 / beta_t) softplus(-beta_t Delta_t); gradient -2 s(-beta_t Delta_t) / count per token. The
    official surrogate -mean[sg(w_t) log pi], w_t = max(2 (1 - s(beta_t Delta_t)), 1e-3), has the
    same gradient where the floor is inactive, and its value is reported separately."""
    bt = constrained_beta(m, beta, first, bias, bias_length)
    keep = m != 0
    count = keep.sum()
    safe_bt = np.where(keep, bt, 1.0)
    d = pol - ref
    obj = np.where(keep, 2.0 / safe_bt * np.logaddexp(0.0, -safe_bt * d), 0.0).sum() / count
    w = np.maximum(2.0 * (1.0 - sigmoid(safe_bt * d)), 1e-3)
    surrogate = -np.where(keep, w * pol, 0.0).sum() / count
    grad = np.where(keep, -2.0 * sigmoid(-safe_bt * d), 0.0) / count
    grad_surrogate = np.where(keep, -w, 0.0) / count
    return dict(
        beta_t=bt,
        loss=np.array(obj),
        grad=grad,
        surrogate_loss=np.array(surrogate),
        grad_surrogate=grad_surrogate,
    )
