"""Fixtures from TRL's XPO and Nash-MD code (float64): the losses, the logged statistics and the
geometric mixture's next-token distribution.

Neither trainer is in the trl 1.16 wheel; the parity target (specs/online.md sections 1.2-1.3) is
TRL's git snapshot huggingface/trl @ f2cd57710ae345ea6428ae95363267fcf38a3dc8. Its methods'
source text is extracted once into `fixtures/trl_snapshot_xpo_nash.json` (`--extract`, from a
clone of the repository) and committed, so this generator runs without network or git:

    XPOTrainer._compute_rewards, _compute_losses (L305), _log_statistics
    NashMDTrainer._compute_rewards, _compute_losses (L367), _log_statistics
    GeometricMixtureWrapper.forward (L48)
    the lines of each `training_step` that turn the scores into the loss's input:
    `chosen_mask = model_scores >= ref_scores` (XPO) and
    `probability = F.sigmoid(model_scores - mixture_scores)` (Nash-MD)

Each method's text is executed (`exec`, dedented) in a namespace holding what its module
imports (`torch`, `F`, and `get_reward` stubbed to return fixed scores), and called unbound on a
stub trainer (`SimpleNamespace` with `beta`, `alpha` / `mixture_coef`, `args.loss_type`,
`args.missing_eos_penalty`, `stats`, an identity `accelerator.gather_for_metrics`, the
`processing_class` EOS / pad ids). The per-token log-probs are float64 leaves, so torch
autograd gives d loss / d logps. TRL zeroes the pad positions (`masked_fill`) before
`_compute_losses`: the fixture's log-probs are 0 there and its gradients are multiplied by the
mask (the gradient `masked_fill` lets through in TRL's own pipeline).

Inputs: P = 8 prompts, T = 6 completion tokens, ragged masks (one empty completion of each
kind), policy / reference log-probs of the policy's sample y and of the opponent y' (the
reference's sample in XPO, the mixture's in Nash-MD); scores with both branches of
`torch.where` (y chosen, y' chosen), a tie (y chosen: `>=`) and a pair decided by the
missing-EOS penalty when it is set. Prompts hold no EOS token (TRL's penalty looks for the EOS
id anywhere in prompt + completion). Cases: XPO sigmoid / ipo x (beta, alpha, penalty) and
alpha = 0; Nash-MD beta 0.1 / 0.5 (with the penalty) / 0; the mixture at c in {0, 0.25, 0.5, 1}.

Layout: inputs under `xpo_inputs/`, `nash_inputs/`, `mixture/`; per case `<case>/grad_*`;
`meta_json` holds each case's config and scalar results (`values`: the loss and every stat TRL
logged; JSON floats round-trip exactly), the snapshot commit and the extracted source.

Run with torch==2.13.0 (CPU), from the repository root:
    /tmp/ref/bin/python tests/reference/generate_trl_xpo_nash.py
    # re-extract the sources first (a clone or bare mirror of huggingface/trl):
    /tmp/ref/bin/python tests/reference/generate_trl_xpo_nash.py --extract /path/to/trl.git
It rewrites tests/reference/fixtures/trl_xpo_nash.npz (~20 KB).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "trl_xpo_nash.npz"
SOURCES = HERE / "fixtures" / "trl_snapshot_xpo_nash.json"
COMMIT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"
FILES = {
    "xpo": "trl/experimental/xpo/xpo_trainer.py",
    "nash_md": "trl/experimental/nash_md/nash_md_trainer.py",
}
METHODS = {  # key -> (file, class, method)
    "xpo_compute_rewards": ("xpo", "XPOTrainer", "_compute_rewards"),
    "xpo_compute_losses": ("xpo", "XPOTrainer", "_compute_losses"),
    "xpo_log_statistics": ("xpo", "XPOTrainer", "_log_statistics"),
    "nash_compute_rewards": ("nash_md", "NashMDTrainer", "_compute_rewards"),
    "nash_compute_losses": ("nash_md", "NashMDTrainer", "_compute_losses"),
    "nash_log_statistics": ("nash_md", "NashMDTrainer", "_log_statistics"),
    "mixture_forward": ("nash_md", "GeometricMixtureWrapper", "forward"),
}
STEP_LINES = {  # the training_step lines between the scores and the loss
    "xpo_chosen_mask": ("xpo", "XPOTrainer", "chosen_mask = model_scores >= ref_scores"),
    "nash_probability": (
        "nash_md",
        "NashMDTrainer",
        "probability = F.sigmoid(model_scores - mixture_scores)",
    ),
}
SEED = 20261216
P, T = 8, 6
CONTEXT = 3  # prompt tokens before the completion
EOS, PAD, TOKEN = 2, 0, 7

# ----------------------------------------------------------------------------- extraction


def extract(git_dir: str) -> None:
    """Write SOURCES: each method's text (decorators included) from the snapshot commit."""
    found = {}
    texts = {
        key: subprocess.run(
            ["git", "--git-dir", git_dir, "show", f"{COMMIT}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for key, path in FILES.items()
    }
    for key, (file, cls, name) in {**METHODS}.items():
        lines = texts[file].splitlines()
        tree = ast.parse(texts[file])
        node = next(
            f
            for c in tree.body
            if isinstance(c, ast.ClassDef) and c.name == cls
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name == name
        )
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        found[key] = dict(
            path=FILES[file],
            qualname=f"{cls}.{name}",
            lines=[start, node.end_lineno],
            source="\n".join(lines[start - 1 : node.end_lineno]) + "\n",
        )
    for key, (file, cls, line) in STEP_LINES.items():
        tree = ast.parse(texts[file])
        node = next(
            f
            for c in tree.body
            if isinstance(c, ast.ClassDef) and c.name == cls
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name == "training_step"
        )
        body = texts[file].splitlines()[node.lineno - 1 : node.end_lineno]
        hits = [node.lineno + i for i, text in enumerate(body) if text.strip() == line]
        assert len(hits) == 1, (key, hits)
        found[key] = dict(path=FILES[file], qualname=f"{cls}.training_step", lines=[hits[0]] * 2,
                          source=line + "\n")  # fmt: skip
    record = {
        "note": "source text of TRL methods, extracted verbatim by generate_trl_xpo_nash.py "
        "--extract (Apache-2.0, (c) the HuggingFace Team); data for the fixture generator",
        "repository": "huggingface/trl",
        "commit": COMMIT,
        "sources": found,
    }
    SOURCES.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {SOURCES} ({len(found)} sources)")


def load_sources() -> dict:
    record = json.loads(SOURCES.read_text())
    assert record["commit"] == COMMIT
    return record["sources"]


def compile_method(src: dict, namespace: dict):
    """The method's function, defined in `namespace` (its module's names)."""
    local: dict = {}
    exec(textwrap.dedent(src["source"]), namespace, local)
    (fn,) = local.values()
    return fn


# ----------------------------------------------------------------------------- inputs

# Scores of [policy samples; opponent samples], pair by pair: y wins, a tie (y chosen), y' wins
# (twice; y of pair 3 is empty), the penalty decides (y has no EOS), y wins (y' empty), y' wins,
# y wins (y' has no EOS).
SCORES_Y = [1.5, 0.5, -1.0, 0.25, 0.75, 2.0, -0.5, 1.0]
SCORES_OPP = [0.5, 0.5, 0.0, 1.25, 0.5, -1.0, 0.5, 0.75]
EOS_Y = [True, True, False, False, False, True, True, True]
EOS_OPP = [True, False, True, True, True, False, True, False]
LENGTHS_Y = [4, 6, 2, 0, 6, 3, 5, 1]
LENGTHS_OPP = [5, 3, 6, 2, 4, 0, 6, 6]


def completion(lengths, eos, rng):
    """Per-token log-probs pair (policy, reference), mask and the completion ids."""
    lengths = np.asarray(lengths)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    logps = np.where(mask == 1, -rng.gamma(1.5, 0.8, (P, T)), 0.0)
    ref = np.where(mask == 1, logps + rng.normal(0.0, 0.6, (P, T)), 0.0)
    ids = np.where(mask == 1, TOKEN, PAD)
    for row, has_eos in enumerate(eos):
        if has_eos:
            assert lengths[row] > 0
            ids[row, lengths[row] - 1] = EOS  # kept inside the mask, as truncate_right does
    return logps, ref, mask, ids


def data_dict(torch, ids, mask):
    prompt = torch.full((P, CONTEXT), TOKEN, dtype=torch.long)
    return {
        "input_ids": torch.cat([prompt, torch.tensor(ids)], 1),
        "attention_mask": torch.cat([torch.ones_like(prompt), torch.tensor(mask)], 1),
        "raw": [f"prompt {i}" for i in range(P)],
    }


def stub(cfg, mixture_coef=None):
    return SimpleNamespace(
        beta=cfg["beta"],
        alpha=cfg.get("alpha"),
        mixture_coef=mixture_coef,
        args=SimpleNamespace(loss_type=cfg.get("loss_type"),
                             missing_eos_penalty=cfg["missing_eos_penalty"]),
        stats=defaultdict(list),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x),
        processing_class=SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD),
        reward_funcs=object(),
    )  # fmt: skip


def scores_namespace(torch, F, model_data, opp_data):
    """Module names for `_compute_rewards`: `get_reward` returns the fixed scores of the data
    it is given (a fresh tensor: TRL subtracts the penalty in place)."""
    table = {id(model_data["input_ids"]): SCORES_Y, id(opp_data["input_ids"]): SCORES_OPP}

    def get_reward(model, query_responses, pad_token_id, context_length):
        assert pad_token_id == PAD and context_length == CONTEXT
        return None, torch.tensor(table[id(query_responses)], dtype=torch.float64), None

    return {"torch": torch, "F": F, "get_reward": get_reward}


def xpo_case(torch, F, src, x, cfg):
    model_data = data_dict(torch, x["ids_y"], x["mask_y"])
    ref_data = data_dict(torch, x["ids_opp"], x["mask_opp"])
    ns = scores_namespace(torch, F, model_data, ref_data)
    trainer = stub(cfg)
    model_scores, ref_scores = compile_method(src["xpo_compute_rewards"], ns)(
        trainer, model_data, ref_data, CONTEXT
    )
    local = {"model_scores": model_scores, "ref_scores": ref_scores}
    exec(src["xpo_chosen_mask"]["source"], ns, local)
    chosen_mask = local["chosen_mask"]
    # TRL's argument order: policy on y, policy on y', reference on y', reference on y
    leaves = {k: torch.tensor(x[k], requires_grad=True) for k in ("logps_y", "logps_opp")}
    ref_opp, ref_y = torch.tensor(x["ref_opp"]), torch.tensor(x["ref_y"])
    loss, dpo, xpo = compile_method(src["xpo_compute_losses"], ns)(
        trainer, leaves["logps_y"], leaves["logps_opp"], ref_opp, ref_y, chosen_mask
    )
    loss.backward()
    compile_method(src["xpo_log_statistics"], ns)(
        trainer, model_data, ref_data, leaves["logps_y"].detach(), leaves["logps_opp"].detach(),
        ref_opp, ref_y, chosen_mask, dpo.detach(), xpo.detach(), CONTEXT, model_scores,
        ref_scores,
    )  # fmt: skip
    values = {k: v[-1] for k, v in trainer.stats.items()}
    values["loss"] = float(loss.detach())
    grads = {k: (v.grad.numpy() * x[k.replace("logps", "mask")]) for k, v in leaves.items()}
    scores = np.concatenate([model_scores.numpy(), ref_scores.numpy()])
    extra = dict(chosen_mask=chosen_mask.numpy(), scores=scores, dpo=dpo.detach().numpy(),
                 xpo=xpo.detach().numpy())  # fmt: skip
    return values, grads, extra


def nash_case(torch, F, src, x, cfg):
    model_data = data_dict(torch, x["ids_y"], x["mask_y"])
    mixture_data = data_dict(torch, x["ids_opp"], x["mask_opp"])
    ns = scores_namespace(torch, F, model_data, mixture_data)
    trainer = stub(cfg, mixture_coef=cfg["mixture_coef"])
    model_scores, mixture_scores = compile_method(src["nash_compute_rewards"], ns)(
        trainer, model_data, mixture_data, CONTEXT
    )
    local = {"model_scores": model_scores, "mixture_scores": mixture_scores}
    exec(src["nash_probability"]["source"], ns, local)
    probability = local["probability"]
    logps = torch.tensor(x["logps_y"], requires_grad=True)
    ref = torch.tensor(x["ref_y"])
    loss, score, kl = compile_method(src["nash_compute_losses"], ns)(
        trainer, logps, ref, probability
    )
    loss.backward()
    compile_method(src["nash_log_statistics"], ns)(
        trainer, model_data, mixture_data, logps.detach(), ref, probability, score.detach(),
        kl.detach(), CONTEXT, model_scores, mixture_scores,
    )  # fmt: skip
    values = {k: v[-1] for k, v in trainer.stats.items()}
    values["loss"] = float(loss.detach())
    extra = dict(probability=probability.numpy(), score=score.detach().numpy(), kl=kl.numpy())
    return values, {"logps_y": logps.grad.numpy() * x["mask_y"]}, extra


def mixture_case(torch, src, policy_logits, ref_logits, coef):
    forward = compile_method(src["mixture_forward"], {"torch": torch})
    wrapper = SimpleNamespace(
        model=lambda *a, **k: SimpleNamespace(logits=torch.tensor(policy_logits)),
        ref_model=lambda *a, **k: SimpleNamespace(logits=torch.tensor(ref_logits)),
        mixture_coef=coef,
    )
    return forward(wrapper, None).logits.numpy()


# ----------------------------------------------------------------------------- main


def main():
    import torch
    import torch.nn.functional as F

    torch.set_default_dtype(torch.float64)
    src = load_sources()
    rng = np.random.default_rng(SEED)
    x = {}
    for side, lengths, eos in (("y", LENGTHS_Y, EOS_Y), ("opp", LENGTHS_OPP, EOS_OPP)):
        logps, ref, mask, ids = completion(lengths, eos, rng)
        x.update({f"logps_{side}": logps, f"ref_{side}": ref, f"mask_{side}": mask,
                  f"ids_{side}": ids})  # fmt: skip
    arrays = {f"inputs/{k}": v for k, v in x.items()}
    arrays.update({
        "inputs/scores_y": np.array(SCORES_Y), "inputs/scores_opp": np.array(SCORES_OPP),
        "inputs/eos_y": np.array(EOS_Y), "inputs/eos_opp": np.array(EOS_OPP),
    })  # fmt: skip
    cases = {}
    for loss_type, beta, alpha, penalty in [
        ("sigmoid", 0.1, 1e-5, None),
        ("sigmoid", 0.5, 0.3, 1.0),
        ("ipo", 0.1, 1e-5, None),
        ("ipo", 0.5, 0.3, 1.0),
        ("sigmoid", 0.1, 0.0, None),
        ("ipo", 0.5, 0.0, 1.0),
    ]:
        cfg = dict(loss_type=loss_type, beta=beta, alpha=alpha, missing_eos_penalty=penalty)
        values, grads, extra = xpo_case(torch, F, src, x, cfg)
        name = f"xpo/{loss_type}/beta{beta}/alpha{alpha}/penalty{penalty}"
        arrays.update({f"{name}/grad_{k.split('_')[1]}": g for k, g in grads.items()})
        arrays.update({f"{name}/{k}": v for k, v in extra.items()})
        cases[name] = dict(kind="xpo", config=cfg, values=values)
    for beta, penalty in [(0.1, None), (0.5, 1.0), (0.0, None)]:
        cfg = dict(beta=beta, missing_eos_penalty=penalty, mixture_coef=0.5)
        values, grads, extra = nash_case(torch, F, src, x, cfg)
        name = f"nash_md/beta{beta}/penalty{penalty}"
        arrays[f"{name}/grad_y"] = grads["logps_y"]
        arrays.update({f"{name}/{k}": v for k, v in extra.items()})
        cases[name] = dict(kind="nash_md", config=cfg, values=values)
    policy_logits = rng.normal(0.0, 2.0, (3, 7))
    ref_logits = rng.normal(0.0, 2.0, (3, 7))
    ref_logits[0, 2] = -40.0  # a token the reference all but rules out
    arrays["mixture/policy_logits"], arrays["mixture/ref_logits"] = policy_logits, ref_logits
    for coef in (0.0, 0.25, 0.5, 1.0):
        arrays[f"mixture/logps/{coef}"] = mixture_case(torch, src, policy_logits, ref_logits, coef)

    digest = hashlib.sha256(SOURCES.read_bytes()).hexdigest()
    meta = {
        "generator": "tests/reference/generate_trl_xpo_nash.py",
        "trl_commit": COMMIT,
        "sources_sha256": digest,
        "sources": src,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "cases": cases,
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(cases)} cases, {OUT.stat().st_size / 1024:.0f} KB, "
          f"torch {torch.__version__}, trl @ {COMMIT[:8]})")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extract", metavar="GIT_DIR", help="re-extract the TRL sources first")
    args = parser.parse_args()
    if args.extract:
        extract(args.extract)
    main()
    sys.exit(0)
