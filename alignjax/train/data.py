"""A run's data: tokenized train and eval splits, checked against the task.

`data.eval` is "auto" by default: the shipped held-out pairs when training on `shipped:train`,
otherwise a held-out slice (`data.eval_fraction`, drawn with `data.seed`) of the training data
itself, removed from training and said once in the log; never unrelated data. `data.eval=null`
turns evaluation off; any other value names a source.

Task unlearn: `data.train` is the forget set and `data.retain` the retain set (`load_retain`);
both are evaluated (their NLL) by the run itself, so "auto" holds nothing out of the forget set
and `data.eval` is only an extra utility set (held-out text) when it names a source.
"""

from __future__ import annotations

import logging

import numpy as np

from alignjax import data as D

__all__ = [
    "TASK_KINDS",
    "raw_split",
    "load_split",
    "load_data",
    "load_retain",
    "hold_out",
    "hold_out_rows",
]

log = logging.getLogger(__name__)

TASK_KINDS = {
    "sft": ("language_modeling", "prompt_completion"),
    "paired": ("paired", "sppo"),
    "unpaired": ("unpaired",),
    "unlearn": ("language_modeling", "prompt_completion"),  # forget, retain and eval sets
    "online": ("prompt_only",),  # any rows with a prompt: the other columns go to the rewards
    "reward": ("paired",),  # a reward model on preference pairs (a `margin` column optional)
}
MIN_HOLD_OUT_ROWS = 20  # below this many training rows, "auto" evaluates nothing


def raw_split(source: str, cfg):
    """The rows of `shipped:<split>` (train / test / sft) or a local file / directory (`path`
    or `path::split`) as a `datasets.Dataset`, before tokenization."""
    if source.startswith("shipped:"):
        return D.shipped_dataset(source.split(":", 1)[1], cache_dir=cfg.data.cache_dir)
    path, _, split = source.partition("::")
    return D.load_preference_dataset(path, split=split or "train", cache_dir=cfg.data.cache_dir)


def load_split(source: str, cfg, tokenizer, task: str):
    """`shipped:<split>` (train / test / sft) or a local file / directory (`path` or
    `path::split`), tokenized and checked against the task."""
    raw = raw_split(source, cfg)
    d = cfg.data
    names = set(raw.column_names)
    if task == "unpaired" and {"chosen", "rejected"} <= names and d.format in (None, "unpaired"):
        if "label" in names or "completion" in names:
            raise ValueError(f"{source!r} has chosen/rejected and completion/label columns; "
                             "set data.format to say which rows these are")  # fmt: skip
        n = len(raw)
        raw = D.unpair_preference_dataset(raw)
        log.warning("%s: %d pairs unpaired into %d rows (chosen: label true, rejected: false), "
                    "as TRL's KTOTrainer does", source, n, len(raw))  # fmt: skip
    tok_cfg = D.TokenizeConfig(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        max_completion_length=d.max_completion_length,
        truncation_mode=d.truncation_mode,
    )
    tokenized = D.tokenize_dataset(
        raw,
        tokenizer,
        config=tok_cfg,
        columns=dict(d.columns) or None,
        kind="prompt_only" if task == "online" and d.format is None else d.format,
        on_error=d.on_error,
    )
    if tokenized.format.kind not in TASK_KINDS[task]:
        raise ValueError(
            f"{source!r} holds {tokenized.format.kind} rows, but task={task!r} needs "
            f"{' or '.join(TASK_KINDS[task])} rows"
        )
    if tokenized.report.n_skipped:
        log.warning("%s: %s", source, tokenized.report)
    return tokenized


def hold_out_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) row indices of `n` rows: `fraction` of them (at least one) drawn with
    `seed`, both sorted."""
    k = max(1, int(round(fraction * n)))
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    return np.setdiff1d(np.arange(n), held), held


def hold_out(tokenized, fraction: float, seed: int):
    """(train, held-out) rows of a tokenized split: `fraction` of them (at least one) drawn
    with `seed`, both in their original order."""
    keep, held = hold_out_rows(len(tokenized), fraction, seed)

    def subset(idx):
        return D.TokenizedDataset(tokenized.dataset.select(idx.tolist()), tokenized.format,
                                  tokenized.report, tokenized.pad_id,
                                  tokenized.config)  # fmt: skip

    return subset(keep), subset(held)


def load_data(cfg, tokenizer, *, with_train_data: bool = True):
    """(train, eval) tokenized splits of a run (either may be None; see the module docstring)."""
    d = cfg.data
    source = d.eval
    if cfg.task == "unlearn":  # the forget set itself is evaluated: nothing is held out of it
        train = _named("data.train (the forget set)", load_split, d.train, cfg, tokenizer,
                       cfg.task)  # fmt: skip
        extra = source not in (None, "auto")
        held = load_split(source, cfg, tokenizer, cfg.task) if extra else None
        return train, held
    if source == "auto" and d.train == "shipped:train":
        source = "shipped:test"
    if source != "auto":
        train = load_split(d.train, cfg, tokenizer, cfg.task) if with_train_data else None
        held = load_split(source, cfg, tokenizer, cfg.task) if source else None
        return train, held
    train = load_split(d.train, cfg, tokenizer, cfg.task)
    if len(train) < MIN_HOLD_OUT_ROWS:
        log.warning("data.eval=auto: %s has %d rows, too few to hold out a slice; no evaluation "
                    "(pass data.eval=<source>)", d.train, len(train))  # fmt: skip
        return (train if with_train_data else None), None
    train, held = hold_out(train, d.eval_fraction, d.seed)
    log.warning("data.eval=auto: evaluating on %d of the %d rows of %s, held out of training "
                "(data.eval_fraction=%g, data.seed=%d; data.eval=null for no evaluation)",
                len(held), len(held) + len(train), d.train, d.eval_fraction, d.seed)  # fmt: skip
    return (train if with_train_data else None), held


def load_retain(cfg, tokenizer):
    """Task unlearn's retain set (`data.retain`), tokenized; None for other tasks."""
    if cfg.task != "unlearn":
        return None
    return _named("data.retain", load_split, cfg.data.retain, cfg, tokenizer, cfg.task)


def _named(key: str, fn, *args):
    """`fn(*args)` with a ValueError prefixed by the config key it concerns."""
    try:
        return fn(*args)
    except ValueError as err:
        raise ValueError(f"`{key}`: {err}") from err
