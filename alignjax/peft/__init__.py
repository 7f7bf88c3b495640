"""Flax NNX adapters with HF PEFT semantics: LoRA / DoRA, Bone / Bat / MiSS-mini and AdaLoRA,
injected by regex on module paths, mergeable and exactly unmergeable, with an
adapters-disabled view of the base model and adapter-only state."""

from alignjax.peft import adalora_allocator, adalora_optax
from alignjax.peft.adalora import AdaLoRA
from alignjax.peft.adalora_allocator import (
    AdaLoraSchedule,
    AllocatorState,
    init_allocator,
    orthogonal_regularizer,
    update_and_allocate,
)
from alignjax.peft.adalora_optax import (
    RankAllocationState,
    adalora_triplet_paths,
    allocation_state,
    orthogonal_penalty,
    rank_pattern,
    with_rank_allocation,
)
from alignjax.peft.base import AdapterLinear, AdapterParam, AdapterState
from alignjax.peft.bone import Bone, bat_kernel, bat_unmerge, bone_delta
from alignjax.peft.hf_peft import export_adapters, import_adapters, read_adapters
from alignjax.peft.inject import (
    Rule,
    adalora_triplets,
    adapter_state,
    adapters,
    adapters_disabled,
    apply,
    linear_paths,
    load_adapter_state,
    merge,
    set_adalora_e,
    unload,
    unmerge,
)
from alignjax.peft.lora import LoRA

__all__ = [
    "AdaLoRA",
    "AdaLoraSchedule",
    "AllocatorState",
    "adalora_allocator",
    "adalora_optax",
    "init_allocator",
    "orthogonal_regularizer",
    "update_and_allocate",
    "RankAllocationState",
    "adalora_triplet_paths",
    "allocation_state",
    "orthogonal_penalty",
    "rank_pattern",
    "with_rank_allocation",
    "AdapterLinear",
    "AdapterParam",
    "AdapterState",
    "Bone",
    "LoRA",
    "Rule",
    "adalora_triplets",
    "set_adalora_e",
    "adapter_state",
    "adapters",
    "adapters_disabled",
    "apply",
    "bat_kernel",
    "bat_unmerge",
    "bone_delta",
    "export_adapters",
    "import_adapters",
    "read_adapters",
    "linear_paths",
    "load_adapter_state",
    "merge",
    "unload",
    "unmerge",
]
