"""alignjax.data for SFT: TRL's "language modeling" (text / messages) and "prompt-completion"
dataset types: detection, token ids against the tokenizer itself, truncation against slicing,
loss masks against `ops.masking.next_token_alignment`, and bad rows named.
"""

import datasets
import numpy as np
import pytest

from alignjax import data, ops

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return data.shipped_tokenizer()


def tokenize(rows, tok, **kw):
    config = kw.pop("config", data.TokenizeConfig())
    return data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, config=config, **kw)


MESSAGES = [{"role": "user", "content": "how was it?"}, {"role": "assistant", "content": "great."}]


def test_detect_sft_formats():
    f = data.detect_format(["text"], {"text": "a"})
    assert (f.kind, f.conversational, f.fields()) == ("language_modeling", False, ("text",))
    f = data.detect_format(["messages"], {"messages": MESSAGES})
    assert (f.kind, f.conversational, f.fields()) == ("language_modeling", True, ("messages",))
    f = data.detect_format(["prompt", "completion"], {"prompt": "a", "completion": "b"})
    assert (f.kind, f.fields()) == ("prompt_completion", ("prompt", "completion"))
    # unpaired and paired columns win over the SFT reading of the same columns
    f = data.detect_format(["prompt", "completion", "label"], {"completion": "b"})
    assert f.kind == "unpaired"
    f = data.detect_format(["body"], {"body": "x"}, columns={"text": "body"})
    assert f.kind == "language_modeling" and f.source("text") == "body"
    with pytest.raises(ValueError, match="text / messages"):
        data.detect_format(["body"], {"body": "x"})
    with pytest.raises(ValueError, match="implicit_prompt"):
        data.DataFormat(kind="language_modeling", implicit_prompt=True)


def test_text_rows_are_the_whole_text_with_eos(tok):
    rows = [{"text": "the soup was great."}, {"text": "we loved the bed." + tok.eos_token}]
    out = tokenize(rows, tok)
    assert out.format.kind == "language_modeling"
    for i, row in enumerate(rows):
        text = row["text"] if row["text"].endswith(tok.eos_token) else row["text"] + tok.eos_token
        want = tok(text)["input_ids"]
        assert out[i]["input_ids"] == want and out[i]["prompt_length"] == 0
        assert out[i]["length"] == len(want) and out[i]["row"] == i
        assert want[0] == tok.bos_token_id and want[-1] == tok.eos_token_id
    no_eos = tokenize(rows[:1], tok, config=data.TokenizeConfig(add_eos=False))
    assert no_eos[0]["input_ids"] == tok(rows[0]["text"])["input_ids"]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_text_truncation_against_slicing(tok, mode):
    rows = [{"text": "the soup was great and the bread was warm, the staff were kind."}]
    full = tokenize(rows, tok)[0]["input_ids"]
    n = len(full) // 2
    cut = tokenize(rows, tok, config=data.TokenizeConfig(max_length=n, truncation_mode=mode))
    want = full[:n] if mode == "keep_start" else full[-n:]
    assert cut[0]["input_ids"] == want and cut[0]["length"] == n


def test_messages_use_the_chat_template(tok):
    out = tokenize([{"messages": MESSAGES}], tok)
    assert out[0]["input_ids"] == tok.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
    assert out[0]["prompt_length"] == 0


def test_prompt_completion_trains_on_the_completion(tok):
    rows = [{"prompt": "review of the cafe: the soup was", "completion": " great."}]
    out = tokenize(rows, tok)
    ex = out[0]
    prompt = tok(rows[0]["prompt"])["input_ids"]
    full = tok(rows[0]["prompt"] + rows[0]["completion"] + tok.eos_token)["input_ids"]
    assert ex["input_ids"] == full and ex["prompt_length"] == len(prompt)
    assert "label" not in ex


def test_sft_batches_mask_every_predicted_token(tok):
    rows = [{"text": "the soup was great."}, {"text": "cold tea, slow staff, never again."}]
    pc = [{"prompt": "the soup", "completion": " was great."}]
    for tokenized in (tokenize(rows, tok), tokenize(pc, tok)):
        loader = data.DataLoader(
            tokenized, data.LoaderConfig(batch_size=2, buckets=(32,), remainder="pad")
        )
        _, batch = next(loader.epoch(0))
        assert batch.input_ids.shape == (2, 32) and batch.label is None
        completion = np.zeros_like(batch.input_ids)
        for r in range(2):
            ex = tokenized[int(batch.rows[r])] if batch.valid[r] else tokenized[0]
            completion[r, ex["prompt_length"] : len(ex["input_ids"])] = 1
        labels, mask = ops.next_token_alignment(batch.input_ids, batch.attention_mask, completion)
        want = np.asarray(mask) * batch.valid[:, None]  # padding examples train on nothing
        np.testing.assert_array_equal(batch.loss_mask, want)
        np.testing.assert_array_equal(batch.labels * want, np.asarray(labels) * want)
    # text rows: every token after the first is predicted
    lengths = np.asarray(tokenize(rows, tok).lengths)
    loader = data.DataLoader(tokenize(rows, tok), data.LoaderConfig(batch_size=2, shuffle=False))
    _, batch = next(loader.epoch(0))
    np.testing.assert_array_equal(batch.loss_mask.sum(1), lengths[batch.rows] - 1)


def test_bad_sft_rows_are_named(tok):
    with pytest.raises(data.RowError, match="row 1, field 'text': empty text"):
        tokenize([{"text": "fine."}, {"text": "  "}], tok)
    with pytest.raises(data.RowError, match="row 0, field 'messages': message 0 has role"):
        tokenize([{"messages": [{"role": "bot", "content": "x"}]}], tok)
    with pytest.raises(data.RowError, match="row 0, field 'completion': empty text"):
        tokenize([{"prompt": "a", "completion": ""}], tok)
    out = tokenize([{"text": "fine."}, {"text": ""}, {"text": None}], tok, on_error="skip")
    assert out.report.kept == 1 and out.report.n_skipped == 2


def test_shipped_sft_corpus(tok):
    out = data.tokenize_dataset(
        data.shipped_dataset("sft"), tok, config=data.TokenizeConfig(max_length=128)
    )
    assert out.format.kind == "language_modeling" and out.report.n_skipped == 0
    assert len(out) == 2000 and out.lengths.max() <= 128
