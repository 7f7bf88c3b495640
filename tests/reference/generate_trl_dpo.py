"""Fixtures from TRL's own DPO loss code: `DPOTrainer._compute_loss` of trl==1.16.0, float64.

TRL 1.16 computes every DPO loss type inside `_compute_loss`, from the per-token log-probs that
its fused LM head returns (`outputs.log_probs`, shifted, zero where the label is -100). This
script calls that method unchanged on a stub trainer whose policy and reference "models" return
fixed random per-token log-probs, so the losses, rewards and metrics are TRL's, computed by
TRL's code. Gradients w.r.t. the policy per-token log-probs come from torch autograd.

Run with the [ref] extra installed (torch==2.13.0 CPU, trl==1.16.0):
    python tests/reference/generate_trl_dpo.py
It rewrites tests/reference/fixtures/trl_dpo.npz. torch's default dtype is set to float64 so
that the constant tensors TRL builds inside the loss (e.g. exo_pair's epsilon) are float64 too.
Exception: TRL 1.16's alpha-divergence has no float64 branch (its clamp table lists only
fp16/bf16/fp32 and raises KeyError for float64), so those cases run in float32 end to end; each
case records its dtype in the metadata and tests use the float32 tolerance for them.
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
from trl.trainer.dpo_trainer import DPOTrainer

OUT = Path(__file__).resolve().parent / "fixtures" / "trl_dpo.npz"
B, T = 6, 9  # pairs, tokens per row (TRL's shifted arrays have T - 1 columns)
SEED = 20261122

# (case name, loss_types, loss_weights, options). Options are DPOConfig fields.
CASES = [
    *[
        (lt, [lt], [1.0], {})
        for lt in (
            "sigmoid",
            "hinge",
            "ipo",
            "nca_pair",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sft",
            "sigmoid_norm",
        )
    ],
    ("exo_pair_ls1e-3", ["exo_pair"], [1.0], {"label_smoothing": 1e-3}),
    ("exo_pair_ls0.2", ["exo_pair"], [1.0], {"label_smoothing": 0.2}),
    ("robust_ls0.1", ["robust"], [1.0], {"label_smoothing": 0.1}),
    ("robust_ls0", ["robust"], [1.0], {"label_smoothing": 0.0}),
    ("aot_ls0.1", ["aot"], [1.0], {"label_smoothing": 0.1}),
    ("aot_unpaired_ls0.1", ["aot_unpaired"], [1.0], {"label_smoothing": 0.1}),
    ("sigmoid_ls0.3_ignored", ["sigmoid"], [1.0], {"label_smoothing": 0.3}),
    ("sigmoid_beta0.5", ["sigmoid"], [1.0], {"beta": 0.5}),
    ("ipo_beta0.5", ["ipo"], [1.0], {"beta": 0.5}),
    ("discopop_tau0.2", ["discopop"], [1.0], {"discopop_tau": 0.2}),
    ("sigmoid_forward_kl", ["sigmoid"], [1.0], {"f_divergence_type": "forward_kl"}),
    ("sigmoid_js", ["sigmoid"], [1.0], {"f_divergence_type": "js_divergence"}),
    ("sigmoid_alpha0.5", ["sigmoid"], [1.0], {"f_divergence_type": "alpha_divergence"}),
    (
        "sigmoid_alpha1.5",
        ["sigmoid"],
        [1.0],
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
    ),
    ("ipo_js", ["ipo"], [1.0], {"f_divergence_type": "js_divergence"}),
    ("sigmoid_norm_forward_kl", ["sigmoid_norm"], [1.0], {"f_divergence_type": "forward_kl"}),
    ("hinge_alpha0.5", ["hinge"], [1.0], {"f_divergence_type": "alpha_divergence"}),
    ("sigmoid_wpo", ["sigmoid"], [1.0], {"use_weighting": True}),
    ("ipo_wpo", ["ipo"], [1.0], {"use_weighting": True}),
    ("sigmoid_ld0.5", ["sigmoid"], [1.0], {"ld_alpha": 0.5}),
    ("ipo_ld0.3", ["ipo"], [1.0], {"ld_alpha": 0.3}),
    ("rpo", ["sigmoid", "sft"], [1.0, 0.7], {}),
    ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
]


def make_inputs(rng):
    """Right-padded [prompt][completion][pad] rows, chosen rows first, as TRL's collator does."""
    mask = np.zeros((2 * B, T), np.int64)
    attention = np.zeros((2 * B, T), np.int64)
    for row in range(2 * B):
        prompt = int(rng.integers(1, 3))
        completion = int(rng.integers(1, T - prompt + 1))
        if row == 2 * B - 1:
            completion = 0  # a zero-length rejected completion (TRL clamps lengths at 1)
        attention[row, : prompt + completion] = 1
        mask[row, prompt : prompt + completion] = 1
    shift = mask[:, 1:]
    policy = np.where(shift == 1, -rng.gamma(2.0, 1.0, (2 * B, T - 1)), 0.0)
    ref = np.where(shift == 1, policy + rng.normal(0.0, 0.7, (2 * B, T - 1)), 0.0)
    # WPO's log sum_v p_v^2 per token (<= log p of the label is not required by the formula).
    log_sum_sq = np.where(shift == 1, -rng.uniform(0.5, 3.0, (2 * B, T - 1)), 0.0)
    return policy, ref, log_sum_sq, mask, attention


class StubLM:
    """Stands in for a causal LM called with `fused_lm_head=True`."""

    def __init__(self, log_probs, log_sum_sq):
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq
        self.training = True
        self.is_gradient_checkpointing = False

    def __call__(self, **kwargs):
        n, t = self.log_probs.shape
        return SimpleNamespace(
            log_probs=self.log_probs,
            log_sum_sq_probs=self.log_sum_sq,
            entropy=torch.zeros(n, t),
            mean_logits=torch.zeros(n, t),
            is_top1=torch.zeros(n, t, dtype=torch.bool),
        )


def run_case(loss_types, loss_weights, options, policy, ref, log_sum_sq, mask, attention):
    dtype = (
        torch.float32 if options.get("f_divergence_type") == "alpha_divergence" else (torch.float64)
    )
    torch.set_default_dtype(dtype)
    policy_t = torch.tensor(policy, dtype=dtype, requires_grad=True)
    trainer = object.__new__(DPOTrainer)
    config = {
        "beta": 0.1,
        "label_smoothing": 0.0,
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "use_weighting": False,
        "discopop_tau": 0.05,
    }
    config.update(options)
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        unwrap_model=lambda m: m,
    )
    trainer.__dict__.update(
        model=StubLM(policy_t, torch.tensor(log_sum_sq, dtype=dtype)),
        ref_model=StubLM(torch.tensor(ref, dtype=dtype), torch.tensor(log_sum_sq, dtype=dtype)),
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights),
        beta=config["beta"],
        label_smoothing=config["label_smoothing"],
        ld_alpha=config["ld_alpha"],
        f_divergence_type=config["f_divergence_type"],
        f_alpha_divergence_coef=config["f_alpha_divergence_coef"],
        use_weighting=config["use_weighting"],
        args=SimpleNamespace(
            discopop_tau=config["discopop_tau"], gradient_checkpointing_kwargs=None
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(mask.shape, dtype=torch.long),
        "attention_mask": torch.tensor(attention),
        "completion_mask": torch.tensor(mask),
    }
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy_t)
    # A real fused head returns constant zeros off the completion mask (labels -100), so no
    # gradient reaches the model there; the stub's leaf tensor would report d loss / d sum.
    grad = grad * torch.tensor(mask[:, 1:] != 0)
    metrics = {
        k: float(v[-1])
        for k, v in trainer._metrics["train"].items()
        if k.startswith(("rewards/", "logps/"))
    }
    config["dtype"] = str(dtype).replace("torch.", "")
    return float(loss), grad.numpy().astype(np.float64), metrics, config


def main():
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(SEED)
    policy, ref, log_sum_sq, mask, attention = make_inputs(rng)
    arrays = {
        "policy_logps": policy,
        "ref_logps": ref,
        "log_sum_sq_probs": log_sum_sq,
        "completion_mask": mask,
        "attention_mask": attention,
    }
    index = {}
    for name, loss_types, weights, options in CASES:
        loss, grad, metrics, config = run_case(
            loss_types, weights, options, policy, ref, log_sum_sq, mask, attention
        )
        arrays[f"{name}/loss"] = np.array(loss)
        arrays[f"{name}/grad_policy_logps"] = grad
        for k, v in metrics.items():
            arrays[f"{name}/{k}"] = np.array(v)
        index[name] = {"loss_types": loss_types, "loss_weights": weights, "config": config}
    meta = {
        "generator": "tests/reference/generate_trl_dpo.py",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "layout": "rows [chosen (B); rejected (B)], TRL-shifted per-token arrays [2B, T-1]; "
        "completion_mask/attention_mask [2B, T]",
        "cases": index,
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(CASES)} cases, trl {trl.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
