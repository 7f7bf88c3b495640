"""Run configuration: frozen, typed dataclasses, loaded from Python or YAML, with dotted overrides.

    cfg = load_config("run.yaml", overrides=["optim.learning_rate=1e-4", "loss.name=ipo"])

A YAML file is a nested mapping of the dataclass fields; a Python file defines `config` (a
`TrainConfig`) or a function `config()` returning one. Overrides are `dotted.path=value`,
with the value parsed as YAML (`1e-4`, `true`, `[64, 128]`, `null`). Unknown keys, wrong types
and bad values raise a ValueError that names the key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignjax.train.config_convert import from_dict, to_dict
from alignjax.train.online_config import OnlineConfig

__all__ = [
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "ParamGroup",
    "PeftConfig",
    "ReferenceConfig",
    "MeshConfig",
    "CheckpointConfig",
    "MaskConfig",
    "OnlineConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy: a local HF checkpoint directory, or a fresh random model of `preset` size."""

    path: str | None = None
    preset: str = "tiny"
    dtype: str | None = None  # compute dtype, e.g. "bfloat16"; None: the parameters' dtype
    param_dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is batched (see `alignjax.data`)."""

    train: str = "shipped:train"  # task unlearn: the forget set
    # task unlearn: the retain set (text or prompt-completion rows); each step pairs a batch of
    # `batch_size` forget rows with one of `batch_size` retain rows
    retain: str | None = None
    # "auto": the shipped held-out pairs for `shipped:train`; otherwise `eval_fraction` of the
    # training rows held out (said once in the log). None: no evaluation. Or a source.
    eval: str | None = "auto"
    eval_fraction: float = 0.05
    # task paired: the DPO-dynamics dispersion probe (`train.dynamics`), a source of held-out
    # reference samples (prompt-completion or text rows in neither set of pairs) whose log-prob
    # and entropy are logged at every evaluation; None: no probe
    probe: str | None = None
    tokenizer: str = "shipped"
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # the row kind when the columns fit several (`alignjax.data.formats.KINDS`); None: detected
    format: str | None = None
    max_length: int | None = 128
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"
    on_error: str = "raise"
    batch_size: int = 8
    eval_batch_size: int = 16
    buckets: tuple[int, ...] | None = None
    sort_window: int = 1
    packing: bool = False
    pack_length: int = 512
    pack_rows: int = 8
    share_prompt: bool = False  # with packing: each pair's prompt packed once, for both sides
    seed: int = 0
    cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """A registered loss (`alignjax.losses.available()`) or a weighted combination. `name`
    None: the task's default (paired: sigmoid, unpaired: kto, sft: sft)."""

    name: str | None = None
    # None: 0.1 for the paired and unpaired tasks; the loss's own default for task unlearn
    # (npo 0.1, simnpo 2.5)
    beta: float | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    combine: tuple[tuple[str, float], ...] = ()
    # SparsePO's learned token masks (loss "sparsepo"): the head variant ("all", "last", "mlp")
    # and one common mask or independent reward / KL masks ("sparse-indp").
    mask_head: str = "all"
    independent_masks: bool = False
    # further options of the loss's mask provider (`MaskProvider.configure`), e.g. SparsePO's
    # {"init": "scaled", "kind": "random", "last_state": "postnorm", "head_seed": 7}
    mask_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Part of the trainable parameters with its own learning rate / weight decay, or frozen.

    A parameter belongs to the first group that matches it: `match` (a regex searched in the
    '/'-joined path, e.g. "heads/" or "layers/0/") and / or `label` ("heads": the loss's
    trainable heads, e.g. SparsePO's mask heads; "adapters": PEFT parameters; "1d": vectors).
    `learning_rate` None keeps the run's; the group follows the same warm-up and decay shape."""

    match: str | None = None
    label: str | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    frozen: bool = False

    def __post_init__(self):
        import re

        from alignjax.train.builders import GROUP_LABELS

        if self.match is None and self.label is None:
            raise ValueError("a parameter group needs `match` (a regex) or `label`")
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as err:
                raise ValueError(f"`match` {self.match!r} is not a regex: {err}") from None
        if self.label is not None and self.label not in GROUP_LABELS:
            raise ValueError(f"`label` must be one of {GROUP_LABELS}, got {self.label!r}")
        if self.frozen and (self.learning_rate is not None or self.weight_decay is not None):
            raise ValueError("a frozen group takes no `learning_rate` / `weight_decay`")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer (`builders.OPTIMIZERS`), its schedule (`builders.SCHEDULES`) after a
    linear warm-up, clipping, accumulation and parameter groups. Weight decay skips biases,
    norm scales and other 1-D parameters unless `decay_1d`."""

    name: str = "adamw"
    learning_rate: float = 5e-4
    schedule: str = "cosine"  # constant | linear | cosine, after linear warm-up
    warmup_steps: int = 10
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    groups: tuple[ParamGroup, ...] = ()
    decay_1d: bool = False


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    method: str | None = None  # None or a `builders.PEFT_METHODS` name ("lora", "adalora", ...)
    r: int = 8
    alpha: float = 16.0
    targets: str = r".*(q_proj|k_proj|v_proj|o_proj)"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """`mode`: "frozen" (a separate copy of the initial policy), "adapters_disabled" (the
    policy with its adapters off; needs PEFT), "precomputed" (a persisted cache of reference
    log-probs), or "none" (reference-free losses). `sync_every` > 0 turns on TR-DPO's update
    ref <- alpha * policy + (1 - alpha) * ref (frozen mode)."""

    mode: str = "frozen"
    path: str | None = None  # a different reference checkpoint (frozen / precomputed)
    cache_dir: str | None = None
    sync_every: int = 0
    sync_alpha: float = 0.6  # TRL ref_model_mixup_alpha


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1: all remaining devices) or the pmap data-parallel path.

    `devices`: how many of the (global) devices to use, -1 for all. A multi-process run gets its
    coordinator address, process count and id from here or from the environment (see
    `alignjax.train.distributed`)."""

    devices: int = -1
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    pmap: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50
    keep: int = 3
    best_metric: str | None = None
    best_mode: str = "min"
    asynchronous: bool = True
    adapters_only: bool = False
    export_hf: bool = True


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """An importance mask over the trainable parameters (`optim.importance`): only the selected
    weights are trained. `score`: "wagle" (WAGLE's |(theta - g_retain / mu) g_forget|, task
    unlearn), "gradient" (|g_forget|, task unlearn), "magnitude" (|theta|), "random"; computed
    from the initial state over one epoch of the training batches and saved as
    `<out_dir>/mask.npz` (a resumed run loads it). `path`: load a saved mask instead
    (`importance.save_mask`). `ratio`: the trained fraction (exactly floor(N ratio) weights,
    over all parameters or per matrix). `mode`: "updates" zeroes the updates after the whole
    optax chain (masked weights bitwise unchanged, decay included); "gradients" is WAGLE's own
    behaviour (zeroed gradients, so decoupled weight decay still shrinks masked weights)."""

    score: str | None = None
    path: str | None = None
    ratio: float = 0.5
    per_matrix: bool = False
    mu: float = 1e-6  # WAGLE's Hessian parameter, as in every released config
    mode: str = "updates"
    seed: int = 0  # the "random" score


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `task`: "sft", "paired" (DPO family, SPPO), "unpaired" (KTO/BCO),
    "unlearn" (forget `data.train` while retaining `data.retain`: grad_ascent, grad_diff, npo,
    simnpo), "online" (on-policy: sample, score and train on the prompts of `data.train`
    with `online.method` grpo / rloo / reinforce_kl / online_dpo / xpo / nash_md; the `online:`
    section; or rounds of sample -> pairs -> `steps` offline steps with iterative_dpo / sppo /
    cream, `train.iterative_task`), or
    "reward" (a reward model: a value head on the Llama trained with TRL RewardTrainer's loss
    on preference pairs, `loss.kwargs.center_rewards_coefficient`, an optional `margin` column;
    `online.reward_model_scorer` loads the export as a reward function).

    `init_from`: a previous run's output directory (its `export/merged` model) or an HF model
    directory; it replaces `model.path` / `model.preset`.

    `imports`: Python modules (dotted names) or .py files imported before the config is checked,
    so the losses, optimizers, presets or PEFT methods they register can be named here (a
    relative file path is made absolute; `alignjax eval` / `export` import them again).
    Choices (task, loss, optimizer, schedule, preset, PEFT method) are checked against the
    registries when the config is built, naming the key."""

    task: str = "paired"
    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int | None = None
    eval_samples: int = 4  # held-out prompts completed (greedy) at the end, in samples.jsonl
    sample_tokens: int = 32
    plot: bool = True  # curves.png from metrics.jsonl at the end
    init_from: str | None = None  # a previous run's output (e.g. the SFT stage's export)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mask: MaskConfig = dataclasses.field(default_factory=MaskConfig)
    online: OnlineConfig = dataclasses.field(default_factory=OnlineConfig)
    imports: tuple[str, ...] = ()

    def __post_init__(self):
        imports = tuple(_absolute_if_file(x) for x in self.imports)
        object.__setattr__(self, "imports", imports)
        import_plugins(imports)
        validate(self)


def _absolute_if_file(name: str) -> str:
    return str(Path(name).absolute()) if name.endswith(".py") else name


_IMPORTED: dict[str, Any] = {}


def import_plugins(imports: Sequence[str]) -> None:
    """Import each module name or .py file once (their registrations take effect)."""
    import importlib

    for name in imports:
        if name in _IMPORTED:
            continue
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"`imports`: {name!r} does not exist")
            spec = importlib.util.spec_from_file_location(f"alignjax_import_{len(_IMPORTED)}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(name)
            except ImportError as err:
                raise ValueError(f"`imports`: cannot import {name!r}: {err}") from None
        _IMPORTED[name] = module


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"`{key}` must be one of {sorted(options)}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Every named choice of `cfg` against its registry (a ValueError names the key)."""
    from alignjax import losses
    from alignjax.losses.needs import TASKS
    from alignjax.train import builders as B

    _choice("task", cfg.task, TASKS)
    _choice("optim.name", cfg.optim.name, B.OPTIMIZERS)
    _choice("optim.schedule", cfg.optim.schedule, B.SCHEDULES)
    if cfg.model.path is None and cfg.init_from is None:
        _choice("model.preset", cfg.model.preset, B.PRESETS)
    if cfg.peft.method is not None:
        _choice("peft.method", cfg.peft.method, B.PEFT_METHODS)
    names = [n for n, _ in cfg.loss.combine] or ([cfg.loss.name] if cfg.loss.name else [])
    for i, name in enumerate(names):
        key = f"loss.combine[{i}]" if cfg.loss.combine else "loss.name"
        _choice(key, name, losses.available())
    if cfg.steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {cfg.steps}")
    if cfg.data.format is not None:
        from alignjax.data.formats import KINDS

        _choice("data.format", cfg.data.format, KINDS)
    _validate_unlearn(cfg)
    _validate_probe(cfg)
    _validate_reward(cfg)
    if cfg.data.share_prompt and (cfg.task != "paired" or not cfg.data.packing):
        raise ValueError("`data.share_prompt` packs each pair's prompt once: it needs task=paired "
                         f"and `data.packing` true, got task={cfg.task!r}, "
                         f"packing={cfg.data.packing}")  # fmt: skip
    if cfg.task == "online":
        from alignjax.train.online_config import validate_online

        validate_online(cfg)
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ValueError(f"`data.eval_fraction` must be in (0, 1), got {cfg.data.eval_fraction}")


def _validate_probe(cfg: TrainConfig) -> None:
    """`data.probe` is evaluated with a paired run's held-out pairs, every `eval_every` steps."""
    if cfg.data.probe is None:
        return
    if cfg.task != "paired":
        raise ValueError(f"`data.probe` (the DPO-dynamics dispersion probe) is for task=paired, "
                         f"not task={cfg.task!r}")  # fmt: skip
    if cfg.eval_every < 1:
        raise ValueError(f"`data.probe` is evaluated every `eval_every` steps: set eval_every "
                         f">= 1, got {cfg.eval_every}")  # fmt: skip


def _validate_reward(cfg: TrainConfig) -> None:
    """task reward: the "reward" loss on padded rows (one sequence per row)."""
    if cfg.task != "reward":
        return
    if cfg.data.packing:
        raise ValueError("task=reward reads each row's last token: set `data.packing` false")
    names = [n for n, _ in cfg.loss.combine] or [cfg.loss.name or "reward"]
    if names != ["reward"]:
        raise ValueError(f"task=reward trains the 'reward' loss (`loss.name` null or 'reward', "
                         f"no `loss.combine`), got {names}")  # fmt: skip


MASK_SCORES = ("wagle", "gradient", "magnitude", "random")
MASK_MODES = ("updates", "gradients")


def _validate_unlearn(cfg: TrainConfig) -> None:
    """task unlearn's data and the importance mask (a ValueError names the key)."""
    if cfg.task == "unlearn" and cfg.data.retain is None:
        raise ValueError("task=unlearn needs `data.retain` (the retain set; its NLL is logged "
                         "for every unlearning loss)")  # fmt: skip
    if cfg.task != "unlearn" and cfg.data.retain is not None:
        raise ValueError(f"`data.retain` is for task=unlearn, not task={cfg.task!r}")
    m = cfg.mask
    if m.score is not None:
        _choice("mask.score", m.score, MASK_SCORES)
        if m.path is not None:
            raise ValueError("give `mask.score` (compute a mask) or `mask.path` (load one), "
                             "not both")  # fmt: skip
        if m.score in ("wagle", "gradient") and cfg.task != "unlearn":
            raise ValueError(f"mask.score={m.score!r} reads forget / retain gradients: it needs "
                             "task=unlearn (use magnitude / random, or mask.path)")  # fmt: skip
    _choice("mask.mode", m.mode, MASK_MODES)
    if not 0.0 < m.ratio <= 1.0:
        raise ValueError(f"`mask.ratio` must be in (0, 1], got {m.ratio}")
    if not m.mu > 0:
        raise ValueError(f"`mask.mu` must be > 0, got {m.mu}")


# ------------------------------------------------------------------------------ loading


def apply_overrides(cfg, overrides: Sequence[str]):
    """`["optim.learning_rate=1e-4", ...]` applied to a config (values parsed as YAML)."""
    import yaml

    values = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like `dotted.key=value`")
        key, raw = item.split("=", 1)
        node, parts = values, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override `{key}`: `{'.'.join(parts[: i + 1])}` is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"override `{key}`: unknown key; valid keys here: {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(type(cfg), values)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a .yaml/.yml or .py file (None: the defaults), then `overrides`."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{path}: the top level must be a mapping of config sections")
            cfg = from_dict(TrainConfig, loaded)
        elif path.suffix == ".py":
            spec = importlib.util.spec_from_file_location("alignjax_user_config", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            found = getattr(module, "config", None)
            cfg = found() if callable(found) else found
            if not isinstance(cfg, TrainConfig):
                raise ValueError(f"{path} must define `config`, a TrainConfig (or a function "
                                 f"returning one); got {type(cfg).__name__}")  # fmt: skip
        else:
            raise ValueError(f"config file {str(path)!r}: expected .yaml, .yml or .py")
    return apply_overrides(cfg, overrides) if overrides else cfg
