"""Fixture from TRL's own trainers for every TRL dataset type: tokenization of trl==1.16.0.

`generate_trl_data.py` covers DPO preference rows; this script covers the other dataset types
TRL documents (language modeling, prompt-completion, prompt-only, unpaired preference), the
ShareGPT `conversations` shape, the UltraFeedback-binarized and HH-RLHF preference shapes, and a
paired dataset given to KTO. Every token id in the fixture comes from TRL's own code, run
unchanged on a tiny random `LlamaForCausalLM` (vocabulary 512) and the shipped tokenizer:

- SFT groups: a real `SFTTrainer` per group and `max_length` (the group is the train dataset, as
  `completion_only_loss` is decided from it). `SFTTrainer._prepare_dataset` converts ShareGPT
  rows to ChatML (`maybe_convert_to_chatml`), appends EOS to text, tokenizes, builds `labels`
  (-100 off the completion for prompt-completion rows), truncates to `max_length` and drops rows
  left fully masked. Truncation happens at preparation; `DataCollatorForLanguageModeling` only
  pads, so the prepared rows are recorded.
- prompt-only groups: a real `GRPOTrainer` (a constant reward function; nothing is generated);
  its `_tokenize_prompts` turns the dataset's `prompt` values into prompt ids, and TRL's `pad`
  left-pads them as `_generate_single_turn` does. GRPO 1.16 has no prompt truncation.
- DPO groups (UltraFeedback, HH-RLHF): a real `DPOTrainer` per `max_length`, groups passed as eval
  datasets so that `__init__` runs `_prepare_dataset`; its `DataCollatorForPreference` truncates,
  and its output on the prepared rows is recorded. `DPOTrainer` 1.16 only extracts a prompt when
  there is no `prompt` column (`extract_prompt`, not `maybe_extract_prompt`), so the
  UltraFeedback shape (a string `prompt` with message lists) fails inside `_prepare_dataset`;
  the fixture records that failure (from child processes with fixed PYTHONHASHSEED, as TRL's
  `is_conversational` picks the column it looks at from a set) and prepares the rows after
  `dataset.map(trl.maybe_extract_prompt)`, TRL's helper for this shape.
- KTO groups: a real `KTOTrainer` per `max_length` (loss "kto", so KL completions are built).
  `_prepare_dataset` extracts an implicit prompt, unpairs paired rows
  (`unpair_preference_dataset`), appends EOS, tokenizes, drops rows whose prompt fills
  `max_length`, and rotates completions for the KL term; `DataCollatorForUnpairedPreference`
  truncates (keep_start), and its output is recorded.

Rows come from alignjax/data/assets/reviews/{train,test,sft}.jsonl where they fit, plus hand-made
rows (a BPE merge across the prompt boundary, multi-turn prompts, and in each group rows long
enough that max_length 24 or 40 truncates or drops them; 40 because HH-RLHF's "\n\nHuman:" /
"\n\nAssistant:" markers take ~9 tokens each with this tokenizer, so every HH prompt fills 24).
Each input row gets an extra `id` column when given to a trainer, so that the rows TRL drops can
be named; the fixture's `rows` are the rows without it.

The shipped files are read by path (the reference venv has no jax, so alignjax itself is not
imported). Run in a venv with torch==2.13.0 (CPU), trl==1.16.0 and transformers==5.23.0:
    python tests/reference/generate_trl_shapes.py
It rewrites tests/reference/fixtures/trl_shapes.json, recording the package versions and the
SHA-256 of the tokenizer files it used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import datasets
import tokenizers
import torch
import transformers
import trl
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    SFTConfig,
    SFTTrainer,
    maybe_apply_chat_template,
    maybe_extract_prompt,
    unpair_preference_dataset,
)
from trl.trainer.utils import pad

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "alignjax" / "data" / "assets"
TOKENIZER = ASSETS / "tokenizer"
REVIEWS = ASSETS / "reviews"
OUT = Path(__file__).resolve().parent / "fixtures" / "trl_shapes.json"
SEED = 20261123
MAX_LENGTHS = (None, 24, 40)  # 40: the HH-RLHF prompts (25+ tokens) fill 24
HASH_SEEDS = (0, 1)  # PYTHONHASHSEED values for the UltraFeedback-direct child processes
MODEL = dict(
    vocab_size=512,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
TRAINERS = {
    "sft_text": "SFTTrainer",
    "sft_messages": "SFTTrainer",
    "sft_conversations": "SFTTrainer",
    "sft_conversations_human_gpt": "SFTTrainer",
    "sft_prompt_completion": "SFTTrainer",
    "sft_prompt_completion_conv": "SFTTrainer",
    "prompt_only": "GRPOTrainer",
    "prompt_only_conv": "GRPOTrainer",
    "ultrafeedback": "DPOTrainer",
    "hh_rlhf": "DPOTrainer",
    "unpaired": "KTOTrainer",
    "unpaired_conv": "KTOTrainer",
    "paired_for_kto": "KTOTrainer",
    "paired_for_kto_implicit": "KTOTrainer",
}
DATASET_TYPES = {
    "sft_text": "language modeling, standard (`text`)",
    "sft_messages": "language modeling, conversational (`messages`)",
    "sft_conversations": "language modeling, ShareGPT `conversations` with from/value keys and "
    "ChatML role names",
    "sft_conversations_human_gpt": "language modeling, ShareGPT `conversations` with the original "
    "ShareGPT role names 'human' / 'gpt' (maybe_convert_to_chatml renames keys, not roles)",
    "sft_prompt_completion": "prompt-completion, standard",
    "sft_prompt_completion_conv": "prompt-completion, conversational",
    "prompt_only": "prompt-only, standard",
    "prompt_only_conv": "prompt-only, conversational",
    "ultrafeedback": "preference, UltraFeedback-binarized shape: string `prompt`, `chosen` / "
    "`rejected` message lists starting with the same user message, `prompt_id`, `score_chosen`, "
    "`score_rejected`",
    "hh_rlhf": "preference with implicit prompt, standard: HH-RLHF '\\n\\nHuman: ... "
    "\\n\\nAssistant: ...' strings",
    "unpaired": "unpaired preference, standard (`prompt` / `completion` / `label`)",
    "unpaired_conv": "unpaired preference, conversational",
    "paired_for_kto": "preference, standard, explicit prompt, given to KTOTrainer (unpaired by "
    "TRL); the shipped rows' `chosen_score` / `rejected_score` and a `prompt_id` are extra "
    "columns",
    "paired_for_kto_implicit": "preference with implicit prompt (HH-RLHF strings) given to "
    "KTOTrainer (extract_prompt, then unpaired)",
}


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _fv(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def _line(split: str, i: int) -> dict:
    return json.loads((REVIEWS / f"{split}.jsonl").read_text().splitlines()[i])


LONG_PROMPT = (
    "review of the hotel: we went on a friday with my partner. the room was small. the view was "
    "great. the staff was busy. the bed was"
)
LONG_SYSTEM = _msg("system", "You are a terse critic of restaurants, bars, inns and hotels.")
HH_LONG = (
    "\n\nHuman: Review the hotel we stayed in last week, please.\n\nAssistant: Which one?"
    "\n\nHuman: The one by the station, with the small rooms and the busy staff."
    "\n\nAssistant:"
)


def build_groups() -> dict[str, list[tuple[str, dict]]]:
    """(source, row) per group."""
    t0, t1, te0 = _line("train", 0), _line("train", 1), _line("test", 0)
    s0, s1, s4 = _line("sft", 0)["text"], _line("sft", 1)["text"], _line("sft", 4)["text"]
    train = "alignjax/data/assets/reviews/train.jsonl line {}"
    return {
        "sft_text": [
            ("alignjax/data/assets/reviews/sft.jsonl line 0", {"text": s0}),
            ("alignjax/data/assets/reviews/sft.jsonl line 1", {"text": s1}),
            ("alignjax/data/assets/reviews/sft.jsonl line 4 (long)", {"text": s4}),
            ("hand: already ends with the EOS token (TRL adds none)", {"text": "fine.</s>"}),
        ],
        "sft_messages": [
            (
                "hand: user + assistant",
                {"messages": [_msg("user", "Review the cafe."), _msg("assistant", s1)]},
            ),
            (
                "hand: system + multi-turn",
                {
                    "messages": [
                        _msg("system", "Be brief."),
                        _msg("user", "Rate the inn."),
                        _msg("assistant", "good."),
                        _msg("user", "Why?"),
                        _msg("assistant", "the bed was simple."),
                    ]
                },
            ),
            (
                "hand: short (under 24 tokens)",
                {"messages": [_msg("user", "Hi."), _msg("assistant", "hello.")]},
            ),
        ],
        "sft_conversations": [
            (
                "hand: ShareGPT from/value, user + assistant",
                {"conversations": [_fv("user", "Review the bar."), _fv("assistant", s0)]},
            ),
            (
                "hand: ShareGPT from/value, system + multi-turn",
                {
                    "conversations": [
                        _fv("system", "Be brief."),
                        _fv("user", "Rate the cafe."),
                        _fv("assistant", "fine."),
                        _fv("user", "And the pasta?"),
                        _fv("assistant", "the pasta was delicious."),
                    ]
                },
            ),
            (
                "hand: short",
                {"conversations": [_fv("user", "Hi."), _fv("assistant", "hello.")]},
            ),
        ],
        "sft_conversations_human_gpt": [
            (
                "hand: ShareGPT's own role names",
                {"conversations": [_fv("human", "Rate the inn."), _fv("gpt", "good.")]},
            ),
        ],
        "sft_prompt_completion": [
            (
                train.format(0) + " (chosen as completion)",
                {"prompt": t0["prompt"], "completion": t0["chosen"]},
            ),
            (
                train.format(1) + " (rejected as completion)",
                {"prompt": t1["prompt"], "completion": t1["rejected"]},
            ),
            (
                "hand: the prompt ends inside a word (BPE merges across the boundary)",
                {"prompt": "review of the cafe: the staff was real", "completion": "ly friendly."},
            ),
            (
                "hand: a prompt of >= 24 tokens (fully masked at max_length=24: dropped)",
                {"prompt": LONG_PROMPT, "completion": " simple and clean."},
            ),
        ],
        "sft_prompt_completion_conv": [
            (
                "hand: system + user prompt",
                {
                    "prompt": [_msg("system", "Be brief."), _msg("user", "Review the cafe.")],
                    "completion": [_msg("assistant", "the coffee was great. we liked the staff.")],
                },
            ),
            (
                "hand: multi-turn prompt (user, assistant, user)",
                {
                    "prompt": [
                        _msg("user", "Rate the inn."),
                        _msg("assistant", "good."),
                        _msg("user", "Why?"),
                    ],
                    "completion": [
                        _msg("assistant", "the bed was simple and the view was lovely.")
                    ],
                },
            ),
            (
                "hand: a long system message (prompt >= 24 tokens: dropped at max_length=24)",
                {
                    "prompt": [LONG_SYSTEM, _msg("user", "Review the bar.")],
                    "completion": [_msg("assistant", "the music was loud.")],
                },
            ),
        ],
        "prompt_only": [
            (train.format(0) + " (prompt)", {"prompt": t0["prompt"]}),
            ("alignjax/data/assets/reviews/test.jsonl line 0 (prompt)", {"prompt": te0["prompt"]}),
            ("hand: short", {"prompt": "review of the inn:"}),
            ("hand: long (> 24 tokens)", {"prompt": LONG_PROMPT}),
        ],
        "prompt_only_conv": [
            ("hand: user", {"prompt": [_msg("user", "Review the cafe.")]}),
            (
                "hand: system + user",
                {"prompt": [_msg("system", "Be brief."), _msg("user", t1["prompt"])]},
            ),
            (
                "hand: ends with an assistant message (GRPO still adds the generation prompt)",
                {"prompt": [_msg("user", "Rate the inn."), _msg("assistant", "the bed was")]},
            ),
            (
                "hand: long system message",
                {"prompt": [LONG_SYSTEM, _msg("user", "Review the bar.")]},
            ),
        ],
        "ultrafeedback": [
            (
                train.format(0) + " in the UltraFeedback-binarized shape",
                {
                    "prompt": t0["prompt"],
                    "chosen": [_msg("user", t0["prompt"]), _msg("assistant", t0["chosen"])],
                    "rejected": [_msg("user", t0["prompt"]), _msg("assistant", t0["rejected"])],
                    "prompt_id": "5f2c1e0a9b",
                    "score_chosen": 8.0,
                    "score_rejected": 5.5,
                },
            ),
            (
                "hand: short",
                {
                    "prompt": "Rate the inn.",
                    "chosen": [_msg("user", "Rate the inn."), _msg("assistant", "good.")],
                    "rejected": [
                        _msg("user", "Rate the inn."),
                        _msg("assistant", "bad, the bed was old."),
                    ],
                    "prompt_id": "0d41a7",
                    "score_chosen": 7.25,
                    "score_rejected": 2.0,
                },
            ),
            (
                "hand: a user message of >= 24 tokens (dropped at max_length=24, keep_start)",
                {
                    "prompt": LONG_PROMPT,
                    "chosen": [_msg("user", LONG_PROMPT), _msg("assistant", "simple and clean.")],
                    "rejected": [_msg("user", LONG_PROMPT), _msg("assistant", "stale.")],
                    "prompt_id": "e9b3",
                    "score_chosen": 9.0,
                    "score_rejected": 1.5,
                },
            ),
        ],
        "hh_rlhf": [
            (
                train.format(1) + " as one HH-RLHF turn",
                {
                    "chosen": f"\n\nHuman: {t1['prompt']}\n\nAssistant:{t1['chosen']}",
                    "rejected": f"\n\nHuman: {t1['prompt']}\n\nAssistant:{t1['rejected']}",
                },
            ),
            (
                "hand: multi-turn; the answers diverge inside a word ('the b' is shared)",
                {
                    "chosen": "\n\nHuman: Rate the inn.\n\nAssistant: good.\n\nHuman: Why?"
                    "\n\nAssistant: the bed was simple.",
                    "rejected": "\n\nHuman: Rate the inn.\n\nAssistant: good.\n\nHuman: Why?"
                    "\n\nAssistant: the bar was loud.",
                },
            ),
            (
                "hand: a long multi-turn shared prefix (>= 24 tokens: dropped at max_length=24)",
                {"chosen": HH_LONG + " the room was clean.", "rejected": HH_LONG + " no idea."},
            ),
        ],
        "unpaired": [
            (
                train.format(0) + " (chosen, label True)",
                {"prompt": t0["prompt"], "completion": t0["chosen"], "label": True},
            ),
            (
                train.format(1) + " (rejected, label False)",
                {"prompt": t1["prompt"], "completion": t1["rejected"], "label": False},
            ),
            (
                "hand: the prompt ends inside a word (BPE merge)",
                {
                    "prompt": "review of the cafe: the staff was real",
                    "completion": "ly slow.",
                    "label": False,
                },
            ),
            (
                "hand: a prompt of >= 24 tokens (dropped at max_length=24)",
                {"prompt": LONG_PROMPT, "completion": " simple and clean.", "label": True},
            ),
        ],
        "unpaired_conv": [
            (
                "hand: system + user",
                {
                    "prompt": [_msg("system", "Be brief."), _msg("user", "Review the cafe.")],
                    "completion": [_msg("assistant", "the coffee was great.")],
                    "label": True,
                },
            ),
            (
                "hand: multi-turn prompt",
                {
                    "prompt": [
                        _msg("user", "Rate the inn."),
                        _msg("assistant", "good."),
                        _msg("user", "Why?"),
                    ],
                    "completion": [_msg("assistant", "no idea.")],
                    "label": False,
                },
            ),
            (
                "hand: a long system message (dropped at max_length=24)",
                {
                    "prompt": [LONG_SYSTEM, _msg("user", "Review the bar.")],
                    "completion": [_msg("assistant", "the music was loud and the beer was warm.")],
                    "label": True,
                },
            ),
        ],
        "paired_for_kto": [
            (
                train.format(0) + " (with its chosen_score / rejected_score)",
                {**t0, "prompt_id": "a0"},
            ),
            (
                train.format(1) + " (with its chosen_score / rejected_score)",
                {**t1, "prompt_id": "a1"},
            ),
            (
                "hand: a prompt of >= 24 tokens (both halves dropped at max_length=24)",
                {
                    "chosen": " simple and clean.",
                    "chosen_score": 2,
                    "prompt": LONG_PROMPT,
                    "rejected": " stale.",
                    "rejected_score": -2,
                    "prompt_id": "a2",
                },
            ),
        ],
        "paired_for_kto_implicit": [
            (
                "hand: one HH-RLHF turn",
                {
                    "chosen": "\n\nHuman: Rate the cafe.\n\nAssistant: the coffee was great. we "
                    "liked the staff and the music was lovely.",
                    "rejected": "\n\nHuman: Rate the cafe.\n\nAssistant: bad.",
                },
            ),
            (
                "hand: multi-turn, diverging inside a word",
                {
                    "chosen": "\n\nHuman: Rate the inn.\n\nAssistant: good.\n\nHuman: Why?"
                    "\n\nAssistant: the bed was simple.",
                    "rejected": "\n\nHuman: Rate the inn.\n\nAssistant: good.\n\nHuman: Why?"
                    "\n\nAssistant: the bar was loud.",
                },
            ),
        ],
    }


def with_ids(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"id": i, **row} for i, row in enumerate(rows)])


def tiny_model() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**MODEL))


def common(output_dir: str) -> dict:
    return dict(output_dir=output_dir, report_to="none", use_cpu=True, bf16=False, seed=SEED)


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


# ------------------------------------------------------------------------------------ SFT


def run_sft(tokenizer, rows, max_length, output_dir) -> tuple[dict, SFTTrainer]:
    torch.manual_seed(SEED)
    args = SFTConfig(max_length=max_length, **common(output_dir))
    trainer = SFTTrainer(
        model=tiny_model(), args=args, train_dataset=with_ids(rows), processing_class=tokenizer
    )
    prepared = trainer.train_dataset
    assert not trainer.args.packing and not trainer.padding_free
    out = {
        "kept": list(prepared["id"]),
        "input_ids": [list(x) for x in prepared["input_ids"]],
        "labels": [list(x) for x in prepared["labels"]],
    }
    return out, trainer


def sft_group(tokenizer, rows, output_dir) -> dict:
    cases = {}
    for max_length in MAX_LENGTHS:
        result, trainer = run_sft(tokenizer, rows, max_length, output_dir)
        if max_length is None:
            prepared = trainer.train_dataset
            columns = [c for c in prepared.column_names if c != "id"]
            text_cols = [c for c in ("text", "messages", "prompt", "completion") if c in columns]
            trl_text = [{c: ex[c] for c in text_cols} for ex in prepared]
            completion_only = trainer.completion_only_loss
        cases[str(max_length)] = result
    full = cases["None"]
    assert full["kept"] == list(range(len(rows)))
    for ex in trl_text:  # what the chat template renders (TRL's own helper; see `rendered_by`)
        if isinstance(ex.get("messages", ex.get("prompt")), list):
            ex["rendered"] = maybe_apply_chat_template(copy.deepcopy(ex), tokenizer)
    return {
        "prepared_columns": columns,
        "completion_only_loss": completion_only,
        "trl_text": trl_text,
        "trl": [
            {"input_ids": i, "labels": lab} for i, lab in zip(full["input_ids"], full["labels"])
        ],
        "cases": cases,
    }


# ------------------------------------------------------------------------------------ GRPO


def grpo_groups(tokenizer, groups, output_dir) -> dict:
    torch.manual_seed(SEED)
    args = GRPOConfig(
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        **common(output_dir),
    )
    data = {name: with_ids(groups[name]["rows"]) for name in ("prompt_only", "prompt_only_conv")}
    trainer = GRPOTrainer(
        model=tiny_model(),
        reward_funcs=constant_reward,
        args=args,
        train_dataset=data["prompt_only"],
        eval_dataset=data,
        processing_class=tokenizer,
    )
    out = {}
    for name, dataset in data.items():
        # The dataset is not prepared at init: `_generate_and_score_completions` reads
        # `x["prompt"]` of each input and `_generate` calls `_tokenize_prompts` on them.
        prompts = [x["prompt"] for x in dataset]
        prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
        assert images is None and not fields
        prompt_ids = [list(map(int, ids)) for ids in prompt_ids]
        tensors = [torch.tensor(ids) for ids in prompt_ids]
        padded = pad(tensors, padding_value=tokenizer.pad_token_id, padding_side="left")
        mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")
        if isinstance(prompts[0], list):  # the same call as _tokenize_prompts, tokenize=False
            texts = tokenizer.apply_chat_template(
                conversation=prompts,
                tools=trainer.tools or None,
                chat_template=trainer.chat_template,
                add_generation_prompt=True,
                tokenize=False,
                **trainer.chat_template_kwargs,
            )
            helper = [
                maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts
            ]
        else:
            texts, helper = prompts, prompts
        out[name] = {
            "trl_text": [
                {"prompt": t, "maybe_apply_chat_template": h} for t, h in zip(texts, helper)
            ],
            "trl": [{"prompt_ids": ids} for ids in prompt_ids],
            "prompt_ids_padded": padded.tolist(),
            "prompt_mask_padded": mask.tolist(),
        }
    return out


# ------------------------------------------------------------------------------------ DPO


def ultrafeedback_direct() -> dict:
    """Child process: UltraFeedback rows straight into DPOTrainer (fails in TRL 1.16)."""
    import traceback

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    rows = [row for _, row in build_groups()["ultrafeedback"]]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            DPOTrainer(
                model=tiny_model(),
                ref_model=tiny_model(),
                args=DPOConfig(max_length=None, **common(tmp)),
                train_dataset=with_ids(rows),
                processing_class=tokenizer,
            )
        except Exception as err:  # noqa: BLE001 - recorded, not hidden
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = frame.filename.split("site-packages/")[-1]
            return {"error": f"{type(err).__name__}: {err}", "at": f"{where}:{frame.lineno}"}
    return {"error": None}


def dpo_groups(tokenizer, groups, output_dir) -> dict:
    data = {
        # TRL's helper for this shape: the string prompt is replaced by the shared messages.
        "ultrafeedback": with_ids(groups["ultrafeedback"]["rows"]).map(maybe_extract_prompt),
        "hh_rlhf": with_ids(groups["hh_rlhf"]["rows"]),
    }
    after_extract = [
        {k: ex[k] for k in ("prompt", "chosen", "rejected")} for ex in data["ultrafeedback"]
    ]
    out = {name: {"cases": {}} for name in data}
    for max_length in MAX_LENGTHS:
        torch.manual_seed(SEED)
        trainer = DPOTrainer(
            model=tiny_model(),
            ref_model=tiny_model(),  # explicit: TRL would reload the policy's hub id
            args=DPOConfig(max_length=max_length, **common(output_dir)),
            train_dataset=data["hh_rlhf"],
            eval_dataset=data,
            processing_class=tokenizer,
        )
        assert trainer.data_collator.max_length == max_length
        assert trainer.data_collator.truncation_mode == "keep_start"
        for name in data:
            prepared = trainer.eval_dataset[name]
            examples = [
                {k: list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for ex in prepared
            ]
            case = {"kept": list(prepared["id"])}
            if examples:  # the collator fails on an empty list
                batch = trainer.data_collator(examples)
                for k in ("input_ids", "attention_mask", "completion_mask"):
                    case[k] = batch[k].tolist()
            if max_length is None:
                out[name]["prepared_columns"] = [c for c in prepared.column_names if c != "id"]
                trainer._set_signature_columns_if_needed()  # what the dataloader keeps
                out[name]["signature_columns"] = list(trainer._signature_columns)
                out[name]["remove_unused_columns"] = trainer.args.remove_unused_columns
                out[name]["trl_text"] = [
                    {k: ex[k] for k in ("prompt", "chosen", "rejected")} for ex in prepared
                ]
                out[name]["trl"] = examples
                if name == "ultrafeedback":
                    extra = ("prompt_id", "score_chosen", "score_rejected")
                    out[name]["extra_columns"] = [{k: ex[k] for k in extra} for ex in prepared]
            else:
                full = out[name]["trl"]
                assert examples == [full[i] for i in case["kept"]], name
            out[name]["cases"][str(max_length)] = case
    out["ultrafeedback"]["after_maybe_extract_prompt"] = after_extract
    return out


# ------------------------------------------------------------------------------------ KTO


KTO_NAMES = ("unpaired", "unpaired_conv", "paired_for_kto", "paired_for_kto_implicit")


def kto_groups(tokenizer, groups, output_dir) -> dict:
    data = {name: with_ids(groups[name]["rows"]) for name in KTO_NAMES}
    out = {name: {"cases": {}} for name in KTO_NAMES}
    for name in ("paired_for_kto", "paired_for_kto_implicit"):
        raw = datasets.Dataset.from_list(groups[name]["rows"])
        if "prompt" not in raw.column_names:  # as KTOTrainer._prepare_dataset
            raw = raw.map(trl.extract_prompt)
        unpaired = unpair_preference_dataset(raw)
        out[name]["trl_unpaired"] = [dict(ex) for ex in unpaired]
    for max_length in MAX_LENGTHS:
        torch.manual_seed(SEED)
        args = KTOConfig(max_length=max_length, per_device_train_batch_size=8, **common(output_dir))
        trainer = KTOTrainer(
            model=tiny_model(),
            ref_model=tiny_model(),
            args=args,
            train_dataset=data["unpaired"],
            eval_dataset=data,
            processing_class=tokenizer,
        )
        assert trainer.calculate_KL and trainer.data_collator.max_length == max_length
        for name in KTO_NAMES:
            prepared = trainer.eval_dataset[name]
            n_pairs = len(groups[name]["rows"])
            if name.startswith("paired"):  # unpaired row index: chosen block, then rejected block
                kept = [
                    i + (0 if lab else n_pairs) for i, lab in zip(prepared["id"], prepared["label"])
                ]
            else:
                kept = list(prepared["id"])
            keys = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
            examples = [{k: ex[k] for k in keys} for ex in prepared]
            case = {"kept": kept, "KL_completion_ids": [e["KL_completion_ids"] for e in examples]}
            if examples:  # the collator fails on an empty list
                batch = trainer.data_collator([copy.deepcopy(e) for e in examples])
                case.update({k: v.tolist() for k, v in batch.items()})
            if max_length is None:
                out[name]["prepared_columns"] = [c for c in prepared.column_names if c != "id"]
                text = ("prompt", "completion", "label")
                out[name]["trl_text"] = [{k: ex[k] for k in text} for ex in prepared]
                out[name]["trl"] = [
                    {k: ex[k] for k in ("prompt_ids", "completion_ids", "label")} for ex in prepared
                ]
                assert kept == list(range(len(prepared))), name
            else:
                full = out[name]["trl"]
                assert [{k: e[k] for k in full[0]} for e in examples] == [full[i] for i in kept]
            out[name]["cases"][str(max_length)] = case
    return out


# ------------------------------------------------------------------------------------ main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dumps(obj, indent: int = 0) -> str:
    """JSON with lists of scalars and messages on one line (a readable, small fixture)."""
    pad_, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and set(obj) not in ({"role", "content"}, {"from", "value"}):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad_}}}" if items else "{}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{inner}{dumps(v, indent + 1)}" for v in obj) + f"\n{pad_}]"
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def direct_runs() -> list[dict]:
    runs = []
    for seed in HASH_SEEDS:
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        proc = subprocess.run(
            [sys.executable, __file__, "--ultrafeedback-direct"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append({"PYTHONHASHSEED": seed, **result})
    return runs


LAYOUT = (
    "groups[g]: trainer, dataset_type, sources[i], rows[i] (the input rows; TRL also got an `id` "
    "column), trl_text[i] (what TRL tokenized: after maybe_convert_to_chatml / extract_prompt / "
    "add_eos; for conversational rows the messages, and `rendered` or `prompt` = the chat "
    "template's text), trl[i] (TRL's ids of row i at max_length=None), truncation (where TRL "
    "truncates), cases[str(max_length)] (kept = source rows TRL kept, in its order, and its ids). "
    "SFT: trl[i].input_ids and labels (input space, unshifted: -100 off the loss; the model "
    "shifts), cases.*.input_ids/labels per kept row, already truncated by _prepare_dataset. "
    "GRPO: trl[i].prompt_ids from _tokenize_prompts, prompt_ids_padded/prompt_mask_padded "
    "left-padded by trl's pad. DPO: trl[i].prompt_ids/chosen_ids/rejected_ids; cases.* = "
    "DataCollatorForPreference's [chosen (kept); rejected (kept)] input_ids/attention_mask/"
    "completion_mask (input space; absent when no row is kept); prepared_columns = the prepared "
    "dataset's columns (our `id` left out), signature_columns = what the Trainer's dataloader "
    "keeps of them (remove_unused_columns); ultrafeedback: after_maybe_extract_prompt (the rows "
    "after dataset.map(trl.maybe_extract_prompt)), extra_columns (prompt_id / score_chosen / "
    "score_rejected as prepared), dpo_trainer_direct (DPOTrainer on the raw rows: the error and "
    "where, per PYTHONHASHSEED). KTO: trl[i].prompt_ids/completion_ids/label for the unpaired "
    "rows in TRL's order (paired groups: trl_unpaired[i] = unpair_preference_dataset's rows, "
    "before EOS; kept indexes them); cases.* = DataCollatorForUnpairedPreference's input_ids/"
    "attention_mask/completion_mask, KL_input_ids/KL_attention_mask/KL_completion_mask (the KL "
    "completion of kept row k is the completion of kept row k-1, rotated within batches of "
    "per_device_train_batch_size=8), label."
)


def main():
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    groups = {
        name: {
            "trainer": TRAINERS[name],
            "dataset_type": DATASET_TYPES[name],
            "sources": [s for s, _ in rows],
            "rows": [r for _, r in rows],
        }
        for name, rows in build_groups().items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups.values():
            if group["trainer"] == "SFTTrainer":
                group.update(sft_group(tokenizer, group["rows"], tmp))
                group["truncation"] = (
                    "SFTTrainer._prepare_dataset (input_ids and labels sliced to max_length, "
                    "keep_start; rows whose labels are then all -100 are dropped); the collator "
                    "only pads"
                )
        for name, result in grpo_groups(tokenizer, groups, tmp).items():
            groups[name].update(result)
            groups[name]["truncation"] = (
                "none: GRPOConfig 1.16 has no max_prompt_length and _tokenize_prompts never "
                "truncates (max_length does not apply to prompts)"
            )
        for name, result in dpo_groups(tokenizer, groups, tmp).items():
            groups[name].update(result)
            groups[name]["truncation"] = (
                "DataCollatorForPreference (per sequence, keep_start); _prepare_dataset drops rows "
                "whose prompt_ids fill max_length"
            )
        for name, result in kto_groups(tokenizer, groups, tmp).items():
            groups[name].update(result)
            groups[name]["truncation"] = (
                "DataCollatorForUnpairedPreference (prompt+completion and prompt+KL completion "
                "cut to max_length, keep_start; KTOConfig has no truncation_mode); "
                "_prepare_dataset drops rows whose prompt_ids fill max_length"
            )
    direct = direct_runs()
    assert all(run["error"] for run in direct), direct
    groups["ultrafeedback"]["dpo_trainer_direct"] = direct
    meta = {
        "generator": "tests/reference/generate_trl_shapes.py",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "seed": SEED,
        "max_lengths": list(MAX_LENGTHS),
        "truncation_mode": "keep_start (TRL's default; keep_end is deprecated in SFT/DPO 1.16 and "
        "absent from KTO)",
        "model": {"class": "LlamaForCausalLM", **MODEL},
        "tokenizer": "alignjax/data/assets/tokenizer",
        "tokenizer_sha256": {f.name: sha256(f) for f in sorted(TOKENIZER.iterdir()) if f.is_file()},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token": tokenizer.eos_token,
        "trainer_config": {
            "SFTTrainer": "SFTConfig(max_length=...) defaults otherwise: no packing, no "
            "padding_free, completion_only_loss=None (on for prompt-completion), "
            "assistant_only_loss=False, shuffle_dataset=False",
            "GRPOTrainer": "GRPOConfig(num_generations=2, per_device_train_batch_size=2, "
            "max_completion_length=8), reward_funcs=constant_reward; nothing generated",
            "DPOTrainer": "DPOConfig(max_length=...), ref_model given",
            "KTOTrainer": "KTOConfig(max_length=..., per_device_train_batch_size=8), loss_type "
            "'kto' (KL on), ref_model given",
        },
        "rendered_by": "trl_text[i].rendered / maybe_apply_chat_template: trl.maybe_apply_chat_"
        "template's text, recorded for reading; SFT/KTO/DPO tokenize the messages themselves "
        "(_tokenize -> apply_chat_template(tokenize=True)), GRPO with add_generation_prompt=True "
        "even after an assistant message, where maybe_apply_chat_template continues the message",
        "not_built": "every trainer was built; the UltraFeedback shape cannot be prepared by "
        "DPOTrainer directly (groups.ultrafeedback.dpo_trainer_direct), so its ids come from "
        "DPOTrainer on dataset.map(trl.maybe_extract_prompt)",
        "layout": LAYOUT,
    }
    fixture = {"meta": meta, "groups": groups}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dumps(fixture) + "\n")
    n_rows = sum(len(g["rows"]) for g in groups.values())
    dropped = {
        f"{name}@{n}": [i for i in range(len(g["trl"])) if i not in case["kept"]]
        for name, g in groups.items()
        for n, case in g.get("cases", {}).items()
        if n != "None"
    }
    print(
        f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} KB; {n_rows} rows in {len(groups)} "
        f"groups; dropped: {dropped}; trl {trl.__version__})"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--ultrafeedback-direct"]:
        print(json.dumps(ultrafeedback_direct()))
    else:
        main()
