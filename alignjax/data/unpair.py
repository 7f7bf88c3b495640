"""Paired preference rows -> unpaired (KTO) rows, as TRL's `unpair_preference_dataset`."""

from __future__ import annotations

from alignjax.data.formats import common_prefix_length

__all__ = ["unpair_preference_dataset"]


def _trl_prompt_split(chosen, rejected):
    """(prompt, chosen, rejected) by TRL's `extract_prompt` rule, never raising (an empty part
    fails the unpaired rows' validation instead)."""
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def unpair_preference_dataset(dataset, *, batch_size: int = 1000):
    """Paired rows -> unpaired rows, as TRL's `unpair_preference_dataset` (what `KTOTrainer` does
    with a paired dataset): per block of `batch_size` pairs, every chosen completion
    (label True), then every rejected one (label False), each with its prompt and the other
    columns repeated. Without a prompt column the prompt is first taken from what chosen and
    rejected share (TRL's `extract_prompt`). Row i of the result comes from pair
    `start + (i - start) % len(block)` of its block."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}")
    names = dataset.column_names
    missing = [c for c in ("chosen", "rejected") if c not in names]
    if missing:
        raise ValueError(f"unpairing needs chosen and rejected columns; missing {missing}")

    def unpair(batch):
        chosen, rejected = batch["chosen"], batch["rejected"]
        if "prompt" in batch:
            prompts = batch["prompt"]
        else:
            split = [_trl_prompt_split(c, r) for c, r in zip(chosen, rejected)]
            prompts = [p for p, _, _ in split]
            chosen, rejected = [c for _, c, _ in split], [r for _, _, r in split]
        n = len(chosen)
        out = {
            "completion": list(chosen) + list(rejected),
            "label": [True] * n + [False] * n,
            "prompt": list(prompts) + list(prompts),
        }
        for k, v in batch.items():
            if k not in ("chosen", "rejected", "prompt"):
                out[k] = list(v) + list(v)
        return out

    return dataset.map(unpair, batched=True, batch_size=batch_size, remove_columns=names,
                       desc="unpairing")  # fmt: skip
