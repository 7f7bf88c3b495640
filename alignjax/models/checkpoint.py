"""HF checkpoint I/O for `LlamaForCausalLM`: a local directory with `config.json` and
`model.safetensors` (or sharded files with `model.safetensors.index.json`) to NNX parameters
and back. Names map by path (`model.layers.0.self_attn.q_proj.weight` <->
model/layers/0/self_attn/q_proj/kernel); Linear weights are transposed between the torch
(out, in) and Flax (in, out) layouts; dtypes are converted to the model's parameter dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax.models.llama import LlamaConfig, LlamaForCausalLM, canonical_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def _hf_name(path: tuple) -> tuple[str, bool]:
    """(HF tensor name, whether to transpose) for an NNX parameter path."""
    *module, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join([*module, "weight"]), True
    if leaf == "embedding":
        return ".".join([*module, "weight"]), False
    return ".".join([*module, leaf]), False


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for f in files:
            tensors.update(load_file(str(directory / f)))
        return tensors
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise ValueError(f"{directory} has neither model.safetensors nor its sharded index")
    return load_file(str(single))


def load_pretrained(
    directory: str | Path, *, dtype=None, param_dtype=jnp.float32, remat: bool = False
) -> LlamaForCausalLM:
    """Build the model from `config.json` and load its safetensors weights (converted to
    `param_dtype`). `dtype` / `param_dtype` take any spelling `jnp.dtype` accepts; the model is the
    one `LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat)` builds, with
    an equal graph definition (`nnx.graphdef`), so jitted functions compiled for one serve the
    other."""
    directory = Path(directory)
    param_dtype = canonical_dtype(jnp.float32 if param_dtype is None else param_dtype)
    dtype = canonical_dtype(dtype)
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


def parse_shard_size(size: int | str) -> int:
    """Bytes from an int or from digits and a decimal unit ("5GB", "200MB", "10KB", "1.5TB"), as
    transformers / huggingface_hub read `max_shard_size`."""
    if isinstance(size, int):
        return size
    unit = size.strip()[-2:].upper()
    if unit not in SIZE_UNITS:
        raise ValueError(f"max_shard_size {size!r}: expected an int, or digits and TB/GB/MB/KB")
    return int(float(size.strip()[:-2]) * SIZE_UNITS[unit])


def split_into_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, as huggingface_hub's `split_state_dict_into_shards_factory`: in
    order, a shard is closed when the next tensor would take it over `max_bytes`, and a tensor
    larger than `max_bytes` on its own gets a shard of its own."""
    shards, current, size = [], [], 0
    for name, array in tensors.items():
        if array.nbytes > max_bytes:
            shards.append([name])
            continue
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += array.nbytes
    return shards + [current] if current else shards


def _save_order(name: str) -> tuple:
    """Embeddings first, then the layers in numeric order, the LM head last, as transformers
    orders a state dict: a shard holds consecutive layers."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
    return (name.startswith("lm_head."), parts)


def save_pretrained(
    model: LlamaForCausalLM,
    directory: str | Path,
    *,
    dtype=None,
    max_shard_size: int | str = "50GB",
) -> Path:
    """Write `config.json` and the weights so that transformers loads them
    (`AutoModelForCausalLM.from_pretrained(directory)`): one `model.safetensors`, or, when they
    exceed `max_shard_size` (bytes, or a string like "5GB"; transformers 5's default "50GB"),
    `model-00001-of-0000N.safetensors` shards and a `model.safetensors.index.json` mapping every
    tensor to its shard, named and formatted as transformers writes them. Weight files of an
    earlier save in `directory` that this one does not rewrite are removed, so a load never sees
    a mix of the two.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = _hf_name(path)
        array = np.asarray(var[...] if hasattr(var, "__getitem__") else var.value)
        if dtype is not None:
            array = array.astype(dtype)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    tensors = dict(sorted(tensors.items(), key=lambda item: _save_order(item[0])))
    shards = split_into_shards(tensors, parse_shard_size(max_shard_size))
    if len(shards) == 1:
        files = {SINGLE_FILE: shards[0]}
    else:
        n = len(shards)
        files = {
            f"model-{i:05d}-of-{n:05d}.safetensors": names for i, names in enumerate(shards, 1)
        }
    written = set(files) | ({INDEX_FILE} if len(files) > 1 else set())
    for f in directory.iterdir():
        stale = f.name in (SINGLE_FILE, INDEX_FILE) or SHARD_FILE.fullmatch(f.name)
        if stale and f.name not in written and f.is_file():
            f.unlink()

    config = model.config.to_hf()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for file, names in files.items():
        save_file({k: tensors[k] for k in names}, str(directory / file), metadata={"format": "pt"})
    if len(files) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(int(a.size) for a in tensors.values()),
                "total_size": sum(a.nbytes for a in tensors.values()),
            },
            "weight_map": {k: file for file, names in files.items() for k in names},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory
