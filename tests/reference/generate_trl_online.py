"""Fixtures from TRL's own on-policy code (trl==1.16.0, float64): GRPO / RLOO losses and
advantages, and the Online DPO step.

Everything comes from TRL's methods, called unbound on a stub trainer (`object.__new__` of the
real class, attributes set by hand) whose model-facing pieces return fixed tensors:

* losses: `GRPOTrainer._compute_loss` and `RLOOTrainer._compute_loss`; the stub's
  `_get_per_token_logps_and_entropies` returns fixed per-token log-probs (a float64 leaf, so
  torch autograd gives d loss / d logps) and entropies. The per-token loss and the ratio are
  local variables of `_compute_loss`: they are read from its frame when it returns
  (`sys.setprofile`), so they too are TRL's values, not a transcription.
* advantages: `GRPOTrainer._generate_and_score_completions` and
  `RLOOTrainer._generate_and_score_completions` (the advantage code lives inside them), with
  `_generate` returning fixed completion ids and plain Python reward functions returning fixed
  rewards (None included) through TRL's own `_calculate_rewards`; for RLOO the stub also returns
  the old / reference per-token log-probs that TRL folds into the reward.
* Online DPO: `OnlineDPOTrainer.training_step` with `_generate` and `_forward` stubbed
  (fixed completions, fixed policy / reference per-token log-probs) and `accelerator.backward`
  running torch autograd, so the loss, its gradient and every logged stat are TRL's.

Inputs: B = 16 rows of T = 6 completion tokens with ragged lengths (one empty row), values off
the completion mask set to arbitrary numbers (TRL masks them out; so must alignjax), old log-probs
far enough from the policy to clip on both sides. Rewards are dyadic rationals (exact in the
float32 tensor `_calculate_rewards` builds). Online DPO's pad positions hold 0 log-probs:
TRL's `objective/*` stats sum over pad positions too (a quirk alignjax does not reproduce: it
masks), and with zeros there both agree.

Layout: per-token inputs under `loss_inputs/`, `rewards/<set>` (NaN = None), per-case arrays
(`<case>/grad`, `<case>/per_token_loss`, `<case>/advantages`, ...) and, in `meta_json`, each
case's configuration and its scalar results (`values`: the loss and every metric TRL logged;
JSON floats round-trip exactly).

Run with torch==2.13.0 (CPU) and trl==1.16.0, from the repository root:
    /tmp/ref/bin/python tests/reference/generate_trl_online.py
It rewrites tests/reference/fixtures/trl_online.npz (~150 KB).
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "fixtures" / "trl_online.npz"
SEED = 20261215
B, T = 16, 6
MAX_COMPLETION_LENGTH = 8
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
GRPO_METRICS = (
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
)
N = None  # a reward function returning None


def fake_accelerator(num_processes=1):
    return SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        num_processes=num_processes,
        is_main_process=True,
        sync_gradients=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        unwrap_model=lambda m: m,
    )


class FakeModel:
    training = True
    is_gradient_checkpointing = False

    def train(self):
        self.training = True


def capture_locals(fn, names):
    """Run `fn()`, returning its result and the named locals of TRL's `_compute_loss` frame at
    its return."""
    seen = {}

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "_compute_loss":
            seen.update({k: frame.f_locals.get(k) for k in names})

    sys.setprofile(profiler)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, seen


# ----------------------------------------------------------------------------- loss inputs


def make_loss_inputs(rng):
    lengths = np.array([6, 3, 1, 5, 6, 0, 2, 4, 6, 6, 3, 5, 1, 4, 2, 6])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    logps = -rng.gamma(1.5, 0.8, (B, T))
    noise = rng.normal(0.0, 0.25, (B, T))
    noise[1, :2] = [0.6, -0.5]  # ratios far outside [0.8, 1.2] on both sides
    noise[8, 3] = -0.9
    noise[9, :] += 0.35
    noise[13, :] -= 0.3
    old = logps + noise
    ref = logps + rng.normal(0.0, 0.6, (B, T))
    entropy = rng.uniform(0.0, 3.0, (B, T))
    advantages = rng.normal(0.0, 1.0, B)
    advantages[[4, 10]] = 0.0
    off = mask == 0  # arbitrary finite values where TRL multiplies by 0
    for a in (logps, old, ref, entropy):
        a[off] = rng.uniform(-4.0, 1.0, off.sum())
    return dict(
        logps=logps, old_logps=old, ref_logps=ref, entropy=entropy, mask=mask, advantages=advantages
    )


def grpo_loss_case(GRPOTrainer, x, rows, cfg, ga=1, spg=1, num_processes=1, num_items=None):
    """TRL's GRPO loss on `rows` of the inputs: loss, d loss / d logps, per-token loss, metrics."""
    logps = torch.tensor(x["logps"][rows], requires_grad=True)
    entropy = torch.tensor(x["entropy"][rows])
    mask = torch.tensor(x["mask"][rows])
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None),
        model=FakeModel(),
        accelerator=fake_accelerator(num_processes),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=cfg["importance_sampling_level"],
        beta=cfg["beta"],
        loss_type=cfg["loss_type"],
        epsilon_low=cfg["epsilon"],
        epsilon_high=cfg["epsilon_high"],
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=ga,
        max_completion_length=MAX_COMPLETION_LENGTH,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(
            use_bias_correction_kl=cfg["use_bias_correction_kl"],
            delta=cfg["delta"],
            steps_per_generation=spg,
        ),
    )
    n = len(rows)
    inputs = {
        "prompt_ids": torch.zeros((n, 2), dtype=torch.long),
        "prompt_mask": torch.ones((n, 2), dtype=torch.long),
        "completion_ids": torch.zeros((n, T), dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(x["advantages"][rows]),
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items)),
    }
    if cfg["off_policy"]:
        inputs["old_per_token_logps"] = torch.tensor(x["old_logps"][rows])
    if cfg["beta"] != 0.0:
        inputs["ref_per_token_logps"] = torch.tensor(x["ref_logps"][rows])
    loss, seen = capture_locals(
        lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs), ["per_token_loss"]
    )
    (grad,) = torch.autograd.grad(loss, logps)
    per_token = seen["per_token_loss"].detach().expand(n, T).numpy().copy()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), grad.numpy().copy(), per_token, metrics


def rloo_loss_case(RLOOTrainer, x, cfg):
    logps = torch.tensor(x["logps"], requires_grad=True)
    mask = torch.tensor(x["mask"])
    old_tok = x["old_logps"] if cfg["off_policy"] else x["logps"]
    old_seq = (torch.tensor(old_tok) * mask).sum(1)
    entropy = torch.tensor(x["entropy"])
    trainer = object.__new__(RLOOTrainer)
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None),
        model=FakeModel(),
        accelerator=fake_accelerator(),
        aux_loss_enabled=False,
        epsilon_low=cfg["epsilon"],
        epsilon_high=cfg["epsilon_high"],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros((B, 2), dtype=torch.long),
        "prompt_mask": torch.ones((B, 2), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
        "completion_mask": mask,
        "old_logps": old_seq,
        "advantages": torch.tensor(x["advantages"]),
    }
    loss, seen = capture_locals(
        lambda: RLOOTrainer._compute_loss(trainer, trainer.model, inputs), ["per_sequence_loss"]
    )
    (grad,) = torch.autograd.grad(loss, logps)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), grad.numpy().copy(), seen["per_sequence_loss"].detach().numpy(), metrics


# ------------------------------------------------------------------------ advantage inputs

# Reward sets: (rows of per-function rewards, reward weights, num_generations).
# fmt: off
REWARDS = {
    # K = 2, G = 4: a spread group, a zero-std group (equal weighted sums), a group with an
    # unscorable row (every function None) and a row where one function is None, and a group
    # with one None in the second function.
    "k2_g4": (
        [
            [1.0, 0.5], [0.25, 2.0], [-1.0, 0.0], [2.5, -0.75],
            [1.0, 0.0], [0.5, 1.0], [0.0, 2.0], [1.0, 0.0],
            [N, N], [N, 2.0], [0.75, 0.25], [-0.5, 1.5],
            [3.0, 1.0], [0.125, N], [-2.0, 0.5], [1.25, 1.25],
        ],
        [1.0, 0.5],
        4,
    ),
    # K = 1, G = 2: a spread pair, a pair with one None, a zero-std pair, an all-None pair.
    "k1_g2": ([[1.5], [-0.5], [N], [2.0], [0.75], [0.75], [N], [N]], [1.0], 2),
    # K = 1, G = 4, no None: the plain case (two groups).
    "k1_g4": ([[0.0], [1.0], [1.0], [0.0], [3.0], [-1.0], [0.5], [2.25]], [1.0], 4),
}
# fmt: on


def reward_funcs(values):
    """Python reward functions returning the fixed columns of `values` (None included)."""
    k = len(values[0])

    def make(i):
        def fn(prompts, completions, **kwargs):
            return [row[i] for row in values]

        fn.__name__ = f"r{i}"
        return fn

    return [make(i) for i in range(k)]


def completion_lists(rng, n):
    lengths = rng.integers(1, T + 1, n)
    return [list(range(5, 5 + int(n_tok))) for n_tok in lengths]


def trainer_for_generation(Trainer, values, weights, G, completions, per_token):
    """Stub trainer for `_generate_and_score_completions`; `per_token` maps the model argument to
    the per-token log-probs its `_get_per_token_logps_and_entropies` returns."""
    n = len(values)
    funcs = reward_funcs(values)
    trainer = object.__new__(Trainer)
    model = FakeModel()
    ref_model = FakeModel()

    def logps_fn(m, *args, **kwargs):
        return torch.tensor(per_token["old" if m is model else "ref"]), None, None

    trainer.__dict__.update(
        model=model,
        ref_model=ref_model,
        accelerator=fake_accelerator(),
        environment_factories=None,
        environments=None,
        tools=None,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _get_per_token_logps_and_entropies=logps_fn,
        reward_funcs=funcs,
        reward_processing_classes=[None] * len(funcs),
        reward_func_names=[f.__name__ for f in funcs],
        reward_weights=torch.tensor(weights),
        num_generations=G,
        state=SimpleNamespace(global_step=0),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
            "images": [],
        },
        _pending_extra_logs=defaultdict(list),
        _pending_metrics=defaultdict(list),
        log_multimodal=False,
        args=SimpleNamespace(
            per_device_train_batch_size=n,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
            report_to=[],
        ),
    )
    inputs = [{"prompt": f"prompt {i // G}"} for i in range(n)]
    texts = [f"completion {i}" for i in range(n)]
    return trainer, inputs, texts


def grpo_advantage_case(GRPOTrainer, rng_seed, name, scale, aggregation):
    values, weights, G = REWARDS[name]
    rng = np.random.default_rng(rng_seed)
    completions = completion_lists(rng, len(values))
    trainer, inputs, texts = trainer_for_generation(
        GRPOTrainer, values, weights, G, completions, {}
    )
    trainer.__dict__.update(beta=0.0, scale_rewards=scale, multi_objective_aggregation=aggregation)
    trainer._generate = lambda prompts: (
        [[1, 2]] * len(prompts),
        completions,
        None,
        texts,
        None,
        {},
        None,
        None,
    )
    out = GRPOTrainer._generate_and_score_completions(trainer, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return out["advantages"].numpy().copy(), metrics


def rloo_advantage_case(RLOOTrainer, rng_seed, name, beta, normalize, clip_range):
    values, weights, G = REWARDS[name]
    n = len(values)
    rng = np.random.default_rng(rng_seed)
    completions = completion_lists(rng, n)
    width = max(len(c) for c in completions)
    mask = np.array([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    old = -rng.gamma(1.5, 0.8, (n, width))
    ref = old + rng.normal(0.0, 0.6, (n, width))
    old[mask == 0] = rng.uniform(-4.0, 1.0, (mask == 0).sum())
    ref[mask == 0] = rng.uniform(-4.0, 1.0, (mask == 0).sum())
    trainer, inputs, texts = trainer_for_generation(
        RLOOTrainer, values, weights, G, completions, {"old": old, "ref": ref}
    )
    trainer.__dict__.update(beta=beta, normalize_advantages=normalize, reward_clip_range=clip_range)
    trainer._generate = lambda prompts: ([[1, 2]] * len(prompts), completions, texts)
    out = RLOOTrainer._generate_and_score_completions(trainer, inputs)
    assert np.array_equal(out["completion_mask"].numpy(), mask)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return out["advantages"].numpy().copy(), metrics, old, ref, mask


# ------------------------------------------------------------------------------ Online DPO

ODPO_PAIRS = 5
# Rewards of the 2P samples ([first samples; second samples]): a first-wins pair, a tie (the
# first is chosen), a second-wins pair, a pair whose first sample is unscorable (None -> 0 by
# nansum) and a pair decided by the missing-EOS penalty when it is set.
ODPO_REWARDS = [1.5, 0.5, -1.0, N, 0.25, 0.75, 0.5, 2.0, -0.5, 0.5]
ODPO_EOS = [True, True, True, True, False, True, False, True, True, True]


def online_dpo_inputs(rng):
    n = 2 * ODPO_PAIRS
    lengths = np.array([4, 6, 2, 5, 6, 3, 6, 1, 4, 6])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    logps = np.where(mask == 1, -rng.gamma(1.5, 0.8, (n, T)), 0.0)
    ref = np.where(mask == 1, logps + rng.normal(0.0, 0.6, (n, T)), 0.0)
    ids = np.where(mask == 1, 7, 0)
    for row, has_eos in enumerate(ODPO_EOS):
        if has_eos:
            ids[row, lengths[row] - 1] = 2  # the EOS token, kept inside the mask as TRL does
    return logps, ref, mask, ids


def online_dpo_case(OnlineDPOTrainer, logps_np, ref_np, mask_np, ids_np, cfg):
    logps = torch.tensor(logps_np, requires_grad=True)
    ref = torch.tensor(ref_np)
    model, ref_model = FakeModel(), FakeModel()
    funcs = reward_funcs([[r] for r in ODPO_REWARDS])
    trainer = object.__new__(OnlineDPOTrainer)
    trainer.__dict__.update(
        model=model,
        ref_model=ref_model,
        accelerator=SimpleNamespace(
            **vars(fake_accelerator()), backward=lambda loss, **kw: loss.backward()
        ),
        eos_token_ids=[2],
        _beta=cfg["beta"],  # `beta` is a property over `_beta` (a float or a per-epoch list)
        reward_funcs=funcs,
        reward_processing_classes=[None],
        reward_weights=None,
        processing_class=SimpleNamespace(batch_decode=lambda ids, **kw: ["text"] * len(ids)),
        state=SimpleNamespace(global_step=0),
        stats=defaultdict(list),
        args=SimpleNamespace(
            use_vllm=False,
            loss_type=cfg["loss_type"],
            missing_eos_penalty=cfg["missing_eos_penalty"],
            torch_empty_cache_steps=None,
            optim="adamw_torch",
            n_gpu=1,
            gradient_accumulation_steps=1,
        ),
    )
    mask = torch.tensor(mask_np)
    trainer._generate = lambda m, prompts, images: (
        torch.ones((2 * len(prompts), 2), dtype=torch.long),
        torch.ones((2 * len(prompts), 2), dtype=torch.long),
        torch.tensor(ids_np),
        mask,
        None,
    )
    trainer._forward = lambda m, *a: logps if m is model else ref
    inputs = {"prompt": [f"prompt {i}" for i in range(ODPO_PAIRS)]}
    loss = OnlineDPOTrainer.training_step(trainer, model, inputs)
    stats = {k: v[-1] for k, v in trainer.stats.items()}
    return float(loss), logps.grad.numpy().copy(), stats


# ------------------------------------------------------------------------------------ main


def main():
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # TRL warns on every all-None reward row (intended here)
    torch.set_default_dtype(torch.float64)
    import accelerate
    import transformers

    accelerate.PartialState()  # single CPU process: TRL's logger and gather need the state
    import trl
    from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer

    rng = np.random.default_rng(SEED)
    x = make_loss_inputs(rng)
    arrays = {f"loss_inputs/{k}": v for k, v in x.items()}
    cases = {}

    # GRPO losses: every loss type x beta x bias correction x IS level x on/off-policy.
    grid = itertools.product(
        LOSS_TYPES, (0.0, 0.04), (True, False), ("token", "sequence"), (False, True)
    )
    configs = [
        dict(
            loss_type=lt,
            beta=beta,
            use_bias_correction_kl=bias,
            importance_sampling_level=level,
            off_policy=off,
            epsilon=0.2,
            epsilon_high=0.2,
            delta=None,
        )
        for lt, beta, bias, level, off in grid
    ]
    extra = dict(beta=0.04, use_bias_correction_kl=True, off_policy=True, epsilon=0.2, delta=None)
    token, sequence = (
        dict(importance_sampling_level="token"),
        dict(importance_sampling_level="sequence"),
    )
    configs += [
        dict(extra, **token, loss_type="dapo", epsilon_high=0.28),  # DAPO's clip-higher
        dict(extra, **sequence, loss_type="grpo", epsilon_high=0.28),
        dict(extra, **token, loss_type="dapo", epsilon_high=0.2, delta=1.1),  # two-sided clip
        dict(extra, **token, loss_type="bnpo", epsilon=0.1, epsilon_high=0.3),
    ]
    rows = np.arange(B)
    for cfg in configs:
        name = "grpo/{loss_type}/beta{beta}/bias{use_bias_correction_kl:d}/".format(**cfg)
        name += cfg["importance_sampling_level"] + ("/off" if cfg["off_policy"] else "/on")
        if cfg["epsilon_high"] != 0.2 or cfg["epsilon"] != 0.2 or cfg["delta"] is not None:
            name += f"/eps{cfg['epsilon']}-{cfg['epsilon_high']}/delta{cfg['delta']}"
        loss, grad, per_token, metrics = grpo_loss_case(GRPOTrainer, x, rows, cfg)
        arrays[f"{name}/grad"] = grad
        arrays[f"{name}/per_token_loss"] = per_token
        cases[name] = dict(kind="grpo_loss", config=cfg, values=dict(metrics, loss=loss))

    # Gradient accumulation and data parallelism: 2 processes x 4 micro-steps x 2 rows, GA = 4,
    # steps_per_generation = 4. DDP averages the processes' gradients and accumulation sums the
    # micro-steps, so the optimizer sees (1/2) sum over the 8 calls.
    for lt in LOSS_TYPES:
        cfg = dict(extra, loss_type=lt, importance_sampling_level="token", epsilon_high=0.2)
        total, grad = 0.0, np.zeros((B, T))
        for call in range(8):
            chunk = np.arange(2 * call, 2 * call + 2)
            loss, g, _, _ = grpo_loss_case(
                GRPOTrainer, x, chunk, cfg, ga=4, spg=4, num_processes=2,
                num_items=x["mask"].sum(),
            )  # fmt: skip
            total += loss / 2
            grad[chunk] += g / 2
        name = f"grpo_accumulated/{lt}"
        arrays[f"{name}/grad"] = grad
        cases[name] = dict(
            kind="grpo_accumulated",
            config=cfg,
            values={"loss": total},
            layout="2 processes x 4 micro-steps x 2 consecutive rows; GA 4, steps_per_generation 4",
        )

    # RLOO losses.
    for off, eps_high in itertools.product((False, True), (0.2, 0.28)):
        cfg = dict(off_policy=off, epsilon=0.2, epsilon_high=eps_high)
        name = f"rloo/{'off' if off else 'on'}/eps_high{eps_high}"
        loss, grad, per_seq, metrics = rloo_loss_case(RLOOTrainer, x, cfg)
        arrays[f"{name}/grad"] = grad
        arrays[f"{name}/per_sequence_loss"] = per_seq
        cases[name] = dict(kind="rloo_loss", config=cfg, values=dict(metrics, loss=loss))

    # GRPO advantages.
    for i, (rname, scale, agg) in enumerate(
        itertools.product(
            REWARDS, ("group", "batch", "none"), ("sum_then_normalize", "normalize_then_sum")
        )
    ):
        if agg == "normalize_then_sum" and scale != "group":
            continue  # TRL's normalize_then_sum ignores scale_rewards
        adv, metrics = grpo_advantage_case(GRPOTrainer, SEED + i, rname, scale, agg)
        name = f"grpo_adv/{rname}/{scale}/{agg}"
        arrays[f"{name}/advantages"] = adv
        cases[name] = dict(
            kind="grpo_advantages",
            rewards=rname,
            scale_rewards=scale,
            multi_objective_aggregation=agg,
            values=metrics,
        )

    # RLOO advantages.
    rloo_grid = [
        (rname, beta, norm, None)
        for rname, beta, norm in itertools.product(REWARDS, (0.0, 0.05), (False, True))
    ] + [("k2_g4", 0.05, False, (-1.0, 1.5))]
    for i, (rname, beta, norm, clip) in enumerate(rloo_grid):
        adv, metrics, old, ref, mask = rloo_advantage_case(
            RLOOTrainer, SEED + 100 + i, rname, beta, norm, clip
        )
        name = f"rloo_adv/{rname}/beta{beta}/norm{norm:d}/clip{clip}"
        arrays[f"{name}/advantages"] = adv
        arrays[f"{name}/old_logps"] = old
        arrays[f"{name}/ref_logps"] = ref
        arrays[f"{name}/mask"] = mask
        cases[name] = dict(
            kind="rloo_advantages",
            rewards=rname,
            beta=beta,
            normalize_advantages=norm,
            reward_clip_range=clip,
            values=metrics,
        )

    for rname, (values, weights, G) in REWARDS.items():
        arrays[f"rewards/{rname}"] = np.array(
            [[np.nan if v is None else v for v in row] for row in values], np.float64
        )
        arrays[f"reward_weights/{rname}"] = np.array(weights, np.float64)
        arrays[f"num_generations/{rname}"] = np.array(G)

    # Online DPO.
    logps, ref, mask, ids = online_dpo_inputs(np.random.default_rng(SEED + 200))
    arrays.update(
        {
            "online_dpo_inputs/logps": logps,
            "online_dpo_inputs/ref_logps": ref,
            "online_dpo_inputs/mask": mask,
            "online_dpo_inputs/contains_eos": np.array(ODPO_EOS),
            "online_dpo_inputs/rewards": np.array(
                [np.nan if r is None else r for r in ODPO_REWARDS], np.float64
            ),
        }
    )
    for loss_type, beta, penalty in [
        ("sigmoid", 0.1, None),
        ("sigmoid", 0.5, 1.0),
        ("ipo", 0.1, None),
        ("ipo", 0.5, 1.0),
    ]:
        cfg = dict(loss_type=loss_type, beta=beta, missing_eos_penalty=penalty)
        loss, grad, stats = online_dpo_case(OnlineDPOTrainer, logps, ref, mask, ids, cfg)
        name = f"online_dpo/{loss_type}/beta{beta}/penalty{penalty}"
        arrays[f"{name}/grad"] = grad
        cases[name] = dict(kind="online_dpo", config=cfg, values=dict(stats, loss=loss))

    meta = {
        "generator": "tests/reference/generate_trl_online.py",
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "cases": cases,
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(
        f"wrote {OUT} ({len(cases)} cases, {OUT.stat().st_size / 1024:.0f} KB, "
        f"trl {trl.__version__}, torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
