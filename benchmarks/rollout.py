"""Generation tokens/s: alignjax's KV-cache sampler (`models.generate`) against transformers'
`model.generate` on the same weights and prompts, and the share of a `task: online` GRPO step
spent in the rollout phase.

Model: a Llama of vocab 8192, width 256, MLP 688, 4 layers, 8 query / 4 key-value heads, float32
(`--quick`: vocab 512, width 32, 1 layer), random weights built once by alignjax and written by
`models.save_pretrained`; the alignjax child reads them back with `models.load_pretrained`, the
transformers child with `LlamaForCausalLM.from_pretrained(dtype=float32)` in eval mode under
`torch.inference_mode()`, `torch.set_num_threads(--threads)` (default: the CPU count, as XLA:CPU).

Prompts: random ids in [3, vocab), `--prompt-length` P columns, left-padded with id 0 (batch 1:
no padding; larger batches: real lengths drawn from [P/2, P], the first row full). Both sides
generate exactly `max_new_tokens` tokens per row: alignjax with no stop tokens, transformers
with `eos_token_id=None` and `min_new_tokens = max_new_tokens` (its output length is asserted).
Modes: "sample" (temperature 1.0, no top-k / top-p: transformers `do_sample=True, top_k=0,
top_p=1.0`) and "greedy"; transformers' default cache (`use_cache=True`). alignjax's `generate`
also returns each token's log-prob (a log-softmax per step), which transformers' call does not.

Timed: one call on prompts prepared before the clock starts (alignjax: `jax.block_until_ready`
of `generate(...)`), after an untimed first call (alignjax: its compile, reported) and a warm-up.
Each side is a persistent child process (JSON lines over stdin / stdout); `--rounds` rounds
alternate the sides, each timing `--reps` calls; a row's time is the median over rounds of the
median of its calls; tokens/s = batch x N / time. Greedy tokens of the two sides are compared.

Online share: `task: online` GRPO (`trainer`'s own `OnlinePhase`, the loop's step function:
rollout phase, then the jitted train step) on the same checkpoint (`model.path`), the shipped
review prompts bucketed to P tokens, `data.batch_size` rows = prompts x `num_generations` 4,
`max_new_tokens` N, temperature 1, no stop tokens, the `sentiment` reward. Its metrics
`time/rollout` (sampling, scoring, advantages) and `time/train` per step, after `--online-warmup`
untimed steps (compiles); the sampling call inside the rollout is timed on its own as well.

Usage:
  python benchmarks/rollout.py --ref-python /tmp/ref/bin/python   # full
  python benchmarks/rollout.py --quick                            # alignjax rows only, < 60 s
Without `--ref-python` only the alignjax rows run. Results: benchmarks/results/rollout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = dict(vocab=8192, hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4)
QUICK_MODEL = dict(vocab=512, hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2)
DEFAULTS = dict(batches=([1, 32], [1, 4]), new_tokens=([64, 128], [16]), prompt_length=(32, 8),
                rounds=(3, 1), reps=(3, 1), online_steps=(4, 1), online_batch=(32, 8))  # fmt: skip


def prompts(vocab: int, batch: int, length: int, seed: int = 0):
    """Left-padded `(ids, mask)` int lists, `[batch, length]` (module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1000 * batch + length)
    real = [length] + rng.integers(length // 2, length + 1, batch - 1).tolist()
    ids, mask = np.zeros((batch, length), np.int64), np.zeros((batch, length), np.int64)
    for i, n in enumerate(real):
        ids[i, length - n :] = rng.integers(3, vocab, n)
        mask[i, length - n :] = 1
    return ids.tolist(), mask.tolist()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- children


class AlignjaxSide:
    def __init__(self, m: dict, model_dir: str):
        from flax import nnx

        from alignjax import models

        cfg = models.LlamaConfig(
            vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
            num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
            num_key_value_heads=m["kv_heads"], max_position_embeddings=4096,
        )  # fmt: skip
        models.save_pretrained(models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), model_dir)
        self.model = models.load_pretrained(model_dir)
        self.m, self.model_dir = m, model_dir

    def setup(self, batch: int, prompt: int, new: int, mode: str) -> dict:
        import jax
        import jax.numpy as jnp

        from alignjax import models

        ids, mask = (jnp.asarray(x, jnp.int32) for x in prompts(self.m["vocab"], batch, prompt))
        temperature = 1.0 if mode == "sample" else 0.0
        key = jax.random.key(0)

        def call():
            out = models.generate(self.model, ids, mask, key, max_new_tokens=new,
                                  temperature=temperature)  # fmt: skip
            return jax.block_until_ready(out)

        self.call, t0 = call, time.perf_counter()
        out = call()
        compile_s = time.perf_counter() - t0
        call()
        assert out.tokens.shape == (batch, new), out.tokens.shape
        return dict(compile_s=compile_s, tokens=out.tokens.tolist())

    def online(self, steps: int, warmup: int, batch_size: int, generations: int, prompt: int,
               new: int) -> dict:  # fmt: skip
        import jax
        import numpy as np

        from alignjax import data
        from alignjax.train import config as C
        from alignjax.train import session as session_lib

        tmp = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
        texts = [r["prompt"] for r in data.shipped_dataset("train").select(range(64))]
        source = tmp / "prompts.jsonl"
        source.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        cfg = C.load_config(None, [
            "task=online", "online.method=grpo", f"data.train={source}", f"out_dir={tmp / 'run'}",
            "data.eval=null", f"data.batch_size={batch_size}", f"data.buckets=[{prompt}]",
            f"data.max_prompt_length={prompt}", f"online.num_generations={generations}",
            f"online.max_new_tokens={new}", "online.temperature=1.0", "online.stop_tokens=[]",
            f"model.path={self.model_dir}", "plot=false", "eval_samples=0",
            "checkpoint.export_hf=false", "mesh.devices=1",
        ])  # fmt: skip
        sess = session_lib.setup(cfg)
        phase, state = sess.rollouts, sess.state
        sampled = []
        inner = phase.sample

        def sample(*a, **kw):  # the sampling call (generate + device_get) of the rollout phase
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            sampled.append(time.perf_counter() - t0)
            return out

        phase.sample = sample
        batches = [b for _, b in phase.loader().epoch(0)]
        rows = []
        for i in range(warmup + steps):
            state, metrics = phase(state, batches[i % len(batches)])
            jax.block_until_ready(state)
            if i >= warmup:
                val = lambda k, m=metrics: float(np.ravel(m[k])[0])  # noqa: E731
                rows.append(dict(rollout_s=val("time/rollout"), train_s=val("time/train"),
                                 sample_s=sampled[-1],
                                 mean_length=val("completions/mean_length")))  # fmt: skip
        first = batches[0].input_ids.shape
        shutil.rmtree(tmp, ignore_errors=True)
        return dict(steps=rows, prompt_shape=list(first), method="grpo", beta=phase.o.beta,
                    loss_type=phase.o.loss_type, needs_reference=phase.needs_ref)  # fmt: skip


class TransformersSide:
    def __init__(self, m: dict, model_dir: str):
        import torch
        from transformers import LlamaForCausalLM

        self.torch, self.m = torch, m
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gc = self.model.generation_config
        gc.eos_token_id, gc.bos_token_id, gc.pad_token_id = None, None, 0

    def setup(self, batch: int, prompt: int, new: int, mode: str) -> dict:
        torch = self.torch
        ids, mask = (torch.tensor(x) for x in prompts(self.m["vocab"], batch, prompt))
        kw = dict(max_new_tokens=new, min_new_tokens=new, use_cache=True, pad_token_id=0)
        if mode == "sample":
            kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False)

        def call():
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=mask, **kw)
            assert tuple(out.shape) == (batch, prompt + new), out.shape
            return out

        self.call, t0 = call, time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        call()
        return dict(compile_s=first, tokens=out[:, prompt:].tolist(),
                    torch_threads=torch.get_num_threads())  # fmt: skip


def child_main(kind: str, m: dict, model_dir: str, threads: int) -> None:
    if kind == "transformers":
        import torch

        torch.set_num_threads(threads)
        side = TransformersSide(m, model_dir)
    else:
        side = AlignjaxSide(m, model_dir)
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the JSON lines
    print(json.dumps({"ready": kind}), file=out, flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            break
        try:
            if op == "setup":
                res = side.setup(**msg)
            elif op == "time":
                res = dict(times=[timed(side.call) for _ in range(msg["reps"])])
            elif op == "online":
                res = side.online(**msg)
            else:
                raise ValueError(op)
        except Exception as e:  # reported to the parent, which stops
            import traceback

            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(res), file=out, flush=True)


class Child:
    def __init__(self, name: str, python: str, m: dict, model_dir: str, threads: int):
        self.name = name
        cmd = [python, __file__, "--child", name, "--model-json", json.dumps(m),
               "--model-dir", model_dir, "--threads", str(threads)]  # fmt: skip
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, text=True, env=env)
        self.recv()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} child exited (rc {self.proc.wait()})")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"{self.name}: {res['error']}")
        return res

    def __call__(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self):
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- parent


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", help="Python with torch + transformers (the [ref] venv); "
                    "without it only the alignjax rows run")  # fmt: skip
    ap.add_argument("--batches", type=int, nargs="+", help="default 1 32 (quick: 1 4)")
    ap.add_argument("--new-tokens", type=int, nargs="+", help="default 64 128 (quick: 16)")
    ap.add_argument("--modes", nargs="+", default=["sample", "greedy"],
                    choices=["sample", "greedy"])  # fmt: skip
    ap.add_argument("--prompt-length", type=int, help="default 32 (quick: 8)")
    ap.add_argument("--rounds", type=int, help="default 3 (quick: 1)")
    ap.add_argument("--reps", type=int, help="timed calls per side per round, default 3 (quick 1)")
    ap.add_argument("--online-steps", type=int, help="timed GRPO steps, default 4 (quick: 1)")
    ap.add_argument("--online-warmup", type=int, default=2, help="untimed GRPO steps (compile)")
    ap.add_argument("--online-batch", type=int, help="GRPO rows per step, default 32 (quick: 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--quick", action="store_true", help="tiny model, short generations")
    ap.add_argument("--note", help="a line for the report (e.g. why --threads)")
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-json", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for k, (full, quick) in DEFAULTS.items():
        setattr(a, k, getattr(a, k) or (quick if a.quick else full))
    return a


def spread(xs: list) -> dict:
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def run(args, on_row=None) -> dict:
    m = QUICK_MODEL if args.quick else MODEL
    tmp = tempfile.TemporaryDirectory(prefix="rollout_model_")
    children = {}
    res = dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("child", "model_json", "model_dir")},
        model=m, sides=["alignjax"] + (["transformers"] if args.ref_python else []),
        note=None if args.ref_python else "no --ref-python: alignjax rows only",
        cpu_count=os.cpu_count(), loadavg_start=list(os.getloadavg()), results=[],
    )  # fmt: skip
    try:  # alignjax first: it writes the checkpoint the transformers child loads
        children["alignjax"] = Child("alignjax", sys.executable, m, tmp.name, args.threads)
        if args.ref_python:
            children["transformers"] = Child("transformers", args.ref_python, m, tmp.name,
                                             args.threads)  # fmt: skip
        for new in args.new_tokens:
            for batch in args.batches:
                for mode in args.modes:
                    t0 = time.perf_counter()
                    kw = dict(batch=batch, prompt=args.prompt_length, new=new, mode=mode)
                    setup = {n: c("setup", **kw) for n, c in children.items()}
                    rounds, loads = {n: [] for n in children}, []
                    for _ in range(args.rounds):
                        for n, c in children.items():
                            rounds[n].append(statistics.median(c("time", reps=args.reps)["times"]))
                        loads.append(os.getloadavg()[0])
                    row = dict(batch=batch, new_tokens=new, mode=mode, load_1min=loads,
                               prompt_length=args.prompt_length, sides={})  # fmt: skip
                    for n in children:
                        s = spread(rounds[n])
                        row["sides"][n] = dict(
                            s_per_call=s["median"], round_s=rounds[n],
                            compile_s=setup[n]["compile_s"],
                            tokens_per_s=batch * new / s["median"],
                            tokens_per_s_range=[batch * new / s["max"], batch * new / s["min"]],
                        )  # fmt: skip
                    if "transformers" in row["sides"]:
                        sd = {n: v["tokens_per_s"] for n, v in row["sides"].items()}
                        row["ratio"] = sd["alignjax"] / sd["transformers"]
                        if mode == "greedy":
                            a, b = (setup[n]["tokens"] for n in ("alignjax", "transformers"))
                            same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
                            row["greedy_token_agreement"] = same / (batch * new)
                            row["greedy_first_row_identical"] = a[0] == b[0]
                    row["wall_s"] = time.perf_counter() - t0
                    res["results"].append(row)
                    print(f"[b{batch} N{new} {mode}: {row['wall_s']:.0f} s] " + ", ".join(
                        f"{n} {v['tokens_per_s']:.0f} tok/s" for n, v in row["sides"].items()
                    ), file=sys.stderr, flush=True)  # fmt: skip
                    if on_row:
                        on_row(res)
        if "transformers" in children:  # the online step runs alone
            children.pop("transformers").close()
        gens = 4 if args.online_batch % 4 == 0 else 2
        new = args.new_tokens[0]
        o = children["alignjax"]("online", steps=args.online_steps, warmup=args.online_warmup,
                                 batch_size=args.online_batch, generations=gens,
                                 prompt=args.prompt_length, new=new)  # fmt: skip
        rollout = [s["rollout_s"] for s in o["steps"]]
        train = [s["train_s"] for s in o["steps"]]
        sample = [s["sample_s"] for s in o["steps"]]
        share = [r / (r + t) for r, t in zip(rollout, train)]
        res["online"] = dict(
            o, rows=args.online_batch, num_generations=gens, new_tokens=new,
            rollout_s=spread(rollout), train_s=spread(train), sample_s=spread(sample),
            rollout_share=spread(share),
            sample_share=spread([s / (r + t) for s, r, t in zip(sample, rollout, train)]),
            load_1min=os.getloadavg()[0],
        )  # fmt: skip
    finally:
        for c in children.values():
            c.close()
        tmp.cleanup()
    res["loadavg_end"] = list(os.getloadavg())
    return res


def report(res: dict) -> str:
    m, a = res["model"], res["args"]
    ref = "transformers" in res["sides"]
    lines = [
        f"Generation with a KV cache; Llama vocab {m['vocab']}, width {m['hidden']}, MLP "
        f"{m['intermediate']}, {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, float32, "
        f"the same random weights on both sides (alignjax `save_pretrained`); prompts of "
        f"{a['prompt_length']} columns, left-padded; exactly N new tokens per row (no stop); "
        f"sample = temperature 1.0, no top-k/top-p; median of {a['rounds']} rounds x "
        f"{a['reps']} calls (min-max over rounds in brackets); {res['cpu_count']} CPUs, torch "
        f"threads {a['threads']}.",
        "",
    ]
    if not ref:
        lines += [f"**{res['note']}.**", ""]
    if a.get("note"):
        lines += [a["note"], ""]
    head = "| batch | N | mode | alignjax tok/s | compile s |"
    if ref:
        head += " transformers tok/s | alignjax / transformers | greedy agreement |"
    lines += [head, "|" + "---:|" * (head.count("|") - 1)]
    cell = lambda v: "{:.0f} ({:.0f}-{:.0f})".format(v["tokens_per_s"], *v["tokens_per_s_range"])  # noqa: E731
    for r in res["results"]:
        s = r["sides"]
        line = f"| {r['batch']} | {r['new_tokens']} | {r['mode']} | {cell(s['alignjax'])} | "
        line += f"{s['alignjax']['compile_s']:.1f} |"
        if ref:
            agree = r.get("greedy_token_agreement")
            line += (f" {cell(s['transformers'])} | {r['ratio']:.2f}x | "
                     f"{'' if agree is None else f'{100 * agree:.0f}%'} |")  # fmt: skip
        lines.append(line)
    loads = [x for r in res["results"] for x in r["load_1min"]]
    if loads:
        lines += ["", f"1-minute load average during the rows: {min(loads):.2f}-"
                  f"{max(loads):.2f} (median {statistics.median(loads):.2f}) on "
                  f"{res['cpu_count']} CPUs."]  # fmt: skip
    o = res.get("online")
    if o:
        ms = lambda k: "{:.0f} ms ({:.0f}-{:.0f})".format(*(1e3 * v for v in o[k].values()))  # noqa: E731
        pc = lambda k: f"{100 * o[k]['median']:.0f}%"  # noqa: E731
        lines += [
            "",
            f"Online step (`task: online` GRPO, `OnlinePhase`: rollout phase + jitted step), "
            f"{o['rows']} rows = {o['rows'] // o['num_generations']} prompts x "
            f"{o['num_generations']}, prompts {o['prompt_shape'][1]} tokens, {o['new_tokens']} new "
            f"tokens, beta {o['beta']} (reference: {o['needs_reference']}), loss {o['loss_type']}; "
            f"median of {len(o['steps'])} steps after {a['online_warmup']} untimed; load "
            f"{o['load_1min']:.2f}:",
            "",
            "| time/rollout | of which sampling | time/train | rollout share | sampling share |",
            "|---:|---:|---:|---:|---:|",
            f"| {ms('rollout_s')} | {ms('sample_s')} | {ms('train_s')} | "
            f"{pc('rollout_share')} | {pc('sample_share')} |",
        ]
    lines += [
        "",
        "alignjax's `generate` also computes every token's log-prob (a log-softmax over the "
        "vocabulary per step); transformers' call does not. Greedy agreement: the share of "
        "greedy tokens equal on the two sides (float32 near-ties can diverge a row).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child_main(args.child, json.loads(args.model_json), args.model_dir, args.threads)
        return 0

    def save(res: dict) -> str:
        text = report(res)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
        return text

    print(save(run(args, on_row=save)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
