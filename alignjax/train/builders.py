"""Configs build their parts: name -> factory registries for optimizers, schedules, model
presets and PEFT methods, and the builders that read them.

A new optimizer is one entry:

    >>> import optax
    >>> from alignjax.train import builders
    >>> builders.register_optimizer(
    ...     "lion", lambda o, lr, wd, mask: optax.lion(lr, o.b1, o.b2, weight_decay=wd, mask=mask)
    ... )  # doctest: +SKIP

after which `optim.name=lion` validates in the config and trains (registrations made in a
module listed in the config's `imports` also reach `alignjax eval` / `export`). The factories:

- optimizer `(OptimConfig, learning_rate schedule, weight_decay, decay mask) -> optax
  GradientTransformation` (the decay mask is a callable params -> bools, optax's `mask=`);
- schedule `(peak learning rate, decay steps) -> optax schedule`, after the linear warm-up;
- model preset: keyword arguments of `models.LlamaConfig`;
- PEFT method: a `PeftMethod` (how to adapt the model, and optionally an optimizer wrapper, a
  loss regulariser and export arguments: AdaLoRA's rank allocation).

Parameter groups (`optim.groups`) give parts of the trainable tree their own learning rate,
weight decay, or freeze them (`optax.multi_transform` over the group labels); weight decay
skips 1-D parameters (norm scales, biases) unless `optim.decay_1d`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from alignjax import peft
from alignjax.optim import adamp, decay_mask, path_string, sgdp
from alignjax.peft.inject import METHODS

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "PRESETS",
    "PEFT_METHODS",
    "GROUP_LABELS",
    "PeftMethod",
    "register_optimizer",
    "register_schedule",
    "register_preset",
    "register_peft_method",
    "build_schedule",
    "build_optimizer",
    "group_labels",
]


def _adam(o, lr, wd, mask):
    if wd:
        raise ValueError("`optim.weight_decay` with optim.name='adam' (Adam's L2 is not "
                         "decoupled decay): use optim.name='adamw'")  # fmt: skip
    return optax.adam(lr, o.b1, o.b2, o.eps)


def _sgd(o, lr, wd, mask):
    tx = optax.sgd(lr, momentum=o.b1 or None)
    # PyTorch SGD's weight_decay: wd * p added to the gradient before momentum.
    return optax.chain(optax.add_decayed_weights(wd, mask), tx) if wd else tx


OPTIMIZERS: dict[str, Callable] = {
    "adamw": lambda o, lr, wd, mask: optax.adamw(
        lr, o.b1, o.b2, o.eps, weight_decay=wd, mask=mask
    ),  # fmt: skip
    "adam": _adam,
    "sgd": _sgd,
    "adamp": lambda o, lr, wd, mask: adamp(lr, o.b1, o.b2, o.eps, weight_decay=wd, mask=mask),
    "sgdp": lambda o, lr, wd, mask: sgdp(lr, momentum=o.b1, weight_decay=wd, mask=mask),
}
SCHEDULES: dict[str, Callable] = {
    "constant": lambda peak, steps: optax.constant_schedule(peak),
    "linear": lambda peak, steps: optax.linear_schedule(peak, 0.0, steps),
    "cosine": lambda peak, steps: optax.cosine_decay_schedule(peak, steps),
}
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "base": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    """How a PEFT method enters a run.

    Attributes:
      apply: `(model, PeftConfig, seed, layer_kwargs) -> adapted module paths` (adds the
        adapters in place; `layer_kwargs`: `peft.kwargs` less `options`).
      wrap_optimizer: `(tx, PeftConfig, steps) -> tx` (AdaLoRA: rank allocation after the
        update), or None.
      regularizer: `(PeftConfig) -> (params -> scalar)` added to the loss once per step, or None.
      export: `(PeftConfig, steps, host TrainState) -> keyword arguments of
        peft.export_adapters` (AdaLoRA: its schedule and final rank pattern), or None.
      options: the `peft.kwargs` keys this method reads itself (the rest go to the layers).
    """

    apply: Callable
    wrap_optimizer: Callable | None = None
    regularizer: Callable | None = None
    export: Callable | None = None
    options: tuple[str, ...] = ()

    def layer_kwargs(self, p) -> dict:
        return {k: v for k, v in dict(p.kwargs).items() if k not in self.options}


def _rule_method(name: str) -> Callable:
    def apply(model, p, seed: int, options: dict):
        options = dict(options)
        if float(options.pop("dropout", 0.0)):
            raise ValueError(
                "`peft.kwargs.dropout`: the training step carries no dropout RNG, so adapters "
                "train without dropout; set it to 0 (TRL's DPO / KTO turn it off too: "
                "disable_dropout)"
            )
        rule = peft.Rule(p.targets, name, rank=p.r, alpha=p.alpha, options=options)
        return peft.apply(model, [rule], rngs=nnx.Rngs(seed))

    return apply


ADALORA_SCHEDULE = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2")
ADALORA_OPTIONS = (*ADALORA_SCHEDULE, "orth_reg_weight")


def orthogonal_penalty(weight: float) -> Callable:
    """AdaLoRA's regulariser: `weight` x PEFT's orthogonal penalty of every (a, e, b) triplet."""
    weight = float(weight)
    return lambda params: weight * peft.orthogonal_penalty(params)


def adalora_schedule(p, steps: int) -> peft.AdaLoraSchedule:
    """PEFT's AdaLoraConfig schedule from `peft.r` (init_r), `peft.kwargs` and the run's steps
    (PEFT's defaults: target_r 8, tinit 0, tfinal 0, deltaT 1, beta1 = beta2 = 0.85)."""
    kw = {k: v for k, v in dict(p.kwargs).items() if k in ADALORA_SCHEDULE}
    return peft.AdaLoraSchedule(init_r=p.r, total_step=steps, **kw)


PEFT_METHODS: dict[str, PeftMethod] = {
    name: PeftMethod(apply=_rule_method(name)) for name in METHODS if name != "adalora"
}
PEFT_METHODS["adalora"] = PeftMethod(
    apply=_rule_method("adalora"),
    wrap_optimizer=lambda tx, p, steps: peft.with_rank_allocation(tx, adalora_schedule(p, steps)),
    regularizer=lambda p: orthogonal_penalty(dict(p.kwargs).get("orth_reg_weight", 0.5)),
    export=lambda p, steps, state: {
        "adalora": {
            k: v for k, v in dataclasses.asdict(adalora_schedule(p, steps)).items() if k != "init_r"
        },  # fmt: skip  (export_adapters writes init_r itself)
        "rank_pattern": peft.allocation_state(state.opt_state).allocator.rank_pattern,
    },
    options=ADALORA_OPTIONS,
)
GROUP_LABELS = ("heads", "adapters", "1d")


def _register(table: dict, kind: str, name: str, value, overwrite: bool):
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}")
    if name in table and not overwrite:
        raise ValueError(f"{kind} {name!r} is already registered; pass overwrite=True")
    table[name] = value
    return value


def register_optimizer(name: str, factory: Callable, *, overwrite: bool = False):
    """`factory(OptimConfig, schedule, weight_decay, decay_mask) -> GradientTransformation`."""
    return _register(OPTIMIZERS, "optimizer", name, factory, overwrite)


def register_schedule(name: str, factory: Callable, *, overwrite: bool = False):
    """`factory(peak_learning_rate, decay_steps) -> schedule` (after the linear warm-up)."""
    return _register(SCHEDULES, "schedule", name, factory, overwrite)


def register_preset(name: str, overwrite: bool = False, **llama_config):
    """A model size: keyword arguments of `models.LlamaConfig` (vocab_size comes from the
    tokenizer)."""
    return _register(PRESETS, "model preset", name, dict(llama_config), overwrite)


def register_peft_method(name: str, method: PeftMethod, *, overwrite: bool = False):
    return _register(PEFT_METHODS, "PEFT method", name, method, overwrite)


def build_schedule(o, steps: int, peak: float | None = None):
    """Linear warm-up over `o.warmup_steps` (at most steps - 1) to `peak` (default
    `o.learning_rate`), then the `o.schedule` decay over the remaining steps."""
    peak = o.learning_rate if peak is None else peak
    warmup = min(o.warmup_steps, max(steps - 1, 0))
    after = SCHEDULES[o.schedule](peak, max(steps - warmup, 1))
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def group_labels(groups, *, heads_key: str = "heads") -> Callable:
    """`params -> label tree`: each leaf labelled by the first group that matches it
    ("group<i>"), else "default". A group matches by `match` (a regex `re.search`-ed in the
    '/'-joined parameter path, e.g. "heads/" or "layers/[01]/") or by `label`: "heads" (the
    loss's trainable heads, paths under `heads/`), "adapters" (PEFT adapter parameters), "1d"
    (parameters with fewer than 2 dimensions)."""
    compiled = [(None if g.match is None else re.compile(g.match), g.label) for g in groups]

    def matches(path, leaf, rx, label):
        if rx is not None and not rx.search(path):
            return False
        if label == "heads":
            return path.startswith(f"{heads_key}/")
        if label == "adapters":
            return isinstance(leaf, peft.AdapterParam)
        if label == "1d":
            value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
            return len(getattr(value, "shape", ())) < 2
        return True

    def labels(params):
        def one(keypath, leaf):
            path = path_string(keypath)
            for i, (rx, label) in enumerate(compiled):
                if matches(path, leaf, rx, label):
                    return f"group{i}"
            return "default"

        is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731  (a Variable is a leaf)
        return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_variable)

    return labels


def _decay_mask(decay_1d: bool) -> Callable | None:
    if decay_1d:
        return None
    return decay_mask  # HF Trainer / TRL: no decay on biases, norm scales, 1-D parameters


def build_optimizer(cfg, *, peft_method: PeftMethod | None = None):
    """(optax transform, reported learning-rate schedule) from `cfg.optim` over `cfg.steps`
    updates: gradient clipping, then one optimizer per parameter group (frozen groups get
    `optax.set_to_zero`), wrapped by the PEFT method (AdaLoRA's rank allocation) if any."""
    o = cfg.optim
    schedule = build_schedule(o, cfg.steps)
    mask = _decay_mask(o.decay_1d)

    def one(lr: float | None, wd: float | None) -> Any:
        lr_schedule = schedule if lr is None else build_schedule(o, cfg.steps, lr)
        return OPTIMIZERS[o.name](o, lr_schedule, o.weight_decay if wd is None else wd, mask)

    if o.groups:
        transforms = {"default": one(None, None)}
        for i, g in enumerate(o.groups):
            transforms[f"group{i}"] = (
                optax.set_to_zero() if g.frozen else one(g.learning_rate, g.weight_decay)
            )
        tx = optax.multi_transform(transforms, group_labels(o.groups))
    else:
        tx = one(None, None)
    if o.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    if peft_method is not None and peft_method.wrap_optimizer is not None:
        tx = peft_method.wrap_optimizer(tx, cfg.peft, cfg.steps)
    return tx, schedule
