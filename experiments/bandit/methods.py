"""The compared methods, the study's configuration, and each objective's loss on weighted data.

Every objective (DPO, IPO, best-of-N SFT, REINFORCE-KL) is a weighted sum of alignjax losses
over rows of data; the rows come either from a sampled batch (`sampled_data`) or from the
enumeration of the sampling distribution (`exact_data`, the expected loss), so the exact and
sampled runs share `objective_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignjax import losses as L
from experiments.bandit.env import NUM_ACTIONS


class Method(NamedTuple):
    name: str
    objective: str  # "dpo" | "ipo" | "bon" | "pg"
    on_policy: bool


METHODS = (
    Method("on-policy DPO", "dpo", True),
    Method("on-policy IPO", "ipo", True),
    Method("on-policy best-of-N", "bon", True),
    Method("on-policy REINFORCE-KL", "pg", True),
    Method("offline DPO", "dpo", False),
    Method("offline IPO", "ipo", False),
    Method("offline best-of-N", "bon", False),
)
BY_NAME = {m.name: m for m in METHODS}
PAIRWISE = {"dpo": "sigmoid", "ipo": "ipo"}
OBJECTIVES = ("dpo", "ipo", "bon", "pg")


@dataclass(frozen=True)
class Study:
    epochs: int = 100
    inner: int = 15  # gradient steps per batch
    groups: int = 10  # groups ("train states") per on-policy batch
    n: int = 10  # samples per group
    beta: float = 0.05  # DPO beta, IPO tau, REINFORCE-KL beta
    seeds: int = 10  # evaluation seeds 0..seeds-1
    tuning_seeds: int = 4  # lr selection on seeds 1000..
    adam_lrs: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    sgd_lrs: tuple = (1.0, 3.0, 10.0)
    ablations: bool = True


def best_of_n_probs(probs, rewards, n: int):
    """Exact distribution of the highest-reward sample among n i.i.d. draws from `probs`,
    ties to the first drawn: q(a) = pi(a) sum_{k<n} F_le(a)^k F_lt(a)^(n-1-k) (the telescoped
    (F_le^n - F_lt^n) / mass of a's reward level, without the cancellation)."""
    le = (rewards[None, :] <= rewards[:, None]).astype(probs.dtype)
    lt = (rewards[None, :] < rewards[:, None]).astype(probs.dtype)
    f_le, f_lt = le @ probs, lt @ probs
    return probs * sum(f_le**k * f_lt ** (n - 1 - k) for k in range(n))


def pair_rows(first, second, weight, rewards) -> dict:
    """The pairs (first_i, second_i) labelled by `losses.pair_by_reward` (higher reward chosen,
    ties to `first`), with weights: `chosen`, `rejected`, `pair_w` `[P]`."""
    chosen, rejected, _ = L.pair_by_reward(jnp.concatenate([rewards[first], rewards[second]]))
    actions = jnp.concatenate([first, second])
    return {"chosen": actions[chosen], "rejected": actions[rejected], "pair_w": weight}


def pair_grid(rows: dict, num_actions: int = NUM_ACTIONS) -> dict:
    """The same pairs as weights on the full (chosen, rejected) grid, `[V * V]` rows: the
    loss is the same sum, grouped by distinct pairs (cheaper than 45,000 sampled rows)."""
    v = num_actions
    cells = rows["chosen"] * v + rows["rejected"]
    w = jnp.zeros(v * v, rows["pair_w"].dtype).at[cells].add(rows["pair_w"])
    return {"chosen": jnp.repeat(jnp.arange(v), v), "rejected": jnp.tile(jnp.arange(v), v),
            "pair_w": w}  # fmt: skip


def exact_data(probs, rewards, n: int) -> dict:
    """Every objective's data for the expected loss under the sampling distribution `probs`:
    pair rows = all ordered pairs (y1, y2) with weights pi(y1) pi(y2), on the grid; `best` the
    best-of-n distribution over actions; `actions` / `rows` every action with weight pi
    (REINFORCE-KL)."""
    v = probs.shape[0]
    first, second = jnp.repeat(jnp.arange(v), v), jnp.tile(jnp.arange(v), v)
    return {
        **pair_grid(pair_rows(first, second, probs[first] * probs[second], rewards), v),
        "best": best_of_n_probs(probs, rewards, n),
        "actions": jnp.arange(v),
        "rows": probs,
    }


def sampled_data(samples, rewards, num_actions: int = NUM_ACTIONS, grid: bool = False) -> dict:
    """Every objective's data for a sampled batch `[groups, n]` of actions: every pair i < j
    within a group (the official `dpo_loss`), each 1 / #pairs (on the grid when `grid`); `best`
    each group's highest-reward sample (first on ties), each 1 / groups; `actions` / `rows` the
    samples, each 1 / #samples (REINFORCE-KL, leave-one-out baseline within groups)."""
    groups, n = samples.shape
    dtype = rewards.dtype
    i, j = np.triu_indices(n, 1)
    first, second = samples[:, i].reshape(-1), samples[:, j].reshape(-1)
    pairs = pair_rows(first, second, jnp.full(first.shape, 1.0 / first.shape[0], dtype), rewards)
    best = samples[jnp.arange(groups), jnp.argmax(rewards[samples], axis=1)]
    return {
        **(pair_grid(pairs, num_actions) if grid else pairs),
        "best": jnp.zeros(num_actions, dtype).at[best].add(1.0 / groups),
        "actions": samples.reshape(-1),
        "rows": jnp.full((groups * n,), 1.0 / (groups * n), dtype),
    }


def objective_loss(theta, data, rewards, logref, *, objective: str, beta: float, n: int, sampled):
    """One objective's weighted loss sum_k w_k loss_k, with alignjax's losses: DPO / IPO on the
    pair rows (`chosen`, `rejected`) weighted by `pair_w`, the NLL of the actions weighted by
    `best`, `reinforce_kl_loss` on `actions` weighted by `rows`, with the leave-one-out
    baseline within groups of n when `sampled`, and in the exact expectation the baseline's
    expectation E_sampler[r'] (independent of the sample it is subtracted from, so the exact
    gradient is the sampled one's expectation also when the policy has moved away from the
    sampler during the epoch's later steps; on-policy it does not change the gradient)."""
    logp = jax.nn.log_softmax(theta)
    if objective in PAIRWISE:
        c, r = data["chosen"], data["rejected"]
        ones = jnp.ones((c.shape[0], 1), logp.dtype)
        batch = L.PreferenceBatch(
            chosen_logps=logp[c][:, None],
            rejected_logps=logp[r][:, None],
            chosen_mask=ones,
            rejected_mask=ones,
            ref_chosen_logps=logref[c],
            ref_rejected_logps=logref[r],
        )
        return jnp.sum(data["pair_w"] * L.get(PAIRWISE[objective])(batch, beta=beta).losses)
    if objective == "bon":
        return -jnp.sum(data["best"] * logp)
    a, w = data["actions"], data["rows"]
    ones = jnp.ones((a.shape[0], 1), logp.dtype)
    batch = L.RolloutBatch(logps=logp[a][:, None], mask=ones, ref_logps=logref[a][:, None])
    if sampled:
        baseline = "loo"
    else:  # the leave-one-out baseline's expectation: E_sampler[r'], r' at the current policy
        shaped = rewards[a] - beta * lax.stop_gradient(logp[a] - logref[a])
        baseline = jnp.full(a.shape, jnp.sum(w * shaped))
    out = L.reinforce_kl_loss(
        batch, rewards[a], beta=beta, baseline=baseline, num_generations=n if sampled else None
    )
    return jnp.sum(w * out.losses)
