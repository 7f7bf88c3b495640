"""Load tokenizers and datasets from local paths (hub names only when the caller asks and is
online), and the shipped synthetic review data (`alignjax.data.synthetic`)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from alignjax.data.formats import RowError
from alignjax.data.synthetic import ASSETS

__all__ = ["load_tokenizer", "load_preference_dataset", "shipped_tokenizer", "shipped_dataset"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained` on a local directory (never the network)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{str(path)!r} has no tokenizer.json or tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def shipped_tokenizer():
    """The byte-level BPE tokenizer built by `alignjax.data.synthetic` (vocabulary 512)."""
    return load_tokenizer(ASSETS / "tokenizer")


def _raise_bad_json_line(path: Path) -> None:
    """Name the first line of a JSONL file that is not a JSON object (`datasets` does not)."""
    with path.open(encoding="utf-8") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise RowError(row, "<json>", f"{path.name} line {row + 1}: {err}") from None
            if not isinstance(value, dict):
                raise RowError(row, "<json>", f"{path.name} line {row + 1} is not an object")


def _split_file(directory: Path, split: str) -> Path | None:
    for suffix in (*_BUILDERS, ".arrow"):
        f = directory / f"{split}{suffix}"
        if f.is_file():
            return f
    return None


def _load_folder(path: Path, split: str, cache_dir) -> datasets.Dataset:
    """A local folder of data files, split as `datasets.load_dataset(folder)` splits it (what
    `trl dpo --dataset_name folder` reads: file names such as `train-*.jsonl` / `test.parquet`
    name splits, a lone file is "train")."""
    names = sorted(p.name for p in path.iterdir())
    if not any(Path(n).suffix in _BUILDERS for n in names):
        raise FileNotFoundError(
            f"{str(path)!r} has no {split}.{{json,jsonl,parquet,csv,arrow}}, no data files and "
            f"is not a saved dataset; it holds {names}"
        )
    try:
        loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise ValueError(f"cannot read the folder {str(path)!r}: {err}") from err
    if split not in loaded:
        raise ValueError(f"{str(path)!r} has splits {list(loaded)}, not {split!r}")
    return loaded[split]


def load_preference_dataset(
    source: str | Path,
    *,
    split: str = "train",
    cache_dir: str | Path | None = None,
    hub: bool = False,
) -> datasets.Dataset:
    """A `datasets.Dataset` from a local file or directory.

    Args:
      source: a `.json` / `.jsonl` / `.parquet` / `.csv` / `.arrow` file; a directory written by
        `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; a directory holding
        `<split>.<ext>` files; or any folder of data files, split as `datasets.load_dataset`
        splits a local folder (a lone file is "train"). With `hub=True`, a dataset name on the
        Hugging Face hub.
      split: the split to return from a DatasetDict or a directory of split files.
      cache_dir: where `datasets` keeps its Arrow cache (default: its own, `HF_DATASETS_CACHE`).
      hub: allow `source` to be a hub name (needs the network; off by default).

    The result is file-backed, so `tokenize_dataset` caches its work and reruns reuse it.
    """
    path = Path(source)
    cache_dir = None if cache_dir is None else str(cache_dir)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{str(path)!r} has splits {list(loaded)}, not {split!r}")
                loaded = loaded[split]
            return loaded
        found = _split_file(path, split)
        if found is None:
            return _load_folder(path, split, cache_dir)
        path = found
    if path.is_file():
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        if path.suffix not in _BUILDERS:
            raise ValueError(
                f"cannot read {str(path)!r}: expected one of {sorted(_BUILDERS)} or .arrow"
            )
        if path.suffix in (".json", ".jsonl", ".csv") and not path.read_bytes().strip():
            raise ValueError(f"{str(path)!r} is empty: it holds no rows")
        try:
            return datasets.load_dataset(
                _BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir
            )
        except datasets.exceptions.DatasetGenerationError as err:
            if path.suffix == ".jsonl":
                _raise_bad_json_line(path)
            raise ValueError(f"cannot read {str(path)!r}: {err.__cause__ or err}") from err
    if not hub:
        raise FileNotFoundError(
            f"{str(source)!r} is not a local file or directory (pass hub=True to load a dataset "
            "by name from the Hugging Face hub, which needs the network)"
        )
    return datasets.load_dataset(str(source), split=split, cache_dir=cache_dir)


def shipped_dataset(split: str = "train", *, cache_dir: str | Path | None = None):
    """The shipped synthetic review data: split "train" / "test" (pairs) or "sft" (texts)."""
    return load_preference_dataset(ASSETS / "reviews", split=split, cache_dir=cache_dir)
