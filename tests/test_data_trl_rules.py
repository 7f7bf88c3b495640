"""TRL's dataset rules in alignjax's detection and validation (`data.formats`), the skip report
(every skipped row, `DataReport.write`), and unpairing (`unpair_preference_dataset`, TRL's
order). Token ids against TRL itself: tests/reference/test_trl_shapes.py."""

import json

import datasets
import pytest

from alignjax import data
from alignjax.data import DataFormat, RowError, detect_format, normalize_row


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


@pytest.fixture(scope="module")
def tok():
    return data.shipped_tokenizer()


def test_ultrafeedback_shape_takes_the_shared_messages_as_prompt(tok):
    row = {"prompt": "how was it?", "prompt_id": "x1", "score_chosen": 8.0,
           "score_rejected": 3.0, "chosen": [_u("how was it?"), _a("good")],
           "rejected": [_u("how was it?"), _a("bad")], "messages": [_u("how was it?")]}  # fmt: skip
    fmt = detect_format(list(row), row)
    assert (fmt.kind, fmt.conversational, fmt.implicit_prompt) == ("paired", True, True)
    assert fmt.extra_fields == ("prompt_id", "score_chosen", "score_rejected")
    out = normalize_row(row, 0, fmt)
    assert out["prompt"] == [_u("how was it?")]  # TRL's maybe_extract_prompt
    assert out["chosen"] == [_a("good")] and out["rejected"] == [_a("bad")]
    tokenized = data.tokenize_dataset(datasets.Dataset.from_list([row] * 3), tok)
    assert tokenized.report.n_skipped == 0
    assert tokenized[2]["prompt_id"] == "x1" and tokenized[2]["score_rejected"] == 3.0


def test_prompt_only_and_sharegpt_detection():
    fmt = detect_format(["prompt"], {"prompt": [_u("hi")]})
    assert (fmt.kind, fmt.conversational) == ("prompt_only", True)
    row = {"conversations": [{"from": "user", "value": "hi"},
                             {"from": "assistant", "value": "yo"}]}  # fmt: skip
    fmt = detect_format(list(row), row)
    assert (fmt.kind, fmt.conversational, fmt.chatml) == ("language_modeling", True, True)
    assert normalize_row(row, 0, fmt)["messages"] == [_u("hi"), _a("yo")]


def test_ambiguous_columns_say_which_format_to_pass(tok):
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c", "label": True}
    with pytest.raises(ValueError, match=r"fit both paired.*DataFormat\(kind=.*data\.format"):
        detect_format(list(row), row)
    assert detect_format(list(row), row, kind="unpaired").kind == "unpaired"
    ds = datasets.Dataset.from_list([row])
    assert data.tokenize_dataset(ds, tok, kind="paired").format.kind == "paired"


def test_a_row_of_another_shape_names_the_rule():
    fmt = DataFormat("paired", conversational=True)
    bad = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(RowError, match=r"row 4.*detected from row 0 as conversational paired.*"
                                       r"is_conversational.*conversational=False"):  # fmt: skip
        normalize_row(bad, 4, fmt)


def test_the_report_lists_every_skipped_row(tok, tmp_path):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"} for _ in range(30)]
    bad = [3, 7, 11, 12, 20, 21, 22, 23, 24, 25, 26, 27, 28]  # more than the 10 examples kept
    for i in bad:
        rows[i] = {"prompt": "p", "chosen": " ", "rejected": " b"}
    t = data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, on_error="skip")
    assert t.report.skipped_rows == tuple(bad) and len(t.report.examples) == 10
    t.report.write(tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["row"] for r in written["skipped_rows"]] == bad
    assert {r["field"] for r in written["skipped_rows"]} == {"chosen"}
    assert "skipped rows: 3, 7, 11" in str(t.report)


def test_unpairing_follows_trl(tok):
    pairs = datasets.Dataset.from_list([
        {"prompt": "p1", "chosen": " a", "rejected": " b", "prompt_id": "i1"},
        {"prompt": "p2", "chosen": " c", "rejected": " d", "prompt_id": "i2"},
    ])  # fmt: skip
    rows = data.unpair_preference_dataset(pairs).to_list()
    assert [(r["prompt"], r["completion"], r["label"], r["prompt_id"]) for r in rows] == [
        ("p1", " a", True, "i1"), ("p2", " c", True, "i2"),
        ("p1", " b", False, "i1"), ("p2", " d", False, "i2"),
    ]  # fmt: skip
    implicit = datasets.Dataset.from_list([{"chosen": "the soup was good", "rejected":
                                            "the soup was cold"}])  # fmt: skip
    rows = data.unpair_preference_dataset(implicit).to_list()
    # TRL's extract_prompt: the shared prefix, the space before the split goes to completions
    assert [(r["prompt"], r["completion"]) for r in rows] == [
        ("the soup was", " good"), ("the soup was", " cold")]  # fmt: skip
    t = data.tokenize_dataset(data.unpair_preference_dataset(pairs), tok)
    assert t.format.kind == "unpaired" and t.format.extra_fields == ("prompt_id",)


def test_a_folder_of_data_files_splits_as_datasets_does(tmp_path):
    """`trl dpo --dataset_name folder` reads a folder through `datasets.load_dataset`: a lone
    file is the train split, `test.*` the test split; alignjax reads it the same way."""
    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(5)]
    (tmp_path / "d").mkdir()
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "d" / "pairs.jsonl"))
    assert data.load_preference_dataset(tmp_path / "d")["prompt"] == [r["prompt"] for r in rows]
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'test'"):
        data.load_preference_dataset(tmp_path / "d", split="test")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no data files"):
        data.load_preference_dataset(tmp_path / "empty")
