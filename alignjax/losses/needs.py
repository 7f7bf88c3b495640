"""What a loss needs from the training step, declared where the loss is registered.

A loss is a pure function of a batch of log-probs. To train it, the step must know what to put
in that batch: which batch kind the loss reads, whether it needs reference log-probs, the
per-token KL(ref || policy), token masks computed from the reference's hidden states or
activations (and, for learned masks, trainable heads), or statistics carried from step to step.
`LossNeeds` is that record; `losses.register(name, fn, needs=...)` stores it and
`losses.needs_of(name_or_fn)` reads it back. The train step and evaluation ask it and never
switch on loss names, so a loss registered outside the package trains through `alignjax train`:

    >>> from alignjax import losses
    >>> def kl_reg(batch, *, beta=0.1, weight=0.05):  # DPO plus a token-level KL penalty
    ...     ...
    >>> losses.register("kl_reg", kl_reg, needs=losses.LossNeeds(kl=True))  # doctest: +SKIP

Token masks come from a `MaskProvider` (SparsePO's learned heads in `sparse_mask.py`, MaPO's
activation masks in `token.py`); carried state from a `CarriedState` (BCO's running reward
moments in `unpaired.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["TASKS", "LossNeeds", "MaskProvider", "CarriedState", "merge_needs"]

TASKS = ("paired", "unpaired", "sft", "unlearn", "online", "reward")


@runtime_checkable
class MaskProvider(Protocol):
    """Token weights for a loss, computed from the reference model inside the step.

    Attributes:
      reads: what of the reference it reads: "hidden_states" (every layer's output) or
        "activations" (MaPO's per-layer MLP / attention / residual activations).
      mask_names: the batch fields it fills, e.g. ("reward_mask",) or ("reward_mask",
        "kl_mask"); `PreferenceBatch` carries each as `chosen_<name>` / `rejected_<name>`.
    """

    reads: str
    mask_names: tuple[str, ...]

    def configure(self, **options) -> MaskProvider:
        """A copy with `options` (from the config) set; unknown options raise ValueError."""

    def heads(self, config, *, seed: int) -> dict:
        """Trainable modules trained with the policy (name -> nnx.Module; {} for fixed masks).
        `config` is the model's config (num_hidden_layers, hidden_size)."""

    def masks(self, heads, reference_output, loss_mask) -> dict:
        """name -> `[R, T]` weights in row layout, from the reference's output (a
        `models.ModelOutput` without gradient) and the heads (an object with one attribute per
        head name, or None)."""


@dataclasses.dataclass(frozen=True)
class CarriedState:
    """Statistics a loss carries across steps (in `TrainState.loss_state`).

    Attributes:
      init: `() -> state`, the state before the first step.
      update: `(state, loss_batch, valid, kwargs, axis_name) -> state`, folds one (micro-)batch
        in before the loss is evaluated (`valid`: the real examples; `axis_name`: psum over
        devices under pmap).
      apply: `(state, kwargs) -> kwargs`, the loss's keyword arguments given the state (training
        after `update`, and evaluation with the state training reached).
    """

    init: Callable[[], Any]
    update: Callable[..., Any]
    apply: Callable[[Any, Mapping[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class LossNeeds:
    """What the step must provide to a loss.

    Attributes:
      tasks: batch kinds the loss reads: "paired" (`PreferenceBatch` of `[chosen; rejected]`
        rows), "unpaired" (`UnpairedBatch`, KTO / BCO), "sft" (single rows, as a
        `PreferenceBatch` with chosen = rejected), "unlearn" (`UnlearnBatch` of forget and
        retain rows), "online" (`ScoredRolloutBatch` of sampled completions, `task: online`),
        "reward" (`RewardBatch` of scalar scores r(x, y) of `[chosen; rejected]` rows: the step
        runs the reward model's value head instead of the LM head, `task: reward`).
      reference: needs reference log-probs (False: reference-free, e.g. SimPO / ORPO).
      kl: needs the per-token KL(ref || policy) (`chosen_kl` / `rejected_kl`), so the reference
        runs in the step (not precomputed).
      masks: a `MaskProvider` for token-weight masks (implies the reference runs in the step).
      state: a `CarriedState` (e.g. BCO's running reward moments).
      depends: `(loss kwargs) -> LossNeeds` when what the loss needs depends on its
        hyperparameters (e.g. NPO's `retain="kl"` term reads the per-token KL); the step asks
        `for_kwargs`.
    """

    tasks: tuple[str, ...] = ("paired",)
    reference: bool = True
    kl: bool = False
    masks: MaskProvider | None = None
    state: CarriedState | None = None
    depends: Callable[[Mapping[str, Any]], LossNeeds] | None = None

    def for_kwargs(self, kwargs: Mapping[str, Any]) -> LossNeeds:
        """The needs of the loss called with `kwargs` (itself unless `depends` is set)."""
        if self.depends is None:
            return self
        out = self.depends(dict(kwargs))
        if not isinstance(out, LossNeeds):
            raise TypeError(f"`depends` must return a LossNeeds, got {type(out).__name__}")
        return out

    def __post_init__(self):
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        bad = [t for t in tasks if t not in TASKS]
        if not tasks or bad:
            raise ValueError(f"`tasks` must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        object.__setattr__(self, "tasks", tasks)
        if self.masks is not None and not isinstance(self.masks, MaskProvider):
            raise TypeError(f"`masks` must be a MaskProvider, got {type(self.masks).__name__}")
        if self.state is not None and not isinstance(self.state, CarriedState):
            raise TypeError(f"`state` must be a CarriedState, got {type(self.state).__name__}")

    @property
    def reference_in_step(self) -> bool:
        """The reference must run inside the step (per-token KL or masks from its layers)."""
        return self.kl or self.masks is not None


def merge_needs(parts: list[LossNeeds]) -> LossNeeds:
    """The needs of a weighted combination: the batch kinds all parts read, and the union of
    the rest (at most one mask provider and one carried state)."""
    tasks = tuple(t for t in TASKS if all(t in p.tasks for p in parts))
    if not tasks:
        raise ValueError(
            f"the combined losses read no common batch kind: {[p.tasks for p in parts]}"
        )
    masks = {id(p.masks): p.masks for p in parts if p.masks is not None}
    states = {id(p.state): p.state for p in parts if p.state is not None}
    if len(masks) > 1 or len(states) > 1:
        raise ValueError("a combination may hold at most one mask provider and one carried state")
    return LossNeeds(
        tasks=tasks,
        reference=any(p.reference for p in parts),
        kl=any(p.kl for p in parts),
        masks=next(iter(masks.values()), None),
        state=next(iter(states.values()), None),
    )
