"""TRL 1.16.0's config fields and defaults, for `alignjax dpo|sft|kto|reward|grpo|rloo|online-dpo
--config recipe.yaml`.

`alignjax.train.trl_recipe` maps a TRL recipe onto a `TrainConfig` without importing TRL (it is
not a runtime dependency), so the field names it accepts and TRL's defaults, which it applies
where a recipe is silent, come from this file: it reads every dataclass field of the configs the
`trl` command line parses (`ScriptArguments`, `ModelConfig`, `DatasetMixtureConfig` and each
trainer's config, a `transformers.TrainingArguments` subclass; `trl grpo` / `trl rloo` parse their
own script arguments, `GRPOScriptArguments` / `RLOOScriptArguments`, which add `reward_funcs` and
`reward_model_name_or_path`; Online DPO has no `trl` command in 1.16, its config is
`trl.experimental.online_dpo.OnlineDPOConfig`) and writes
`alignjax/train/trl_fields.json` (name -> default and annotation, per class; defaults are the
dataclass defaults before `__post_init__`, which resolves e.g. `bf16=None` to `not fp16`; the
mapping applies those resolutions itself). Run in a venv with torch==2.13.0 (CPU),
trl==1.16.0 and transformers==5.23.0 (5.25.0 writes the same fields; `meta` records the
version used):

    python tests/reference/generate_trl_configs.py
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import transformers
import trl
from trl import (
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ModelConfig,
    RewardConfig,
    RLOOConfig,
    ScriptArguments,
    SFTConfig,
)
from trl.experimental.online_dpo import OnlineDPOConfig
from trl.scripts.grpo import GRPOScriptArguments
from trl.scripts.rloo import RLOOScriptArguments
from trl.scripts.utils import DatasetMixtureConfig

OUT = Path(__file__).resolve().parents[2] / "alignjax" / "train" / "trl_fields.json"
CLASSES = {
    "script": ScriptArguments,
    "model": ModelConfig,
    "datasets": DatasetMixtureConfig,
    "dpo": DPOConfig,
    "sft": SFTConfig,
    "kto": KTOConfig,
    "reward": RewardConfig,
    "grpo": GRPOConfig,
    "rloo": RLOOConfig,
    "online-dpo": OnlineDPOConfig,
    "grpo_script": GRPOScriptArguments,
    "rloo_script": RLOOScriptArguments,
}


def plain(value):
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return repr(value)


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return plain(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return plain(f.default_factory())
    return None


def main():
    out = {
        "meta": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "generator": "tests/reference/generate_trl_configs.py",
            "training_arguments": sorted(
                f.name for f in dataclasses.fields(transformers.TrainingArguments)
            ),
        },
        "classes": {},
    }
    for key, cls in CLASSES.items():
        out["classes"][key] = {
            "class": cls.__name__,
            "fields": {
                f.name: {"default": default_of(f), "type": str(f.type)}
                for f in dataclasses.fields(cls)
                if f.init
            },
        }
    OUT.write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
