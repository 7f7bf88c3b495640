"""Fixture from the float64 NumPy derivations in numpy_token.py (official SPPO / TDPO / SparsePO /
MaPO / Qi et al. formulas), on fixed random inputs:

    python tests/reference/generate_numpy_token.py      # numpy only

Inputs include a zero-length completion (row 2 of the rejected side) and exact zeros in the
SparsePO masks, so the empty-row and sparsity paths are part of the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import numpy_token as R  # noqa: E402

OUT = HERE / "fixtures" / "numpy_token.npz"
SEED = 20261125
B, T = 5, 7
SPPO_CASES = {"sppo_beta0.001": 1e-3, "sppo_beta0.1": 0.1}
TDPO_CASES = {
    "tdpo1": dict(version=1, beta=0.1, alpha=0.5),
    "tdpo2": dict(version=2, beta=0.1, alpha=0.5),
    "tdpo2_b0.8_a0.2": dict(version=2, beta=0.8, alpha=0.2),
}
SPARSEPO_CASES = {
    "sparsepo_common": dict(beta=0.8, l1_reward=0.0, l1_kl=0.0, independent=False),
    "sparsepo_common_l1": dict(beta=0.8, l1_reward=1e-3, l1_kl=0.0, independent=False),
    "sparsepo_indp_l1": dict(beta=0.5, l1_reward=1e-3, l1_kl=2e-3, independent=True),
}
QI_CASES = {
    "qi_default": dict(beta=0.1, first_token_factor=5.0, bias_factor=20.0, bias_length=5),
    "qi_b0.5": dict(beta=0.5, first_token_factor=2.0, bias_factor=4.0, bias_length=3),
}


def inputs(rng):
    m = np.zeros((2 * B, T), np.int64)
    for row in range(2 * B):
        start = int(rng.integers(0, 3))
        m[row, start : start + int(rng.integers(1, T - start + 1))] = 1
    m[B + 2] = 0  # a zero-length rejected completion
    pol = np.where(m != 0, -rng.gamma(2.0, 1.0, m.shape), 0.0)
    ref = np.where(m != 0, pol + rng.normal(0.0, 0.5, m.shape), 0.0)
    kl = np.where(m != 0, rng.gamma(1.0, 0.3, m.shape), 0.0)
    reward_mask = np.maximum(rng.normal(0.5, 0.5, m.shape), 0.0)  # ~16% exact zeros
    kl_mask = np.maximum(rng.normal(0.5, 0.5, m.shape), 0.0)
    return dict(
        m=m,
        pol=pol,
        ref=ref,
        kl=kl,
        reward_mask=reward_mask,
        kl_mask=kl_mask,
        chosen_win_prob=rng.uniform(0.3, 1.0, B),
        rejected_win_prob=rng.uniform(0.0, 0.6, B),
        win_prob=rng.uniform(0.4, 1.0, B),
        scores=rng.normal(0.0, 2.0, (4, 5)),
        mlp=np.stack([rng.standard_normal((2 * B, T, 3)) for _ in range(2)]),
        attn=rng.standard_normal((2 * B, T, 2, 4)),
    )


def main():
    rng = np.random.default_rng(SEED)
    x = inputs(rng)
    arrays = {f"inputs/{k}": v for k, v in x.items()}
    w, l = slice(0, B), slice(B, 2 * B)
    side = lambda k: (x[k][w], x[k][l])  # noqa: E731
    pol, ref, kl, m = side("pol"), side("ref"), side("kl"), side("m")

    def put(name, out):
        for k, v in out.items():
            arrays[f"{name}/{k}"] = np.asarray(v)

    for name, beta in SPPO_CASES.items():
        put(name, R.sppo(*pol, *ref, *m, x["chosen_win_prob"], x["rejected_win_prob"], beta))
        put(f"{name}_single", R.sppo_single(*pol, *ref, *m, x["win_prob"], beta))
    put("win_probabilities", R.win_probabilities(x["scores"]))
    for name, c in TDPO_CASES.items():
        put(name, R.tdpo(*pol, *ref, *kl, *m, c["beta"], c["alpha"], c["version"]))
    for name, c in SPARSEPO_CASES.items():
        mu = side("reward_mask")
        md = side("kl_mask") if c["independent"] else mu
        put(name, R.sparsepo(*pol, *ref, *kl, *m, *mu, *md, c["beta"], c["l1_reward"], c["l1_kl"]))
    mapo_mask = R.mapo_mask([list(x["mlp"]), [x["attn"]]], x["m"])
    arrays["mapo/mask"] = mapo_mask
    mm = (mapo_mask[w], mapo_mask[l])
    for beta in (0.1, 0.5):
        out = R.sparsepo(*pol, *ref, *kl, *m, *mm, *mm, beta, 0.0, 0.0)
        out.pop("sparsity")
        put(f"mapo_beta{beta}", out)
    for name, c in QI_CASES.items():
        args = (c["beta"], c["first_token_factor"], c["bias_factor"], c["bias_length"])
        put(name, R.token_constrained_sft(pol[0], ref[0], m[0], *args))
    meta = {
        "generator": "tests/reference/generate_numpy_token.py",
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "B": B,
        "cases": {
            "sppo": SPPO_CASES,
            "tdpo": TDPO_CASES,
            "sparsepo": SPARSEPO_CASES,
            "qi": QI_CASES,
            "mapo": {"mapo_beta0.1": 0.1, "mapo_beta0.5": 0.5},
        },
        "notes": "Per-token arrays stack [chosen; rejected] rows; grad_w / grad_l are d(sum of "
        "per-pair losses) / d(per-token policy log-probs); Qi grads are of the token-mean.",
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
