"""HF PEFT interop: write adapters as `adapter_config.json` + `adapter_model.safetensors` with
PEFT's key names and the torch (out, in) layout, and read such directories back.

Key names (what `peft.get_peft_model_state_dict` saves; the adapter name is dropped):

    LoRA     base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r),
             .lora_B.bias (out,) with lora_bias, .lora_magnitude_vector (out,) with DoRA
    MiSS     base_model.model.<module>.miss_block  (r, out) | (out/r, r, r) | (r, mini_r)
             (`bone_block` with peft <= 0.18's BoneConfig)
    AdaLoRA  base_model.model.<module>.lora_A (r, in), .lora_E (r, 1), .lora_B (out, r)

`<module>` is the torch module name of the adapted layer. By default it is our '/'-joined NNX
path with '.' in place of '/'; pass `module_names` (a callable path -> name, or a dict) when
the torch model names its modules differently. One directory holds one method (PEFT's config is
per method); differing ranks / alphas per module go into PEFT's `rank_pattern` /
`alpha_pattern`. AdaLoRA adapters are written at their full initial rank with the allocator's
rank pattern applied by zeroing, unless `rank_pattern` is given (then PEFT's slicing is used).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax.peft.adalora import AdaLoRA
from alignjax.peft.bone import Bone
from alignjax.peft.inject import Rule, adapters, apply, linear_paths
from alignjax.peft.lora import LoRA

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _namer(module_names) -> Callable[[str], str]:
    if module_names is None:
        return lambda path: path.replace("/", ".")
    if isinstance(module_names, Mapping):
        return lambda path: module_names[path]
    return module_names


def _method(layer) -> str:
    if isinstance(layer, LoRA):
        return "LORA"
    if isinstance(layer, Bone):
        return "MISS"
    if isinstance(layer, AdaLoRA):
        return "ADALORA"
    raise TypeError(f"cannot export {type(layer).__name__}")


def _np(v) -> np.ndarray:
    return np.asarray(v[...])


def export_adapters(
    model: nnx.Module,
    directory: str | Path,
    *,
    module_names: Callable[[str], str] | Mapping[str, str] | None = None,
    base_model_name_or_path: str | None = None,
    adalora: Mapping[str, Any] | None = None,
    rank_pattern: Mapping[str, Any] | None = None,
    bone_name: str = "miss",
) -> Path:
    """Write `model`'s adapters in HF PEFT's format; returns the directory.

    Args:
      module_names: our module path -> torch module name (default: '/' -> '.').
      base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
      adalora: AdaLoRA schedule fields for the config (`target_r`, `total_step`, `tinit`,
        `tfinal`, `deltaT`, `beta1`, `beta2`, `orth_reg_weight`); PEFT requires total_step.
      rank_pattern: AdaLoRA's kept-rank mask per our module path (bools, length init_r);
        the saved tensors are sliced to the kept ranks as PEFT does.
      bone_name: "miss" (peft >= 0.17 MissConfig) or "bone" (peft <= 0.18 BoneConfig).
    """
    layers = adapters(model)
    if not layers:
        raise ValueError("`model` has no adapters to export")
    kinds = {_method(layer) for _, layer in layers}
    if len(kinds) != 1:
        raise ValueError(f"one PEFT config holds one method; the model mixes {sorted(kinds)}")
    (kind,) = kinds
    name = _namer(module_names)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas, targets = {}, {}, []
    first = layers[0][1]
    for path, layer in layers:
        if layer.merged:
            raise ValueError(f"adapter at {path!r} is merged; unmerge it before exporting")
        mod = name(path)
        targets.append(mod)
        key = PREFIX + mod
        if kind == "LORA":
            tensors[f"{key}.lora_A.weight"] = _np(layer.lora_a).T
            tensors[f"{key}.lora_B.weight"] = _np(layer.lora_b).T
            if layer.lora_bias is not None:
                tensors[f"{key}.lora_B.bias"] = _np(layer.lora_bias)
            if layer.use_dora:
                tensors[f"{key}.lora_magnitude_vector"] = _np(layer.magnitude)
            if layer.rank != first.rank:
                ranks[mod] = layer.rank
            if layer.alpha != first.alpha:
                alphas[mod] = layer.alpha
        elif kind == "MISS":
            if (layer.rank, layer.variant, layer.mini_r) != (
                first.rank,
                first.variant,
                first.mini_r,
            ):
                raise ValueError("PEFT's MiSS config has one block size and variant per adapter")
            tensors[f"{key}.{bone_name}_block"] = _np(layer.block)
        else:
            a, e, b = _np(layer.lora_a).T, _np(layer.lora_e)[:, None], _np(layer.lora_b).T
            keep = None if rank_pattern is None else np.asarray(rank_pattern[path], bool)
            if keep is not None:
                a, e, b = a[keep], e[keep], b[:, keep]
            tensors[f"{key}.lora_A"], tensors[f"{key}.lora_E"], tensors[f"{key}.lora_B"] = a, e, b
    config: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "revision": None,
        "task_type": None,
        "target_modules": sorted(targets),
    }
    if kind == "LORA":
        config.update(
            peft_type="LORA",
            r=first.rank,
            lora_alpha=first.alpha,
            lora_dropout=float(first.dropout.rate),
            use_rslora=first.use_rslora,
            use_dora=first.use_dora,
            lora_bias=first.lora_bias is not None,
            bias="none",
            fan_in_fan_out=False,
            init_lora_weights=True,
            rank_pattern=ranks,
            alpha_pattern=alphas,
        )
    elif kind == "MISS":
        init = {"bone": True, "bat": "bat", "mini": "mini"}[first.variant]
        config.update(peft_type=bone_name.upper(), r=first.rank, init_weights=init, bias="none")
        if bone_name == "miss":
            config.update(mini_r=first.mini_r, miss_dropout=float(first.dropout.rate))
    else:
        schedule = dict(adalora or {})
        if "total_step" not in schedule:
            raise ValueError(
                "AdaLoRA export needs `adalora={'total_step': ..., ...}` (PEFT requires it)"
            )
        pattern = None
        if rank_pattern is not None:
            # PEFT keys the pattern by the lora_E parameter's name, "<module>.lora_E".
            pattern = {f"{name(p)}.lora_E": [bool(x) for x in m] for p, m in rank_pattern.items()}
        config.update(
            peft_type="ADALORA",
            init_r=first.rank,
            r=first.rank,
            lora_alpha=first.alpha,
            lora_dropout=float(first.dropout.rate),
            rank_pattern=pattern,
            bias="none",
            fan_in_fan_out=False,
            **schedule,
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    # safetensors writes an array's buffer as is: transposed views must be made contiguous.
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / WEIGHTS))
    return out


def read_adapters(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json as a dict, tensors by PEFT key) of a PEFT adapter directory."""
    path = Path(directory)
    for f in (CONFIG, WEIGHTS):
        if not (path / f).is_file():
            raise ValueError(f"{path} is not a PEFT adapter directory: {f} is missing")
    return json.loads((path / CONFIG).read_text()), load_file(str(path / WEIGHTS))


def import_adapters(
    model: nnx.Module,
    directory: str | Path,
    *,
    module_names: Callable[[str], str] | Mapping[str, str] | None = None,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
    """Inject the adapters of a PEFT directory into `model` (which must not have adapters on
    those modules yet) and load their weights; returns the adapted paths. Every tensor in the
    file must land in a module, and every adapted module must find its tensors: a ValueError
    names what is missing."""
    config, tensors = read_adapters(directory)
    kind = config.get("peft_type")
    name = _namer(module_names)
    by_module = {name(p): p for p in linear_paths(model)}
    suffixes = {
        "LORA": (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector"),
        "MISS": (".miss_block",),
        "BONE": (".bone_block",),
        "ADALORA": (".lora_A", ".lora_E", ".lora_B"),
    }
    if kind not in suffixes:
        raise ValueError(f"unsupported peft_type {kind!r}; supported: {sorted(suffixes)}")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes[kind] if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise ValueError(f"unexpected tensor {key!r} for peft_type {kind}")
        modules.setdefault(key[len(PREFIX) : -len(suffix)], {})[suffix] = value
    missing = sorted(set(modules) - set(by_module))
    if missing:
        raise ValueError(
            f"modules {missing} are not nnx.Linear modules of the model; it has {sorted(by_module)}"
        )
    rngs = rngs or nnx.Rngs(0)
    rules = []
    for mod, ts in modules.items():
        pattern = re.escape(by_module[mod])
        if kind == "LORA":
            rank = ts[".lora_A.weight"].shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, mod, config["lora_alpha"])
            options = dict(
                use_rslora=config.get("use_rslora", False), lora_bias=".lora_B.bias" in ts
            )
            method = "dora" if config.get("use_dora") else "lora"
            rules.append(Rule(pattern, method, rank=rank, alpha=alpha, options=options))
        elif kind in ("MISS", "BONE"):
            init = config.get("init_weights", True)
            variant = {True: "bone", "bat": "bat", "mini": "mini"}.get(init, "bone")
            options = {"mini_r": config.get("mini_r", 1)} if variant == "mini" else {}
            rules.append(Rule(pattern, variant, rank=config["r"], options=options))
        else:
            rules.append(
                Rule(pattern, "adalora", rank=config["init_r"], alpha=config["lora_alpha"])
            )
    apply(model, rules, rngs=rngs)
    layers = dict(adapters(model))
    for mod, ts in modules.items():
        layer = layers[by_module[mod]]
        if kind == "LORA":
            layer.lora_a[...] = jnp.asarray(ts[".lora_A.weight"].T, layer.lora_a.dtype)
            layer.lora_b[...] = jnp.asarray(ts[".lora_B.weight"].T, layer.lora_b.dtype)
            if ".lora_B.bias" in ts:
                layer.lora_bias[...] = jnp.asarray(ts[".lora_B.bias"], layer.lora_bias.dtype)
            if ".lora_magnitude_vector" in ts:
                layer.magnitude[...] = jnp.asarray(
                    ts[".lora_magnitude_vector"], layer.magnitude.dtype
                )
        elif kind in ("MISS", "BONE"):
            block = ts[".miss_block" if kind == "MISS" else ".bone_block"]
            if block.shape != layer.block.shape:
                raise ValueError(
                    f"{mod}: block shape {block.shape} != expected {layer.block.shape}"
                )
            layer.block[...] = jnp.asarray(block, layer.block.dtype)
        else:
            pattern = config.get("rank_pattern") or {}
            _load_adalora(layer, ts, pattern.get(f"{mod}.lora_E", pattern.get(mod)))
    return sorted(by_module[m] for m in modules)


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    r"""PEFT's `get_pattern_key`: the first key k with re.match(rf"(.*\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_adalora(layer: AdaLoRA, ts, keep):
    a, e, b = ts[".lora_A"], ts[".lora_E"][:, 0], ts[".lora_B"]
    r = layer.rank
    if a.shape[0] != r:  # saved sliced to a rank pattern: scatter back, zeros elsewhere
        if keep is None or len(keep) != r:
            raise ValueError(
                f"AdaLoRA tensors have rank {a.shape[0]} but no rank_pattern of length {r}"
            )
        idx = np.flatnonzero(np.asarray(keep, bool))
        full_a, full_e, full_b = np.zeros((r, a.shape[1])), np.zeros(r), np.zeros((b.shape[0], r))
        full_a[idx], full_e[idx], full_b[:, idx] = a, e, b
        a, e, b = full_a, full_e, full_b
    layer.lora_a[...] = jnp.asarray(a.T, layer.lora_a.dtype)
    layer.lora_e[...] = jnp.asarray(e, layer.lora_e.dtype)
    layer.lora_b[...] = jnp.asarray(b.T, layer.lora_b.dtype)
