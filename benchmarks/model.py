"""Forward + backward tokens/s of the NNX Llama model against transformers (PyTorch, CPU) on the
same config, batch and loss (next-token cross-entropy over full logits, mean over tokens).

The JAX step is `jax.jit(value_and_grad)` over all parameters; the PyTorch step is `loss.backward()`
on `LlamaForCausalLM` in float32 with torch's default CPU threads. Both see identical shapes;
weights are random (timing does not depend on them). Time: median of `--reps` steps after two
warm-up steps.

Usage:
  python benchmarks/model.py --torch-python /tmp/refvenv/bin/python   # ~1 min on 2 CPUs
  python benchmarks/model.py --size tiny --reps 1                       # smoke test
Results go to benchmarks/results/model.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # vocab, hidden, intermediate, layers, heads, kv heads, batch, tokens
    "default": (4096, 256, 688, 4, 8, 4, 4, 256),
    "tiny": (128, 32, 64, 2, 4, 2, 2, 16),
}
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def hf_config(size: str) -> dict:
    v, d, f, layers, heads, kv, _, _ = SIZES[size]
    return dict(
        model_type="llama",
        vocab_size=v,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def batch(size: str):
    import numpy as np

    v, *_, b, t = SIZES[size]
    return np.random.default_rng(0).integers(0, v, (b, t))


def time_it(step, reps):
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_row(size: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from alignjax import models

    cfg = models.LlamaConfig.from_hf(hf_config(size))
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(batch(size))
    graphdef, params = nnx.split(model)

    def loss_fn(params):
        m = nnx.merge(graphdef, params)
        logits = m.logits(m(ids).last_hidden_state)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    step_fn = jax.jit(jax.value_and_grad(loss_fn))
    seconds = time_it(lambda: jax.block_until_ready(step_fn(params)), reps)
    return {"variant": "alignjax (JAX)", "seconds": seconds, "tokens": int(ids.size)}


def torch_row(size: str, reps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in hf_config(size).items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    ids = torch.from_numpy(batch(size))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        loss.backward()

    seconds = time_it(step, reps)
    return {"variant": "transformers (PyTorch)", "seconds": seconds, "tokens": int(ids.numel())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-python", help="a Python with torch==2.13.0 and transformers")
    ap.add_argument("--out", type=Path, default=RESULTS / "model")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        print(json.dumps(torch_row(args.size, args.reps)))
        return 0
    rows, notes = [jax_row(args.size, args.reps)], []
    if args.torch_python:
        cmd = [args.torch_python, __file__, "--torch-child", "--size", args.size]
        proc = subprocess.run(cmd + ["--reps", str(args.reps)], capture_output=True, text=True)
        if proc.returncode:
            notes.append(f"PyTorch row failed: {proc.stderr.strip().splitlines()[-1:]}")
        else:
            rows.append(json.loads(proc.stdout.splitlines()[-1]))
    else:
        notes.append("PyTorch row skipped (pass --torch-python with torch + transformers)")
    lines = [
        "| implementation | ms / step | tokens/s | ratio to alignjax |",
        "|---|---:|---:|---:|",
    ]
    base = rows[0]["tokens"] / rows[0]["seconds"]
    for r in rows:
        tps = r["tokens"] / r["seconds"]
        lines.append(
            f"| {r['variant']} | {1e3 * r['seconds']:.1f} | {tps:.0f} | {tps / base:.2f}x |"
        )
    v, d, f, layers, heads, kv, b, t = SIZES[args.size]
    head = (
        f"forward + backward, vocab {v}, width {d}, MLP {f}, {layers} layers, {heads}/{kv} heads, "
    )
    head += f"batch {b} x {t} tokens, float32"
    text = head + "\n\n" + "\n".join(lines)
    print(text)
    for n in notes:
        print(n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"size": args.size, "shape": SIZES[args.size], "rows": rows, "notes": notes}, indent=2
        )
    )
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
