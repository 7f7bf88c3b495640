"""The train state and the jitted step: forward on `[chosen; rejected]`, fused log-probs, any
registered loss, exact gradient accumulation, the optax update, a non-finite guard.

    state = init_state(model, optimizer, wrt=nnx.Param, reference="frozen", seed=0)
    step = build_step(StepSpec(task="paired", loss="sigmoid", loss_kwargs={"beta": 0.1}), optimizer)
    state, metrics = step(state, batch)          # batch: data.Batch (or [A, ...] micro-batches)

Exact accumulation. Every loss is sum_k w_k total_k / count_k, and the counts (examples, or
completion tokens) depend on the masks only. The step first evaluates the loss on zero
log-probs for every micro-batch to get the global counts C_k (no model forward), then
accumulates the gradient of sum_k w_k total_k / C_k over the micro-batches in a `lax.scan`, so
A micro-batches of B give the gradient of one batch of A x B, to float rounding. Under a mesh the
batch arrays are global, so device reductions are exact as well.

Token-mask losses read the reference inside the step: TDPO the per-token KL; SparsePO the
reference's layer outputs, fed to mask heads trained with the policy (`init_state(heads=...)`,
one common head or independent reward / KL heads); MaPO the reference's activations.

Reference, three ways (`reference` of `init_state` / `StepSpec`): "frozen" (a copy of the
initial trainable state, no gradient), "adapters_disabled" (the policy with its adapters off:
no parameter memory), "precomputed" (the batch carries `ref_logps`, e.g. from
`reference.precompute`), or "none" (reference-free losses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from alignjax import losses as L
from alignjax import ops
from alignjax.data.batching import unpack
from alignjax.peft import adapters_disabled

__all__ = [
    "TrainState",
    "StepSpec",
    "init_state",
    "build_step",
    "model_of",
    "stack_microbatches",
    "KL_LOSSES",
]

REFERENCES = ("frozen", "adapters_disabled", "precomputed", "none")
TASKS = ("paired", "unpaired", "sft")
KL_LOSSES = ("tdpo1", "tdpo2", "sparsepo", "mapo")  # need per-token KL(ref || policy)
HIDDEN_LOSSES = ("sparsepo",)  # a learned mask head on the reference's hidden states
ACTIVATION_LOSSES = ("mapo",)  # masks from the reference's activations
MAPO_GROUPS = ("mlp", "attn", "resid")


class Heads(nnx.Module):
    """Named trainable modules trained with the policy (e.g. SparsePO's "reward" / "kl" heads)."""

    def __init__(self, heads: Mapping[str, nnx.Module]):
        for name, module in heads.items():
            setattr(self, name, module)


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue bit-identically.

    Attributes:
      graphdef: the model's NNX graph definition (static).
      params: the trainable state (`wrt` filter: all `nnx.Param`, or adapters only).
      rest: the rest of the model state (frozen base weights under PEFT, buffers).
      opt_state: the optax state of `params`.
      ref: the frozen reference's trainable state ("frozen" reference), else None.
      step: int32 number of applied updates (skipped ones included).
      rng: uint32 PRNG key data (dropout, sampling).
      position: int32 `[2]` data position (epoch, next batch), written by the loop.
      skipped: int32 number of updates skipped by the non-finite guard.
      loss_state: a stateful loss's carried statistics (BCO's running reward moments, TRL's
        `RunningMoments`), else None.
      head_graphdef: with trainable heads (SparsePO's mask heads), their graph definition;
        `params` and `rest` are then `{"policy": ..., "heads": ...}` (`model_of`, `heads_of`).
    """

    graphdef: Any = struct.field(pytree_node=False)
    params: Any
    rest: Any
    opt_state: Any
    ref: Any
    step: jax.Array
    rng: jax.Array
    position: jax.Array
    skipped: jax.Array
    loss_state: Any = None
    head_graphdef: Any = struct.field(pytree_node=False, default=None)


STATEFUL_LOSSES = ("bco",)  # losses whose statistics the state carries (`loss_state`)


def init_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    wrt=nnx.Param,
    reference: str = "frozen",
    seed: int = 0,
    loss: str | Callable | None = None,
    heads: Mapping[str, nnx.Module] | None = None,
) -> TrainState:
    """Split `model` into trainable / rest, initialise the optimizer and the reference (and,
    for `loss="bco"`, BCO's running reward moments). `heads` are further modules trained with
    the policy (all their `nnx.Param`s), e.g. `{"reward": SparseMaskHead(...)}` for SparsePO."""
    if reference not in REFERENCES:
        raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}")
    graphdef, params, rest = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"the model has no parameters matching `wrt`={wrt}")
    ref = jax.tree.map(jnp.copy, params) if reference == "frozen" else None
    head_graphdef = None
    if heads:
        head_graphdef, head_params, head_rest = nnx.split(Heads(dict(heads)), nnx.Param, ...)
        params = {"policy": params, "heads": head_params}
        rest = {"policy": rest, "heads": head_rest}
    return TrainState(
        graphdef=graphdef,
        params=params,
        rest=rest,
        opt_state=optimizer.init(params),
        ref=ref,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        position=jnp.zeros((2,), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        loss_state=L.init_reward_moments() if loss in STATEFUL_LOSSES else None,
        head_graphdef=head_graphdef,
    )


def model_of(state: TrainState, params=None) -> nnx.Module:
    """The policy with `params` (default: the state's trainable params; the policy part when
    the state has heads; a reference's params `state.ref` work too)."""
    params = state.params if params is None else params
    rest = state.rest
    if state.head_graphdef is not None:
        rest = rest["policy"]
        if isinstance(params, dict) and set(params) == {"policy", "heads"}:
            params = params["policy"]
    return nnx.merge(state.graphdef, params, rest)


def heads_of(state: TrainState, params=None) -> Heads:
    """The trainable heads with `params` (default: the state's)."""
    if state.head_graphdef is None:
        raise ValueError("the state has no heads (init_state(..., heads=...))")
    params = state.params if params is None else params
    return nnx.merge(state.head_graphdef, params["heads"], state.rest["heads"])


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one step computes.

    Attributes:
      task: "paired" (rows `[chosen; rejected]`), "unpaired" (KTO/BCO rows, with KTO's
        mismatched rows appended when `kto_kl`), or "sft" (NLL on every row's loss mask).
      loss: a registered loss name or a loss function `(batch, **kw) -> LossOutput`.
      loss_kwargs: its hyperparameters.
      reference: see the module docstring; must match the state's.
      kto_kl: unpaired batches carry `[matched; mismatched]` rows (`data.collate(kto_kl=True)`).
      independent_masks: SparsePO with two heads, "reward" (m_u) and "kl" (m_d) ("sparse-indp");
        False: one "reward" head serves both (the common mask).
      mapo_groups: MaPO's activation groups of the reference ("mlp", "attn", "resid").
      row_blocks: the batch's rows are this many consecutive blocks, each laid out like a
        whole batch (`[chosen; rejected]` of its own examples): a multi-process run's global
        batch, where each process contributes its own block (`jax.process_count()`). Per-token
        results are put back in the loss's layout (all chosen rows, then all rejected rows)
        after the model, which is row-independent.
      sync_every, sync_alpha: TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656) with the
        "frozen" reference: after every `sync_every`-th update, ref <- alpha * policy +
        (1 - alpha) * ref (TRL's `ref_model_mixup_alpha`, default 0.6; alpha = 1 is the hard
        update). 0 disables it.
    """

    task: str = "paired"
    loss: str | Callable = "sigmoid"
    loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "frozen"
    kto_kl: bool = False
    sync_every: int = 0
    sync_alpha: float = 0.6
    row_blocks: int = 1
    independent_masks: bool = False
    mapo_groups: tuple[str, ...] = MAPO_GROUPS

    def __post_init__(self):
        if not isinstance(self.row_blocks, int) or self.row_blocks < 1:
            raise ValueError(f"`row_blocks` must be a positive int, got {self.row_blocks!r}")
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {self.task!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {REFERENCES}, got {self.reference!r}")
        if self.task == "sft" and self.reference != "none":
            object.__setattr__(self, "reference", "none")
        if self.sync_every and self.reference != "frozen":
            raise ValueError("TR-DPO's reference sync (`sync_every`) needs reference='frozen'")
        if not 0.0 < self.sync_alpha <= 1.0:
            raise ValueError(f"`sync_alpha` must be in (0, 1], got {self.sync_alpha}")
        if self.needs_kl and self.reference in ("precomputed", "none"):
            raise ValueError(
                f"{self.loss!r} needs the per-token KL(ref || policy) (and the reference's hidden "
                "states or activations), so the reference must run in the step; use "
                "reference='frozen' or 'adapters_disabled'"
            )
        bad = set(self.mapo_groups) - set(MAPO_GROUPS)
        if bad or not self.mapo_groups:
            raise ValueError(f"`mapo_groups` must be a non-empty subset of {MAPO_GROUPS}")

    @property
    def loss_fn(self) -> Callable:
        if self.task == "sft":
            return L.sft
        return L.get(self.loss) if isinstance(self.loss, str) else self.loss

    @property
    def needs_kl(self) -> bool:
        return isinstance(self.loss, str) and self.loss in KL_LOSSES

    @property
    def needs_hidden(self) -> bool:
        return isinstance(self.loss, str) and self.loss in HIDDEN_LOSSES

    @property
    def needs_activations(self) -> bool:
        return isinstance(self.loss, str) and self.loss in ACTIVATION_LOSSES

    @property
    def head_names(self) -> tuple[str, ...]:
        """The heads a state must carry for this loss."""
        if not self.needs_hidden:
            return ()
        return ("reward", "kl") if self.independent_masks else ("reward",)


def _hidden_and_head(model, batch, spec: StepSpec | None = None):
    hidden = spec is not None and spec.needs_hidden
    acts = spec is not None and spec.needs_activations
    out = model(**batch.model_inputs(), output_hidden_states=hidden, output_activations=acts)
    return out, model.unembed()


def _reference_hidden(spec: StepSpec, state: TrainState, params, batch):
    """Reference model output (final hidden states, and the per-layer hidden states or
    activations a token-mask loss reads) and LM head, without gradient (None, None when the
    reference is not in the step)."""
    if spec.reference == "frozen":
        if state.ref is None:
            raise ValueError("reference='frozen' needs a state built with reference='frozen'")
        out, w = _hidden_and_head(model_of(state, state.ref), batch, spec)
    elif spec.reference == "adapters_disabled":
        with adapters_disabled(model_of(state, params)) as base:
            out, w = _hidden_and_head(base, batch, spec)
    else:
        return None, None
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(w)


def token_masks(spec: StepSpec, state: TrainState, params, ref_out, mask):
    """SparsePO's learned masks (the heads on the reference's layer outputs, embeddings
    excluded) or MaPO's activation mask, `{"reward_mask", "kl_mask"}` `[R, T]` in row layout;
    {} for other losses."""
    if spec.needs_hidden:
        heads = heads_of(state, params)
        missing = [n for n in spec.head_names if not hasattr(heads, n)]
        if missing:
            raise ValueError(f"SparsePO needs heads {spec.head_names}; the state lacks {missing}")
        hidden = jnp.stack(ref_out.hidden_states[1:])  # [L, R, T, D], no gradient
        out = {"reward_mask": heads.reward(hidden)}
        if spec.independent_masks:
            out["kl_mask"] = heads.kl(hidden)
        return out
    if spec.needs_activations:
        groups = {g: [a[g] for a in ref_out.activations] for g in spec.mapo_groups}
        return {"reward_mask": ops.mapo_activation_mask(groups, mask)}
    return {}


def _loss_batch(spec: StepSpec, batch, logps, mask, ref_logps, kl, masks=None):
    """The loss's input pytree from stacked per-token values (`masks`: `token_masks`)."""
    if spec.task == "sft":
        return L.PreferenceBatch(logps, logps, mask, mask)
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
        for f in ("chosen_win_prob", "rejected_win_prob", "win_prob")
        if getattr(batch, f) is not None
    }
    if kl is not None:
        fields["kl"] = kl
    fields.update(masks or {})
    return L.PreferenceBatch.from_stacked(logps, mask, ref_logps, **fields)


def to_sequences(spec: StepSpec, batch, values):
    """Per-token `[R, L]` arrays of a batch's rows -> the loss layout `[Q, L']`: packed rows
    unpacked to one row per sequence (`data.unpack`), and `row_blocks` blocks of
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

        def reorder(v):
            if v is None or v.ndim == 0 or v.shape[0] != rows:
                return v
            shaped = v.reshape(blocks, sides, examples // blocks, *v.shape[1:])
            return jnp.swapaxes(shaped, 0, 1).reshape(v.shape)

        values = [reorder(v) for v in values]
    return values


def _token_stats(spec: StepSpec, state: TrainState, params, batch):
    """Policy (and reference) per-token log-probs / KL of a batch, one fused LM-head pass, and
    the loss mask, all in the loss layout (`to_sequences`)."""
    model = model_of(state, params)
    out, w = _hidden_and_head(model, batch)
    h = out.last_hidden_state
    ref_out, rw = _reference_hidden(spec, state, params, batch)
    mask = batch.loss_mask
    if ref_out is None:
        logps = ops.fused_token_logps(h, w, batch.labels, mask)
        ref = getattr(batch, "ref_logps", None) if spec.reference == "precomputed" else None
        if ref is not None and ref.ndim != 2:
            ref = None if batch.seq_row is not None else ref  # sequence-level: no reordering
        return (*to_sequences(spec, batch, [logps, ref, None, mask]), {})
    stats = ops.fused_token_stats(
        h, w, batch.labels, mask, ref_hidden=ref_out.last_hidden_state, ref_unembed=rw,
        ref_logps=True, kl=spec.needs_kl,
    )  # fmt: skip
    ref = jax.lax.stop_gradient(stats.ref_logps)
    masks = token_masks(spec, state, params, ref_out, mask)
    names = sorted(masks)
    logps, ref, kl, mask, *ordered = to_sequences(
        spec, batch, [stats.logps, ref, stats.kl, mask, *(masks[n] for n in names)]
    )
    return logps, ref, kl, mask, dict(zip(names, ordered))


def _counts(spec: StepSpec, batch) -> dict:
    """Each loss term's count for this (micro-)batch: the loss on zero log-probs."""
    (mask,) = to_sequences(spec, batch, [batch.loss_mask])
    z = jnp.zeros(mask.shape, jnp.float32)
    ref = None if spec.reference == "none" else z
    kl = z if spec.needs_kl else None
    masks = {}
    if spec.needs_hidden or spec.needs_activations:
        masks["reward_mask"] = z
        if spec.independent_masks:
            masks["kl_mask"] = z
    out = spec.loss_fn(_loss_batch(spec, batch, z, mask, ref, kl, masks), **spec.loss_kwargs)
    return {k: t.count for k, t in out.terms.items()}


def build_step(
    spec: StepSpec,
    optimizer: optax.GradientTransformation,
    *,
    learning_rate: Callable[[jax.Array], jax.Array] | None = None,
    donate: bool = True,
    out_shardings: Any = None,
    axis_name: str | None = None,
) -> Callable:
    """A jitted `step(state, batch) -> (state, metrics)`.

    `batch` is a `data.Batch` of jax arrays, or one with a leading micro-batch axis `[A, ...]`
    on every array (gradient accumulation; see `stack_microbatches`). Non-finite gradients skip
    the update (parameters and optimizer state unchanged), count it in `state.skipped` and
    report `skipped = 1`. `learning_rate(step)` is only reported.

    Parallelism:
      out_shardings: under a mesh, `(state shardings, metrics sharding)` (see
        `sharding.state_shardings`), so the new state keeps the layout of the old one and the
        donated buffers are reused; inputs take the shardings they carry (`shard_state`,
        `shard_batch`).
      axis_name: the pmap path: returns `jax.pmap(step, axis_name)` over a replicated state
        (`sharding.replicate`) and a split batch (`sharding.split_for_pmap`); loss term counts,
        gradients and token counts are summed over the axis, so the update is the one of the
        whole global batch, exactly as under a mesh.
    """

    stateful = isinstance(spec.loss, str) and spec.loss in STATEFUL_LOSSES

    def micro_loss(params, state, batch, counts, loss_state):
        logps, ref_logps, kl, mask, masks = _token_stats(spec, state, params, batch)
        lb = _loss_batch(spec, batch, logps, mask, ref_logps, kl, masks)
        kwargs = dict(spec.loss_kwargs)
        if stateful:  # BCO as TRL: fold this batch's rewards in, then delta = running mean
            if loss_state is None:
                raise ValueError("loss 'bco' needs a state built with init_state(loss='bco')")
            rewards = L.bco_rewards(lb, kwargs.get("beta", 0.1))
            loss_state = L.update_reward_moments(
                loss_state, rewards, batch.valid, axis_name=axis_name
            )
            kwargs["delta"] = loss_state.mean
        out = spec.loss_fn(lb, **kwargs)
        total = sum(
            t.weight * t.total / jnp.maximum(counts[k], 1e-30) for k, t in out.terms.items()
        )
        return total, (out.metrics, loss_state)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        stacked = batch.input_ids.ndim == 3
        micro = batch if stacked else jax.tree.map(lambda x: x[None], batch)
        counts = jax.vmap(lambda b: _counts(spec, b))(micro)
        counts = {k: jnp.sum(v) for k, v in counts.items()}
        if axis_name is not None:
            counts = jax.lax.psum(counts, axis_name)

        def body(acc, b):
            grads, loss, loss_state = acc
            (value, (metrics, loss_state)), g = grad_fn(state.params, state, b, counts, loss_state)
            return (jax.tree.map(jnp.add, grads, g), loss + value, loss_state), metrics

        zero = jax.tree.map(jnp.zeros_like, state.params)
        init = (zero, jnp.zeros((), jnp.float32), state.loss_state)
        (grads, loss, loss_state), metrics = jax.lax.scan(body, init, micro)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        num_tokens = jnp.sum(micro.loss_mask).astype(jnp.float32)
        if axis_name is not None:
            grads, loss, num_tokens = jax.lax.psum((grads, loss, num_tokens), axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            params=keep_if(finite, new_params, state.params),
            opt_state=keep_if(finite, new_opt, state.opt_state),
            step=state.step + 1,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            loss_state=keep_if(finite, loss_state, state.loss_state),
        )
        if spec.sync_every:
            sync = (new_state.step % spec.sync_every) == 0
            a = spec.sync_alpha
            policy = model_params(new_state)
            mixed = jax.tree.map(lambda p, r: a * p + (1 - a) * r, policy, state.ref)
            new_state = new_state.replace(ref=keep_if(sync, mixed, state.ref))
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = (~finite).astype(jnp.float32)
        metrics["num_tokens"] = num_tokens
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if axis_name is not None:
        if out_shardings is not None:
            raise ValueError("`out_shardings` is for the mesh path, not pmap (`axis_name`)")
        fn = jax.pmap(step, axis_name=axis_name, donate_argnums=donate_argnums)
    else:
        kw = {} if out_shardings is None else {"out_shardings": out_shardings}
        fn = jax.jit(step, donate_argnums=donate_argnums, **kw)
    return fn


def model_params(state: TrainState, params=None):
    """The policy's part of the trainable params (all of them when the state has no heads)."""
    params = state.params if params is None else params
    return params["policy"] if state.head_graphdef is not None else params


def keep_if(cond, new, old):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def stack_microbatches(batches) -> Any:
    """A list of equally shaped batches -> one batch with a leading micro-batch axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
