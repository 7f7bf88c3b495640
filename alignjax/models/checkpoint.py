"""HF checkpoint I/O for `LlamaForCausalLM`: a local directory with `config.json` and
`model.safetensors` (or sharded files with `model.safetensors.index.json`) to NNX parameters
and back. Names map by path (`model.layers.0.self_attn.q_proj.weight` <->
model/layers/0/self_attn/q_proj/kernel); Linear weights are transposed between the torch
(out, in) and Flax (in, out) layouts; dtypes are converted to the model's parameter dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax.models.llama import LlamaConfig, LlamaForCausalLM


def _hf_name(path: tuple) -> tuple[str, bool]:
    """(HF tensor name, whether to transpose) for an NNX parameter path."""
    *module, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join([*module, "weight"]), True
    if leaf == "embedding":
        return ".".join([*module, "weight"]), False
    return ".".join([*module, leaf]), False


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for f in files:
            tensors.update(load_file(str(directory / f)))
        return tensors
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{directory} has neither model.safetensors nor its sharded index")
    return load_file(str(single))


def load_pretrained(
    directory: str | Path, *, dtype=None, param_dtype=jnp.float32, remat: bool = False
) -> LlamaForCausalLM:
    """Build the model from `config.json` and load its safetensors weights."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory} has no config.json")
    cfg = LlamaConfig.from_hf(json.loads(config_file.read_text()))
    model = nnx.eval_shape(
        lambda: LlamaForCausalLM(
            cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
        )
    )
    tensors = read_tensors(directory)
    state = nnx.state(model, nnx.Param)
    used, missing = set(), []
    flat = nnx.to_flat_state(state)
    values = []
    for path, var in flat:
        name, transpose = _hf_name(path)
        if name not in tensors:
            missing.append(name)
            values.append((path, var))
            continue
        array = tensors[name].T if transpose else tensors[name]
        if tuple(array.shape) != tuple(var.shape):
            raise ValueError(f"{name}: shape {array.shape} does not match the model's {var.shape}")
        used.add(name)
        values.append((path, var.replace(jnp.asarray(array, param_dtype))))
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing}")
    # Tied checkpoints may still carry lm_head.weight; anything else unused is an error.
    extra = sorted(set(tensors) - used - {"lm_head.weight"})
    if extra:
        raise ValueError(f"{directory}: tensors {extra} have no place in {cfg.model_type}")
    nnx.update(model, nnx.from_flat_state(values))
    return model


def save_pretrained(model: LlamaForCausalLM, directory: str | Path, *, dtype=None) -> Path:
    """Write `config.json` + `model.safetensors` that transformers loads
    (`AutoModelForCausalLM.from_pretrained(directory)`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = _hf_name(path)
        array = np.asarray(var[...] if hasattr(var, "__getitem__") else var.value)
        if dtype is not None:
            array = array.astype(dtype)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    config = model.config.to_hf()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
