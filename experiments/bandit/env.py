"""The bandit: 100 actions, the reference policy pi_ref (binned tanh-Cauchy), the Gaussian-bump
rewards peaked near or far from pi_ref's mode, the KL-regularised optimum pi*, and the exact
metrics of a tabular policy (sums over the actions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_ACTIONS = 100
PEAKS = {"near": 20, "far": 70}  # official reward_5 / reward_4
PEAK_HALFWIDTH = 8  # r(a* +- 8) = 0.53, r(a* +- 9) = 0.44


def reference_probs(num_actions: int = NUM_ACTIONS, loc=-0.7, scale=0.4) -> np.ndarray:
    """pi_data of the official code: tanh(Cauchy(loc, scale)) in `num_actions` equal bins on
    [-1, 1], exact bin masses from the Cauchy CDF (float64; every bin > 0)."""
    edges = np.linspace(-1.0, 1.0, num_actions + 1)
    with np.errstate(divide="ignore"):
        x = np.arctanh(edges)  # +-inf at the ends: CDF 0 and 1
    cdf = 0.5 + np.arctan((x - loc) / scale) / np.pi
    return np.diff(cdf)


def reward(peak: float, num_actions: int = NUM_ACTIONS, width: float = 10.0) -> np.ndarray:
    """r(a) = exp(-((a - a*) / width)^2), the official reward_4 / reward_5 (float64)."""
    a = np.arange(num_actions)
    return np.exp(-(((a - peak) / width) ** 2))


def kl_optimum(logref: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """pi* = pi_ref exp(r / beta) / Z, the maximiser of E_pi[r] - beta KL(pi || pi_ref)."""
    s = logref + rewards / beta
    p = np.exp(s - s.max())
    return p / p.sum()


def kl_div(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis, float64, with 0 log 0 = 0 (float32 policies underflow)."""
    p = np.asarray(p, np.float64)
    return np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) / q), 0.0), axis=-1)


LOG_REF = np.log(reference_probs())


def policy_metrics(theta, rewards, peak) -> dict:
    p, logp = jax.nn.softmax(theta), jax.nn.log_softmax(theta)
    near = jnp.abs(jnp.arange(theta.shape[0]) - peak) <= PEAK_HALFWIDTH
    return {
        "reward": p @ rewards,
        "kl": jnp.sum(p * (logp - jnp.asarray(LOG_REF, logp.dtype))),
        "peak_mass": jnp.sum(jnp.where(near, p, 0.0)),
    }
