"""alignjax's preference-data tokenization against TRL 1.16.0's own pipeline
(tests/reference/generate_trl_data.py): `DPOTrainer._prepare_dataset` and
`DataCollatorForPreference` run on standard, implicit-prompt, conversational and
implicit-prompt conversational rows with the shipped tokenizer.

Checked exactly: the text TRL tokenizes (implicit prompt split, EOS appended) against
`normalize_row`; TRL's prompt_ids / chosen_ids / rejected_ids against `tokenize_dataset`; for
max_length in {None, 24} x {keep_start, keep_end}, the rows TRL keeps against the rows alignjax
keeps (a dropped row is a `RowError` naming it, or a skipped and counted row), and TRL's padded
collator output against `batching.collate`. TRL's completion_mask marks completion tokens in
input space; alignjax's loss_mask is in label space (loss_mask[:, t] = 1 iff token t + 1 is a
completion token), so loss_mask[:, :-1] must equal completion_mask[:, 1:].
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
    normalize_row,
    shipped_tokenizer,
    tokenize_dataset,
)
from alignjax.data.synthetic import ASSETS

FIXTURE = json.loads((Path(__file__).resolve().parent / "fixtures" / "trl_data.json").read_text())
GROUPS = sorted(FIXTURE["groups"])
CASES = [(c["max_length"], c["truncation_mode"]) for c in FIXTURE["cases"]]
SIDES = ("chosen", "rejected")


@pytest.fixture(scope="module")
def tokenizer():
    return shipped_tokenizer()


def tokenize(tokenizer, group, config=None, on_error="raise"):
    config = TokenizeConfig() if config is None else config
    rows = FIXTURE["groups"][group]["rows"]
    data = datasets.Dataset.from_list(rows)
    return tokenize_dataset(data, tokenizer, config=config, on_error=on_error)


def test_fixture_was_made_with_the_shipped_tokenizer():
    digests = FIXTURE["meta"]["tokenizer_sha256"]
    for name, digest in digests.items():
        got = hashlib.sha256((ASSETS / "tokenizer" / name).read_bytes()).hexdigest()
        assert got == digest, (
            f"alignjax/data/assets/tokenizer/{name} changed since the fixture was made; "
            "regenerate it with tests/reference/generate_trl_data.py"
        )
    assert FIXTURE["meta"]["trl"] == "1.16.0"


def test_fixture_covers_every_format_and_a_dropped_row():
    formats = set()
    for group in GROUPS:
        rows = FIXTURE["groups"][group]["rows"]
        fmt = detect_format(list(rows[0]), rows[0])
        formats.add((fmt.conversational, fmt.implicit_prompt))
    assert formats == {(False, False), (False, True), (True, False), (True, True)}
    case = FIXTURE["cases"][CASES.index((24, "keep_start"))]
    assert any(
        len(g["kept"]) < len(FIXTURE["groups"][name]["rows"]) for name, g in case["groups"].items()
    )


@pytest.mark.parametrize("group", GROUPS)
def test_normalized_text_matches_trl(group, tokenizer):
    """The prompt split (TRL's `extract_prompt`) and the EOS added to text completions."""
    rows = FIXTURE["groups"][group]["rows"]
    fmt = detect_format(list(rows[0]), rows[0])
    for i, (row, want) in enumerate(zip(rows, FIXTURE["groups"][group]["trl_text"])):
        got = normalize_row(row, i, fmt)
        assert got["prompt"] == want["prompt"], (group, i)
        for side in SIDES:
            text = got[side] if fmt.conversational else got[side] + tokenizer.eos_token
            assert text == want[side], (group, i, side)


@pytest.mark.parametrize("group", GROUPS)
def test_token_ids_match_trl(group, tokenizer):
    tokenized = tokenize(tokenizer, group)
    want = FIXTURE["groups"][group]["trl"]
    assert tokenized.report.n_skipped == 0
    assert len(tokenized) == len(want)
    for i, (got, trl) in enumerate(zip(tokenized, want)):
        assert got["row"] == i
        for side in SIDES:
            ids, n = list(got[f"{side}_input_ids"]), got[f"{side}_prompt_length"]
            assert ids[:n] == trl["prompt_ids"], (group, i, side, "prompt")
            assert ids[n:] == trl[f"{side}_ids"], (group, i, side, "completion")


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(("max_length", "mode"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_truncation_and_collation_match_trl(group, max_length, mode, tokenizer):
    case = FIXTURE["cases"][CASES.index((max_length, mode))]["groups"][group]
    n_rows = len(FIXTURE["groups"][group]["rows"])
    config = TokenizeConfig(max_length=max_length, truncation_mode=mode)
    tokenized = tokenize(tokenizer, group, config, on_error="skip")

    # Rows: TRL drops a row whose prompt fills max_length under keep_start; alignjax skips
    # and counts it, or (on_error="raise") raises a RowError naming it.
    kept = case["kept"]
    dropped = [i for i in range(n_rows) if i not in kept]
    assert list(tokenized.dataset["row"]) == kept
    assert tokenized.report.n_skipped == len(dropped)
    assert [row for row, _ in tokenized.report.examples] == dropped
    if dropped:
        assert (max_length, mode) == (24, "keep_start")
        with pytest.raises(RowError) as err:
            tokenize(tokenizer, group, config)
        assert err.value.row == dropped[0]
        assert f"row {dropped[0]}," in str(err.value)

    # Batch: [chosen (kept); rejected (kept)], right-padded to TRL's width with the same pad id.
    input_ids = np.asarray(case["input_ids"])
    attention = np.asarray(case["attention_mask"])
    completion = np.asarray(case["completion_mask"])
    assert tokenized.pad_id == FIXTURE["meta"]["pad_token_id"]
    batch = collate(list(tokenized), input_ids.shape[1], pad_id=tokenized.pad_id)
    np.testing.assert_array_equal(batch.input_ids, input_ids)
    np.testing.assert_array_equal(batch.attention_mask, attention)
    np.testing.assert_array_equal(batch.rows, kept)

    # Completion layout in input space, from alignjax's per-side prompt lengths.
    ours = np.zeros_like(completion)
    examples = list(tokenized)
    for k, (side, ex) in enumerate([(s, e) for s in SIDES for e in examples]):
        ours[k, ex[f"{side}_prompt_length"] : len(ex[f"{side}_input_ids"])] = 1
    np.testing.assert_array_equal(ours, completion)

    # Label space: TRL shifts its completion_mask by one inside the loss; alignjax stores it so.
    want = np.zeros_like(completion)
    want[:, :-1] = completion[:, 1:]
    np.testing.assert_array_equal(batch.loss_mask, want)
    on = want == 1
    np.testing.assert_array_equal(batch.labels[:, :-1][on[:, :-1]], input_ids[:, 1:][on[:, :-1]])
    if max_length is not None:
        assert attention.sum(axis=1).max() <= max_length
