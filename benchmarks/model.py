"""Forward + backward tokens/s of the NNX Llama model against transformers (PyTorch, CPU) on the
same config, batch and loss (next-token cross-entropy over full logits, mean over tokens).

The JAX step is `jax.jit(value_and_grad)` over all parameters; the PyTorch step is `loss.backward()`
on `LlamaForCausalLM` in float32 with torch's default CPU threads (one per core, as XLA:CPU's
pool). Both see identical shapes; weights are random (timing does not depend on them). Time: the
median over `--rounds` rounds of the median of `--reps` steps (after two warm-up steps); the two
sides alternate round by round (PyTorch in a child process), so that a slow spell of a shared
machine hits both. System time and minor page faults per step are reported too. The notes break
the gap down: one layer's causal attention alone (forward + backward, at the step's shapes) in
alignjax, in `jax.nn.dot_product_attention` and in torch's SDPA, and the memory XLA allocates
afresh (and page-faults in) at every execution.

Usage:
  python benchmarks/model.py --torch-python /tmp/refvenv/bin/python   # ~1 min on 2 CPUs
  python benchmarks/model.py --size tiny --reps 1                       # smoke test
Results go to benchmarks/results/model.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # vocab, hidden, intermediate, layers, heads, kv heads, batch, tokens
    "default": (4096, 256, 688, 4, 8, 4, 4, 256),
    "tiny": (128, 32, 64, 2, 4, 2, 2, 16),
}
# glibc settings under which freed blocks of any size stay in the heap: named in the notes only.
KEEP_FREED = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
)
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


def time_it(step, reps) -> dict:
    """Median wall seconds of `reps` steps after two warm-ups, and per step the system CPU time
    and minor page faults of this process (all threads)."""
    for _ in range(2):
        step()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": statistics.median(times),
        "sys_ms_per_step": 1e3 * (after.ru_stime - before.ru_stime) / reps,
        "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / reps,
    }


def attention_inputs(size: str):
    """q [B, T, H, d], k and v [B, T, KV, d] and a cotangent like q, at the step's shapes."""
    import numpy as np

    _, d, _, _, heads, kv, b, t = SIZES[size]
    rng = np.random.default_rng(1)
    hd = d // heads
    shapes = [(b, t, heads, hd), (b, t, kv, hd), (b, t, kv, hd), (b, t, heads, hd)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def jax_attention_ms(size: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from alignjax import models

    q, k, v, cotangent = map(jnp.asarray, attention_inputs(size))
    mask = models.attention_mask_4d(jnp.ones(q.shape[:2], jnp.int32))
    kinds = {
        "alignjax causal_attention": lambda q, k, v: models.causal_attention(q, k, v, mask),
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask
        ),
    }
    out = {}
    for name, attend in kinds.items():
        grad = jax.jit(jax.grad(lambda *a, f=attend: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))
        out[name] = 1e3 * time_it(lambda g=grad: jax.block_until_ready(g(q, k, v)), reps)["seconds"]
    return out


def jax_bench(size: str):
    """(info, timer): the compiled step's description, and `timer(reps)` timing it."""
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

    step_fn = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
    info = {
        "variant": "alignjax (JAX)",
        "tokens": int(ids.size),
        "temp_mib": step_fn.memory_analysis().temp_size_in_bytes / 2**20,
    }
    return info, lambda reps: time_it(lambda: jax.block_until_ready(step_fn(params)), reps)


def torch_bench(size: str):
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

    info = {
        "variant": "transformers (PyTorch)",
        "tokens": int(ids.numel()),
        "threads": torch.get_num_threads(),
    }
    return info, lambda reps: time_it(step, reps)


def torch_attention_ms(size: str, reps: int) -> dict:
    import torch

    q, k, v, cotangent = (torch.from_numpy(a).transpose(1, 2) for a in attention_inputs(size))
    q, k, v = (a.contiguous().requires_grad_() for a in (q, k, v))

    def attention():  # what transformers' sdpa path runs here: no mask, is_causal, GQA
        q.grad = k.grad = v.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        (out * cotangent).sum().backward()

    return {"torch SDPA": 1e3 * time_it(attention, reps)["seconds"]}


def torch_child(size: str, reps: int) -> None:
    """Serve the parent: its info first, then one timing per line read ("step" or "attention")."""
    info, timer = torch_bench(size)
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        out = timer(reps) if line.strip() == "step" else torch_attention_ms(size, reps)
        print(json.dumps(out), flush=True)


def merge_rounds(info: dict, rounds: list[dict]) -> dict:
    """Median over rounds of the per-round median step time; mean system time and faults."""
    return {
        **info,
        "seconds": statistics.median(r["seconds"] for r in rounds),
        "round_seconds": [r["seconds"] for r in rounds],
        "sys_ms_per_step": statistics.mean(r["sys_ms_per_step"] for r in rounds),
        "page_faults_per_step": statistics.mean(r["page_faults_per_step"] for r in rounds),
    }


def breakdown_notes(rows: list[dict], layers: int) -> list[str]:
    attention = {k: ms for r in rows for k, ms in r["attention_ms"].items()}
    listed = ", ".join(f"{k} {ms:.1f} ms" for k, ms in attention.items())
    notes = [
        f"One layer's causal attention alone, forward + backward at the step's shapes: {listed} "
        f"(x {layers} layers per step). XLA materialises the [B, H, T, T] scores and softmax, "
        "torch's CPU flash kernel does not."
    ]
    for r in rows:
        notes.append(
            f"{r['variant']}: {r['sys_ms_per_step']:.0f} ms system time and "
            f"{r['page_faults_per_step']:.0f} minor page faults per step."
        )
        if "temp_mib" in r and r["page_faults_per_step"] * 4096 > r["temp_mib"] * 2**19:
            notes[-1] += (
                f" XLA:CPU allocates the step's {r['temp_mib']:.0f} MiB of temporaries as one "
                "buffer per execution, which glibc maps and unmaps, so each step faults it in "
                f"afresh (GLIBC_TUNABLES={KEEP_FREED} keeps it in the heap instead)."
            )
    return notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two timings")
    ap.add_argument("--torch-python", help="a Python with torch==2.13.0 and transformers")
    ap.add_argument("--out", type=Path, default=RESULTS / "model")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        torch_child(args.size, args.reps)
        return 0
    info, timer = jax_bench(args.size)
    child, notes = None, []
    if args.torch_python:
        cmd = [args.torch_python, __file__, "--torch-child", "--size", args.size]
        child = subprocess.Popen(
            cmd + ["--reps", str(args.reps)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        torch_info = json.loads(child.stdout.readline() or "null")
        if torch_info is None:  # the child died before answering; its error went to stderr
            child = None
            notes.append("PyTorch row failed (its error is printed above)")
    else:
        notes.append("PyTorch row skipped (pass --torch-python with torch + transformers)")

    def ask(what: str) -> dict:
        child.stdin.write(what + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    # The two sides alternate, so that a slower spell of a shared machine hits both.
    jax_rounds, torch_rounds = [], []
    for _ in range(args.rounds):
        jax_rounds.append(timer(args.reps))
        if child is not None:
            torch_rounds.append(ask("step"))
    rows = [
        {**merge_rounds(info, jax_rounds), "attention_ms": jax_attention_ms(args.size, args.reps)}
    ]
    if child is not None:
        rows.append({**merge_rounds(torch_info, torch_rounds), "attention_ms": ask("attention")})
        child.stdin.close()
        child.wait()
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
    notes += breakdown_notes(rows, layers)
    text = head + "\n\n" + "\n".join(lines)
    text += "".join(f"\n\n{n}" for n in notes)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "size": args.size,
                "shape": SIZES[args.size],
                "reps": args.reps,
                "rounds": args.rounds,
                "rows": rows,
                "notes": notes,
            },
            indent=2,
        )
    )
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
