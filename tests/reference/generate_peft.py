"""Fixtures for LoRA (+ rsLoRA, lora_bias, DoRA, gaussian and PiSSA init), MiSS (default,
"bat", "mini") and AdaLoRA (forward, merge, a 12-step RankAllocator run) from PyPI
`peft==0.21.2`, float64.

    pip install torch==2.13.0 peft==0.21.2 "transformers>=5,<6" numpy safetensors  # [ref] extra
    python tests/reference/generate_peft.py

It writes `fixtures/peft.npz` and three genuine PEFT adapter directories under
`fixtures/peft_adapters/{lora,miss,adalora}` (PeftModel.save_pretrained of the same models; the
README.md model card it also writes is deleted). The script re-executes itself with
PYTHONHASHSEED=0 so that `target_modules` (a set inside PEFT) is written to adapter_config.json in
the same order on every run.

Reverse direction (PEFT loads an adapter directory, e.g. one exported by alignjax, on the same base
model and runs it):

    python tests/reference/generate_peft.py --load-adapter DIR --out FILE.npz \
        [--base-weights tests/reference/fixtures/peft.npz] [--inputs FILE.npz] [--base block|adanet]

Models. `TinyBlock` has five nn.Linear modules named like a transformer block: `q_proj` 12->8
(bias), `v_proj` 12->12, `up` 12->20 (bias), `down` 20->12, `out_proj` 10->12 (bias). With r=4
the first four divide into [4, 4] blocks (Bat works); `out_proj` has in=10, the non-divisible
case for MiSS default (zero padding) and the case where "bat" raises. `AdaNet` (l1 8->6 (bias),
l2 6->6, l3 6->8 (bias)) is the model of the AdaLoRA schedule run. Base weights, inputs and every
adapter value come from NumPy generators seeded by (SEED, crc32(tag)); PEFT's own inits (B = 0,
E = 0, ...) are overwritten by N(0, 0.1^2) values after `get_peft_model` (DoRA's magnitude: its
init times 1 + N(0, 0.1^2)), except in the init-check cases. Every adapted layer is called
directly on its own input `inputs/block/x/<module>` [5, in]; the whole block runs on
`inputs/block/x_model` [5, 12].

Cases (r=4, lora_alpha=8 unless stated): lora (all five), lora_rslora, lora_bias, dora, miss (all
five, incl. in=10), miss_bat (+ the error for out_proj), miss_mini (mini_r=2), adalora (init_r=6,
target_r=3, tinit=2, tfinal=3, total_step=12), lora_pissa (init only), init_stats, adalora_train.

Keys (torch layout throughout: weight (out, in), lora_A (r, in), lora_B (out, r)):
* `base/{block,adanet}/<module>/{weight,bias}`, `inputs/{block,adanet}/x/<module>`, `.../x_model`.
* per case: `<case>/state/<saved name>` (values under the names of `get_peft_model_state_dict`,
  adapter name stripped), `<case>/<module>/out`, `<case>/model_out`, `<case>/<module>/merged_weight`
  (`layer.merge()`; checked against `merge_and_unload()`), `merged_bias` where the bias changes,
  `unmerged_weight` (merge then unmerge). In-memory names and shapes are in meta_json.
* `init_stats/<case>/<stat>`: init statistics on a 512 -> 64 linear.
* `adalora_train/...`: see `adalora_train()`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "peft.npz"
ADAPTERS = HERE / "fixtures" / "peft_adapters"
SEED = 20261201
N = 5
FILL_STD = 0.1
R = 4
ALPHA = 8

# name: (in_features, out_features, bias)
BLOCK = {
    "q_proj": (12, 8, True),
    "v_proj": (12, 12, False),
    "up": (12, 20, True),
    "down": (20, 12, False),
    "out_proj": (10, 12, True),
}
ADANET = {"l1": (8, 6, True), "l2": (6, 6, False), "l3": (6, 8, True)}
BASES = {"block": BLOCK, "adanet": ADANET}

ADALORA = dict(
    init_r=6,
    target_r=3,
    lora_alpha=8,
    tinit=2,
    tfinal=3,
    deltaT=1,
    total_step=12,
    beta1=0.85,
    beta2=0.85,
    orth_reg_weight=0.5,
)
ADALORA_LR = 0.1


class TinyBlock(nn.Module):
    """h = x + v(x); h = h + down(tanh(up(h))); y = out_proj(cat(q_proj(h), h[:, :2]))."""

    def __init__(self):
        super().__init__()
        for name, (fin, fout, bias) in BLOCK.items():
            setattr(self, name, nn.Linear(fin, fout, bias=bias))

    def forward(self, x):
        h = x + self.v_proj(x)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.out_proj(torch.cat([self.q_proj(h), h[..., :2]], dim=-1))


class AdaNet(nn.Module):
    """y = l3(tanh(l2(tanh(l1(x))))); with labels also .loss = MSE (AdaLoraModel adds orth-reg)."""

    def __init__(self):
        super().__init__()
        for name, (fin, fout, bias) in ADANET.items():
            setattr(self, name, nn.Linear(fin, fout, bias=bias))

    def forward(self, x, labels=None):
        y = self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))
        if labels is None:
            return SimpleNamespace(logits=y, loss=None)
        mse = torch.mean((y - labels) ** 2)
        # `loss` is increased in place by AdaLoraModel.forward; `mse` keeps the plain data term.
        return SimpleNamespace(logits=y, loss=mse.clone(), mse=mse.detach().clone())


MODELS = {"block": TinyBlock, "adanet": AdaNet}


def tag_rng(tag: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(tag.encode())])


def base_arrays(kind: str) -> dict[str, np.ndarray]:
    out = {}
    for name, (fin, fout, bias) in BASES[kind].items():
        rng = tag_rng(f"base/{kind}/{name}")
        out[f"base/{kind}/{name}/weight"] = rng.uniform(-1, 1, (fout, fin)) / np.sqrt(fin)
        if bias:
            out[f"base/{kind}/{name}/bias"] = rng.uniform(-1, 1, fout) / np.sqrt(fin)
    return out


def input_arrays(kind: str) -> dict[str, np.ndarray]:
    out = {}
    for name, (fin, _, _) in BASES[kind].items():
        out[f"inputs/{kind}/x/{name}"] = tag_rng(f"inputs/{kind}/{name}").normal(size=(N, fin))
    first = next(iter(BASES[kind].values()))[0]
    out[f"inputs/{kind}/x_model"] = tag_rng(f"inputs/{kind}/model").normal(size=(N, first))
    return out


def build_base(kind: str, arrays: dict[str, np.ndarray]) -> nn.Module:
    model = MODELS[kind]()
    with torch.no_grad():
        for name, (_, _, bias) in BASES[kind].items():
            layer = getattr(model, name)
            layer.weight.copy_(torch.from_numpy(np.asarray(arrays[f"base/{kind}/{name}/weight"])))
            if bias:
                layer.bias.copy_(torch.from_numpy(np.asarray(arrays[f"base/{kind}/{name}/bias"])))
    return model


def split_name(name: str, adapter: str = "default") -> tuple[str, str]:
    """'base_model.model.q_proj.lora_A.default.weight' -> ('q_proj', 'lora_A.weight')."""
    head, tail = name.split(f".{adapter}", 1)
    path = head.removeprefix("base_model.model.")
    module, attr = path.rsplit(".", 1)
    return module, attr + tail


def normalise_role(role: str) -> str:
    # Bone (peft <= 0.18.1) and MiSS share the fill values: `bone_block` is `miss_block` renamed.
    return role.replace("bone_", "miss_")


def fill_adapter(pm, fill_tag: str) -> None:
    """Overwrite every trainable adapter parameter with N(0, FILL_STD^2), tag-seeded."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            module, role = split_name(name)
            rng = tag_rng(f"fill/{fill_tag}/{module}/{normalise_role(role)}")
            noise = rng.normal(0.0, FILL_STD, tuple(p.shape))
            if role.startswith("lora_magnitude_vector"):
                p.mul_(torch.from_numpy(1.0 + noise))
            else:
                p.copy_(torch.from_numpy(noise))


def jsonable(obj):
    if isinstance(obj, set):
        return sorted(obj)
    if hasattr(obj, "value"):  # enums (PeftType, TaskType)
        return obj.value
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=jsonable, sort_keys=True))


def param_listing(pm) -> dict:
    """In-memory adapter parameter names -> [shape, trainable] (base weights left out)."""
    return {
        k: [list(v.shape), v.requires_grad] for k, v in pm.named_parameters() if ".default" in k
    }


def layer_of(pm, module: str):
    return pm.base_model.model.get_submodule(module)


def record_outputs(arrays, key, pm, kind, targets, inputs) -> None:
    with torch.no_grad():
        for m in targets:
            x = torch.from_numpy(inputs[f"inputs/{kind}/x/{m}"])
            arrays[f"{key}/{m}/out"] = layer_of(pm, m)(x).numpy().copy()
        x = torch.from_numpy(inputs[f"inputs/{kind}/x_model"])
        out = pm(x)
        arrays[f"{key}/model_out"] = (out.logits if hasattr(out, "logits") else out).numpy().copy()


def record_state(arrays, key, pm) -> dict:
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(pm)
    for name, v in sd.items():
        arrays[f"{key}/state/{name}"] = v.detach().numpy().copy()
    return {k: list(v.shape) for k, v in sd.items()}


def record_merge(arrays, key, pm, kind, targets, inputs, bias_changes=False) -> dict:
    """layer.merge() -> merged weight (+ forward check), unmerge() -> weight; merge_and_unload()."""
    info = {}
    base = {m: layer_of(pm, m).get_base_layer().weight.detach().clone() for m in targets}
    merged = {}
    with torch.no_grad():
        for m in targets:
            layer = layer_of(pm, m)
            x = torch.from_numpy(inputs[f"inputs/{kind}/x/{m}"])
            layer.merge()
            w = layer.get_base_layer().weight.detach().numpy().copy()
            merged[m] = w
            arrays[f"{key}/{m}/merged_weight"] = w
            if bias_changes:
                arrays[f"{key}/{m}/merged_bias"] = (
                    layer.get_base_layer().bias.detach().numpy().copy()
                )
            err = np.abs(layer(x).numpy() - arrays[f"{key}/{m}/out"]).max()
            assert err < 1e-12, (key, m, "merged forward", err)
            layer.unmerge()
            u = layer.get_base_layer().weight.detach().numpy().copy()
            arrays[f"{key}/{m}/unmerged_weight"] = u
            info[m] = {
                "unmerge_max_abs_err": float(np.abs(u - base[m].numpy()).max()),
                "merged_forward_max_abs_err": float(err),
            }
        unloaded = pm.merge_and_unload()
        for m in targets:
            d = np.abs(unloaded.get_submodule(m).weight.detach().numpy() - merged[m]).max()
            # merge_and_unload starts from the unmerged weight, which "bat" only restores to ~1e-8
            assert d < 1e-12 + 10 * info[m]["unmerge_max_abs_err"], (key, m, "merge_and_unload", d)
            info[m]["merge_and_unload_vs_merge_max_abs"] = float(d)
    return info


def save_adapter(pm, name: str) -> Path:
    out = ADAPTERS / name
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # model card, not part of the adapter
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    return out


# ----------------------------------------------------------------------------------------------
# Block cases
# ----------------------------------------------------------------------------------------------


def block_cases(arrays, meta, inputs) -> None:
    from peft import AdaLoraConfig, LoraConfig, MissConfig, get_peft_model

    every = list(BLOCK)
    cases = {
        "lora": (LoraConfig, dict(r=R, lora_alpha=ALPHA), every, dict()),
        "lora_rslora": (
            LoraConfig,
            dict(r=R, lora_alpha=ALPHA, use_rslora=True),
            ["q_proj", "down"],
            {},
        ),
        "lora_bias": (
            LoraConfig,
            dict(r=R, lora_alpha=ALPHA, lora_bias=True),
            ["q_proj", "up"],
            dict(bias=True),
        ),
        "dora": (
            LoraConfig,
            dict(r=R, lora_alpha=ALPHA, use_dora=True),
            ["q_proj", "v_proj", "out_proj"],
            {},
        ),
        "miss": (MissConfig, dict(r=R), every, {}),
        "miss_bat": (
            MissConfig,
            dict(r=R, init_weights="bat"),
            ["q_proj", "v_proj", "up", "down"],
            {},
        ),
        "miss_mini": (
            MissConfig,
            dict(r=R, init_weights="mini", mini_r=2),
            ["q_proj", "up", "out_proj"],
            {},
        ),
        "adalora": (AdaLoraConfig, dict(ADALORA), ["q_proj", "v_proj", "down"], {}),
    }
    for case, (cls, kwargs, targets, opts) in cases.items():
        torch.manual_seed(SEED)
        cfg = cls(target_modules=list(targets), **kwargs)
        pm = get_peft_model(build_base("block", inputs), cfg)
        entry = {"config": config_dict(pm.peft_config["default"]), "targets": targets}
        if case == "dora":
            for m in targets:
                layer = layer_of(pm, m)
                mag = layer.lora_magnitude_vector["default"].weight.detach().numpy().copy()
                arrays[f"dora/{m}/magnitude_init"] = mag
                row = np.linalg.norm(inputs[f"base/block/{m}/weight"], axis=1)
                assert np.abs(mag - row).max() < 1e-12
        fill_adapter(pm, case)
        if case == "dora":
            with torch.no_grad():
                for m in targets:
                    layer = layer_of(pm, m)
                    dl = layer.lora_magnitude_vector["default"]
                    lw = dl.get_lora_weight(layer.lora_A["default"], layer.lora_B["default"])
                    wn = dl.get_weight_norm(
                        layer.get_base_layer().weight, lw, layer.scaling["default"]
                    )
                    arrays[f"dora/{m}/weight_norm"] = wn.numpy().copy()
        entry["params"] = param_listing(pm)
        entry["saved"] = record_state(arrays, case, pm)
        if case == "adalora":
            entry["scaling"] = {m: layer_of(pm, m).scaling["default"] for m in targets}
            entry["ranknum"] = {
                m: float(layer_of(pm, m).ranknum["default"].item()) for m in targets
            }
        elif case.startswith("lora") or case == "dora":
            entry["scaling"] = {m: layer_of(pm, m).scaling["default"] for m in targets}
        record_outputs(arrays, case, pm, "block", targets, inputs)
        if case in ("lora", "miss"):
            save_adapter(pm, case)
            entry["adapter_dir"] = f"fixtures/peft_adapters/{case}"
        entry["merge"] = record_merge(
            arrays, case, pm, "block", targets, inputs, opts.get("bias", False)
        )
        meta["cases"][case] = entry

    # Bat on a layer whose in_features (10) is not a multiple of r (4): PEFT raises.
    try:
        get_peft_model(
            build_base("block", inputs),
            MissConfig(r=R, init_weights="bat", target_modules=["out_proj"]),
        )
        raise AssertionError("bat on out_proj did not raise")
    except ValueError as exc:
        arrays["miss_bat/out_proj/error"] = np.array(str(exc))
        meta["cases"]["miss_bat"]["error_out_proj"] = {
            "type": type(exc).__name__,
            "message": str(exc),
        }


def pissa_case(arrays, meta, inputs) -> None:
    """PiSSA ("pissa", full SVD). PEFT refuses float64 (TypeError): built in float32."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "down", "out_proj"]
    try:
        get_peft_model(
            build_base("block", inputs),
            LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="pissa", target_modules=["q_proj"]),
        )
        f64_error = None
    except TypeError as exc:
        f64_error = str(exc)
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(SEED)
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="pissa", target_modules=targets)
        pm = get_peft_model(build_base("block", inputs).float(), cfg)
    finally:
        torch.set_default_dtype(torch.float64)
    entry = {
        "config": config_dict(pm.peft_config["default"]),
        "targets": targets,
        "float64_error": f64_error,
        "dtype": "init in float32, values stored as float64",
        "recon_max_abs_err": {},
    }
    for m in targets:
        layer = layer_of(pm, m)
        w = layer.get_base_layer().weight.detach().double().numpy()
        a = layer.lora_A["default"].weight.detach().double().numpy()
        b = layer.lora_B["default"].weight.detach().double().numpy()
        arrays[f"lora_pissa/{m}/base_weight_after_init"] = w
        arrays[f"lora_pissa/{m}/lora_A"] = a
        arrays[f"lora_pissa/{m}/lora_B"] = b
        s = layer.scaling["default"]
        entry["recon_max_abs_err"][m] = float(
            np.abs(w + s * b @ a - inputs[f"base/block/{m}/weight"]).max()
        )
    pm.double()
    record_outputs(arrays, "lora_pissa", pm, "block", targets, inputs)
    entry["params"] = param_listing(pm)
    meta["cases"]["lora_pissa"] = entry


def init_stats(arrays, meta) -> None:
    """Statistics of PEFT's own inits on one 512 -> 64 linear (fresh torch seed per config)."""
    from peft import AdaLoraConfig, LoraConfig, MissConfig, get_peft_model

    fin, fout = 512, 64

    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(fin, fout)

    configs = {
        "lora_default": LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]),
        "lora_gaussian": LoraConfig(
            r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["proj"]
        ),
        "dora": LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["proj"]),
        "adalora": AdaLoraConfig(init_r=8, target_r=4, total_step=10, target_modules=["proj"]),
        "miss_default": MissConfig(r=8, target_modules=["proj"]),
        "miss_random": MissConfig(r=8, init_weights=False, target_modules=["proj"]),
        "miss_bat": MissConfig(r=8, init_weights="bat", target_modules=["proj"]),
        "miss_mini": MissConfig(r=8, init_weights="mini", mini_r=4, target_modules=["proj"]),
    }
    stats_meta = {}
    for name, cfg in configs.items():
        torch.manual_seed(SEED)
        pm = get_peft_model(Big(), cfg)
        layer = pm.base_model.model.proj
        st = {}
        if name.startswith("lora") or name == "dora":
            a = layer.lora_A["default"].weight.detach().numpy()
            b = layer.lora_B["default"].weight.detach().numpy()
            st.update(
                A_std=a.std(), A_mean=a.mean(), A_max_abs=np.abs(a).max(), B_max_abs=np.abs(b).max()
            )
            if name == "dora":
                mag = layer.lora_magnitude_vector["default"].weight.detach().numpy()
                row = np.linalg.norm(layer.get_base_layer().weight.detach().numpy(), axis=1)
                st["magnitude_minus_row_norm_max_abs"] = np.abs(mag - row).max()
        elif name == "adalora":
            for part in ("A", "B", "E"):
                v = getattr(layer, f"lora_{part}")["default"].detach().numpy()
                st[f"{part}_std"], st[f"{part}_mean"], st[f"{part}_max_abs"] = (
                    v.std(),
                    v.mean(),
                    np.abs(v).max(),
                )
            st["ranknum"] = float(layer.ranknum["default"].item())
        else:
            v = layer.miss_block["default"].detach().numpy()
            st.update(block_std=v.std(), block_mean=v.mean(), block_max_abs=np.abs(v).max())
            stats_meta.setdefault("shapes", {})[name] = list(v.shape)
        for k, v in st.items():
            arrays[f"init_stats/{name}/{k}"] = np.array(float(v))
        stats_meta[name] = {k: float(v) for k, v in st.items()}
    stats_meta["layer"] = {"in": fin, "out": fout}
    stats_meta["expected"] = {
        "lora_default": "A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)): "
        "std 1/sqrt(3*512)=0.02552, max<=0.04419; B=0",
        "lora_gaussian": "A ~ N(0, (1/r)^2): std 0.125; B=0",
        "adalora": "A, B ~ N(0, 0.02^2), E = 0, ranknum = init_r",
        "miss_random": "block (r, out) ~ kaiming_uniform(a=sqrt(5)) with fan_in = out: "
        "U(+-1/sqrt(64)): std 0.0722",
        "miss_default/bat/mini": "zeros",
    }
    meta["init_stats"] = stats_meta


# ----------------------------------------------------------------------------------------------
# AdaLoRA schedule run
# ----------------------------------------------------------------------------------------------


def triplet_scores(ipt, unc, modules):
    """NumPy copy of RankAllocator.mask_to_budget's per-rank score: E + mean_in(A) + mean_out(B)."""
    out = {}
    for m in modules:
        s = {p: ipt[m][p] * unc[m][p] for p in ("lora_A", "lora_E", "lora_B")}
        out[m] = s["lora_E"].reshape(-1) + s["lora_A"].mean(axis=1) + s["lora_B"].mean(axis=0)
    return out


def adalora_train(arrays, meta, inputs) -> None:
    """12 steps of PEFT's documented AdaLoRA loop on AdaNet (l1, l2, l3 targeted).

    Per step t: loss = AdaLoraModel.forward(x_t, labels=y_t).loss (MSE + PEFT's orth-reg), backward,
    record grads, SGD(lr) optimizer.step(), record params, base_model.update_and_allocate(t), record
    the allocator's EMAs and E, zero_grad(). Keys (stacked over steps on axis 0, [12, *shape]):
    grad/<m>/<p>, param/<m>/<p> (after optimizer.step, before allocation), exp_avg_ipt/<m>/<p>,
    exp_avg_unc/<m>/<p> (the allocator's state right after its update_and_allocate, i.e. what it
    masked with; NaN on steps where it is not called), E_after/<m> (after update_and_allocate),
    keep/<m> (int8: 1 kept, 0 pruned, -1 no allocation that step), triplet/<m> and threshold (NumPy
    recomputation from the recorded EMAs; checked to give PEFT's mask), budget, mask_ind
    (budget_schedule(t)), allocator_called, loss_total, loss_mse, orth_reg (= total - mse from
    PEFT's forward; also checked against a NumPy recomputation). `p` is lora_A (r, in),
    lora_E (r, 1), lora_B (out, r).
    """
    from peft import AdaLoraConfig, get_peft_model

    modules = list(ADANET)
    steps = ADALORA["total_step"]
    torch.manual_seed(SEED)
    cfg = AdaLoraConfig(target_modules=list(modules), **ADALORA)
    pm = get_peft_model(build_base("adanet", inputs), cfg)
    fill_adapter(pm, "adalora_train")
    names = {
        (split_name(n)[0], split_name(n)[1]): p for n, p in pm.named_parameters() if p.requires_grad
    }
    parts = ("lora_A", "lora_E", "lora_B")
    for m in modules:
        for p in parts:
            arrays[f"adalora_train/init/{m}/{p}"] = names[(m, p)].detach().numpy().copy()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=ADALORA_LR)
    ra = pm.base_model.rankallocator
    captured = {}
    orig_update = ra.update_and_allocate

    def spy_update(model, global_step, force_mask=False):
        budget, rank_pattern = orig_update(model, global_step, force_mask=force_mask)
        captured["budget"], captured["rank_pattern"] = budget, rank_pattern
        captured["ipt"] = {k: v.detach().numpy().copy() for k, v in ra.exp_avg_ipt.items()}
        captured["unc"] = {k: v.detach().numpy().copy() for k, v in ra.exp_avg_unc.items()}
        return budget, rank_pattern

    ra.update_and_allocate = spy_update
    rec = {
        k: {m: {p: [] for p in parts} for m in modules}
        for k in ("grad", "param", "exp_avg_ipt", "exp_avg_unc")
    }
    e_after = {m: [] for m in modules}
    keep = {m: [] for m in modules}
    triplet = {m: [] for m in modules}
    scalars = {
        k: []
        for k in (
            "budget",
            "mask_ind",
            "allocator_called",
            "loss_total",
            "loss_mse",
            "orth_reg",
            "orth_reg_numpy",
            "threshold",
            "alloc_budget",
        )
    }
    full = {m: f"{m}.lora_%s.default" for m in modules}
    for t in range(steps):
        rng = tag_rng(f"adalora_train/data/{t}")
        x = rng.normal(size=(N, ADANET["l1"][0]))
        y = rng.normal(size=(N, ADANET["l3"][1]))
        arrays.setdefault("adalora_train/data/x", []).append(x)
        arrays.setdefault("adalora_train/data/y", []).append(y)
        # orth-reg in NumPy from the parameters the forward sees
        regs = []
        for m in modules:
            a = names[(m, "lora_A")].detach().numpy()
            b = names[(m, "lora_B")].detach().numpy()
            regs.append(np.linalg.norm(a @ a.T - np.eye(a.shape[0])))
            regs.append(np.linalg.norm(b.T @ b - np.eye(b.shape[1])))
        out = pm.base_model(torch.from_numpy(x), labels=torch.from_numpy(y))  # AdaLoraModel.forward
        out.loss.backward()
        scalars["loss_total"].append(float(out.loss))
        scalars["loss_mse"].append(float(out.mse))
        scalars["orth_reg"].append(float(out.loss) - float(out.mse))
        scalars["orth_reg_numpy"].append(ADALORA["orth_reg_weight"] * float(np.mean(regs)))
        for m in modules:
            for p in parts:
                rec["grad"][m][p].append(names[(m, p)].grad.numpy().copy())
        opt.step()
        for m in modules:
            for p in parts:
                rec["param"][m][p].append(names[(m, p)].detach().numpy().copy())
        budget, mask_ind = ra.budget_schedule(t)
        scalars["budget"].append(budget)
        scalars["mask_ind"].append(bool(mask_ind))
        captured.clear()
        pm.base_model.update_and_allocate(t)
        called = bool(captured)
        scalars["allocator_called"].append(called)
        scalars["alloc_budget"].append(captured.get("budget", -1))
        thr = np.nan
        if called and captured["ipt"]:
            ipt = {m: {p: captured["ipt"][full[m] % p[5:]] for p in parts} for m in modules}
            unc = {m: {p: captured["unc"][full[m] % p[5:]] for p in parts} for m in modules}
            sc = triplet_scores(ipt, unc, modules)
        else:
            ipt = unc = None
            sc = {m: np.full(ADALORA["init_r"], np.nan) for m in modules}
        pattern = captured.get("rank_pattern") if called else None
        if pattern:
            k = ra.init_bgt - captured["budget"]
            thr = float(np.sort(np.concatenate([sc[m] for m in modules]))[k - 1])
            for m in modules:
                mine = ~(sc[m] <= thr)
                assert mine.tolist() == pattern[full[m] % "E"], (t, m, mine, pattern[full[m] % "E"])
        scalars["threshold"].append(thr)
        for m in modules:
            for p in parts:
                for kind, src in (("exp_avg_ipt", ipt), ("exp_avg_unc", unc)):
                    shape = tuple(names[(m, p)].shape)
                    rec[kind][m][p].append(src[m][p] if src is not None else np.full(shape, np.nan))
            e_after[m].append(names[(m, "lora_E")].detach().numpy().copy())
            keep[m].append(
                np.array(pattern[full[m] % "E"], np.int8)
                if pattern
                else np.full(ADALORA["init_r"], -1, np.int8)
            )
            triplet[m].append(sc[m])
        opt.zero_grad()
    for k in ("x", "y"):
        arrays[f"adalora_train/data/{k}"] = np.stack(arrays[f"adalora_train/data/{k}"])
    for kind, per in rec.items():
        for m in modules:
            for p in parts:
                arrays[f"adalora_train/{kind}/{m}/{p}"] = np.stack(per[m][p])
    for m in modules:
        arrays[f"adalora_train/E_after/{m}"] = np.stack(e_after[m])
        arrays[f"adalora_train/keep/{m}"] = np.stack(keep[m])
        arrays[f"adalora_train/triplet/{m}"] = np.stack(triplet[m])
    for k in ("budget", "alloc_budget"):
        arrays[f"adalora_train/{k}"] = np.array(scalars[k], np.int64)
    for k in ("mask_ind", "allocator_called"):
        arrays[f"adalora_train/{k}"] = np.array(scalars[k], bool)
    for k in ("loss_total", "loss_mse", "orth_reg", "threshold"):
        arrays[f"adalora_train/{k}"] = np.array(scalars[k], np.float64)
    orth_err = float(
        np.abs(np.array(scalars["orth_reg"]) - np.array(scalars["orth_reg_numpy"])).max()
    )
    assert orth_err < 1e-12, orth_err
    rank_pattern = dict(pm.peft_config["default"].rank_pattern)
    for m in modules:
        arrays[f"adalora_train/final_rank_pattern/{m}"] = np.array(
            rank_pattern[full[m] % "E"], bool
        )
    entry = {
        "config": config_dict(pm.peft_config["default"]),
        "targets": modules,
        "lr": ADALORA_LR,
        "optimizer": "torch.optim.SGD(lr) over the trainable lora_A/E/B",
        "loop": "out = peft_model.base_model(x, labels=y) (AdaLoraModel.forward: MSE + orth-reg); "
        "out.loss.backward(); optimizer.step(); base_model.update_and_allocate(t); "
        "optimizer.zero_grad()",
        "init_bgt": ra.init_bgt,
        "target_bgt": ra.target_bgt,
        "rank_pattern_in_config_before_save": rank_pattern,
        "orth_reg_source": "PeftModel.base_model(...) = AdaLoraModel.forward, which adds orth-reg "
        "to outputs.loss; "
        "recorded as loss_total - loss_mse, equal to the NumPy recomputation within "
        f"{orth_err:.1e}",
        "params": param_listing(pm),
        "budget": scalars["budget"],
        "threshold_min_rel_gap": {},
    }
    # how close the mask decisions were to the threshold
    for t, thr in enumerate(scalars["threshold"]):
        if np.isfinite(thr):
            allsc = np.concatenate([triplet[m][t] for m in modules])
            gaps = np.abs(allsc - thr)[allsc != thr]
            entry["threshold_min_rel_gap"][t] = float(gaps.min() / abs(thr)) if gaps.size else None
    entry["saved"] = record_state(arrays, "adalora_train", pm)
    entry["rank_pattern_in_config_after_save"] = dict(pm.peft_config["default"].rank_pattern)
    # final outputs on fixed inputs, then a genuine adapter directory, then merge
    record_outputs(arrays, "adalora_train", pm, "adanet", modules, inputs)
    save_adapter(pm, "adalora")
    entry["adapter_dir"] = "fixtures/peft_adapters/adalora"
    entry["merge"] = record_merge(arrays, "adalora_train", pm, "adanet", modules, inputs)
    meta["cases"]["adalora_train"] = entry


# ----------------------------------------------------------------------------------------------
# Reverse direction: PEFT loads an adapter directory
# ----------------------------------------------------------------------------------------------


def detect_base(adapter_dir: Path) -> str:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    cls = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if cls == "AdaNet":
        return "adanet"
    if cls == "TinyBlock":
        return "block"
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return "adanet" if any(t in ADANET for t in targets) else "block"


def load_and_run(
    adapter_dir, base_weights_npz, inputs=None, base: str | None = None
) -> dict[str, np.ndarray]:
    """PeftModel.from_pretrained(adapter_dir) on the recorded base model; run it.

    `base_weights_npz`: a file with `base/<kind>/<module>/{weight,bias}` (fixtures/peft.npz);
    `inputs`: a dict or .npz with `inputs/<kind>/x/<module>` and `inputs/<kind>/x_model`
    (defaults to the ones in base_weights_npz). Returns `out/<module>` (each module called
    directly on its input, adapted or not), `model_out`, `state/<saved name>` (PEFT's state dict
    after loading), `merged/<module>/{weight,bias}` (merge_and_unload) and `meta_json`.
    """
    import peft
    from peft import PeftModel, get_peft_model_state_dict

    torch.set_default_dtype(torch.float64)
    kind = base or detect_base(Path(adapter_dir))
    with np.load(base_weights_npz) as f:
        weights = {k: f[k] for k in f.files if k.startswith(f"base/{kind}/")}
        default_inputs = {k: f[k] for k in f.files if k.startswith(f"inputs/{kind}/")}
    if inputs is None:
        inputs = default_inputs
    elif not isinstance(inputs, dict):
        with np.load(inputs) as f:
            inputs = {k: f[k] for k in f.files}
    pm = PeftModel.from_pretrained(build_base(kind, weights), str(adapter_dir))
    res = {}
    with torch.no_grad():
        for m in BASES[kind]:
            x = torch.from_numpy(np.asarray(inputs[f"inputs/{kind}/x/{m}"], np.float64))
            res[f"out/{m}"] = layer_of(pm, m)(x).numpy().copy()
        out = pm(torch.from_numpy(np.asarray(inputs[f"inputs/{kind}/x_model"], np.float64)))
        res["model_out"] = (out.logits if hasattr(out, "logits") else out).numpy().copy()
        for k, v in get_peft_model_state_dict(pm).items():
            res[f"state/{k}"] = v.detach().numpy().copy()
        merged = pm.merge_and_unload()
        for m, (_, _, bias) in BASES[kind].items():
            res[f"merged/{m}/weight"] = merged.get_submodule(m).weight.detach().numpy().copy()
            if bias:
                res[f"merged/{m}/bias"] = merged.get_submodule(m).bias.detach().numpy().copy()
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    res["meta_json"] = np.array(
        json.dumps(
            {
                "peft": peft.__version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "adapter_dir": str(adapter_dir),
                "base": kind,
                "adapter_config": cfg,
            },
            sort_keys=True,
        )
    )
    return res


def check_round_trip(arrays, meta) -> None:
    """Load the adapter directories written above with PeftModel.from_pretrained and compare."""
    src = {
        "lora": ("lora", "block"),
        "miss": ("miss", "block"),
        "adalora": ("adalora_train", "adanet"),
    }
    meta["round_trip"] = {}
    for d, (case, kind) in src.items():
        res = load_and_run(ADAPTERS / d, OUT, base=None)
        assert detect_base(ADAPTERS / d) == kind
        errs = {}
        for m in meta["cases"][case]["targets"]:
            errs[m] = float(np.abs(res[f"out/{m}"] - arrays[f"{case}/{m}/out"]).max())
            errs[f"{m}/merged"] = float(
                np.abs(res[f"merged/{m}/weight"] - arrays[f"{case}/{m}/merged_weight"]).max()
            )
        errs["model_out"] = float(np.abs(res["model_out"] - arrays[f"{case}/model_out"]).max())
        worst = max(errs.values())
        assert worst < 1e-12, (d, errs)
        loaded = sorted(k[len("state/") :] for k in res if k.startswith("state/"))
        assert loaded == sorted(meta["cases"][case]["saved"]), (d, loaded)
        meta["round_trip"][d] = {"max_abs_err": worst, "base": kind}


# ----------------------------------------------------------------------------------------------


def main():
    import peft
    import safetensors
    import transformers

    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    ADAPTERS.mkdir(parents=True, exist_ok=True)
    arrays: dict = {}
    for kind in BASES:
        arrays.update(base_arrays(kind))
        arrays.update(input_arrays(kind))
    inputs = dict(arrays)
    meta = {
        "generator": "tests/reference/generate_peft.py",
        "peft": peft.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "seed": SEED,
        "dtype": "float64 (torch.set_default_dtype); PiSSA init runs in float32 because PEFT "
        "refuses float64",
        "fill": f"adapter params = N(0, {FILL_STD}^2) from numpy "
        "default_rng([SEED, crc32('fill/<case>/<module>/<role>')]);"
        " DoRA magnitude = PEFT init * (1 + that noise)",
        "modules": {
            k: {m: {"in": i, "out": o, "bias": b} for m, (i, o, b) in v.items()}
            for k, v in BASES.items()
        },
        "N": N,
        "cases": {},
    }
    block_cases(arrays, meta, inputs)
    pissa_case(arrays, meta, inputs)
    init_stats(arrays, meta)
    adalora_train(arrays, meta, inputs)
    meta["notes"] = NOTES
    arrays["meta_json"] = np.array(json.dumps(meta, sort_keys=True, default=jsonable))
    np.savez_compressed(OUT, **arrays)
    check_round_trip(arrays, meta)
    arrays["meta_json"] = np.array(json.dumps(meta, sort_keys=True, default=jsonable))
    np.savez_compressed(OUT, **arrays)
    print(
        f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays; peft {peft.__version__}, "
        f"torch {torch.__version__}) and {ADAPTERS}/{{lora,miss,adalora}}; "
        f"round trips: {meta['round_trip']}"
    )


NOTES = [
    "Saved names (get_peft_model_state_dict / adapter_model.safetensors) drop the adapter name: "
    "'base_model.model.q_proj.lora_A.default.weight' -> 'base_model.model.q_proj.lora_A.weight'. "
    "DoRA's magnitude also loses '.weight': in memory 'lora_magnitude_vector.default.weight', "
    "saved 'base_model.model.q_proj.lora_magnitude_vector'. ParameterDict params (MiSS miss_block, "
    "AdaLoRA lora_A/lora_E/lora_B) have no '.weight' in either form.",
    "AdaLoRA: lora_E is (r, 1); ranknum ((1,), requires_grad=False, = init_r) is not saved, keeps "
    "init_r after pruning, so the scale stays lora_alpha / (init_r + 1e-5). Saving slices A[keep], "
    "E[keep], B[:, keep] with the rank_pattern and rewrites the live config's rank_pattern keys "
    "('l1.lora_E.default' -> 'l1.lora_E'); loading resizes the modules to the kept ranks.",
    "AdaLoRA orth-reg is only added by AdaLoraModel.forward (peft_model.base_model(...)) when the "
    "output has a tensor .loss; PeftModel.forward without task_type calls the base model directly "
    "and skips it.",
    "AdaLoRA update_and_allocate(t): t < T - tfinal: EMA update, mask if budget_schedule says so; "
    "t == T - tfinal: no EMA update, forced mask to target_bgt, then the EMAs are reset (so the "
    "exp_avg_* recorded for that step are the ones it masked with); t > T - tfinal: "
    "mask_using_rank_pattern only (allocator not called: NaN EMAs, keep = -1).",
    "MiSS 'bat' unmerge inverts (I + B) in float32 (torch.inverse(eye_fp32 + B.float())) even for "
    "float64 weights, so merge -> unmerge restores W only to ~3e-8 here (cases.miss_bat.merge); "
    "merge_and_unload after that round trip differs from the first merge by the same amount. "
    "(Bone in peft 0.18.1 inverts in the default dtype, float64 here, and is exact: see "
    "peft_bone018.npz.)",
    "AdaLoRA: a masked E is not frozen: optimizer.step regrows it (adalora_train/param shows small "
    "non-zero values at pruned ranks) and the next allocation re-zeroes it (E_after). "
    "budget_schedule "
    "returns mask_ind=True for t > T - tfinal, but update_and_allocate does not call the allocator "
    "there (allocator_called False). AdaLoraConfig(r=...) is ignored; the saved config keeps r=8.",
    "MiSS default / mini merge writes the full weight (get_delta_weight_miss returns W', not a "
    "delta); "
    "for in % r != 0 it edits the base weight in place.",
    "LoRA PiSSA init raises TypeError for float64 weights; it is done in float32. SVD signs are "
    "arbitrary per rank component: compare B@A, or A and B up to a per-component sign.",
    "adapter_config.json of these plain nn.Module bases has auto_mapping {base_model_class, "
    "parent_library: '__main__'} and base_model_name_or_path null; save_pretrained works without a "
    "transformers PreTrainedModel. Tensors are saved in float64 (F64).",
]


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # deterministic set order in adapter_config.json
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--load-adapter", type=Path, help="adapter directory to load with PeftModel.from_pretrained"
    )
    parser.add_argument("--out", type=Path, help="output .npz for --load-adapter")
    parser.add_argument("--base-weights", type=Path, default=OUT)
    parser.add_argument("--inputs", type=Path, default=None)
    parser.add_argument("--base", choices=sorted(BASES), default=None)
    args = parser.parse_args()
    if args.load_adapter is not None:
        if args.out is None:
            parser.error("--load-adapter needs --out")
        warnings.simplefilter("ignore")
        res = load_and_run(args.load_adapter, args.base_weights, args.inputs, args.base)
        np.savez_compressed(args.out, **res)
        print(f"wrote {args.out} ({len(res)} arrays)")
    else:
        main()
