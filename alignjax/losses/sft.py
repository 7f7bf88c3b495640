"""Supervised terms on the chosen completions: NLL (TRL's `sft` loss type)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.types import LossOutput, LossTerm, PreferenceBatch, masked_sum


def nll_term(batch: PreferenceBatch, mask: jax.Array | None = None) -> LossTerm:
    """-sum of chosen log-probs over `mask` (default: the chosen completion) and its token count."""
    mask = batch.chosen_mask if mask is None else mask
    total = -jnp.sum(masked_sum(batch.chosen_logps, mask))
    return LossTerm(total, jnp.sum(mask != 0).astype(total.dtype), 1.0)


def sft(batch: PreferenceBatch) -> LossOutput:
    """Token-mean NLL of the chosen completions, -mean_{t in y_w} log pi(y_t).

    Kept as (sum over tokens, number of tokens), so micro-batch and multi-device averages are
    token means over the whole batch. TRL 1.16's `sft` loss type; RPO (Pang et al. 2024,
    arXiv:2404.19733) is `sigmoid` + rpo_alpha * `sft`.
    """
    term = nll_term(batch)
    per_example = -masked_sum(batch.chosen_logps, batch.chosen_mask)
    zeros = jnp.zeros_like(per_example)
    return LossOutput(
        terms={"sft": term},
        losses=jnp.broadcast_to(term.value, per_example.shape),
        chosen_rewards=zeros,
        rejected_rewards=zeros,
        metrics={"nll/chosen": jax.lax.stop_gradient(term.value)},
    )
