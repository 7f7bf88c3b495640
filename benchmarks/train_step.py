"""DPO train-step time with the reference computed in the step vs precomputed, full fine-tuning
and LoRA, with each step's CPU utilisation (model FLOPs/s over this machine's matmul FLOPs/s).

Every row is `train.step.build_step(StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.1}))`, its
own jitted step with optax.adamw, on the same batches: `--pairs-per-batch` shipped review pairs
(rows `[chosen; rejected]`) right-padded to `--length` tokens. The rows:

  online             reference="frozen": a frozen copy of the initial weights runs a forward in
                     the step; full fine-tuning (the baseline of the ratios).
  precomputed        reference="precomputed": `ref_logps` from `train.reference.precompute`,
                     attached to the batch with `RefCache.attach`; full fine-tuning.
  LoRA, adapters off reference="adapters_disabled": the policy with its adapters off is the
                     reference (a forward in the step, no copy of the weights).
  LoRA, precomputed  the same LoRA policy with precomputed reference log-probs.

LoRA: rank `--lora-rank` on q/k/v/o and gate/up/down. The precompute is timed once, over the
`--pairs` pairs of the epoch, and amortised over its steps (it includes one compile, measured
on a one-batch run, so the marginal cost per step is given too); both LoRA and full fine-tuning
start from the same base weights, so one cache serves both precomputed rows.

Time: the median over `--rounds` rounds of the median of `--reps` steps, after a compile and a
warm-up step; rows (and the matmul probe) alternate within each round, so that a slow spell of
a shared machine hits all of them. tokens/s counts real tokens (attention mask, both sides) and
completion tokens (loss mask) per step, not padding. The issue's target: the precomputed step
takes <= 0.8x the online step.

Model FLOPs per step (T tokens per row, R rows, n = R T tokens including padding, since the
padded batch is what runs; N = matmul parameters per token: q, k, v, o, gate, up, down of every
layer plus the LM head, no embedding; A = 4 L R T^2 d_attn the attention forward, QK^T and AV
over the full T x T scores as computed, d_attn = heads x head_dim):
  policy, full fine-tuning      6 N n + 3 A      (forward 2, backward 4: activations and weights)
  policy, LoRA                  4 N n + 6 N_lora n + 3 A   (the frozen base still runs the
                                forward and the activation-gradient half of the backward)
  reference in the step         + 2 N n + A      (a forward; "frozen" and "adapters_disabled")
  precompute, per batch         2 N n + A
Utilisation = model FLOPs / step time / the faster of two float32 `jnp.dot` probes (an S x S x S
product, `--matmul-size`, and the model's MLP up-projection shape), timed in the same rounds.
It reads as the share of this machine's achievable matmul rate that the step turns into model
arithmetic; the rest is attention softmax, norms, the optimizer, memory traffic and overhead.

Usage:
  python benchmarks/train_step.py            # ~1-2 min on 2 CPUs
  python benchmarks/train_step.py --quick    # smoke test: tiny model, 2 timed steps
Results go to benchmarks/results/train_step.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULTS = dict(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=4, length=128,
                pairs_per_batch=8, pairs=128, lora_rank=8, rounds=5, reps=2,
                matmul_size=1024)  # fmt: skip
QUICK = dict(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, length=64, pairs=16,
             rounds=2, reps=1, matmul_size=256)  # fmt: skip
ROWS = (  # name, reference, LoRA
    ("online", "frozen", False),
    ("precomputed", "precomputed", False),
    ("LoRA, adapters off", "adapters_disabled", True),
    ("LoRA, precomputed", "precomputed", True),
)
LORA_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TARGET = 0.8


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in DEFAULTS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {value}")
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step")
    args = ap.parse_args(argv)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, value) if args.quick else value)
    return args


def matmul_params(cfg) -> int:
    """Parameters that multiply every token: attention and MLP projections, the LM head."""
    d, hd, f = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
    attn = 2 * d * cfg.num_attention_heads * hd + 2 * d * cfg.kv_heads * hd
    return cfg.num_hidden_layers * (attn + 3 * d * f) + d * cfg.vocab_size


def step_flops(cfg, rows: int, length: int, reference: str, lora_params: int) -> dict:
    """Model FLOPs of one step and of a reference forward (the module docstring's formulas)."""
    n, big_n = rows * length, matmul_params(cfg)
    attn = 4 * cfg.num_hidden_layers * rows * length**2 * cfg.num_attention_heads * cfg.dim_per_head
    ref_fwd = 2 * big_n * n + attn
    policy = (4 * big_n + 6 * lora_params if lora_params else 6 * big_n) * n + 3 * attn
    return {"step": policy + (ref_fwd if reference != "precomputed" else 0), "ref_fwd": ref_fwd}


def load_data(args):
    import datasets

    from alignjax import data

    datasets.disable_progress_bars()
    tok = data.shipped_tokenizer()
    raw = data.shipped_dataset("train").select(range(args.pairs))
    tcfg = data.TokenizeConfig(max_length=args.length)

    def tokenize(ds):
        return data.tokenize_dataset(ds, tok, config=tcfg, load_from_cache_file=False)

    tokenized = tokenize(raw)
    loader = data.DataLoader(
        tokenized,
        data.LoaderConfig(batch_size=args.pairs_per_batch, shuffle=False, buckets=(args.length,)),
    )
    batches = [b for _, b in loader.epoch(0)]
    one_batch = tokenize(raw.select(range(args.pairs_per_batch)))
    return len(tok), tokenized, one_batch, batches


def build(cfg, lora_rank: int):
    """A fresh model (same base weights every time; LoRA B starts at zero, so the LoRA policy
    equals the base) and its trainable filter."""
    from flax import nnx

    from alignjax import models, peft

    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    if not lora_rank:
        return model, nnx.Param
    peft.apply(model, [peft.Rule(LORA_TARGETS, "lora", rank=lora_rank)], rngs=nnx.Rngs(1))
    return model, peft.AdapterParam


def timed(fn, reps: int = 1) -> float:
    """Median wall seconds of `reps` calls of `fn` (which blocks until its result is ready)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_probes(args, cfg):
    """{name: (flops per call, jitted dot, operands)} for the peak matmul rate."""
    import jax
    import jax.numpy as jnp

    s, n = args.matmul_size, 2 * args.pairs_per_batch * args.length
    shapes = {
        f"{s}x{s}x{s}": ((s, s), (s, s)),
        f"MLP {n}x{cfg.hidden_size}x{cfg.intermediate_size}": (
            (n, cfg.hidden_size),
            (cfg.hidden_size, cfg.intermediate_size),
        ),
    }
    dot = jax.jit(jnp.dot)
    probes = {}
    for name, (a, b) in shapes.items():
        keys = jax.random.split(jax.random.key(0))
        ops = (jax.random.normal(keys[0], a), jax.random.normal(keys[1], b))
        for _ in range(2):
            jax.block_until_ready(dot(*ops))
        probes[name] = (2 * a[0] * a[1] * b[1], dot, ops)
    return probes


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from alignjax import models
    from alignjax.train import reference
    from alignjax.train import step as S

    vocab, tokenized, one_batch, batches = load_data(args)
    cfg = models.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )  # fmt: skip
    rows = 2 * args.pairs_per_batch

    # The precompute, once (each call compiles its forward: the one-batch run measures that).
    # The reference is the plain base model: `precompute` cannot fingerprint a LoRA model
    # (its dropout's typed PRNG key has no NumPy bytes), and the base weights are the same.
    base, _ = build(cfg, 0)
    kw = dict(batch_size=args.pairs_per_batch, length=args.length)
    fixed_s = min(timed(lambda: reference.precompute(base, one_batch, **kw)) for _ in range(2))
    t0 = time.perf_counter()
    cache = reference.precompute(base, tokenized, **kw)
    precompute_s = time.perf_counter() - t0
    plain = [jax.tree.map(jnp.asarray, b) for b in batches]
    attached = [jax.tree.map(jnp.asarray, cache.attach(b)) for b in batches]
    real = statistics.mean(int(np.sum(b.attention_mask)) for b in batches)
    completion = statistics.mean(int(np.sum(b.loss_mask)) for b in batches)

    optimizer = optax.adamw(1e-4)
    entries = []
    for name, ref, lora in ROWS:
        model, wrt = build(cfg, args.lora_rank if lora else 0)
        lora_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt))) if lora else 0
        state = S.init_state(model, optimizer, wrt=wrt, reference=ref)
        spec = S.StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.1}, reference=ref)
        entries.append(dict(
            name=name, reference=ref, lora=lora, state=state, step=S.build_step(spec, optimizer),
            batches=attached if ref == "precomputed" else plain, calls=0, rounds=[],
            trainable_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
            flops=step_flops(cfg, rows, args.length, ref, lora_params),
        ))  # fmt: skip

    def one_step(e):
        e["state"], metrics = e["step"](e["state"], e["batches"][e["calls"] % len(e["batches"])])
        e["calls"] += 1
        jax.block_until_ready((e["state"], metrics))
        return metrics

    for e in entries:  # compile, then one warm-up step
        e["compile_s"] = timed(functools.partial(one_step, e))
        metrics = one_step(e)
        e["loss"] = float(metrics["loss"])
    probes = matmul_probes(args, cfg)
    probe_rounds = {k: [] for k in probes}
    for _ in range(args.rounds):
        for e in entries:
            e["rounds"].append(timed(functools.partial(one_step, e), args.reps))
        for k, (flops, dot, ops) in probes.items():
            call = functools.partial(lambda f, x: jax.block_until_ready(f(*x)), dot, ops)
            probe_rounds[k].append(flops / timed(call, max(5, args.reps)))
    matmul = {k: statistics.median(v) for k, v in probe_rounds.items()}
    peak = max(matmul.values())

    n_batches = len(batches)
    marginal_s = max(precompute_s - fixed_s, 0.0) / max(n_batches - 1, 1)
    out = []
    for e in entries:
        s = statistics.median(e["rounds"])
        out.append(dict(
            variant=e["name"], reference=e["reference"], lora=e["lora"],
            trainable_params=e["trainable_params"], ms_per_step=1e3 * s,
            round_ms=[1e3 * r for r in e["rounds"]], compile_s=e["compile_s"],
            real_tokens_per_s=real / s, completion_tokens_per_s=completion / s,
            model_flops=e["flops"]["step"], model_flops_per_s=e["flops"]["step"] / s,
            utilisation=e["flops"]["step"] / s / peak, warmup_loss=e["loss"],
        ))  # fmt: skip
    online = out[0]["ms_per_step"]
    for r in out:
        r["ratio_vs_online"] = r["ms_per_step"] / online
        if r["reference"] == "precomputed":
            r["ms_per_step_with_precompute"] = r["ms_per_step"] + 1e3 * precompute_s / n_batches
    return dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        model=dict(vocab=vocab, matmul_params=matmul_params(cfg), rows=rows, length=args.length,
                   real_tokens_per_step=real, completion_tokens_per_step=completion),
        precompute=dict(seconds=precompute_s, pairs=args.pairs, steps_per_epoch=n_batches,
                        amortised_ms_per_step=1e3 * precompute_s / n_batches,
                        one_batch_seconds=fixed_s, marginal_ms_per_step=1e3 * marginal_s,
                        ref_forward_flops=entries[0]["flops"]["ref_fwd"]),
        matmul_flops_per_s=matmul, peak_flops_per_s=peak,
        target=dict(ratio=TARGET, precomputed_ratio=out[1]["ratio_vs_online"],
                    met=out[1]["ratio_vs_online"] <= TARGET,
                    flop_ratio=out[1]["model_flops"] / out[0]["model_flops"]),
        rows=out,
    )  # fmt: skip


def report(res: dict) -> str:
    a, m, p, t = res["args"], res["model"], res["precompute"], res["target"]
    lines = [
        f"DPO (sigmoid, beta 0.1) step, adamw; Llama vocab {m['vocab']}, width {a['hidden']}, "
        f"MLP {a['intermediate']}, {a['layers']} layers, {a['heads']}/{a['kv_heads']} heads, "
        f"LoRA rank {a['lora_rank']}; {a['pairs_per_batch']} shipped pairs x {a['length']} "
        f"tokens ({m['real_tokens_per_step']:.0f} real, {m['completion_tokens_per_step']:.0f} "
        f"completion per step); float32, median of {a['rounds']} rounds x {a['reps']} steps",
        "",
        "| variant | trainable | ms / step | real tok/s | completion tok/s | vs online "
        "| + precompute ms | GFLOP/s | utilisation | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        with_pre = r.get("ms_per_step_with_precompute")
        lines.append(
            f"| {r['variant']} | {r['trainable_params']:,} | {r['ms_per_step']:.1f} | "
            f"{r['real_tokens_per_s']:.0f} | {r['completion_tokens_per_s']:.0f} | "
            f"{r['ratio_vs_online']:.2f}x | {'' if with_pre is None else f'{with_pre:.1f}'} | "
            f"{r['model_flops_per_s'] / 1e9:.1f} | {100 * r['utilisation']:.0f}% | "
            f"{r['compile_s']:.1f} |"
        )
    probes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in res["matmul_flops_per_s"].items())
    lines += [
        "",
        f"Target: precomputed step <= {t['ratio']}x online: {t['precomputed_ratio']:.2f}x, "
        + ("met" if t["met"] else "NOT met")
        + f" (model FLOPs ratio {t['flop_ratio']:.2f}x: the time ratio if every FLOP ran at "
        "one rate).",
        f"Precompute: {p['seconds']:.2f} s for {p['pairs']} pairs ({p['steps_per_epoch']} steps), "
        f"{p['amortised_ms_per_step']:.1f} ms per step over one epoch (the '+ precompute' "
        f"column); a one-batch run takes {p['one_batch_seconds']:.2f} s (mostly its compile), "
        f"so the marginal cost is ~{p['marginal_ms_per_step']:.1f} ms per step, once per run "
        "(the cache is reused across epochs and runs).",
        f"Matmul probe, float32 GFLOP/s: {probes}; utilisation = model GFLOP/s / "
        f"{res['peak_flops_per_s'] / 1e9:.1f}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    res = run(args)
    text = report(res)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
