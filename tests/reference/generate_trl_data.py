"""Fixture from TRL's own preference-data pipeline: tokenization and truncation of trl==1.16.0.

TRL 1.16 tokenizes preference data in `DPOTrainer._prepare_dataset` (extract the implicit
prompt, append EOS to text completions, tokenize prompt and prompt+completion, split where they
diverge, drop rows whose prompt fills `max_length` under keep_start) and truncates in
`DataCollatorForPreference` (per sequence, to `max_length`, keep_start or keep_end). This script
runs both unchanged: for every (max_length, truncation_mode) it builds a real `DPOTrainer` on a
tiny random `LlamaForCausalLM` (vocabulary 512) with the shipped tokenizer, passing the row
groups as eval datasets so that `__init__` prepares them, and calls the trainer's own
`data_collator` on each prepared group. All token ids in the fixture come from TRL.

The rows are 13, in four groups (one `datasets.Dataset` each, as a dataset has one format):
standard text (three rows of alignjax/data/assets/reviews/train.jsonl, a prompt ending inside a
word so BPE merges across the boundary, and a long prompt that keep_start at max_length=24 drops),
implicit-prompt text, conversational (a system message, a multi-turn prompt, a long system
message) and implicit-prompt conversational. Each input row carries an extra `id` column so that
the rows TRL drops can be named; `_prepare_dataset` passes it through untouched.

The shipped files are read by path (the reference venv has no jax, so alignjax itself is not
imported). Run in a venv with torch==2.13.0 (CPU), trl==1.16.0 and transformers==5.23.0:
    python tests/reference/generate_trl_data.py
It rewrites tests/reference/fixtures/trl_data.json, recording the package versions and the
SHA-256 of the tokenizer files it used.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path

import datasets
import tokenizers
import torch
import transformers
import trl
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "alignjax" / "data" / "assets"
TOKENIZER = ASSETS / "tokenizer"
REVIEWS = ASSETS / "reviews" / "train.jsonl"
OUT = Path(__file__).resolve().parent / "fixtures" / "trl_data.json"
SEED = 20261122
REVIEW_LINES = (0, 3, 4)  # 0-based; 3 and 4 end mid-sentence ("... the room was")
CASES = [(None, "keep_start"), (None, "keep_end"), (24, "keep_start"), (24, "keep_end")]
MODEL = dict(
    vocab_size=512,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def hand_rows() -> dict[str, list[tuple[str, dict]]]:
    """(source, row) per group, besides the shipped reviews."""
    long_prompt = (
        "review of the hotel: we went on a friday with my partner. the room was small. the "
        "view was great. the staff was busy. the bed was"
    )
    system = _msg("system", "Be brief.")
    return {
        "text": [
            (
                "hand: the prompt ends inside a word (BPE merges 're' + 'al' with the completion)",
                {
                    "prompt": "review of the cafe: the staff was real",
                    "chosen": "ly friendly. we adored the decor.",
                    "rejected": "ly slow. the price was awful.",
                },
            ),
            (
                "hand: a prompt of >= 24 tokens (dropped by keep_start at max_length=24)",
                {
                    "prompt": long_prompt,
                    "chosen": " simple and clean.",
                    "rejected": " stale.",
                },
            ),
        ],
        "text_implicit": [
            (
                "hand: the texts diverge after a space (the space goes to the completions)",
                {
                    "chosen": "review of the bar: the music was loud. the beer was cold and cheap.",
                    "rejected": "review of the bar: the music was loud. the beer was warm.",
                },
            ),
            (
                "hand: the texts diverge inside a word ('d' is shared by both completions)",
                {
                    "chosen": "review of the inn: the food was delicious. we liked the price.",
                    "rejected": "review of the inn: the food was dreadful.",
                },
            ),
            (
                "hand: a longer shared prompt, completions of different lengths",
                {
                    "chosen": "review of the bakery: the waiter was small. the pasta was so tasty. "
                    "the dessert was perfect.",
                    "rejected": "review of the bakery: the waiter was small. the pasta was cold.",
                },
            ),
        ],
        "conversational": [
            (
                "hand: system + user prompt",
                {
                    "prompt": [system, _msg("user", "Review the cafe.")],
                    "chosen": [_msg("assistant", "the coffee was great. we liked the staff.")],
                    "rejected": [_msg("assistant", "bad.")],
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
                    "chosen": [_msg("assistant", "the bed was simple and the view was lovely.")],
                    "rejected": [_msg("assistant", "no idea.")],
                },
            ),
            (
                "hand: a long system message (prompt >= 24 tokens)",
                {
                    "prompt": [
                        _msg("system", "You are a terse critic of restaurants and hotels."),
                        _msg("user", "Review the bar."),
                    ],
                    "chosen": [_msg("assistant", "the music was loud.")],
                    "rejected": [_msg("assistant", "the beer was warm and the staff was rude.")],
                },
            ),
        ],
        "conversational_implicit": [
            (
                "hand: system + user, then one assistant message each",
                {
                    "chosen": [
                        system,
                        _msg("user", "Review the hotel."),
                        _msg("assistant", "the room was clean."),
                    ],
                    "rejected": [
                        system,
                        _msg("user", "Review the hotel."),
                        _msg("assistant", "the room was dirty and small."),
                    ],
                },
            ),
            (
                "hand: multi-turn, the last assistant message differs",
                {
                    "chosen": [
                        _msg("user", "Rate the cafe."),
                        _msg("assistant", "fine."),
                        _msg("user", "And the pasta?"),
                        _msg("assistant", "the pasta was delicious."),
                    ],
                    "rejected": [
                        _msg("user", "Rate the cafe."),
                        _msg("assistant", "fine."),
                        _msg("user", "And the pasta?"),
                        _msg("assistant", "cold."),
                    ],
                },
            ),
        ],
    }


def build_groups() -> dict[str, dict]:
    lines = REVIEWS.read_text().splitlines()
    groups = {name: {"sources": [], "rows": []} for name in hand_rows()}
    for i in REVIEW_LINES:
        row = json.loads(lines[i])
        groups["text"]["sources"].append(f"alignjax/data/assets/reviews/train.jsonl line {i}")
        groups["text"]["rows"].append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    for name, rows in hand_rows().items():
        for source, row in rows:
            groups[name]["sources"].append(source)
            groups[name]["rows"].append(row)
    return groups


def make_trainer(tokenizer, groups, max_length, truncation_mode, output_dir):
    """A real DPOTrainer whose __init__ runs `_prepare_dataset` on every group."""
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    # Passed explicitly: TRL would otherwise reload the reference from the policy's hub id.
    ref_model = LlamaForCausalLM(LlamaConfig(**MODEL))
    args = DPOConfig(
        output_dir=output_dir,
        max_length=max_length,
        truncation_mode=truncation_mode,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=SEED,
    )
    data = {
        name: datasets.Dataset.from_list([{"id": i, **row} for i, row in enumerate(group["rows"])])
        for name, group in groups.items()
    }
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=data["text"],
        eval_dataset=data,
        processing_class=tokenizer,
    )


def run_case(trainer, groups) -> dict:
    out = {}
    for name in groups:
        prepared = trainer.eval_dataset[name]
        examples = [
            {k: list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for ex in prepared
        ]
        batch = trainer.data_collator(examples)
        out[name] = {
            "kept": list(prepared["id"]),
            "text": [{k: ex[k] for k in ("prompt", "chosen", "rejected")} for ex in prepared],
            "tokenized": examples,
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "completion_mask": batch["completion_mask"].tolist(),
        }
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dumps(obj, indent: int = 0) -> str:
    """JSON with lists of scalars and messages on one line (a readable, small fixture)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and set(obj) != {"role", "content"}:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{inner}{dumps(v, indent + 1)}" for v in obj) + f"\n{pad}]"
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def main():
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    groups = build_groups()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for max_length, mode in CASES:
            trainer = make_trainer(tokenizer, groups, max_length, mode, tmp)
            assert trainer.data_collator.max_length == max_length
            assert trainer.data_collator.truncation_mode == mode
            result = run_case(trainer, groups)
            cases.append({"max_length": max_length, "truncation_mode": mode, "groups": result})
    # Tokenization does not depend on the lengths in TRL 1.16: record it once (from the first,
    # untruncated case) and check that every other case kept the same ids for its rows.
    for name, group in groups.items():
        full = cases[0]["groups"][name]
        assert full["kept"] == list(range(len(group["rows"]))), name
        group["trl_text"] = full["text"]
        group["trl"] = full["tokenized"]
        for case in cases:
            got = case["groups"][name]
            assert got.pop("text") == [group["trl_text"][i] for i in got["kept"]], name
            assert got.pop("tokenized") == [group["trl"][i] for i in got["kept"]], name
    dropped = {
        name: [i for i in range(len(g["rows"])) if i not in cases[2]["groups"][name]["kept"]]
        for name, g in groups.items()
    }
    assert any(dropped.values()), "no row is dropped at max_length=24 under keep_start"
    meta = {
        "generator": "tests/reference/generate_trl_data.py",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "seed": SEED,
        "model": {"class": "LlamaForCausalLM", **MODEL},
        "tokenizer": "alignjax/data/assets/tokenizer",
        "tokenizer_sha256": {f.name: sha256(f) for f in sorted(TOKENIZER.iterdir()) if f.is_file()},
        "pad_token_id": tokenizer.pad_token_id,
        "layout": "groups[g].trl_text[i]: row i's prompt/chosen/rejected as TRL tokenizes them "
        "(after extract_prompt and add_eos); groups[g].trl[i]: DPOTrainer._prepare_dataset's "
        "prompt_ids/chosen_ids/rejected_ids of row i; cases[c].groups[g]: the ids of the rows "
        "TRL kept ('kept') and DataCollatorForPreference's output on them ([chosen (kept); "
        "rejected (kept)] rows, right-padded with pad_token_id; completion_mask in input "
        "space, unshifted)",
    }
    fixture = {"meta": meta, "groups": groups, "cases": cases}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dumps(fixture) + "\n")
    n_rows = sum(len(g["rows"]) for g in groups.values())
    print(
        f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} KB; {n_rows} rows, {len(cases)} cases, "
        f"dropped at max_length=24 keep_start: {dropped}; trl {trl.__version__})"
    )


if __name__ == "__main__":
    main()
