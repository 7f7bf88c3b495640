"""alignjax.models against transformers (PyTorch, torch 2.13.0) on tiny random checkpoints of
each family (tests/reference/generate_hf_models.py): the checkpoint directory is loaded with
`models.load_pretrained`, and logits and per-layer hidden states on a fixed batch (full, left-
and right-padded rows, transformers' own position ids) match transformers' to 1e-4 in float32 on
the real tokens (padding positions are not compared: their values are arbitrary in both).
Save then load is bit-identical, also sharded (split as huggingface_hub splits)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import models

ROOT = Path(__file__).resolve().parent / "fixtures" / "hf_models"
FAMILIES = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def close_on(mask, got, want, tol):
    keep = np.asarray(mask, bool)
    got, want = np.asarray(got)[keep], np.asarray(want)[keep]
    err = np.max(np.abs(got - want))
    assert err <= tol * max(1.0, np.max(np.abs(want))), err


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match_transformers(family):
    out = np.load(ROOT / family / "outputs.npz")
    model = models.load_pretrained(ROOT / family)
    res = model(
        jnp.asarray(out["input_ids"]),
        jnp.asarray(out["attention_mask"]),
        positions=jnp.asarray(out["position_ids"]),
        output_hidden_states=True,
    )
    mask = out["attention_mask"]
    close_on(mask, model.logits(res.last_hidden_state), out["logits"], 1e-4)
    layers = model.config.num_hidden_layers
    for i in range(layers):  # embeddings and every layer but the last (HF's last is normed)
        close_on(mask, res.hidden_states[i], out["hidden_states"][i], 1e-4)
    close_on(mask, res.hidden_states[layers], out["last_layer_prenorm"], 1e-4)
    close_on(mask, res.last_hidden_state, out["hidden_states"][layers], 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_frequencies_match_transformers(family):
    out = np.load(ROOT / family / "outputs.npz")
    model = models.load_pretrained(ROOT / family)
    got = np.asarray(models.rope_frequencies(model.config))
    np.testing.assert_allclose(got, out["rope_inv_freq"], rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_is_bit_identical(family, tmp_path):
    model = models.load_pretrained(ROOT / family)
    models.save_pretrained(model, tmp_path / family)
    assert_same_params(model, models.load_pretrained(tmp_path / family))


def assert_same_params(model, again):
    a = nnx.to_flat_state(nnx.state(model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    assert len(a) == len(b)
    for path, var in a:
        np.testing.assert_array_equal(var[...], b[path][...])


def weight_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("model"))


def test_shards_split_as_huggingface_hub():
    """In order, a shard closes before the tensor that would take it over the limit; a tensor
    over the limit on its own gets its own shard (placed when it is met), as in
    huggingface_hub's `split_state_dict_into_shards_factory`, which transformers uses."""
    from alignjax.models.checkpoint import parse_shard_size, split_into_shards

    hub = pytest.importorskip("huggingface_hub")

    tensors = {f"t{i}": np.zeros(kb * 1000, np.uint8) for i, kb in enumerate([3, 12, 4, 5, 1, 6])}
    split = hub.split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda a: a.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size="10KB",
    )
    assert list(split.filename_to_tensors.values()) == [["t1"], ["t0", "t2"], ["t3", "t4"], ["t5"]]
    assert split_into_shards(tensors, parse_shard_size("10KB")) == [
        ["t1"],
        ["t0", "t2"],
        ["t3", "t4"],
        ["t5"],
    ]
    assert parse_shard_size("1.5GB") == 1_500_000_000 and parse_shard_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_shard_size("5GiB")


def test_sharded_save_loads_bit_identically_and_replaces_stale_files(tmp_path):
    """A save over `max_shard_size` writes model-0000i-of-0000N.safetensors shards within the
    limit and transformers' index (every tensor mapped to the shard holding it, total size and
    parameter count); loading is bit-identical; each save in the same directory leaves only its
    own weight files (sharded -> sharded with another count -> one file -> sharded)."""
    from safetensors.numpy import load_file

    model = models.load_pretrained(ROOT / "llama")  # 98,944 bytes, tensors up to 12,288
    directory = tmp_path / "llama"
    counts, files = [], []
    for limit, max_bytes in (("20KB", 20_000), (40_000, 40_000)):
        models.save_pretrained(model, directory, max_shard_size=limit)
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        n = len(set(index["weight_map"].values()))
        shards = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert weight_files(directory) == shards + ["model.safetensors.index.json"]
        where, tensors = {}, {}
        for name in shards:
            shard = load_file(str(directory / name))
            assert sum(a.nbytes for a in shard.values()) <= max_bytes
            where.update(dict.fromkeys(shard, name))
            tensors.update(shard)
        assert index == {
            "metadata": {
                "total_parameters": sum(a.size for a in tensors.values()),
                "total_size": sum(a.nbytes for a in tensors.values()),
            },
            "weight_map": where,
        }
        assert_same_params(model, models.load_pretrained(directory))
        counts.append(n)
        files.append(weight_files(directory))
    assert counts[0] > counts[1] > 1
    models.save_pretrained(model, directory)  # one file under transformers' 50GB default
    assert weight_files(directory) == ["model.safetensors"]
    assert_same_params(model, models.load_pretrained(directory))
    models.save_pretrained(model, directory, max_shard_size="20KB")
    assert weight_files(directory) == files[0]


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = ROOT / "llama"
    tensors = load_file(str(src / "model.safetensors"))
    for name, change in (("missing", "drop"), ("extra", "add")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        t = dict(tensors)
        if change == "drop":
            t.pop("model.norm.weight")
        else:
            t["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
        save_file(t, str(d / "model.safetensors"))
        match = "missing tensors.*model.norm.weight" if change == "drop" else "mystery"
        with pytest.raises(ValueError, match=match):
            models.load_pretrained(d)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_reproduces_transformers(family):
    """KV-cache greedy decoding of a left-padded batch gives transformers' tokens, and the
    log-probs of the chosen tokens to 1e-5."""
    out = np.load(ROOT / family / "outputs.npz")
    model = models.load_pretrained(ROOT / family)
    gen = models.generate(
        model,
        jnp.asarray(out["gen_input_ids"]),
        jnp.asarray(out["gen_attention_mask"]),
        max_new_tokens=out["gen_tokens"].shape[1],
    )
    np.testing.assert_array_equal(gen.tokens, out["gen_tokens"])
    np.testing.assert_allclose(gen.logps, out["gen_logps"], atol=1e-5)


SAVED = ROOT.parent / "hf_models_alignjax"


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_saved_here_load_in_transformers(family, tmp_path):
    """transformers loaded the checkpoint alignjax wrote (save_alignjax_models.py) and gave our
    logits; the committed files are what the writer produces now."""
    from safetensors.numpy import load_file
    from save_alignjax_models import save_family

    fresh = save_family(family, tmp_path)
    committed = SAVED / family
    assert json.loads((fresh / "config.json").read_text()) == json.loads(
        (committed / "config.json").read_text()
    )
    a = load_file(str(fresh / "model.safetensors"))
    b = load_file(str(committed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ran = np.load(SAVED / f"{family}.transformers.npz")
    model = models.load_pretrained(committed)
    res = model(
        jnp.asarray(ran["input_ids"]),
        jnp.asarray(ran["attention_mask"]),
        positions=jnp.asarray(ran["position_ids"]),
    )
    close_on(ran["attention_mask"], model.logits(res.last_hidden_state), ran["logits"], 1e-4)
