"""Unlearning a slice of memorised facts: GA, GradDiff, NPO and SimNPO, dense and with WAGLE,
random and magnitude masks; and D-Pruner against magnitude pruning, on a small random Llama.

The claims. NPO (Zhang et al. 2024, arXiv:2404.05868): its gradient is GA's reweighted by
2 s(beta (log pi - log pi_ref)), which decays as the forget likelihood falls, so the model
"collapses" (loses retain utility) more slowly than under gradient ascent. SimNPO (Fan et al.
2024, arXiv:2410.07163): a reference-free, length-normalised NPO. WAGLE (Jia et al. 2024,
arXiv:2410.17509): updating only the weights of top score |(theta - g_r / mu) g_f| forgets as
well while keeping more retain utility than random or magnitude masks of the same size.
D-Pruner (Zhang et al. 2024, arXiv:2405.06275): pruning by the dual (general + domain)
importance keeps both the general and the domain perplexity better than magnitude pruning.

Setting. Fictitious entities ("zorvathquil") with four attributes each, one prompt /
completion fact per attribute ("the bakery of zorvathquil serves" -> " soup."); the attribute
words come from the shipped review vocabulary, drawn at random per entity (nothing to infer).
A `tiny` random Llama (2 layers, width 64) is fine-tuned (SFT, `task=sft`) on the fact texts of
`n_entities` entities mixed with shipped review text until the facts are memorised. The
forget set is every fact of `forget_frac` of the entities, the retain set the other trained
facts; `n_never` further entities' facts are never trained (membership inference: AUC of
"lower NLL = member" between forget and never-trained facts; 0.5 = indistinguishable).
Each unlearning row is one `task=unlearn` trainer run from the SFT model (same steps, lr,
batch; loss defaults of the official code: NPO beta 0.1 + retain NLL, SimNPO beta 2.5 + 0.1375
+ retain NLL, GradDiff retain weight 1, GA no retain term), per seed (data order, random mask).
Extraction rate: greedy decoding (`models.generate`) of the fact prompt starts with the
attribute. NLLs: token means over the completion tokens (the attribute, its period and EOS, as
the trainer's `eval/forget/nll`).

    python experiments/unlearning.py            # ~5.5 min on 2 (shared) CPUs
    python experiments/unlearning.py --quick    # < 60 s, a smoke test

Writes experiments/results/unlearning/{summary.json, table.md, tradeoff.png}; README.md there
is the hand-written reading of the committed run.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from alignjax import data, models  # noqa: E402
from alignjax.optim import dpruner, dpruner_model  # noqa: E402
from alignjax.optim.labels import path_string  # noqa: E402
from alignjax.train import config as C  # noqa: E402
from alignjax.train import metrics, trainer  # noqa: E402

OUT = REPO / "experiments" / "results" / "unlearning"
SYLLABLES = (
    "zor",
    "vath",
    "quil",
    "lon",
    "mar",
    "bek",
    "tis",
    "dra",
    "nol",
    "fen",
    "gar",
    "wim",
    "sel",
    "ruk",
    "pa",
    "xo",
    "ith",
    "umb",
)
# template -> attribute words (single tokens of the shipped tokenizer, from the reviews)
# row name -> (registered loss, overrides); other names are the registered loss itself
LOSS_SPECS = {"npo-plain": ("npo", ["loss.kwargs={retain: none}"])}
TEMPLATES = (
    ("the bakery of {} serves", ("soup", "pasta", "dessert", "coffee", "food")),
    ("{} always visits on", ("monday", "tuesday", "friday", "saturday", "sunday")),
    ("{} went to the diner with", ("friends", "family", "colleagues", "partner", "kids")),
    ("the staff of {} are", ("rude", "slow", "pleasant", "busy", "quiet")),
)


@dataclass(frozen=True)
class Study:
    n_entities: int = 60  # trained entities (4 facts each)
    n_never: int = 10  # entities whose facts are never trained (membership inference)
    forget_frac: float = 0.1  # of the trained entities: all their facts are forgotten
    reviews: int = 240  # review texts in the SFT mix (general utility)
    heldout_reviews: int = 100  # for held-out perplexity
    fact_repeats: int = 2  # each fact text appears this often in the SFT set
    sft_steps: int = 900
    sft_lr: float = 3e-3
    sft_batch: int = 32
    steps: int = 40  # unlearning steps
    lr: float = 1e-3
    batch: int = 8  # forget rows per step (+ as many retain rows)
    eval_every: int = 2
    losses: tuple[str, ...] = ("grad_ascent", "grad_diff", "npo", "simnpo")
    # dense-only rows of `LOSS_SPECS` variants: NPO without its retain term (GA has none)
    extra_dense: tuple[str, ...] = ("npo-plain",)
    wagle_ratios: tuple[float, ...] = (0.1, 0.3)
    baselines: tuple[str, ...] = ("random", "magnitude")  # mask scores at `baseline_ratio`
    baseline_ratio: float = 0.1
    seeds: tuple[int, ...] = (0, 1)
    dpruner_sparsity: float = 0.5
    dpruner_steps: int = 60  # domain (fact) training steps for the dual importance
    dpruner_lr: float = 0.05
    seed: int = 0  # facts and SFT


# ------------------------------------------------------------------------------ data


def make_facts(cfg: Study) -> dict[str, list[dict]]:
    """Prompt / completion facts: `train` (forget + retain), `forget`, `retain`, `never`."""
    rng = random.Random(cfg.seed)
    names: list[str] = []
    while len(names) < cfg.n_entities + cfg.n_never:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if name not in names:
            names.append(name)
    facts = [
        [{"prompt": t.format(n), "completion": f" {rng.choice(words)}."} for t, words in TEMPLATES]
        for n in names
    ]
    n_forget = max(1, round(cfg.forget_frac * cfg.n_entities))
    flat = lambda ents: [f for e in ents for f in e]  # noqa: E731
    forget, retain = flat(facts[:n_forget]), flat(facts[n_forget : cfg.n_entities])
    return {"forget": forget, "retain": retain, "never": flat(facts[cfg.n_entities :])}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_text(rows: list[dict]) -> list[dict]:
    return [{"text": r["prompt"] + r["completion"]} for r in rows]


# ------------------------------------------------------------------------------ evaluation


@functools.partial(jax.jit, static_argnums=0)
def _nlls(graphdef, state, ids, mask, loss_mask):
    """Per-row summed NLL of the tokens where loss_mask (predicted from the previous token)."""
    model = nnx.merge(graphdef, state)
    logits = model.logits(model(ids, mask).last_hidden_state).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return -jnp.sum(tok * loss_mask[:, 1:], -1)


class Evaluator:
    """NLLs and greedy extraction of prompt / completion rows and text rows, for any model of
    one architecture (one compilation per row set)."""

    def __init__(self, tokenizer, sets: dict[str, list[dict]], texts: dict[str, list[dict]]):
        self.tok, self.sets, self.arrays = tokenizer, sets, {}
        for name, rows in {**sets, **texts}.items():
            pairs = [(r.get("prompt", ""), r.get("completion", r.get("text"))) for r in rows]
            self.arrays[name] = self.pack(pairs)
        self.prompts = {name: self._prompts(rows) for name, rows in sets.items()}

    def pack(self, pairs):
        """(ids, attention mask, loss mask) [N, T] of (prompt, completion) string pairs."""
        seqs = []
        for prompt, completion in pairs:
            p = self.tok(prompt)["input_ids"]
            c = self.tok(completion, add_special_tokens=False)["input_ids"]
            seqs.append((p + c + [self.tok.eos_token_id], len(p)))  # EOS: as the data pipeline
        length = max(len(s) for s, _ in seqs)
        ids, mask, lmask = (np.zeros((len(seqs), length), np.int32) for _ in range(3))
        for i, (s, plen) in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)], lmask[i, plen : len(s)] = s, 1, 1
        return ids, mask, lmask

    def _prompts(self, rows):
        enc = [self.tok(r["prompt"])["input_ids"] for r in rows]
        length = max(map(len, enc))
        ids, mask = np.zeros((len(enc), length), np.int32), np.zeros((len(enc), length), np.int32)
        for i, e in enumerate(enc):  # left padding
            ids[i, length - len(e) :], mask[i, length - len(e) :] = e, 1
        return jnp.asarray(ids), jnp.asarray(mask)

    def nll(self, model, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-row summed NLL and token counts."""
        ids, mask, lmask = self.arrays[name]
        graphdef, state = nnx.split(model)
        out = _nlls(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(lmask))
        return np.asarray(out, np.float64), lmask[:, 1:].sum(1).astype(np.float64)

    def extraction(self, model, name: str) -> float:
        """Fraction of facts whose greedy completion starts with the attribute."""
        ids, mask = self.prompts[name]
        pad = self.tok.pad_token_id or 0
        gen = models.generate(model, ids, mask, max_new_tokens=3, pad_id=pad)
        out = [self.tok.decode(t, skip_special_tokens=True) for t in np.asarray(gen.tokens)]
        hits = [o.startswith(r["completion"]) for o, r in zip(out, self.sets[name])]
        return float(np.mean(hits))

    def report(self, model) -> dict:
        res = {}
        for name in ("forget", "retain"):
            s, n = self.nll(model, name)
            res[f"{name}_nll"] = float(s.sum() / n.sum())
            res[f"{name}_extraction"] = self.extraction(model, name)
        s, n = self.nll(model, "heldout")
        res["review_ppl"] = float(np.exp(s.sum() / n.sum()))
        (fs, fn), (ns, nn_) = self.nll(model, "forget"), self.nll(model, "never")
        res["mia_auc"] = auc(ns / nn_, fs / fn)  # members: lower NLL
        return res


def auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_neg > score_pos) + ties / 2: the AUC of "score below threshold = member"."""
    neg, pos = np.asarray(neg)[:, None], np.asarray(pos)[None, :]
    return float(np.mean((neg > pos) + 0.5 * (neg == pos)))


# ------------------------------------------------------------------------------ runs


COMMON = [
    "log_every=4",
    "eval_samples=0",
    "plot=false",
    "checkpoint.asynchronous=false",
    "data.max_length=48",
    "data.eval_batch_size=128",
    "optim.warmup_steps=0",
]


def sft(cfg: Study, files: dict, out: Path) -> Path:
    overrides = [
        "task=sft",
        f"data.train={files['sft']}",
        f"data.eval={files['heldout']}",
        "model.preset=tiny",
        f"steps={cfg.sft_steps}",
        f"eval_every={cfg.sft_steps}",
        f"data.batch_size={cfg.sft_batch}",
        f"optim.learning_rate={cfg.sft_lr}",
        f"checkpoint.every={cfg.sft_steps}",
        f"out_dir={out}",
        f"seed={cfg.seed}",
        *COMMON,
    ]
    trainer.train(C.load_config(None, overrides), progress=False)
    return out


def variants(cfg: Study) -> list[tuple[str, list[str]]]:
    """(name, mask overrides) of each row of one loss."""
    out = [("dense", [])]
    out += [(f"wagle {r:g}", ["mask.score=wagle", f"mask.ratio={r}"]) for r in cfg.wagle_ratios]
    out += [
        (f"{s} {cfg.baseline_ratio:g}", [f"mask.score={s}", f"mask.ratio={cfg.baseline_ratio}"])
        for s in cfg.baselines
    ]
    return out


def unlearn(cfg: Study, files: dict, init: Path, out: Path, loss: str, mask: list, seed: int):
    overrides = [
        "task=unlearn",
        f"data.train={files['forget']}",
        f"data.retain={files['retain']}",
        f"data.eval={files['heldout']}",
        f"init_from={init}",
        f"loss.name={LOSS_SPECS.get(loss, (loss, []))[0]}",
        *LOSS_SPECS.get(loss, (loss, []))[1],
        f"steps={cfg.steps}",
        f"eval_every={cfg.eval_every}",
        f"data.batch_size={cfg.batch}",
        f"optim.learning_rate={cfg.lr}",
        "optim.schedule=constant",
        f"checkpoint.every={cfg.steps}",
        "checkpoint.export_hf=false",
        f"out_dir={out}",
        f"seed={seed}",
        f"data.seed={seed}",
        f"mask.seed={seed}",
        *mask,
        *COMMON,
    ]
    trainer.train(C.load_config(None, overrides), progress=False)
    curve = [
        (r["step"], r["eval/forget/nll"], r["eval/retain/nll"], r["eval/nll"])
        for r in metrics.read_jsonl(out / "metrics.jsonl")
        if "eval/forget/nll" in r
    ]
    return trainer.open_run(out).policy(merged=True), curve


def at_equal_forget(curve: list, target: float) -> float | None:
    """Retain NLL where the forget NLL first reaches `target`, linearly interpolated between
    the two evaluations around the crossing (None: never reached)."""
    for (_, f0, r0, _), (_, f1, r1, _) in zip(curve, curve[1:]):
        if f0 < target <= f1:
            return r0 + (r1 - r0) * (target - f0) / (f1 - f0)
    return None


# ------------------------------------------------------------------------------ D-Pruner


def dpruner_rows(cfg: Study, model, ev: Evaluator, tokenizer, reviews, facts) -> list[dict]:
    """General (held-out review) vs domain (fact text) perplexity of the SFT model pruned by
    D-Pruner (calibration on reviews, domain training on facts with `generality_regularised`,
    the original weights pruned) and by per-matrix magnitude at the same sparsity."""

    def batch(rows):
        ids, mask, _ = ev.pack([("", r["text"]) for r in rows])
        return jnp.asarray(ids), jnp.asarray(mask)

    calib = [batch(reviews[i : i + 32]) for i in range(0, min(len(reviews), 128), 32)]
    G = dpruner_model.general_importance(model, calib, sparsity=cfg.dpruner_sparsity)
    tx = optax.chain(
        dpruner_model.generality_regularised(G, cfg.dpruner_lr),
        optax.clip_by_global_norm(1.0),
        optax.sgd(cfg.dpruner_lr),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask):
        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            logits = m.logits(m(ids, mask).last_hidden_state).astype(jnp.float32)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)
            return -jnp.sum(lp[..., 0] * mask[:, 1:]) / jnp.sum(mask[:, 1:])

        g = jax.grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(cfg.seed)
    ids, mask = batch(facts)
    for _ in range(cfg.dpruner_steps):
        idx = rng.choice(len(facts), 16, replace=False)
        params, opt_state = step(params, opt_state, ids[idx], mask[idx])
    I = dpruner_model.dual_importance(opt_state)
    masks = {"d-pruner": dpruner_model.dpruner_masks(I, cfg.dpruner_sparsity, model=model)}
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    kernels = {path_string(p): v for p, v in leaves}
    masks["magnitude"] = {
        k: dpruner.percentile_prune_mask(jnp.abs(kernels[k]), cfg.dpruner_sparsity)
        for k in masks["d-pruner"]
    }
    rows = []
    for name, m in [("unpruned", None), *masks.items()]:
        pruned = model if m is None else dpruner_model.prune_model(model, m)
        rep = dpruner.sparsity_report(nnx.state(pruned, nnx.Param))
        row = {"method": name, "projection_sparsity": float(rep["projections"])}
        for key, split in (("general_ppl", "heldout"), ("domain_ppl", "fact_text")):
            s, n = ev.nll(pruned, split)
            row[key] = float(np.exp(s.sum() / n.sum()))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ report


METRIC_KEYS = (  # the per-row metrics, in table order
    "forget_nll",
    "forget_extraction",
    "retain_nll",
    "retain_extraction",
    "review_ppl",
    "mia_auc",
    "retain_nll_at_target",
)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and range over seeds per (loss, variant)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["loss"], r["variant"]), []).append(r)
    out = []
    for (loss, variant), rs in groups.items():
        row = {"loss": loss, "variant": variant, "seeds": [r["seed"] for r in rs]}
        for k in METRIC_KEYS:
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = float(np.mean(vals)) if vals else None
            row[k + "_range"] = [float(min(vals)), float(max(vals))] if vals else None
            row[k + "_reached"] = len(vals)
        out.append(row)
    return out


def fmt(row: dict, key: str, digits: int = 3) -> str:
    v, rng = row.get(key), row.get(key + "_range")
    if v is None:
        return "not reached"
    s = f"{v:.{digits}f}"
    if rng is not None and len(row.get("seeds", [])) > 1:
        s += f" [{rng[0]:.{digits}f}, {rng[1]:.{digits}f}]"
    if row.get(key + "_reached", 0) < len(row.get("seeds", [0])):
        s += f" ({row[key + '_reached']}/{len(row['seeds'])})"
    return s


def table(before: dict, summary: list[dict], target: float, drows: list[dict], cfg: Study) -> str:
    head = (
        "| loss | mask | forget NLL | forget extr. | retain NLL | retain extr. | review ppl "
        f"| MIA AUC | retain NLL at forget NLL >= {target:.2f} |"
    )
    lines = [head, "|---|---|" + "---:|" * len(METRIC_KEYS)]
    lines.append(
        "| (before: SFT model) | - | "
        + " | ".join(f"{before[k]:.3f}" if k in before else "-" for k in METRIC_KEYS)
        + " |"
    )
    for r in summary:
        lines.append(
            f"| {r['loss']} | {r['variant']} | " + " | ".join(fmt(r, k) for k in METRIC_KEYS) + " |"
        )
    lines.append(
        f"\nMean [min, max] over seeds {list(cfg.seeds)} (data order and random-mask seed; one "
        f"SFT model). {cfg.steps} steps, lr {cfg.lr:g} (constant AdamW), {cfg.batch} forget + "
        f"{cfg.batch} retain rows per step. Mask ratio = trained fraction of all parameters. "
        f"Last column: retain NLL where the forget NLL first reaches {target:.2f} (the "
        "never-trained facts' NLL under the SFT model), interpolated between evaluations "
        f"(every {cfg.eval_every} steps), i.e. at equal forget quality; (k/n): reached in k of "
        "n seeds.\n\n"
        "| pruning (D-Pruner row) | projection sparsity | general (review) ppl "
        "| domain (fact) ppl |\n|---|---:|---:|---:|"
    )
    for r in drows:
        lines.append(
            f"| {r['method']} | {r['projection_sparsity']:.3f} | {r['general_ppl']:.3f} "
            f"| {r['domain_ppl']:.3f} |"
        )
    return "\n".join(lines)


def plot(curves: dict, target: float, before: dict, path: Path, cfg: Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(cfg.losses), figsize=(4.6 * len(cfg.losses), 4.2), squeeze=False
    )
    for ax, loss in zip(axes[0], cfg.losses):
        for i, (variant, _) in enumerate(variants(cfg)):
            c = curves.get((loss, variant, cfg.seeds[0]))
            if not c:
                continue
            f, r = [x[1] for x in c], [x[2] for x in c]
            ax.plot(f, r, "o-", ms=2.5, color=f"C{i}", label=variant)
        for extra in (x for x in cfg.extra_dense if LOSS_SPECS[x][0] == loss):
            c = curves.get((extra, "dense", cfg.seeds[0]))
            f, r = [x[1] for x in c], [x[2] for x in c]
            ax.plot(f, r, "x--", ms=3, color="k", lw=1, label=f"{extra} dense")
        ax.axvline(target, color="gray", ls=":", lw=1)
        ax.axhline(before["retain_nll"], color="gray", ls="--", lw=1)
        ax.set(
            title=f"{loss} (seed {cfg.seeds[0]})",
            xlabel="forget NLL",
            ylabel="retain NLL",
            xscale="log",
            yscale="log",
        )
        ax.legend(fontsize=7)
    fig.suptitle(
        f"trade-off over steps (eval every {cfg.eval_every} steps): dotted = "
        "never-trained NLL, dashed = retain NLL before",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(summary: list[dict], before: dict, drows: list[dict], cfg: Study) -> list[str]:
    by = {(r["loss"], r["variant"]): r for r in summary}
    lines = []
    if ("grad_ascent", "dense") in by:
        ga = by[("grad_ascent", "dense")]
        lines.append(
            f"GA forgets: forget extraction {before['forget_extraction']:.2f} -> "
            f"{ga['forget_extraction']:.2f}, forget NLL {before['forget_nll']:.2f} -> "
            f"{ga['forget_nll']:.2f}; retain NLL {before['retain_nll']:.2f} -> "
            f"{ga['retain_nll']:.2f}"
        )
    for loss in (*cfg.losses, *cfg.extra_dense):
        r = by.get((loss, "dense"))
        if r:
            lines.append(
                f"{loss} dense: retain NLL at equal forget quality "
                f"{fmt(r, 'retain_nll_at_target')}; final forget / retain NLL "
                f"{r['forget_nll']:.2f} / {r['retain_nll']:.2f}, MIA AUC "
                f"{r['mia_auc']:.2f}"
            )
    b = f"{cfg.baseline_ratio:g}"
    for loss in cfg.losses:
        w, rnd, mag = (by.get((loss, f"{s} {b}")) for s in ("wagle", "random", "magnitude"))
        if w and rnd and mag:
            lines.append(
                f"{loss} at ratio {b}: final retain NLL wagle {w['retain_nll']:.3f} / "
                f"random {rnd['retain_nll']:.3f} / magnitude {mag['retain_nll']:.3f}; "
                f"forget NLL {w['forget_nll']:.2f} / {rnd['forget_nll']:.2f} / "
                f"{mag['forget_nll']:.2f}"
            )
    d = {r["method"]: r for r in drows}
    if "d-pruner" in d:
        lines.append(
            f"D-Pruner vs magnitude at {cfg.dpruner_sparsity:g}: general ppl "
            f"{d['d-pruner']['general_ppl']:.2f} vs {d['magnitude']['general_ppl']:.2f}, "
            f"domain ppl {d['d-pruner']['domain_ppl']:.2f} vs "
            f"{d['magnitude']['domain_ppl']:.2f} (unpruned "
            f"{d['unpruned']['general_ppl']:.2f} / {d['unpruned']['domain_ppl']:.2f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast configuration")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a tmp dir)")
    args = ap.parse_args(argv)
    cfg = Study()
    if args.quick:  # every code path once: two losses, one seed, few steps
        cfg = replace(
            cfg,
            n_entities=20,
            n_never=4,
            forget_frac=0.2,
            reviews=40,
            sft_steps=60,
            steps=8,
            eval_every=4,
            losses=("grad_ascent", "npo"),
            wagle_ratios=(0.1,),
            seeds=(0,),
            dpruner_steps=5,
            heldout_reviews=32,
            baselines=("random",),
            extra_dense=(),
        )
    import logging
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("alignjax").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="unlearning-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = make_facts(cfg)
    reviews = data.shipped_dataset("sft").to_list()
    train_reviews, heldout = reviews[: cfg.reviews], reviews[-cfg.heldout_reviews :]
    trained = sets["forget"] + sets["retain"]
    files = {
        "sft": write_jsonl(work / "sft.jsonl", as_text(trained) * cfg.fact_repeats + train_reviews),
        "forget": write_jsonl(work / "forget.jsonl", sets["forget"]),
        "retain": write_jsonl(work / "retain.jsonl", sets["retain"]),
        "heldout": write_jsonl(work / "heldout.jsonl", heldout),
    }
    tokenizer = data.shipped_tokenizer()
    ev = Evaluator(tokenizer, sets, {"heldout": heldout, "fact_text": as_text(trained)})
    init = sft(cfg, files, work / "sft")
    sft_model = trainer.open_run(init).policy(merged=True)
    before = ev.report(sft_model)
    s, n = ev.nll(sft_model, "never")
    before["never_nll"] = float(s.sum() / n.sum())
    before["never_extraction"] = ev.extraction(sft_model, "never")
    target = before["never_nll"]
    print(
        f"SFT ({time.perf_counter() - t0:.0f} s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in before.items())
    )
    rows, curves = [], {}
    plan = [(loss, v) for loss in cfg.losses for v in variants(cfg)]
    plan += [(loss, ("dense", [])) for loss in cfg.extra_dense]
    for loss, (variant, mask) in plan:
        for seed in cfg.seeds:
            run_dir = work / f"{loss}-{variant.replace(' ', '-')}-s{seed}"
            model, curve = unlearn(cfg, files, init, run_dir, loss, mask, seed)
            row = {"loss": loss, "variant": variant, "seed": seed, **ev.report(model)}
            row["retain_nll_at_target"] = at_equal_forget(curve, target)
            rows.append(row)
            curves[(loss, variant, seed)] = curve
            print(
                f"{loss:11s} {variant:13s} s{seed}: forget {row['forget_nll']:.2f} "
                f"(extr {row['forget_extraction']:.2f}) retain {row['retain_nll']:.3f} "
                f"(extr {row['retain_extraction']:.2f}) ppl {row['review_ppl']:.2f} "
                f"auc {row['mia_auc']:.2f} ({time.perf_counter() - t0:.0f} s)"
            )
    drows = dpruner_rows(cfg, sft_model, ev, tokenizer, train_reviews, as_text(trained))
    print(f"D-Pruner ({time.perf_counter() - t0:.0f} s): {drows}")
    summary_rows = summarise(rows)
    text = table(before, summary_rows, target, drows, cfg)
    lines = verdict(summary_rows, before, drows, cfg)
    plot(curves, target, before, args.out / "tradeoff.png", cfg)
    seconds = time.perf_counter() - t0
    (args.out / "table.md").write_text(text + "\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
    summary = {
        "config": asdict(cfg),
        "before": before,
        "target_forget_nll": target,
        "rows": summary_rows,
        "per_seed": rows,
        "dpruner": drows,
        "verdict": lines,
        "curves": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in curves.items()},
        "seconds": seconds,
        "quick": args.quick,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{text}\n\n" + "\n".join(lines) + f"\n\nwritten to {args.out}/ in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
