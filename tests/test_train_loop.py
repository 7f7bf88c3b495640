"""alignjax.train.loop: a run stopped and resumed from its checkpoint continues bitwise like an
uninterrupted one (same batches, parameters, optimizer state, rng, data position)."""

import datasets
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import data, models
from alignjax.train import checkpoint, hooks, loop, metrics
from alignjax.train import step as S

datasets.disable_progress_bars()

CFG = models.LlamaConfig(
    vocab_size=512,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
)


@pytest.fixture(scope="module")
def loader():
    tok = data.shipped_tokenizer()
    raw = data.shipped_dataset("train").select(range(12))
    tokenized = data.tokenize_dataset(raw, tok, config=data.TokenizeConfig(max_length=64))
    # 12 pairs / 4 = 3 batches per epoch: 7 steps cross two epoch boundaries.
    return data.DataLoader(tokenized, data.LoaderConfig(batch_size=4, seed=1, buckets=(64,)))


def test_resume_is_bitwise(loader, tmp_path):
    opt = optax.adamw(1e-2)
    step = S.build_step(S.StepSpec(loss="sigmoid"), opt)

    def fresh():
        return S.init_state(models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), opt)

    straight = loop.run(fresh(), step, loader, steps=7)
    with checkpoint.Checkpointer(tmp_path / "ck", every=2, keep=2, asynchronous=False) as ck:
        with metrics.MetricsWriter(tmp_path / "m", tensorboard=False) as w:
            run_hooks = [hooks.MetricsHook(w, every=2), hooks.CheckpointHook(ck)]
            loop.run(fresh(), step, loader, steps=4, hooks=run_hooks)
        assert ck.latest_step() == 4
    with checkpoint.Checkpointer(tmp_path / "ck", every=2, keep=2, asynchronous=False) as ck:
        state, _ = ck.restore(target=fresh())
        assert int(state.step) == 4 and state.position.tolist() == [1, 1]
        resumed = loop.run(state, step, loader, steps=7, hooks=[hooks.CheckpointHook(ck)])
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    rows = metrics.read_jsonl(tmp_path / "m" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4] and "train/loss" in rows[0]
    assert rows[0]["train/tokens_per_s"] > 0
