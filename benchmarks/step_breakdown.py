"""Where a DPO step's time goes: the head-to-head model (`trl_head_to_head.MODEL`, 16 rows of 128
tokens, float32) split into forward / forward + backward of the decoder body, the body with the
fused log-prob head, with dense logits, and the AdamW update, at 1, 2 and 4 layers (so that the
per-layer and the fixed cost separate), next to PyTorch's (transformers' Llama) reference forward,
policy forward + backward and `AdamW.step()` when `--ref-python` names a torch environment.

  python benchmarks/step_breakdown.py --ref-python /tmp/ref/bin/python

Each figure is the median of 7 calls after a warm-up (one compile per function). Prints a table;
writes benchmarks/results/step_breakdown.json and .md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train_step import timed  # noqa: E402
from trl_head_to_head import MODEL, TorchSide, tokens  # noqa: E402

ROWS, LENGTH = 16, 128


def median_ms(fn, n: int = 7, block=None) -> float:
    """Milliseconds: `train_step.timed` over `n` calls after one warm-up, each call blocked on
    (`block`, default `jax.block_until_ready`) its result."""
    if block is None:
        import jax

        block = jax.block_until_ready
    block(fn())
    return 1e3 * timed(lambda: block(fn()), n)


def alignjax_parts(layers: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from alignjax import models, ops

    m = MODEL
    cfg = models.LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=layers, num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], max_position_embeddings=4096,
    )  # fmt: skip
    graph, params = nnx.split(models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    prompt, chosen, rejected = tokens(m["vocab"], ROWS // 2, LENGTH)
    rows = [p + c for p, c in zip(prompt, chosen)] + [p + r for p, r in zip(prompt, rejected)]
    ids = jnp.asarray(rows)
    labels = ids[:, 1:]
    mask = jnp.zeros_like(labels).at[:, LENGTH // 2 - 1 :].set(1)

    def body(p):
        return nnx.merge(graph, p)(ids).last_hidden_state.sum()

    def fused(p):
        model = nnx.merge(graph, p)
        hidden = model(ids).last_hidden_state[:, :-1]
        return ops.fused_token_logps(hidden, model.unembed(), labels, mask).sum()

    def dense(p):
        model = nnx.merge(graph, p)
        logp = jax.nn.log_softmax(model.logits(model(ids).last_hidden_state[:, :-1]), -1)
        return (jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * mask).sum()

    out = {}
    for name, f in (("body", body), ("fused head", fused), ("dense logits", dense)):
        fwd, both = jax.jit(f), jax.jit(jax.grad(f))
        out[f"{name} forward"] = median_ms(lambda fwd=fwd: fwd(params))
        out[f"{name} forward + backward"] = median_ms(lambda both=both: both(params))
    opt = optax.adamw(1e-4, weight_decay=0.0)
    grads, state = jax.jit(jax.grad(fused))(params), opt.init(params)

    @jax.jit
    def update(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    out["AdamW update"] = median_ms(lambda: update(grads, state, params))
    return out


def layer_parts() -> dict:
    """One decoder layer's pieces timed alone (forward + backward, 16 x 128 tokens): causal
    grouped-query attention, the SwiGLU MLP, RoPE of q and k, the four attention projections."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alignjax import models

    m, n = MODEL, ROWS * LENGTH
    d = m["hidden"] // m["heads"]
    r = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(r.normal(size=shape) * scale, jnp.float32)

    q, k = arr(ROWS, LENGTH, m["heads"], d), arr(ROWS, LENGTH, m["kv_heads"], d)
    v, x = arr(ROWS, LENGTH, m["kv_heads"], d), arr(n, m["hidden"])
    mask = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))[None, None].repeat(ROWS, 0)
    hidden, inter, kv = m["hidden"], m["intermediate"], m["kv_heads"] * d
    wg, wu, wd = arr(hidden, inter, scale=0.05), arr(hidden, inter, scale=0.05), arr(inter, hidden)
    proj = [arr(hidden, hidden), arr(hidden, kv), arr(hidden, kv), arr(hidden, hidden)]
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (ROWS, LENGTH))
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d, 2) / d))
    # `alignjax.models.attention` is also a function name there: import the module by its path.
    rope = importlib.import_module("alignjax.models.attention").apply_rope
    pieces = {
        "attention (grouped, causal)": (
            lambda q, k, v: models.grouped_query_attention(q, k, v, mask).sum(), (q, k, v)),
        "SwiGLU MLP": (
            lambda x, a, b, c: ((jax.nn.silu(x @ a) * (x @ b)) @ c).sum(), (x, wg, wu, wd)),
        "RoPE of q and k": (
            lambda q, k: (rope(q, positions, inv_freq) ** 2).sum()
            + (rope(k, positions, inv_freq) ** 2).sum(), (q, k)),
        "q, k, v, o projections": (
            lambda x, *w: sum((x @ wi).sum() for wi in w), (x, *proj)),
    }  # fmt: skip
    out = {}
    for name, (f, args) in pieces.items():
        grad = jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))
        out[name] = median_ms(lambda g=grad, a=args: g(*a))
    out["sum"] = sum(out.values())
    return out


def torch_parts() -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())  # as trl_head_to_head's default
    side = TorchSide(MODEL)
    side.setup(LENGTH, ROWS // 2)

    def ms(fn):
        return median_ms(fn, block=lambda out: out)

    def policy():
        side.opt.zero_grad(set_to_none=True)  # as in the step: no accumulation into .grad
        side.sequence_logps(side.model).sum().backward()

    with torch.no_grad():
        ref = ms(lambda: side.sequence_logps(side.ref))
    return {
        "dense logits forward (no_grad)": ref,
        "dense logits forward + backward": ms(policy),
        "AdamW step": ms(side.opt.step),
        "whole DPO step": ms(side.step),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", help="a Python with torch + transformers")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        print(json.dumps(torch_parts()))
        return
    result = {"alignjax": {str(n): alignjax_parts(n) for n in (1, 2, MODEL["layers"])}}
    result["layer parts alone"] = layer_parts()
    if args.ref_python:
        cmd = [args.ref_python, __file__, "--torch-child"]
        result["PyTorch"] = json.loads(subprocess.check_output(cmd, text=True).splitlines()[-1])
    names = list(result["alignjax"]["1"])
    lines = [
        f"ms, {ROWS} rows x {LENGTH} tokens, float32, head-to-head model at 1 / 2 / "
        f"{MODEL['layers']} layers (median of 7 calls).",
        "",
        "| alignjax part | 1 layer | 2 layers | 4 layers | per layer | fixed (0 layers) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        t1, t2, t4 = (result["alignjax"][k][name] for k in ("1", "2", str(MODEL["layers"])))
        per = (t4 - t1) / (MODEL["layers"] - 1)
        lines.append(f"| {name} | {t1:.1f} | {t2:.1f} | {t4:.1f} | {per:.1f} | {t1 - per:.1f} |")
    lines += ["", "| one layer's part alone, forward + backward | ms |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["layer parts alone"].items()]
    if "PyTorch" in result:
        lines += ["", "| PyTorch part (4 layers) | ms |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result["PyTorch"].items()]
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "step_breakdown.json").write_text(json.dumps(result, indent=1))
    (HERE / "results" / "step_breakdown.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
