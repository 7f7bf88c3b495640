"""Precomputed reference log-probs, persisted and keyed by a fingerprint.

`precompute(model, tokenized, cache_dir=...)` runs the reference once over a tokenized dataset
and stores, per example and side, the per-token log-probs of its sequence (aligned with
`data.Batch.labels`: entry t is log p(token t + 1)). The file name is a SHA-256 of
(the tokenized data's `datasets` fingerprint, which covers the raw data, the tokenizer and the
lengths; the reference weights' bytes; the format of this cache), so a second run with the same
inputs loads it and any change to data, tokenizer, lengths or weights computes a new one.
`RefCache.attach(batch)` fills `batch.ref_logps` `[R, L]` for the step's "precomputed"
reference; per-token values serve token-level losses too (sequence sums are derived).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax import ops
from alignjax.data.batching import Batch, collate

__all__ = ["RefCache", "weights_fingerprint", "cache_key", "precompute"]

FORMAT = "alignjax-ref-logps-v1"


def weights_fingerprint(state) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (order-independent of insertion).
    PRNG key leaves (e.g. the dropout streams of adapter layers) are not weights: skipped."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            continue
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def cache_key(tokenized, weights: str, extra: dict | None = None) -> str:
    payload = json.dumps(
        {"format": FORMAT, "data": tokenized.fingerprint, "weights": weights, **(extra or {})},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclasses.dataclass
class RefCache:
    """Per-token reference log-probs of every (row, side): `values[offsets[i]:offsets[i+1]]`
    for sequence i, where sequences are ordered (row 0 chosen, row 0 rejected, row 1 ...)
    for paired data and one per row for unpaired data."""

    key: str
    rows: np.ndarray  # [N] source row ids, in the order stored
    offsets: np.ndarray  # [N * sides + 1]
    values: np.ndarray  # float32, concatenated per-token log-probs
    sides: int
    path: Path | None = None
    loaded: bool = False  # True when read from disk rather than computed

    def sequence(self, row: int, side: int) -> np.ndarray:
        i = self._index[int(row)] * self.sides + side
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __post_init__(self):
        self._index = {int(r): i for i, r in enumerate(self.rows)}

    def attach(self, batch: Batch) -> Batch:
        """`batch` with `ref_logps` `[R, L]` (0 on padding examples and masked positions)."""
        if batch.packed:
            raise ValueError("attach precomputed reference log-probs to padded batches; packed "
                             "rows need `data.unpack` first")  # fmt: skip
        rows = np.asarray(batch.rows)
        r, length = np.asarray(batch.input_ids).shape
        out = np.zeros((r, length), np.float32)
        e = rows.shape[0]
        for k, row in enumerate(rows):
            if row < 0:
                continue
            for side in range(self.sides):
                seq = self.sequence(row, side)
                out[side * e + k, : len(seq)] = seq[:length]
        mask = np.asarray(batch.loss_mask) != 0
        return dataclasses.replace(batch, ref_logps=np.where(mask, out, 0.0))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, rows=self.rows, offsets=self.offsets, values=self.values,
                 sides=np.asarray(self.sides), key=np.asarray(self.key))  # fmt: skip
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache

    @classmethod
    def load(cls, path: Path) -> RefCache:
        with np.load(path) as z:
            return cls(str(z["key"]), z["rows"], z["offsets"], z["values"], int(z["sides"]),
                       path=path, loaded=True)  # fmt: skip


def precompute(
    model: nnx.Module,
    tokenized,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    length: int | None = None,
    extra_key: dict | None = None,
) -> RefCache:
    """Reference per-token log-probs of every example of `tokenized`, cached under `cache_dir`.

    `model` is the reference (e.g. the SFT model, or a policy inside `peft.adapters_disabled`;
    its full state is fingerprinted). Returns the cache (`loaded` tells whether it was reused).
    """
    key = cache_key(tokenized, weights_fingerprint(nnx.state(model)), extra_key)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"ref-logps-{key}.npz"
        if path.is_file():
            return RefCache.load(path)
    paired = tokenized.format.kind != "unpaired"
    sides = 2 if paired else 1
    length = length or -(-int(tokenized.lengths.max()) // 8) * 8

    @nnx.jit
    def logps(model, batch):
        h = model(**batch.model_inputs()).last_hidden_state
        return ops.fused_token_logps(h, model.unembed(), batch.labels, batch.loss_mask)

    ds = tokenized.dataset
    rows, seqs = [], {}
    for start in range(0, len(ds), batch_size):
        examples = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        batch = collate(examples, length, pad_id=tokenized.pad_id, batch_size=batch_size)
        values = np.asarray(logps(model, jax.tree.map(jnp.asarray, batch)))
        for k, e in enumerate(examples):
            rows.append(int(e["row"]))
            for side in range(sides):
                ids = (
                    e[["chosen_input_ids", "rejected_input_ids"][side]]
                    if paired
                    else e["input_ids"]
                )
                seqs[(int(e["row"]), side)] = values[side * batch_size + k, : len(ids)]
    ordered = [seqs[(r, s)] for r in rows for s in range(sides)]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ordered])]).astype(np.int64)
    cache = RefCache(key, np.asarray(rows, np.int64), offsets,
                     np.concatenate(ordered).astype(np.float32), sides, path=path)  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.save(path)
    return cache
