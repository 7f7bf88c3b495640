"""The jitted training step: forward on `[chosen; rejected]`, fused log-probs, any registered
loss, exact gradient accumulation, the optax update, a non-finite guard.

    state = init_state(model, optimizer, wrt=nnx.Param, reference="frozen", seed=0)
    step = build_step(StepSpec(task="paired", loss="sigmoid", loss_kwargs={"beta": 0.1}), optimizer)
    state, metrics = step(state, batch)          # batch: data.Batch (or [A, ...] micro-batches)

What the step computes for a loss is read from the loss's registered needs
(`losses.LossNeeds`, `spec.needs`): reference log-probs, per-token KL, token masks from a
`MaskProvider` (SparsePO's heads trained with the policy, MaPO's activation masks), carried
state (BCO's running reward moments). The forward pass is `train.forward`; the state is
`train.state` (both re-exported here).

Exact accumulation. Every loss is sum_k w_k total_k / count_k, and the counts (examples, or
completion tokens) depend on the masks only. The step first evaluates the loss on zero
log-probs for every micro-batch to get the global counts C_k (no model forward), then
accumulates the gradient of sum_k w_k total_k / C_k over the micro-batches in a `lax.scan`, so
A micro-batches of B give the gradient of one batch of A x B, to float rounding. Under a mesh the
batch arrays are global, so device reductions are exact as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alignjax import losses as L
from alignjax.losses.needs import TASKS
from alignjax.losses.token import MAPO_GROUPS
from alignjax.train.forward import (
    loss_batch,
    term_counts,
    to_sequences,
    token_masks,
    token_stats,
)
from alignjax.train.state import (
    REFERENCES,
    Heads,
    TrainState,
    heads_of,
    init_state,
    keep_if,
    model_of,
    model_params,
)

__all__ = [
    "TrainState",
    "StepSpec",
    "init_state",
    "build_step",
    "model_of",
    "heads_of",
    "model_params",
    "stack_microbatches",
    "token_stats",
    "token_masks",
    "loss_batch",
    "to_sequences",
    "Heads",
    "REFERENCES",
    "TASKS",
]

DEFAULT_LOSS = {
    "paired": "sigmoid", "unpaired": "kto", "sft": "sft", "unlearn": "npo", "online": "grpo",
    "reward": "reward",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one step computes.

    Attributes:
      task: "paired" (rows `[chosen; rejected]`), "unpaired" (KTO/BCO rows, with KTO's
        mismatched rows appended when `kto_kl`), "sft" (single rows), or "unlearn" (rows
        `[forget; retain]`, laid out like a paired batch: `data.UnlearnLoader`), "online"
        (sampled completions with their rewards: `train.online_step.OnlineBatch`), or "reward"
        (paired rows scored by a value head: a reward model, `models.reward`; the state
        carries the head as its "score" head).
      loss: a registered loss name or a loss function `(batch, **kw) -> LossOutput` (its needs:
        `losses.needs_of(loss).for_kwargs(loss_kwargs)`); None: the task's default (sigmoid /
        kto / sft / npo). It must read the
        task's batch kind (`LossNeeds.tasks`).
      loss_kwargs: its hyperparameters.
      reference: see `train.state`; must match the state's. A reference-free loss on "sft"
        batches runs with "none".
      kto_kl: unpaired batches carry `[matched; mismatched]` rows (`data.collate(kto_kl=True)`).
      independent_masks: SparsePO with two heads, "reward" (m_u) and "kl" (m_d) ("sparse-indp");
        the mask provider's `independent` option.
      mapo_groups: MaPO's activation groups of the reference; the provider's `groups` option.
      mask_options: further options of the loss's mask provider (`MaskProvider.configure`).
      row_blocks: the batch's rows are this many consecutive blocks, each laid out like a
        whole batch (`[chosen; rejected]` of its own examples): a multi-process run's global
        batch, where each process contributes its own block (`jax.process_count()`). Per-token
        results are put back in the loss's layout (all chosen rows, then all rejected rows)
        after the model, which is row-independent.
      sync_every, sync_alpha: TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656) with the
        "frozen" reference: after every `sync_every`-th update, ref <- alpha * policy +
        (1 - alpha) * ref (TRL's `ref_model_mixup_alpha`, default 0.6; alpha = 1 is the hard
        update). 0 disables it.
      regularizer: `params -> scalar` added to the loss once per step (not per micro-batch or
        device), e.g. AdaLoRA's orthogonal penalty (`peft.orthogonal_penalty`) times its weight.
      temperature: log-probs (policy and reference) are those of logits / temperature: an
        on-policy method's sampling temperature (task "online", `train.online_step`).

    Derived: `needs` (the loss's `LossNeeds`, its mask provider configured) and `masks`.
    """

    task: str = "paired"
    loss: str | Callable | None = None
    loss_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "frozen"
    kto_kl: bool = False
    sync_every: int = 0
    sync_alpha: float = 0.6
    row_blocks: int = 1
    independent_masks: bool = False
    mapo_groups: tuple[str, ...] = MAPO_GROUPS
    mask_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    regularizer: Callable | None = None
    temperature: float = 1.0
    needs: L.LossNeeds = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        if not isinstance(self.row_blocks, int) or self.row_blocks < 1:
            raise ValueError(f"`row_blocks` must be a positive int, got {self.row_blocks!r}")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {self.task!r}")
        if self.loss is None:
            object.__setattr__(self, "loss", DEFAULT_LOSS[self.task])
        needs = L.needs_of(self.loss).for_kwargs(self.loss_kwargs)
        name = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "loss")
        if self.task not in needs.tasks:
            raise ValueError(f"loss {name!r} reads {' / '.join(needs.tasks)} batches, not "
                             f"task={self.task!r} (its registered LossNeeds.tasks)")  # fmt: skip
        options = dict(self.mask_options)
        if self.independent_masks:
            options["independent"] = True
        if tuple(self.mapo_groups) != MAPO_GROUPS:
            options["groups"] = tuple(self.mapo_groups)
        if options:
            if needs.masks is None:
                raise ValueError(f"mask options {sorted(options)} (independent_masks / "
                                 f"mapo_groups / mask_options) do not apply to loss {name!r}, "
                                 "which uses no token masks")  # fmt: skip
            needs = dataclasses.replace(needs, masks=needs.masks.configure(**options))
        object.__setattr__(self, "needs", needs)
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {REFERENCES}, got {self.reference!r}")
        free = not (needs.reference or needs.reference_in_step)
        if self.task in ("sft", "unlearn", "reward") and free and self.reference != "none":
            object.__setattr__(self, "reference", "none")  # no frozen copy for nothing
        if self.task == "unlearn" and self.reference == "precomputed":
            raise ValueError("task 'unlearn' builds its forget / retain rows per step and has no "
                             "precomputed reference cache; use reference='frozen' or "
                             "'adapters_disabled'")  # fmt: skip
        if needs.reference and self.reference == "none":
            raise ValueError(f"loss {name!r} needs reference log-probs; reference='none' is for "
                             "reference-free losses (use 'frozen', 'adapters_disabled' or "
                             "'precomputed')")  # fmt: skip
        if self.sync_every and self.reference != "frozen":
            raise ValueError("TR-DPO's reference sync (`sync_every`) needs reference='frozen'")
        if not 0.0 < self.sync_alpha <= 1.0:
            raise ValueError(f"`sync_alpha` must be in (0, 1], got {self.sync_alpha}")
        if needs.reference_in_step and self.reference in ("precomputed", "none"):
            raise ValueError(
                f"{name!r} needs the per-token KL(ref || policy) (and the reference's hidden "
                "states or activations), so the reference must run in the step; use "
                "reference='frozen' or 'adapters_disabled'"
            )

    @property
    def loss_fn(self) -> Callable:
        return L.get(self.loss) if isinstance(self.loss, str) else self.loss

    @property
    def masks(self) -> L.MaskProvider | None:
        """The loss's (configured) mask provider, or None."""
        return self.needs.masks

    @property
    def head_names(self) -> tuple[str, ...]:
        """The trainable heads a state must carry for this loss."""
        return tuple(getattr(self.masks, "head_names", ()))


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

    carried = spec.needs.state

    def micro_loss(params, state, batch, counts, loss_state, reg_scale):
        stats = token_stats(spec, state, params, batch)
        lb = loss_batch(spec, batch, *_loss_inputs(stats))
        kwargs = dict(spec.loss_kwargs)
        if carried is not None:  # fold this batch in first (TRL's BCO order), then apply
            if loss_state is None:
                raise ValueError(f"loss {spec.loss!r} carries state: build the state with "
                                 f"init_state(..., loss={spec.loss!r})")  # fmt: skip
            loss_state = carried.update(loss_state, lb, batch.valid, kwargs, axis_name)
            kwargs = carried.apply(loss_state, kwargs)
        out = spec.loss_fn(lb, **kwargs)
        total = sum(
            t.weight * t.total / jnp.maximum(counts[k], 1e-30) for k, t in out.terms.items()
        )
        metrics = dict(out.metrics)
        if spec.regularizer is not None:  # once per step: 1 / (micro-batches x devices) each
            reg = spec.regularizer(params)
            total = total + reg * reg_scale
            metrics["regularizer"] = reg
        return total, (metrics, loss_state)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        stacked = batch.input_ids.ndim == 3
        micro = batch if stacked else jax.tree.map(lambda x: x[None], batch)
        counts = jax.vmap(lambda b: term_counts(spec, b))(micro)
        counts = {k: jnp.sum(v) for k, v in counts.items()}
        if axis_name is not None:
            counts = jax.lax.psum(counts, axis_name)

        shards = 1 if axis_name is None else jax.lax.psum(1, axis_name)
        reg_scale = 1.0 / (micro.input_ids.shape[0] * shards)

        def body(acc, b):
            grads, loss, loss_state = acc
            (value, (metrics, loss_state)), g = grad_fn(
                state.params, state, b, counts, loss_state, reg_scale
            )
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
        # this step's completion tokens (TRL's `num_tokens` is a cumulative count of all tokens)
        metrics["completion_tokens"] = num_tokens
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


def _loss_inputs(stats):
    return stats.logps, stats.mask, stats.ref_logps, stats.kl, stats.masks


def stack_microbatches(batches) -> Any:
    """A list of equally shaped batches -> one batch with a leading micro-batch axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
