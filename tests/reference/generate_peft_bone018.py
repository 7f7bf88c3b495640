"""Fixtures for the original `BoneConfig` (Bone default and "bat") from `peft==0.18.1`, float64.

PEFT 0.19.0 removed `BoneConfig` (MiSS replaced it; `scripts/convert-bone-to-miss.py` only renames
`.bone_` to `.miss_`), so this runs in its own environment:

    python3 -m venv /tmp/ref0181 && /tmp/ref0181/bin/pip install torch==2.13.0 && \
        /tmp/ref0181/bin/pip install peft==0.18.1 transformers numpy safetensors
    /tmp/ref0181/bin/python tests/reference/generate_peft_bone018.py

It reuses `generate_peft.py`'s model, base weights, inputs and fill (the `bone_block` values are
drawn with the tags of the MiSS cases, so `bone` has the values of `miss` and `bone_bat` those of
`miss_bat` in `fixtures/peft.npz`), and writes `fixtures/peft_bone018.npz` plus a genuine Bone
adapter directory `fixtures/peft_adapters/bone` (legacy `.bone_block` names, peft_type "BONE").
If `fixtures/peft.npz` exists the MiSS results are compared with these (meta `vs_miss`): all
bit-identical except the "bat" unmerge, which Bone does in float64 and MiSS in float32.

Keys: `base/block/...`, `inputs/block/...` (as in peft.npz); per case (`bone`, `bone_bat`):
`<case>/state/<saved name>` (e.g. `bone/state/base_model.model.q_proj.bone_block`),
`<case>/<module>/{out,merged_weight,unmerged_weight}`, `<case>/model_out`;
`bone_bat/out_proj/error` (the ValueError message for in_features=10, r=4).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_peft as gp  # noqa: E402

OUT = gp.HERE / "fixtures" / "peft_bone018.npz"


def main():
    import peft
    from peft import BoneConfig, get_peft_model

    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    arrays = {**gp.base_arrays("block"), **gp.input_arrays("block")}
    inputs = dict(arrays)
    meta = {
        "generator": "tests/reference/generate_peft_bone018.py",
        "peft": peft.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": gp.SEED,
        "dtype": "float64",
        "fill": "bone_block = the N(0, 0.1^2) values of the matching MiSS case of generate_peft.py",
        "modules": {m: {"in": i, "out": o, "bias": b} for m, (i, o, b) in gp.BLOCK.items()},
        "N": gp.N,
        "cases": {},
    }
    every = list(gp.BLOCK)
    cases = {
        "bone": (dict(r=gp.R), every, "miss"),
        "bone_bat": (
            dict(r=gp.R, init_weights="bat"),
            ["q_proj", "v_proj", "up", "down"],
            "miss_bat",
        ),
    }
    for case, (kwargs, targets, fill_tag) in cases.items():
        torch.manual_seed(gp.SEED)
        pm = get_peft_model(
            gp.build_base("block", inputs), BoneConfig(target_modules=list(targets), **kwargs)
        )
        gp.fill_adapter(pm, fill_tag)
        entry = {
            "config": gp.config_dict(pm.peft_config["default"]),
            "targets": targets,
            "fill_tag": fill_tag,
            "params": gp.param_listing(pm),
        }
        entry["saved"] = gp.record_state(arrays, case, pm)
        gp.record_outputs(arrays, case, pm, "block", targets, inputs)
        if case == "bone":
            gp.save_adapter(pm, "bone")
            entry["adapter_dir"] = "fixtures/peft_adapters/bone"
        entry["merge"] = gp.record_merge(arrays, case, pm, "block", targets, inputs)
        meta["cases"][case] = entry
    try:
        get_peft_model(
            gp.build_base("block", inputs),
            BoneConfig(r=gp.R, init_weights="bat", target_modules=["out_proj"]),
        )
        raise AssertionError("bat on out_proj did not raise")
    except ValueError as exc:
        arrays["bone_bat/out_proj/error"] = np.array(str(exc))
        meta["cases"]["bone_bat"]["error_out_proj"] = {
            "type": type(exc).__name__,
            "message": str(exc),
        }

    # round trip through PeftModel.from_pretrained, and the comparison with MiSS (peft 0.21.2)
    np.savez_compressed(OUT, **arrays)
    res = gp.load_and_run(gp.ADAPTERS / "bone", OUT)
    err = max(float(np.abs(res[f"out/{m}"] - arrays[f"bone/{m}/out"]).max()) for m in every)
    assert err < 1e-12, err
    meta["round_trip"] = {"bone": {"max_abs_err": err, "base": "block"}}
    if gp.OUT.exists():
        with np.load(gp.OUT) as f:
            miss = {k: f[k] for k in f.files}
        vs = {}
        for case, (_, targets, fill_tag) in cases.items():
            diffs = {}
            for m in targets:
                for what in ("out", "merged_weight", "unmerged_weight"):
                    diffs[f"{m}/{what}"] = float(
                        np.abs(arrays[f"{case}/{m}/{what}"] - miss[f"{fill_tag}/{m}/{what}"]).max()
                    )
            diffs["model_out"] = float(
                np.abs(arrays[f"{case}/model_out"] - miss[f"{fill_tag}/model_out"]).max()
            )
            for name in meta["cases"][case]["saved"]:
                diffs[f"state/{name}"] = float(
                    np.abs(
                        arrays[f"{case}/state/{name}"]
                        - miss[f"{fill_tag}/state/{name.replace('.bone_', '.miss_')}"]
                    ).max()
                )
            unm = [v for k, v in diffs.items() if k.endswith("unmerged_weight")]
            rest = [v for k, v in diffs.items() if not k.endswith("unmerged_weight")]
            vs[case] = {
                "against": fill_tag,
                "max_abs_diff_except_unmerged": max(rest),
                "unmerged_weight_max_abs_diff": max(unm),
                "miss_peft": json.loads(str(miss["meta_json"]))["peft"],
            }
        meta["vs_miss"] = vs
    meta["notes"] = [
        "Saved names: 'base_model.model.<module>.bone_block' (in memory 'bone_block.default'); "
        "MiSS uses 'miss_block'. Shapes: default (r, out), bat (out // r, r, r).",
        "BoneConfig 0.18.1 has no r <= in_features check and no dropout; MiSS 0.21.2 adds both.",
        "bat unmerge: Bone 0.18.1 inverts torch.eye(r) (default dtype) + B, i.e. in float64 "
        "here, so merge -> unmerge is exact (~1e-16); MiSS 0.21.2 forces float32 "
        "(eye(dtype=float32) + B.float()) and restores W only to ~3e-8. Outputs, merged weights "
        "and saved values are bit-identical to MiSS; only bone_bat/*/unmerged_weight differs "
        "(meta vs_miss).",
    ]
    arrays["meta_json"] = np.array(json.dumps(meta, sort_keys=True, default=gp.jsonable))
    np.savez_compressed(OUT, **arrays)
    print(
        f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays; "
        f"peft {peft.__version__}) and "
        f"{gp.ADAPTERS / 'bone'}; vs MiSS: {meta.get('vs_miss')}"
    )


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # deterministic set order in adapter_config.json
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    main()
