"""The cost of WAGLE's score pass as a multiple of one unlearning training step, and of the
importance mask in the step.

Rows, each its own jitted function on the same `[forget; retain]` batches (`data.UnlearnLoader`
over shipped review texts padded to `--length` tokens, `--batch` forget + `--batch` retain rows):

  step, NPO                 `build_step(StepSpec(task="unlearn", loss="npo"))` with optax.adamw:
                            the policy's forward and backward plus the frozen reference's forward
                            (the baseline of the ratios).
  step, NPO + mask          the same with `importance.masked_updates` (a select per weight after
                            the chain; the mask is an argument of the step, in the optimizer state).
  step, GradDiff            reference-free: the policy only.
  score pass, per batch     `train.importance.build_score_step`: one forward, two backward passes
                            (forget and retain NLL gradients from one `jax.vjp`), summed.
  score pass, naive         WAGLE's order: `jax.grad` of the forget NLL and of the retain NLL
                            separately (two forwards, two backwards) per batch.

The whole score pass is one epoch of the forget set: `forget rows / batch` score batches, reported
as a multiple of one NPO step (and the top-ratio ranking over all weights on the host, timed once).

Time: median over `--rounds` rounds of the median of `--reps` calls after a compile and a warm-up
call; rows alternate within each round.

Usage:
  python benchmarks/unlearn.py            # ~1 min on 2 CPUs
  python benchmarks/unlearn.py --quick    # smoke test
Results go to benchmarks/results/unlearn.json and .md.
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

import datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from alignjax import data, models, ops  # noqa: E402
from alignjax.optim import importance as I  # noqa: E402
from alignjax.train import importance as TI  # noqa: E402
from alignjax.train import step as S  # noqa: E402
from alignjax.train.config import MaskConfig  # noqa: E402

FULL = dict(vocab=8192, hidden=256, layers=4, heads=8, kv_heads=4, mlp=688, length=128,
            batch=8, forget_rows=400, rounds=5, reps=2)  # fmt: skip
QUICK = dict(vocab=512, hidden=32, layers=1, heads=4, kv_heads=2, mlp=64, length=48,
             batch=2, forget_rows=8, rounds=1, reps=1)  # fmt: skip


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "unlearn"))
    for k in FULL:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def batches(args):
    texts = data.shipped_dataset("sft").select(range(4 * args.batch)).to_list()
    tok = data.shipped_tokenizer()

    def tokenized(rows):
        config = data.TokenizeConfig(max_length=args.length)
        return data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, config=config)

    half = 2 * args.batch
    loader = data.UnlearnLoader(tokenized(texts[:half]), tokenized(texts[half:]),
                                data.LoaderConfig(batch_size=args.batch,
                                                  buckets=(args.length,)))  # fmt: skip
    return loader, [jax.tree.map(jnp.asarray, b) for _, b in loader.epoch(0)]


def run(args) -> dict:
    cfg = models.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=args.mlp, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads)  # fmt: skip
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    loader, host = batches(args)
    batch = host[0]
    tx = optax.adamw(1e-5, weight_decay=0.01)
    npo = S.StepSpec(task="unlearn", loss="npo")
    diff = S.StepSpec(task="unlearn", loss="grad_diff")
    st_npo = S.init_state(model, tx, reference="frozen", loss="npo")
    st_free = S.init_state(model, tx, reference="none", loss="grad_diff")
    mask = TI.compute_mask(MaskConfig(score="random", ratio=0.5), st_free)
    mtx = I.masked_updates(tx, mask)
    st_mask = st_npo.replace(opt_state=mtx.init(st_npo.params))
    steps = {
        "step, NPO": (S.build_step(npo, tx, donate=False), st_npo),
        "step, NPO + mask": (S.build_step(npo, mtx, donate=False), st_mask),
        "step, GradDiff": (S.build_step(diff, tx, donate=False), st_free),
    }
    score = TI.build_score_step(donate=False)
    zeros = jax.tree.map(jnp.zeros_like, st_free.params)

    def nll(params, b, rows):
        m = S.model_of(st_free, params)
        out = m(**b.model_inputs())
        lp = ops.fused_token_logps(out.last_hidden_state, m.unembed(), b.labels, b.loss_mask)
        mask_ = b.loss_mask[rows]
        return -jnp.sum(lp[rows] * mask_) / jnp.maximum(jnp.sum(mask_), 1)

    n = args.batch
    naive = jax.jit(lambda p, b: (jax.grad(nll)(p, b, slice(0, n)),
                                  jax.grad(nll)(p, b, slice(n, None))))  # fmt: skip
    fns = {name: (lambda f=f, s=s: f(s, batch)) for name, (f, s) in steps.items()}
    fns["score pass, per batch"] = lambda: score(st_free, (zeros, zeros), batch)
    fns["score pass, naive"] = lambda: naive(st_free.params, batch)
    for fn in fns.values():  # compile, warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    rounds = {k: [] for k in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            rounds[name].append(timed(fn, args.reps))
    ms = {k: 1e3 * statistics.median(v) for k, v in rounds.items()}
    base = ms["step, NPO"]
    rows = [{"row": k, "ms": round(v, 2), "vs NPO step": round(v / base, 3)} for k, v in ms.items()]
    per_epoch = args.forget_rows // args.batch
    t = time.perf_counter()
    g = jax.tree.map(lambda x: x + 1e-3, st_free.params)
    jax.block_until_ready(I.top_ratio_mask(I.wagle_scores(st_free.params, g, g), 0.5))
    ranking_ms = 1e3 * (time.perf_counter() - t)
    whole = per_epoch * ms["score pass, per batch"] + ranking_ms
    params = sum(x.size for x in jax.tree.leaves(st_free.params))
    score_pass = {
        "batches": per_epoch,
        "ranking_ms (incl. compile)": round(ranking_ms, 1),
        "total_ms": round(whole, 1),
        "vs NPO step": round(whole / base, 2),
    }
    return dict(config={k: getattr(args, k) for k in FULL}, parameters=int(params), rows=rows,
                score_pass=score_pass, backend=jax.default_backend(),
                devices=jax.device_count())  # fmt: skip


def report(res) -> str:
    c = res["config"]
    lines = [f"# Unlearning: score pass vs step ({res['parameters']:,} parameters, "
             f"{c['batch']} forget + {c['batch']} retain rows of {c['length']} tokens, "
             f"{res['backend']})", "", "| row | ms | vs NPO step |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {r['row']} | {r['ms']} | {r['vs NPO step']}x |" for r in res["rows"]]
    s = res["score_pass"]
    lines += ["", f"Whole score pass over {c['forget_rows']} forget rows: {s['batches']} batches "
              f"+ ranking = {s['total_ms']} ms = {s['vs NPO step']}x one NPO step."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse(argv)
    res = run(args)
    text = report(res)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    return res


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
