"""The end-to-end example behind `alignjax demo`: SFT, then DPO with LoRA, on the shipped data.

1. SFT: a random `tiny` Llama (2 layers, width 64, the shipped 512-token BPE vocabulary) learns
   the synthetic review language from the 2000 shipped reviews (`shipped:sft`).
2. DPO: the SFT model gets LoRA adapters (rank 16 on every attention and MLP projection) and is
   trained with the sigmoid DPO loss on the 1000 shipped preference pairs; the reference is the
   same model with its adapters disabled (no second copy of the weights). Held-out: the 200
   shipped test pairs, whose chosen review has the higher sentiment score.

Each stage is an ordinary `alignjax train` run (its config is written to `<out>/<stage>/
config.yaml`; `alignjax train --config <out>/dpo/config.yaml` reruns it). Metrics go to JSONL and
TensorBoard, checkpoints to `checkpoints/`, the models to `export/`, curves to `curves.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignjax.train import config as C

__all__ = ["sft_config", "dpo_config", "run_demo"]


def sft_config(out: str | Path, quick: bool = False) -> C.TrainConfig:
    steps = 12 if quick else 400
    return C.TrainConfig(
        task="sft",
        steps=steps,
        out_dir=str(Path(out) / "sft"),
        log_every=4 if quick else 25,
        eval_every=0,
        eval_samples=0,
        model=C.ModelConfig(preset="tiny"),
        data=C.DataConfig(train="shipped:sft", eval=None, max_length=64, batch_size=32),
        optim=C.OptimConfig(learning_rate=3e-3, warmup_steps=min(20, steps // 4)),
        checkpoint=C.CheckpointConfig(every=steps, keep=1),
        mesh=C.MeshConfig(devices=1),
    )


def dpo_config(out: str | Path, quick: bool = False) -> C.TrainConfig:
    steps = 10 if quick else 250
    return C.TrainConfig(
        task="paired",
        steps=steps,
        out_dir=str(Path(out) / "dpo"),
        log_every=2 if quick else 10,
        eval_every=5 if quick else 50,
        eval_batches=1 if quick else None,
        init_from=str(Path(out) / "sft"),
        loss=C.LossConfig(name="sigmoid", beta=0.1),
        data=C.DataConfig(
            train="shipped:train", eval="shipped:test", max_length=128, batch_size=16,
            eval_batch_size=40,
        ),  # fmt: skip
        optim=C.OptimConfig(learning_rate=2e-3, warmup_steps=min(10, steps // 4)),
        peft=C.PeftConfig(method="lora", r=16, alpha=32.0,
                          targets=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
        reference=C.ReferenceConfig(mode="adapters_disabled"),
        checkpoint=C.CheckpointConfig(every=5 if quick else 50, keep=2),
        mesh=C.MeshConfig(devices=1),
    )  # fmt: skip


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, progress: bool = True):
    """Run both stages; print a table and the output paths; return the summaries."""
    from alignjax.train.trainer import train

    out = Path(out)
    rows, summaries = [], {}
    for name, cfg in (("sft", sft_config(out, quick)), ("dpo", dpo_config(out, quick))):
        t0 = time.perf_counter()
        summary = train(cfg, progress=progress)
        summary["seconds"] = time.perf_counter() - t0
        summaries[name] = summary
        last = _last_train_metrics(Path(cfg.out_dir) / "metrics.jsonl")
        ev = summary.get("eval", {})
        rows.append((name, cfg.steps, summary["seconds"], last.get("train/loss"),
                     last.get("train/tokens_per_s"), ev.get("loss"),
                     ev.get("rewards/accuracies"), ev.get("rewards/margins")))  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    print()
    header = ("stage", "steps", "wall s", "train loss", "tokens/s", "held-out loss",
              "reward acc", "margin")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(_fmt(v) for v in row) + " |")
    dpo = summaries["dpo"]
    print(f"\nheld-out reward accuracy after DPO: {dpo['eval']['rewards/accuracies']:.3f} "
          f"on {dpo['eval']['examples']} pairs (chance: 0.5)")  # fmt: skip
    for name in ("sft", "dpo"):
        s = summaries[name]
        print(f"{name}: curves {s.get('curves')}, checkpoints {Path(s['out_dir']) / 'checkpoints'}"
              f", export {s.get('export', {})}")  # fmt: skip
    return summaries


def _last_train_metrics(path: Path) -> dict:
    from alignjax.train.metrics import read_jsonl

    rows = [r for r in read_jsonl(path) if "train/loss" in r]
    return rows[-1] if rows else {}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


if __name__ == "__main__":  # python -m alignjax.train.demo
    run_demo()
