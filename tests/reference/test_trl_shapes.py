"""alignjax's tokenization of every TRL dataset type against TRL 1.16.0's own trainers
(tests/reference/generate_trl_shapes.py): `SFTTrainer._prepare_dataset` (language modeling:
`text`, `messages`, ShareGPT `conversations`; prompt-completion, standard and conversational),
`GRPOTrainer._tokenize_prompts` (prompt-only), `DPOTrainer._prepare_dataset` with
`DataCollatorForPreference` (the UltraFeedback-binarized and HH-RLHF shapes) and
`KTOTrainer._prepare_dataset` with `DataCollatorForUnpairedPreference` (unpaired rows, and
paired rows that TRL unpairs), with the shipped tokenizer.

Token ids are compared exactly, and so are the rows kept at each max_length (a row TRL drops is
a row alignjax skips and counts). Masks: TRL's SFT `labels` and DPO / KTO `completion_mask` are
in input space (the model shifts them by one); alignjax's loss_mask is in label space
(loss_mask[:, t] = 1 iff token t + 1 is trained on), so loss_mask[:, :-1] must equal
mask[:, 1:].

Tests of the newer alignjax features (prompt-only rows, the UltraFeedback shape, ShareGPT
`conversations`, `unpair_preference_dataset`) are named after them. Where alignjax differs from
TRL by design, a test says so in its name and checks the difference itself.
"""

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from alignjax.data import (
    RowError,
    TokenizeConfig,
    collate,
    detect_format,
    load_preference_dataset,
    normalize_row,
    shipped_tokenizer,
    tokenize_dataset,
    unpair_preference_dataset,
)
from alignjax.data.batching import collate_prompts
from alignjax.data.synthetic import ASSETS

FIXTURE = json.loads((Path(__file__).resolve().parent / "fixtures" / "trl_shapes.json").read_text())
GROUPS = FIXTURE["groups"]
SIDES = ("chosen", "rejected")
IGNORE = -100


def by_trainer(*trainers, exclude=()):
    return [g for g, v in GROUPS.items() if v["trainer"] in trainers and g not in exclude]


SFT = by_trainer("SFTTrainer", exclude=("sft_conversations_human_gpt",))
PROMPT_ONLY = by_trainer("GRPOTrainer")
DPO = by_trainer("DPOTrainer")
KTO = by_trainer("KTOTrainer")
KTO_PAIRED = [g for g in KTO if g.startswith("paired")]


def cases(groups):
    out = []
    for g in groups:
        for key in GROUPS[g]["cases"]:
            out.append(pytest.param(g, None if key == "None" else int(key), id=f"{g}-{key}"))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return shipped_tokenizer()


def source_dataset(group):
    """The dataset alignjax tokenizes: the group's rows, unpaired first for the KTO paired
    groups (TRL's KTOTrainer unpairs them)."""
    data = datasets.Dataset.from_list(GROUPS[group]["rows"])
    return unpair_preference_dataset(data) if group in KTO_PAIRED else data


def tokenize(tokenizer, group, max_length=None, on_error="raise", data=None):
    data = source_dataset(group) if data is None else data
    config = TokenizeConfig(max_length=max_length)
    return tokenize_dataset(data, tokenizer, config=config, on_error=on_error)


def tokenize_case(tokenizer, group, max_length):
    """alignjax's rows at `max_length` (bad rows skipped): (tokenized or None, kept rows)."""
    try:
        tokenized = tokenize(tokenizer, group, max_length, on_error="skip")
    except ValueError as err:
        if "every row was skipped" not in str(err):
            raise
        return None, []
    return tokenized, list(tokenized.dataset["row"])


def check_kept(tokenized, kept, case, group, max_length):
    """The rows kept are TRL's, and no kept sequence is longer than max_length."""
    lengths = [] if tokenized is None else list(tokenized.dataset["length"])
    assert kept == case["kept"], (group, max_length, "alignjax kept", kept, "lengths", lengths,
                                  "TRL kept", case["kept"])  # fmt: skip
    if max_length is not None and lengths:
        assert max(lengths) <= max_length, (group, max_length, "lengths", lengths)
    if tokenized is not None:
        assert tokenized.report.n_skipped == tokenized.report.total - len(kept)


def with_eos(text, eos):
    return text if text.endswith(eos) else text + eos


def padded(rows, width, value):
    out = np.full((len(rows), width), value, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def check_label_space(batch, completion):
    """alignjax's label-space loss mask against TRL's input-space completion mask."""
    want = np.zeros_like(completion)
    want[:, :-1] = completion[:, 1:]
    np.testing.assert_array_equal(batch.loss_mask, want)
    on = want[:, :-1] == 1
    np.testing.assert_array_equal(batch.labels[:, :-1][on], batch.input_ids[:, 1:][on])


# --------------------------------------------------------------------------- provenance


def test_fixture_was_made_with_the_shipped_tokenizer():
    for name, digest in FIXTURE["meta"]["tokenizer_sha256"].items():
        got = hashlib.sha256((ASSETS / "tokenizer" / name).read_bytes()).hexdigest()
        assert got == digest, (
            f"alignjax/data/assets/tokenizer/{name} changed since the fixture was made; "
            "regenerate it with tests/reference/generate_trl_shapes.py"
        )
    assert FIXTURE["meta"]["trl"] == "1.16.0"
    trainers = {g["trainer"] for g in GROUPS.values()}
    assert trainers == {"SFTTrainer", "GRPOTrainer", "DPOTrainer", "KTOTrainer"}


def full_lengths(g):
    """Untruncated length of each sequence TRL prepared (max_length=None)."""
    if "cases" not in g:
        return []
    out = []
    for r in g["trl"]:
        if "input_ids" in r:
            out.append(len(r["input_ids"]))
        elif "completion_ids" in r:
            out.append(len(r["prompt_ids"]) + len(r["completion_ids"]))
        else:
            out.append(max(len(r["prompt_ids"]) + len(r[f"{s}_ids"]) for s in SIDES))
    return out


def test_fixture_truncates_and_drops_rows():
    """Each group with cases has a max_length that cuts a kept row, and most drop a row."""
    for name, g in GROUPS.items():
        full = full_lengths(g)
        if not full:
            continue
        cut = False
        for key, case in g["cases"].items():
            if key == "None" or not case["kept"]:
                continue
            if "labels" in case:
                got = [len(x) for x in case["input_ids"]]
            else:
                got = [sum(m) for m in case["attention_mask"]]
            cut |= any(n < full[i] for i, n in zip(case["kept"], got))
        assert cut, name
    dropped = [
        g
        for g in GROUPS.values()
        if full_lengths(g) and len(g["cases"]["24"]["kept"]) < len(g["trl"])
    ]
    assert len(dropped) >= 6


# --------------------------------------------------------------------------- SFT


SFT_KINDS = {
    "sft_text": ("language_modeling", False),
    "sft_messages": ("language_modeling", True),
    "sft_conversations": ("language_modeling", True),
    "sft_prompt_completion": ("prompt_completion", False),
    "sft_prompt_completion_conv": ("prompt_completion", True),
}


@pytest.mark.parametrize("group", SFT)
def test_sft_format(group):
    rows = GROUPS[group]["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    assert (fmt.kind, fmt.conversational) == SFT_KINDS[group]
    assert GROUPS[group]["completion_only_loss"] == (fmt.kind == "prompt_completion")


@pytest.mark.parametrize("group", SFT)
def test_sft_normalized_text_matches_trl(group, tokenizer):
    """What TRL tokenizes: the text with EOS (unless present), ChatML messages, prompt and
    completion (EOS on standard completions)."""
    rows = GROUPS[group]["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    eos = tokenizer.eos_token
    for i, (row, want) in enumerate(zip(rows, GROUPS[group]["trl_text"])):
        got = normalize_row(row, i, fmt)
        if "text" in want:
            assert with_eos(got["text"], eos) == want["text"], (group, i)
        elif "messages" in want:
            assert got["messages"] == want["messages"], (group, i)
        else:
            assert got["prompt"] == want["prompt"], (group, i)
            completion = (
                got["completion"] if fmt.conversational else with_eos(got["completion"], eos)
            )
            assert completion == want["completion"], (group, i)


@pytest.mark.parametrize(("group", "max_length"), cases(SFT))
def test_sft_ids_and_masks_match_trl(group, max_length, tokenizer):
    """SFTTrainer truncates at preparation (keep_start) and drops rows left fully masked."""
    case = GROUPS[group]["cases"][str(max_length)]
    tokenized, kept = tokenize_case(tokenizer, group, max_length)
    check_kept(tokenized, kept, case, group, max_length)
    for k, (got, ids, labels) in enumerate(zip(tokenized, case["input_ids"], case["labels"])):
        row = case["kept"][k]
        assert list(got["input_ids"]) == ids, (group, row, list(got["input_ids"]), ids)
        n_prompt = next((t for t, lab in enumerate(labels) if lab != IGNORE), len(labels))
        assert got["prompt_length"] == n_prompt, (group, row, got["prompt_length"], n_prompt)
        assert all(lab == t for lab, t in zip(labels[n_prompt:], ids[n_prompt:]))
    width = max(len(x) for x in case["input_ids"])
    batch = collate(list(tokenized), width, pad_id=tokenized.pad_id)
    np.testing.assert_array_equal(
        batch.input_ids, padded(case["input_ids"], width, tokenized.pad_id)
    )
    trained = (padded(case["labels"], width, IGNORE) != IGNORE).astype(np.int64)
    check_label_space(batch, trained)


def test_sharegpt_conversations_are_converted_like_trl():
    """NEW: ShareGPT `conversations` (from/value) read as conversational language modeling,
    converted as TRL's maybe_convert_to_chatml."""
    rows = GROUPS["sft_conversations"]["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    assert fmt.kind == "language_modeling" and fmt.conversational and fmt.chatml
    assert GROUPS["sft_conversations"]["prepared_columns"][0] == "messages"


def test_sharegpt_human_gpt_roles_differ_from_trl(tokenizer):
    """By design: TRL renames the keys only, so ShareGPT's own roles 'human' / 'gpt' reach the
    chat template and render as `<|human|>` / `<|gpt|>`; alignjax rejects roles outside
    system/user/assistant/tool (a RowError naming the row) instead of training on them."""
    g = GROUPS["sft_conversations_human_gpt"]
    assert [m["role"] for m in g["trl_text"][0]["messages"]] == ["human", "gpt"]
    assert "<|human|>" in g["trl_text"][0]["rendered"]["text"]
    with pytest.raises(RowError) as err:
        tokenize(tokenizer, "sft_conversations_human_gpt")
    assert err.value.row == 0 and "human" in str(err.value)


# --------------------------------------------------------------------------- prompt-only


@pytest.mark.parametrize("group", PROMPT_ONLY)
def test_prompt_only_matches_grpo(group, tokenizer):
    """NEW kind "prompt_only": GRPOTrainer._tokenize_prompts (special tokens added for text;
    the chat template with the generation prompt for messages), left-padded for generation."""
    g = GROUPS[group]
    rows = g["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    assert fmt.kind == "prompt_only"
    assert fmt.conversational == group.endswith("_conv")
    tokenized = tokenize(tokenizer, group)
    assert tokenized.format.kind == "prompt_only" and tokenized.report.n_skipped == 0
    for i, (got, want) in enumerate(zip(tokenized, g["trl"], strict=True)):
        assert list(got["input_ids"]) == want["prompt_ids"], (group, i)
        assert got["prompt_length"] == len(want["prompt_ids"]), (group, i)
    width = len(g["prompt_ids_padded"][0])
    ids, mask = collate_prompts(list(tokenized), width, pad_id=tokenized.pad_id)
    np.testing.assert_array_equal(ids, g["prompt_ids_padded"])
    np.testing.assert_array_equal(mask, g["prompt_mask_padded"])


@pytest.mark.parametrize("group", PROMPT_ONLY)
def test_prompt_only_truncation_is_alignjax_only(group, tokenizer):
    """By design: GRPO 1.16 never truncates prompts (no max_prompt_length); alignjax keeps the
    last `max_prompt_length` tokens of a prompt-only row, as of every prompt, and leaves
    `max_length` (prompt plus completion) to the rollout."""
    assert GROUPS[group]["truncation"].startswith("none")
    rows = GROUPS[group]["rows"]
    data = datasets.Dataset.from_list(rows)
    tokenized = tokenize_dataset(data, tokenizer, config=TokenizeConfig(max_prompt_length=24))
    untouched = tokenize_dataset(data, tokenizer, config=TokenizeConfig(max_length=24))
    longer = 0
    for got, same, want in zip(tokenized, untouched, GROUPS[group]["trl"], strict=True):
        ids = want["prompt_ids"]
        assert list(got["input_ids"]) == ids[-24:]
        assert list(same["input_ids"]) == ids
        longer += len(ids) > 24
    assert longer >= 1


def test_ultrafeedback_is_paired_conversational_with_extracted_prompt(tokenizer):
    """NEW: the UltraFeedback-binarized shape is read as conversational paired rows whose prompt
    is what chosen and rejected share (TRL's maybe_extract_prompt); the string prompt column is
    not used. (DPOTrainer 1.16 itself fails on this shape: see dpo_trainer_direct.)"""
    g = GROUPS["ultrafeedback"]
    assert all(run["error"] for run in g["dpo_trainer_direct"])
    rows = g["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    assert fmt.kind == "paired" and fmt.conversational
    assert set(fmt.extra_fields) == {"prompt_id", "score_chosen", "score_rejected"}
    for i, (row, want) in enumerate(zip(rows, g["after_maybe_extract_prompt"])):
        got = normalize_row(row, i, fmt)
        for field in ("prompt", "chosen", "rejected"):
            assert got[field] == want[field], (i, field)
    tokenized = tokenize(tokenizer, "ultrafeedback")
    assert tokenized.format.kind == "paired" and tokenized.format.conversational
    assert tokenized.report.n_skipped == 0
    for i, (got, extra) in enumerate(zip(tokenized, g["extra_columns"], strict=True)):
        assert {k: got[k] for k in extra} == extra, i


def test_hh_rlhf_is_implicit_prompt_text():
    rows = GROUPS["hh_rlhf"]["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    assert (fmt.kind, fmt.conversational, fmt.implicit_prompt) == ("paired", False, True)


@pytest.mark.parametrize("group", DPO)
def test_dpo_normalized_text_matches_trl(group, tokenizer):
    rows = GROUPS[group]["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    for i, (row, want) in enumerate(zip(rows, GROUPS[group]["trl_text"])):
        got = normalize_row(row, i, fmt)
        assert got["prompt"] == want["prompt"], (group, i)
        for side in SIDES:
            text = got[side] if fmt.conversational else with_eos(got[side], tokenizer.eos_token)
            assert text == want[side], (group, i, side)


@pytest.mark.parametrize("group", DPO)
def test_dpo_ids_match_trl(group, tokenizer):
    tokenized = tokenize(tokenizer, group)
    assert tokenized.report.n_skipped == 0
    for i, (got, trl) in enumerate(zip(tokenized, GROUPS[group]["trl"], strict=True)):
        assert got["row"] == i
        for side in SIDES:
            ids, n = list(got[f"{side}_input_ids"]), got[f"{side}_prompt_length"]
            assert ids[:n] == trl["prompt_ids"], (group, i, side, ids[:n], trl["prompt_ids"])
            assert ids[n:] == trl[f"{side}_ids"], (group, i, side, ids[n:], trl[f"{side}_ids"])


@pytest.mark.parametrize(("group", "max_length"), cases(DPO))
def test_dpo_truncation_and_collation_match_trl(group, max_length, tokenizer):
    case = GROUPS[group]["cases"][str(max_length)]
    tokenized, kept = tokenize_case(tokenizer, group, max_length)
    check_kept(tokenized, kept, case, group, max_length)
    if not kept:  # TRL drops every row (each prompt fills max_length); so does alignjax
        return
    input_ids = np.asarray(case["input_ids"])
    completion = np.asarray(case["completion_mask"])
    batch = collate(list(tokenized), input_ids.shape[1], pad_id=tokenized.pad_id)
    np.testing.assert_array_equal(batch.input_ids, input_ids)
    np.testing.assert_array_equal(batch.attention_mask, case["attention_mask"])
    check_label_space(batch, completion)


# --------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("group", KTO_PAIRED)
def test_unpair_preference_dataset_matches_trl(group):
    """NEW: `unpair_preference_dataset` gives TRL's unpaired rows in TRL's order (chosen block,
    then rejected block; prompt extracted when implicit; extra columns duplicated)."""
    data = datasets.Dataset.from_list(GROUPS[group]["rows"])
    got = [dict(r) for r in unpair_preference_dataset(data)]
    assert got == GROUPS[group]["trl_unpaired"]


@pytest.mark.parametrize("group", KTO)
def test_kto_normalized_text_matches_trl(group, tokenizer):
    data = source_dataset(group)
    fmt = detect_format(data.column_names, data[0])
    assert fmt.kind == "unpaired" and fmt.conversational == group.endswith("_conv")
    for i, want in enumerate(GROUPS[group]["trl_text"]):
        got = normalize_row(data[i], i, fmt)
        assert got["prompt"] == want["prompt"], (group, i)
        completion = (
            got["completion"]
            if fmt.conversational
            else with_eos(got["completion"], tokenizer.eos_token)
        )
        assert completion == want["completion"], (group, i)
        assert got["label"] == want["label"], (group, i)


@pytest.mark.parametrize("group", KTO)
def test_kto_ids_match_trl(group, tokenizer):
    tokenized = tokenize(tokenizer, group)
    assert tokenized.report.n_skipped == 0
    for i, (got, trl) in enumerate(zip(tokenized, GROUPS[group]["trl"], strict=True)):
        ids, n = list(got["input_ids"]), got["prompt_length"]
        assert ids[:n] == trl["prompt_ids"], (group, i, ids[:n], trl["prompt_ids"])
        assert ids[n:] == trl["completion_ids"], (group, i, ids[n:], trl["completion_ids"])
        assert got["label"] == trl["label"]
    if group == "paired_for_kto":  # an EXTRA_FIELDS column TRL keeps through unpairing
        assert [r["prompt_id"] for r in tokenized] == [
            r["prompt_id"] for r in GROUPS[group]["trl_unpaired"]
        ]


@pytest.mark.parametrize(("group", "max_length"), cases(KTO))
def test_kto_truncation_matches_trl(group, max_length, tokenizer):
    """Rows kept (TRL drops a row whose prompt fills max_length) and the matched sequences of
    DataCollatorForUnpairedPreference (prompt + completion cut to max_length, keep_start)."""
    case = GROUPS[group]["cases"][str(max_length)]
    tokenized, kept = tokenize_case(tokenizer, group, max_length)
    check_kept(tokenized, kept, case, group, max_length)
    if not kept:
        return
    width = len(case["input_ids"][0])
    batch = collate(list(tokenized), width, pad_id=tokenized.pad_id)
    np.testing.assert_array_equal(batch.input_ids, case["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, case["attention_mask"])
    np.testing.assert_array_equal(batch.label, case["label"])
    check_label_space(batch, np.asarray(case["completion_mask"]))


@pytest.mark.parametrize(("group", "max_length"), cases(KTO))
def test_kto_kl_sequences_match_trl(group, max_length, tokenizer):
    """KTO's KL rows: prompt k with the completion of kept row k - 1 (TRL's rotation within a
    batch), cut to max_length by the collator: `collate(..., kto_kl=True)`'s second half."""
    case = GROUPS[group]["cases"][str(max_length)]
    if not case["kept"]:
        pytest.skip("TRL keeps no row")
    tokenized, kept = tokenize_case(tokenizer, group, max_length)
    assert kept == case["kept"], "the rows kept differ (see test_kto_truncation_matches_trl)"
    e = len(tokenized)
    width = max(len(case["input_ids"][0]), len(case["KL_input_ids"][0]))
    batch = collate(list(tokenized), width, pad_id=tokenized.pad_id, kto_kl=True,
                    kl_max_length=max_length)  # fmt: skip
    pad_id = tokenized.pad_id
    kl_ids = padded(case["KL_input_ids"], width, pad_id)
    kl_completion = padded(case["KL_completion_mask"], width, 0)
    for k in range(e):
        got = batch.input_ids[e + k][batch.attention_mask[e + k] == 1].tolist()
        want = kl_ids[k][np.asarray(padded(case["KL_attention_mask"], width, 0)[k]) == 1].tolist()
        assert got == want, (group, max_length, case["kept"][k], got, want)
    completion = np.concatenate([padded(case["completion_mask"], width, 0), kl_completion])
    check_label_space(batch, completion)


# --------------------------------------------------------------------------- loading


LOADABLE = [g for g in GROUPS if g != "sft_conversations_human_gpt"]


@pytest.mark.parametrize("group", LOADABLE)
def test_load_preference_dataset_from_files(group, tokenizer, tmp_path):
    """Each group read back from .jsonl, .parquet and a save_to_disk directory tokenizes as the
    in-memory rows do."""
    rows = GROUPS[group]["rows"]

    def tokenized(data):
        data = unpair_preference_dataset(data) if group in KTO_PAIRED else data
        return list(tokenize(tokenizer, group, data=data))

    want = tokenized(datasets.Dataset.from_list(rows))
    jsonl = tmp_path / f"{group}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / f"{group}.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    saved = tmp_path / f"{group}_saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for path in (jsonl, parquet, saved):
        loaded = load_preference_dataset(path, cache_dir=tmp_path / "cache")
        assert len(loaded) == len(rows), path.name
        assert tokenized(loaded) == want, path.name
