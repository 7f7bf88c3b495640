"""The training loop: one run of a method (on-policy or offline, exact or sampled) as a
`lax.scan` over epochs of gradient steps, and batches of runs under one compiled `vmap`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from experiments.bandit.env import LOG_REF, PEAKS, policy_metrics, reward
from experiments.bandit.methods import OBJECTIVES, Study, exact_data, objective_loss, sampled_data


def inverse_cdf(probs, uniforms):
    """Samples of `probs` from uniforms in [0, 1) by inverting the CDF (exact up to the
    rounding of the cumulative sum)."""
    cdf = jnp.cumsum(probs)
    idx = jnp.searchsorted(cdf, uniforms * cdf[-1], side="right")
    return jnp.minimum(idx, probs.shape[0] - 1)


def train(lr, rewards, peak, uniforms, objective, *, on_policy, exact, cfg, tx_fn=optax.adam):
    """One run: `(history, final probs)`; history[k] is `[epochs + 1]` (before training, then
    after each epoch of `cfg.inner` steps).

    `objective` (an index into OBJECTIVES) is traced, so one compiled function serves the
    objectives. The sampling distribution is the policy at the epoch's start (`on_policy`) or
    pi_ref (offline: one data set of `groups * epochs` groups drawn once, as weights on the pair
    grid; REINFORCE-KL is on-policy only). `uniforms` `[epochs * groups, n]` in [0, 1) drive
    the sampling (unused by exact runs); drawn outside, they keep the compile short and the
    streams common to every method."""
    theta0 = jnp.asarray(LOG_REF, rewards.dtype)
    tx = tx_fn(lr)
    branches = [
        functools.partial(objective_loss, objective=o, beta=cfg.beta, n=cfg.n, sampled=not exact)
        for o in OBJECTIVES
    ]

    def loss(theta, data):
        return lax.switch(objective, branches, theta, data, rewards, theta0)

    def data_from(logits, u, grid):
        probs = jax.nn.softmax(logits)
        if exact:
            return exact_data(probs, rewards, cfg.n)
        return sampled_data(inverse_cdf(probs, u), rewards, theta0.shape[0], grid)

    u = jnp.zeros((cfg.epochs, 0)) if exact else uniforms.reshape(cfg.epochs, cfg.groups, cfg.n)
    fixed = None if on_policy else data_from(theta0, uniforms, grid=True)

    def epoch(carry, u_epoch):
        theta, state = carry
        data = data_from(lax.stop_gradient(theta), u_epoch, False) if on_policy else fixed

        def step(c, _):
            th, st = c
            updates, st = tx.update(jax.grad(loss)(th, data), st, th)
            return (optax.apply_updates(th, updates), st), None

        (theta, state), _ = lax.scan(step, (theta, state), None, length=cfg.inner)
        return (theta, state), policy_metrics(theta, rewards, peak)

    (theta, _), hist = lax.scan(epoch, (theta0, tx.init(theta0)), u)
    first = policy_metrics(theta0, rewards, peak)
    hist = jax.tree.map(lambda h0, h: jnp.concatenate([h0[None], h]), first, hist)
    return hist, jax.nn.softmax(theta)


@functools.cache
def runner(exact: bool, on_policy: bool, cfg: Study, optimizer: str = "adam"):
    """jit(vmap over runs (lr, rewards, peak, uniforms)) of `train`; the objective is a traced
    argument shared by the batch."""
    tx_fn = {"adam": optax.adam, "sgd": optax.sgd}[optimizer]
    fn = functools.partial(train, on_policy=on_policy, exact=exact, cfg=cfg, tx_fn=tx_fn)
    return jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, 0, None)))


def seed_uniforms(cfg: Study, seed: int) -> np.ndarray:
    """`[epochs * groups, n]` uniforms from `np.random.default_rng(seed)`: every method sees the
    same stream for a seed (common random numbers)."""
    return np.random.default_rng(seed).random((cfg.epochs * cfg.groups, cfg.n), np.float32)


CHUNK = 20  # runs per compiled call: every sampled batch of runs has this shape


def run_configs(method, exact, cfg, configs, seeds, optimizer="adam"):
    """configs: [(peak name, lr)]; returns per config `(history of [S, E + 1] arrays,
    probs [S, V])`, S = len(seeds) (1 for exact runs). Runs are batched in chunks of CHUNK
    (the last one padded) so that calls of different sizes share one compile."""
    seeds = [0] if exact else list(seeds)
    runs = [(p, lr, s) for p, lr in configs for s in seeds]
    size = min(CHUNK, len(runs))
    pad = -len(runs) % size
    padded = runs + runs[:1] * pad
    fn = runner(exact, method.on_policy, cfg, optimizer)
    out = []
    for k in range(0, len(padded), size):
        chunk = padded[k : k + size]
        args = (
            jnp.asarray([lr for _, lr, _ in chunk], jnp.float32),
            jnp.asarray(np.stack([reward(PEAKS[p]) for p, _, _ in chunk]), jnp.float32),
            jnp.asarray([PEAKS[p] for p, _, _ in chunk], jnp.float32),
            jnp.asarray(
                np.stack(
                    [seed_uniforms(cfg, s) if not exact else np.zeros((1, 1)) for _, _, s in chunk]
                ),
                jnp.float32,
            ),  # fmt: skip
        )
        out.append(jax.tree.map(np.asarray, fn(*args, OBJECTIVES.index(method.objective))))
    hist = {k: np.concatenate([h[k] for h, _ in out])[: len(runs)] for k in out[0][0]}
    probs = np.concatenate([p for _, p in out])[: len(runs)]
    s = len(seeds)
    return [({k: v[i * s : (i + 1) * s] for k, v in hist.items()}, probs[i * s : (i + 1) * s])
            for i in range(len(configs))]  # fmt: skip
