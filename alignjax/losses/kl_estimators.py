"""Per-token estimators of KL(pi || ref) from the log-probs of sampled tokens, with what each
estimates and what its gradient is (Schulman 2020, "Approximating KL divergence";
specs/online.md 3.1 table). Notation: d = log pi(y_t) - log ref(y_t), r = ref / pi = e^{-d}.

Numerics: k3 and the importance ratio exponentiate log-ratios; `clamped_exp` clamps the
exponent above at `MAX_LOG_RATIO` = 20 (Tunix's bound on the log-ratio; e^20 ~ 4.9e8) so values
and gradients stay finite in float32 for any input. TRL 1.16 does not clamp: both agree whenever
the exponent is <= 20; beyond that TRL's float32 values overflow to inf near 88.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

MAX_LOG_RATIO = 20.0


def clamped_exp(x):
    """exp(min(x, MAX_LOG_RATIO)): exact below the bound, finite (zero gradient) above."""
    return jnp.exp(jnp.minimum(x, MAX_LOG_RATIO))


def kl_k1(logps, ref_logps):
    """k1 = d. Unbiased for KL(pi || ref) under y ~ pi, but signed and high-variance; in a loss
    its on-policy expected gradient is 0 (E[grad log pi] = 0): use it in the reward."""
    return logps - ref_logps


def kl_k2(logps, ref_logps):
    """k2 = d^2 / 2. Biased for KL(pi || ref) (exact to second order), >= 0, low variance; its
    on-policy expected gradient is E[d grad log pi], the reverse-KL score gradient (Tunix's
    `mse_kl`)."""
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps, ref_logps):
    """k3 = r - 1 - log r = e^{ref - logp} - (ref - logp) - 1. Unbiased for KL(pi || ref) under
    y ~ pi and >= 0 (TRL GRPO, DeepSeekMath arXiv:2402.03300 Eq. 4); its on-policy expected
    gradient is grad KL(ref || pi) (forward KL), not that of the reverse KL."""
    delta = ref_logps - logps
    return clamped_exp(delta) - delta - 1.0


def kl_k3_ratio(logps, ref_logps, old_logps):
    """rho k3 with rho = pi / pi_old (gradient through rho; TRL's `use_bias_correction_kl`,
    DeepSeek-V3.2). Unbiased for KL(pi || ref) under y ~ pi_old; on-policy its expected
    gradient is E[d grad log pi], the per-token reverse-KL score gradient."""
    return clamped_exp(logps - lax.stop_gradient(old_logps)) * kl_k3(logps, ref_logps)
