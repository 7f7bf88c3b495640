"""Preference-data formats: detection, column mapping and per-row validation.

A row is normalised to canonical fields, whatever the source columns:

| kind       | fields                                                                  |
|------------|-------------------------------------------------------------------------|
| `paired`   | prompt, chosen, rejected                                                |
| `sppo`     | prompt, chosen, rejected + chosen_win_prob, rejected_win_prob and/or win_prob |
| `unpaired` | prompt, completion, label (bool: desirable)                             |
| `language_modeling` | text (or `messages`, conversational): SFT on every token          |
| `prompt_completion` | prompt, completion: SFT on the completion tokens only             |

Each text field is a string (standard) or a list of `{"role", "content"}` messages
(conversational, as TRL). `implicit_prompt` datasets have no prompt column: the prompt is the
longest common prefix of chosen and rejected (characters, or whole messages), as TRL's
`extract_prompt`. The two SFT kinds are TRL's "language modeling" and "prompt-completion"
dataset types. `columns` maps canonical names to the dataset's own (`{"prompt": "question"}`).

Every problem raises `RowError` (a ValueError) naming the row index and the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

KINDS = ("paired", "sppo", "unpaired", "language_modeling", "prompt_completion")
SFT_KINDS = ("language_modeling", "prompt_completion")
WIN_FIELDS = ("chosen_win_prob", "rejected_win_prob", "win_prob")
ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A bad dataset row: `row` is its index in the source dataset, `field` the canonical field."""

    def __init__(self, row: int, field: str, problem: str):
        self.row, self.field, self.problem = row, field, problem
        super().__init__(f"row {row}, field {field!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """How to read a dataset's rows.

    Attributes:
      kind: "paired", "sppo", "unpaired", or the SFT kinds "language_modeling" (a `text`
        column, or `messages` when conversational) and "prompt_completion".
      conversational: text fields are lists of messages (chat template applied when tokenizing).
      implicit_prompt: no prompt column; the prompt is the common prefix of chosen and rejected.
      columns: canonical field -> source column, for the fields that are renamed.
      win_fields: for "sppo", which of chosen_win_prob / rejected_win_prob / win_prob every
        row carries (both per-response probabilities, or win_prob, or all three).
    """

    kind: str = "paired"
    conversational: bool = False
    implicit_prompt: bool = False
    columns: tuple[tuple[str, str], ...] = ()
    win_fields: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {self.kind!r}")
        if self.implicit_prompt and self.kind not in ("paired", "sppo"):
            raise ValueError(
                f"`implicit_prompt` needs chosen and rejected; {self.kind} rows have neither"
            )
        if isinstance(self.columns, Mapping):
            object.__setattr__(self, "columns", tuple(sorted(self.columns.items())))
        if self.kind == "sppo":
            wins = set(self.win_fields) or {"chosen_win_prob", "rejected_win_prob"}
            if not wins <= set(WIN_FIELDS):
                raise ValueError(f"`win_fields` must be among {WIN_FIELDS}, got {self.win_fields}")
            if "win_prob" not in wins and not {"chosen_win_prob", "rejected_win_prob"} <= wins:
                raise ValueError("SPPO needs chosen_win_prob and rejected_win_prob, or win_prob")
            object.__setattr__(self, "win_fields", tuple(f for f in WIN_FIELDS if f in wins))
        elif self.win_fields:
            raise ValueError(f"`win_fields` is for kind='sppo', not {self.kind!r}")

    def fields(self) -> tuple[str, ...]:
        """Canonical fields a row must have (win probabilities are checked separately)."""
        if self.kind == "unpaired":
            return ("prompt", "completion", "label")
        if self.kind == "prompt_completion":
            return ("prompt", "completion")
        if self.kind == "language_modeling":
            return ("messages",) if self.conversational else ("text",)
        return ("chosen", "rejected") if self.implicit_prompt else ("prompt", "chosen", "rejected")

    def source(self, field: str) -> str:
        return dict(self.columns).get(field, field)


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def detect_format(
    column_names: Sequence[str], first_row: Mapping, columns: Mapping[str, str] | None = None
) -> DataFormat:
    """Infer the format from the column names (after `columns` renaming) and the first row."""
    columns = dict(columns or {})
    available = set(column_names)
    for field, col in columns.items():
        if col not in available:
            raise ValueError(
                f"`columns` maps {field!r} to {col!r}, which is not a column; the dataset has "
                f"{sorted(available)}"
            )
    names = ("prompt", "chosen", "rejected", "completion", "label", "text", "messages")
    present = {f for f in (*names, *WIN_FIELDS) if columns.get(f, f) in available}
    if {"completion", "label"} <= present:
        kind, implicit, key = "unpaired", False, "completion"
    elif {"chosen", "rejected"} <= present:
        kind = "sppo" if present & set(WIN_FIELDS) else "paired"
        implicit, key = "prompt" not in present, "chosen"
    elif {"prompt", "completion"} <= present:
        kind, implicit, key = "prompt_completion", False, "completion"
    elif "messages" in present:
        kind, implicit, key = "language_modeling", False, "messages"
    elif "text" in present:
        kind, implicit, key = "language_modeling", False, "text"
    else:
        raise ValueError(
            "cannot tell the dataset's format from its columns "
            f"{sorted(available)}: expected prompt/chosen/rejected (paired), chosen/rejected "
            "(implicit prompt), prompt/completion/label (unpaired), paired columns with "
            "chosen_win_prob/rejected_win_prob/win_prob (SPPO), or for SFT text / messages "
            "(language modeling) or prompt/completion; map other names with `columns`"
        )
    if kind == "language_modeling":  # `messages` rows are validated as messages, row by row
        conversational = key == "messages"
    else:
        conversational = _is_messages(first_row.get(columns.get(key, key)))
    wins = tuple(f for f in WIN_FIELDS if f in present) if kind == "sppo" else ()
    return DataFormat(kind, conversational, implicit, tuple(sorted(columns.items())), wins)


def _check_text(row: int, field: str, value, conversational: bool, *, prompt: bool = False):
    if conversational:
        if not isinstance(value, list):
            raise RowError(row, field, f"expected a list of messages, got {type(value).__name__}")
        if not value:
            raise RowError(row, field, "empty list of messages")
        for i, m in enumerate(value):
            if not isinstance(m, Mapping):
                raise RowError(row, field, f"message {i} is a {type(m).__name__}, not a dict")
            if "role" not in m or "content" not in m:
                keys = sorted(map(str, m))
                raise RowError(row, field, f"message {i} needs 'role' and 'content', got {keys}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise RowError(row, field, f"message {i} has role {role!r}, not one of {ROLES}")
            if not isinstance(content, str):
                raise RowError(
                    row, field, f"message {i} content is {type(content).__name__}, not str"
                )
            if not content.strip():
                raise RowError(row, field, f"message {i} has empty content")
        if not prompt and value[-1]["role"] != "assistant":
            raise RowError(row, field, "a completion must end with an assistant message")
        return
    if not isinstance(value, str):
        raise RowError(row, field, f"expected str, got {type(value).__name__}")
    if not value.strip():
        raise RowError(row, field, "empty text")


def common_prefix_length(a, b) -> int:
    """Number of leading items (characters, messages or token ids) `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_implicit_prompt(row: int, chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) from two full sequences sharing a prompt (TRL's rule: the
    longest common prefix; for text a space right before the split point goes to the
    completions)."""
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and 0 < n and chosen[n - 1] == " ":
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise RowError(row, "prompt", "chosen and rejected share no prefix (implicit prompt)")
    if not c or not r:
        which = "chosen" if not c else "rejected"
        raise RowError(row, which, "is a prefix of the other completion (nothing left after "
                       "the implicit prompt)")  # fmt: skip
    return prompt, c, r


def _probability(row: int, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(row, field, f"expected a probability (float), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise RowError(row, field, f"expected a probability in [0, 1], got {value}")
    return value


def normalize_row(row: Mapping, index: int, fmt: DataFormat) -> dict:
    """Validate one row and return its canonical fields (see the module docstring).

    Raises:
      RowError naming `index` and the field for a missing field, a wrong type, empty text,
      malformed messages, a bad label or win probability.
    """
    if not isinstance(row, Mapping):
        raise RowError(index, "<row>", f"expected a mapping, got {type(row).__name__}")
    out = {}
    for field in fmt.fields():
        col = fmt.source(field)
        if col not in row or row[col] is None:
            what = field if col == field else f"{field} (column {col!r})"
            raise RowError(index, field, f"missing {what}")
        out[field] = row[col]
    if fmt.kind == "language_modeling":
        field = fmt.fields()[0]
        _check_text(index, field, out[field], fmt.conversational, prompt=True)
        return out
    if fmt.kind in ("unpaired", "prompt_completion"):
        _check_text(index, "prompt", out["prompt"], fmt.conversational, prompt=True)
        _check_text(index, "completion", out["completion"], fmt.conversational)
        if fmt.kind == "prompt_completion":
            return out
        label = out["label"]
        if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
            out["label"] = bool(label)
        else:
            raise RowError(index, "label", f"expected a bool (or 0/1), got {label!r}")
        return out
    for field in ("chosen", "rejected"):
        _check_text(index, field, out[field], fmt.conversational, prompt=fmt.implicit_prompt)
    if fmt.implicit_prompt:
        out["prompt"], out["chosen"], out["rejected"] = split_implicit_prompt(
            index, out["chosen"], out["rejected"]
        )
        if fmt.conversational:
            for field in ("chosen", "rejected"):
                _check_text(index, field, out[field], True)
    else:
        _check_text(index, "prompt", out["prompt"], fmt.conversational, prompt=True)
    for field in fmt.win_fields:
        col = fmt.source(field)
        if row.get(col) is None:
            raise RowError(
                index, field, f"missing {field} (this SPPO dataset has {fmt.win_fields})"
            )
        out[field] = _probability(index, field, row[col])
    return out
