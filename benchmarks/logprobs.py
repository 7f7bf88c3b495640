"""Per-token log-prob and KL kernels: naive vs alignjax, forward + backward, time and memory.

Compares, in one run and at the same sizes:
  logps: naive (h @ W, log_softmax, gather; autodiff)  vs  token_logps (dense, custom VJP)
         vs  fused_token_logps (chunked LM head, custom VJP, never holds [B, T, V])
  kl:    naive (two log_softmax tensors; autodiff)      vs  token_kl  vs  fused_token_kl
Each measures value_and_grad of sum(c * per_token_values) w.r.t. (hidden, unembed).

Memory, measured two ways, both honest about what they include:
  * XLA's compiled memory analysis of the jitted step: `temp` is the working memory beyond the
    arguments and outputs (hidden, unembed, their gradients: identical for every variant), and
    `total` = arguments + outputs + temp - aliased.
  * the process's peak resident set size (ru_maxrss): each variant runs in a fresh subprocess,
    so the number is that variant's alone (it includes the JAX runtime, ~0.3-0.5 GiB).
Time: median wall-clock of `--reps` runs after one warm-up (compilation excluded).

Usage:
  python benchmarks/logprobs.py                 # B*T=512, D=256, V=128k: about a minute on 2 CPUs
  python benchmarks/logprobs.py --size small    # adds V=32k
  python benchmarks/logprobs.py --size large    # B*T=4096, D=1024, V=32k
  python benchmarks/logprobs.py --size xl       # B*T=8192, D=2048, V=128k (needs ~20 GiB)
  python benchmarks/logprobs.py --bt 2048 --d 512 --v 65536 --dtype bfloat16
Sizes are scaled down (B*T halved) when the naive variant would not fit in available memory;
the table says so. Results go to benchmarks/results/logprobs.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # name: list of (B*T, D, V)
    "default": [(512, 256, 131072)],
    "small": [(1024, 256, 32768), (512, 256, 131072)],
    "large": [(4096, 1024, 32768)],
    "xl": [(8192, 2048, 131072)],
}
VARIANTS = ["naive_logps", "token_logps", "fused_logps", "naive_kl", "token_kl", "fused_kl"]
ROWS = 8  # batch rows; T = B*T / ROWS
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------- child side


def _build(variant: str, bt: int, d: int, v: int, dtype: str):
    import jax
    import jax.numpy as jnp

    from alignjax.ops import logprobs as L

    dt = jnp.dtype(dtype)
    t = bt // ROWS
    k = jax.random.split(jax.random.key(0), 6)
    h = (jax.random.normal(k[0], (ROWS, t, d)) / d**0.25).astype(dt)
    w = (jax.random.normal(k[1], (d, v)) / d**0.25).astype(dt)
    hr = (jax.random.normal(k[2], (ROWS, t, d)) / d**0.25).astype(dt)
    y = jax.random.randint(k[3], (ROWS, t), 0, v)
    m = (jax.random.uniform(k[4], (ROWS, t)) > 0.2).astype(jnp.int32)
    c = jax.random.normal(k[5], (ROWS, t))

    def logits(a, b):
        return jnp.einsum("btd,dv->btv", a, b, preferred_element_type=jnp.float32)

    def naive_logps(h, w):
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits(h, w)), y[..., None], -1)[..., 0]
        return jnp.where(m != 0, lp, 0.0)

    def naive_kl(h, w):
        lz = jax.nn.log_softmax(logits(h, w))
        lr = jax.lax.stop_gradient(jax.nn.log_softmax(logits(hr, w)))
        return jnp.where(m != 0, jnp.sum(jnp.exp(lr) * (lr - lz), -1), 0.0)

    per_token = {
        "naive_logps": naive_logps,
        "token_logps": lambda h, w: L.token_logps(logits(h, w), y, m),
        "fused_logps": lambda h, w: L.fused_token_logps(h, w, y, m),
        "naive_kl": naive_kl,
        "token_kl": lambda h, w: L.token_kl(logits(h, w), logits(hr, w), m),
        "fused_kl": lambda h, w: L.fused_token_kl(h, w, hr, w, m),
    }[variant]

    def step(h, w):
        return jax.value_and_grad(lambda h, w: jnp.sum(c * per_token(h, w)), (0, 1))(h, w)

    return jax.jit(step), (h, w)


def _child(args) -> dict:
    import resource

    import jax

    step, inputs = _build(args.variant, args.bt, args.d, args.v, args.dtype)
    jax.block_until_ready(inputs)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    compiled = step.lower(*inputs).compile()
    mem = compiled.memory_analysis()
    out = compiled(*inputs)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    value = float(out[0])
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mib = 1024**2
    return {
        "variant": args.variant,
        "time_s": statistics.median(times),
        "temp_mib": mem.temp_size_in_bytes / mib,
        "total_mib": (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
        / mib,
        "peak_rss_mib": rss1,
        "rss_before_mib": rss0,
        "value": value,
    }


# -------------------------------------------------------------------------------- parent side


def _available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**2


def _naive_estimate_mib(bt: int, d: int, v: int, itemsize: int) -> float:
    # Naive KL holds about four float32 [B*T, V] buffers at its peak, plus W, dW and activations.
    return (4 * bt * v * 4 + 2 * d * v * itemsize + 4 * bt * d * itemsize) / 1024**2 + 600


def _fit(bt: int, d: int, v: int, itemsize: int) -> tuple[int, str]:
    budget = 0.8 * _available_mib()
    note = ""
    while bt > ROWS and _naive_estimate_mib(bt, d, v, itemsize) > budget:
        bt //= 2
        note = f"B*T scaled down to {bt} to fit {budget:.0f} MiB available"
    return bt, note


def _run_variant(variant, bt, d, v, dtype, reps) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--variant",
        variant,
        "--bt",
        str(bt),
        "--d",
        str(d),
        "--v",
        str(v),
        "--dtype",
        dtype,
        "--reps",
        str(reps),
    ]
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if b else float("nan")


def _table(results: list[dict]) -> str:
    head = (
        "| B*T | D | V | variant | time (s) | time / naive | XLA temp (MiB) | temp / naive "
        "| XLA total (MiB) | total / naive | peak RSS (MiB) | RSS / naive |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['bt']} | {r['d']} | {r['v']} | {r['variant']} | {r['time_s']:.3f} "
            f"| {r['time_ratio']:.2f} | {r['temp_mib']:.1f} | {r['temp_ratio']:.3f} "
            f"| {r['total_mib']:.1f} | {r['total_ratio']:.3f} | {r['peak_rss_mib']:.0f} "
            f"| {r['rss_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--bt", type=int, help="tokens per batch (B*T); with --d and --v")
    ap.add_argument("--d", type=int)
    ap.add_argument("--v", type=int)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS / "logprobs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args)))
        return 0

    if args.bt or args.d or args.v:
        if not (args.bt and args.d and args.v):
            ap.error("--bt, --d and --v go together")
        sizes = [(args.bt, args.d, args.v)]
    else:
        sizes = SIZES[args.size]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    itemsize = 2 if args.dtype == "bfloat16" else 4

    results, notes = [], []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = []
    for bt, d, v in sizes:
        bt_fit, note = _fit(bt, d, v, itemsize)
        if note:
            notes.append(f"({bt}, {d}, {v}): {note}")
        jobs += [(bt_fit, d, v, var) for var in variants]
    bar = tqdm(jobs, desc="benchmark", unit="variant") if tqdm else jobs
    for bt, d, v, var in bar:
        if tqdm:
            bar.set_postfix_str(f"{var} B*T={bt} D={d} V={v}")
        r = _run_variant(var, bt, d, v, args.dtype, args.reps)
        r.update(bt=bt, d=d, v=v, dtype=args.dtype)
        results.append(r)

    for r in results:
        family = "kl" if r["variant"].endswith("kl") else "logps"
        base = next(
            (
                x
                for x in results
                if x["variant"] == f"naive_{family}"
                and (x["bt"], x["d"], x["v"]) == (r["bt"], r["d"], r["v"])
            ),
            None,
        )
        for key, field in (
            ("time_ratio", "time_s"),
            ("temp_ratio", "temp_mib"),
            ("total_ratio", "total_mib"),
            ("rss_ratio", "peak_rss_mib"),
        ):
            r[key] = _ratio(r[field], base[field]) if base else float("nan")
        if base:
            r["value_rel_err"] = abs(r["value"] - base["value"]) / max(abs(base["value"]), 1e-30)

    table = _table(results)
    print()
    print(
        f"dtype {args.dtype}, {ROWS} rows, median of {args.reps} runs after warm-up; "
        "ratios are against the naive variant of the same family and size."
    )
    print(table)
    for n in notes:
        print("note:", n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "argv": sys.argv[1:],
        "dtype": args.dtype,
        "rows": ROWS,
        "notes": notes,
        "cpu_count": os.cpu_count(),
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"results: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
