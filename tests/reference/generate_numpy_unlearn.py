"""Fixture from the float64 NumPy derivations in numpy_unlearn.py (official GA / GradDiff / NPO /
SimNPO code as specs/online.md section 5.1-5.3 describes it), on fixed random inputs:

    python tests/reference/generate_numpy_unlearn.py      # numpy only

Inputs: F = 4 forget and R = 3 retain rows of T = 6 tokens, forget row 2 and retain row 1 of zero
length (padding rows), a retain KL that is non-zero off the mask too (so "batchmean" and "tokens"
differ), and reference log-probs close to the policy's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import numpy_unlearn as R  # noqa: E402

OUT = HERE / "fixtures" / "numpy_unlearn.npz"
SEED = 20261202
F, RR, T = 4, 3, 6

# name -> (function, keyword arguments); the functions read the inputs below
CASES = {
    "grad_ascent": ("gradient_difference", dict(retain="none")),
    "grad_diff": ("gradient_difference", dict(retain="nll", weight=1.0)),
    "grad_diff_w0.5_kl": ("gradient_difference", dict(retain="kl", weight=0.5)),
    "npo_none": ("npo", dict(beta=0.1, retain="none")),
    "npo_grad_diff": ("npo", dict(beta=0.1, npo_coeff=1.0, retain="nll", weight=1.0)),
    "npo_kl": ("npo", dict(beta=0.1, retain="kl", weight=1.0)),
    "npo_kl_batchmean": ("npo", dict(beta=0.1, retain="kl", normalization="batchmean")),
    "npo_b1.5_c0.7": ("npo", dict(beta=1.5, npo_coeff=0.7, retain="nll", weight=0.3)),
    "npo_token_mean": ("npo", dict(beta=0.1, retain="nll", delta="token_mean")),
    "simnpo_grad_diff": ("simnpo", dict(beta=2.5, gamma=0.0, npo_coeff=0.1375, retain="nll")),
    "simnpo_none": ("simnpo", dict(beta=2.5, gamma=0.0, npo_coeff=1.0, retain="none")),
    "simnpo_g0.5_kl": ("simnpo", dict(beta=1.0, gamma=0.5, npo_coeff=0.2, retain="kl")),
}


def inputs(rng):
    def mask(rows, empty):
        m = np.zeros((rows, T), np.int64)
        for i in range(rows):
            start = int(rng.integers(0, 3))
            m[i, start : start + int(rng.integers(1, T - start + 1))] = 1
        m[empty] = 0
        return m

    fm, rm = mask(F, 2), mask(RR, 1)
    f = np.where(fm != 0, -rng.gamma(2.0, 1.0, fm.shape), 0.0)
    ref_f = np.where(fm != 0, f + rng.normal(0.0, 0.5, fm.shape), 0.0)
    r = np.where(rm != 0, -rng.gamma(2.0, 1.0, rm.shape), 0.0)
    kl = rng.gamma(1.0, 0.3, rm.shape)  # non-zero off the mask: prompt / padding positions
    return dict(forget=f, ref_forget=ref_f, forget_mask=fm, retain=r, retain_mask=rm, kl=kl)


def evaluate(x, fn, kw):
    if fn == "gradient_difference":
        return R.gradient_difference(x["forget"], x["forget_mask"], x["retain"],
                                     x["retain_mask"], x["kl"], **kw)  # fmt: skip
    if fn == "npo":
        return R.npo(x["forget"], x["ref_forget"], x["forget_mask"], x["retain"],
                     x["retain_mask"], x["kl"], **kw)  # fmt: skip
    return R.simnpo(x["forget"], x["forget_mask"], x["retain"], x["retain_mask"], x["kl"], **kw)


def main():
    rng = np.random.default_rng(SEED)
    x = inputs(rng)
    arrays = {f"inputs/{k}": v for k, v in x.items()}
    for name, (fn, kw) in CASES.items():
        for k, v in evaluate(x, fn, kw).items():
            arrays[f"{name}/{k}"] = np.asarray(v, np.float64)
    meta = {
        "generator": "tests/reference/generate_numpy_unlearn.py",
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "cases": {name: {"fn": fn, **kw} for name, (fn, kw) in CASES.items()},
        "notes": "grad_forget / grad_retain are d loss / d per-token policy log-probs, "
        "grad_retain_kl d loss / d per-token retain KL; metrics/<name> the logged metrics. "
        "Empty rows are padding, left out of every mean.",
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
