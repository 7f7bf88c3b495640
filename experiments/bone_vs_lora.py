"""Bone / Bat against LoRA, AdaLoRA and full fine-tuning at matched trainable-parameter budgets.

The claim (Kang 2024, "Bone: Block Affine Transformation as PEFT Methods for LLMs",
arXiv:2409.15371): at equal trainable parameters the block-affine adapters converge faster and
reach a lower loss than LoRA. AdaLoRA (arXiv:2303.10512) claims a better use of a rank budget
by reallocating it between layers during training.

Setting. A random teacher, x (16) -> tanh MLP, three 64 x 64 hidden layers -> 8 outputs, is
task A (MSE regression, x ~ N(0, I), unit-variance outputs). A student of the same shape,
trained on A from scratch (full AdamW: "pretraining"), is fine-tuned on task B: the teacher
with each hidden kernel changed by a rank-2 plus a block-diagonal (8 x 8 blocks) part, of norm
`shift` times the kernel's. The student's hidden units are not the teacher's, so neither
structure is aligned with any adapter: B is a related, shifted task, no more. Fresh data every
step (the training loss estimates the population loss), one stream per seed, shared by all
methods; plus a held-out loss at the end.

Methods, on the three hidden layers only, 512 trainable parameters per layer: LoRA r=4 (2 d r);
Bat, block 8 (PEFT `init_weights="bat"`, the paper's Block Affine Transformation, (d/8, 8, 8):
d b); "Bone (row)" read as PEFT's default shared-block Bone, block 8 (one (8, 64) block shared
by all 8-wide input chunks: b d); AdaLoRA init_r=4 -> target_r=2 (2 d r + r = 516 at init;
PEFT's cubic schedule, orthogonal regulariser 0.5); DoRA r=4 (+64 magnitudes); full
fine-tuning (all 14 088 parameters: the reference, not budget-matched). All use AdamW (optax
defaults, constant lr), the same steps, batch and data; each method's lr is the best, by mean
final loss (last 10% of steps) over seeds, of the grid `Study.lrs` (all of it in summary.json).
Targets: 50% and 90% of the way from L0 (the pretrained model on B) to full fine-tuning's final
loss; steps to target = first step whose 25-step trailing mean of the training loss (seed
mean in the table, per seed in the verdict) is <= the target.

    python experiments/bone_vs_lora.py            # ~1 min on 2 CPUs
    python experiments/bone_vs_lora.py --quick    # ~15 s, for a smoke test

Writes experiments/results/bone_vs_lora/{curves.png, table.md, summary.json} and prints, claim
by claim, whether it held here (seed-paired against LoRA: same data stream).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from alignjax import peft  # noqa: E402

OUT = REPO / "experiments" / "results" / "bone_vs_lora"
HIDDEN = r"hidden/\d+"
ORTH_REG = 0.5  # PEFT's AdaLoraConfig.orth_reg_weight default


@dataclass(frozen=True)
class Study:
    d_in: int = 16  # the teacher's and the student's shape: d_in -> width^depth -> d_out
    width: int = 64
    depth: int = 3
    d_out: int = 8
    shift: float = 0.3  # ||dW|| / ||W|| of the teacher's hidden kernels from task A to B
    batch: int = 128
    pretrain_steps: int = 10000
    pretrain_lr: float = 1e-2
    steps: int = 1000
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    rank: int = 4  # LoRA / DoRA rank and AdaLoRA init_r
    target_r: int = 2  # AdaLoRA
    block: int = 8  # Bat and Bone block size
    # Must include "full" (it sets the targets) and "lora" (the baseline of the verdict).
    methods: tuple[str, ...] = ("full", "lora", "dora", "bat", "bone-row", "adalora")
    fractions: tuple[float, ...] = (0.5, 0.9)
    smooth: int = 25
    eval_size: int = 4096
    seed: int = 0  # teacher, task shift and pretraining


def rule(method: str, cfg: Study) -> peft.Rule | None:
    """The adapter of each method (None: full fine-tuning). LoRA / DoRA: alpha = r (scale 1);
    AdaLoRA: PEFT's default alpha 8; Bone variants have no scaling (as in PEFT)."""
    if method in ("bat", "bone-row"):
        return peft.Rule(HIDDEN, method.removesuffix("-row"), rank=cfg.block)
    alpha = 8.0 if method == "adalora" else None
    return None if method == "full" else peft.Rule(HIDDEN, method, rank=cfg.rank, alpha=alpha)


def teacher_fn(p: dict, x: jax.Array) -> jax.Array:
    tanh = np.tanh if isinstance(x, np.ndarray) else jnp.tanh  # numpy: no eager jax op compiles
    h = tanh(x @ p["inp"] + p["b_inp"])
    for w, b in zip(p["hidden"], p["b_hidden"]):
        h = tanh(h @ w + b)
    return h @ p["head"]


def teachers(cfg: Study) -> tuple[dict, dict]:
    """Teacher A, and B = A with shifted hidden kernels (one output scale: A's variance 1)."""
    rng = np.random.default_rng(cfg.seed)
    d, gain = cfg.width, 1.5  # gain > 1: the tanh units leave their linear range

    def normal(*shape: int) -> np.ndarray:
        return (gain * rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    bias = [(0.1 * rng.standard_normal(d)).astype(np.float32) for _ in range(cfg.depth + 1)]
    a = {"inp": normal(cfg.d_in, d), "b_inp": bias[0], "b_hidden": bias[1:]}
    a |= {"hidden": [normal(d, d) for _ in range(cfg.depth)], "head": normal(d, cfg.d_out)}
    b, nb = dict(a, hidden=[]), d // cfg.block
    for w in a["hidden"]:
        low = rng.standard_normal((d, 2)) @ rng.standard_normal((2, d))
        blocks = rng.standard_normal((nb, cfg.block, cfg.block))
        diag = np.einsum("ij,ikl->ikjl", np.eye(nb), blocks).reshape(d, d)  # block-diagonal
        # Equal shares of the two structures (nearly orthogonal: norms add in quadrature).
        dw = (low / np.linalg.norm(low) + diag / np.linalg.norm(diag)) / np.sqrt(2)
        b["hidden"].append((w + cfg.shift * np.linalg.norm(w) * dw).astype(np.float32))
    scale = 1.0 / float(np.std(teacher_fn(a, rng.standard_normal((8192, cfg.d_in)))))
    a["head"], b["head"] = a["head"] * scale, b["head"] * scale
    return jax.tree.map(jnp.asarray, a), jax.tree.map(jnp.asarray, b)


class MLP(nnx.Module):
    """The student, of the teacher's shape; LeCun-normal kernels drawn by numpy (fast)."""

    def __init__(self, cfg: Study, seed: int):
        rng = np.random.default_rng(seed)

        def linear(n_in: int, n_out: int) -> nnx.Linear:
            k = jnp.asarray(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), jnp.float32)
            return nnx.Linear(n_in, n_out, kernel_init=lambda *_: k, rngs=nnx.Rngs(seed))

        self.inp = linear(cfg.d_in, cfg.width)
        self.hidden = nnx.List([linear(cfg.width, cfg.width) for _ in range(cfg.depth)])
        self.head = linear(cfg.width, cfg.d_out)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(self.inp(x))
        for layer in self.hidden:
            h = jnp.tanh(layer(h))
        return self.head(h)


def trainer(
    graphdef: nnx.GraphDef, cfg: Study, tx: optax.GradientTransformation, steps: int,
    sched: peft.AdaLoraSchedule | None = None,
) -> Callable:  # fmt: skip
    """One jitted function training a batch of runs: `vmap` over (lr, seed) of a `lax.scan`
    over steps, so the lr grid and seeds share one compilation (the lr lives in the optimizer
    state, inject_hyperparams). Returns the final trainable states, the per-step MSE (runs,
    steps; entry t: after t updates; no regulariser), AdaLoRA's rank pattern (kept ranks; runs,
    steps, depth; pruned e_i may regrow between allocations, as in PEFT) and the held-out MSE
    before and after training (runs, 2)."""

    def losses(trainable, frozen, x, y):
        model = nnx.merge(graphdef, trainable, frozen)
        mse = jnp.mean((model(x) - y) ** 2)
        if sched is None:
            return mse, mse
        return mse + ORTH_REG * peft.orthogonal_regularizer(peft.adalora_triplets(model)), mse

    def held_out(trainable, frozen, teacher):
        x = jax.random.normal(jax.random.key(cfg.seed + 999), (cfg.eval_size, cfg.d_in))
        return losses(trainable, frozen, x, teacher_fn(teacher, x))[1]

    def one(trainable, opt_state, alloc, frozen, teacher, data_seed):
        key, before = jax.random.key(data_seed), held_out(trainable, frozen, teacher)

        def body(carry, t):
            trainable, opt_state, alloc = carry
            x = jax.random.normal(jax.random.fold_in(key, t), (cfg.batch, cfg.d_in))
            y = teacher_fn(teacher, x)
            (_, mse), grads = jax.value_and_grad(losses, has_aux=True)(trainable, frozen, x, y)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            ranks = jnp.zeros((cfg.depth,), jnp.int32)
            if sched is not None:  # PEFT's order: optimizer step, then allocate with the grads
                model = nnx.merge(graphdef, trainable, frozen)
                now, grad = peft.adalora_triplets(model), peft.adalora_triplets(model, grads)
                params, alloc, info = peft.update_and_allocate(now, grad, alloc, t, sched)
                peft.set_adalora_e(model, params)
                trainable = nnx.state(model, peft.AdapterParam)
                ranks = jnp.stack([info.kept_ranks[name] for name in params])
            return (trainable, opt_state, alloc), (mse, ranks)

        carry = (trainable, opt_state, alloc)
        (trainable, _, _), (mse, ranks) = jax.lax.scan(body, carry, jnp.arange(steps))
        return trainable, mse, ranks, jnp.stack([before, held_out(trainable, frozen, teacher)])

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None, 0)))


def stack(trees: list) -> object:
    """Stack pytrees along a new leading axis on the host (no eager jax op to compile)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def pretrain(cfg: Study, teacher_a: dict) -> tuple[nnx.Module, float]:
    """Full training on task A (cosine-decayed AdamW): the model, its held-out loss on A."""
    graphdef, params, rest = nnx.split(MLP(cfg, cfg.seed + 2), nnx.Param, ...)
    tx = optax.adamw(optax.cosine_decay_schedule(cfg.pretrain_lr, cfg.pretrain_steps))
    train = trainer(graphdef, cfg, tx, cfg.pretrain_steps)
    one = stack([(params, tx.init(params), ())])  # a batch of one run
    params, _, _, held_out = train(*one, rest, teacher_a, jnp.array([cfg.seed + 1]))
    return nnx.merge(graphdef, jax.tree.map(lambda v: v[0], params), rest), float(held_out[0, 1])


def run(method: str, pretrained: nnx.Module, teacher_b: dict, cfg: Study) -> dict:
    """Fine-tune `pretrained` (left unchanged) on B with one method, every lr and seed: {"params":
    trainable count, "seconds", "runs": {lr: {"loss": (seeds, steps), "eval" / "eval_before":
    held-out MSE per seed after / before training, "ranks": (seeds, steps, depth)}}}."""
    t0 = time.perf_counter()
    sched = None if method != "adalora" else peft.AdaLoraSchedule(  # 10% warm-up, 20% fixed
        init_r=cfg.rank, target_r=cfg.target_r, tinit=cfg.steps // 10, tfinal=cfg.steps // 5,
        deltaT=10, total_step=cfg.steps)  # fmt: skip
    (graph0, state0), r = nnx.split(pretrained), rule(method, cfg)
    grid, inits = [(lr, seed) for lr in cfg.lrs for seed in cfg.seeds], []
    for lr, seed in grid:
        model = nnx.merge(graph0, state0)  # a fresh copy of the pretrained model
        if r is not None:  # the adapter init draw depends on the seed only, not on the lr
            peft.apply(model, [r], rngs=nnx.Rngs(1000 + seed))
        wrt = nnx.Param if r is None else peft.AdapterParam
        graphdef, trainable, frozen = nnx.split(model, wrt, ...)
        opt_state = optax.inject_hyperparams(optax.adamw)(learning_rate=lr).init(trainable)
        alloc = () if sched is None else peft.init_allocator(peft.adalora_triplets(model))
        inits.append((trainable, opt_state, alloc))
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lrs[0])  # lr: from the state
    train = trainer(graphdef, cfg, tx, cfg.steps, sched)
    data = jnp.array([10_000 + seed for _, seed in grid])  # one data stream per seed
    _, mse, ranks, held_out = (np.asarray(v) for v in train(*stack(inits), frozen, teacher_b, data))
    n, out = len(cfg.seeds), {"runs": {}}
    for i, lr in enumerate(cfg.lrs):
        sl = slice(i * n, (i + 1) * n)
        out["runs"][lr] = {"loss": mse[sl], "ranks": ranks[sl], "eval": held_out[sl, 1].tolist()}
        out["runs"][lr]["eval_before"] = held_out[sl, 0].tolist()
    out["params"] = int(sum(x.size for x in jax.tree.leaves(inits[0][0])))
    return out | {"seconds": time.perf_counter() - t0}


def smooth(loss: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start): index t sees only steps <= t."""
    c, t = np.cumsum(np.insert(loss, 0, 0.0)), np.arange(1, len(loss) + 1)
    lo = np.maximum(t - window, 0)
    return (c[t] - c[lo]) / (t - lo)


def final(loss: np.ndarray) -> float:
    return float(np.mean(loss[-max(1, len(loss) // 10) :]))  # mean over the last 10% of steps


def steps_to(loss: np.ndarray, target: float, window: int) -> int | None:
    hit = np.nonzero(smooth(loss, window) <= target)[0]
    return int(hit[0]) if hit.size else None  # None: never reached


def paired(a: list, b: list) -> tuple[int, str]:
    """In how many seeds `a` is smaller than `b` (None = infinite), and the verdict."""
    pairs = [(np.inf if x is None else x, np.inf if y is None else y) for x, y in zip(a, b)]
    k, ties = sum(x < y for x, y in pairs), sum(x == y for x, y in pairs)
    return k, {len(a): "HELD", 0: "tie" if ties == len(a) else "did NOT hold"}.get(k, "mixed")


def summarise(results: dict, cfg: Study) -> tuple[list[dict], dict]:
    """Rows at each method's best lr, and the targets. L0: the pretrained model on B."""
    before = [v for res in results.values() for r in res["runs"].values() for v in r["eval_before"]]
    l0, rows, grids = float(np.mean(before)), [], {}
    for m, res in results.items():
        grids[m] = {lr: np.mean([final(x) for x in r["loss"]]) for lr, r in res["runs"].items()}
    best = {m: min(g, key=g.get) for m, g in grids.items()}
    full_final = final(results["full"]["runs"][best["full"]]["loss"].mean(0))
    targets = {f: l0 - f * (l0 - full_final) for f in cfg.fractions}
    for m, res in results.items():
        lr, r = best[m], res["runs"][best[m]]
        per_seed = [final(x) for x in r["loss"]]
        row = {
            "method": m, "params": res["params"], "lr": lr,
            "lr_at_grid_edge": lr in (min(cfg.lrs), max(cfg.lrs)),
            "final_loss": float(np.mean(per_seed)), "final_loss_std": float(np.std(per_seed)),
            "final_loss_per_seed": per_seed, "eval_loss": float(np.mean(r["eval"])),
            "grid_final_loss": {str(g): float(v) for g, v in grids[m].items()},
        }  # fmt: skip
        for f, t in targets.items():  # on the seed-mean curve, and per seed
            row[f"steps_to_{f:g}"] = steps_to(r["loss"].mean(0), t, cfg.smooth)
            row[f"steps_to_{f:g}_per_seed"] = [steps_to(x, t, cfg.smooth) for x in r["loss"]]
        if m == "adalora":
            row["final_ranks_per_layer"] = r["ranks"][:, -1].tolist()  # per seed
        rows.append(row)
    # L0's spread over methods, lrs and seeds is ~0 (float noise): every adapter starts a no-op.
    info = {"l0": l0, "l0_spread": float(np.ptp(before)), "full_final": full_final}
    return rows, info | {"targets": {str(f): t for f, t in targets.items()}}


def verdict(rows: list[dict], cfg: Study) -> list[str]:
    """The claims, checked against LoRA seed by seed (same seed = same data stream)."""
    by = {r["method"]: r for r in rows}
    lora, lines, n = by["lora"], [], len(cfg.seeds)
    for m in (m for m in ("bat", "bone-row", "adalora", "dora") if m in by):
        r = by[m]
        k, ok = paired(r["final_loss_per_seed"], lora["final_loss_per_seed"])
        vs = f"{r['final_loss']:.4f} vs {lora['final_loss']:.4f}"
        lines.append(f"{m} reaches a lower final loss than LoRA: {ok} ({vs}; {k}/{n} seeds)")
        for f in cfg.fractions:
            a, b = (x[f"steps_to_{f:g}_per_seed"] for x in (r, lora))
            k, ok = paired(a, b)
            lines.append(f"  gets to the {100 * f:g}% target sooner: {ok} ({k}/{n}; {a} vs {b})")
    if "adalora" in by:
        ranks = by["adalora"]["final_ranks_per_layer"]
        lines.append(f"adalora final ranks per layer, per seed: {ranks} (uneven = reallocated)")
    return lines


def table(rows: list[dict], info: dict, cfg: Study) -> str:
    fr = [f"steps to {100 * f:g}% ({info['targets'][str(f)]:.4f})" for f in cfg.fractions]
    lines = [
        "| method | trainable params | lr | final loss (mean ± std) | held-out loss | "
        + " | ".join(fr) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(fr),
    ]  # fmt: skip
    for r in rows:
        steps = [r[f"steps_to_{f:g}"] for f in cfg.fractions]
        steps = ["not reached" if v is None else str(v) for v in steps]
        lines.append(
            f"| {r['method']} | {r['params']} | {r['lr']:g}{'*' * r['lr_at_grid_edge']} | "
            f"{r['final_loss']:.4f} ± {r['final_loss_std']:.4f} | {r['eval_loss']:.4f} | "
            + " | ".join(steps) + " |"
        )  # fmt: skip
    lines.append(
        f"\nL0 (pretrained model on task B, held-out) = {info['l0']:.4f}; full-FT final = "
        f"{info['full_final']:.4f}; * = best lr at an edge of the grid {list(cfg.lrs)}."
    )
    return "\n".join(lines)


def plot(results: dict, rows: list[dict], info: dict, cfg: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, r in enumerate(rows):
        run_ = results[r["method"]]["runs"][r["lr"]]
        label = f"{r['method']} ({r['params']} params, lr={r['lr']:g})"
        axes[0].plot(smooth(run_["loss"].mean(0), cfg.smooth), color=f"C{i}", label=label)
        grid = [r["grid_final_loss"][str(g)] for g in cfg.lrs]
        axes[1].plot(cfg.lrs, grid, "o-", color=f"C{i}", label=r["method"])
        if r["method"] == "adalora":
            for layer in range(cfg.depth):  # seed 0's rank allocation over time
                axes[2].plot(run_["ranks"][0, :, layer], label=f"hidden/{layer}")
    for f, t in info["targets"].items():
        axes[0].axhline(t, color="gray", ls=":", lw=1)
        axes[0].text(0, t, f" {100 * float(f):g}% target", fontsize=7, va="bottom")
    axes[0].set(title="fine-tuning on B: training MSE (smoothed, seed mean)", yscale="log")
    axes[1].set(title="final loss vs learning rate", xscale="log", yscale="log")
    axes[2].set(title="AdaLoRA rank pattern: kept ranks per layer (seed 0)")
    for ax, xlabel in zip(axes, ("step", "lr", "step")):
        ax.set(xlabel=xlabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast configuration")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    cfg = Study()
    if args.quick:  # every code path (full FT, LoRA, Bat, AdaLoRA), few steps, one compile each
        cfg = replace(cfg, pretrain_steps=300, steps=150, lrs=(3e-3, 1e-2), seeds=(0,),
                      methods=("full", "lora", "bat", "adalora"), eval_size=1024)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher_a, teacher_b = teachers(cfg)
    pretrained, loss_a = pretrain(cfg, teacher_a)
    print(f"pretrained: held-out loss on task A {loss_a:.4f} ({time.perf_counter() - t0:.0f} s)")
    results = {}
    for m in cfg.methods:
        results[m] = run(m, pretrained, teacher_b, cfg)
        print(f"{m:9s} {results[m]['params']:6d} trainable ({time.perf_counter() - t0:.0f} s)")
    rows, info = summarise(results, cfg)
    text, lines = table(rows, info, cfg), verdict(rows, cfg)
    plot(results, rows, info, cfg, args.out / "curves.png")
    (args.out / "table.md").write_text(text + "\n")
    summary = {"config": asdict(cfg), "pretrained_loss_task_a": loss_a, **info, "rows": rows}
    summary |= {"verdict": lines, "seconds": time.perf_counter() - t0}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{text}\n\n" + "\n".join(lines) + f"\n\nwritten to {args.out}/ in "
          f"{summary['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
