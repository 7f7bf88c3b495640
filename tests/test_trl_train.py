"""TRL recipes and TRL dataset shapes through the trainer (the runs are marked slow).

- A DPO recipe written as TRL would write it (`model_name_or_path` a local HF checkpoint with
  its tokenizer, `dataset_name` a local folder of JSONL) run by `alignjax dpo --config` gives,
  step by step, the same losses as the same run configured natively (bitwise: the same program
  on the same data; any difference would be a mapping difference).
- Every TRL dataset type that a present alignjax task trains on (language modeling and
  prompt-completion for SFT, standard and conversational; preference with explicit and implicit
  prompt, the UltraFeedback-binarized shape, HH-RLHF's text; unpaired preference, and paired
  rows given to KTO, which unpairs them as TRL does) loads from a JSONL file, a parquet file and
  a `save_to_disk` directory and trains for two steps with finite losses. The run directory has
  the data report (`data_report.json`).
"""

import json
import math
import shutil

import datasets
import numpy as np
import pytest
from flax import nnx

from alignjax import cli, data, models
from alignjax.train import config as C
from alignjax.train import metrics
from alignjax.train.builders import PRESETS


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved as transformers saves one, with the shipped tokenizer."""
    out = tmp_path_factory.mktemp("base")
    tok = data.shipped_tokenizer()
    arch = models.LlamaConfig(vocab_size=len(tok), **PRESETS["tiny"])
    models.save_pretrained(models.LlamaForCausalLM(arch, rngs=nnx.Rngs(0)), out)
    tok.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_dpo_recipe_losses_equal_the_native_run(tmp_path, checkpoint):
    rows = [json.loads(x) for x in (data.synthetic.ASSETS / "reviews" / "train.jsonl")
            .read_text().splitlines()[:24]]  # fmt: skip
    pairs = tmp_path / "pairs"  # a folder of data files, as `trl dpo --dataset_name` reads
    pairs.mkdir()
    (pairs / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"""# a TRL DPO recipe (trl dpo --config dpo.yaml)
model_name_or_path: {checkpoint}
dataset_name: {pairs}
output_dir: {tmp_path / "trl"}
per_device_train_batch_size: 4
learning_rate: 1.0e-4
lr_scheduler_type: cosine
warmup_steps: 1
max_steps: 4
logging_steps: 1
max_length: 64
beta: 0.2
loss_type: [sigmoid, ipo]
loss_weights: [0.8, 0.2]
report_to: none
""")
    assert cli.main(["dpo", "--config", str(recipe), "--no-progress", "mesh.devices=1",
                     "eval_samples=0", "plot=false"]) == 0  # fmt: skip
    native = C.from_dict(C.TrainConfig, {
        "task": "paired", "steps": 4, "seed": 42, "out_dir": str(tmp_path / "native"),
        "log_every": 1, "eval_samples": 0, "plot": False,
        "model": {"path": str(checkpoint), "dtype": "bfloat16", "remat": True},
        "data": {"train": f"{pairs}::train", "eval": None, "tokenizer": "model",
                 "max_length": 64, "batch_size": 4, "eval_batch_size": 8, "seed": 42},
        "loss": {"beta": 0.2, "combine": [["sigmoid", 0.8], ["ipo", 0.2]]},
        "optim": {"learning_rate": 1e-4, "schedule": "cosine", "warmup_steps": 1,
                  "weight_decay": 0.0, "clip_norm": 1.0},
        "checkpoint": {"every": 500, "keep": 1},
        "mesh": {"devices": 1},
    })  # fmt: skip
    from alignjax.train.trainer import train

    train(native, progress=False)
    got = [r for r in metrics.read_jsonl(tmp_path / "trl" / "metrics.jsonl") if "train/loss" in r]
    want = [r for r in metrics.read_jsonl(tmp_path / "native" / "metrics.jsonl")
            if "train/loss" in r]  # fmt: skip
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["step"] == w["step"]
        assert g["train/loss"] == w["train/loss"]
        assert math.isfinite(g["train/loss"])
    mapped = C.load_config(tmp_path / "trl" / "config.yaml")
    assert C.to_dict(mapped) | {"out_dir": None} == C.to_dict(native) | {"out_dir": None}


def _lines(name, n):
    path = data.synthetic.ASSETS / "reviews" / name
    return [json.loads(x) for x in path.read_text().splitlines()[:n]]


def _shapes():
    reviews, texts = _lines("train.jsonl", 12), _lines("sft.jsonl", 12)
    conv = [
        {"prompt": [_u(r["prompt"])], "chosen": [_a(r["chosen"])], "rejected": [_a(r["rejected"])]}
        for r in reviews
    ]
    sides = ("chosen", "rejected")
    shapes = {
        "sft_text": ("sft", [{"text": t["text"]} for t in texts]),
        "sft_messages": ("sft", [{"messages": c["prompt"] + c["chosen"]} for c in conv]),
        "sft_prompt_completion": (
            "sft",
            [{"prompt": r["prompt"], "completion": r["chosen"]} for r in reviews],
        ),
        "sft_prompt_completion_conv": (
            "sft",
            [{"prompt": c["prompt"], "completion": c["chosen"]} for c in conv],
        ),
        "paired": ("paired", reviews),
        "paired_conv": ("paired", conv),
        "paired_for_kto": ("unpaired", reviews),
    }
    shapes["sft_conversations"] = ("sft", [
        {"conversations": [{"from": "user", "value": r["prompt"]},
                           {"from": "assistant", "value": r["chosen"]}]}
        for r in reviews
    ])  # fmt: skip
    shapes["paired_implicit"] = ("paired", [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in reviews
    ])  # fmt: skip
    shapes["ultrafeedback"] = ("paired", [
        {"prompt": r["prompt"], "prompt_id": f"id{i}",
         "chosen": [_u(r["prompt"]), _a(r["chosen"])],
         "rejected": [_u(r["prompt"]), _a(r["rejected"])],
         "messages": [_u(r["prompt"]), _a(r["chosen"])],
         "score_chosen": 8.0, "score_rejected": 2.5}
        for i, r in enumerate(reviews)
    ])  # fmt: skip
    shapes["hh_rlhf"] = ("paired", [
        {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
         "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"}
        for r in reviews
    ])  # fmt: skip
    shapes["unpaired"] = ("unpaired", [
        {"prompt": r["prompt"], "completion": r[s], "label": s == "chosen"}
        for r in reviews for s in sides
    ])  # fmt: skip
    shapes["unpaired_conv"] = ("unpaired", [
        {"prompt": c["prompt"], "completion": c[s], "label": s == "chosen"}
        for c in conv for s in sides
    ])  # fmt: skip
    return shapes


SHAPES = _shapes()


def _write(kind, rows, directory):
    ds = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        path = directory / "rows.jsonl"
        ds.to_json(str(path))
    elif kind == "parquet":
        path = directory / "rows.parquet"
        ds.to_parquet(str(path))
    else:
        path = directory / "saved"
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_trl_dataset_shapes_load_the_same_from_every_file_kind(shape, tmp_path):
    task, rows = SHAPES[shape]
    tok = data.shipped_tokenizer()
    got = {}
    for kind in ("jsonl", "parquet", "disk"):
        d = tmp_path / kind
        d.mkdir()
        raw = data.load_preference_dataset(_write(kind, rows, d))
        if shape == "paired_for_kto":
            raw = data.unpair_preference_dataset(raw)
        tokenized = data.tokenize_dataset(raw, tok, config=data.TokenizeConfig(max_length=64))
        assert tokenized.report.n_skipped == 0, tokenized.report
        got[kind] = [dict(tokenized[i]) for i in range(len(tokenized))]
    assert got["jsonl"] == got["parquet"] == got["disk"]
    if shape == "ultrafeedback":
        assert got["jsonl"][3]["prompt_id"] == "id3" and got["jsonl"][0]["score_chosen"] == 8.0


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_trl_dataset_shapes_train(shape, tmp_path):
    task, rows = SHAPES[shape]
    path = _write("jsonl", rows, tmp_path)
    loss = {"sft": "sft", "paired": "sigmoid", "unpaired": "kto"}[task]
    cfg = C.from_dict(C.TrainConfig, {
        "task": task, "steps": 2, "out_dir": str(tmp_path / "run"), "log_every": 1,
        "eval_samples": 0, "plot": False,
        "data": {"train": str(path), "eval": None, "max_length": 64, "batch_size": 4},
        "loss": {"name": loss}, "checkpoint": {"every": 100, "keep": 1, "export_hf": False},
        "mesh": {"devices": 1},
    })  # fmt: skip
    from alignjax.train.trainer import train

    train(cfg, progress=False)
    losses = [r["train/loss"] for r in metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
              if "train/loss" in r]  # fmt: skip
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    expected_rows = 2 * len(rows) if shape == "paired_for_kto" else len(rows)
    assert report["train"]["total"] == report["train"]["kept"] == expected_rows
    shutil.rmtree(tmp_path / "run")
