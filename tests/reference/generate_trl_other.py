"""Fixtures from TRL 1.16.0's CPO / SimPO / AlphaPO, ORPO and KTO loss code, float64.

* CPO family: `trl.experimental.cpo.CPOTrainer.cpo_loss(self, chosen_logps, rejected_logps)`,
  called unchanged on a stub `self` (loss_type sigmoid / hinge / ipo / simpo, label smoothing,
  AlphaPO's alpha). Returns per-pair losses and rewards; gradients by autograd.
* ORPO: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` likewise (average log-probs in).
* KTO: `trl.KTOTrainer._compute_loss` (loss_type kto / apo_zero_unpaired, desirable and
  undesirable weights, the KL baseline from mismatched completions) on a stub trainer whose
  policy/reference "models" return fixed per-token log-probs, as in generate_trl_dpo.py.
BCO (unpaired) is not in trl 1.16.0 (its trainer was removed; only DPO's bco_pair remains), so it
has no fixture here.

    python tests/reference/generate_trl_other.py      # with the [ref] extra installed
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

OUT = Path(__file__).resolve().parent / "fixtures" / "trl_other.npz"
SEED = 20261123
B = 7

CPO_CASES = [
    ("cpo_sigmoid", dict(loss_type="sigmoid")),
    ("cpo_sigmoid_ls0.1", dict(loss_type="sigmoid", label_smoothing=0.1)),
    ("cpo_hinge", dict(loss_type="hinge")),
    ("cpo_ipo", dict(loss_type="ipo")),
    ("simpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5)),
    ("simpo_ls0.2", dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, label_smoothing=0.2)),
    ("alphapo", dict(loss_type="simpo", beta=2.5, simpo_gamma=0.5, alpha=0.25)),
    ("alphapo_sigmoid_neg", dict(loss_type="sigmoid", alpha=-0.5)),
]
ORPO_CASES = [("orpo", dict(beta=0.1)), ("orpo_beta0.5", dict(beta=0.5))]
KTO_CASES = [
    ("kto", dict(loss_type="kto")),
    ("kto_weights", dict(loss_type="kto", desirable_weight=1.33, undesirable_weight=0.7, beta=0.3)),
    ("apo_zero_unpaired", dict(loss_type="apo_zero_unpaired")),
]
ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"),
    gather=lambda x: x,
    gather_for_metrics=lambda x: x,
    unwrap_model=lambda m: m,
)


def sequence_cases(rng):
    # Average log-probs in (-3, -0.02): valid for ORPO's log(1 - p) and AlphaPO's p^-alpha.
    chosen = -rng.uniform(0.02, 3.0, B)
    rejected = -rng.uniform(0.02, 3.0, B)
    arrays = {"seq/chosen_logps": chosen, "seq/rejected_logps": rejected}
    index = {}
    for name, options in CPO_CASES + ORPO_CASES:
        cfg = dict(beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, loss_type="sigmoid")
        cfg.update(options)
        c = torch.tensor(chosen, requires_grad=True)
        r = torch.tensor(rejected, requires_grad=True)
        if name.startswith("orpo"):
            stub = object.__new__(ORPOTrainer)
            stub.__dict__.update(beta=cfg["beta"], accelerator=ACCELERATOR)
            losses, cr, rr, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(stub, c, r)
            arrays[f"{name}/log_odds_ratio"] = mean_ratio.detach().numpy()
            arrays[f"{name}/log_odds_chosen"] = mean_log_odds.detach().numpy()
            cfg = {"beta": cfg["beta"]}
        else:
            stub = object.__new__(CPOTrainer)
            stub.__dict__.update(accelerator=ACCELERATOR, **cfg)
            losses, cr, rr = CPOTrainer.cpo_loss(stub, c, r)
        gc, gr = torch.autograd.grad(losses.sum(), (c, r))
        arrays[f"{name}/losses"] = losses.detach().numpy()
        arrays[f"{name}/chosen_rewards"] = cr.numpy()
        arrays[f"{name}/rejected_rewards"] = rr.numpy()
        arrays[f"{name}/grad_chosen"] = gc.numpy()
        arrays[f"{name}/grad_rejected"] = gr.numpy()
        index[name] = cfg
    return arrays, index


class StubLM:
    """Returns fixed per-token log-probs: `main` for the batch, `kl` for the KL sequences."""

    def __init__(self, main, kl, kl_width):
        self.main, self.kl, self.kl_width = main, kl, kl_width
        self.training = True
        self.is_gradient_checkpointing = False

    def __call__(self, input_ids, **kwargs):
        lp = self.kl if input_ids.shape[1] == self.kl_width else self.main
        n, t = lp.shape
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros(n, t),
            mean_logits=torch.zeros(n, t),
            is_top1=torch.zeros(n, t, dtype=torch.bool),
        )


def kto_cases(rng):
    n, t, t_kl = 8, 7, 6
    labels = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)
    mask = np.zeros((n, t), np.int64)
    kl_mask = np.zeros((n, t_kl), np.int64)
    for row in range(n):
        p = int(rng.integers(1, 3))
        mask[row, p : p + int(rng.integers(1, t - p + 1))] = 1
        kl_mask[row, p : p + int(rng.integers(1, t_kl - p + 1))] = 1
    shift, kl_shift = mask[:, 1:], kl_mask[:, 1:]
    policy = np.where(shift == 1, -rng.gamma(2.0, 1.0, shift.shape), 0.0)
    ref = np.where(shift == 1, policy + rng.normal(0, 0.6, shift.shape), 0.0)
    kl_policy = np.where(kl_shift == 1, -rng.gamma(2.0, 1.0, kl_shift.shape), 0.0)
    # A positive mean policy-reference gap on the KL sequences, so the clamp at 0 is inactive...
    kl_ref = np.where(kl_shift == 1, kl_policy - rng.uniform(0.0, 0.4, kl_shift.shape), 0.0)
    arrays = {
        "kto_inputs/policy_logps": policy,
        "kto_inputs/ref_logps": ref,
        "kto_inputs/kl_policy_logps": kl_policy,
        "kto_inputs/completion_mask": mask,
        "kto_inputs/kl_completion_mask": kl_mask,
        "kto_inputs/label": labels,
    }
    index = {}
    # ...and one case where it is negative, so the clamp binds.
    for name, options in [*KTO_CASES, ("kto_kl_clamped", dict(loss_type="kto", flip_kl=True))]:
        cfg = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto")
        cfg.update(options)
        flip = cfg.pop("flip_kl", False)
        kl_r = 2 * kl_policy - kl_ref if flip else kl_ref
        policy_t = torch.tensor(policy, requires_grad=True)
        trainer = object.__new__(KTOTrainer)
        trainer.__dict__.update(
            model=StubLM(policy_t, torch.tensor(kl_policy), t_kl),
            ref_model=StubLM(torch.tensor(ref), torch.tensor(kl_r), t_kl),
            accelerator=ACCELERATOR,
            aux_loss_enabled=False,
            precompute_ref_logps=False,
            calculate_KL=cfg["loss_type"] != "apo_zero_unpaired",
            args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
            **cfg,
        )
        batch = {
            "input_ids": torch.zeros((n, t), dtype=torch.long),
            "attention_mask": torch.ones((n, t), dtype=torch.long),
            "completion_mask": torch.tensor(mask),
            "KL_input_ids": torch.zeros((n, t_kl), dtype=torch.long),
            "KL_attention_mask": torch.ones((n, t_kl), dtype=torch.long),
            "KL_completion_mask": torch.tensor(kl_mask),
            "label": torch.tensor(labels),
        }
        loss = KTOTrainer._compute_loss(trainer, trainer.model, batch, return_outputs=False)
        (grad,) = torch.autograd.grad(loss, policy_t)
        arrays[f"{name}/loss"] = np.array(float(loss))
        arrays[f"{name}/grad_policy_logps"] = (grad * torch.tensor(shift != 0)).numpy()
        arrays[f"{name}/kl_ref_logps"] = kl_r
        for k, v in trainer._metrics["train"].items():
            if k.startswith(("rewards/", "logps/", "kl")):
                arrays[f"{name}/{k}"] = np.array(float(v[-1]))
        index[name] = cfg
    return arrays, index


def main():
    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(SEED)
    arrays, seq_index = sequence_cases(rng)
    kto_arrays, kto_index = kto_cases(rng)
    arrays.update(kto_arrays)
    meta = {
        "generator": "tests/reference/generate_trl_other.py",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "cases": {"sequence": seq_index, "kto": kto_index},
        "notes": "KTO per-token arrays are TRL-shifted [N, T-1]; masks are [N, T]. "
        "ORPO's odds_ratio_loss casts to float32 internally (.float()).",
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} (trl {trl.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
