"""Shared-prompt packing (`data.pack(..., share_prompt=True)`): each pair's prompt packed once,
its two completion branches seeing it through `prefix_ids`.

Parity: the log-probs and a DPO step's loss and gradients on shared-prompt rows equal those of
the padded [chosen; rejected] rows. Float64 parameters and compute, except attention's scores
and softmax statistics, which both kernels keep in float32 by design: the layouts sum the same
terms in another order and grouping (a query's keys sit at other indices), so they agree to
float32 rounding of the attention, about 1e-8 relative here (2^-24 per operation through two
layers). The tolerance 1e-6 leaves a margin of ~100 and still fails on any token that sees a
wrong key (an O(1e-2) change). Both attention paths are checked: "grouped" (the dense mask,
`attention_mask_4d`) and "blockwise" (`prefix_ids` in `blockwise_attention`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import data, models, ops
from alignjax.models.attention import attention
from alignjax.models.flash_attention import SequenceMask
from alignjax.train import step as S

RTOL = 1e-6
CFG = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def pair(row, prompt, chosen, rejected):
    return dict(chosen_input_ids=prompt + chosen, chosen_prompt_length=len(prompt),
                rejected_input_ids=prompt + rejected, rejected_prompt_length=len(prompt),
                row=row)  # fmt: skip


def random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = (rng.integers(1, CFG["vocab_size"], rng.integers(1, 9)).tolist() for _ in "pcr")
        out.append(pair(i, p, c, r))
    return out


def test_layout():
    """[prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected] per pair, by hand."""
    ex = [pair(0, [5, 6, 7], [8, 9], [10]), pair(1, [11, 12], [13], [14, 15])]
    b, used = data.pack(ex, 16, 1, share_prompt=True)
    assert used == 2
    assert b.input_ids[0].tolist() == [5, 6, 7, 8, 9, 7, 10, 11, 12, 13, 12, 14, 15, 0, 0, 0]
    assert b.segment_ids[0].tolist() == [1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 0, 0, 0]
    assert b.prefix_ids[0].tolist() == [1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 0, 0, 0]
    assert b.positions[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3, 0, 0, 0]
    # each branch predicts its completion from the prompt's last token on
    assert b.labels[0].tolist() == [0, 0, 8, 9, 0, 10, 0, 0, 13, 0, 14, 15, 0, 0, 0, 0]
    assert b.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0]
    # sequences [chosen 0, chosen 1; rejected 0, rejected 1] are the branches
    assert b.seq_start.tolist() == [2, 8, 5, 10] and b.seq_length.tolist() == [3, 2, 2, 3]
    assert b.seq_row.tolist() == [0, 0, 0, 0]
    assert set(b.model_inputs()) == {
        "input_ids", "attention_mask", "positions", "segment_ids", "prefix_ids"
    }  # fmt: skip


def test_a_pair_stays_in_one_row_and_packing_stops_in_order():
    """Pairs take 11, 12, 4 and 2 tokens in rows of 13: the third fits neither row, so packing
    stops there although the fourth would still fit the first row (the data order is kept)."""
    ex = [pair(0, [1] * 4, [2] * 3, [3] * 3), pair(1, [1] * 6, [2] * 4, [3]),
          pair(2, [4], [5], [6]), pair(3, [7], [], [])]  # fmt: skip
    b, used = data.pack(ex, 13, 2, share_prompt=True)
    assert used == 2 and b.valid.tolist() == [1, 1, 0, 0]
    assert b.seq_row.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    assert b.attention_mask.sum(1).tolist() == [11, 12]


def test_errors_name_the_row_or_argument():
    with pytest.raises(ValueError, match="row 3: chosen and rejected prompts differ"):
        data.pack([dict(pair(3, [1, 2], [3], [4]), rejected_input_ids=[1, 9, 4])], 16, 1,
                  share_prompt=True)  # fmt: skip
    with pytest.raises(ValueError, match="row 4: no prompt token to share"):
        data.pack([pair(4, [], [3], [4])], 16, 1, share_prompt=True)
    with pytest.raises(ValueError, match="row 5: 8 tokens do not fit a packed row of 7"):
        data.pack([pair(5, [1, 2, 3], [4, 5], [6, 7])], 7, 1, share_prompt=True)
    unpaired = [{"row": 0, "input_ids": [1, 2, 3], "prompt_length": 1, "label": True}]
    with pytest.raises(ValueError, match="paired examples; these are unpaired"):
        data.pack(unpaired, 16, 1, share_prompt=True)
    with pytest.raises(ValueError, match="set `packing` true"):
        data.LoaderConfig(batch_size=2, share_prompt=True)
    model = models.LlamaForCausalLM(models.LlamaConfig(**CFG), rngs=nnx.Rngs(0))
    b, _ = data.pack(random_pairs(2), 40, 1, share_prompt=True)
    kw = b.model_inputs()
    with pytest.raises(ValueError, match="needs explicit `positions`"):
        model(**{**kw, "positions": None})
    with pytest.raises(ValueError, match="`prefix_ids` needs `segment_ids`"):
        model(**{**kw, "segment_ids": None})
    with pytest.raises(ValueError, match=r"`prefix_ids` must have shape \(1, 40\)"):
        model(**{**kw, "prefix_ids": kw["prefix_ids"][:, :5]})
    q = jnp.ones((1, 40, 4, 4))
    seg, pre = jnp.asarray(b.segment_ids), jnp.asarray(b.prefix_ids)
    mask = SequenceMask(jnp.ones((1, 40), bool), seg, pre)
    with pytest.raises(ValueError, match='"pallas_splash" attention has no shared-prompt rows'):
        attention(q, q, q, mask, implementation="pallas_splash", causal=True)


def float64_model(implementation):
    cfg = models.LlamaConfig(**CFG, attention_implementation=implementation)
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), state))
    return model


@pytest.mark.parametrize("implementation", ["grouped", "blockwise"])
def test_logps_equal_the_padded_rows(x64, implementation):
    """Per-token log-probs of every completion token and their sums (module docstring)."""
    ex = random_pairs(5)
    model = float64_model(implementation)
    padded = data.collate(ex, 24)
    shared, used = data.pack(ex, 40, 2, share_prompt=True)
    assert used == 5

    def logps(batch):
        h = model(**jax.tree.map(jnp.asarray, batch.model_inputs())).last_hidden_state
        return ops.fused_token_logps(h, model.unembed(), batch.labels, batch.loss_mask)

    want, got = logps(padded), logps(shared)
    assert want.dtype == jnp.float64
    np.testing.assert_allclose(data.sequence_sums(got, shared), want.sum(1), rtol=RTOL)
    # token by token: the padded row's completion tokens are the branch's, in order
    for q in range(10):
        keep = padded.loss_mask[q] == 1
        r, s0, n = shared.seq_row[q], shared.seq_start[q], shared.seq_length[q]
        branch = np.asarray(got[r, s0 : s0 + n])[shared.loss_mask[r, s0 : s0 + n] == 1]
        np.testing.assert_allclose(branch, np.asarray(want[q])[keep], rtol=RTOL)


@pytest.mark.parametrize("implementation", ["grouped", "blockwise"])
def test_dpo_step_equals_the_padded_rows(implementation):
    """Two DPO steps (online frozen reference) with SGD at lr 1: each update is the gradient,
    so equal parameter changes mean equal gradients. The step runs in float32 (its loss and
    gradient accumulators are float32): each leaf's change must agree within 1e-4 of the
    leaf's largest change, the float32 rounding of sums over ~100 tokens (2^-24 * 100 * a few
    layers of it, ~1e-5) with a margin; a token seeing a wrong key changes it by O(1e-2)."""
    ex = random_pairs(4, seed=1)
    padded = jax.tree.map(jnp.asarray, data.collate(ex, 24))
    shared = jax.tree.map(jnp.asarray, data.pack(ex, 48, 2, share_prompt=True)[0])
    spec = S.StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.5}, reference="frozen")
    opt = optax.sgd(1.0)
    out = []
    for batch in (padded, shared):
        cfg = models.LlamaConfig(**CFG, attention_implementation=implementation)
        model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        state = S.init_state(model, opt, wrt=nnx.Param, reference="frozen")
        step = S.build_step(spec, opt, donate=False)
        state, m = step(state, batch)
        state, m2 = step(state, batch)  # the reference and the policy now differ
        out.append((m, m2, jax.tree.map(np.asarray, state.params)))
    (m_pad, m2_pad, p_pad), (m_sh, m2_sh, p_sh) = out
    for m_got, m_want in ((m_sh, m_pad), (m2_sh, m2_pad)):
        for key in ("logps/chosen", "logps/rejected"):  # float32 sums of ~10 log-probs
            np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-5, err_msg=key)
        # the loss moves by at most beta times the margin's error: 4 sums' worth of the above
        sums = (abs(float(m_want[k])) for k in ("logps/chosen", "logps/rejected"))
        bound = 0.5 * 4 * 1e-5 * max(sums)
        np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=0, atol=bound)
        np.testing.assert_allclose(m_got["grad_norm"], m_want["grad_norm"], rtol=1e-4)
    assert float(m_pad["grad_norm"]) > 1e-3  # a real update

    def same_change(a, b, start):
        want, got = a - start, b - start
        scale = np.max(np.abs(want))
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)

    jax.tree.map(same_change, p_pad, p_sh, before)


def test_loader_and_config():
    """`LoaderConfig(share_prompt=True)` packs every example once per epoch into shared rows,
    with fewer tokens than plain packing; `data.share_prompt` is checked with the config."""
    from alignjax.train import config as C

    raw = data.shipped_dataset("train").select(range(12))
    tokenized = data.tokenize_dataset(
        raw, data.shipped_tokenizer(), config=data.TokenizeConfig(max_length=64)
    )
    kw = dict(batch_size=4, shuffle=False, packing=True, pack_length=192, pack_rows=2)
    shared = [
        b
        for _, b in data.DataLoader(tokenized, data.LoaderConfig(**kw, share_prompt=True)).epoch(0)
    ]
    plain = [b for _, b in data.DataLoader(tokenized, data.LoaderConfig(**kw)).epoch(0)]
    assert all(b.prefix_ids is not None for b in shared)
    rows = np.concatenate([b.rows[b.valid == 1] for b in shared])
    assert sorted(rows.tolist()) == list(range(12))
    tokens = [sum(int(b.attention_mask.sum()) for b in bs) for bs in (shared, plain)]
    loss_tokens = [sum(int(b.loss_mask.sum()) for b in bs) for bs in (shared, plain)]
    assert tokens[0] < tokens[1] and loss_tokens[0] == loss_tokens[1]
    assert C.load_config(None, ["data.packing=true", "data.share_prompt=true"]).data.share_prompt
    for overrides in (["data.share_prompt=true"], ["data.packing=true", "data.share_prompt=true",
                                                    "task=sft"]):  # fmt: skip
        with pytest.raises(ValueError, match="`data.share_prompt` packs each pair's prompt once"):
            C.load_config(None, overrides)


@pytest.mark.slow  # a trainer setup (model, data, tokenizer) per layout
def test_through_the_trainer(tmp_path):
    """`data.share_prompt` through `trainer.setup`, its loader and the step's `token_stats`:
    the first examples' policy and reference log-prob sums, in the loss layout, equal those of
    plain packing (float32 sums of ~20-60 log-probs in another order: 2e-5, as the packed vs
    padded test in test_data.py)."""
    from alignjax.train import config as C
    from alignjax.train import trainer

    base = ["data.train=shipped:test", "data.eval=null", "mesh.devices=1", "model.preset=tiny",
            "data.max_length=64", "data.packing=true", "data.pack_length=256",
            "data.pack_rows=2", f"out_dir={tmp_path}"]  # fmt: skip
    out = []
    for share in ("false", "true"):
        session = trainer.setup(C.load_config(None, [*base, f"data.share_prompt={share}"]))
        _, batch = next(trainer.train_loader(session).epoch(0))
        assert (batch.prefix_ids is not None) == (share == "true")
        st = S.token_stats(session.spec, session.state, session.state.params,
                           jax.tree.map(jnp.asarray, batch))  # fmt: skip
        e = len(batch.rows)
        sums = [np.asarray((x * st.mask).sum(-1)) for x in (st.logps, st.ref_logps)]
        out.append((batch.rows, [(s[:e], s[e:]) for s in sums]))
    (rows_plain, plain), (rows_shared, shared) = out
    n = int((rows_plain >= 0).sum())
    assert 0 < n < int((rows_shared >= 0).sum())  # the shared rows hold more examples
    assert rows_plain[:n].tolist() == rows_shared[:n].tolist()
    for (pc, pr), (sc, sr) in zip(plain, shared):
        np.testing.assert_allclose(sc[:n], pc[:n], rtol=2e-5)
        np.testing.assert_allclose(sr[:n], pr[:n], rtol=2e-5)
