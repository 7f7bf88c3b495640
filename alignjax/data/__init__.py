"""Tokenizers and preference data: local datasets -> validated, tokenized, static-shape batches.

    tok = data.shipped_tokenizer()                      # or data.load_tokenizer(local_dir)
    raw = data.shipped_dataset("train")                 # or data.load_preference_dataset(path)
    tokenized = data.tokenize_dataset(raw, tok, config=data.TokenizeConfig(max_length=128))
    loader = data.DataLoader(tokenized, data.LoaderConfig(batch_size=8, buckets=(64, 128)))
    for step, batch in loader.epoch(0):
        out = model(**batch.model_inputs())             # [chosen; rejected] rows

Modules: `formats` (detection, column mapping, row validation), `tokenize` (TRL-style
tokenization, truncation, skip report, `datasets` caching), `batching` (padded / bucketed /
packed batches, `unpack`, `sequence_sums`), `loader` (deterministic epochs, per-host shards,
resumable positions), `load` (local files and directories), `synthetic` (the shipped data).
"""

from alignjax.data import batching, formats, load, loader, synthetic, tokenize
from alignjax.data.batching import (
    Batch,
    bucket_length,
    collate,
    collate_prompts,
    default_buckets,
    pack,
    sequence_sums,
    shift_labels,
    unpack,
)
from alignjax.data.formats import (
    DataFormat,
    RowError,
    detect_format,
    normalize_row,
)
from alignjax.data.load import (
    load_preference_dataset,
    load_tokenizer,
    shipped_dataset,
    shipped_tokenizer,
)
from alignjax.data.loader import DataLoader, LoaderConfig, UnlearnLoader, epoch_order
from alignjax.data.tokenize import (
    DataReport,
    TokenizeConfig,
    TokenizedDataset,
    encode_row,
    tokenize_dataset,
)
from alignjax.data.unpair import unpair_preference_dataset

__all__ = [
    "batching",
    "formats",
    "load",
    "loader",
    "synthetic",
    "tokenize",
    "Batch",
    "bucket_length",
    "collate",
    "collate_prompts",
    "default_buckets",
    "pack",
    "sequence_sums",
    "shift_labels",
    "unpack",
    "DataFormat",
    "RowError",
    "detect_format",
    "normalize_row",
    "unpair_preference_dataset",
    "load_preference_dataset",
    "load_tokenizer",
    "shipped_dataset",
    "shipped_tokenizer",
    "DataLoader",
    "UnlearnLoader",
    "LoaderConfig",
    "epoch_order",
    "DataReport",
    "TokenizeConfig",
    "TokenizedDataset",
    "encode_row",
    "tokenize_dataset",
]
