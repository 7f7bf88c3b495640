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
regularised runs of the other methods land; 0.8 is the SparsePO paper's IMDB beta; 0.03
extends the frontier past ~20 nats, where iterative DPO lands; added with the on-policy rows,
after the committed full SparsePO study); IPO 1 -> 8
gives ~6 -> ~0.6; SPPO 0.003 -> 0.1 gives ~4 -> ~0.7; TDPO2 (alpha 0.5, the TDPO authors'
recommendation) holds itself under ~2 nats at any beta. MaPO: the reference's activation mask
(MLP, attention, residual groups). The LoRA row (rank 16 on every projection, the reference =
the adapters disabled) shares DPO's betas 0.1 - 1.

SparsePO as the official trainer trains it (huawei-noah/HEBO `SparsePO/`, specs/losses.md 5.2):
the paper's "all layers" head on the reference's layer outputs, no L1 (the official default),
dropout 0 (forced officially too), the EOS a completion token; the heads in their own parameter
group with weight decay 0.01 (matrices only, as HF's decay-parameter rule); initialised as the
official run is (transformers' N(0, 0.02), zero biases) but with the mixer scaled so that the
expected initial mask is the official magnitude ~0.03 ("scaled", `losses.sparse_mask`), since a
literal N(0, 0.02) at width 64 gives ~0.001. Officially the heads train at the policy's rate
(1e-6 for IMDB), where in ~2400 AdamW steps of <= lr each they drift ~2e-3 against weights of
std 0.02 (~10%); here the policy's rate is 1e-3 for 100 steps, so the head rate is swept:
0 (frozen at init), 1e-5 (~5% drift of the projections: the closest to the official regime,
used for the other SparsePO variants), 1e-4, and 1e-3 (= the policy's, the earlier study's
setting, also run with its PyTorch-uniform init). Controls: TDPO1 (SparsePO with m = 1 is TDPO1
exactly; that row is run too and must equal it), a fixed random mask (U(0, 1) per token), the
official input layout (the last state after the final norm), and L1 = 1e-3 on both terms with
the official halving for the common mask.
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
    "BY_NAME",
    "DEFAULT_METHODS",
    "ONLINE",
    "ONLINE_ONLY",
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
    # SparsePO: the mask heads' own parameter group (AdamW, weight decay 0.01 as the official
    # `mask_weight_decay`): their learning rate, None = the policy's; and the mask provider's
    # options (`losses.SparsePOMasks`: init, kind, last_state)
    head_lr: float | None = None
    mask_options: tuple[tuple[str, object], ...] = ()
    loss_kwargs: tuple[tuple[str, object], ...] = ()
    # on-policy rows (`onpolicy.py`): "grpo" / "rloo" / "online_dpo" (`task: online`) or
    # "iterative_dpo" / "sppo" (`online.run_iterative`), scored by "gold" or "rm"
    online: str | None = None
    scorer: str = "gold"

    @property
    def learned_heads(self) -> bool:
        return self.loss == "sparsepo" and dict(self.mask_options).get("kind", "learned") == (
            "learned"
        )


SCALED = (("init", "scaled"),)  # the official initial mask magnitude (~0.03), sparse_mask.py
FAITHFUL_HEAD_LR = 1e-5  # see the module docstring: the official heads' relative drift
SPARSE_BETAS = (0.1, 0.8, 3.0)  # 0.8: the paper's IMDB beta


def _sparse(name, label, betas=SPARSE_BETAS, **kw) -> Method:
    kw.setdefault("mask_options", SCALED)
    return Method(name, label, "sparsepo", betas, masks=kw.pop("masks", True), **kw)


METHODS = (
    Method("dpo", "DPO", "sigmoid", (0.03, 0.1, 0.3, 0.8, 3.0, 10.0)),
    Method("ipo", "IPO", "ipo", (1.0, 2.0, 8.0)),
    Method("sppo", "SPPO", "sppo", (0.003, 0.01, 0.1)),
    Method("tdpo1", "TDPO1", "tdpo1", SPARSE_BETAS),
    Method("tdpo2", "TDPO2", "tdpo2", (0.01, 0.1, 1.0)),
    _sparse("sparsepo_lr0", "SparsePO, head frozen at init (lr 0)", head_lr=0.0),
    _sparse("sparsepo", "SparsePO, head lr 1e-5", head_lr=FAITHFUL_HEAD_LR),
    _sparse("sparsepo_lr1e-4", "SparsePO, head lr 1e-4", head_lr=1e-4),
    _sparse("sparsepo_lrpolicy", "SparsePO, head lr 1e-3 (= policy)", head_lr=None),
    _sparse(
        "sparsepo_torchinit", "SparsePO, torch init, head lr 1e-3", head_lr=None, mask_options=()
    ),
    _sparse(
        "sparsepo_indp",
        "SparsePO indep. masks, head lr 1e-5",
        head_lr=FAITHFUL_HEAD_LR,
        independent_masks=True,
    ),
    _sparse(
        "sparsepo_postnorm",
        "SparsePO, post-norm input, head lr 1e-5",
        head_lr=FAITHFUL_HEAD_LR,
        mask_options=SCALED + (("last_state", "postnorm"),),
    ),
    _sparse(
        "sparsepo_l1",
        "SparsePO, L1 1e-3 (halved), head lr 1e-5",
        (0.8,),
        head_lr=FAITHFUL_HEAD_LR,
        loss_kwargs=(("l1_reward", 1e-3), ("l1_kl", 1e-3)),
    ),
    _sparse(
        "sparsepo_random",
        "SparsePO, fixed random mask",
        masks=False,
        mask_options=(("kind", "random"),),
    ),
    _sparse(
        "sparsepo_ones",
        "SparsePO, m = 1 (= TDPO1)",
        (0.8,),
        masks=False,
        mask_options=(("kind", "ones"),),
    ),
    Method("mapo", "MaPO", "mapo", (0.1, 0.3, 1.0), masks=True),
    Method("dpo_lora", "DPO + LoRA", "sigmoid", (0.1, 0.3, 1.0), lora=True),
)


def _online(name, label, loss, betas, online, scorer="gold") -> Method:
    if scorer == "rm":
        name, label = f"{name}_rm", f"{label} (reward model)"
    return Method(name, label, loss, betas, online=online, scorer=scorer)


# On-policy rows (onpolicy.py). Grids from a calibration at the default budget (seed 0, gold
# reward), chosen to land inside DPO's KL range (~1.6-17 nats): GRPO + KL 0.04 / 0.2 / 1 gave
# KL 140 / 8.4 / 0.4 nats (at 0.01-0.04 the policy hacks the lexicon count: reward 17-19, 20+
# sentiment words); RLOO 0.05 / 0.2 / 1: 149 / 7.3 / 1.4; online DPO 0.1 / 0.3 / 1: 111 / 11 /
# 3.7; iterative DPO 0.1 / 0.3 / 1: 85 / 61 / 36 (the reference moves each iteration, so the
# KL to the SFT model compounds over the 3 iterations); SPPO's loop 0.01: 18.
ONLINE_BETAS = {
    "grpo": (0.2, 0.5, 1.0),
    "rloo": (0.2, 0.5, 1.0),
    "online_dpo": (0.3, 1.0, 3.0),
    "iterative_dpo": (3.0, 10.0, 30.0),
    "sppo": (0.03, 0.1, 0.3),
}
_ONLINE_ROWS = (
    ("grpo", "GRPO + KL", "grpo", "grpo"),
    ("rloo", "RLOO", "rloo", "rloo"),
    ("online_dpo", "online DPO", "online_dpo", "online_dpo"),
    ("iterative_dpo", "iterative DPO (3 it.)", "sigmoid", "iterative_dpo"),
    ("sppo_iter", "SPPO self-play (3 it.)", "sppo", "sppo"),
)
ONLINE = tuple(
    _online(name, label, loss, ONLINE_BETAS[kind], kind, scorer)
    for scorer in ("gold", "rm")
    for name, label, loss, kind in _ONLINE_ROWS
)
METHODS = METHODS + ONLINE
BY_NAME = {m.name: m for m in METHODS}


# --quick: one beta each (the middle one), the four methods the test checks.
def middle_beta(method: Method) -> Method:
    """The method at the middle beta of its grid only."""
    return dataclasses.replace(method, betas=(method.betas[len(method.betas) // 2],))


def _only(name: str, *betas: float) -> Method:
    return dataclasses.replace(BY_NAME[name], betas=betas)


# The default run (<= 10 min on 2 cores, one training seed): DPO's whole frontier, the faithful
# SparsePO configuration at every SparsePO beta, TDPO1, the head-rate sweep and the fixed random
# mask at the paper's beta 0.8, the other methods at one beta each (`--full`: all of them at
# every beta, 3 seeds).
DEFAULT_METHODS = (
    BY_NAME["dpo"],
    _only("tdpo1", 0.8),
    _only("sparsepo_lr0", 0.8),
    BY_NAME["sparsepo"],
    _only("sparsepo_lrpolicy", 0.8),
    _only("sparsepo_lr1e-4", 0.8),
    _only("sparsepo_random", 0.8),
    *(middle_beta(BY_NAME[n]) for n in ("ipo", "sppo", "tdpo2", "mapo", "dpo_lora")),
    # on-policy rows at their middle beta: GRPO + KL and online DPO on the gold reward and on
    # the study's reward model, SPPO's self-play loop on the gold reward (RLOO and iterative
    # DPO: `--full` / `--online`)
    *(
        middle_beta(BY_NAME[n])
        for n in ("grpo", "online_dpo", "sppo_iter", "grpo_rm", "online_dpo_rm")
    ),
)
# `--online`: DPO's frontier and the on-policy rows only (with `--full`: every beta, 3 seeds)
ONLINE_ONLY = (BY_NAME["dpo"],) + ONLINE
QUICK_METHODS = tuple(
    middle_beta(BY_NAME[n])
    for n in ("dpo", "sppo", "sparsepo", "mapo", "grpo", "sppo_iter", "online_dpo_rm")
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
    probe: Path | None = None,
    head_seed: int | None = None,
) -> C.TrainConfig:
    """One preference run; `eval_pairs` turns on held-out metrics every `eval_every` steps
    (the log-likelihood trajectories and the DPO-dynamics diagnostics, with the dispersion
    probe `probe`); `head_seed` re-draws SparsePO's heads (None: the run's seed + 2)."""
    peft = C.PeftConfig()
    if method.lora:
        peft = C.PeftConfig(method="lora", r=16, alpha=32.0, targets=LORA_TARGETS)
    groups = ()
    if method.learned_heads:
        groups = (C.ParamGroup(label="heads", learning_rate=method.head_lr, weight_decay=0.01),)
    mask_options = dict(method.mask_options)
    if head_seed is not None:
        mask_options["head_seed"] = head_seed
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
        loss=C.LossConfig(
            name=method.loss,
            beta=beta,
            independent_masks=method.independent_masks,
            mask_options=mask_options,
            kwargs=dict(method.loss_kwargs),
        ),
        data=C.DataConfig(
            train=str(pairs),
            eval=None if eval_pairs is None else str(eval_pairs),
            probe=None if eval_pairs is None or probe is None else str(probe),
            max_length=64,
            batch_size=batch_size,
            eval_batch_size=64,
            buckets=(64,),
            seed=seed,
        ),
        optim=C.OptimConfig(
            learning_rate=learning_rate, warmup_steps=min(10, steps // 4), groups=groups
        ),
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
