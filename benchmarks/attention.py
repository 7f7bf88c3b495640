"""Dense ("grouped") against memory-efficient ("blockwise") attention in the Llama model:
compiled temporary memory and wall time of forward + backward.

Model: the issue's tiny Llama (vocab 8192, width 256, 4 layers, 8/4 heads, MLP 688), batch 1,
float32. Loss: the sum of the next-token log-probs through `ops.fused_token_logps`, so that no
[T, V] logits array competes with attention for the memory. The step is
`jax.jit(value_and_grad)` over all parameters.

Memory: `memory_analysis().temp_size_in_bytes` of the compiled step (a property of the
program: it is only compiled, never run, so T = 8192 costs no 15 GiB). Time: the median of
`--reps` steps after two warm-ups, the two implementations alternating round by round so that
a slow spell of a shared machine hits both; the reported time is the median over rounds.

Usage:
  python benchmarks/attention.py            # memory at 1024..8192, time at 128..2048
  python benchmarks/attention.py --quick    # smoke run (prints only, unless --out is given)
Results go to benchmarks/results/attention.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIG = dict(  # the tiny Llama
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=8192,
)
IMPLEMENTATIONS = ("grouped", "blockwise")


def compiled_step(implementation: str, length: int, *, dtype=None, config: dict | None = None):
    """(compiled value_and_grad step, its parameters) at batch 1 x `length` tokens, for the
    Llama of `config` (default `CONFIG`) computing in `dtype` (None: float32, its parameters')."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from alignjax import models, ops

    config = CONFIG if config is None else config
    cfg = models.LlamaConfig(**config, attention_implementation=implementation)
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config["vocab_size"], (1, length)))

    def loss(params):
        m = nnx.merge(graphdef, params)
        hidden = m(ids).last_hidden_state[:, :-1]
        return jnp.sum(ops.fused_token_logps(hidden, m.unembed(), ids[:, 1:]))

    return jax.jit(jax.value_and_grad(loss)).lower(params).compile(), params


def attention_step(
    implementation: str, length: int, *, heads: int, kv_heads: int, head_dim: int, dtype=None
):
    """(compiled gradient w.r.t. q, k, v of one causal self-attention call through
    `models.attention`, its arguments) at batch 1 x `length` tokens, with the mask
    `attention_masks` builds for `implementation` (2-D for "blockwise", 4-D otherwise)."""
    import jax
    import jax.numpy as jnp

    from alignjax import models
    from alignjax.models.attention import attention_masks

    dtype = jnp.float32 if dtype is None else dtype
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(1, length, heads, head_dim)] + [(1, length, kv_heads, head_dim)] * 2
    q, k, v = (jax.random.normal(key, s, dtype) for key, s in zip(keys, shapes))
    cotangent = jax.random.normal(keys[3], shapes[0], dtype)
    mask = attention_masks(jnp.ones((1, length), jnp.int32), None, implementation)

    def loss(q, k, v):
        out = models.attention(q, k, v, mask, implementation=implementation, causal=True)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile(), (q, k, v)


def temp_mib(implementation: str, length: int) -> float:
    step, _ = compiled_step(implementation, length)
    return step.memory_analysis().temp_size_in_bytes / 2**20


def step_seconds(step, params, reps: int) -> float:
    """Median wall seconds of `reps` calls `step(params)` (`params` a tuple: `step(*params)`)
    after two warm-up calls."""
    import jax

    args = params if isinstance(params, tuple) else (params,)
    for _ in range(2):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(length: int, reps: int, rounds: int) -> dict:
    steps = {impl: compiled_step(impl, length) for impl in IMPLEMENTATIONS}
    per_round = {impl: [] for impl in IMPLEMENTATIONS}
    for _ in range(rounds):
        for impl, (step, params) in steps.items():
            per_round[impl].append(step_seconds(step, params, reps))
    return {impl: statistics.median(ts) for impl, ts in per_round.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short lengths, one rep")
    ap.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--time-lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "attention")
    args = ap.parse_args(argv)
    if args.quick:
        args.memory_lengths, args.time_lengths, args.reps, args.rounds = [256], [128], 1, 1

    memory = []
    for t in args.memory_lengths:
        row = {"tokens": t, **{f"{i}_temp_mib": temp_mib(i, t) for i in IMPLEMENTATIONS}}
        row["ratio"] = row["blockwise_temp_mib"] / row["grouped_temp_mib"]
        memory.append(row)
        print(json.dumps(row), flush=True)
    timed = []
    for t in args.time_lengths:
        secs = timings(t, args.reps, args.rounds)
        row = {"tokens": t, **{f"{i}_ms": 1e3 * s for i, s in secs.items()}}
        row["ratio"] = secs["blockwise"] / secs["grouped"]
        timed.append(row)
        print(json.dumps(row), flush=True)

    c = CONFIG
    head = (
        f"forward + backward of the Llama (vocab {c['vocab_size']}, width {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads, MLP {c['intermediate_size']}), batch 1, float32, "
        "loss = sum of fused next-token log-probs"
    )
    lines = [
        head,
        "",
        "Compiled temporary memory (`memory_analysis().temp_size_in_bytes`):",
        "",
        "| T | grouped MiB | blockwise MiB | blockwise / grouped |",
        "|---:|---:|---:|---:|",
    ]
    for r in memory:
        lines.append(
            f"| {r['tokens']} | {r['grouped_temp_mib']:.1f} | {r['blockwise_temp_mib']:.1f} | "
            f"{r['ratio']:.3f} |"
        )
    lines += [
        "",
        f"Wall time per step (median of {args.reps} steps, median over {args.rounds} "
        "alternating rounds):",
        "",
        "| T | grouped ms | blockwise ms | blockwise / grouped |",
        "|---:|---:|---:|---:|",
    ]
    for r in timed:
        lines.append(
            f"| {r['tokens']} | {r['grouped_ms']:.1f} | {r['blockwise_ms']:.1f} | "
            f"{r['ratio']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if not args.quick or args.out != RESULTS / "attention":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": CONFIG, "reps": args.reps, "rounds": args.rounds}
        payload.update(memory=memory, time=timed)
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
