"""alignjax.models against transformers (PyTorch, torch 2.13.0) on tiny random checkpoints of
each family (tests/reference/generate_hf_models.py): the checkpoint directory is loaded with
`models.load_pretrained`, and logits and per-layer hidden states on a fixed batch (full, left-
and right-padded rows, transformers' own position ids) match transformers' to 1e-4 in float32 on
the real tokens (padding positions are not compared: their values are arbitrary in both).
Save then load is bit-identical."""

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
    again = models.load_pretrained(tmp_path / family)
    a = nnx.to_flat_state(nnx.state(model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    for path, var in a:
        np.testing.assert_array_equal(var[...], b[path][...])


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
    import json

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
