"""The compared methods and the `alignjax train` configs of every stage.

Every preference run starts from the SFT run (`init_from`), trains on the same pairs file with
the same steps, batch, learning-rate schedule, data order and seed; only the loss (and, for the
LoRA row, the trainable parameters and the reference) differ. Beta grids are per method because
beta means different things (loss docstrings in `alignjax/losses/`, ../shared/specs/losses.md):

- DPO ("sigmoid"), TDPO2, SparsePO, MaPO: beta scales summed log-ratios inside a sigmoid;
- IPO ("ipo"): regresses the length-averaged log-ratio margin onto 1 / (2 beta), so a small
  beta asks for a large per-token margin (weak regularisation);
- SPPO ("sppo"): regresses each side's summed log-ratio onto (P(y > pi_ref) - 1/2) / beta.

The grids span weak to strong regularisation on this problem. They were picked from a
calibration at the default budget (100 steps): DPO 0.1 -> 3 gives KL ~17 -> ~2 nats (10 adds
a point below 2 nats, so that DPO's frontier is measured, not interpolated, where the strongly
regularised runs of the other methods land); IPO 1 -> 8 gives ~6 -> ~0.6; SPPO 0.003 -> 0.1
gives ~4 -> ~0.7; TDPO2's sequential-KL term holds it under ~2 nats at any beta (0.01 and 0.1
land within 0.3 nat of each other). TDPO runs as TDPO2 (alpha 0.5, the TDPO authors'
recommendation). SparsePO: the paper's "all layers" mask head on the reference's hidden
states, no L1 penalty (the official default), dropout off; "common" uses one mask for the
reward and the KL terms, "indp" two independent heads. MaPO: the reference's activation mask
(MLP, attention, residual groups). The LoRA row (rank 16 on every projection, the reference =
the adapters disabled) shares DPO's betas 0.1 - 1, so both comparisons are there: at equal
beta and at equal KL.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from alignjax.train import config as C
from alignjax.train import trainer

__all__ = [
    "Method",
    "METHODS",
    "QUICK_METHODS",
    "middle_beta",
    "sft_config",
    "preference_config",
    "train_run",
]

LORA_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # key in summary.json and run directory prefix
    label: str  # legend / table label
    loss: str  # registered loss name
    betas: tuple[float, ...]
    independent_masks: bool = False
    lora: bool = False
    masks: bool = False  # token masks to analyse (SparsePO / MaPO)


METHODS = (
    Method("dpo", "DPO", "sigmoid", (0.1, 0.3, 1.0, 3.0, 10.0)),
    Method("ipo", "IPO", "ipo", (1.0, 2.0, 8.0)),
    Method("sppo", "SPPO", "sppo", (0.003, 0.01, 0.1)),
    Method("tdpo2", "TDPO2", "tdpo2", (0.01, 0.1, 1.0)),
    Method("sparsepo", "SparsePO (common mask)", "sparsepo", (0.1, 1.0, 3.0), masks=True),
    Method(
        "sparsepo_indp",
        "SparsePO (indep. masks)",
        "sparsepo",
        (0.1, 1.0, 3.0),
        independent_masks=True,
        masks=True,
    ),
    Method("mapo", "MaPO", "mapo", (0.1, 0.3, 1.0), masks=True),
    Method("dpo_lora", "DPO + LoRA", "sigmoid", (0.1, 0.3, 1.0), lora=True),
)


# --quick: one beta each (the middle one), the four methods the test checks.
def middle_beta(method: Method) -> Method:
    """The method at the middle beta of its grid only."""
    return dataclasses.replace(method, betas=(method.betas[len(method.betas) // 2],))


QUICK_METHODS = tuple(
    middle_beta(m) for m in METHODS if m.name in ("dpo", "sppo", "sparsepo", "mapo")
)


def sft_config(out_dir: Path, *, steps: int, seed: int) -> C.TrainConfig:
    """The reference policy: a random `tiny` Llama trained on the shipped review corpus (as
    `alignjax demo`'s first stage), exported for the preference runs' `init_from`."""
    return C.TrainConfig(
        task="sft",
        steps=steps,
        seed=seed,
        out_dir=str(out_dir),
        log_every=max(steps // 16, 1),
        eval_every=0,
        eval_samples=0,
        plot=False,
        model=C.ModelConfig(preset="tiny"),
        data=C.DataConfig(
            train="shipped:sft", eval=None, max_length=64, batch_size=32, buckets=(64,), seed=seed
        ),
        optim=C.OptimConfig(learning_rate=3e-3, warmup_steps=min(20, steps // 4)),
        checkpoint=C.CheckpointConfig(every=steps, keep=1, asynchronous=False),
        mesh=C.MeshConfig(devices=1),
    )


def preference_config(
    method: Method,
    beta: float,
    out_dir: Path,
    *,
    sft_dir: Path,
    pairs: Path,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    eval_pairs: Path | None = None,
    eval_every: int = 0,
) -> C.TrainConfig:
    """One preference run; `eval_pairs` turns on held-out metrics every `eval_every` steps
    (the log-likelihood trajectories)."""
    peft = C.PeftConfig()
    if method.lora:
        peft = C.PeftConfig(method="lora", r=16, alpha=32.0, targets=LORA_TARGETS)
    return C.TrainConfig(
        task="paired",
        steps=steps,
        seed=seed,
        out_dir=str(out_dir),
        log_every=max(steps // 20, 1),
        eval_every=eval_every if eval_pairs is not None else 0,
        eval_samples=0,
        plot=False,
        init_from=str(sft_dir),
        loss=C.LossConfig(name=method.loss, beta=beta, independent_masks=method.independent_masks),
        data=C.DataConfig(
            train=str(pairs),
            eval=None if eval_pairs is None else str(eval_pairs),
            max_length=64,
            batch_size=batch_size,
            eval_batch_size=64,
            buckets=(64,),
            seed=seed,
        ),
        optim=C.OptimConfig(learning_rate=learning_rate, warmup_steps=min(10, steps // 4)),
        peft=peft,
        reference=C.ReferenceConfig(mode="adapters_disabled" if method.lora else "frozen"),
        checkpoint=C.CheckpointConfig(every=steps, keep=1, asynchronous=False, export_hf=False),
        mesh=C.MeshConfig(devices=1),
    )


def train_run(cfg: C.TrainConfig) -> float:
    """`trainer.train` with progress bars; returns the wall seconds."""
    t0 = time.perf_counter()
    trainer.train(cfg, progress=True)
    return time.perf_counter() - t0
