"""TRL recipes mapped onto alignjax configs (`alignjax.train.trl_recipe`, `alignjax dpo|sft|kto`).

The recipes are written as TRL's own docs and `trl dpo --config` would have them (flat YAML of
`DPOConfig` / `SFTConfig` / `KTOConfig`, `ModelConfig` and `ScriptArguments` fields); the
expected alignjax values are derived by hand from TRL 1.16 / transformers 5.23 semantics (steps
from epochs: transformers' `num_update_steps_per_epoch`, warm-up ratio ceil(steps x ratio),
`eval_steps` falling back to `logging_steps`, TRL's `bf16 = not fp16`, PEFT's Llama targets).
TRL's field names and defaults come from `alignjax/train/trl_fields.json`, which
`tests/reference/generate_trl_configs.py` reads off TRL itself.
"""

import json
import logging
import math

import datasets
import pytest

from alignjax import cli
from alignjax.train import config as C
from alignjax.train import trl_recipe as R

MESH1 = ["mesh.devices=1"]  # one data-parallel device, so per-device batch = global batch


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl") / "pairs.jsonl"
    rows = [{"prompt": f"review {i}:", "chosen": " great.", "rejected": " awful."}
            for i in range(50)]  # fmt: skip
    datasets.Dataset.from_list(rows).to_json(str(path))
    return str(path)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_trl_field_inventory_is_trl_1_16():
    fields = R.trl_fields()
    assert fields["meta"]["trl"] == "1.16.0"
    dpo = fields["classes"]["dpo"]["fields"]
    # a few of TRL's own defaults (DPOConfig docstring / transformers' TrainingArguments)
    assert dpo["learning_rate"]["default"] == 1e-6
    assert dpo["beta"]["default"] == 0.1
    assert dpo["loss_type"]["default"] == ["sigmoid"]
    assert dpo["max_length"]["default"] == 1024
    assert dpo["gradient_checkpointing"]["default"] is True
    assert fields["classes"]["sft"]["fields"]["learning_rate"]["default"] == 2e-5
    assert fields["classes"]["model"]["fields"]["lora_r"]["default"] == 16


def test_dpo_recipe_field_by_field(tmp_path, pairs):
    recipe = write(
        tmp_path,
        f"""
model_name_or_path: ckpt/base
dataset_name: {pairs}
output_dir: runs/trl-dpo
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 5.0e-7
lr_scheduler_type: cosine
warmup_ratio: 0.1
num_train_epochs: 2
logging_steps: 3
save_steps: 4
save_total_limit: 2
seed: 7
bf16: false
gradient_checkpointing: false
max_length: 256
truncation_mode: keep_end
beta: 0.05
loss_type: [sigmoid, bco_pair, sft]
loss_weights: [0.8, 0.2, 1.0]
label_smoothing: 0.0
f_divergence_type: alpha_divergence
f_alpha_divergence_coef: 0.3
ld_alpha: 0.5
precompute_ref_log_probs: true
report_to: [wandb]
""",
    )
    m = R.from_trl("dpo", recipe, overrides=MESH1)
    cfg = m.config
    # 50 rows / 4 per step = 13 batches; / 2 accumulation -> 7 updates an epoch; 2 epochs
    per_epoch = 13 // 2 + 1
    assert cfg.steps == 2 * per_epoch == 14
    expected = {
        "task": "paired",
        "model.path": "ckpt/base",
        "data.tokenizer": "model",
        "model.dtype": None,  # bf16 false, fp16 false: float32 compute
        "model.remat": False,
        "data.train": f"{pairs}::train",
        "data.eval": None,  # eval_strategy "no" (TRL default)
        "data.batch_size": 8,  # 4 per device x 1 device x 2 accumulation
        "optim.grad_accum": 2,
        "optim.name": "adamw",
        "optim.learning_rate": 5e-7,
        "optim.schedule": "cosine",
        "optim.warmup_steps": math.ceil(14 * 0.1),
        "optim.weight_decay": 0.0,
        "optim.clip_norm": 1.0,
        "seed": 7,
        "data.seed": 7,
        "out_dir": "runs/trl-dpo",
        "log_every": 3,
        "checkpoint.every": 4,
        "checkpoint.keep": 2,
        "data.max_length": 256,
        "data.truncation_mode": "keep_end",
        "loss.name": None,
        "loss.combine": (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)),
        "loss.beta": 0.05,
        # label_smoothing at TRL's default is not passed; the rest under alignjax's names
        "loss.kwargs": {
            "f_divergence": "alpha_divergence",
            "f_alpha": 0.3,
            "ld_alpha": 0.5,
        },  # fmt: skip
        "reference.mode": "precomputed",
        "peft.method": None,
    }
    values = C.to_dict(cfg)
    for key, want in expected.items():
        node = values
        for part in key.split("."):
            node = node[part]
        got = node
        if isinstance(want, tuple):
            got = tuple(tuple(x) for x in got)
        assert got == want, key
    assert any("report_to" in w and "no alignjax meaning" in w for w in m.warnings)
    # every recipe field appears in the printed mapping
    table = m.table()
    for name in ("warmup_ratio", "loss_type", "f_alpha_divergence_coef", "ld_alpha"):
        assert name in table


def test_trl_defaults_where_the_recipe_is_silent(pairs):
    m = R.from_trl("dpo", values={"dataset_name": pairs}, overrides=MESH1)
    cfg, rows = m.config, {r[0]: r for r in m.rows}
    assert cfg.optim.learning_rate == 1e-6 and rows["learning_rate"][2] == "TRL default"
    assert cfg.optim.schedule == "linear" and cfg.optim.warmup_steps == 0
    assert cfg.seed == 42 and cfg.data.seed == 42
    assert cfg.model.dtype == "bfloat16"  # TRL: bf16 = not fp16
    assert cfg.model.remat is True  # TRL's gradient_checkpointing default
    assert cfg.data.max_length == 1024
    assert cfg.loss.name == "sigmoid" and cfg.loss.beta == 0.1
    assert cfg.data.batch_size == 8 and cfg.log_every == 10
    assert cfg.steps == 3 * math.ceil(50 / 8)  # 3 epochs of 7 batches
    assert cfg.out_dir == "trainer_output"
    assert "(TRL default)" in m.table()


def test_sft_and_kto_recipes(tmp_path, pairs):
    texts = tmp_path / "texts.jsonl"
    datasets.Dataset.from_list([{"body": f"the soup was good {i}"} for i in range(30)]).to_json(
        str(texts)
    )
    sft = R.from_trl("sft", write(tmp_path, f"""
dataset_name: {texts}
dataset_text_field: body
max_steps: 5
packing: true
max_length: 64
use_peft: true
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
lora_dropout: 0.0
"""), overrides=MESH1)  # fmt: skip
    c = sft.config
    assert (c.task, c.steps, c.loss.name, c.reference.mode) == ("sft", 5, "sft", "none")
    assert dict(c.data.columns) == {"text": "body"}
    assert c.data.packing and c.data.pack_length == 64
    assert c.optim.learning_rate == 2e-5  # SFTConfig's default
    assert c.peft.method == "lora" and c.peft.r == 16 and c.peft.alpha == 32.0
    assert c.peft.targets == ".*(q_proj|k_proj|v_proj|o_proj)"
    assert dict(c.peft.kwargs) == {"dropout": 0.0}
    assert any("packing_strategy" in w for w in sft.warnings)
    # SFT keeps the adapters' dropout in TRL (no disable_dropout); alignjax's step has no
    # dropout RNG: TRL's default 0.05 is a warning, a value given explicitly an error
    quiet = R.from_trl("sft", values={"dataset_name": str(texts), "max_steps": 2,
                                      "dataset_text_field": "body", "use_peft": True})  # fmt: skip
    assert any("`lora_dropout` 0.05 is not applied" in w for w in quiet.warnings)
    with pytest.raises(ValueError, match="`lora_dropout` = 0.1"):
        R.from_trl("sft", values={"dataset_name": str(texts), "max_steps": 2,
                                  "use_peft": True, "lora_dropout": 0.1})  # fmt: skip

    kto = R.from_trl("kto", values={"dataset_name": pairs, "max_steps": 4, "use_peft": True,
                                    "desirable_weight": 1.33, "loss_type": "apo_zero_unpaired",
                                    "beta": 0.2})  # fmt: skip
    k = kto.config
    assert (k.task, k.loss.name, k.loss.beta) == ("unpaired", "apo_zero_unpaired", 0.2)
    assert dict(k.loss.kwargs) == {"desirable_weight": 1.33}
    assert k.reference.mode == "adapters_disabled"
    assert dict(k.peft.kwargs) == {"dropout": 0.0}  # disable_dropout (KTO default) after PEFT


def test_flags_override_the_file(tmp_path, pairs):
    recipe = write(tmp_path, f"dataset_name: {pairs}\nbeta: 0.5\nmax_steps: 3\n")
    m = R.from_trl("dpo", recipe, ["--beta", "0.1", "--loss_type", "sigmoid", "ipo",
                                   "--loss_weights", "0.8", "0.2", "--use_peft",
                                   "--learning_rate=3e-6"], MESH1)  # fmt: skip
    c = m.config
    assert c.loss.beta == 0.1 and c.optim.learning_rate == 3e-6
    assert tuple(map(tuple, c.loss.combine)) == (("sigmoid", 0.8), ("ipo", 0.2))
    assert c.peft.method == "lora" and c.reference.mode == "adapters_disabled"
    assert R.parse_flags(["--loss_type", "ipo"], "dpo") == {"loss_type": ["ipo"]}  # a list field
    assert R.parse_flags(["--bf16", "false", "--seed", "3"], "dpo") == {"bf16": False, "seed": 3}


def test_rpo_alpha_and_sync_ref_model(pairs):
    m = R.from_trl("dpo", values={"dataset_name": pairs, "max_steps": 2, "rpo_alpha": 0.28,
                                  "sync_ref_model": True, "ref_model_sync_steps": 16,
                                  "ref_model_mixup_alpha": 0.5})  # fmt: skip
    c = m.config
    assert tuple(map(tuple, c.loss.combine)) == (("sigmoid", 1.0), ("sft", 0.28))
    assert (c.reference.mode, c.reference.sync_every, c.reference.sync_alpha) == (
        "frozen", 16, 0.5)  # fmt: skip


@pytest.mark.parametrize(
    "values, match",
    [
        ({"learning_rat": 1e-5}, r"`learning_rat`.*did you mean `learning_rate`"),
        ({"per_device_batch_size": 2}, r"`per_device_batch_size`.*`per_device_train_batch_size`"),
        ({"lr_scheduler_type": "polynomial"}, r"`lr_scheduler_type` = 'polynomial'"),
        ({"load_in_4bit": True}, r"`load_in_4bit` = True"),
        ({"optim": "adafactor"}, r"`optim` = 'adafactor'"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"`loss_weights`"),
        ({"loss_type": "sigmoidd"}, r"`loss_type`: unknown loss 'sigmoidd'"),
        ({"bf16": True, "fp16": True}, r"`bf16` and `fp16`"),
        ({"eval_strategy": "sometimes"}, r"`eval_strategy`"),
        ({"label_names": None, "optim_args": "x=1"}, r"`optim_args` = 'x=1'"),
        ({"use_weighting": True}, r"`use_weighting` = True.*WPO"),
    ],
)
def test_bad_recipes_name_the_field(pairs, values, match):
    with pytest.raises(ValueError, match=match):
        R.from_trl("dpo", values={"dataset_name": pairs, "max_steps": 2, **values})


@pytest.mark.parametrize("command", ["dpo", "sft", "kto"])
def test_every_trl_field_is_mapped_warned_or_refused(pairs, command):
    """No field is silently dropped: each field of the trainer's config, ModelConfig and
    ScriptArguments, set to a value other than TRL's default, shows in the mapping table, gets
    a warning naming it, or is refused with an error naming it."""
    fields = R._fields_of(command)
    silent = []
    for name, meta in sorted(fields.items()):
        if name in ("dataset_name", "max_steps", "output_dir", "model_name_or_path"):
            continue
        default = meta["default"]
        if isinstance(default, bool):
            value = not default
        elif isinstance(default, int):
            value = default + 3
        elif isinstance(default, float):
            value = default + 0.25
        elif isinstance(default, list):
            value = default + ["sft"] if name == "loss_type" else ["x"]
        else:
            value = "x"
        if name == "loss_type":
            value = {"dpo": ["sigmoid", "sft"], "kto": "apo_zero_unpaired", "sft": "dft"}[command]
        try:
            m = R.from_trl(command, values={"dataset_name": pairs, "max_steps": 2, name: value})
        except (ValueError, TypeError) as err:
            assert name in str(err), (name, str(err))
            continue
        if not (name in m.table() or any(f"`{name}`" in w for w in m.warnings)):
            silent.append(name)
    assert not silent, f"silently dropped TRL fields: {silent}"


def test_cli_dry_run_and_errors(tmp_path, pairs, capsys):
    recipe = write(tmp_path, f"dataset_name: {pairs}\nmax_steps: 2\nuse_vllm: true\n")
    assert cli.main(["dpo", "--config", str(recipe), "--dry-run", "--beta", "0.2",
                     "mesh.devices=1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "loss.beta = 0.2" in out and "alignjax config:" in out and "beta: 0.2" in out
    bad = write(tmp_path, f"dataset_name: {pairs}\nlearning_rat: 1.0e-5\n", "bad.json")
    bad.write_text(json.dumps({"dataset_name": pairs, "learning_rat": 1e-5}))
    assert cli.main(["dpo", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "`learning_rat`" in err and "`learning_rate`" in err


def test_no_meaning_fields_warn(pairs, caplog):
    with caplog.at_level(logging.WARNING):
        m = R.from_trl("dpo", values={"dataset_name": pairs, "max_steps": 2, "use_vllm": True,
                                      "deepspeed": "ds.json", "report_to": "wandb"})  # fmt: skip
    for name in ("use_vllm", "deepspeed", "report_to"):
        assert sum(f"`{name}`" in w for w in m.warnings) == 1
        assert f"`{name}`" in caplog.text


def test_sgd_has_no_momentum(pairs):
    """transformers' optim="sgd" is torch.optim.SGD(lr) (momentum 0); alignjax's sgd takes its
    momentum from optim.b1, so the mapping sets it to 0."""
    m = R.from_trl("dpo", values={"dataset_name": pairs, "max_steps": 2, "optim": "sgd"})
    assert (m.config.optim.name, m.config.optim.b1) == ("sgd", 0.0)
    by_epochs = R.from_trl("dpo", values={"dataset_name": pairs, "optim": "sgd",
                                          "num_train_epochs": 1}, overrides=MESH1)  # fmt: skip
    assert by_epochs.config.steps == math.ceil(50 / 8)  # counted over the dataset's rows


def test_label_smoothing_follows_trl_1_16(pairs):
    """TRL 1.16 ignores label_smoothing on sigmoid (alignjax's sigmoid would apply cDPO), and
    uses it on robust / exo_pair / aot."""
    base = {"dataset_name": pairs, "max_steps": 2, "label_smoothing": 0.1}
    m = R.from_trl("dpo", values=base)
    assert "label_smoothing" not in m.config.loss.kwargs
    assert any("`label_smoothing` = 0.1 is not used" in w for w in m.warnings)
    robust = R.from_trl("dpo", values={**base, "loss_type": "robust"})
    assert dict(robust.config.loss.kwargs) == {"label_smoothing": 0.1}
    with pytest.raises(ValueError, match="`label_smoothing`"):
        R.from_trl("dpo", values={**base, "loss_type": ["sigmoid", "robust"]})
