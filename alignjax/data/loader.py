"""Deterministic epochs of static-shape batches, sharded per host.

The plan of an epoch (which examples form each global batch, and its padded length) depends
only on (seed, epoch, the tokenized lengths, the config), so every host of a multi-process run
computes the same plan and takes its own contiguous slice of each global batch
(`process_index`, `process_count`; the global batch must divide evenly). A data position is
(epoch, batch index): `DataLoader.epoch(e, start=k)` resumes exactly where a run stopped.

Shapes: padded batches use the smallest bucket that holds the longest sequence of the global
batch (at most `len(buckets)` compiled shapes; with `sort_window > 1`, examples are sorted by
length within windows of that many batches before batching, and the batch order is shuffled
again, which cuts padding). Packed batches have `pack_rows` rows of `pack_length` tokens per
host and at most `max_examples` examples.

The last, short global batch is dropped (`remainder="drop"`, counted in `dropped`) or padded
with `valid = 0` examples (`remainder="pad"`). Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from alignjax.data.batching import (
    Batch,
    bucket_length,
    collate,
    default_buckets,
    mismatched_lengths,
    pack,
)

__all__ = ["LoaderConfig", "DataLoader", "UnlearnLoader", "epoch_order"]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Batching of a tokenized dataset.

    Attributes:
      batch_size: global batch, in examples (pairs for paired data), across all hosts.
      seed: shuffling seed; the order of epoch e is a permutation drawn from (seed, e).
      shuffle: False keeps the dataset order.
      buckets: padded lengths; None: `default_buckets(longest example)`.
      sort_window: > 1 sorts by length within windows of this many global batches.
      remainder: "drop" or "pad" the last short global batch.
      packing: pack sequences into `pack_rows` x `pack_length` rows per host.
      share_prompt: with `packing`, paired examples: each pair's prompt is packed once and
        shared by its two completion branches (`batching.pack(share_prompt=True)`).
      max_examples: packed batches hold at most this many examples per host (static shape of
        the per-example arrays); None: as many as the shortest sequences could fill.
      kto_kl: unpaired data: append KTO's mismatched (prompt, completion) rows to each host
        batch (`batching.collate(kto_kl=True)`).
    """

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    buckets: tuple[int, ...] | None = None
    sort_window: int = 1
    remainder: str = "drop"
    packing: bool = False
    pack_length: int = 512
    pack_rows: int = 8
    max_examples: int | None = None
    kto_kl: bool = False
    share_prompt: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"`remainder` must be 'drop' or 'pad', got {self.remainder!r}")
        if self.share_prompt and not self.packing:
            raise ValueError("`share_prompt` packs each pair's prompt once: set `packing` true")
        if self.kto_kl and self.packing:
            raise ValueError("`kto_kl` rows are built per padded batch; turn off `packing`")
        if self.sort_window < 1:
            raise ValueError(f"`sort_window` must be >= 1, got {self.sort_window}")
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def _as_padding(batch: Batch) -> Batch:
    """The same shapes with nothing that counts (valid = 0, empty loss mask)."""
    return dataclasses.replace(
        batch,
        valid=np.zeros_like(batch.valid),
        rows=np.full_like(batch.rows, -1),
        loss_mask=np.zeros_like(batch.loss_mask),
    )


class DataLoader:
    """Iterate a `TokenizedDataset` in per-host static-shape batches.

    Example:
      loader = DataLoader(tokenized, LoaderConfig(batch_size=8, buckets=(64, 128)))
      for step, batch in loader.epoch(0): ...
    """

    def __init__(
        self,
        tokenized,
        config: LoaderConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:  # this JAX process's shard
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if not config.packing and config.batch_size % process_count:
            raise ValueError(
                f"global batch_size {config.batch_size} does not split over {process_count} "
                "processes"
            )
        self.data, self.config = tokenized, config
        self.process_index, self.process_count = process_index, process_count
        self.lengths = tokenized.lengths
        longest = int(self.lengths.max())
        if config.kto_kl:
            ds = tokenized.dataset
            self._prompt_lengths = np.asarray(ds["prompt_length"], np.int64)
            if "kl_completion_ids" in ds.column_names:
                self._kl_lengths = np.asarray([len(c) for c in ds["kl_completion_ids"]], np.int64)
            else:
                self._kl_lengths = self.lengths - self._prompt_lengths
            kl_max = tokenized.config.max_length
            longest = max(longest, int(self._prompt_lengths.max() + self._kl_lengths.max())
                          if kl_max is None else kl_max)  # fmt: skip
        self.buckets = config.buckets or default_buckets(longest)
        if not config.packing:
            bucket_length(longest, self.buckets)  # fail now, not mid-epoch
        self.dropped = 0

    def _paired(self) -> bool:
        return "chosen_input_ids" in self.data.dataset.column_names

    def plan(self, epoch: int) -> list[np.ndarray]:
        """Global batches of example indices for `epoch` (the same on every host)."""
        cfg = self.config
        order = epoch_order(len(self.lengths), cfg.seed, epoch, cfg.shuffle)
        if cfg.packing:
            return [order]  # packing consumes the order greedily, see `_packed`
        b = cfg.batch_size
        if cfg.sort_window > 1:
            w = b * cfg.sort_window
            order = np.concatenate(
                [
                    c[np.argsort(self.lengths[c], kind="stable")]
                    for c in np.split(order, range(w, len(order), w))
                ]
            )
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        if len(batches[-1]) < b and cfg.remainder == "drop":
            self.dropped = len(batches.pop())
        if cfg.sort_window > 1 and cfg.shuffle:
            perm = np.random.default_rng([int(cfg.seed), int(epoch), 1]).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def __len__(self) -> int:
        if self.config.packing:
            raise TypeError("the number of packed batches depends on the epoch; use `plan`")
        n, b = len(self.lengths), self.config.batch_size
        return n // b if self.config.remainder == "drop" else -(-n // b)

    def _host(self, indices: np.ndarray, host: int | None = None) -> np.ndarray:
        """Host `host`'s (default: this one's) slice of a padded global batch."""
        host = self.process_index if host is None else host
        per = self.config.batch_size // self.process_count
        return indices[host * per : (host + 1) * per]

    def _longest(self, indices: np.ndarray) -> int:
        """The longest row of a global batch, KTO's KL rows included (each host rotates its
        own slice)."""
        longest = int(self.lengths[indices].max())
        if not self.config.kto_kl:
            return longest
        padded = np.pad(indices, (0, self.config.batch_size - len(indices)), constant_values=-1)
        for host in range(self.process_count):
            mine = [int(i) for i in self._host(padded, host) if i >= 0]
            if mine:
                kl = mismatched_lengths(self._prompt_lengths[mine], self._kl_lengths[mine],
                                        self.data.config.max_length)  # fmt: skip
                longest = max(longest, int(kl.max()))
        return longest

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield `(batch_index, batch)` for this host, from global batch `start` on."""
        if self.config.packing:
            yield from self._packed(epoch, start)
            return
        per = self.config.batch_size // self.process_count
        for k, indices in enumerate(self.plan(epoch)):
            if k < start:
                continue
            length = bucket_length(self._longest(indices), self.buckets)
            mine = self._host(
                np.pad(indices, (0, self.config.batch_size - len(indices)), constant_values=-1)
            )
            mine = [int(i) for i in mine if i >= 0]
            cols = self.data.dataset[mine or [int(indices[0])]]
            rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
            batch = collate(rows, length, pad_id=self.data.pad_id, batch_size=per,
                            kto_kl=self.config.kto_kl,
                            kl_max_length=self.data.config.max_length)  # fmt: skip
            if not mine:  # this host's slice of a short last batch is empty: all padding
                batch = _as_padding(batch)
            yield k, batch

    def _max_examples(self) -> int:
        cfg = self.config
        if cfg.max_examples is not None:
            return cfg.max_examples
        # tokens per example: at least the shortest side, twice that unless the prompt is shared
        per_seq = 2 if self._paired() and not cfg.share_prompt else 1
        shortest = int(self.lengths.min())  # the longer side; a lower bound is fine for a cap
        return max(1, (cfg.pack_rows * cfg.pack_length) // (per_seq * max(shortest, 1)))

    def _packed(self, epoch: int, start: int) -> Iterator[tuple[int, Batch]]:
        """Greedy packing in epoch order: each global batch is `process_count` host packs."""
        cfg = self.config
        order = self.plan(epoch)[0]
        cap = self._max_examples()
        pos, k = 0, 0
        ds = self.data.dataset
        while pos < len(order):
            host_batches = []
            for _ in range(self.process_count):
                window = [ds[int(i)] for i in order[pos : pos + cap]]
                if not window:
                    break
                batch, used = pack(
                    window,
                    cfg.pack_length,
                    cfg.pack_rows,
                    pad_id=self.data.pad_id,
                    max_examples=cap,
                    share_prompt=cfg.share_prompt,
                )
                host_batches.append(batch)
                pos += used
            if len(host_batches) < self.process_count:
                if cfg.remainder == "drop":
                    self.dropped = sum(int(b.valid.sum()) for b in host_batches)
                    return
                filler = _as_padding(host_batches[0])
                host_batches += [filler] * (self.process_count - len(host_batches))
            if k >= start:
                yield k, host_batches[self.process_index]
            k += 1


class UnlearnLoader:
    """Unlearning batches: each step pairs a forget batch with a retain batch, both of
    `config.batch_size` rows, collated as `[forget; retain]` rows of one static shape (the
    layout of a paired batch, forget = first side; `valid` / `rows` are the forget rows').

    The data position is the forget set's: batch k of epoch e is forget batch k of that epoch's
    order (seed `config.seed`) with retain batch g mod n_r of retain epoch g // n_r, where
    g = e * n_f + k counts the steps and the retain order is drawn with seed `config.seed + 1`
    (an independent shuffle). So a run resumed at (e, k) sees exactly the batches of an
    uninterrupted one, with no extra state. Both sets must hold at least one batch; the last
    short batch of each is dropped (counted in `dropped` per set), never padded into a step.

    Example:
      loader = UnlearnLoader(forget, retain, LoaderConfig(batch_size=4, buckets=(64, 128)))
      for k, batch in loader.epoch(0): ...     # batch.input_ids: [8, L], forget rows first
    """

    def __init__(
        self,
        forget,
        retain,
        config: LoaderConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if config.packing or config.kto_kl:
            raise ValueError("unlearning batches are padded [forget; retain] rows: turn off "
                             "`packing` / `kto_kl`")  # fmt: skip
        config = dataclasses.replace(config, remainder="drop")
        for name, data in (("forget (data.train)", forget), ("retain (data.retain)", retain)):
            if data is None or len(data) < config.batch_size:
                n = 0 if data is None else len(data)
                raise ValueError(f"the {name} set has {n} rows, fewer than one batch of "
                                 f"{config.batch_size}")  # fmt: skip
        if config.buckets is None:
            longest = max(int(forget.lengths.max()), int(retain.lengths.max()))
            config = dataclasses.replace(config, buckets=default_buckets(longest))
        kw = dict(process_index=process_index, process_count=process_count)
        self.config = config
        self.forget = DataLoader(forget, config, **kw)
        self.retain = DataLoader(retain, dataclasses.replace(config, seed=config.seed + 1), **kw)
        self.buckets = config.buckets
        self._retain_plans: dict[int, list] = {}

    @property
    def dropped(self) -> dict:
        return {"forget": self.forget.dropped, "retain": self.retain.dropped}

    def __len__(self) -> int:
        return len(self.forget)

    def _retain_batch(self, step: int) -> np.ndarray:
        n = len(self.retain)
        epoch = step // n
        if epoch not in self._retain_plans:
            self._retain_plans = {epoch: self.retain.plan(epoch)}  # keep one epoch's plan
        return self._retain_plans[epoch][step % n]

    @staticmethod
    def _rows(loader: DataLoader, indices: np.ndarray) -> list[dict]:
        mine = [int(i) for i in loader._host(indices)]
        cols = loader.data.dataset[mine]
        return [dict(zip(cols, values)) for values in zip(*cols.values())]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield `(batch_index, batch)` for this host, from forget batch `start` on."""
        per = self.config.batch_size // self.forget.process_count
        n_f = len(self.forget)
        for k, f_idx in enumerate(self.forget.plan(epoch)):
            if k < start:
                continue
            r_idx = self._retain_batch(epoch * n_f + k)
            longest = max(int(self.forget.lengths[f_idx].max()),
                          int(self.retain.lengths[r_idx].max()))  # fmt: skip
            length = bucket_length(longest, self.buckets)
            forget, retain = self._rows(self.forget, f_idx), self._rows(self.retain, r_idx)
            rows = [
                {"chosen_input_ids": f["input_ids"], "chosen_prompt_length": f["prompt_length"],
                 "rejected_input_ids": r["input_ids"],
                 "rejected_prompt_length": r["prompt_length"], "row": f["row"]}
                for f, r in zip(forget, retain)
            ]  # fmt: skip
            yield k, collate(rows, length, pad_id=self.forget.data.pad_id, batch_size=per)
