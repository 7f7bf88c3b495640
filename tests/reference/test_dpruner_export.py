"""The D-Pruner checkpoint alignjax exports (save_dpruner_model.py) loads in transformers
(torch 2.13.0, transformers 5.23.0) with alignjax's logits: the committed files are what the
current pipeline writes, the zeros are exactly where its masks say (in the seven projections
only, of the original weights), and transformers' recorded logits match to 1e-4 in float32 on
the real tokens, as test_hf_models.py compares."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import save_dpruner_model
from flax import nnx
from safetensors.numpy import load_file
from save_dpruner_model import OUT, SRC, dpruner_masks, save_pruned
from test_hf_models import close_on

from alignjax import models


def _hf_name(path):
    return path.removesuffix("/kernel").replace("/", ".") + ".weight"


@pytest.fixture(scope="module")
def masks():
    """The pipeline's masks (deterministic, float64), computed once for the two tests below."""
    return dpruner_masks()


def test_committed_dpruner_checkpoint_is_what_the_pipeline_writes(tmp_path, masks, monkeypatch):
    monkeypatch.setattr(save_dpruner_model, "dpruner_masks", lambda: masks)  # save_pruned's
    fresh, report = save_pruned(tmp_path / "llama_dpruner")
    assert json.loads((fresh / "config.json").read_text()) == json.loads(
        (OUT / "config.json").read_text()
    )
    assert json.loads((OUT / "dpruner_report.json").read_text()) == json.loads(json.dumps(report))
    a, b = load_file(str(fresh / "model.safetensors")), load_file(str(OUT / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_zeros_are_where_the_masks_say(masks):
    assert len(masks) == 7 * 2
    original = load_file(str(SRC / "model.safetensors"))
    pruned = load_file(str(OUT / "model.safetensors"))
    assert pruned.keys() == original.keys()
    names = {_hf_name(k): m for k, m in masks.items()}
    zeros = 0
    for name, w in pruned.items():
        if name in names:
            keep = names[name].T  # kernel [d_in, d_out] -> torch [d_out, d_in]
            np.testing.assert_array_equal(w, np.where(keep, original[name], 0))
            assert np.all(original[name][keep] != 0)  # so the zeros are exactly the mask's
        else:  # embeddings, norms, LM head
            np.testing.assert_array_equal(w, original[name])
        zeros += int(np.sum(w == 0))
    report = json.loads((OUT / "dpruner_report.json").read_text())
    assert report["overall"] == zeros / sum(w.size for w in pruned.values())
    n_pruned = sum(int(np.sum(~m)) for m in masks.values())
    assert report["projections"] == n_pruned / sum(m.size for m in masks.values())
    assert 0.51 < report["projections"] < 0.53


def test_transformers_logits_of_the_pruned_checkpoint_match():
    ran = np.load(OUT.parent / "llama_dpruner.transformers.npz")
    meta = json.loads(str(ran["meta_json"]))
    assert meta["transformers"] == "5.23.0" and meta["torch"].startswith("2.13.0")
    assert not any(meta["loading_info"][k] for k in ("missing_keys", "unexpected_keys"))
    model = models.load_pretrained(OUT)

    @nnx.jit  # one program, not an eager forward
    def forward(model, ids, mask, positions):
        return model.logits(model(ids, mask, positions=positions).last_hidden_state)

    logits = forward(
        model,
        jnp.asarray(ran["input_ids"]),
        jnp.asarray(ran["attention_mask"]),
        jnp.asarray(ran["position_ids"]),
    )
    close_on(ran["attention_mask"], logits, ran["logits"], 1e-4)
    # Pruning changed the function: the unpruned fixture's logits are far from these.
    unpruned = np.load(SRC / "outputs.npz")["logits"]
    keep = ran["attention_mask"].astype(bool)
    assert np.max(np.abs(unpruned[keep] - ran["logits"][keep])) > 0.1
