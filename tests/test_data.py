"""alignjax.data: formats, tokenization and truncation, batches (padded, bucketed, packed),
deterministic per-host loading, `datasets` caching, and bad rows.

Independent references: token ids are checked against the tokenizer itself (the prompt alone,
the chat template), truncation against slicing the untruncated ids by hand, labels/masks against
`ops.masking.next_token_alignment`, positions against the model's `default_positions`, and
packing against the model run on the unpacked (padded) batch. TRL parity of the tokenization is
in tests/reference/test_trl_data.py.
"""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import data, models, ops

datasets.disable_progress_bars()

TEXT = [
    {"prompt": "review of the cafe: the soup was", "chosen": " great.", "rejected": " cold."},
    {
        "prompt": "review of the inn: we went on a monday.",
        "chosen": " we loved the bed. the view was superb.",
        "rejected": " the room was dirty.",
    },  # fmt: skip
    {"prompt": "review of the bar:", "chosen": " the music was lovely.", "rejected": " slow."},
]


def conv(prompt, answer, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def tok():
    return data.shipped_tokenizer()


def tokenize(rows, tok, **kw):
    config = kw.pop("config", data.TokenizeConfig())
    return data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, config=config, **kw)


# ------------------------------------------------------------------------------------ formats


def test_detect_every_format():
    p, c = conv("hi", "hello")
    r = conv("hi", "go away")[1]
    cases = [
        (TEXT[0], {}, ("paired", False, False, ())),
        ({"chosen": "a b", "rejected": "a c"}, {}, ("paired", False, True, ())),
        ({"prompt": p, "chosen": c, "rejected": c}, {}, ("paired", True, False, ())),
        ({"chosen": p + c, "rejected": p + r}, {}, ("paired", True, True, ())),
        ({"prompt": "x", "completion": "y", "label": True}, {}, ("unpaired", False, False, ())),
        ({"prompt": p, "completion": c, "label": False}, {}, ("unpaired", True, False, ())),
        ({**TEXT[0], "win_prob": 0.7}, {}, ("sppo", False, False, ("win_prob",))),
        (
            {**TEXT[0], "chosen_win_prob": 0.7, "rejected_win_prob": 0.2},
            {},
            ("sppo", False, False, ("chosen_win_prob", "rejected_win_prob")),
        ),
        (
            {"q": "x", "good": "y", "bad": "z"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            ("paired", False, False, ()),
        ),  # fmt: skip
    ]
    for row, columns, (kind, conversational, implicit, wins) in cases:
        fmt = data.detect_format(list(row), row, columns)
        assert (fmt.kind, fmt.conversational, fmt.implicit_prompt, fmt.win_fields) == (
            kind, conversational, implicit, wins,
        ), row  # fmt: skip
        assert data.normalize_row(row, 0, fmt)  # every case is a valid row
    with pytest.raises(ValueError, match="cannot tell"):
        data.detect_format(["body"], {"body": "x"})
    with pytest.raises(ValueError, match="not a column"):
        data.detect_format(["a"], {"a": "x"}, {"prompt": "q"})


def test_implicit_prompt_split_follows_trl():
    fmt = data.DataFormat(implicit_prompt=True)
    row = data.normalize_row(
        {"chosen": "the soup was great.", "rejected": "the soup was cold."}, 3, fmt
    )
    # TRL's extract_prompt: the common prefix, with the space before the split kept in front.
    assert row == {"prompt": "the soup was", "chosen": " great.", "rejected": " cold."}
    p, c = conv("hi", "hello", system="be brief")
    _, r = conv("hi", "go away")
    conv_fmt = data.DataFormat(conversational=True, implicit_prompt=True)
    row = data.normalize_row({"chosen": p + c, "rejected": p + r}, 0, conv_fmt)
    assert row == {"prompt": p, "chosen": c, "rejected": r}
    with pytest.raises(data.RowError, match="row 5, field 'prompt'"):
        data.normalize_row({"chosen": "abc", "rejected": "xyz"}, 5, fmt)
    with pytest.raises(data.RowError, match="row 6, field 'chosen'"):
        data.normalize_row({"chosen": "abc", "rejected": "abc def"}, 6, fmt)


# ------------------------------------------------------------------------------- tokenization


def test_text_rows_tokenize_like_the_tokenizer(tok):
    out = tokenize(TEXT, tok)
    assert out.report.n_skipped == 0 and out.format.kind == "paired"
    for i, row in enumerate(TEXT):
        ex = out[i]
        prompt = tok(row["prompt"])["input_ids"]  # BOS + prompt
        assert prompt[0] == tok.bos_token_id
        for side in ("chosen", "rejected"):
            ids, plen = ex[f"{side}_input_ids"], ex[f"{side}_prompt_length"]
            assert ids[:plen] == prompt
            assert ids == tok(row["prompt"] + row[side] + tok.eos_token)["input_ids"]
            assert ids[-1] == tok.eos_token_id
        assert ex["length"] == max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))
        assert ex["row"] == i


def test_column_mapping(tok):
    renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "x": 1} for r in TEXT]
    got = tokenize(renamed, tok, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    want = tokenize(TEXT, tok)
    assert got.dataset.to_list() == want.dataset.to_list()
    with pytest.raises(data.RowError, match="row 0, field 'chosen': missing chosen .column 'good'"):
        data.normalize_row({"q": "x"}, 0, got.format)


def test_conversational_rows_use_the_chat_template(tok):
    p, c = conv("how was the soup?", "it was great.", system="you review food")
    _, r = conv("how was the soup?", "cold.")
    out = tokenize([{"prompt": p, "chosen": c, "rejected": r}], tok)
    ex = out[0]
    prompt = tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True)["input_ids"]
    full = tok.apply_chat_template(p + c, tokenize=True)["input_ids"]
    assert ex["chosen_input_ids"] == full and ex["chosen_prompt_length"] == len(prompt)
    assert full[: len(prompt)] == prompt
    assert tok.convert_ids_to_tokens(full[-1]) == "<|end|>"  # the template's, no extra EOS


def test_unpaired_and_sppo_rows(tok):
    rows = [
        {"prompt": "review of the cafe:", "completion": " great.", "label": True},
        {"prompt": "review of the bar:", "completion": " awful.", "label": False},
    ]
    assert (
        data.normalize_row({**rows[1], "label": 0}, 0, data.DataFormat("unpaired"))["label"]
        is False
    )
    out = tokenize(rows, tok)
    assert out.format.kind == "unpaired"
    assert [out[i]["label"] for i in range(2)] == [True, False]
    assert out[0]["input_ids"] == tok("review of the cafe: great.</s>")["input_ids"]
    batch = data.collate([out[0], out[1]], 16, batch_size=3, kto_kl=True)
    assert batch.input_ids.shape == (6, 16) and batch.label.tolist() == [True, False, False]
    for i, j in ((0, 1), (1, 0)):  # row 3 + i: prompt i with completion i - 1 (TRL's rotation)
        e, o = out[i], out[j]
        want = e["input_ids"][: e["prompt_length"]] + o["input_ids"][o["prompt_length"] :]
        assert batch.input_ids[3 + i, : len(want)].tolist() == want
        assert batch.loss_mask[3 + i].sum() == len(want) - e["prompt_length"]
    assert batch.loss_mask[2].sum() == 0 and batch.loss_mask[5].sum() == 0
    sppo = [{**r, "chosen_win_prob": 0.8, "rejected_win_prob": 0.3} for r in TEXT]
    out = tokenize(sppo, tok)
    assert out.format.win_fields == ("chosen_win_prob", "rejected_win_prob")
    batch = data.collate([out[i] for i in range(3)], 32, batch_size=4)
    np.testing.assert_allclose(batch.chosen_win_prob, [0.8, 0.8, 0.8, 0.5])
    assert batch.win_prob is None


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_modes_against_slicing(tok, mode):
    full = tokenize(TEXT, tok)
    limits = [
        dict(max_length=16),
        dict(max_prompt_length=5),
        dict(max_completion_length=3),
        dict(max_length=14, max_prompt_length=9, max_completion_length=6),
    ]
    for lim in limits:
        cut = tokenize(TEXT, tok, config=data.TokenizeConfig(truncation_mode=mode, **lim))
        assert cut.report.n_skipped == 0
        for i in range(len(TEXT)):
            for side in ("chosen", "rejected"):
                ids, plen = full[i][f"{side}_input_ids"], full[i][f"{side}_prompt_length"]
                p, c = ids[:plen], ids[plen:]
                if "max_prompt_length" in lim:
                    p = p[-lim["max_prompt_length"] :]
                if "max_completion_length" in lim:
                    c = c[: lim["max_completion_length"]]
                m = lim.get("max_length")
                if m is not None and len(p) + len(c) > m:
                    if mode == "keep_start":
                        c = c[: m - len(p)]
                    else:
                        excess = len(p) + len(c) - m
                        cp = min(excess, len(p))
                        p, c = p[cp:], c[excess - cp :]
                got = cut[i]
                assert got[f"{side}_input_ids"] == p + c, (lim, i, side)
                assert got[f"{side}_prompt_length"] == len(p)


def test_truncation_to_nothing_is_a_named_row_error(tok):
    rows = [TEXT[0], {"prompt": "review of the bar: " + "the soup was cold. " * 4,
                      "chosen": " ok.", "rejected": " bad."}]  # fmt: skip
    config = data.TokenizeConfig(max_length=16)
    with pytest.raises(data.RowError, match="row 1, field 'chosen': .*leaves no completion"):
        tokenize(rows, tok, config=config)
    out = tokenize(rows, tok, config=config, on_error="skip")
    assert len(out) == 1 and out.report.n_skipped == 1 and out[0]["row"] == 0
    assert "1 of 2 rows kept" in str(out.report)


# ------------------------------------------------------------------------------------ batches


def test_collate_layout_labels_and_positions(tok):
    out = tokenize(TEXT, tok)
    ex = [out[i] for i in range(3)]
    batch = data.collate(ex, 32, pad_id=out.pad_id, batch_size=4)
    assert batch.input_ids.shape == (8, 32) and batch.valid.tolist() == [1, 1, 1, 0]
    assert batch.rows.tolist() == [0, 1, 2, -1]
    for i in range(3):  # [chosen; rejected] with the padding example at the end of each half
        for side, r in (("chosen", i), ("rejected", 4 + i)):
            ids = ex[i][f"{side}_input_ids"]
            assert batch.input_ids[r, : len(ids)].tolist() == ids
            assert batch.attention_mask[r].sum() == len(ids)
            assert batch.loss_mask[r].sum() == len(ids) - ex[i][f"{side}_prompt_length"]
    assert batch.loss_mask[3].sum() == 0 and batch.loss_mask[7].sum() == 0
    comp = np.zeros_like(batch.input_ids)
    for r in range(8):
        e = ex[r % 4] if r % 4 < 3 else None
        if e is not None:
            side = "chosen" if r < 4 else "rejected"
            comp[r, e[f"{side}_prompt_length"] : len(e[f"{side}_input_ids"])] = 1
    labels, mask = ops.next_token_alignment(batch.input_ids, batch.attention_mask, comp)
    np.testing.assert_array_equal(batch.labels, labels)
    np.testing.assert_array_equal(batch.loss_mask, mask)
    pos = models.default_positions(jnp.asarray(batch.attention_mask))
    np.testing.assert_array_equal(np.where(batch.attention_mask, batch.positions, 0),
                                  np.where(batch.attention_mask, pos, 0))  # fmt: skip
    ids, m = data.collate_prompts(ex, 16, pad_id=out.pad_id)
    for i in range(3):
        p = ex[i]["chosen_input_ids"][: ex[i]["chosen_prompt_length"]]
        assert ids[i, 16 - len(p) :].tolist() == p and m[i].sum() == len(p)
    with pytest.raises(ValueError, match="> length 8"):
        data.collate(ex, 8)


def test_buckets():
    assert data.default_buckets(512) == (64, 128, 256, 512)
    assert data.default_buckets(100, count=3) == (32, 56, 104)
    assert data.bucket_length(65, (64, 128)) == 128
    with pytest.raises(ValueError, match="largest bucket 128"):
        data.bucket_length(129, (64, 128))


CFG = models.LlamaConfig(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_packed_sequence_sums_equal_unpacked(tok):
    """Per-sequence log-prob sums (and per-token values) of a packed batch equal the padded
    batch's: the segment ids isolate sequences and positions restart, so the model computes
    the same numbers (float32 tolerance 2e-5: the same ops on differently laid-out rows)."""
    out = tokenize(data.shipped_dataset("train").select(range(6)).to_list(), tok)
    ex = [out[i] for i in range(6)]
    model = models.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))

    @nnx.jit
    def logps(model, batch):
        h = model(**batch.model_inputs()).last_hidden_state
        return ops.fused_token_logps(h, model.unembed(), batch.labels, batch.loss_mask)

    padded = data.collate(ex, 64, pad_id=out.pad_id)
    packed, used = data.pack(ex, 128, 4, pad_id=out.pad_id)
    assert used == 6 and packed.segment_ids.max() >= 2  # really packed
    lp_pad = logps(model, jax.tree.map(jnp.asarray, padded))
    lp_pack = logps(model, jax.tree.map(jnp.asarray, packed))
    np.testing.assert_allclose(
        data.sequence_sums(lp_pack, packed), data.sequence_sums(lp_pad, padded), rtol=2e-5
    )
    np.testing.assert_allclose(data.unpack(lp_pack, packed, 64), lp_pad, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(data.unpack(packed.loss_mask, packed, 64), padded.loss_mask)
    # segment sums from ops agree with the cumulative-sum gather
    sums = ops.segment_sums(lp_pack, packed.segment_ids, 8, packed.loss_mask)
    seg_of = packed.segment_ids[packed.seq_row, packed.seq_start]
    np.testing.assert_allclose(
        sums[packed.seq_row, seg_of - 1], data.sequence_sums(lp_pack, packed), rtol=1e-6
    )
    pos = models.default_positions(
        jnp.asarray(packed.attention_mask), jnp.asarray(packed.segment_ids)
    )
    real = packed.attention_mask == 1
    np.testing.assert_array_equal(packed.positions[real], np.asarray(pos)[real])


def test_pack_keeps_order_and_caps():
    ex = [{"row": i, "input_ids": [5] * n, "prompt_length": 1, "label": True}
          for i, n in enumerate([6, 3, 7, 2, 8])]  # fmt: skip
    batch, used = data.pack(ex, 10, 2)
    assert used == 4  # rows [6, 3 | 7, 2]; 8 tokens fit neither row: packing stops there
    assert batch.valid.tolist() == [1, 1, 1, 1, 0]
    assert batch.seq_row[:4].tolist() == [0, 0, 1, 1] and batch.seq_start[:4].tolist() == [
        0,
        6,
        0,
        7,
    ]
    assert batch.segment_ids.tolist() == [[1] * 6 + [2] * 3 + [0], [1] * 7 + [2] * 2 + [0]]
    batch, used = data.pack(ex, 10, 2, max_examples=2)
    assert used == 2 and batch.valid.shape == (2,)
    with pytest.raises(ValueError, match="row 4: 8 tokens do not fit a packed row of 6"):
        data.pack(ex[4:], 6, 2)
