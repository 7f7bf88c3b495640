"""Fixtures from TRL's own reward-model loss (trl==1.16.0, float64): `RewardTrainer.compute_loss`.

The method is called unbound on a stub trainer (`object.__new__` of the real class, attributes
set by hand) whose model returns fixed float64 scores (a leaf tensor, so torch autograd gives
d loss / d scores): rows `[chosen; rejected]` as TRL's collator stacks them, the score read by the
model as `logits[:, 0]`. Cases: with and without a `margin` column, with and without
`center_rewards_coefficient`. Recorded: the loss, its gradient w.r.t. the 2B scores, and every
metric the method logs (`min_reward`, `mean_reward`, `max_reward`, `accuracy`, `margin`).
One chosen score ties its rejected one (TRL's accuracy counts `>` only).

Run with torch==2.13.0 (CPU) and trl==1.16.0, from the repository root:
    /tmp/ref/bin/python tests/reference/generate_trl_reward.py
It rewrites tests/reference/fixtures/trl_reward.npz (a few KB).
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "fixtures" / "trl_reward.npz"
SEED = 20261216
B = 12
METRICS = ("min_reward", "mean_reward", "max_reward", "accuracy", "margin")
CASES = {
    "plain": dict(margin=False, center=None),
    "margin": dict(margin=True, center=None),
    "center": dict(margin=False, center=0.01),
    "margin_center": dict(margin=True, center=0.3),
}


class FixedScores(torch.nn.Module):
    """A stand-in for `AutoModelForSequenceClassification(num_labels=1)`: fixed logits [2B, 1]."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kw):
        return SimpleNamespace(logits=self.scores[:, None])


def stub_trainer(model, center):
    from trl import RewardTrainer

    trainer = object.__new__(RewardTrainer)
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    object.__setattr__(trainer, "__dict__", {
        "model": model,
        "args": SimpleNamespace(center_rewards_coefficient=center),
        "accelerator": accelerator,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    })  # fmt: skip
    return trainer


def main():
    import trl
    from trl import RewardTrainer

    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(SEED)
    scores = rng.normal(0.0, 1.5, size=2 * B)
    scores[B - 1] = scores[2 * B - 1]  # a tie
    margin = np.round(rng.uniform(-0.5, 1.5, size=B), 3)
    ids = np.ones((2 * B, 5), np.int64)
    arrays = {"scores": scores, "margin": margin}
    meta = {"cases": {}, "B": B, "trl": trl.__version__, "torch": torch.__version__}
    for name, case in CASES.items():
        leaf = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
        model = FixedScores(leaf)
        model.train()
        trainer = stub_trainer(model, case["center"])
        inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(ids)}
        if case["margin"]:
            inputs["margin"] = torch.tensor(margin, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = RewardTrainer.compute_loss(trainer, model, inputs)
        loss.backward()
        logged = trainer._metrics["train"]
        values = {"loss": float(loss.detach())}
        values.update({k: float(logged[k][-1]) for k in METRICS})
        meta["cases"][name] = {**case, "values": values}
        arrays[f"{name}/grad"] = leaf.grad.numpy().copy()
    np.savez(OUT, meta_json=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {OUT} ({len(CASES)} cases)")


if __name__ == "__main__":
    main()
