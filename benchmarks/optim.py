"""Optimizer step time: alignjax's AdamP / SGDP / project_radial against optax's AdamW / SGD /
Lion, and (when a Python with torch and adamp is given) PyPI adamp against torch's AdamW / SGD
on the same shapes.

The parameter tree is Llama-shaped: embedding, per layer q/k/v/o and gate/up/down kernels plus
two RMSNorm scales, a final norm and an untied LM head; `--size default` is about 100M
parameters (vocab 32000, width 768, MLP 2048, 8 layers). One step = optimizer update + apply,
jit-compiled with the parameters and optimizer state donated, float32, on whatever JAX runs on.
Time: median over `--rounds` rounds (the variants alternate within each round) of the median of
`--reps` steps after two warm-up steps (compilation excluded). Gradients are fixed random
arrays, on which the projection test of AdamP / SGDP passes nowhere (as on most weights that
no normalisation follows): each matrix costs them one extra reduction over the weight and the
gradient. Where the test passes, a second reduction over the weight and the update follows;
the `*_fired` rows force that on every matrix at every step (delta = 1e9, so every cosine is
under the threshold), which is the most the projection can cost.

Usage:
  python benchmarks/optim.py                                  # ~100M parameters, 2 CPUs: ~3 min
  python benchmarks/optim.py --torch-python /tmp/refvenv/bin/python   # adds the PyTorch rows
  python benchmarks/optim.py --size tiny --reps 2             # smoke test
Results go to benchmarks/results/optim.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # vocab, width, mlp, layers
    "default": (32000, 768, 2048, 8),
    "tiny": (512, 64, 128, 2),
}
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
PAIRS = [  # (variant, baseline)
    ("adamp", "adamw"),
    ("adamp_nesterov", "adamw"),
    ("adamp_fired", "adamw"),
    ("sgdp", "sgd"),
    ("sgdp_fired", "sgd"),
    ("radial_lion", "lion"),
    ("torch_adamp", "torch_adamw"),
    ("torch_sgdp", "torch_sgd"),
]


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape in the Flax layout ((in, out) kernels, (vocab, width) table)."""
    vocab, d, f, layers = SIZES[size]
    out = {"embed/embedding": (vocab, d), "final_norm/scale": (d,), "lm_head/kernel": (d, vocab)}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            out[f"layers/{i}/attn/{name}/kernel"] = (d, d)
        out[f"layers/{i}/mlp/gate/kernel"] = (d, f)
        out[f"layers/{i}/mlp/up/kernel"] = (d, f)
        out[f"layers/{i}/mlp/down/kernel"] = (f, d)
        out[f"layers/{i}/attn_norm/scale"] = (d,)
        out[f"layers/{i}/mlp_norm/scale"] = (d,)
    return out


def jax_rows(size: str, reps: int, variants: set[str] | None = None, rounds: int = 1) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    from alignjax import optim

    def nest(flat):
        tree: dict = {}
        for path, value in flat.items():
            node = tree
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return tree

    key = jax.random.key(0)
    flat = shapes(size)
    keys = jax.random.split(key, 2 * len(flat))
    params = nest({n: 0.02 * jax.random.normal(k, s) for (n, s), k in zip(flat.items(), keys[::2])})
    grads = nest({n: 1e-3 * jax.random.normal(k, s) for (n, s), k in zip(flat.items(), keys[1::2])})
    n_params = sum(x.size for x in jax.tree.leaves(params))
    txs = {
        "adamw": optax.adamw(1e-4, weight_decay=0.1),
        "adamp": optim.adamp(1e-4, weight_decay=0.1),
        "adamp_nesterov": optim.adamp(1e-4, weight_decay=0.1, nesterov=True),
        "adamp_fired": optim.adamp(1e-4, weight_decay=0.1, delta=1e9),
        "sgd": optax.sgd(1e-2, momentum=0.9),
        "sgdp": optim.sgdp(1e-2, momentum=0.9),
        "sgdp_fired": optim.sgdp(1e-2, momentum=0.9, delta=1e9),
        "lion": optax.lion(1e-5, weight_decay=0.1),
        "radial_lion": optax.chain(
            optim.project_radial(optax.scale_by_lion(), weight_decay=0.1),
            optax.scale_by_learning_rate(1e-5),
        ),
    }
    names = [n for n in txs if variants is None or n in variants]
    fns, per_round = {}, {n: [] for n in names}
    for r in range(rounds):  # variants alternate within a round: a slow spell hits them all
        for name in names:
            tx = txs[name]
            if name not in fns:

                def step(p, s, g, tx=tx):
                    u, s = tx.update(g, s, p)
                    return optax.apply_updates(p, u), s

                fns[name] = jax.jit(step, donate_argnums=(0, 1))
            fn = fns[name]
            p = jax.tree.map(jnp.copy, params)
            s = tx.init(p)
            for _ in range(2):
                p, s = fn(p, s, grads)
            jax.block_until_ready(p)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                p, s = fn(p, s, grads)
                jax.block_until_ready((p, s))
                times.append(time.perf_counter() - t0)
            per_round[name].append(1e3 * statistics.median(times))
            del p, s
            print(f"  round {r + 1} {name:16s} {per_round[name][-1]:9.1f} ms/step", flush=True)
    return [{"variant": n, "ms": statistics.median(per_round[n]), "params": n_params,
             "rounds_ms": [round(x, 1) for x in per_round[n]]} for n in names]  # fmt: skip


def torch_rows(size: str, reps: int) -> list[dict]:
    """PyPI adamp and torch's own optimizers on the same shapes (torch layout, (out, in))."""
    import adamp
    import torch

    torch.manual_seed(0)
    params, n_params = [], 0
    for shape in shapes(size).values():
        shape = shape[::-1] if len(shape) == 2 and shape[0] != shape[1] else shape
        p = torch.nn.Parameter(0.02 * torch.randn(shape))
        p.grad = 1e-3 * torch.randn(shape)
        params.append(p)
        n_params += p.numel()
    makers = {
        "torch_adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1),
        "torch_adamp": lambda ps: adamp.AdamP(ps, lr=1e-4, weight_decay=0.1),
        "torch_sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
        "torch_sgdp": lambda ps: adamp.SGDP(ps, lr=1e-2, momentum=0.9),
    }
    rows = []
    for name, make in makers.items():
        opt = make(params)
        for _ in range(2):
            opt.step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        rows.append({"variant": name, "ms": 1e3 * statistics.median(times), "params": n_params})
        print(f"  {name:16s} {rows[-1]['ms']:9.1f} ms/step", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    ms = {r["variant"]: r["ms"] for r in rows}
    lines = ["| optimizer | ms / step | baseline | ratio |", "|---|---:|---|---:|"]
    for variant, base in PAIRS:
        if variant in ms and base in ms:
            ratio = ms[variant] / ms[base]
            lines.append(
                f"| {variant} | {ms[variant]:.1f} | {base} {ms[base]:.1f} | {ratio:.2f}x |"
            )
    if "adamp" in ms and "torch_adamp" in ms:
        r = ms["adamp"] / ms["torch_adamp"]
        lines.append(
            f"| adamp (JAX) vs adamp (PyTorch) | {ms['adamp']:.1f} | "
            f"torch_adamp {ms['torch_adamp']:.1f} | {r:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median taken)")
    ap.add_argument("--torch-python", help="a Python with torch==2.13.0 and adamp==0.3.0")
    ap.add_argument("--variants", help="comma-separated JAX optimizers to time (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "optim")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        print(json.dumps(torch_rows(args.size, args.reps)))
        return 0
    import jax

    print(
        f"optimizer step, {args.size} Llama-shaped tree, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), float32"
    )
    chosen = set(args.variants.split(",")) if args.variants else None
    rows = jax_rows(args.size, args.reps, chosen, rounds=args.rounds)
    notes = []
    if args.torch_python:
        cmd = [
            args.torch_python,
            __file__,
            "--torch-child",
            "--size",
            args.size,
            "--reps",
            str(args.reps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            notes.append(f"PyTorch rows failed: {proc.stderr.strip().splitlines()[-1:]}")
        else:
            for line in proc.stdout.splitlines()[:-1]:
                print(line)
            rows += json.loads(proc.stdout.splitlines()[-1])
    else:
        notes.append("PyTorch rows skipped (pass --torch-python with torch + adamp installed)")
    text = table(rows)
    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters\n{text}")
    for n in notes:
        print(n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "size": args.size,
        "shape": SIZES[args.size],
        "params": rows[0]["params"],
        "reps": args.reps,
        "rounds": args.rounds,
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "notes": notes,
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(f"{rows[0]['params'] / 1e6:.1f}M parameters\n\n{text}\n")
    print(f"results: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
