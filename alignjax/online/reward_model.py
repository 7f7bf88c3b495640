"""A reward model trained by alignjax (`task: reward`) as a scorer for the on-policy methods.

`alignjax train` with `task: reward` exports the decoder to `export/merged` (HF safetensors and
tokenizer, as every run) plus the value head and how the rows were tokenized:

    export/merged/reward_head.safetensors   {"score.weight": [1, D]} (HF's sequence-classification
                                            head name)
    export/merged/reward_config.json        num_labels 1, the tokenization lengths / truncation

`reward_model_scorer(path)` loads them back as a reward function with TRL's signature
`fn(prompts, completions, **kwargs) -> list[float]`: each (prompt, completion) is tokenized as
the training pairs were (`data.encode_row`: prompt + completion + EOS for text, the chat
template for conversational rows, the same truncation; an empty completion, a policy that
stopped at once, is prompt + EOS), right-padded, and scored by the value
head at the last real token (`models.reward.sequence_scores`). Pass it where a reward function
goes (`online.score([scorer], ...)`, or `online.register_reward("rm", scorer)` for a config).

One difference from TRL 1.16's RewardTrainer: it drops pairs longer than `max_length`; here
they are cut like every other paired row (`data.truncation_mode`), so a cut row is scored at
its last kept token. Set `data.max_length` above the data's longest pair (or null) for TRL's
behaviour on the rows it keeps.

    >>> scorer = reward_model_scorer("runs/rm")                    # doctest: +SKIP
    >>> scorer(["review: we went"], [" the food was great."])       # doctest: +SKIP
    [1.73...]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["save_reward_head", "load_reward_model", "reward_model_scorer", "HEAD_FILE",
           "CONFIG_FILE"]  # fmt: skip

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
TOKENIZE_KEYS = ("max_length", "max_prompt_length", "max_completion_length", "truncation_mode")


def save_reward_head(state, cfg, directory) -> Path:
    """Write the state's value head (`score.weight`, `[1, D]` float32) and the tokenization
    settings of `cfg.data` next to an exported decoder; returns the head file's path."""
    from safetensors.numpy import save_file

    from alignjax.models.reward import HEAD_NAME, HF_HEAD_KEY
    from alignjax.train.state import heads_of

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kernel = np.asarray(getattr(heads_of(state), HEAD_NAME).kernel[...], np.float32)
    path = directory / HEAD_FILE
    save_file({HF_HEAD_KEY: np.ascontiguousarray(kernel.T)}, str(path))
    meta = {"num_labels": 1, "head": HF_HEAD_KEY, "score_at": "last attention_mask token",
            "tokenize": {k: getattr(cfg.data, k) for k in TOKENIZE_KEYS}}  # fmt: skip
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def _export_dir(path) -> Path:
    path = Path(path)
    for candidate in (path, path / "export" / "merged", path / "merged"):
        if (candidate / HEAD_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{str(path)!r} holds no reward model: expected {HEAD_FILE} in it or "
                            "in export/merged (a `task: reward` run directory)")  # fmt: skip


def load_reward_model(path):
    """`(model, head, tokenizer, TokenizeConfig)` of an exported reward model (a run directory,
    its `export/merged`, or any directory holding the files; see the module docstring)."""
    from safetensors.numpy import load_file

    from alignjax import data as D
    from alignjax import models
    from alignjax.models.reward import HF_HEAD_KEY, ValueHead

    directory = _export_dir(path)
    model = models.load_pretrained(directory)
    weight = load_file(str(directory / HEAD_FILE))[HF_HEAD_KEY]  # [1, D]
    d = model.config.hidden_size
    if weight.shape != (1, d):
        raise ValueError(f"{directory / HEAD_FILE}: `{HF_HEAD_KEY}` must be [1, {d}], "
                         f"got {list(weight.shape)}")  # fmt: skip
    head = ValueHead(d)
    head.kernel[...] = jnp.asarray(weight.T, jnp.float32)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    config = D.TokenizeConfig(**meta["tokenize"])
    return model, head, D.load_tokenizer(directory), config


def _encode(tokenizer, config, prompts, completions) -> list[dict]:
    from alignjax.data.formats import DataFormat, RowError, normalize_row
    from alignjax.data.tokenize import encode_row

    if len(prompts) != len(completions):
        raise ValueError(f"`prompts` ({len(prompts)}) and `completions` ({len(completions)}) "
                         "must have the same length")  # fmt: skip
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        fmt = DataFormat("prompt_completion", conversational=isinstance(p, list))
        # A policy may stop at once: an empty text completion is scored as prompt + EOS (a
        # dataset row may not be empty, so the row check sees a placeholder).
        empty = isinstance(c, str) and not c.strip()
        try:
            record = normalize_row({"prompt": p, "completion": "." if empty else c}, i, fmt)
            if empty:
                record = dict(record, completion=c)
            rows.append(encode_row(tokenizer, record, fmt, config, i))
        except RowError as err:
            raise ValueError(f"reward model scorer: completion {i}: {err}") from None
    return rows


def reward_model_scorer(path, *, batch_size: int = 32) -> Callable[..., list[float]]:
    """A TRL-signature reward function `fn(prompts, completions, **kwargs) -> list[float]`
    scoring with the reward model exported at `path` (see the module docstring). Rows are
    scored `batch_size` at a time, right-padded to a power of two (few compiled shapes)."""
    from alignjax import data as D
    from alignjax.models.reward import sequence_scores

    model, head, tokenizer, config = load_reward_model(path)
    graphdef, params = nnx.split((model, head))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @jax.jit
    def scores(params, ids, mask, positions):
        m, h = nnx.merge(graphdef, params)
        return sequence_scores(m, h, ids, mask, positions)

    def reward_model(prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        rows = _encode(tokenizer, config, list(prompts), list(completions))
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            longest = max(len(r["input_ids"]) for r in chunk)
            length = 1 << max(3, (longest - 1).bit_length())
            b = D.collate(chunk, length, pad_id=pad_id, batch_size=batch_size)
            r = scores(params, b.input_ids, b.attention_mask, b.positions)
            out.extend(float(x) for x in np.asarray(r)[: len(chunk)])
        return out

    reward_model.__name__ = f"reward_model:{Path(path).name}"
    return reward_model
