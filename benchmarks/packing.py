"""Padded vs bucketed vs packed preference batches: real-token fraction, compiled shapes and
forward + backward time per epoch of the NNX model, plus host-side data throughput.

All variants see the same examples (the shipped review pairs) and the same token budget per
batch: `--pairs-per-batch` pairs padded to one global length (naive), the same padded to the
smallest of the buckets 16, 24, ..., after sorting by length in windows of 8 batches
(bucketed), or packed into rows of `--pack-length` tokens with segment ids (packed; as many
rows as give the naive batch's token count), or packed with each pair's prompt once, shared by
its two completions (`share_prompt`; same rows). The step is a DPO-shaped policy pass: fused
per-token log-probs over the completion mask, summed per sequence, gradient w.r.t. all
parameters. Time is per epoch after every shape has been compiled (compiles are counted),
the best of `--reps` rounds in which the variants alternate.

Usage:
  python benchmarks/packing.py                   # ~1 min on 2 CPUs
  python benchmarks/packing.py --pairs 32 --reps 1   # smoke test
Results go to benchmarks/results/packing.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--pairs-per-batch", type=int, default=8)
    parser.add_argument("--pack-length", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--out", type=Path, default=RESULTS / "packing")
    args = parser.parse_args(argv)

    import datasets
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alignjax import data, models, ops

    datasets.disable_progress_bars()
    tok = data.shipped_tokenizer()
    raw = data.shipped_dataset("train").select(range(args.pairs))
    t0 = time.perf_counter()
    tokenized = data.tokenize_dataset(raw, tok, load_from_cache_file=False)
    tok_rate = args.pairs / (time.perf_counter() - t0)

    longest = int(tokenized.lengths.max())
    naive_len = -(-longest // 8) * 8
    b = args.pairs_per_batch
    rows = max(1, (2 * b * naive_len) // args.pack_length)
    loaders = {
        "padded (one length)": data.LoaderConfig(
            batch_size=b, buckets=(naive_len,), remainder="pad"
        ),
        "bucketed + sorted": data.LoaderConfig(
            batch_size=b, buckets=tuple(range(16, naive_len + 1, 8)), sort_window=8, remainder="pad"
        ),
        "packed": data.LoaderConfig(
            batch_size=1, packing=True, pack_length=args.pack_length, pack_rows=rows
        ),
        "packed, shared prompt": data.LoaderConfig(
            batch_size=1, packing=True, pack_length=args.pack_length, pack_rows=rows,
            share_prompt=True,
        ),
    }  # fmt: skip
    cfg = models.LlamaConfig(
        vocab_size=len(tok), hidden_size=args.width, intermediate_size=args.width * 3,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, batch):
        m = nnx.merge(graphdef, params)
        h = m(**batch.model_inputs()).last_hidden_state
        lp = ops.fused_token_logps(h, m.unembed(), batch.labels, batch.loss_mask)
        return -jnp.sum(data.sequence_sums(lp, batch))

    step = jax.jit(jax.value_and_grad(loss))
    results, epochs = [], {}
    for name, lcfg in loaders.items():
        loader = data.DataLoader(tokenized, lcfg)
        t0 = time.perf_counter()
        batches = [jax.tree.map(jnp.asarray, bt) for _, bt in loader.epoch(0)]
        load_s = time.perf_counter() - t0
        shapes = sorted({tuple(bt.input_ids.shape) for bt in batches})
        real = sum(int(bt.attention_mask.sum()) for bt in batches)
        total = sum(int(bt.attention_mask.size) for bt in batches)
        seen = {}
        t0 = time.perf_counter()
        for bt in batches:  # compile every shape once
            if bt.input_ids.shape not in seen:
                seen[bt.input_ids.shape] = jax.block_until_ready(step(params, bt))
        compile_s = time.perf_counter() - t0
        epochs[name] = batches
        results.append(dict(
            variant=name, batches=len(batches), shapes=[list(s) for s in shapes],
            real_fraction=real / total, compile_seconds=compile_s, loader_seconds=load_s,
            real_tokens=real,
        ))  # fmt: skip
    # Variants alternate within each round (a slow spell of the machine hits all of them);
    # the epoch time is the best round.
    times = {name: [] for name in epochs}
    for _ in range(args.reps):
        for name, batches in epochs.items():
            t0 = time.perf_counter()
            for bt in batches:
                out = step(params, bt)
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
    for r in results:
        r["epoch_seconds"] = min(times[r["variant"]])
        r["real_tokens_per_s"] = r["real_tokens"] / r["epoch_seconds"]
    base = results[0]["epoch_seconds"]
    lines = [
        f"{args.pairs} shipped pairs, {b} pairs/batch padded to {naive_len} vs packed rows "
        f"{rows} x {args.pack_length}; model width {args.width}, 2 layers, vocab {len(tok)}; "
        f"tokenization {tok_rate:.0f} pairs/s",
        "",
        "| batches | variant | shapes | real tokens | epoch s | speed-up | compiles | loader s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['batches']} | {r['variant']} | {len(r['shapes'])} | "
            f"{100 * r['real_fraction']:.0f}% | {r['epoch_seconds']:.2f} | "
            f"{base / r['epoch_seconds']:.2f}x | {r['compile_seconds']:.1f} s | "
            f"{r['loader_seconds']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    payload = dict(args={k: str(v) for k, v in vars(args).items()}, tokenize_pairs_per_s=tok_rate,
                   results=results)  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
