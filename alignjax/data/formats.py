"""Preference-data formats: detection, column mapping and per-row validation.

A row is normalised to canonical fields, whatever the source columns:

| kind       | fields                                                                  |
|------------|-------------------------------------------------------------------------|
| `paired`   | prompt, chosen, rejected                                                |
| `sppo`     | prompt, chosen, rejected + chosen_win_prob, rejected_win_prob and/or win_prob |
| `unpaired` | prompt, completion, label (bool: desirable)                             |
| `language_modeling` | text (or `messages`, conversational): SFT on every token          |
| `prompt_completion` | prompt, completion: SFT on the completion tokens only             |
| `prompt_only` | prompt: prompts for on-policy methods (TRL's "prompt-only" type)            |

Extra columns TRL datasets carry are kept when present (`EXTRA_FIELDS`: `prompt_id`, and the
UltraFeedback scores `score_chosen` / `score_rejected`, usable as pair weights or margins, and
TRL RewardTrainer's `margin` column: finite numbers, checked row by row).

Each text field is a string (standard) or a list of `{"role", "content"}` messages
(conversational, as TRL). `implicit_prompt` datasets have no prompt column: the prompt is the
longest common prefix of chosen and rejected (characters, or whole messages), as TRL's
`extract_prompt`. The two SFT kinds are TRL's "language modeling" and "prompt-completion"
dataset types. `columns` maps canonical names to the dataset's own (`{"prompt": "question"}`).

Detection follows TRL 1.16's rules (`trl.data_utils`): a row is conversational when its first
text field is a list of dicts with a "role" key; ShareGPT rows (`conversations` of
`{"from", "value"}`) are read as `messages` as `maybe_convert_to_chatml` does; and a paired row
whose `prompt` is not of the same type as `chosen` (the UltraFeedback-binarized shape: a string
prompt, message lists that repeat the user turn) takes its prompt from what chosen and rejected
share, as `maybe_extract_prompt` does (the prompt column is then not used; said once in the log).

Every problem raises `RowError` (a ValueError) naming the row index and the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

KINDS = ("paired", "sppo", "unpaired", "language_modeling", "prompt_completion", "prompt_only")
SFT_KINDS = ("language_modeling", "prompt_completion")
WIN_FIELDS = ("chosen_win_prob", "rejected_win_prob", "win_prob")
ROLES = ("system", "user", "assistant", "tool")
EXTRA_FIELDS = ("prompt_id", "score_chosen", "score_rejected", "margin")  # kept when present
SCORE_FIELDS = ("score_chosen", "score_rejected")
PAIR_FIELDS = (*SCORE_FIELDS, "margin")  # numbers about a pair: paired / sppo rows only


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
      extra_fields: which of `EXTRA_FIELDS` every row carries (kept in the tokenized rows).
      chatml: conversational messages use ShareGPT's `from` / `value` keys (converted).
    """

    kind: str = "paired"
    conversational: bool = False
    implicit_prompt: bool = False
    columns: tuple[tuple[str, str], ...] = ()
    win_fields: tuple[str, ...] = ()
    extra_fields: tuple[str, ...] = ()
    chatml: bool = False

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
        unknown = set(self.extra_fields) - set(EXTRA_FIELDS)
        if unknown:
            raise ValueError(f"`extra_fields` must be among {EXTRA_FIELDS}, got {sorted(unknown)}")
        if set(self.extra_fields) & set(PAIR_FIELDS) and self.kind not in ("paired", "sppo"):
            raise ValueError(f"{PAIR_FIELDS} are numbers of a pair; {self.kind} rows have none")
        object.__setattr__(
            self, "extra_fields", tuple(f for f in EXTRA_FIELDS if f in self.extra_fields)
        )
        if self.chatml and not self.conversational:
            raise ValueError("`chatml` (from/value messages) needs conversational=True")

    def fields(self) -> tuple[str, ...]:
        """Canonical fields a row must have (win probabilities are checked separately)."""
        if self.kind == "unpaired":
            return ("prompt", "completion", "label")
        if self.kind == "prompt_completion":
            return ("prompt", "completion")
        if self.kind == "prompt_only":
            return ("prompt",)
        if self.kind == "language_modeling":
            return ("messages",) if self.conversational else ("text",)
        return ("chosen", "rejected") if self.implicit_prompt else ("prompt", "chosen", "rejected")

    def source(self, field: str) -> str:
        return dict(self.columns).get(field, field)


def _is_messages(value) -> bool:
    """TRL's `is_conversational` test on one value: a list whose first item is a dict with a
    "role" key."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], Mapping)
        and ("role" in value[0])
    )


def _is_from_value(value) -> bool:
    """TRL's `is_conversational_from_value`: ShareGPT messages (`from` / `value` keys)."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], Mapping)
        and "from" in value[0]
        and "value" in value[0]
    )


def _describe(fmt: DataFormat) -> str:
    shape = "conversational" if fmt.conversational else "standard"
    prompt = ", implicit prompt" if fmt.implicit_prompt else ""
    return f"{shape} {fmt.kind}{prompt}"


_PAIRED_EXAMPLE = "DataFormat(kind='paired')"


def detect_format(
    column_names: Sequence[str],
    first_row: Mapping,
    columns: Mapping[str, str] | None = None,
    *,
    kind: str | None = None,
) -> DataFormat:
    """Infer the format from the column names (after `columns` renaming) and the first row,
    by TRL's rules (see the module docstring). `kind` forces the kind where the columns fit
    more than one (e.g. both chosen/rejected and completion/label)."""
    import logging

    columns = dict(columns or {})
    available = set(column_names)
    for field, col in columns.items():
        if col not in available:
            raise ValueError(
                f"`columns` maps {field!r} to {col!r}, which is not a column; the dataset has "
                f"{sorted(available)}"
            )
    if kind is not None and kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    chatml = False
    if (
        "messages" not in columns
        and "messages" not in available
        and "conversations" in available
        and _is_from_value(first_row.get("conversations"))
    ):
        columns["messages"], chatml = "conversations", True  # TRL's maybe_convert_to_chatml
    names = ("prompt", "chosen", "rejected", "completion", "label", "text", "messages")
    present = {f for f in (*names, *WIN_FIELDS, *EXTRA_FIELDS) if columns.get(f, f) in available}
    fits = []
    if {"chosen", "rejected"} <= present:
        fits.append("sppo" if present & set(WIN_FIELDS) else "paired")
    if {"completion", "label"} <= present:
        fits.append("unpaired")
    elif {"prompt", "completion"} <= present:
        fits.append("prompt_completion")
    if "messages" in present:
        fits.append("language_modeling")
    elif "text" in present:
        fits.append("language_modeling")
    if not fits and "prompt" in present:
        fits.append("prompt_only")
    if kind is None:
        if not fits:
            raise ValueError(
                "cannot tell the dataset's format from its columns "
                f"{sorted(available)}: expected prompt/chosen/rejected (paired), chosen/rejected "
                "(implicit prompt), prompt/completion/label (unpaired), paired columns with "
                "chosen_win_prob/rejected_win_prob/win_prob (SPPO), for SFT text / messages / "
                "ShareGPT conversations (language modeling) or prompt/completion, or prompt "
                "alone (prompt-only); map other names with `columns`"
            )
        pair_like = [k for k in fits if k in ("paired", "sppo", "unpaired", "prompt_completion")]
        if len(pair_like) > 1:
            raise ValueError(
                f"the columns {sorted(available)} fit both {pair_like[0]} rows (chosen/rejected) "
                f"and {pair_like[1]} rows (completion...): TRL's rules do not decide between "
                f"them; pass `DataFormat(kind=...)` (e.g. {_PAIRED_EXAMPLE}) or the config key "
                "`data.format`"
            )
        kind = fits[0]
    implicit = False
    if kind in ("paired", "sppo"):
        chosen_conv = _is_messages(first_row.get(columns.get("chosen", "chosen")))
        if "prompt" not in present:
            implicit = True
        else:
            prompt_conv = _is_messages(first_row.get(columns.get("prompt", "prompt")))
            if prompt_conv != chosen_conv:  # TRL's maybe_extract_prompt
                implicit = True
                logging.getLogger(__name__).warning(
                    "the prompt column is %s but chosen / rejected are %s (the "
                    "UltraFeedback-binarized shape): as TRL's maybe_extract_prompt, the prompt is "
                    "what chosen and rejected share, and the prompt column is not used",
                    "a list of messages" if prompt_conv else "a string",
                    "lists of messages" if chosen_conv else "strings",
                )
        conversational = chosen_conv
    elif kind == "language_modeling":  # `messages` rows are validated as messages, row by row
        conversational = "messages" in present
    elif kind == "prompt_only":
        conversational = _is_messages(first_row.get(columns.get("prompt", "prompt")))
    else:
        conversational = _is_messages(first_row.get(columns.get("completion", "completion")))
    wins = tuple(f for f in WIN_FIELDS if f in present) if kind == "sppo" else ()
    extra = tuple(
        f for f in EXTRA_FIELDS
        if f in present and (f == "prompt_id" or kind in ("paired", "sppo"))
    )  # fmt: skip
    fmt = DataFormat(
        kind, conversational, implicit, tuple(sorted(columns.items())), wins, extra, chatml
    )
    missing = [f for f in fmt.fields() if f not in present]
    if missing:
        raise ValueError(
            f"format {kind!r} needs the column(s) {missing}; the dataset has {sorted(available)}"
        )
    return fmt


def _to_chatml(value):
    """ShareGPT messages with `from` / `value` keys renamed to `role` / `content` (as TRL)."""
    if not isinstance(value, list):
        return value
    out = []
    for m in value:
        if isinstance(m, Mapping):
            m = dict(m)
            if "from" in m:
                m["role"] = m.pop("from")
            if "value" in m:
                m["content"] = m.pop("value")
        out.append(m)
    return out


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
                hint = ""
                if role in ("human", "gpt"):
                    hint = (" (ShareGPT's role names: rename them user / assistant; TRL passes "
                            "them to the chat template unchanged)")  # fmt: skip
                raise RowError(
                    row, field, f"message {i} has role {role!r}, not one of {ROLES}{hint}"
                )
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


def _score(row: int, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(row, field, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise RowError(row, field, f"expected a finite number, got {value}")
    return value


def _extras(row: Mapping, index: int, fmt: DataFormat) -> dict:
    out = {}
    for field in fmt.extra_fields:
        value = row.get(fmt.source(field))
        if value is None:
            raise RowError(index, field, f"missing {field} (row 0 has it)")
        if field == "prompt_id":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise RowError(index, field, f"expected a str or int, got {type(value).__name__}")
            out[field] = str(value)
        else:
            out[field] = _score(index, field, value)
    return out


def _with_hint(err: RowError, fmt: DataFormat) -> RowError:
    """A type mismatch against the detected format names the rule that decided it."""
    if not err.problem.startswith(("expected a list of messages", "expected str")):
        return err
    other = "a string" if fmt.conversational else "a list of messages"
    return RowError(
        err.row,
        err.field,
        f"{err.problem} (the format was detected from row 0 as {_describe(fmt)}, TRL's "
        f"is_conversational rule on its first text field; every row must have that shape: if "
        f"this field is {other} throughout, pass `DataFormat(kind={fmt.kind!r}, "
        f"conversational={not fmt.conversational})`)",
    )


def normalize_row(row: Mapping, index: int, fmt: DataFormat) -> dict:
    """Validate one row and return its canonical fields (see the module docstring).

    Raises:
      RowError naming `index` and the field for a missing field, a wrong type, empty text,
      malformed messages, a bad label, score or win probability.
    """
    try:
        return _normalize_row(row, index, fmt)
    except RowError as err:
        raise _with_hint(err, fmt) from None


def _normalize_row(row: Mapping, index: int, fmt: DataFormat) -> dict:
    if not isinstance(row, Mapping):
        raise RowError(index, "<row>", f"expected a mapping, got {type(row).__name__}")
    out = {}
    for field in fmt.fields():
        col = fmt.source(field)
        if col not in row or row[col] is None:
            what = field if col == field else f"{field} (column {col!r})"
            raise RowError(index, field, f"missing {what}")
        out[field] = _to_chatml(row[col]) if fmt.chatml else row[col]
    out.update(_extras(row, index, fmt))
    if fmt.kind in ("language_modeling", "prompt_only"):
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
