"""TRL recipes, unchanged: a TRL config file and `trl`-style flags mapped onto a `TrainConfig`.

    alignjax dpo --config recipe.yaml                       # TRL's DPOConfig field names
    alignjax dpo --model_name_or_path ckpt/ --dataset_name data/ --beta 0.1 \\
                 --loss_type sigmoid ipo --loss_weights 0.8 0.2
    cfg, mapping = from_trl("dpo", "recipe.yaml", flags, overrides=["mesh.data=4"])

A recipe is what `trl dpo --config recipe.yaml` reads: one flat YAML / JSON mapping of the
fields of TRL's `ScriptArguments`, `ModelConfig`, `DatasetMixtureConfig` and the trainer's
config (`DPOConfig`, `SFTConfig`, `KTOConfig`; `RewardConfig`, `GRPOConfig`, `RLOOConfig` and
`OnlineDPOConfig` for `alignjax reward|grpo|rloo|online-dpo`, whose own rules are in
`trl_online_recipe`; an `env:` mapping sets environment variables, as TRL does), with
command-line flags overriding the file. Every field TRL 1.16 has is known
(`trl_fields.json`, generated from TRL by `tests/reference/generate_trl_configs.py`), so:

- a misspelt field is an error naming it and the closest valid name;
- a field is **mapped** onto alignjax's keys (`RecipeMapping.table()` lists each field the
  recipe sets or defaults and the alignjax keys it became), or it has **no alignjax
  meaning** (logging back-ends, hubs, launchers, vLLM, kernels, dataloader workers:
  `NO_MEANING`) and gets a one-line warning naming it, or alignjax cannot
  honour it: then a value other than TRL's default is an error naming the field, never a
  silent drop;
- where the recipe is silent, **TRL's default** is used, not alignjax's (DPO's learning rate
  1e-6, linear decay, 3 epochs, seed 42, `bf16` and `gradient_checkpointing` on, ...); the
  mapping printout marks those values `(TRL default)`.

Dotted alignjax overrides (`model.preset=tiny`, `mesh.data=4`) apply last, for what TRL has no
field for. Semantics that follow TRL's trainers rather than their field names:

- batch: `data.batch_size` = `per_device_train_batch_size` x data-parallel devices x
  `gradient_accumulation_steps` (alignjax's batch is the whole accumulated global batch);
- steps: `max_steps`, or transformers' count for `num_train_epochs`:
  ceil(epochs x max(1, ceil(ceil(rows / per-step batch) / accumulation))) over the training
  split's rows; fractional `logging_steps` / `eval_steps` / `save_steps` are ratios of it;
- the evaluation split is `dataset_test_split` of `dataset_name` when `eval_strategy` is not
  "no" (as `trl dpo` does), else there is none;
- `use_peft` with DPO / KTO and no reference checkpoint: the reference is the policy with its
  adapters off (TRL's `disable_adapter`); `disable_dropout` (DPO / KTO default) also turns the
  adapters' dropout off, as TRL's `disable_dropout_in_model` runs after `get_peft_model`;
  `lora_target_modules` unset is PEFT's default for Llama (q_proj, v_proj).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alignjax.train import config as cfg_lib
from alignjax.train import trl_online_recipe as _online

__all__ = [
    "TRAINERS",
    "NO_MEANING",
    "RecipeMapping",
    "trl_fields",
    "parse_flags",
    "read_recipe",
    "from_trl",
]

log = logging.getLogger(__name__)

FIELDS_FILE = Path(__file__).with_name("trl_fields.json")
TRAINERS = {"dpo": "paired", "sft": "sft", "kto": "unpaired", **_online.TASKS}
LEGACY = {  # TRL <= 0.28 fields that recipes still carry
    "rpo_alpha": "dpo",
    "max_prompt_length": "dpo",
    "max_completion_length": "dpo",
    "warmup_ratio": "all",
}

# Fields with no alignjax meaning: a warning names them (whatever their value).
NO_MEANING = frozenset(
    """
    report_to logging_dir logging_first_step logging_nan_inf_filter logging_strategy_epoch
    run_name project trackio_space_id trackio_bucket_id push_to_hub hub_model_id hub_strategy
    hub_token hub_private_repo hub_always_push hub_revision push_to_hub_model_id
    push_to_hub_organization push_to_hub_token deepspeed fsdp fsdp_config fsdp_min_num_params
    fsdp_transformer_layer_cls_to_wrap accelerator_config parallelism_config ddp_backend
    ddp_timeout ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers
    dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers
    dataloader_prefetch_factor dataloader_drop_last_eval dataset_num_proc dataset_streaming
    use_vllm vllm_mode vllm_model_impl vllm_enable_sleep_mode vllm_server_base_url
    vllm_server_host vllm_server_port vllm_server_timeout vllm_group_port
    vllm_gpu_memory_utilization vllm_tensor_parallel_size vllm_max_model_length
    use_liger_kernel liger_kernel_config torch_compile torch_compile_backend torch_compile_mode
    tf32 use_cpu local_rank n_gpu disable_tqdm skip_memory_metrics include_num_input_tokens_seen
    include_tokens_per_second include_for_metrics torch_empty_cache_steps activation_offloading
    padding_free pad_to_multiple_of trust_remote_code attn_implementation model_revision
    precompute_ref_batch_size ignore_bias_buffers remove_unused_columns label_names
    eval_accumulation_steps eval_delay eval_do_concat_batches eval_on_start batch_eval_metrics
    prediction_loss_only save_safetensors save_on_each_node save_only_model
    restore_callback_states_from_checkpoint resume_from_checkpoint overwrite_output_dir
    do_train do_eval do_predict log_level log_level_replica log_on_each_node
    average_tokens_across_devices full_determinism jit_mode_eval use_legacy_prediction_loop
    group_by_length length_column_name neftune_noise_alpha optim_target_modules
    dataloader_drop_last ray_scope gradient_checkpointing_kwargs auto_find_batch_size
    debug past_index disable_dropout_in_ref shuffle_dataset router_aux_loss_coef use_logits_to_keep
    """.split()
)


@functools.cache
def trl_fields() -> dict:
    """TRL 1.16's config classes: {key: {"class", "fields": {name: {"default", "type"}}}}."""
    return json.loads(FIELDS_FILE.read_text())


def _fields_of(command: str) -> dict[str, dict]:
    classes = trl_fields()["classes"]
    out = {}
    for key in (_online.SCRIPT_CLASSES.get(command, "script"), "model", "datasets", command):
        out.update(classes[key]["fields"])
    return out


def _is_list_field(meta: Mapping) -> bool:
    return "list" in meta.get("type", "")


_OVERRIDE = re.compile(r"^([A-Za-z_]\w*)(\.[\w\[\]]+)*=")


def is_override(token: str) -> bool:
    """`key=value` or `section.key=value` naming a TrainConfig field: an alignjax override,
    not a TRL flag or flag value."""
    m = _OVERRIDE.match(token)
    return bool(m) and m.group(1) in {f.name for f in dataclasses.fields(cfg_lib.TrainConfig)}


def parse_flags(flags: Sequence[str], command: str) -> dict[str, Any]:
    """`--name value [value ...]`, `--name=value` and bare `--flag` (true) as a mapping; values
    are parsed as YAML scalars ("1e-6", "true", "null"); fields typed as lists take every value
    up to the next flag."""
    import yaml

    known = _fields_of(command)
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        item = flags[i]
        if not item.startswith("--"):
            raise ValueError(f"expected a --flag, got {item!r} (dotted alignjax overrides go "
                             "after the flags, as key=value)")  # fmt: skip
        name, eq, raw = item[2:].partition("=")
        name = name.replace("-", "_")
        values = [raw] if eq else []
        i += 1
        while not eq and i < len(flags) and not flags[i].startswith("--"):
            if is_override(flags[i]):
                break  # an alignjax override
            values.append(flags[i])
            i += 1
        parsed = [yaml.safe_load(v) for v in values]
        if not parsed:
            out[name] = True
        elif len(parsed) == 1 and not _is_list_field(known.get(name, {})):
            out[name] = parsed[0]
        else:
            out[name] = parsed
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A TRL recipe file (YAML or JSON): a flat mapping; `env:` sets environment variables."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TRL recipe {str(path)!r} does not exist")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    values = values or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: a TRL recipe is one flat mapping of field names")
    values = dict(values)
    env = values.pop("env", {}) or {}
    if not isinstance(env, Mapping):
        raise ValueError(f"{path}: `env` must be a mapping of environment variables")
    for k, v in env.items():
        os.environ[str(k)] = str(v)
    return values


@dataclasses.dataclass
class RecipeMapping:
    """What a recipe became: `rows` of (TRL field, its value, "given" / "TRL default",
    alignjax keys it set), `warnings`, and the alignjax config."""

    command: str
    config: cfg_lib.TrainConfig
    rows: list[tuple[str, Any, str, str]]
    warnings: list[str]

    def table(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [10])
        lines = [f"TRL `{self.command}` recipe -> alignjax config:"]
        for name, value, origin, target in self.rows:
            tag = "" if origin == "given" else f"  ({origin})"
            lines.append(f"  {name:<{width}} = {value!r:<24} -> {target}{tag}")
        return "\n".join(lines)

    def __str__(self) -> str:
        import yaml

        body = yaml.safe_dump(cfg_lib.to_dict(self.config), sort_keys=False)
        return f"{self.table()}\nalignjax config:\n{body}"


class _Builder:
    """Accumulates alignjax keys (a nested dict) and the mapping rows."""

    def __init__(self, command: str, given: Mapping, defaults: Mapping):
        self.command, self.given, self.defaults = command, dict(given), defaults
        self.values: dict[str, Any] = {}
        self.rows: list[tuple[str, Any, str, str]] = []
        self.warnings: list[str] = []
        self.used: set[str] = set()

    def get(self, name: str):
        self.used.add(name)
        if name in self.given:
            return self.given[name]
        meta = self.defaults.get(name)
        return None if meta is None else meta["default"]

    def origin(self, name: str) -> str:
        return "given" if name in self.given else "TRL default"

    def set(self, key: str, value) -> None:
        node = self.values
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def row(self, name: str, target: str) -> None:
        self.rows.append((name, self.get(name), self.origin(name), target))

    def put(self, name: str, key: str, value=None, *, convert=None) -> None:
        """alignjax `key` = TRL field `name` (or `value`), with a mapping row."""
        v = self.get(name) if value is None else value
        v = convert(v) if convert is not None else v
        self.set(key, v)
        self.row(name, f"{key} = {v!r}")

    def inert(self, name: str, why: str) -> None:
        """A field TRL itself does not use in this recipe: a warning if it was given."""
        self.used.add(name)
        if name in self.given:
            self.warnings.append(f"TRL field `{name}` = {self.given[name]!r} is not used: {why}")

    def refuse_unless_default(self, name: str, why: str) -> None:
        """A field alignjax cannot honour: fine at TRL's default, an error otherwise."""
        self.used.add(name)
        if name not in self.given:
            return
        default = self.defaults.get(name, {}).get("default")
        if self.given[name] != default and not (self.given[name] is None and default is None):
            raise ValueError(f"TRL field `{name}` = {self.given[name]!r}: {why} (TRL's default "
                             f"{default!r} is the only value alignjax can honour)")  # fmt: skip
        self.rows.append((name, self.given[name], "given", "(TRL's default; nothing to do)"))


def _coerce(name: str, value, annotation: str):
    """`value` checked against TRL's annotation of field `name` (a YAML "1e-6" string is a
    float, as TRL's argument parser reads it); a mismatch is an error naming the field."""
    import re

    parts = {p.strip() for p in re.split(r"\|(?![^\[]*\])", annotation)}
    parts = {re.sub(r"^<class '(\w+)'>$", r"\1", p) for p in parts}
    if any(p.startswith("typing.Union[") for p in parts):
        parts = {"str", "None", "bool"}
    if value is None and parts & {"None", "NoneType"}:
        return value
    if isinstance(value, bool):
        if "bool" in parts:
            return value
    elif isinstance(value, int) and parts & {"int", "float"}:
        return value if "int" in parts else float(value)
    elif isinstance(value, float) and "float" in parts:
        return value
    elif isinstance(value, (str, int, float)) and "list[float]" in parts:
        return _floats(name, [value], annotation)
    elif isinstance(value, str):
        if "float" in parts:
            try:
                return float(value)
            except ValueError:
                pass
        if "int" in parts:
            try:
                return int(value)
            except ValueError:
                pass
        if parts - {"None", "NoneType", "bool", "int", "float"} and not (
            parts <= {"None", "NoneType", "bool", "int", "float", "dict", "dict[str, bool]"}
        ):
            return value  # str, enums (IntervalStrategy | str), list[str] (PEFT takes a str)
    elif isinstance(value, list) and any(
        p.startswith(("list", "tuple")) or "list[" in p for p in parts
    ):
        if parts & {"list[float]", "tuple[float, float]"}:  # RLOO's reward_clip_range: a pair
            if "tuple[float, float]" in parts and len(value) != 2:
                _fail(name, value, annotation)
            return _floats(name, value, annotation)
        return value
    elif isinstance(value, Mapping) and any(p.startswith("dict") for p in parts):
        return value
    if not any(p in ("bool", "int", "float", "str", "None", "NoneType") or p.startswith(
        ("list", "dict")) or "Strategy" in p or "Names" in p or "Type" in p for p in parts
    ):  # fmt: skip
        return value  # a type the recipe cannot spell anyway (e.g. ParallelismConfig)
    _fail(name, value, annotation)


def _floats(name: str, values: list, annotation: str) -> list[float]:
    if any(isinstance(v, bool) for v in values):
        _fail(name, values, annotation)
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        _fail(name, values, annotation)


def _fail(name: str, value, annotation: str):
    raise ValueError(f"TRL field `{name}` = {value!r}: expected {annotation}")


def _check_names(command: str, given: Mapping) -> None:
    fields = _fields_of(command)
    known = set(fields) | set(LEGACY)
    classes = trl_fields()["classes"]
    for name in given:
        if name in known:
            continue
        elsewhere = [c["class"] for k, c in classes.items() if name in c["fields"]]
        if elsewhere and name in NO_MEANING:
            continue  # warned about later
        if elsewhere:
            raise ValueError(f"TRL field `{name}` belongs to {', '.join(elsewhere)}, not to "
                             f"{classes[command]['class']} (`alignjax {command}`)")  # fmt: skip
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        hint = "; did you mean " + " or ".join(f"`{c}`" for c in close) + "?" if close else ""
        raise ValueError(f"unknown TRL field `{name}` for `{command}` (TRL 1.16 "
                         f"{trl_fields()['classes'][command]['class']}, ModelConfig, "
                         f"ScriptArguments){hint}")  # fmt: skip


def _steps_per_epoch(b: _Builder, rows: int, per_step: int, accum: int) -> int:
    batches = math.ceil(rows / per_step)
    return max(batches // accum + int(batches % accum > 0), 1)


def _interval(b: _Builder, name: str, steps: int) -> int:
    v = b.get(name)
    if v is None:
        return 0
    v = float(v)
    return max(1, math.ceil(steps * v)) if v < 1 else int(v)


def _dataset_rows(source: str, split: str, cache_dir) -> int:
    from alignjax import data as D

    return len(D.load_preference_dataset(source, split=split, cache_dir=cache_dir))


def _data_parallel_devices(overrides: Sequence[str]) -> int:
    """Devices that each take their own slice of a batch under the run's mesh (the `mesh.*`
    overrides; default all devices): all of them but tensor-parallel groups."""
    import jax

    mesh_overrides = [o for o in overrides if o.startswith("mesh.")]
    mesh = cfg_lib.apply_overrides(cfg_lib.TrainConfig(), mesh_overrides).mesh  # fmt: skip
    n = mesh.devices if mesh.devices > 0 else jax.device_count()
    if mesh.pmap:
        return n
    return max(1, n // max(1, mesh.tensor))


def _map_common(
    b: _Builder,
    task: str,
    devices: int,
    *,
    rows_per_example: int = 1,
    epoch_steps: Callable | None = None,
    unit: str = "",
) -> None:
    """The fields every TRL trainer shares. A batch row counts `rows_per_example` examples
    (Online DPO: a prompt is 2 completions); `epoch_steps(rows, per_step, accum)` replaces
    transformers' optimizer steps per epoch (GRPO's RepeatSampler)."""
    b.set("task", task)
    # ---- model and tokenizer
    path = b.get("model_name_or_path")
    if path is not None:
        b.put("model_name_or_path", "model.path")
        b.set("data.tokenizer", "model")
    dtype = b.get("dtype")
    if dtype not in (None, "auto"):
        b.put("dtype", "model.param_dtype")
    else:
        b.row("dtype", "model.param_dtype = 'float32' (the checkpoint is cast on load)")
    fp16, bf16 = bool(b.get("fp16")), b.get("bf16")
    bf16 = (not fp16) if bf16 is None else bool(bf16)  # TRL's _BaseConfig.__post_init__
    if fp16 and bf16:
        raise ValueError("TRL fields `bf16` and `fp16` are both true; choose one")
    compute = "bfloat16" if bf16 else "float16" if fp16 else None
    b.set("model.dtype", compute)
    how = "float32 compute" if compute is None else "mixed precision: float32 parameters"
    b.row("bf16", f"model.dtype = {compute!r} ({how})")
    if "fp16" in b.given:
        b.row("fp16", f"model.dtype = {compute!r}")
    b.put("gradient_checkpointing", "model.remat", convert=bool)
    for name in ("load_in_8bit", "load_in_4bit"):
        b.refuse_unless_default(name, "alignjax does not quantise the policy")
    for name in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"):
        b.inert(name, "no 4-bit loading (as in TRL without load_in_4bit)")
    b.refuse_unless_default("model_init_kwargs", "give the dtype with `dtype` / `bf16`")
    b.refuse_unless_default("pad_token", "alignjax uses the tokenizer's own pad token")
    b.refuse_unless_default("eos_token", "alignjax uses the tokenizer's own EOS token")
    b.refuse_unless_default("chat_template_path", "alignjax uses the tokenizer's chat template")
    # ---- data
    name = b.get("dataset_name")
    b.refuse_unless_default("dataset_config", "local datasets have no named configs")
    b.refuse_unless_default("datasets", "give one local dataset with `dataset_name`")
    b.inert("streaming", "alignjax reads local datasets whole (memory-mapped Arrow)")
    train_split = b.get("dataset_train_split")
    test_split = b.get("dataset_test_split")
    strategy = b.get("eval_strategy")
    if name is None:
        b.set("data.train", "shipped:train" if task != "sft" else "shipped:sft")
        b.rows.append(("dataset_name", None, "TRL default",
                       "data.train = the shipped reviews (no dataset_name)"))  # fmt: skip
    else:
        b.used.add("dataset_name")
        b.set("data.train", f"{name}::{train_split}")
        b.rows.append(("dataset_name", name, b.origin("dataset_name"),
                       f"data.train = {name + '::' + train_split!r}"))  # fmt: skip
        b.row("dataset_train_split", "data.train (its split)")
    if strategy not in ("no", "steps", "epoch"):
        raise ValueError(f"TRL field `eval_strategy` must be 'no', 'steps' or 'epoch', got "
                         f"{strategy!r}")  # fmt: skip
    if strategy == "no":
        b.set("data.eval", None)
        b.row("eval_strategy", "data.eval = None")
        b.inert("dataset_test_split", "eval_strategy is 'no' (as in `trl dpo`)")
    else:
        source = f"{name}::{test_split}" if name is not None else "shipped:test"
        b.set("data.eval", source)
        b.row("eval_strategy", f"data.eval = {source!r}")
        b.row("dataset_test_split", "data.eval (its split)")
    if task != "online":  # prompt-only rows (trl_online_recipe)
        b.put("max_length", "data.max_length")
    if "truncation_mode" in b.defaults or "truncation_mode" in b.given:
        b.put("truncation_mode", "data.truncation_mode")
    # ---- optimizer and schedule
    optim = str(b.get("optim"))
    if optim.startswith("adamw"):
        b.put("optim", "optim.name", "adamw")
    elif optim in ("sgd", "adam"):
        b.put("optim", "optim.name", optim)
    else:
        raise ValueError(f"TRL field `optim` = {optim!r}: alignjax has adamw (any adamw_* "
                         "implementation), sgd and adam (or give optim.name=adamp etc. as an "
                         "alignjax override)")  # fmt: skip
    b.put("learning_rate", "optim.learning_rate", convert=float)
    sched = b.get("lr_scheduler_type")
    if sched in ("linear", "cosine"):
        b.put("lr_scheduler_type", "optim.schedule")
    elif sched in ("constant", "constant_with_warmup"):
        b.put("lr_scheduler_type", "optim.schedule", "constant")
    else:
        raise ValueError(f"TRL field `lr_scheduler_type` = {sched!r}: alignjax has linear, "
                         "cosine, constant and constant_with_warmup")  # fmt: skip
    b.refuse_unless_default("lr_scheduler_kwargs", "alignjax's schedules take no extra arguments")
    b.put("weight_decay", "optim.weight_decay", convert=float)
    if optim == "sgd":  # transformers' "sgd": torch.optim.SGD without momentum
        b.set("optim.b1", 0.0)
        b.rows.append(("optim", optim, b.origin("optim"), "optim.b1 = 0.0 (no momentum)"))
        for adam in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            b.inert(adam, "optim is sgd")
    else:
        b.put("adam_beta1", "optim.b1", convert=float)
        b.put("adam_beta2", "optim.b2", convert=float)
        b.put("adam_epsilon", "optim.eps", convert=float)
    clip = b.get("max_grad_norm")
    b.put("max_grad_norm", "optim.clip_norm", None if not clip else float(clip))
    accum = int(b.get("gradient_accumulation_steps"))
    b.put("gradient_accumulation_steps", "optim.grad_accum", accum)
    # ---- batch and steps
    per_device = int(b.get("per_device_train_batch_size"))
    batch = per_device * devices * accum * rows_per_example
    b.set("data.batch_size", batch)
    how = f"{per_device} x {devices} devices x {accum} accumulation"
    how += f" x {rows_per_example}" * (rows_per_example > 1) + f"; {unit}" * bool(unit)
    b.row("per_device_train_batch_size", f"data.batch_size = {batch} ({how})")
    eval_batch = int(b.get("per_device_eval_batch_size")) * devices
    b.put("per_device_eval_batch_size", "data.eval_batch_size", eval_batch)
    max_steps = int(b.get("max_steps"))
    epochs = float(b.get("num_train_epochs"))
    per_epoch = None
    if max_steps > 0:
        steps = max_steps
        b.row("max_steps", f"steps = {steps}")
        b.inert("num_train_epochs", "max_steps is set (transformers' rule)")
    else:
        if name is None:
            rows = _dataset_rows_shipped(task)
        else:
            rows = _dataset_rows(name, train_split, None)
        count = epoch_steps or functools.partial(_steps_per_epoch, b)
        per_epoch = count(rows, per_device * devices, accum)
        steps = math.ceil(epochs * per_epoch)
        b.row("num_train_epochs", f"steps = {steps} ({epochs:g} epochs x {per_epoch} steps of "
                                  f"{rows} rows)")  # fmt: skip
    b.set("steps", steps)
    # ---- warm-up (transformers 5: warmup_steps < 1 is a ratio; warmup_ratio is TRL <= 0.28)
    warm = float(b.get("warmup_steps") or 0)
    if "warmup_ratio" in b.given:
        if "warmup_steps" in b.given and warm:
            raise ValueError("give `warmup_steps` or the older `warmup_ratio`, not both")
        warm = float(b.given["warmup_ratio"])
        b.used.add("warmup_ratio")
        if not 0 <= warm < 1:
            raise ValueError(f"TRL field `warmup_ratio` must be in [0, 1), got {warm}")
    warmup = int(warm) if warm >= 1 else math.ceil(steps * warm)
    if sched == "constant":
        warmup = 0  # transformers' "constant" ignores warm-up
    b.set("optim.warmup_steps", warmup)
    b.rows.append(("warmup_ratio" if "warmup_ratio" in b.given else "warmup_steps", warm,
                   "given" if {"warmup_steps", "warmup_ratio"} & set(b.given) else "TRL default",
                   f"optim.warmup_steps = {warmup}"))  # fmt: skip
    # ---- logging, evaluation, checkpoints
    seed = int(b.get("seed"))
    b.put("seed", "seed", seed)
    data_seed = b.get("data_seed")
    b.set("data.seed", seed if data_seed is None else int(data_seed))
    b.row("data_seed", f"data.seed = {seed if data_seed is None else int(data_seed)}")
    out = b.get("output_dir") or "trainer_output"
    b.set("out_dir", out)
    b.row("output_dir", f"out_dir = {out!r}")

    def every(name: str, strategy_name: str) -> int:
        strat = b.get(strategy_name)
        if strat == "no":
            return 0
        if strat == "epoch":
            if per_epoch is None:
                raise ValueError(f"`{strategy_name}: epoch` needs num_train_epochs, not max_steps")
            return per_epoch
        if strat not in ("steps", "best"):
            raise ValueError(f"TRL field `{strategy_name}` = {strat!r} is not one of "
                             "no / steps / epoch")  # fmt: skip
        return _interval(b, name, steps)

    log_every = every("logging_steps", "logging_strategy")
    b.set("log_every", log_every)
    b.row("logging_steps", f"log_every = {log_every}")
    b.used.add("logging_strategy")
    if strategy != "no":
        n = b.get("eval_steps")
        ev = per_epoch if strategy == "epoch" else (
            _interval(b, "eval_steps", steps) if n else log_every  # transformers' rule
        )  # fmt: skip
        b.set("eval_every", ev)
        b.row("eval_steps", f"eval_every = {ev}")
    else:
        b.inert("eval_steps", "eval_strategy is 'no'")
    save = b.get("save_strategy")
    if save == "no":
        b.set("checkpoint.every", steps + 1)
        b.row("save_strategy", "checkpoint.every = steps + 1 (only the final save)")
    else:
        ck = every("save_steps", "save_strategy")
        b.set("checkpoint.every", ck)
        b.row("save_steps", f"checkpoint.every = {ck}")
    b.used.add("save_strategy")
    limit = b.get("save_total_limit")
    keep = (
        int(limit) if limit else max(1, math.ceil(steps / max(1, b.values["checkpoint"]["every"])))
    )
    b.set("checkpoint.keep", keep)
    b.row("save_total_limit", f"checkpoint.keep = {keep}")
    metric = b.get("metric_for_best_model")
    if metric is not None:
        key = metric[len("eval_") :] if metric.startswith("eval_") else metric
        b.put("metric_for_best_model", "checkpoint.best_metric", f"eval/{key}")
        greater = b.get("greater_is_better")
        greater = key != "loss" if greater is None else bool(greater)
        b.set("checkpoint.best_mode", "max" if greater else "min")
        b.row("greater_is_better", f"checkpoint.best_mode = {'max' if greater else 'min'!r}")
    else:
        b.used.add("greater_is_better")
    b.used.add("save_strategy")
    b.refuse_unless_default("load_best_model_at_end", "alignjax exports the final step's model "
                            "(checkpoint.best_metric keeps the best checkpoint; `alignjax export "
                            "--step N` exports it)")  # fmt: skip
    # ---- PEFT
    if b.get("use_peft"):
        b.put("use_peft", "peft.method", "dora" if b.get("use_dora") else "lora")
        b.put("lora_r", "peft.r", convert=int)
        b.put("lora_alpha", "peft.alpha", convert=float)
        targets = b.get("lora_target_modules")
        if targets is None:
            regex = r".*(q_proj|v_proj)"  # PEFT's default for Llama
        elif targets == "all-linear" or targets == ["all-linear"]:
            regex = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        else:
            names = [targets] if isinstance(targets, str) else list(targets)
            regex = r".*(" + "|".join(names) + ")"
        b.put("lora_target_modules", "peft.targets", regex)
        drop = float(b.get("lora_dropout"))
        if task != "sft" and b.get("disable_dropout"):
            b.row("disable_dropout", "peft.kwargs.dropout = 0.0 (TRL disables every dropout, "
                                     "the adapters' included)")  # fmt: skip
            drop = 0.0
        if drop:
            if "lora_dropout" in b.given:
                raise ValueError(f"TRL field `lora_dropout` = {drop}: alignjax's training step "
                                 "has no dropout RNG, so adapters train without dropout; set "
                                 "lora_dropout: 0")  # fmt: skip
            b.warnings.append(f"TRL's default `lora_dropout` {drop} is not applied: alignjax's "
                              "training step has no dropout RNG (adapters train without "
                              "dropout); set lora_dropout: 0 to say so")  # fmt: skip
            drop = 0.0
        kwargs = {"dropout": drop}
        if b.get("use_rslora"):
            kwargs["use_rslora"] = True
        b.set("peft.kwargs", kwargs)
        b.row("lora_dropout", f"peft.kwargs.dropout = {drop}")
        b.used.update({"use_rslora", "use_dora"})
        if task == "reward":  # the value head trains with the adapters
            _online.reward_peft(b)
        else:
            b.refuse_unless_default("lora_modules_to_save", "alignjax trains adapters only")
            b.refuse_unless_default("lora_task_type", "alignjax trains causal LMs")
        b.refuse_unless_default("lora_target_parameters", "alignjax adapts linear modules")
    else:
        for n in (
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "use_rslora",
            "use_dora",
            "lora_modules_to_save",
            "lora_target_parameters",
            "lora_task_type",
        ):
            if n in b.given:
                b.warnings.append(f"TRL field `{n}` is set but `use_peft` is false: not used "
                                  "(as in TRL)")  # fmt: skip
            b.used.add(n)
    if "disable_dropout" in b.defaults and not (b.get("use_peft") and task != "sft"):
        b.row("disable_dropout", "(alignjax's Llama has no dropout layers)")


def _dataset_rows_shipped(task: str) -> int:
    from alignjax import data as D

    return len(D.shipped_dataset("sft" if task == "sft" else "train"))


def _map_reference(b: _Builder) -> None:
    if b.get("precompute_ref_log_probs"):
        b.put("precompute_ref_log_probs", "reference.mode", "precomputed")
    elif b.get("use_peft"):
        b.set("reference.mode", "adapters_disabled")
        b.rows.append(("use_peft", True, b.origin("use_peft"),
                       "reference.mode = 'adapters_disabled' (TRL's disable_adapter)"))  # fmt: skip
    else:
        b.set("reference.mode", "frozen")
        b.row("precompute_ref_log_probs", "reference.mode = 'frozen'")
    if b.get("sync_ref_model"):
        if b.get("use_peft") or b.get("precompute_ref_log_probs"):
            raise ValueError(
                "TRL field `sync_ref_model` needs a separate reference model; with `use_peft` "
                "the reference is the policy with adapters off, with "
                "`precompute_ref_log_probs` it is a fixed cache"
            )
        b.set("reference.mode", "frozen")
        b.put("ref_model_sync_steps", "reference.sync_every", convert=int)
        b.put("ref_model_mixup_alpha", "reference.sync_alpha", convert=float)
        b.row("sync_ref_model", "reference.sync_every > 0 (TR-DPO)")
    else:
        b.used.add("sync_ref_model")
        for name in ("ref_model_sync_steps", "ref_model_mixup_alpha"):
            b.inert(name, "sync_ref_model is false (as in TRL)")


def _loss_kwarg(b: _Builder, kwargs: dict, name: str, ours: str | None = None, convert=float):
    """Pass a loss hyperparameter on only when it differs from TRL's default (TRL's trainers
    read every loss field only for the loss types that use it)."""
    v = b.get(name)
    default = b.defaults.get(name, {}).get("default")
    if v is None or v == default:
        b.used.add(name)
        return
    kwargs[ours or name] = convert(v)
    b.row(name, f"loss.kwargs.{ours or name} = {convert(v)!r}")


def _map_dpo(b: _Builder) -> None:
    _map_reference(b)
    types = b.get("loss_type")
    types = [types] if isinstance(types, str) else list(types)
    weights = b.get("loss_weights")
    if weights is None:
        weights = [1.0] * len(types)
    weights = [weights] if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(types):
        raise ValueError(f"TRL fields `loss_type` {types} and `loss_weights` {weights} differ "
                         "in length")  # fmt: skip
    rpo = b.given.get("rpo_alpha")
    if rpo is not None:
        b.used.add("rpo_alpha")
        if "sft" in types:
            raise ValueError("`rpo_alpha` (TRL <= 0.28) adds an sft term; loss_type has one")
        types, weights = types + ["sft"], weights + [float(rpo)]
    from alignjax import losses

    for t in types:
        if t not in losses.available():
            raise ValueError(f"TRL field `loss_type`: unknown loss {t!r}; alignjax has "
                             f"{losses.available()}")  # fmt: skip
    if len(types) == 1 and float(weights[0]) == 1.0:
        b.set("loss.name", types[0])
        b.set("loss.combine", [])
        target = f"loss.name = {types[0]!r}"
    else:
        b.set("loss.name", None)
        b.set("loss.combine", [[t, float(w)] for t, w in zip(types, weights)])
        target = f"loss.combine = {list(zip(types, map(float, weights)))}"
    b.row("loss_type", target)
    b.used.add("loss_weights")
    if rpo is not None:
        b.rows.append(("rpo_alpha", rpo, "given", "an ('sft', rpo_alpha) term (TRL <= 0.28)"))
    b.put("beta", "loss.beta", convert=float)
    kwargs: dict[str, Any] = {}
    smoothing = float(b.get("label_smoothing") or 0.0)
    if smoothing and "sigmoid" in types:  # TRL 1.16 ignores it on sigmoid; alignjax: cDPO
        if set(types) & {"exo_pair", "robust", "aot", "aot_unpaired"}:
            raise ValueError("TRL field `label_smoothing` with loss_type sigmoid and a smoothed "
                             "loss: TRL 1.16 applies it to the second only, alignjax's combined "
                             "loss shares it (cDPO on sigmoid); run them apart")  # fmt: skip
        b.used.add("label_smoothing")
        b.warnings.append(
            f"TRL field `label_smoothing` = {smoothing} is not used: TRL 1.16 ignores it on "
            "sigmoid (alignjax would apply cDPO: give loss.kwargs.label_smoothing for that)"
        )
    else:
        _loss_kwarg(b, kwargs, "label_smoothing")
    _loss_kwarg(b, kwargs, "f_divergence_type", "f_divergence", convert=str)
    _loss_kwarg(b, kwargs, "f_alpha_divergence_coef", "f_alpha")
    _loss_kwarg(b, kwargs, "ld_alpha")
    b.refuse_unless_default(
        "use_weighting",
        "alignjax's training step does not compute WPO's log sum_v p_v^2 (losses.dpo takes "
        "them as chosen_log_sum_sq)",
    )
    _loss_kwarg(b, kwargs, "discopop_tau")
    b.set("loss.kwargs", kwargs)
    for name in ("max_prompt_length", "max_completion_length"):  # TRL <= 0.28
        if name in b.given:
            b.put(name, f"data.{name}", convert=int)


def _map_kto(b: _Builder) -> None:
    _map_reference(b)
    loss = b.get("loss_type")
    b.put("loss_type", "loss.name", str(loss))
    b.put("beta", "loss.beta", convert=float)
    kwargs: dict[str, Any] = {}
    _loss_kwarg(b, kwargs, "desirable_weight")
    _loss_kwarg(b, kwargs, "undesirable_weight")
    b.set("loss.kwargs", kwargs)


def _map_sft(b: _Builder) -> None:
    b.set("reference.mode", "none")
    b.set("loss.name", "sft")
    field = b.get("dataset_text_field")
    if field != "text":
        b.put("dataset_text_field", "data.columns", {"text": field})
    else:
        b.used.add("dataset_text_field")
    loss = b.get("loss_type")
    if loss != "nll":
        raise ValueError(f"TRL field `loss_type` = {loss!r}: alignjax's SFT loss is the NLL")
    b.row("loss_type", "loss.name = 'sft'")
    if b.get("completion_only_loss") is False:
        raise ValueError("TRL field `completion_only_loss` = false: alignjax trains "
                         "prompt-completion rows on the completion only (use a language-modeling "
                         "dataset, `text`, to train on every token)")  # fmt: skip
    b.used.add("completion_only_loss")
    b.refuse_unless_default("assistant_only_loss", "alignjax masks by prompt / completion")
    if b.get("packing"):
        b.put("packing", "data.packing", True)
        length = b.get("max_length") or 1024
        b.set("data.pack_length", int(length))
        strategy = b.get("packing_strategy")
        b.warnings.append(f"`packing_strategy` {strategy!r}: alignjax packs whole sequences first "
                          "fit in data order (no splitting; TRL's bfd sorts by length), so the "
                          "rows of a packed batch differ from TRL's")  # fmt: skip
    else:
        for name in ("packing_strategy", "eval_packing"):
            b.inert(name, "packing is false")
    b.used.update({"packing", "packing_strategy", "eval_packing"})
    b.refuse_unless_default("dataset_kwargs", "alignjax always prepares (tokenizes) the dataset")


def from_trl(
    command: str,
    path: str | Path | None = None,
    flags: Sequence[str] = (),
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
) -> RecipeMapping:
    """A TRL recipe (file at `path`, then `flags`, or a `values` mapping) as a `TrainConfig`,
    then alignjax's dotted `overrides`; see the module docstring for the rules."""
    if command not in TRAINERS:
        raise ValueError(f"unknown TRL command {command!r}; alignjax maps {sorted(TRAINERS)}")
    given = dict(read_recipe(path)) if path is not None else {}
    given.update(values or {})
    given.update(parse_flags(flags, command))
    _check_names(command, given)
    given = _online.prepare(command, given)
    defaults = _fields_of(command)
    given = {
        k: _coerce(k, v, defaults[k]["type"]) if k in defaults else v for k, v in given.items()
    }
    b = _Builder(command, given, defaults)
    task = TRAINERS[command]
    for item in overrides:  # rewards / losses an `imports` override registers
        if item.startswith("imports="):
            cfg_lib.import_plugins(cfg_lib.apply_overrides(cfg_lib.TrainConfig(), [item]).imports)
    devices = _data_parallel_devices(overrides)
    _map_common(b, task, devices, **_online.batch_rules(b, command, devices))
    if command in _online.METHODS:
        _online.map_online(b, command)
    else:
        mappers = {"dpo": _map_dpo, "kto": _map_kto, "sft": _map_sft, "reward": _online.map_reward}
        mappers[command](b)
    for name in sorted(set(given) - b.used):
        if name == "report_to" and given[name] in ("none", ["none"], [], None):
            b.rows.append((name, given[name], "given", "(no logging back-end: as alignjax)"))
        elif name in NO_MEANING:
            b.warnings.append(f"TRL field `{name}` = {given[name]!r} has no alignjax meaning; "
                              "not used")  # fmt: skip
        else:
            b.refuse_unless_default(name, "alignjax has no equivalent")
    values_ = b.values
    if task == "sft":
        values_.setdefault("loss", {}).update(kwargs={})
    cfg = cfg_lib.from_dict(cfg_lib.TrainConfig, values_)
    if overrides:
        cfg = cfg_lib.apply_overrides(cfg, overrides)
        b.rows.append(("(alignjax overrides)", list(overrides), "given", "applied last"))
    for w in b.warnings:
        log.warning("%s", w)
    return RecipeMapping(command, cfg, b.rows, b.warnings)
