"""Where the token masks of SparsePO and MaPO put their weight.

On held-out completions (the chosen and rejected sides of the held-out pairs, sampled from the
reference policy), the masks a run's loss would use are computed exactly as in the train step
(`forward.reference_outputs` for the reference's layer outputs / activations, then
`forward.token_masks`), for the trained state and for the state before training (SparsePO's heads
at initialisation: the control). Every completion token (the EOS included) is classed as
*lexicon* when it overlaps a word of the gold reward's lexicon (`synthetic.POSITIVE`,
`NEGATIVE`, `POSITIVE_VERBS`, `NEGATIVE_VERBS`), found by character offsets of the decoded
tokens, and *neutral* otherwise (the EOS is neutral, and also reported on its own). Reported:
the mean mask weight per class (and per polarity), their ratio, and the fraction of
exactly-zero entries over completion tokens.

Reading the weights: the mask of completion token t is computed from the reference's layer
outputs at position t - 1 (the states that predict token t, as the loss aligns them), so a
head cannot see the token it weights, only its prefix. A high weight marks a position where
the reference is about to choose a word (e.g. the verb after "we"), whatever word the sample
then has there.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from alignjax import data as D
from alignjax.data import synthetic
from alignjax.train import forward, trainer
from alignjax.train import step as S

__all__ = ["load_pairs", "token_classes", "mask_stats", "plot_masks"]

_WORD = re.compile(r"[a-z]+")
_POSITIVE = frozenset(synthetic.POSITIVE + synthetic.POSITIVE_VERBS)
_NEGATIVE = frozenset(synthetic.NEGATIVE + synthetic.NEGATIVE_VERBS)
_JITTED: dict = {}


def load_pairs(path: Path, session, *, length: int, batch: int = 64) -> list[D.Batch]:
    """The held-out pairs tokenized as the trainer does, in `[chosen; rejected]` batches."""
    tokenized = trainer.load_split(str(path), session.cfg, session.tokenizer, "paired")
    pad = session.tokenizer.pad_token_id or 0
    rows = [tokenized[i] for i in range(len(tokenized))]
    return [
        D.collate(rows[i : i + batch], length, pad_id=pad, batch_size=batch)
        for i in range(0, len(rows), batch)
    ]


def _mask_fn(spec: S.StepSpec):
    """A jitted `(state, batch) -> {"reward_mask", ("kl_mask")}` (one per mask kind: the masks
    do not depend on beta)."""
    key = (spec.loss, spec.independent_masks, spec.reference)
    if key not in _JITTED:

        def fn(state, batch):
            ref_out, _ = forward.reference_outputs(spec, state, state.params, batch)
            return forward.token_masks(spec, state, state.params, ref_out, batch.loss_mask)

        _JITTED[key] = jax.jit(fn)
    return _JITTED[key]


def token_classes(tokenizer, ids) -> tuple[list[str], np.ndarray]:
    """Decoded pieces of completion token ids and their class: 1 positive lexicon, -1
    negative lexicon (by character overlap with lexicon words), 2 a special token (EOS), 0 any
    other (neutral) token."""
    special = set(tokenizer.all_special_ids)
    pieces = [tokenizer.decode([int(t)]) for t in ids]
    text = "".join(pieces)
    owner = np.zeros(len(text), np.int8)
    for m in _WORD.finditer(text):
        word = m.group()
        owner[m.start() : m.end()] = 1 if word in _POSITIVE else -1 if word in _NEGATIVE else 0
    out, start = np.zeros(len(pieces), np.int8), 0
    for k, piece in enumerate(pieces):
        span = owner[start : start + len(piece)]
        hit = span[span != 0]
        out[k] = 2 if int(ids[k]) in special else hit[0] if hit.size else 0
        start += len(piece)
    return pieces, out


def _summary(weights: np.ndarray, classes: np.ndarray) -> dict:
    lexicon = (classes == 1) | (classes == -1)
    lex, neu = weights[lexicon], weights[~lexicon]

    def mean(x):
        return float(x.mean()) if x.size else float("nan")

    return dict(
        lexicon=mean(lex),
        neutral=mean(neu),
        positive=mean(weights[classes == 1]),
        negative=mean(weights[classes == -1]),
        eos=mean(weights[classes == 2]),
        ratio=mean(lex) / mean(neu) if neu.size and mean(neu) > 0 else float("nan"),
        zero_fraction=float(np.mean(weights == 0)),
        mean=mean(weights),
        tokens_lexicon=int(lex.size),
        tokens_neutral=int(neu.size),
    )


def mask_stats(session, state, batches, tokenizer, *, keep_examples: int = 0) -> tuple:
    """Mask statistics of `state` on `batches`: ({mask name: summary}, examples), examples
    being the first `keep_examples` / 2 distinct chosen and rejected completions as (side,
    pieces, classes, {mask name: weights})."""
    fn = _mask_fn(session.spec)
    weights: dict[str, list] = {}
    classes, examples = [], []
    for batch in batches:
        masks = jax.device_get(fn(state, batch))
        valid = np.asarray(batch.valid, bool)
        n = valid.shape[0]
        for r in range(2 * n):
            if not valid[r % n]:
                continue
            keep = np.asarray(batch.loss_mask[r], bool)
            pieces, cls = token_classes(tokenizer, np.asarray(batch.labels[r])[keep])
            classes.append(cls)
            per = {name: np.asarray(m[r])[keep] for name, m in masks.items()}
            for name, w in per.items():
                weights.setdefault(name, []).append(w)
            side = "chosen" if r < n else "rejected"
            shown = [e for e in examples if e[0] == side]
            if len(shown) < keep_examples // 2 and all(e[1] != pieces for e in shown):
                examples.append((side, pieces, cls, per))
    cls = np.concatenate(classes)
    stats = {name: _summary(np.concatenate(ws), cls) for name, ws in weights.items()}
    return stats, examples


def _wrap(pieces, width):
    lines, line, used = [], [], 0
    for k, piece in enumerate(pieces):
        if line and used + len(piece) > width:
            lines.append(line)
            line, used = [], 0
        line.append(k)
        used += len(piece)
    return lines + [line] if line else lines


def plot_masks(panels: list[tuple[str, list, str]], path: Path, *, width: int = 96) -> Path:
    """Completions with tokens shaded by mask weight (scaled by the largest weight shown in
    each panel; lexicon tokens in bold). `panels`: (title, examples from `mask_stats`, mask
    name: "reward_mask" or "kl_mask")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    layout = []  # (kind, payload) per text line
    for title, examples, name in panels:
        top = max([float(np.max(e[3][name], initial=0.0)) for e in examples] + [1e-12])
        layout.append(("title", f"{title} (darkest = {top:.2f})"))
        for side, pieces, cls, per in examples:
            w = per[name]
            for k, idx in enumerate(_wrap(pieces, width - 10)):
                layout.append(("line", (side if k == 0 else "", pieces, cls, w / top, idx)))
    if not layout:
        layout.append(("title", "(no SparsePO / MaPO run in this study)"))
    char_in, line_in = 9 * 0.6 / 72, 0.24
    fig = plt.figure(figsize=(width * char_in + 0.4, len(layout) * line_in + 0.4))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
    ax.set_xlim(0, width)
    ax.set_ylim(len(layout), 0)
    ax.axis("off")
    cmap = plt.get_cmap("Oranges")
    for y, (kind, payload) in enumerate(layout):
        if kind == "title":
            ax.text(0, y + 0.7, payload, fontsize=10, fontweight="bold", family="sans-serif")
            continue
        side, pieces, cls, scaled, idx = payload
        ax.text(0, y + 0.7, side, fontsize=8, family="monospace", color="0.4")
        x = 10
        for k in idx:
            piece = pieces[k]
            ax.add_patch(
                Rectangle((x, y + 0.1), len(piece), 0.85, color=cmap(float(scaled[k])), linewidth=0)
            )
            ax.text(
                x,
                y + 0.72,
                piece,
                fontsize=9,
                family="monospace",
                fontweight="bold" if cls[k] in (1, -1) else "normal",
            )
            x += len(piece)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
