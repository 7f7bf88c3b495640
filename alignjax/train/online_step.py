"""The training side of `task: online`: a batch of scored rollouts as the step's batch kind
"online", the step spec of each method, and the reference's log-probs of a rollout.

A rollout of N rows (prompt + completion, `online.Rollout`) becomes an `OnlineBatch`: the token
arrays of a padded batch (`[N, P + C]`, left-padded prompt then the completion, `labels` /
`loss_mask` on the completion tokens through the stop token) and per row its advantage, total
reward and EOS flag, with the old policy's and the reference's per-token log-probs in the same
`[N, P + C]` layout when the method reads them. The jitted step (`step.build_step`) runs on it
unchanged: the forward pass and fused LM head at the sampling temperature
(`StepSpec.temperature`), then `OnlineBatch.loss_batch` puts the per-token results into a
`losses.ScoredRolloutBatch` for the registered loss ("grpo", "rloo", "reinforce_kl",
"online_dpo", "xpo", "nash_md"), whose (sum, count) terms keep accumulation and devices exact.

Micro-batches (`optim.grad_accum` = A): the rows are split into A consecutive blocks, each laid
out like a whole batch: groups of G rows stay together (GRPO, RLOO, REINFORCE), and Online DPO's
(and XPO's) `[first samples; second samples]` becomes A blocks of `[first; second]` of their own
prompts. Nash-MD's batch holds the policy's samples only, each row with its opponent's (the
mixture's sample's) score and EOS flag.
Online DPO batches count pairs in `valid` (`[N / 2]`), so pmap splits them as paired batches
(`placement.split_batch_for_pmap`). Several processes place the whole batch in this layout
(every process holds it, `train.online`), so the step needs no `StepSpec.row_blocks`.

The reference's log-probs are computed once per rollout (`reference_logps`, no gradient), at
the same temperature as the policy's in the step, from a frozen copy of the initial policy or
the policy with its adapters disabled; the step reads them like precomputed ones
(`StepSpec(reference="precomputed")`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from alignjax import ops
from alignjax.data.batching import shift_labels
from alignjax.losses.online import ScoredRolloutBatch
from alignjax.peft import adapters_disabled
from alignjax.train.forward import swap_row_blocks, to_sequences
from alignjax.train.online_config import PAIR_METHODS, needs_reference
from alignjax.train.state import model_of
from alignjax.train.step import StepSpec

__all__ = ["OnlineBatch", "online_batch", "rollout_rows", "online_spec", "reference_logps"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlineBatch:
    """Scored rollouts as a training batch (host NumPy or device arrays; see module docstring).

    Attributes:
      input_ids, attention_mask, positions, labels, loss_mask: `[R, L]` token arrays, as
        `data.Batch` (labels shifted: position t predicts token t + 1).
      valid: `[E]` ones: E = R rows, or R / 2 pairs for Online DPO's two halves.
      advantages, rewards: `[R]` float32; rewards NaN where no reward function scored the row.
      contains_eos: `[R]` bool.
      opponent_rewards, opponent_contains_eos: `[R]` the score and EOS flag of the sample each
        row is compared with (Nash-MD's mixture samples), or None.
      old_logps, ref_logps: `[R, L]` per-token log-probs of the sampling policy and the
        reference at the sampling temperature (0 off `loss_mask`), or None.
    """

    input_ids: Any
    attention_mask: Any
    positions: Any
    labels: Any
    loss_mask: Any
    valid: Any
    advantages: Any
    rewards: Any
    contains_eos: Any
    old_logps: Any = None
    ref_logps: Any = None
    opponent_rewards: Any = None
    opponent_contains_eos: Any = None

    seq_row = None  # never packed
    segment_ids = None

    def model_inputs(self) -> dict:
        return dict(
            input_ids=self.input_ids, attention_mask=self.attention_mask, positions=self.positions
        )

    def loss_batch(self, spec, logps, mask, ref_logps=None) -> ScoredRolloutBatch:
        """The loss's `ScoredRolloutBatch` from the step's per-token values (loss layout)."""
        adv, rewards, eos, old, opp, opp_eos = to_sequences(
            spec, self, [self.advantages, self.rewards, self.contains_eos, self.old_logps,
                         self.opponent_rewards, self.opponent_contains_eos]
        )  # fmt: skip
        return ScoredRolloutBatch(logps=logps, mask=mask, advantages=adv, old_logps=old,
                                  ref_logps=ref_logps, rewards=rewards, contains_eos=eos,
                                  opponent_rewards=opp,
                                  opponent_contains_eos=opp_eos)  # fmt: skip


def rollout_rows(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict:
    """Host token arrays `[N, P + C]` of N rollouts: `input_ids`, `attention_mask`, `positions`
    (counting real tokens, as `models.generate` placed them), and `labels` / `loss_mask` on
    the completion tokens through the stop token."""
    ids = np.concatenate([prompt_ids, completion_ids], 1).astype(np.int32)
    attention = np.concatenate([prompt_mask, completion_mask], 1).astype(np.int32)
    completion = np.concatenate([np.zeros_like(prompt_mask), completion_mask], 1)
    labels, loss_mask = shift_labels(ids, attention, completion)
    positions = np.maximum(np.cumsum(attention, 1) - 1, 0).astype(np.int32)
    return dict(input_ids=ids, attention_mask=attention, positions=positions, labels=labels,
                loss_mask=loss_mask)  # fmt: skip


def completion_to_rows(values, prompt_length: int, length: int) -> np.ndarray:
    """Per-completion-token values `[N, C]` -> the rows' `[N, length]` label layout: completion
    token j is predicted at position `prompt_length - 1 + j`."""
    values = np.asarray(values, np.float32)
    out = np.zeros((values.shape[0], length), np.float32)
    out[:, prompt_length - 1 : prompt_length - 1 + values.shape[1]] = values
    return out


def online_batch(fields: Mapping[str, Any], *, pairs: bool, accum: int = 1) -> OnlineBatch:
    """N rows in the rollout's layout (`fields`: the `OnlineBatch` arrays but `valid`) -> an
    `OnlineBatch`, with a leading axis of `accum` self-contained micro-batches when accum > 1
    (module docstring). `pairs`: rows are `[first samples; second samples]` (Online DPO)."""
    n = np.shape(fields["input_ids"])[0]
    if n % accum or (pairs and (n // 2) % accum):
        raise ValueError(f"{n} rollouts do not split into {accum} micro-batches"
                         + (" of whole pairs" if pairs else ""))  # fmt: skip

    def arrange(x):
        if x is None:
            return None
        x = np.asarray(x)
        if pairs and accum > 1:
            x = swap_row_blocks(x, 2, accum)  # [first; second] -> A x [first_a; second_a]
        return x if accum == 1 else x.reshape(accum, n // accum, *x.shape[1:])

    valid = np.ones(n // 2 if pairs else n, np.int32)
    valid = valid if accum == 1 else valid.reshape(accum, -1)
    return OnlineBatch(valid=valid, **{k: arrange(v) for k, v in fields.items()})


def method_kwargs(o) -> dict:
    """The registered loss's keyword arguments from a resolved `OnlineConfig`."""
    if o.method == "grpo":
        return dict(loss_type=o.loss_type, beta=o.beta, epsilon=o.epsilon,
                    epsilon_high=o.epsilon_high, delta=o.delta,
                    use_bias_correction_kl=o.use_bias_correction_kl,
                    max_completion_length=o.max_new_tokens,
                    importance_sampling_level=o.importance_sampling_level)  # fmt: skip
    if o.method == "rloo":
        return dict(epsilon=o.epsilon, epsilon_high=o.epsilon_high)
    if o.method == "reinforce_kl":
        return dict(beta=o.beta, baseline=o.baseline, num_generations=o.num_generations)
    if o.method == "xpo":
        return dict(beta=o.beta, alpha=o.alpha, loss_type=o.loss_type,
                    missing_eos_penalty=o.missing_eos_penalty)  # fmt: skip
    if o.method == "nash_md":
        return dict(beta=o.beta, missing_eos_penalty=o.missing_eos_penalty)
    return dict(beta=o.beta, loss_type=o.loss_type, missing_eos_penalty=o.missing_eos_penalty)


def online_spec(cfg) -> StepSpec:
    """The step of `task: online`: the method's registered loss (with `loss.kwargs` on top),
    the reference's log-probs carried by the batch when the method reads them, log-probs at the
    sampling temperature (Online DPO, XPO, Nash-MD: at temperature 1, as TRL scores its
    pairs)."""
    o = cfg.online.resolved()
    kwargs = {**method_kwargs(o), **dict(cfg.loss.kwargs)}
    return StepSpec(
        task="online",
        loss=o.method,
        loss_kwargs=kwargs,
        reference="precomputed" if needs_reference(o) else "none",
        temperature=1.0 if o.method in PAIR_METHODS else float(o.temperature),
    )


@functools.partial(jax.jit, static_argnames=("adapters_off", "temperature"))
def reference_logps(state, ref_params, batch: OnlineBatch, *, adapters_off: bool,
                    temperature: float) -> jax.Array:  # fmt: skip
    """`[R, L]` log-probs of a batch's labels under the reference at `temperature` (0 off the
    loss mask): the policy with `ref_params` (a frozen copy of its trainable state), or with its
    adapters disabled (`adapters_off`, `ref_params` unused)."""
    if adapters_off:
        with adapters_disabled(model_of(state)) as base:
            out, w = base(**batch.model_inputs()), base.unembed()
    else:
        model = model_of(state, ref_params)
        out, w = model(**batch.model_inputs()), model.unembed()
    logps = ops.fused_token_logps(out.last_hidden_state, w, batch.labels, batch.loss_mask,
                                  temperature=temperature)  # fmt: skip
    return jax.lax.stop_gradient(logps)
