"""alignjax.train.config: YAML / Python files, dotted overrides, and errors that name the key."""

import pytest

from alignjax.train import config as C


def test_yaml_python_and_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("steps: 7\nloss:\n  name: ipo\n  beta: 0.5\ndata:\n  buckets: [64, 128]\n")
    cfg = C.load_config(y, ["optim.learning_rate=1e-4", "peft.method=lora", "data.packing=true"])
    assert (cfg.steps, cfg.loss.name, cfg.loss.beta) == (7, "ipo", 0.5)
    assert cfg.data.buckets == (64, 128) and cfg.data.packing is True
    assert cfg.optim.learning_rate == 1e-4 and cfg.peft.method == "lora"
    assert C.from_dict(C.TrainConfig, C.to_dict(cfg)) == cfg  # round trip
    p = tmp_path / "run.py"
    p.write_text("from alignjax.train.config import *\nconfig = TrainConfig(steps=3)\n")
    assert C.load_config(p).steps == 3


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.lr=1"], "unknown key; valid keys here: .*learning_rate"),
        (["steps=many"], "`steps` must be an int"),
        (["nope.x=1"], "`nope` is not a section"),
        (["steps"], "dotted.key=value"),
        (["data.buckets=5"], "`data.buckets`: 5 is not a valid"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        C.load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        C.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n  colour: red\n")
    with pytest.raises(ValueError, match="unknown config key `model.colour`"):
        C.load_config(bad)
    py = tmp_path / "bad.py"
    py.write_text("config = 3\n")
    with pytest.raises(ValueError, match="must define `config`"):
        C.load_config(py)
