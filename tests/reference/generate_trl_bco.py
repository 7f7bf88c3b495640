"""Fixtures for unpaired BCO from TRL 0.28.0's experimental BCOTrainer, float64 inputs.

TRL 1.16.0 removed the unpaired BCO trainer, so this generator runs in its own environment with
`trl==0.28.0` (the last release that ships it) on `torch==2.13.0`:

    python3 -m venv /tmp/ref028 && /tmp/ref028/bin/pip install torch==2.13.0 && \
        /tmp/ref028/bin/pip install trl==0.28.0 numpy scikit-learn
    /tmp/ref028/bin/python tests/reference/generate_trl_bco.py

It calls `BCOTrainer.bco_loss` unchanged on a stub `self` that holds TRL's own
`RunningMoments` (so the running-mean delta is TRL's, including its float32 statistics) and, for
the UDM cases, TRL's own `_get_udm_weight` with a fixed classifier probability in place of the
fitted logistic regression. Three batches are fed in sequence, as training would; each step
records the loss (`losses.nanmean()`, as `get_batch_loss_metrics`), its gradient w.r.t. the
per-token policy log-probs, the rewards, delta and the running moments after the update.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.experimental.bco.bco_trainer import BCOTrainer
from trl.trainer.utils import RunningMoments

OUT = Path(__file__).resolve().parent / "fixtures" / "trl_bco.npz"
SEED = 20261124
N, T, STEPS = 8, 6, 3
CASES = [
    ("bco", dict(beta=0.1, udm=False)),
    ("bco_beta0.5", dict(beta=0.5, udm=False)),
    ("bco_udm", dict(beta=0.1, udm=True, min_density_ratio=0.5, max_density_ratio=10.0)),
    ("bco_udm_tight", dict(beta=0.2, udm=True, min_density_ratio=0.8, max_density_ratio=1.5)),
]


def main():
    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(SEED)
    arrays, index = {}, {}
    steps = []
    for step in range(STEPS):
        labels = rng.permutation(np.array([1, 0, 1, 1, 0, 1, 0, 0], bool))
        mask = np.zeros((N, T), np.int64)
        for row in range(N):
            start = int(rng.integers(0, 2))
            mask[row, start : start + int(rng.integers(1, T - start + 1))] = 1
        policy = np.where(mask == 1, -rng.gamma(2.0, 1.0, (N, T)), 0.0)
        ref = np.where(mask == 1, policy + rng.normal(0.3 * step, 0.7, (N, T)), 0.0)
        prob = rng.uniform(0.02, 0.98, N)  # the classifier's P(desirable | prompt) per row
        steps.append((labels, mask, policy, ref, prob))
        for key, value in dict(labels=labels, mask=mask, policy=policy, ref=ref, prob=prob).items():
            arrays[f"inputs/step{step}/{key}"] = value
    accelerator = SimpleNamespace(use_distributed=False, device=torch.device("cpu"))
    for name, cfg in CASES:
        stub = object.__new__(BCOTrainer)
        stub.__dict__.update(
            beta=cfg["beta"],
            running=RunningMoments(accelerator),
            # `match_underlying_distribution` is a property: on when both of these are set.
            embedding_func=object() if cfg["udm"] else None,
            embedding_tokenizer=object() if cfg["udm"] else None,
            args=SimpleNamespace(
                min_density_ratio=cfg.get("min_density_ratio", 0.5),
                max_density_ratio=cfg.get("max_density_ratio", 10.0),
            ),
        )
        for step, (labels, mask, policy, ref, prob) in enumerate(steps):
            chosen_idx, rejected_idx = np.flatnonzero(labels), np.flatnonzero(~labels)
            p_rejected = torch.tensor(prob[rejected_idx])
            stub._get_chosen_prob = lambda emb, p=p_rejected: p
            policy_t = torch.tensor(policy, requires_grad=True)
            seq = (policy_t * torch.tensor(mask)).sum(-1)
            seq_ref = (torch.tensor(ref) * torch.tensor(mask)).sum(-1)
            losses, cr, rr, delta = BCOTrainer.bco_loss(
                stub,
                seq[chosen_idx],
                seq[rejected_idx],
                seq_ref[chosen_idx],
                seq_ref[rejected_idx],
                None,
                torch.zeros(len(rejected_idx), 4),
            )
            loss = losses.nanmean()
            (grad,) = torch.autograd.grad(loss, policy_t)
            key = f"{name}/step{step}"
            arrays[f"{key}/loss"] = np.array(float(loss))
            arrays[f"{key}/grad_policy_logps"] = grad.numpy()
            arrays[f"{key}/chosen_rewards"] = cr.detach().numpy()
            arrays[f"{key}/rejected_rewards"] = rr.detach().numpy()
            arrays[f"{key}/delta"] = np.array(float(delta))
            run = stub.running
            arrays[f"{key}/moments"] = np.array([run.mean, run.var, run.count], np.float64)
        index[name] = cfg
    meta = {
        "generator": "tests/reference/generate_trl_bco.py",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64 inputs; TRL keeps the running moments in float32 (.float())",
        "steps": STEPS,
        "cases": index,
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} (trl {trl.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
