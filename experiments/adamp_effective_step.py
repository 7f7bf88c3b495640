"""AdamP's claim at small scale: momentum optimizers inflate the norm of scale-invariant weights,
which shrinks their effective step size; removing the radial component of the update (AdamP /
SGDP) keeps the norm, and so the effective step, where it was.

Heo et al. 2021 (arXiv:2006.08217), Sections 2-3: for a scale-invariant weight w (followed by a
normalisation layer) the gradient is orthogonal to w, so a plain step can only grow ||w||
(||w_{t+1}||^2 = ||w_t||^2 + lr^2 ||g||^2), and with momentum the growth is much faster; the
step on the sphere, the "effective step size", scales as lr / ||w||^2 for SGD.

The network: x -> Dense (no bias) -> BatchNorm -> ReLU -> Dense (no bias) -> LayerNorm -> ReLU
-> Dense head, on a synthetic classification task labelled by a random teacher network. The
first two kernels are scale-invariant (per output channel, and as a whole layer); the head is
not. For each optimizer pair (Adam vs AdamP, SGD+momentum vs SGDP) and learning rate we record,
per step, the norms of the invariant kernels, their angular update |angle(w_t, w_{t+1})| (the
effective step actually taken on the sphere), the training loss, and the final test accuracy.

    python experiments/adamp_effective_step.py            # ~1-2 min on 2 CPUs
    python experiments/adamp_effective_step.py --quick    # seconds, for a smoke test

Learning rates follow a cosine decay to 0 (`--constant-lr` to turn it off). Writes
experiments/results/adamp_effective_step/{curves.png, table.md, summary.json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from alignjax import optim  # noqa: E402

OUT = REPO / "experiments" / "results" / "adamp_effective_step"
INVARIANT = ("bn_dense", "ln_dense")


@dataclass(frozen=True)
class Study:
    d_in: int = 32
    width: int = 256
    classes: int = 10
    train: int = 8192
    test: int = 2048
    batch: int = 128
    steps: int = 3000
    seed: int = 0


def optimizers(
    lr_adam: float, lr_sgd: float, steps: int | None = None
) -> dict[str, optax.GradientTransformation]:
    """The four optimizers; with `steps`, every learning rate follows a cosine decay to 0 over
    them (the paper's training runs use such schedules: the schedule is what the effective step
    should follow, and norm growth is what makes it decay faster than scheduled)."""

    def lr(peak):
        return peak if steps is None else optax.cosine_decay_schedule(peak, steps)

    return {
        "adam": optax.adam(lr(lr_adam)),
        "adamp": optim.adamp(lr(lr_adam)),
        "sgd": optax.sgd(lr(lr_sgd), momentum=0.9, nesterov=True),
        "sgdp": optim.sgdp(lr(lr_sgd), momentum=0.9, nesterov=True),
    }


def make_data(cfg: Study):
    """Inputs ~ N(0, I); labels from a random 2-layer tanh teacher (argmax of its logits)."""
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.train + cfg.test, cfg.d_in)).astype(np.float32)
    t1 = rng.standard_normal((cfg.d_in, 64)) / np.sqrt(cfg.d_in)
    t2 = rng.standard_normal((64, cfg.classes)) / 8.0
    y = np.argmax(np.tanh(x @ t1) @ t2, axis=1)
    return (x[: cfg.train], y[: cfg.train]), (x[cfg.train :], y[cfg.train :])


def init_params(cfg: Study, key):
    k1, k2, k3 = jax.random.split(key, 3)
    lecun = jax.nn.initializers.lecun_normal()
    return {
        "bn_dense": {"kernel": lecun(k1, (cfg.d_in, cfg.width))},
        "bn": {"scale": jnp.ones(cfg.width), "bias": jnp.zeros(cfg.width)},
        "ln_dense": {"kernel": lecun(k2, (cfg.width, cfg.width))},
        "ln": {"scale": jnp.ones(cfg.width), "bias": jnp.zeros(cfg.width)},
        "head": {"kernel": lecun(k3, (cfg.width, cfg.classes)), "bias": jnp.zeros(cfg.classes)},
    }


def forward(params, x):
    h = x @ params["bn_dense"]["kernel"]
    mean, var = jnp.mean(h, 0), jnp.var(h, 0)  # batch statistics (training-mode BatchNorm)
    h = jax.nn.relu(
        (h - mean) / jnp.sqrt(var + 1e-5) * params["bn"]["scale"] + params["bn"]["bias"]
    )
    h = h @ params["ln_dense"]["kernel"]
    mean, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
    h = jax.nn.relu(
        (h - mean) / jnp.sqrt(var + 1e-5) * params["ln"]["scale"] + params["ln"]["bias"]
    )
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def angle(a, b):
    """The angle between two weight tensors, in radians: the step taken on the sphere."""
    # 2 asin(|a/|a| - b/|b|| / 2): accurate for tiny angles, where arccos(cos) is all rounding.
    chord = jnp.linalg.norm(a / jnp.linalg.norm(a) - b / jnp.linalg.norm(b))
    return 2.0 * jnp.arcsin(jnp.minimum(chord / 2.0, 1.0))


def run(tx: optax.GradientTransformation, cfg: Study) -> dict[str, np.ndarray]:
    """Train once; per-step norms, angular updates and loss, and the final test accuracy."""
    (xtr, ytr), (xte, yte) = make_data(cfg)
    params = init_params(cfg, jax.random.key(cfg.seed))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        stats = {}
        for name in INVARIANT:
            w0, w1 = params[name]["kernel"], new[name]["kernel"]
            stats[f"norm/{name}"] = jnp.linalg.norm(w1)
            stats[f"angle/{name}"] = angle(w0, w1)
        stats["loss"] = loss
        return new, state, stats

    order = np.random.default_rng(cfg.seed + 1)
    history: dict[str, list] = {}
    for _ in range(cfg.steps):
        idx = order.integers(0, cfg.train, cfg.batch)
        params, state, stats = step(params, state, xtr[idx], ytr[idx])
        for k, v in stats.items():
            history.setdefault(k, []).append(v)
    out = {k: np.asarray(jnp.stack(v)) for k, v in history.items()}
    for name in INVARIANT:
        out[f"norm0/{name}"] = np.asarray(
            jnp.linalg.norm(init_params(cfg, jax.random.key(cfg.seed))[name]["kernel"])
        )
    # Evaluate with batch statistics over the whole test set (the BatchNorm here has no EMA).
    out["test_accuracy"] = float(jnp.mean(jnp.argmax(forward(params, xte), -1) == yte))
    return out


def summarise(results: dict, cfg: Study) -> list[dict]:
    rows = []
    for (opt, lr), h in results.items():
        row = {"optimizer": opt, "lr": lr, "test_accuracy": h["test_accuracy"]}
        tail = max(1, cfg.steps // 10)
        row["final_loss"] = float(np.mean(h["loss"][-tail:]))
        for name in INVARIANT:
            row[f"norm_growth/{name}"] = float(h[f"norm/{name}"][-1] / h[f"norm0/{name}"])
            row[f"angle_first/{name}"] = float(np.mean(h[f"angle/{name}"][:tail]))
            mid = h[f"angle/{name}"][int(0.4 * cfg.steps) : int(0.6 * cfg.steps)]
            row[f"angle_mid/{name}"] = float(np.mean(mid))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| optimizer | lr | test acc | final loss | ||W_bn|| growth | ||W_ln|| growth "
        "| step angle W_bn: first 10% -> 40-60% | W_ln: first 10% -> 40-60% |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['test_accuracy']:.3f} | {r['final_loss']:.3f} "
            f"| {r['norm_growth/bn_dense']:.2f}x | {r['norm_growth/ln_dense']:.2f}x "
            f"| {r['angle_first/bn_dense']:.2e} -> {r['angle_mid/bn_dense']:.2e} "
            f"| {r['angle_first/ln_dense']:.2e} -> {r['angle_mid/ln_dense']:.2e} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    pairs = sorted({(opt.rstrip("p"), lr) for opt, lr in results})
    colors = {pair: f"C{i}" for i, pair in enumerate(pairs)}
    for (opt, lr), h in results.items():
        style = dict(color=colors[(opt.rstrip("p"), lr)], ls="-" if opt.endswith("p") else "--")
        label = f"{opt} lr={lr:g}"
        axes[0].plot(h["norm/bn_dense"] / h["norm0/bn_dense"], **style, label=label)
        window = max(1, len(h["loss"]) // 50)
        smooth = np.convolve(h["angle/bn_dense"], np.ones(window) / window, mode="valid")
        axes[1].plot(smooth, **style, label=label)
        loss = np.convolve(h["loss"], np.ones(window) / window, mode="valid")
        axes[2].plot(loss, **style, label=label)
    axes[0].set(title="||W|| / ||W_0|| (BatchNorm-invariant kernel)", xlabel="step")
    axes[1].set(title="effective step: angle(W_t, W_t+1) [rad]", xlabel="step", yscale="log")
    axes[2].set(title="training loss", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast configuration")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--constant-lr", action="store_true", help="no cosine decay")
    args = ap.parse_args(argv)
    cfg = Study()
    grid = [(1e-3, 0.1), (3e-3, 0.3)]
    if args.quick:
        cfg = replace(cfg, width=32, train=1024, test=256, steps=60)
        grid = grid[:1]
    args.out.mkdir(parents=True, exist_ok=True)
    results, t0 = {}, time.perf_counter()
    for lr_adam, lr_sgd in grid:
        schedule_steps = None if args.constant_lr else cfg.steps
        for name, tx in optimizers(lr_adam, lr_sgd, schedule_steps).items():
            lr = lr_adam if name.startswith("adam") else lr_sgd
            results[(name, lr)] = run(tx, cfg)
            print(f"{name:6s} lr={lr:<6g} test acc {results[(name, lr)]['test_accuracy']:.3f}")
    rows = summarise(results, cfg)
    text = table(rows)
    plot(results, args.out / "curves.png")
    (args.out / "table.md").write_text(text + "\n")
    summary = {
        "config": asdict(cfg),
        "schedule": "constant" if args.constant_lr else "cosine decay to 0",
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{text}\n\nfigure: {args.out / 'curves.png'}\ntable: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
