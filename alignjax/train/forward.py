"""The forward pass of a training or evaluation step, as public functions: the reference's
outputs, per-token statistics in one fused LM-head pass, token masks, and the loss's batch.

    stats = token_stats(spec, state, state.params, batch)      # logps, ref_logps, kl, mask, masks
    lb = loss_batch(spec, batch, stats.logps, stats.mask, stats.ref_logps, stats.kl, stats.masks)
    out = spec.loss_fn(lb, **spec.loss_kwargs)

The step (`step.build_step`), evaluation (`evaluate.build_eval_step`), experiments and tests all
use these, so what a loss is trained on is what it is evaluated and analysed on. What is
computed follows `spec.needs` (`losses.LossNeeds`): the reference runs in the step when the loss
needs per-token KL or masks from the reference's layers; a `MaskProvider` turns the reference's
hidden states or activations into token weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from alignjax import losses as L
from alignjax import ops
from alignjax.data.batching import unpack
from alignjax.peft import adapters_disabled
from alignjax.train.state import TrainState, heads_of, model_of

__all__ = [
    "TokenStats",
    "reward_scores",
    "policy_outputs",
    "reference_outputs",
    "token_masks",
    "token_stats",
    "loss_batch",
    "to_sequences",
    "swap_row_blocks",
    "term_counts",
]


class TokenStats(NamedTuple):
    """Per-token values of a batch in the loss layout (`to_sequences`)."""

    logps: jax.Array  # policy log-probs [Q, L]
    ref_logps: jax.Array | None  # reference log-probs ([Q, L], or [Q] precomputed sums)
    kl: jax.Array | None  # per-token KL(ref || policy), when the loss needs it
    mask: jax.Array  # the loss mask [Q, L]
    masks: dict  # a MaskProvider's token weights, name -> [Q, L]


def policy_outputs(model, batch, *, reads: str | None = None):
    """`(models.ModelOutput, unembed)` of `model` on a batch; `reads` = "hidden_states" or
    "activations" also returns those (what a `MaskProvider` reads)."""
    out = model(
        **batch.model_inputs(),
        output_hidden_states=reads == "hidden_states",
        output_activations=reads == "activations",
    )
    return out, model.unembed()


def reference_outputs(spec, state: TrainState, params, batch):
    """The reference model's output (final hidden states, and the layer outputs or activations
    the loss's mask provider reads) and LM head, without gradient; (None, None) when the
    reference is not run in the step ("precomputed", "none", or a reference-free loss)."""
    if not (spec.needs.reference or spec.needs.reference_in_step):
        return None, None
    reads = None if spec.masks is None else spec.masks.reads
    if spec.reference == "frozen":
        if state.ref is None:
            raise ValueError("reference='frozen' needs a state built with reference='frozen'")
        ref = model_of(state, state.ref)
        ref.remat = False  # no gradient flows through the reference: nothing to recompute
        out, w = policy_outputs(ref, batch, reads=reads)
    elif spec.reference == "adapters_disabled":
        with adapters_disabled(model_of(state, params)) as base:
            out, w = policy_outputs(base, batch, reads=reads)
    else:
        return None, None
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(w)


def token_masks(spec, state: TrainState, params, reference_output, mask) -> dict:
    """The loss's token masks (`spec.masks`, a `losses.MaskProvider`) from the reference's
    output, `{name: [R, T]}` in row layout; {} for losses without masks."""
    if spec.masks is None:
        return {}
    heads = heads_of(state, params) if state.head_graphdef is not None else None
    return spec.masks.masks(heads, reference_output, mask)


def swap_row_blocks(x, outer: int, inner: int):
    """Rows laid out as `outer` blocks of `inner` blocks -> `inner` blocks of `outer` blocks
    (same shape). E.g. `[chosen_a; rejected_a; chosen_b; rejected_b]` with outer = 2 processes,
    inner = 2 sides -> `[chosen_a; chosen_b; rejected_a; rejected_b]`. NumPy or JAX arrays."""
    rows = x.shape[0]
    if rows % (outer * inner):
        raise ValueError(f"{rows} rows do not split into {outer} x {inner} blocks")
    shaped = x.reshape(outer, inner, rows // (outer * inner), *x.shape[1:])
    return shaped.swapaxes(0, 1).reshape(x.shape)


def to_sequences(spec, batch, values: list) -> list:
    """Per-token `[R, L]` arrays of a batch's rows -> the loss layout `[Q, L']`: packed rows
    unpacked to one row per sequence (`data.unpack`), and `spec.row_blocks` blocks of
    `[side 0; side 1]` rows reordered to `[all side 0; all side 1]`. None entries pass."""
    present = [v for v in values if v is not None]
    if not present:
        return values
    if batch.seq_row is not None:
        length = present[0].shape[1]
        values = [None if v is None else unpack(v, batch, length) for v in values]
    blocks, examples = spec.row_blocks, batch.valid.shape[0]
    rows = next(v for v in values if v is not None).shape[0]
    sides = rows // examples
    if blocks > 1 and sides > 1:
        if examples % blocks:
            raise ValueError(f"{examples} examples do not split into row_blocks={blocks}")
        values = [
            v
            if v is None or v.ndim == 0 or v.shape[0] != rows
            else swap_row_blocks(v, blocks, sides)
            for v in values
        ]
    return values


def reward_scores(state: TrainState, params, batch) -> jax.Array:
    """Task reward: r(x, y) `[R]` of a batch's rows, the value head (the state's "score" head,
    `models.reward`) on the final hidden state at each row's last real token."""
    from alignjax.models.reward import HEAD_NAME, sequence_scores

    head = getattr(heads_of(state, params), HEAD_NAME)
    return sequence_scores(model_of(state, params), head, **batch.model_inputs())


def token_stats(spec, state: TrainState, params, batch) -> TokenStats:
    """Policy (and reference) per-token log-probs / KL of a batch in one fused LM-head pass, the
    loss's token masks and the loss mask, all in the loss layout (`to_sequences`). Task reward:
    `logps` holds the `[Q]` sequence scores r(x, y) instead (`reward_scores`), no LM head."""
    if spec.task == "reward":
        scores, mask = to_sequences(spec, batch, [reward_scores(state, params, batch),
                                                  batch.loss_mask])  # fmt: skip
        return TokenStats(scores, None, None, mask, {})
    out, w = policy_outputs(model_of(state, params), batch)
    h = out.last_hidden_state
    ref_out, rw = reference_outputs(spec, state, params, batch)
    mask = batch.loss_mask
    if ref_out is None:
        logps = ops.fused_token_logps(h, w, batch.labels, mask, temperature=spec.temperature)
        ref = getattr(batch, "ref_logps", None) if spec.reference == "precomputed" else None
        if ref is not None and ref.ndim != 2:
            ref = None if batch.seq_row is not None else ref  # sequence-level: no reordering
        return TokenStats(*to_sequences(spec, batch, [logps, ref, None, mask]), {})
    stats = ops.fused_token_stats(
        h, w, batch.labels, mask, ref_hidden=ref_out.last_hidden_state, ref_unembed=rw,
        ref_logps=True, kl=spec.needs.kl, temperature=spec.temperature,
    )  # fmt: skip
    ref = jax.lax.stop_gradient(stats.ref_logps)
    masks = token_masks(spec, state, params, ref_out, mask)
    names = sorted(masks)
    logps, ref, kl, mask, *ordered = to_sequences(
        spec, batch, [stats.logps, ref, stats.kl, mask, *(masks[n] for n in names)]
    )
    return TokenStats(logps, ref, kl, mask, dict(zip(names, ordered)))


def loss_batch(spec, batch, logps, mask, ref_logps=None, kl=None, masks=None) -> Any:
    """The loss's input pytree (`PreferenceBatch` / `UnpairedBatch` / `UnlearnBatch`) from
    per-token values in the loss layout (`masks`: `token_masks`' output)."""
    if spec.task == "online":  # a batch of rollouts builds its own (`train.online_step`)
        return batch.loss_batch(spec, logps, mask, ref_logps)
    if spec.task == "sft":
        return L.PreferenceBatch(logps, logps, mask, mask, ref_logps, ref_logps)
    if spec.task == "reward":  # `logps` holds the [chosen; rejected] scores (`token_stats`)
        n = batch.valid.shape[0]
        margin = getattr(batch, "margin", None)
        return L.RewardBatch(logps[:n], logps[n:], margin, batch.valid)
    if spec.task == "unlearn":  # rows [forget; retain], E of each
        n = batch.valid.shape[0]
        kw = dict(forget_logps=logps[:n], forget_mask=mask[:n], retain_logps=logps[n:],
                  retain_mask=mask[n:])  # fmt: skip
        if ref_logps is not None:
            kw.update(ref_forget_logps=ref_logps[:n], ref_retain_logps=ref_logps[n:])
        if kl is not None:
            kw["retain_kl"] = kl[n:]
        return L.UnlearnBatch(**kw)
    if spec.task == "unpaired":
        n = batch.valid.shape[0]
        kw = dict(logps=logps[:n], mask=mask[:n], labels=batch.label)
        if ref_logps is not None:
            kw["ref_logps"] = ref_logps[:n]
        if spec.kto_kl:
            kw.update(kl_logps=logps[n:], kl_mask=mask[n:])
            if ref_logps is not None:
                kw["ref_kl_logps"] = ref_logps[n:]
        return L.UnpairedBatch(**kw)
    fields = {
        f: getattr(batch, f)
        for f in (
            "chosen_win_prob",
            "rejected_win_prob",
            "win_prob",
            "score_chosen",
            "score_rejected",
        )
        if getattr(batch, f, None) is not None
    }
    if kl is not None:
        fields["kl"] = kl
    fields.update(masks or {})
    return L.PreferenceBatch.from_stacked(logps, mask, ref_logps, **fields)


def term_counts(spec, batch) -> dict:
    """Each loss term's count for this (micro-)batch: the loss on zero log-probs (the counts
    depend on the masks only; the premise of exact accumulation)."""
    (mask,) = to_sequences(spec, batch, [batch.loss_mask])
    z = jnp.zeros(mask.shape[:1] if spec.task == "reward" else mask.shape, jnp.float32)
    ref = None if spec.reference == "none" else z
    kl = z if spec.needs.kl else None
    masks = {} if spec.masks is None else {n: z for n in spec.masks.mask_names}
    kwargs = dict(spec.loss_kwargs)
    if spec.needs.state is not None:  # the counts do not depend on the carried statistics
        kwargs = spec.needs.state.apply(spec.needs.state.init(), kwargs)
    out = spec.loss_fn(loss_batch(spec, batch, z, mask, ref, kl, masks), **kwargs)
    return {k: t.count for k, t in out.terms.items()}
