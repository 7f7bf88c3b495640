"""Tokenize preference rows into per-side token ids, with truncation and a skip report.

Text rows follow TRL 1.x (`DPOTrainer._prepare_dataset`): the EOS token is appended to each
completion string (unless present), `prompt` and `prompt + completion` are tokenized with the
tokenizer's special tokens (BOS), and the completion starts where the tokenized prompt and both
tokenized prompt+completion sequences first differ (BPE merges across the boundary, chat
templates that render the prompt differently). Conversational rows go through the tokenizer's
chat template: the prompt with `add_generation_prompt=True`, the prompt followed by the
completion without. Then each side is truncated by `ops.masking.truncate_sequence`
(`max_prompt_length`, `max_completion_length`, `max_length`, `keep_start` / `keep_end`).

Output columns per paired row: `chosen_input_ids`, `chosen_prompt_length`, `rejected_input_ids`,
`rejected_prompt_length` (prompt + completion ids; the prompt is the first `*_prompt_length`
ids; under keep_end the two sides may keep different prompt tails), `length` (the longer side),
`row` (index in the source dataset) and the SPPO win probabilities; unpaired rows:
`input_ids`, `prompt_length`, `label`, `length`, `row` and `kl_completion_ids` (the completion
before `max_length` cut it: KTO's KL rows pair it with another row's prompt and only then cut
to `max_length`, as TRL); SFT rows the same without `label` / `kl_completion_ids`.

Prompt-only rows (TRL's prompt-only type, for on-policy methods) are `input_ids` (the prompt,
tokenized as GRPOTrainer does: with special tokens, or the chat template with the generation
prompt), `prompt_length` = their length, `length`, `row`; `max_prompt_length` keeps their last
tokens, as for every prompt (GRPO 1.16 does not truncate prompts; `max_length` bounds prompt
plus completion, which the rollout enforces). Extra columns (`formats.EXTRA_FIELDS`: `prompt_id`,
`score_chosen`, `score_rejected`) are kept when the dataset has them.

SFT rows follow TRL's SFTTrainer: "language_modeling" rows are the whole text (EOS appended,
as TRL) or the chat-templated `messages`, with `prompt_length` 0, so every token after the
first is trained on (`max_length` keeps the start or the end); "prompt_completion" rows are
tokenized like an unpaired row and train on the completion only (TRL's `completion_only_loss`).

With `on_error="skip"` bad rows are removed and counted by field and reason in a `DataReport`;
with "raise" (the default) the first bad row raises `RowError` naming the row and the field.
Rows whose completion truncation would empty are bad rows (TRL drops them silently).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from alignjax.data.formats import (
    DataFormat,
    RowError,
    common_prefix_length,
    detect_format,
    normalize_row,
)
from alignjax.ops.masking import truncate_sequence

__all__ = ["TokenizeConfig", "DataReport", "TokenizedDataset", "encode_row", "tokenize_dataset"]

ON_ERROR = ("raise", "skip")
SINGLE_KINDS = ("unpaired", "language_modeling", "prompt_completion", "prompt_only")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Lengths and truncation (TRL's names and defaults; None = no limit)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"
    add_eos: bool = True  # text completions end with the EOS token, as TRL

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                "`truncation_mode` must be 'keep_start' or 'keep_end', got "
                f"{self.truncation_mode!r}"
            )
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {v!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"`max_length` must be >= 2 (a prompt and a completion token), "
                             f"got {self.max_length}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DataReport:
    """What tokenization kept and skipped. `skipped` counts (field, reason) pairs; `errors`
    holds every skipped row as (row, field, problem), in row order (`to_dict` / `write` give
    all of them; `examples` the first ten as messages)."""

    total: int
    kept: int
    skipped: Mapping[tuple[str, str], int]
    errors: tuple[tuple[int, str, str], ...] = ()

    @property
    def examples(self) -> tuple[tuple[int, str], ...]:
        """The first ten skipped rows as (row, message)."""
        return tuple((r, f"row {r}, field {f!r}: {p}") for r, f, p in self.errors[:10])

    @property
    def skipped_rows(self) -> tuple[int, ...]:
        """The source-row index of every skipped row."""
        return tuple(r for r, _, _ in self.errors)

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "kept": self.kept,
            "skipped": self.n_skipped,
            "reasons": [
                {"field": f, "reason": r, "rows": n} for (f, r), n in sorted(self.skipped.items())
            ],
            "skipped_rows": [{"row": r, "field": f, "problem": p} for r, f, p in self.errors],
        }

    def write(self, path) -> None:
        """The whole report as JSON (every skipped row with its field and problem)."""
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @property
    def n_skipped(self) -> int:
        return self.total - self.kept

    def __str__(self) -> str:
        lines = [f"{self.kept} of {self.total} rows kept, {self.n_skipped} skipped"]
        for (field, reason), n in sorted(self.skipped.items(), key=lambda x: -x[1]):
            lines.append(f"  {n:6d}  {field}: {reason}")
        if self.errors:
            rows = ", ".join(str(r) for r in self.skipped_rows[:20])
            more = f" and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
            lines.append(f"  skipped rows: {rows}{more}")
        return "\n".join(lines)


class TokenizedDataset(Sequence):
    """A tokenized `datasets.Dataset` with its format and report (indexable like the dataset)."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        fmt: DataFormat,
        report: DataReport,
        pad_id,
        config: TokenizeConfig | None = None,
    ):
        self.dataset, self.format, self.report, self.pad_id = dataset, fmt, report, pad_id
        self.config = TokenizeConfig() if config is None else config  # the lengths it was cut to

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    @property
    def fingerprint(self) -> str:
        """`datasets`' fingerprint of the tokenized data (changes with data, tokenizer, lengths)."""
        return self.dataset._fingerprint

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.dataset["length"], dtype=np.int64)


def _ids(encoded) -> list[int]:
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def _prompt_ids(tokenizer, prompt, conversational: bool) -> list[int]:
    """A prompt's ids: the chat template with the generation prompt, or the text with the
    tokenizer's special tokens (TRL's `_tokenize`)."""
    if conversational:
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        return _ids(ids)
    return _ids(tokenizer(prompt))


def _encode_sides(tokenizer, prompt, completions: dict, conversational: bool, add_eos: bool):
    """(prompt_ids, {side: full ids}) with the prompt/completion boundary shared by all sides."""
    prompt_ids = _prompt_ids(tokenizer, prompt, conversational)
    if conversational:
        full = {
            side: _ids(tokenizer.apply_chat_template(prompt + comp, tokenize=True))
            for side, comp in completions.items()
        }
    else:
        eos = tokenizer.eos_token
        if add_eos and eos is None:
            raise ValueError("the tokenizer has no eos_token; pass TokenizeConfig(add_eos=False)")
        if add_eos:
            completions = {s: c if c.endswith(eos) else c + eos for s, c in completions.items()}
        full = {side: _ids(tokenizer(prompt + comp)) for side, comp in completions.items()}
    n = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    return prompt_ids[:n], full


def _encode_text(tokenizer, record: Mapping, fmt: DataFormat, config: TokenizeConfig, index: int):
    """A language-modeling row: all tokens, prompt_length 0, truncated to max_length."""
    if fmt.conversational:
        ids = _ids(tokenizer.apply_chat_template(record["messages"], tokenize=True))
        field = "messages"
    else:
        text, eos, field = record["text"], tokenizer.eos_token, "text"
        if config.add_eos and eos is None:
            raise ValueError("the tokenizer has no eos_token; pass TokenizeConfig(add_eos=False)")
        if config.add_eos and not text.endswith(eos):
            text = text + eos
        ids = _ids(tokenizer(text))
    if len(ids) < 2:
        raise RowError(index, field, f"tokenizes to {len(ids)} token(s); SFT needs at least 2")
    n = config.max_length
    if n is not None and len(ids) > n:
        ids = ids[:n] if config.truncation_mode == "keep_start" else ids[-n:]
    return {"row": index, "input_ids": ids, "prompt_length": 0, "length": len(ids)}


def _encode_prompt(tokenizer, record: Mapping, fmt: DataFormat, config: TokenizeConfig, index):
    ids = _prompt_ids(tokenizer, record["prompt"], fmt.conversational)
    if not ids:
        raise RowError(index, "prompt", "tokenizes to no token")
    n = config.max_prompt_length
    if n is not None and len(ids) > n:
        ids = ids[-n:]  # as every prompt: its last max_prompt_length tokens
    return {"row": index, "input_ids": ids, "prompt_length": len(ids), "length": len(ids)}


def encode_row(tokenizer, record: Mapping, fmt: DataFormat, config: TokenizeConfig, index: int):
    """Tokenize and truncate one normalised record (see `formats.normalize_row`)."""
    out = _encode_row(tokenizer, record, fmt, config, index)
    out.update({f: record[f] for f in fmt.extra_fields})
    return out


def _encode_row(tokenizer, record: Mapping, fmt: DataFormat, config: TokenizeConfig, index: int):
    if fmt.kind == "language_modeling":
        return _encode_text(tokenizer, record, fmt, config, index)
    if fmt.kind == "prompt_only":
        return _encode_prompt(tokenizer, record, fmt, config, index)
    single = fmt.kind in ("unpaired", "prompt_completion")
    sides = ("completion",) if single else ("chosen", "rejected")
    prompt_ids, full = _encode_sides(
        tokenizer,
        record["prompt"],
        {s: record[s] for s in sides},
        fmt.conversational,
        config.add_eos,
    )
    if not prompt_ids:
        raise RowError(index, "prompt", "tokenizes to no token")
    out = {"row": index}
    for side in sides:
        completion = full[side][len(prompt_ids) :]
        if not completion:
            raise RowError(index, side, "tokenizes to no completion token after the prompt")
        try:
            p, c = truncate_sequence(
                prompt_ids,
                completion,
                max_length=config.max_length,
                max_prompt_length=config.max_prompt_length,
                max_completion_length=config.max_completion_length,
                mode=config.truncation_mode,
            )
        except ValueError as err:
            raise RowError(index, side, str(err)) from None
        prefix = "" if side == "completion" else f"{side}_"
        out[f"{prefix}input_ids"] = p + c
        out[f"{prefix}prompt_length"] = len(p)
        if fmt.kind == "unpaired":  # KTO's KL rows pair it, whole, with another prompt (TRL)
            limit = config.max_completion_length
            out["kl_completion_ids"] = completion if limit is None else completion[:limit]
    if single:
        if fmt.kind == "unpaired":
            out["label"] = record["label"]
        out["length"] = len(out["input_ids"])
    else:
        out["length"] = max(len(out["chosen_input_ids"]), len(out["rejected_input_ids"]))
        for field in fmt.win_fields:
            out[field] = record[field]
    return out


def _features(fmt: DataFormat) -> datasets.Features:
    ids = datasets.Sequence(datasets.Value("int32"))
    f = {"row": datasets.Value("int64"), "length": datasets.Value("int32")}
    if fmt.kind in SINGLE_KINDS:
        f.update(input_ids=ids, prompt_length=datasets.Value("int32"))
        if fmt.kind == "unpaired":
            f["label"] = datasets.Value("bool")
            f["kl_completion_ids"] = ids
    else:
        for side in ("chosen", "rejected"):
            f[f"{side}_input_ids"] = ids
            f[f"{side}_prompt_length"] = datasets.Value("int32")
        for field in fmt.win_fields:
            f[field] = datasets.Value("float64")
    for field in fmt.extra_fields:
        f[field] = datasets.Value("string" if field == "prompt_id" else "float64")
    f["error_field"] = datasets.Value("string")
    f["error"] = datasets.Value("string")
    return datasets.Features(f)


def _blank(fmt: DataFormat, index: int, err: RowError) -> dict:
    out = {"row": index, "length": 0, "error_field": err.field, "error": err.problem}
    if fmt.kind in SINGLE_KINDS:
        out.update(input_ids=[], prompt_length=0)
        if fmt.kind == "unpaired":
            out["label"] = False
            out["kl_completion_ids"] = []
    else:
        out.update(chosen_input_ids=[], chosen_prompt_length=0)
        out.update(rejected_input_ids=[], rejected_prompt_length=0)
        out.update({f: 0.0 for f in fmt.win_fields})
    out.update({f: "" if f == "prompt_id" else 0.0 for f in fmt.extra_fields})
    return out


def _map_row(row, index, *, tokenizer, fmt, config, skip):
    try:
        out = encode_row(tokenizer, normalize_row(row, index, fmt), fmt, config, index)
    except RowError as err:
        if not skip:
            raise
        return _blank(fmt, index, err)
    out.update(error_field="", error="")
    return out


def _reason(problem: str) -> str:
    """A row-independent reason for the report (row numbers and lengths stripped)."""
    return re.sub(r"\d+", "N", problem)


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    config: TokenizeConfig = TokenizeConfig(),
    fmt: DataFormat | None = None,
    columns: Mapping[str, str] | None = None,
    kind: str | None = None,
    on_error: str = "raise",
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
) -> TokenizedDataset:
    """Validate, tokenize and truncate every row of `dataset` (cached by `datasets.map`).

    Args:
      dataset: a `datasets.Dataset` (file-backed datasets, e.g. from `load_preference_dataset`,
        cache the tokenized result next to their files, keyed by `datasets`' fingerprint of
        the data, the tokenizer and `config`; reruns reuse it).
      tokenizer: a transformers tokenizer (`load_tokenizer`).
      config: lengths and truncation mode.
      fmt: the data format; detected from the columns and the first row when None.
      columns: canonical field -> column name, for renamed columns (when `fmt` is None).
      kind: force the detected kind (when `fmt` is None), where the columns fit several.
      on_error: "raise" (RowError naming the first bad row and field) or "skip" (drop bad rows
        and count them in `report`).

    Returns:
      A `TokenizedDataset` (the tokenized rows, their format and a `DataReport`).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("`dataset` has no rows")
    if fmt is None:
        fmt = detect_format(dataset.column_names, dataset[0], columns, kind=kind)
    elif columns or kind:
        raise ValueError("give the column mapping and kind inside `fmt` (a DataFormat), not both")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mapped = dataset.map(
        _map_row,
        with_indices=True,
        fn_kwargs=dict(tokenizer=tokenizer, fmt=fmt, config=config, skip=on_error == "skip"),
        remove_columns=dataset.column_names,
        features=_features(fmt),
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        desc="tokenizing",
    )
    errors = mapped["error"]
    bad = [i for i, e in enumerate(errors) if e]
    every = ()
    if bad:
        fields = mapped["error_field"]
        every = tuple((i, fields[i], errors[i]) for i in bad)
        mapped = mapped.select([i for i in range(len(mapped)) if not errors[i]])
    skipped = collections.Counter((field, _reason(problem)) for _, field, problem in every)
    mapped = mapped.remove_columns(["error", "error_field"])
    report = DataReport(len(dataset), len(mapped), dict(skipped), every)
    if len(mapped) == 0:
        raise ValueError(f"every row was skipped:\n{report}")
    return TokenizedDataset(mapped, fmt, report, pad_id, config)
