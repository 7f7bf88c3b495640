"""alignjax.data loading: local file formats, `datasets` map caching, deterministic epochs,
per-host shards, resumable positions, bucketing, packed epochs, and the shipped assets."""

import filecmp
import json

import datasets
import numpy as np
import pytest

from alignjax import data
from alignjax.data import synthetic

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return data.shipped_tokenizer()


@pytest.fixture(scope="module")
def tokenized(tok, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf")
    raw = data.shipped_dataset("train", cache_dir=cache).select(range(50))
    return data.tokenize_dataset(raw, tok, config=data.TokenizeConfig(max_length=64))


def test_shipped_assets_regenerate_bit_identically(tmp_path):
    out = synthetic.generate(tmp_path)
    for rel in ("reviews/sft.jsonl", "reviews/train.jsonl", "reviews/test.jsonl",
                "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):  # fmt: skip
        assert filecmp.cmp(out / rel, synthetic.ASSETS / rel, shallow=False), rel


def test_shipped_pairs_are_ranked_by_the_gold_score():
    rows = [json.loads(line) for line in (synthetic.ASSETS / "reviews/train.jsonl").open()]
    test = [json.loads(line) for line in (synthetic.ASSETS / "reviews/test.jsonl").open()]
    assert len(rows) == 1000 and len(test) == 200
    for r in rows + test:
        assert synthetic.sentiment_score(r["chosen"]) == r["chosen_score"]
        assert synthetic.sentiment_score(r["rejected"]) == r["rejected_score"]
        assert r["chosen_score"] > r["rejected_score"]
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in test}
    assert synthetic.sentiment_score("we loved the soup. the bed was dirty and cold.") == -1


def test_local_file_formats_load_the_same_rows(tmp_path):
    rows = data.shipped_dataset("test", cache_dir=tmp_path / "c").select(range(5)).to_list()
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(tmp_path / "d.jsonl")
    ds.to_json(tmp_path / "d.json", lines=False)
    ds.to_parquet(tmp_path / "d.parquet")
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict(test=ds).save_to_disk(tmp_path / "dict")
    (tmp_path / "splits").mkdir()
    ds.to_parquet(tmp_path / "splits" / "test.parquet")
    sources = ["d.jsonl", "d.json", "d.parquet", "d.csv", "saved", "dict", "splits"]
    for src in sources:
        got = data.load_preference_dataset(tmp_path / src, split="test", cache_dir=tmp_path / "c")
        assert got.to_list() == rows, src
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert data.load_preference_dataset(arrow).to_list() == rows
    with pytest.raises(FileNotFoundError, match="hub=True"):
        data.load_preference_dataset("someone/some-dataset")
    with pytest.raises(ValueError, match="splits \\['test'\\], not 'train'"):
        data.load_preference_dataset(tmp_path / "splits")  # split as datasets splits a folder
    with pytest.raises(ValueError, match="splits \\['test'\\], not 'train'"):
        data.load_preference_dataset(tmp_path / "dict")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_tokenizer(tmp_path / "nope")


def test_tokenization_is_cached_by_datasets(tmp_path):
    """A file-backed dataset tokenized twice (fresh tokenizer objects, as in a rerun) reuses
    the cache file; a different config or different data gets a new fingerprint."""
    rows = data.shipped_dataset("test", cache_dir=tmp_path / "c").select(range(20))
    rows.to_json(tmp_path / "d.jsonl")
    runs = []
    for _ in range(2):
        raw = data.load_preference_dataset(tmp_path / "d.jsonl", cache_dir=tmp_path / "c")
        out = data.tokenize_dataset(raw, data.shipped_tokenizer())
        files = [f["filename"] for f in out.dataset.cache_files]
        runs.append((out.fingerprint, files, [(tmp_path / f).stat().st_mtime_ns for f in files]))
    assert runs[0] == runs[1] and runs[0][1]  # same fingerprint, same untouched cache files
    other = data.tokenize_dataset(
        raw, data.shipped_tokenizer(), config=data.TokenizeConfig(max_length=40)
    )
    assert other.fingerprint != runs[0][0]
    rows.select(range(19)).to_json(tmp_path / "d.jsonl")
    raw = data.load_preference_dataset(tmp_path / "d.jsonl", cache_dir=tmp_path / "c")
    assert data.tokenize_dataset(raw, data.shipped_tokenizer()).fingerprint != runs[0][0]


def test_epochs_are_deterministic_and_cover_every_example(tokenized):
    cfg = data.LoaderConfig(batch_size=8, seed=3, buckets=(32, 48, 64))
    loader = data.DataLoader(tokenized, cfg)
    epoch0 = list(loader.epoch(0))
    assert len(epoch0) == len(loader) == 6 and loader.dropped == 2  # 50 = 6 x 8 + 2, counted
    again = list(data.DataLoader(tokenized, cfg).epoch(0))
    for (k, a), (j, b) in zip(epoch0, again):
        assert k == j and np.array_equal(a.input_ids, b.input_ids)
    seen = np.concatenate([b.rows for _, b in epoch0])
    assert len(set(seen.tolist())) == 48
    assert not np.array_equal(seen, np.concatenate([b.rows for _, b in loader.epoch(1)]))
    other_seed = data.DataLoader(tokenized, data.LoaderConfig(batch_size=8, seed=4))
    assert not np.array_equal(seen, np.concatenate([b.rows for _, b in other_seed.epoch(0)]))
    for _, b in epoch0:  # the smallest bucket that holds the longest sequence of the batch
        longest = int(b.attention_mask.sum(1).max())
        assert b.input_ids.shape[1] == data.bucket_length(longest, (32, 48, 64))
    # Resuming at batch 4 gives exactly the rest of the epoch.
    resumed = list(loader.epoch(0, start=4))
    assert [k for k, _ in resumed] == [4, 5]
    assert np.array_equal(resumed[0][1].input_ids, epoch0[4][1].input_ids)
    padded = list(
        data.DataLoader(tokenized, data.LoaderConfig(batch_size=8, remainder="pad")).epoch(0)
    )
    assert len(padded) == 7 and padded[-1][1].valid.tolist() == [1, 1] + [0] * 6
    assert padded[-1][1].input_ids.shape[0] == 16  # same static shape as the others


@pytest.mark.parametrize("count", [2, 4])
def test_host_shards_partition_the_global_batch(tokenized, count):
    cfg = data.LoaderConfig(batch_size=8, seed=1, remainder="pad")
    whole = list(data.DataLoader(tokenized, cfg).epoch(2))
    hosts = [list(data.DataLoader(tokenized, cfg, process_index=i, process_count=count).epoch(2))
             for i in range(count)]  # fmt: skip
    for k, (_, full) in enumerate(whole):
        parts = [h[k][1] for h in hosts]
        assert all(p.input_ids.shape[1] == full.input_ids.shape[1] for p in parts)  # same bucket
        np.testing.assert_array_equal(np.concatenate([p.rows for p in parts]), full.rows)
        per = 8 // count
        np.testing.assert_array_equal(
            np.concatenate([p.input_ids[:per] for p in parts]), full.input_ids[:8]
        )  # chosen halves
    with pytest.raises(ValueError, match="does not split over 3"):
        data.DataLoader(tokenized, cfg, process_index=0, process_count=3)


def test_sort_window_cuts_padding(tokenized):
    def padding(cfg):
        batches = [b for _, b in data.DataLoader(tokenized, cfg).epoch(0)]
        return sum(int((1 - b.attention_mask).sum()) for b in batches), batches

    plain, _ = padding(data.LoaderConfig(batch_size=4, buckets=tuple(range(24, 72, 4))))
    sorted_, batches = padding(
        data.LoaderConfig(batch_size=4, buckets=tuple(range(24, 72, 4)), sort_window=6)
    )
    assert sorted_ < plain
    assert len({r for b in batches for r in b.rows.tolist()}) == 48


def test_packed_epoch_covers_every_example_once(tokenized):
    cfg = data.LoaderConfig(batch_size=1, packing=True, pack_length=128, pack_rows=2, seed=5)
    loader = data.DataLoader(tokenized, cfg)
    batches = list(loader.epoch(0))
    rows = np.concatenate([b.rows[b.valid == 1] for _, b in batches])
    assert sorted(rows.tolist()) == list(range(50))
    assert len({b.input_ids.shape for _, b in batches}) == 1
    assert len({b.valid.shape for _, b in batches}) == 1
    assert np.array_equal(list(loader.epoch(0, start=2))[0][1].input_ids, batches[2][1].input_ids)
    for remainder in ("drop", "pad"):
        cfg2 = data.LoaderConfig(**{**cfg.__dict__, "remainder": remainder})
        loaders = [data.DataLoader(tokenized, cfg2, process_index=i, process_count=2)
                   for i in range(2)]  # fmt: skip
        two = [list(loader.epoch(0)) for loader in loaders]
        rows2 = np.concatenate([b.rows[b.valid == 1] for h in two for _, b in h])
        assert len(two[0]) == len(two[1]) and len(set(rows2.tolist())) == len(rows2)
        assert len(rows2) + loaders[0].dropped == 50  # a dropped short last batch is counted
    assert remainder == "pad" and loaders[0].dropped == 0 and len(rows2) == 50
