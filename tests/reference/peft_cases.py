"""Shared by the PEFT fixture tests and export_alignjax_adapters.py: the fixture's torch model
rebuilt as NNX Linear layers, and a fixture case written as a PEFT adapter directory."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class Net(nnx.Module):
    """Linear layers named and shaped as the fixture's torch model, float64 weights from it."""

    def __init__(self, data, meta, which: str, dtype=jnp.float64):
        for name, spec in meta["modules"][which].items():
            layer = nnx.Linear(
                spec["in"],
                spec["out"],
                use_bias=spec["bias"],
                param_dtype=dtype,
                rngs=nnx.Rngs(0),
            )
            layer.kernel[...] = jnp.asarray(data[f"base/{which}/{name}/weight"].T, dtype)
            if spec["bias"]:
                layer.bias[...] = jnp.asarray(data[f"base/{which}/{name}/bias"], dtype)
            setattr(self, name, layer)


def write_adapter(directory: Path, data, meta_case: dict, case: str) -> Path:
    """The case's saved tensors (PEFT names, torch layout) + its config as a PEFT directory."""
    prefix = f"{case}/state/"
    tensors = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
    out = Path(directory) / case
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(meta_case["config"]))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def load(name: str):
    data = np.load(FIXTURES / name)
    return data, json.loads(str(data["meta_json"]))
