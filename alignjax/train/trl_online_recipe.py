"""TRL's reward-model and on-policy recipes, unchanged: `alignjax reward|grpo|rloo|online-dpo`.

    alignjax reward --config rm.yaml                     # RewardConfig fields
    alignjax grpo --config grpo.yaml                     # GRPOConfig + GRPOScriptArguments
    alignjax grpo --dataset_name prompts.jsonl --reward_model_name_or_path runs/rm \\
                  --reward_funcs my_lib.rewards.brevity --num_generations 4 mesh.devices=1
    alignjax online-dpo --config odpo.yaml --reward_model_path runs/rm

`trl_recipe`'s rules hold (every TRL 1.16 field known, a misspelt one an error naming the
closest, TRL's defaults where the recipe is silent, `NO_MEANING` warnings, a field alignjax
cannot honour an error unless at TRL's default). `trl grpo` / `trl rloo` read their
`GRPOScriptArguments` / `RLOOScriptArguments` (ScriptArguments plus `reward_funcs` and
`reward_model_name_or_path`); Online DPO has no `trl` command in 1.16, so its recipe is
ScriptArguments, ModelConfig and `trl.experimental.online_dpo.OnlineDPOConfig`.

`reward` -> `task: reward`, the "reward" loss (`center_rewards_coefficient` as its keyword).
TRL drops pairs longer than `max_length`; alignjax cuts them (`data.max_length`, keep_start),
so the two differ only on such pairs. With `use_peft`, TRL trains the value head only when PEFT
saves it (`lora_task_type: SEQ_CLS` or `score` in `lora_modules_to_save`); alignjax always
trains it, and says so in a warning otherwise.

`grpo`, `rloo`, `online-dpo` -> `task: online` with `online.method` grpo / rloo / online_dpo:

- batch: GRPO / RLOO's `per_device_train_batch_size` counts completions. Their generation batch,
  `per_device_train_batch_size` x processes x `steps_per_generation`, with TRL's default
  `steps_per_generation` = `gradient_accumulation_steps` (GRPOConfig.__post_init__), is one
  optimizer step's rollouts: alignjax's `data.batch_size` (completions per step). Only that
  default is honoured (one rollout batch per optimizer step; `num_iterations` reuses it);
  another `steps_per_generation` / `generation_batch_size` is an error. Online DPO's counts
  prompts: `data.batch_size` = 2 x per-device x devices x accumulation (a pair per prompt).
- steps from epochs: GRPO / RLOO's `RepeatSampler` drops the last partial batch of prompts and
  serves each batch `num_iterations` times, so an epoch is floor(rows / prompts per step) x
  `num_iterations` optimizer steps; Online DPO's is transformers' count over its prompts.
- rewards: `reward_model_name_or_path` (Online DPO: `reward_model_path`) first, then each of
  `reward_funcs`, in TRL's order, become `online.rewards` (`reward_model:<path>` for a reward
  model trained by `alignjax reward`, registered names, dotted import paths; TRL's built-ins
  `accuracy_reward` etc. are not in alignjax); `reward_weights` follow that order. With neither,
  alignjax's default (`sentiment`) is used, with a warning (TRL needs one; or give
  `online.rewards=[...]`).
- sampling: `max_completion_length` (Online DPO: `max_new_tokens`) -> `online.max_new_tokens`;
  `top_k` 0 and `top_p` 1.0 (off) -> None. GRPO / RLOO 1.16 do not cut prompts
  (`data.max_length` None; the legacy `max_prompt_length` keeps a prompt's last tokens, as TRL
  <= 0.2x did). Online DPO's `max_length` cuts prompt + completion on the left for the
  log-probs: here `data.max_prompt_length` = max_length - max_new_tokens, which cuts the prompt
  before sampling; the same rows whenever a batch's prompts fit.
- reference: only read when beta > 0 (Online DPO: always): the policy with its adapters off
  under `use_peft` (TRL's `disable_adapter`), else a frozen copy of the initial policy.
- `num_iterations` > 1: checkpoints fall on rollout boundaries, so `save_steps` must be a
  multiple of it (TRL's default 500 is rounded up to one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["TASKS", "METHODS", "SCRIPT_CLASSES", "prepare", "batch_rules", "map_reward",
           "reward_peft", "map_online"]  # fmt: skip

TASKS = {"reward": "reward", "grpo": "online", "rloo": "online", "online-dpo": "online"}
METHODS = {"grpo": "grpo", "rloo": "rloo", "online-dpo": "online_dpo"}
SCRIPT_CLASSES = {"grpo": "grpo_script", "rloo": "rloo_script"}  # trl_fields.json's keys
TRL_BUILTIN_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward",
                       "get_soft_overlong_punishment")  # fmt: skip
# Generation back-ends and completion logging: a warning names them, whatever their value
# (alignjax samples with its own sampler and writes `online.log_samples` rollouts to
# rollouts.jsonl every `log_every` steps).
NO_MEANING = (
    "cache_implementation ds3_gather_for_generation use_transformers_continuous_batching "
    "transformers_continuous_batching_config use_transformers_paged "
    "vllm_importance_sampling_correction vllm_importance_sampling_mode "
    "vllm_importance_sampling_cap vllm_importance_sampling_clip_min "
    "vllm_importance_sampling_clip_max vllm_structured_outputs_regex log_completions "
    "log_completions_hub_repo num_completions_to_print log_unique_prompts log_multimodal"
).split()


def prepare(command: str, given: dict) -> dict:
    """TRL's `__post_init__` conversions that precede the type check: GRPO's boolean
    `scale_rewards` (True: "group", False: "none")."""
    if command == "grpo" and isinstance(given.get("scale_rewards"), bool):
        given = dict(given, scale_rewards="group" if given["scale_rewards"] else "none")
    return given


def _show(b, name: str, key: str, value, note: str = "") -> None:
    b.set(key, value)
    b.row(name, f"{key} = {value!r}{note}")


def _choice(b, name: str, options) -> None:
    """`online.<name>` = TRL field `name`, one of alignjax's `options`."""
    value = b.get(name)
    if value not in options:
        raise ValueError(f"TRL field `{name}` = {value!r}: alignjax has {list(options)}")
    _show(b, name, f"online.{name}", value)


def _no_meaning(b, names) -> None:
    for name in names:
        b.used.add(name)
        if name in b.given:
            b.warnings.append(f"TRL field `{name}` = {b.given[name]!r} has no alignjax meaning; "
                              "not used")  # fmt: skip


# ---------------------------------------------------------------------------- batch and epochs


def batch_rules(b, command: str, devices: int) -> dict:
    """`_map_common`'s keyword arguments for the command's batch and epoch semantics (module
    docstring), after checking TRL's generation-batch fields."""
    if command not in METHODS:
        return {}
    if command == "online-dpo":
        return {"rows_per_example": 2, "unit": "prompts, 2 completions each"}
    per_device = int(b.get("per_device_train_batch_size"))
    accum = int(b.get("gradient_accumulation_steps"))
    _generation_batch(b, per_device * devices, accum)
    g, mu = b.get("num_generations"), int(b.get("num_iterations"))
    if g is None or int(g) < 2:
        raise ValueError(f"TRL field `num_generations` = {g!r}: {command.upper()} needs at least "
                         "2 completions per prompt")  # fmt: skip
    batch = per_device * devices * accum
    if batch % int(g):
        raise ValueError(f"the generation batch, `per_device_train_batch_size` x {devices} devices "
                         f"x `gradient_accumulation_steps` = {batch} completions, must be "
                         f"divisible by `num_generations` = {g} (as in TRL)")  # fmt: skip
    prompts = batch // int(g)

    def epoch_steps(rows: int, per_step: int, accum: int) -> int:
        return max(1, rows // prompts * mu)  # RepeatSampler.__len__, TRL trainer/utils.py

    return {"epoch_steps": epoch_steps, "unit": "completions"}


def _generation_batch(b, micro: int, accum: int) -> None:
    size, spg = b.get("generation_batch_size"), b.get("steps_per_generation")
    if size is not None and spg is not None:
        raise ValueError("TRL fields `generation_batch_size` and `steps_per_generation` cannot "
                         "both be set (as in TRL)")  # fmt: skip
    name = "generation_batch_size" if size is not None else "steps_per_generation"
    if size is not None:
        if int(size) % micro:
            raise ValueError(f"TRL field `generation_batch_size` = {size} must be divisible by "
                             f"the global micro-batch ({micro}), as in TRL")  # fmt: skip
        spg = int(size) // micro
    if spg is None:
        return
    if int(spg) != accum:
        raise ValueError(f"TRL field `{name}` = {b.get(name)}: {spg} micro-batches per rollout "
                         "batch, but alignjax samples one rollout batch per optimizer step "
                         f"(steps_per_generation = gradient_accumulation_steps = {accum}, TRL's "
                         "default); set gradient_accumulation_steps instead, and num_iterations "
                         "to reuse a batch")  # fmt: skip
    b.row(name, "(one rollout batch per optimizer step: TRL's default)")


# ---------------------------------------------------------------------------- reward models


def map_reward(b) -> None:
    """RewardConfig's own fields onto `task: reward` (the rest is `trl_recipe._map_common`)."""
    b.set("reference.mode", "none")
    b.set("loss.name", "reward")
    c = b.get("center_rewards_coefficient")
    kwargs = {} if c is None else {"center_rewards_coefficient": float(c)}
    b.set("loss.kwargs", kwargs)
    b.row("center_rewards_coefficient", f"loss.kwargs = {kwargs!r} (loss 'reward')")
    b.row("max_length", "(TRL drops longer pairs; alignjax cuts them, keep_start)")


def reward_peft(b) -> None:
    """`lora_task_type` / `lora_modules_to_save` of a reward model: the value head always trains
    here; TRL trains it only when PEFT saves it."""
    task_type, saved = b.get("lora_task_type"), b.get("lora_modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else list(saved)
    b.used.update({"lora_task_type", "lora_modules_to_save"})
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(f"TRL field `lora_task_type` = {task_type!r}: a reward model is "
                         "SEQ_CLS (or CAUSAL_LM with `score` in lora_modules_to_save)")  # fmt: skip
    if set(saved) - {"score"}:
        raise ValueError(f"TRL field `lora_modules_to_save` = {saved!r}: alignjax trains the "
                         "adapters and the value head (`score`) only")  # fmt: skip
    if task_type == "SEQ_CLS" or "score" in saved:
        b.row("lora_task_type", "heads/score trains with the adapters (PEFT saves it)")
    else:
        b.warnings.append("TRL fields `lora_task_type` = 'CAUSAL_LM' without `score` in "
                          "`lora_modules_to_save`: TRL would leave the reward head at its random "
                          "initialisation; alignjax trains it with the adapters (set "
                          "lora_task_type: SEQ_CLS to say so)")  # fmt: skip


# ---------------------------------------------------------------------------- on-policy


def map_online(b, command: str) -> None:
    """GRPOConfig / RLOOConfig / OnlineDPOConfig's own fields onto `online:` (module
    docstring)."""
    dpo = command == "online-dpo"
    b.set("online.method", METHODS[command])
    b.set("data.max_length", None)  # prompt-only rows: `max_length` does not apply
    _sampling(b, dpo)
    _rewards(b, command)
    beta = b.get("beta")
    if isinstance(beta, list):  # OnlineDPOConfig: a beta per epoch, one element -> a float
        if len(beta) != 1:
            raise ValueError(f"TRL field `beta` = {beta!r}: a beta per epoch; alignjax trains "
                             "with one `online.beta`")  # fmt: skip
        beta = beta[0]
    _show(b, "beta", "online.beta", float(beta))
    if dpo or float(beta) != 0:
        mode = "adapters_disabled" if b.get("use_peft") else "frozen"
        how = "the policy with adapters off" if b.get("use_peft") else "a frozen initial policy"
        b.set("reference.mode", mode)
        b.rows.append(("use_peft", b.get("use_peft"), b.origin("use_peft"),
                       f"reference.mode = {mode!r} ({how})"))  # fmt: skip
    if dpo:
        from alignjax.losses.online_dpo import ONLINE_DPO_LOSS_TYPES

        _choice(b, "loss_type", ONLINE_DPO_LOSS_TYPES)
        _show(b, "missing_eos_penalty", "online.missing_eos_penalty", b.get("missing_eos_penalty"))
        length, new = int(b.get("max_length")), int(b.get("max_new_tokens"))
        if length <= new:
            raise ValueError(f"TRL field `max_length` = {length} leaves no prompt token next to "
                             f"max_new_tokens = {new}")  # fmt: skip
        note = " (max_length - max_new_tokens; TRL cuts prompt + completion on the left)"
        _show(b, "max_length", "data.max_prompt_length", length - new, note)
        return
    _policy_gradient(b, command)


def _sampling(b, dpo: bool) -> None:
    name = "max_new_tokens" if dpo else "max_completion_length"
    if b.get(name) is None:
        raise ValueError(f"TRL field `{name}` = None: alignjax samples at most a fixed number "
                         "of tokens; give one")  # fmt: skip
    _show(b, name, "online.max_new_tokens", int(b.get(name)))
    if dpo:
        b.set("online.num_generations", 2)
    else:
        _show(b, "num_generations", "online.num_generations", int(b.get("num_generations")))
    _show(b, "temperature", "online.temperature", float(b.get("temperature")))
    _show(b, "top_k", "online.top_k", int(b.get("top_k")) or None)
    top_p = float(b.get("top_p"))
    if not 0 < top_p <= 1:
        raise ValueError(f"TRL field `top_p` = {top_p}: must be in (0, 1]")
    _show(b, "top_p", "online.top_p", None if top_p == 1.0 else top_p)
    for field in ("min_p", "repetition_penalty", "generation_kwargs"):
        b.refuse_unless_default(field, "alignjax's sampler has temperature, top_k and top_p only")
    _no_meaning(b, NO_MEANING)


def _rewards(b, command: str) -> None:
    from alignjax.online.rewards import REWARD_MODEL_PREFIX, REWARDS, check_reward

    field = "reward_model_path" if command == "online-dpo" else "reward_model_name_or_path"
    names: list[str] = []
    path = b.get(field)
    if path:
        names.append(f"{REWARD_MODEL_PREFIX}{path}")
        _checked(b, field, names[-1], check_reward)
    b.used.add(field)
    funcs = [] if command == "online-dpo" else b.get("reward_funcs") or []
    for name in [funcs] if isinstance(funcs, str) else funcs:
        if name in TRL_BUILTIN_REWARDS and name not in REWARDS:
            raise ValueError(f"TRL field `reward_funcs`: {name!r} is a TRL built-in alignjax does "
                             f"not have; registered: {sorted(REWARDS)} (register one, or give a "
                             "dotted import path)")  # fmt: skip
        _checked(b, "reward_funcs", name, check_reward)
        names.append(name)
    b.used.add("reward_funcs")
    if names:
        b.set("online.rewards", names)
        b.rows.append((field if path else "reward_funcs", path or funcs, "given",
                       f"online.rewards = {names!r}"))  # fmt: skip
    else:
        b.warnings.append(f"no `{field}`{'' if command == 'online-dpo' else ' or `reward_funcs`'}"
                          ": alignjax's default reward `sentiment` is used (TRL needs one; give "
                          "online.rewards=[...] to choose)")  # fmt: skip
    weights = b.get("reward_weights")
    if weights is not None and len(weights) != max(len(names), 1):
        raise ValueError(f"TRL field `reward_weights` = {weights!r}: one weight per reward "
                         f"({names or ['sentiment']})")  # fmt: skip
    _show(b, "reward_weights", "online.reward_weights", weights)


def _checked(b, field: str, name: str, check: Callable) -> None:
    try:
        check(name)
    except ValueError as err:
        raise ValueError(f"TRL field `{field}`: {err}") from None


def _policy_gradient(b, command: str) -> None:
    """GRPO / RLOO: clipping, advantages, iterations and what alignjax cannot do."""
    grpo = command == "grpo"
    _show(b, "epsilon", "online.epsilon", float(b.get("epsilon")))
    high = b.get("epsilon_high")
    _show(b, "epsilon_high", "online.epsilon_high", None if high is None else float(high))
    mu = int(b.get("num_iterations"))
    _show(b, "num_iterations", "online.num_iterations", mu)
    if grpo:
        from alignjax.losses.advantages import SCALE_REWARDS
        from alignjax.losses.policy_gradient import IS_LEVELS, LOSS_TYPES

        _choice(b, "loss_type", LOSS_TYPES)
        _choice(b, "scale_rewards", SCALE_REWARDS)
        _choice(b, "importance_sampling_level", IS_LEVELS)
        delta = b.get("delta")
        _show(b, "delta", "online.delta", None if delta is None else float(delta))
        _show(b, "use_bias_correction_kl", "online.use_bias_correction_kl",
              bool(b.get("use_bias_correction_kl")))  # fmt: skip
        b.refuse_unless_default("multi_objective_aggregation", "alignjax sums the weighted "
                                "rewards, then normalises (TRL's default)")  # fmt: skip
        for name in ("top_entropy_quantile", "entropy_coef", "use_adaptive_entropy"):
            b.refuse_unless_default(name, "alignjax's GRPO has no entropy mask or bonus")
        for name in ("entropy_coef_delta", "entropy_coef_max", "entropy_coef_min",
                     "entropy_target"):  # fmt: skip
            b.inert(name, "use_adaptive_entropy is false (as in TRL)")
        for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
            b.inert(name, "loss_type is not 'sapo' (as in TRL)")
        for name in ("vespo_k_neg", "vespo_k_pos", "vespo_lambda_neg", "vespo_lambda_pos"):
            b.inert(name, "loss_type is not 'vespo' (as in TRL)")
        b.refuse_unless_default("off_policy_mask_threshold", "alignjax has no off-policy mask")
        b.refuse_unless_default("cast_lm_head_to_fp32", "alignjax computes the LM head in the "
                                "compute dtype (bf16: false for float32)")  # fmt: skip
        b.refuse_unless_default("max_tool_calling_iterations", "alignjax samples no tool calls")
    else:
        _show(b, "normalize_advantages", "online.normalize_advantages",
              bool(b.get("normalize_advantages")))  # fmt: skip
        clip = b.get("reward_clip_range")
        if clip is not None and not (isinstance(clip, list) and len(clip) == 2):
            raise ValueError(f"TRL field `reward_clip_range` = {clip!r}: expected [low, high]")
        _show(b, "reward_clip_range", "online.reward_clip_range", clip)
    b.refuse_unless_default("mask_truncated_completions", "alignjax trains on truncated "
                            "completions (their missing EOS is in the rollout flags)")  # fmt: skip
    b.refuse_unless_default("chat_template_kwargs", "alignjax applies the chat template as is")
    b.refuse_unless_default("shuffle_dataset", "alignjax shuffles the prompts every epoch")
    b.refuse_unless_default("sync_ref_model", "task=online has no reference sync")
    for name in ("ref_model_sync_steps", "ref_model_mixup_alpha"):
        b.inert(name, "sync_ref_model is false (as in TRL)")
    b.inert("num_generations_eval", "alignjax's evaluation samples one completion per held-out "
            "prompt (the same expected reward)")  # fmt: skip
    if "max_prompt_length" in b.given:  # TRL <= 0.2x: the prompt's last tokens
        _show(b, "max_prompt_length", "data.max_prompt_length", int(b.given["max_prompt_length"]))
    _rollout_boundaries(b, mu)


def _rollout_boundaries(b, mu: int) -> None:
    """With num_iterations > 1 a checkpoint must fall on a rollout boundary."""
    every, steps = b.values["checkpoint"]["every"], b.values["steps"]
    if mu == 1 or every % mu == 0:
        return
    if b.get("save_strategy") == "no" or "save_steps" not in b.given:
        every = mu * math.ceil(every / mu)
        b.set("checkpoint.every", every)
        b.row("num_iterations", f"checkpoint.every = {every} (a multiple of num_iterations)")
        return
    raise ValueError(f"TRL field `save_steps` = {b.get('save_steps')} -> checkpoint.every = "
                     f"{b.values['checkpoint']['every']}: with num_iterations = {mu} checkpoints "
                     f"fall on rollout boundaries (a multiple of {mu}; {steps} steps), since "
                     "alignjax does not save a batch's rollouts")  # fmt: skip
