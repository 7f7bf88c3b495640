"""CREAM's consistency-regularised DPO as a registered loss, "cream", that the trainer can run.

Importing this module registers the loss (a plugin, as `TrainConfig.imports` loads them); the
CREAM driver (`alignjax.online.iterative`, method "cream") names it in the runs' `imports`, so
`alignjax train / eval`, `open_run` and a resumed run find it. It is not imported by
`alignjax.online` itself, so the registry of a process that never runs CREAM is unchanged.

Each pair's consistency C travels in the data's `win_prob` column (the pairs file of
`phases.cream_pairs`): C is the probability with which y+ is labelled preferred to y-, and

    C (-log s(u)) + (1 - C) (-log s(-u)) = DPO with the soft label P(y+ > y-) = C

(cDPO with a per-pair label smoothing 1 - C; `online.cream_dpo`, Wang et al. 2025,
arXiv:2410.12735, official `sft_dpo_trainer.py`). The registered `sigmoid` loss takes its
`label_smoothing` as one scalar hyperparameter, so a per-pair C needs a loss that reads a batch
column; `win_prob` is the column the data pipeline already carries per pair (`[B]`, padding rows
0.5) into `PreferenceBatch`.
"""

from __future__ import annotations

from alignjax import losses
from alignjax.losses.types import LossOutput, PreferenceBatch
from alignjax.online.cream import cream_dpo

__all__ = ["NAME", "cream_loss"]

NAME = "cream"


def cream_loss(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """`online.cream_dpo(batch, C, beta=beta)` with C = `batch.win_prob` (`[B]`, in [0, 1])."""
    if batch.win_prob is None:
        raise ValueError(
            "loss `cream` reads each pair's consistency C from the batch's `win_prob` column "
            "(the probability that the chosen response is preferred); the data has none: write "
            "the pairs with `alignjax.online.phases.cream_pairs`"
        )
    return cream_dpo(batch, batch.win_prob, beta=beta)


if NAME not in losses.available():
    losses.register(NAME, cream_loss)
elif getattr(losses.get(NAME), "__module__", None) != __name__:
    raise ValueError(f"a different loss is already registered as {NAME!r}")
