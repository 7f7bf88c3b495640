"""Tokenized rows -> static-shape batches: padded (bucketed) or packed with segment ids.

A `Batch` is a pytree of NumPy arrays (host side; `jax.device_put` it or let jit transfer it):

- token arrays `[R, L]`: `input_ids`, `attention_mask`, `positions`, `labels`, `loss_mask`
  (DESIGN.md alignment: `labels[:, t] = input_ids[:, t + 1]`, `loss_mask` 1 on predicted
  completion tokens), and `segment_ids` for packed rows (0 = padding, 1..S per sequence);
- per-example arrays `[E]`: `valid` (0 for padding examples), `rows` (source row, -1 padding),
  and, when the data has them, `label` (unpaired), SPPO win probabilities, the per-pair
  numbers `score_chosen` / `score_rejected` / `margin`;
- packed batches also locate every sequence: `seq_row`, `seq_start`, `seq_length` `[Q]`
  (Q = 2E paired in `[chosen; rejected]` order, E unpaired); shared-prompt packed batches
  (`pack(..., share_prompt=True)`) add `prefix_ids` `[R, L]`.

Paired padded batches stack `[chosen; rejected]` on the row axis (R = 2E), so one forward pass
serves both and `PreferenceBatch.from_stacked` splits the per-token results. Packed batches
put every sequence into one of R fixed-length rows (first fit, in order); `unpack` gathers
per-token values back to the `[Q, L']` layout, and `sequence_sums` gives per-sequence sums,
so every loss reads packed and padded batches the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Batch",
    "collate",
    "collate_prompts",
    "bucket_length",
    "default_buckets",
    "pack",
    "unpack",
    "sequence_sums",
    "shift_labels",
    "mismatched_sequences",
]

WIN_FIELDS = ("chosen_win_prob", "rejected_win_prob", "win_prob")
SCORE_FIELDS = ("score_chosen", "score_rejected", "margin")  # per-pair numbers of a dataset


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    valid: np.ndarray
    rows: np.ndarray
    segment_ids: np.ndarray | None = None
    label: np.ndarray | None = None
    chosen_win_prob: np.ndarray | None = None
    rejected_win_prob: np.ndarray | None = None
    win_prob: np.ndarray | None = None
    score_chosen: np.ndarray | None = None
    score_rejected: np.ndarray | None = None
    seq_row: np.ndarray | None = None
    seq_start: np.ndarray | None = None
    seq_length: np.ndarray | None = None
    prefix_ids: np.ndarray | None = None  # shared-prompt packing: [R, L] (`pack(share_prompt=)`)
    ref_logps: np.ndarray | None = None  # precomputed reference log-probs, [R, L] or [R]
    margin: np.ndarray | None = None  # TRL RewardTrainer's `margin` column, [E]

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def num_tokens(self) -> int:
        """Completion tokens that count in the loss (host side)."""
        return int(np.asarray(self.loss_mask).sum())

    def model_inputs(self) -> dict:
        """Keyword arguments for `LlamaForCausalLM.__call__`."""
        kw = dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            positions=self.positions,
        )
        if self.segment_ids is not None:
            kw["segment_ids"] = self.segment_ids
        if self.prefix_ids is not None:
            kw["prefix_ids"] = self.prefix_ids
        return kw


def shift_labels(input_ids, attention_mask, completion_mask, segment_ids=None, pad_label=0):
    """NumPy twin of `ops.masking.next_token_alignment` (host-side batches, same values)."""

    def nxt(x):
        return np.concatenate([x[:, 1:], np.zeros_like(x[:, :1])], axis=1)

    real = attention_mask.astype(bool)
    keep = real & nxt(real) & nxt(completion_mask.astype(bool))
    if segment_ids is not None:
        keep &= (segment_ids == nxt(segment_ids)) & (nxt(segment_ids) != 0)
    labels = np.where(keep, nxt(input_ids), pad_label).astype(np.int32)
    return labels, keep.astype(np.int32)


def default_buckets(max_length: int, count: int = 4, multiple: int = 8) -> tuple[int, ...]:
    """`count` lengths halving from `max_length` (rounded up to `multiple`), e.g. 512 ->
    (64, 128, 256, 512): at most `count` compiled shapes, padding waste under 2x."""
    if max_length < 1 or count < 1 or multiple < 1:
        raise ValueError(
            f"need positive max_length/count/multiple, got {max_length, count, multiple}"
        )
    out = set()
    for k in range(count):
        n = max(1, max_length >> k)
        out.add(min(-(-n // multiple) * multiple, -(-max_length // multiple) * multiple))
    return tuple(sorted(out))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens."""
    for b in sorted(buckets):
        if length <= b:
            return int(b)
    raise ValueError(
        f"a sequence of {length} tokens is longer than the largest bucket {max(buckets)}; "
        "raise the buckets or set TokenizeConfig.max_length"
    )


def _sequences(examples: Sequence[Mapping], paired: bool):
    """[(ids, prompt_length)] in [chosen...; rejected...] order (paired) or example order."""
    if paired:
        chosen = [(e["chosen_input_ids"], e["chosen_prompt_length"]) for e in examples]
        rejected = [(e["rejected_input_ids"], e["rejected_prompt_length"]) for e in examples]
        return chosen + rejected
    return [(e["input_ids"], e["prompt_length"]) for e in examples]


def mismatched_sequences(
    examples: Sequence[Mapping], length: int, max_length: int | None = None
) -> list:
    """KTO's KL pairs: prompt i with completion i - 1 (a rotation by one within the batch, as
    TRL's `KL_completion_ids`, so the mismatched completions are the batch's own): the prompt
    and the whole completion (`kl_completion_ids`, before truncation), cut to `max_length`
    keeping the start, as TRL's collator; then to `length` (the batch width; the loader sizes
    batches so that nothing is cut there)."""
    out = []
    n = len(examples)
    for i, e in enumerate(examples):
        other = examples[(i - 1) % n]
        prompt = list(e["input_ids"][: e["prompt_length"]])
        completion = other.get("kl_completion_ids")
        if completion is None:  # rows tokenized before kl_completion_ids existed
            completion = other["input_ids"][other["prompt_length"] :]
        seq = prompt + list(completion)
        if max_length is not None:
            seq = seq[:max_length]
        out.append((seq[:length], len(prompt)))
    return out


def mismatched_lengths(prompt_lengths, kl_lengths, max_length: int | None = None) -> np.ndarray:
    """Lengths of `mismatched_sequences` rows from each example's prompt length and whole
    completion length (for choosing the batch width)."""
    p = np.asarray(prompt_lengths, np.int64)
    c = np.roll(np.asarray(kl_lengths, np.int64), 1)
    n = p + c
    return n if max_length is None else np.minimum(n, max_length)


def _example_fields(examples: Sequence[Mapping], n_pad: int) -> dict:
    rows = [int(e["row"]) for e in examples] + [-1] * n_pad
    out = dict(
        valid=np.array([1] * len(examples) + [0] * n_pad, np.int32),
        rows=np.array(rows, np.int64),
    )
    first = examples[0]
    if "label" in first:
        out["label"] = np.array([bool(e["label"]) for e in examples] + [False] * n_pad)
    for f in WIN_FIELDS:
        if f in first:
            out[f] = np.array([float(e[f]) for e in examples] + [0.5] * n_pad, np.float32)
    for f in SCORE_FIELDS:
        if f in first:
            out[f] = np.array([float(e[f]) for e in examples] + [0.0] * n_pad, np.float32)
    return out


def _padded_examples(examples: Sequence[Mapping], size: int | None) -> tuple[list, int]:
    examples = list(examples)
    if not examples:
        raise ValueError("`examples` is empty")
    n_pad = 0 if size is None else size - len(examples)
    if n_pad < 0:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {size}")
    # Padding examples repeat the first one (real tokens, so every kernel stays finite) and
    # carry valid = 0 and an all-zero loss mask.
    return examples + [examples[0]] * n_pad, n_pad


def collate(
    examples: Sequence[Mapping],
    length: int,
    *,
    pad_id: int = 0,
    batch_size: int | None = None,
    kto_kl: bool = False,
    kl_max_length: int | None = None,
) -> Batch:
    """Right-padded `[R, length]` batch (R = 2E `[chosen; rejected]` for paired examples).

    Args:
      examples: tokenized rows (`TokenizedDataset` items).
      length: the padded length (a bucket); every sequence must fit.
      pad_id: token id written on padding.
      batch_size: pad the batch to this many examples with `valid = 0` ones (static shapes
        for the last, short batch); None: exactly `len(examples)`.
      kto_kl: unpaired only: append E rows of mismatched (prompt i, completion i - 1) pairs,
        R = 2E `[matched; mismatched]`, for KTO's KL baseline (`mismatched_sequences`, cut to
        `kl_max_length`: the tokenizer's max_length).
    """
    paired = "chosen_input_ids" in examples[0]
    if kto_kl and paired:
        raise ValueError("`kto_kl` is for unpaired (KTO) examples, these are paired")
    n_given = len(examples)
    examples, n_pad = _padded_examples(examples, batch_size)
    seqs = _sequences(examples, paired)
    if kto_kl:  # rotate among the real examples only; padding rows stay padding
        kl = mismatched_sequences(examples[:n_given], length, kl_max_length)
        seqs += kl + seqs[n_given : len(examples)]
    r = len(seqs)
    ids = np.full((r, length), pad_id, np.int32)
    attn = np.zeros((r, length), np.int32)
    comp = np.zeros((r, length), np.int32)
    n_real = len(examples) - n_pad
    for i, (seq, plen) in enumerate(seqs):
        n = len(seq)
        if n > length:
            raise ValueError(f"sequence {i} (row {examples[i % len(examples)]['row']}) has {n} "
                             f"tokens > length {length}")  # fmt: skip
        ids[i, :n] = seq
        attn[i, :n] = 1
        if i % len(examples) < n_real:
            comp[i, plen:n] = 1
    labels, loss_mask = shift_labels(ids, attn, comp)
    positions = np.where(attn == 1, np.arange(length, dtype=np.int32)[None], 0).astype(np.int32)
    return Batch(
        ids, attn, positions, labels, loss_mask, **_example_fields(examples[:n_real], n_pad)
    )


def collate_prompts(
    examples: Sequence[Mapping], length: int, *, pad_id: int = 0, side: str = "chosen"
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts `[E, length]` (ids, mask) for `models.generate` (self-play, eval)."""
    key = "input_ids" if "input_ids" in examples[0] else f"{side}_input_ids"
    plen = "prompt_length" if "input_ids" in examples[0] else f"{side}_prompt_length"
    ids = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), np.int32)
    for i, e in enumerate(examples):
        p = list(e[key][: e[plen]])
        if len(p) > length:
            raise ValueError(f"prompt of row {e['row']} has {len(p)} tokens > length {length}")
        if p:
            ids[i, length - len(p) :] = p
            mask[i, length - len(p) :] = 1
    return ids, mask


def _shared_pieces(e: Mapping) -> list:
    """A pair's pieces for `pack(share_prompt=True)`: [(tokens, completion from, position 0)]
    for the prompt minus its last token, then the chosen and the rejected branch, each the
    prompt's last token followed by its completion."""
    plen = e["chosen_prompt_length"]
    chosen, rejected = list(e["chosen_input_ids"]), list(e["rejected_input_ids"])
    if plen != e["rejected_prompt_length"] or chosen[:plen] != rejected[:plen]:
        raise ValueError(f"row {e['row']}: chosen and rejected prompts differ, so they cannot "
                         "share one prompt (share_prompt=True)")  # fmt: skip
    if plen < 1:
        raise ValueError(f"row {e['row']}: no prompt token to share (share_prompt=True)")
    return [
        (chosen[: plen - 1], None, 0),
        (chosen[plen - 1 :], 1, plen - 1),
        (rejected[plen - 1 :], 1, plen - 1),
    ]


def pack(
    examples: Sequence[Mapping],
    length: int,
    num_rows: int,
    *,
    pad_id: int = 0,
    max_examples: int | None = None,
    share_prompt: bool = False,
) -> tuple[Batch, int]:
    """Pack the leading examples into `num_rows` rows of `length` tokens with segment ids.

    Sequences are placed first fit in order; a paired example goes in whole (both sides) or
    not at all. Packing stops at the first example that does not fit (the order is kept, so
    resuming a data position is exact).

    `share_prompt` (paired examples with the same prompt on both sides): each pair takes one
    row span `[prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected]` in three segments.
    Both completion branches see the prompt's segment (`Batch.prefix_ids`) and continue its
    positions, so the prompt is computed once per pair instead of twice, with the same
    log-probs and gradients as the padded or plainly packed rows up to float rounding. Each
    branch repeats the prompt's last token, whose hidden state predicts the first completion
    token. The sequences `seq_row` / `seq_start` / `seq_length` locate are the branches.

    Returns:
      `(batch, n_used)`: the packed batch (per-example arrays padded to `max_examples`,
      default every example given) and how many leading examples it holds.
    """
    paired = "chosen_input_ids" in examples[0]
    if share_prompt and not paired:
        raise ValueError(
            "`share_prompt` packs the two sides of paired examples; these are unpaired"
        )
    cap = len(examples) if max_examples is None else max_examples
    fill = [0] * num_rows
    placed = []  # per example: [(row, start, tokens, completion from, position 0)] per piece
    for e in examples[:cap]:
        # groups of pieces that go contiguously into one row: the whole pair when its prompt is
        # shared, else each sequence on its own
        if share_prompt:
            groups = [_shared_pieces(e)]
        else:
            groups = [[(seq, plen, 0)] for seq, plen in _sequences([e], paired)]
        trial, where = list(fill), []
        for group in groups:
            n = sum(len(t) for t, _, _ in group)
            if n > length:
                raise ValueError(f"row {e['row']}: {n} tokens do not fit a packed row of {length}")
            r = next((r for r in range(num_rows) if trial[r] + n <= length), None)
            if r is None:
                break
            for t, c, p0 in group:
                where.append((r, trial[r], t, c, p0))
                trial[r] += len(t)
        if len(where) < sum(len(g) for g in groups):
            break
        fill = trial
        placed.append(where)
    if not placed:
        raise ValueError(f"the first example does not fit {num_rows} rows of {length} tokens")
    used = len(placed)
    ids = np.full((num_rows, length), pad_id, np.int32)
    attn = np.zeros((num_rows, length), np.int32)
    comp = np.zeros((num_rows, length), np.int32)
    seg = np.zeros((num_rows, length), np.int32)
    pre = np.zeros((num_rows, length), np.int32)
    pos = np.zeros((num_rows, length), np.int32)
    nseg = [0] * num_rows
    n_seq = 2 if paired else 1  # sequences per example
    q = cap * n_seq
    seq_row = np.zeros(q, np.int32)
    seq_start = np.zeros(q, np.int32)
    seq_len = np.zeros(q, np.int32)
    for i, where in enumerate(placed):
        prompt_segment = None
        for k, (r, start, seq, plen, p0) in enumerate(where):
            n = len(seq)
            nseg[r] += 1
            ids[r, start : start + n] = seq
            attn[r, start : start + n] = 1
            if plen is not None:
                comp[r, start + plen : start + n] = 1
            seg[r, start : start + n] = nseg[r]
            pre[r, start : start + n] = nseg[r] if prompt_segment is None else prompt_segment
            pos[r, start : start + n] = p0 + np.arange(n)
            if share_prompt and k == 0:
                prompt_segment = nseg[r]
                continue
            j = (k - share_prompt) * cap + i  # [chosen 0..cap-1; rejected 0..cap-1]
            seq_row[j], seq_start[j], seq_len[j] = r, start, n
    labels, loss_mask = shift_labels(ids, attn, comp, seg)
    fields = _example_fields([examples[i] for i in range(used)], cap - used)
    batch = Batch(
        ids, attn, pos, labels, loss_mask, segment_ids=seg,
        seq_row=seq_row, seq_start=seq_start, seq_length=seq_len,
        prefix_ids=pre if share_prompt else None, **fields,
    )  # fmt: skip
    return batch, used


def unpack(values: jax.Array, batch: Batch, length: int) -> jax.Array:
    """Per-token `[R, L]` values of a packed batch -> `[Q, length]` per sequence (left-aligned;
    positions past a sequence's length are 0). For a padded batch, `values[:, :length]`."""
    if batch.seq_row is None:
        return values[:, :length]
    cols = batch.seq_start[:, None] + jnp.arange(length)[None, :]
    inside = jnp.arange(length)[None, :] < batch.seq_length[:, None]
    cols = jnp.where(inside, cols, 0)
    out = values[batch.seq_row[:, None], cols]
    return jnp.where(inside, out, jnp.zeros((), values.dtype))


def sequence_sums(values: jax.Array, batch: Batch) -> jax.Array:
    """Sums of per-token values over each sequence's loss mask: `[Q]`, padded or packed."""
    v = jnp.where(jnp.asarray(batch.loss_mask) != 0, values, 0)
    if batch.seq_row is None:
        return jnp.sum(v, axis=-1)
    csum = jnp.concatenate([jnp.zeros_like(v[:, :1]), jnp.cumsum(v, axis=-1)], axis=-1)
    row = jnp.asarray(batch.seq_row)
    start = jnp.asarray(batch.seq_start)
    end = start + jnp.asarray(batch.seq_length)
    return csum[row, end] - csum[row, start]
