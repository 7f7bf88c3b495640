"""One accelerator check for issue 18: the DPO step, the model's forward + backward and one
causal attention call (forward + backward), in float32 and bfloat16, with cuDNN's fused kernel
(`attention_implementation="cudnn"`, `jax.nn.dot_product_attention`) and our "blockwise"
attention, at T = 512 .. 8192 tokens per row; one JSON with the device, the JAX version, each
case's time and compiled temporary memory, and blockwise / cuDNN ratios.

Cases (the benchmark modules' own builders, batch 1 row unless said):
  attention  `attention.attention_step`: the gradient w.r.t. q, k, v of one
             `models.attention(..., causal=True)` call, Llama-7B-like heads (32 query / 8
             key-value heads of 128), the mask `attention_masks` builds (2-D for "blockwise",
             the dense [1, 1, T, T] one for cuDNN).
  model      `attention.compiled_step`: value_and_grad of the fused next-token log-prob sum of
             the issue's Llama (vocab 8192, width 256, 4 layers, 8/4 heads, MLP 688; float32
             parameters, computing in the case's dtype).
  dpo_step   `train.step.build_step` (DPO sigmoid, beta 0.1, a frozen reference in the step,
             optax.adamw 1e-4) on one pair of random rows of T tokens (`trl_head_to_head.tokens`),
             the same model and dtype.
cuDNN takes float16 / bfloat16 only: its float32 cases record the error JAX raises. A case
that fails (an unsupported shape, out of memory) records its error and the run goes on.

Time: the median of `--reps` calls after a compile and two warm-up calls (the DPO step threads
its donated state). Memory: `memory_analysis().temp_size_in_bytes` of the compiled program.
The cases run by T ascending (then attention, model, DPO step) and any case that would start
after `--budget-s` (360) seconds is listed as skipped, so one GPU run ends under 8 minutes.

Usage:
  python benchmarks/device_check.py --out $OUT/device_check.json   # a GPU (H100 / H200)
  python benchmarks/device_check.py --smoke --out /tmp/dc.json     # any CPU, tiny, < 60 s
On the lent GPU machines (jax 0.11, no `datasets`), run from the repository root with
`PYTHONPATH=.`; the DPO step imports `alignjax.train`, which needs `datasets`, `dill` and
`multiprocess`: carry their wheels as /work/.library/device/README.md describes, or its cases
record the ImportError. Not yet run on a GPU: no GPU was lent to the session that wrote it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import attention as attention_bench  # noqa: E402  (benchmarks/attention.py)

LENGTHS = (512, 1024, 2048, 4096, 8192)
IMPLEMENTATIONS = ("cudnn", "blockwise")
DTYPES = ("bfloat16", "float32")
HEADS = dict(heads=32, kv_heads=8, head_dim=128)  # one Llama-7B-like attention layer
DPO_LENGTHS = (512, 2048, 8192)
SMOKE = dict(
    lengths=(64,),
    dpo_lengths=(64,),
    heads=dict(heads=4, kv_heads=2, head_dim=16),
    model=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192),
    reps=1,
)  # fmt: skip


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU smoke test")
    ap.add_argument("--lengths", type=int, nargs="+", help=f"default {LENGTHS}")
    ap.add_argument("--dpo-lengths", type=int, nargs="+", help=f"default {DPO_LENGTHS}")
    ap.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--benchmarks", nargs="+", default=["attention", "model", "dpo_step"])
    ap.add_argument("--reps", type=int, help="timed calls per case (default 5)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no case after this")
    ap.add_argument("--out", type=Path, default=RESULTS / "device_check.json")
    args = ap.parse_args(argv)
    args.lengths = args.lengths or list(SMOKE["lengths"] if args.smoke else LENGTHS)
    args.dpo_lengths = args.dpo_lengths or list(SMOKE["dpo_lengths"] if args.smoke else DPO_LENGTHS)
    args.reps = args.reps or (SMOKE["reps"] if args.smoke else 5)
    args.heads = SMOKE["heads"] if args.smoke else HEADS
    args.model = SMOKE["model"] if args.smoke else attention_bench.CONFIG
    return args


def attention_case(args, implementation: str, length: int, dtype) -> dict:
    step, inputs = attention_bench.attention_step(implementation, length, dtype=dtype, **args.heads)
    return {
        "ms": 1e3 * attention_bench.step_seconds(step, inputs, args.reps),
        "temp_mib": step.memory_analysis().temp_size_in_bytes / 2**20,
    }


def model_case(args, implementation: str, length: int, dtype) -> dict:
    step, params = attention_bench.compiled_step(
        implementation, length, dtype=dtype, config=args.model
    )
    return {
        "ms": 1e3 * attention_bench.step_seconds(step, params, args.reps),
        "temp_mib": step.memory_analysis().temp_size_in_bytes / 2**20,
    }


def dpo_case(args, implementation: str, length: int, dtype) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from trl_head_to_head import tokens

    from alignjax import data, models
    from alignjax.train import step as S

    cfg = models.LlamaConfig(**args.model, attention_implementation=implementation)
    prompt, chosen, rejected = tokens(cfg.vocab_size, 1, length)
    examples = [
        dict(chosen_input_ids=p + c, chosen_prompt_length=len(p), rejected_input_ids=p + r,
             rejected_prompt_length=len(p), row=i)
        for i, (p, c, r) in enumerate(zip(prompt, chosen, rejected))
    ]  # fmt: skip
    batch = jax.tree.map(jnp.asarray, data.collate(examples, length))
    optimizer = optax.adamw(1e-4)
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    state = S.init_state(model, optimizer, wrt=nnx.Param, reference="frozen")
    spec = S.StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.1}, reference="frozen")
    step = S.build_step(spec, optimizer).lower(state, batch).compile()
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return {
        "ms": 1e3 * statistics.median(times),
        "temp_mib": step.memory_analysis().temp_size_in_bytes / 2**20,
        "loss": float(metrics["loss"]),
    }


BENCHMARKS = {"attention": attention_case, "model": model_case, "dpo_step": dpo_case}


def cases(args):
    """T ascending, then benchmark, dtype, implementation: a run cut short by the budget loses
    the longest rows of every benchmark, not one benchmark."""
    for length in sorted(set(args.lengths) | set(args.dpo_lengths)):
        for bench in args.benchmarks:
            if length in (args.dpo_lengths if bench == "dpo_step" else args.lengths):
                for dtype in args.dtypes:
                    for implementation in args.implementations:
                        yield bench, length, dtype, implementation


def ratios(rows: list[dict]) -> list[dict]:
    """blockwise / cuDNN time and memory wherever both ran."""
    done = {(r["benchmark"], r["tokens"], r["dtype"], r["implementation"]): r for r in rows}
    out = []
    for (bench, length, dtype, impl), r in done.items():
        other = done.get((bench, length, dtype, "cudnn"))
        if impl != "blockwise" or other is None or "ms" not in r or "ms" not in other:
            continue
        out.append({
            "benchmark": bench, "tokens": length, "dtype": dtype,
            "time_blockwise_over_cudnn": r["ms"] / other["ms"],
            "temp_blockwise_over_cudnn": r["temp_mib"] / max(other["temp_mib"], 1e-9),
        })  # fmt: skip
    return out


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    rows, skipped = [], []
    for bench, length, dtype, impl in cases(args):
        case = {"benchmark": bench, "tokens": length, "dtype": dtype, "implementation": impl}
        if time.perf_counter() - start > args.budget_s:
            skipped.append(case)
            continue
        t0 = time.perf_counter()
        try:
            case.update(BENCHMARKS[bench](args, impl, length, jnp.dtype(dtype)))
        except Exception as e:  # noqa: BLE001  (recorded: an unsupported case must not stop the run)
            case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        case["wall_s"] = time.perf_counter() - t0
        rows.append(case)
        print(json.dumps(case), flush=True)
    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "model": args.model,
        "attention_heads": args.heads,
        "reps": args.reps,
        "cases": rows,
        "ratios": ratios(rows),
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - start,
    }


def summary(res: dict) -> str:
    lines = [
        f"{res['device']} ({res['platform']}), jax {res['jax']}, {res['elapsed_s']:.0f} s",
        "| benchmark | T | dtype | implementation | ms | temp MiB |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in res["cases"]:
        ms = f"{r['ms']:.2f}" if "ms" in r else r.get("error", "")[:60]
        mib = f"{r['temp_mib']:.1f}" if "temp_mib" in r else ""
        lines.append(
            f"| {r['benchmark']} | {r['tokens']} | {r['dtype']} | {r['implementation']} | "
            f"{ms} | {mib} |"
        )
    if res["skipped"]:
        lines.append(f"skipped (budget): {len(res['skipped'])} cases")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(summary(res))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
