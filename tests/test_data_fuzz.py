"""Fuzz: 600 malformed rows (150 per format, mixed with valid ones) written to JSONL files and
read back through `datasets`, as a user's data would be. Every malformed row must give a
RowError naming its index and the right field, nothing else may be raised, and with
on_error="skip" exactly the malformed rows are removed and counted."""

import collections
import json
import math
import random

import datasets
import pytest

from alignjax import data

datasets.disable_progress_bars()

GOOD = {
    "text": {"prompt": "review of the cafe:", "chosen": " great.", "rejected": " awful."},
    "chat": {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "soup?"}],
        "chosen": [{"role": "assistant", "content": "great."}],
        "rejected": [{"role": "assistant", "content": "cold."}],
    },
    "unpaired": {"prompt": "review of the bar:", "completion": " slow.", "label": False},
    "sppo": {
        "prompt": "review of the inn:",
        "chosen": " lovely.",
        "rejected": " dirty.",
        "chosen_win_prob": 0.8,
        "rejected_win_prob": 0.3,
    },  # fmt: skip
}
TEXT_FIELDS = {
    "text": ("prompt", "chosen", "rejected"),
    "chat": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "sppo": ("prompt", "chosen", "rejected"),
}
BAD_VALUES = [None, 3, 2.5, True, "", "   ", [1, 2], {"a": 1}, ["x"]]
BAD_MESSAGES = [
    [],
    [1, 2],
    [{"role": "user"}],
    [{"content": "x"}],
    [{"role": "robot", "content": "x"}],
    [{"role": "assistant", "content": 5}],
    [{"role": "assistant", "content": " "}],
    "a string",
]


def malformed(kind: str, rng: random.Random) -> tuple[dict, str]:
    """A copy of GOOD[kind] with one defect, and the field the error must name."""
    row = json.loads(json.dumps(GOOD[kind]))
    choice = rng.random()
    if choice < 0.15:
        field = rng.choice(list(row))
        del row[field]
        return row, field
    if kind == "unpaired" and choice < 0.35:
        row["label"] = rng.choice(["yes", 2, 0.5, [True]])
        return row, "label"
    if kind == "sppo" and choice < 0.35:
        field = rng.choice(["chosen_win_prob", "rejected_win_prob"])
        row[field] = rng.choice([-0.1, 1.5, math.nan, math.inf, "high", True])
        return row, field
    if kind == "text" and choice < 0.3:  # prompt long enough that max_length empties the answer
        row["prompt"] = "review of the cafe: " + "the soup was cold. " * 6
        return row, "chosen"
    field = rng.choice(TEXT_FIELDS[kind])
    if kind == "chat":
        bad = rng.choice(BAD_MESSAGES + [[{"role": "user", "content": "not an answer"}]])
        if field == "prompt" and bad and isinstance(bad, list) and bad[0] == {
            "role": "user", "content": "not an answer"
        }:  # fmt: skip
            bad = []  # a user message is a fine prompt; use another defect
        row[field] = bad
    else:
        row[field] = rng.choice(BAD_VALUES)
    return row, field


def build(kind: str, n_bad: int, seed: int):
    rng = random.Random(seed)
    rows, expected = [], []
    while sum(e is not None for e in expected) < n_bad:
        if rng.random() < 0.3:
            rows.append(json.loads(json.dumps(GOOD[kind])))
            expected.append(None)
        else:
            row, field = malformed(kind, rng)
            rows.append(row)
            expected.append(field)
    return rows, expected


@pytest.mark.parametrize("kind", ["text", "chat", "unpaired", "sppo"])
def test_fuzz_malformed_rows(kind, tmp_path):
    tok = data.shipped_tokenizer()
    rows, expected = build(kind, 150, seed=sum(map(ord, kind)))
    rows = [GOOD[kind]] + rows  # the first row fixes the format, as in a real file
    expected = [None] + expected
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = data.load_preference_dataset(path, cache_dir=tmp_path / "cache")
    assert len(raw) == len(rows)
    fmt = data.detect_format(raw.column_names, raw[0])
    config = data.TokenizeConfig(max_length=24)
    for i, row in enumerate(raw):
        try:
            data.encode_row(tok, data.normalize_row(row, i, fmt), fmt, config, i)
        except data.RowError as err:
            assert expected[i] is not None, f"valid row {i} rejected: {err}"
            assert err.row == i and err.field == expected[i], (i, rows[i], str(err))
            assert str(err).startswith(f"row {i}, field '{expected[i]}'")
        else:
            assert expected[i] is None, f"row {i} accepted: {rows[i]}"
    first_bad = next(i for i, e in enumerate(expected) if e is not None)
    with pytest.raises(data.RowError, match=f"^row {first_bad}, field '{expected[first_bad]}'"):
        data.tokenize_dataset(raw, tok, config=config)
    out = data.tokenize_dataset(raw, tok, config=config, on_error="skip")
    n_bad = sum(e is not None for e in expected)
    assert out.report.total == len(rows) and out.report.n_skipped == n_bad == 150
    by_field = collections.Counter()
    for (field, _), n in out.report.skipped.items():
        by_field[field] += n
    assert by_field == collections.Counter(e for e in expected if e is not None)
    assert sorted(out.dataset["row"]) == [i for i, e in enumerate(expected) if e is None]


def test_unparseable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD["text"]) + "\n" + '{"prompt": "x", "chosen" "y"}\n')
    with pytest.raises(data.RowError, match="row 1, field '<json>': bad.jsonl line 2"):
        data.load_preference_dataset(path, cache_dir=tmp_path / "cache")
