"""Controlled sentiment generation: reward vs KL of DPO, IPO, SPPO, TDPO, SparsePO, MaPO and
DPO + LoRA, and of the on-policy GRPO + KL, RLOO, online DPO, iterative DPO and SPPO's
self-play loop (`onpolicy.py`: gold reward or a reward model trained on the pairs), and where
SparsePO's / MaPO's token masks put their weight.

The claim (Christopoulou et al. 2024, SparsePO, arXiv:2410.05102): learned sparse token masks
reach a better reward-vs-KL frontier than DPO on controlled sentiment generation, and the masks
weight the tokens that carry the preference. Here at small scale, self-contained (no download):

1. Reference policy: a random `tiny` Llama (2 layers, width 64) SFT-trained on the shipped
   synthetic reviews (`alignjax/data/synthetic.py`), as `alignjax demo`'s first stage.
2. Data: review openings as prompts (train and held-out sets disjoint); K completions per train
   prompt sampled from the reference at temperature 1; gold reward `synthetic.sentiment_score`
   (lexicon balance) of the completion; pairs labelled by a Bradley-Terry draw with temperature
   `tau` (label noise measured), SPPO's win probabilities from the same gold model (`data.py`).
   Held-out pairs come the same way from the reference's samples on the held-out prompts.
3. Every method x beta trains on the same pairs with the same budget (`methods.py`); the
   on-policy rows sample their own data from the training prompts with the same budget.
4. Each policy (and the reference) samples M completions per held-out prompt at temperature 1
   (the same random keys for every policy): mean gold reward, and KL(pi || pi_ref) per
   completion by Monte Carlo on the policy's own samples, each with its standard error
   (`policy.py`).
5. Masks of SparsePO (common / independent) and MaPO on held-out completions: lexicon vs
   neutral tokens, exact zeros, a figure (`masks.py`).
6. Held-out chosen / rejected log-likelihoods during training, DPO against SPPO (`report.py`).

    python -m experiments.sentiment_control.study            # ~5 min on 2 idle CPU cores
    python -m experiments.sentiment_control.study --quick    # ~3 min, a smoke test
    python -m experiments.sentiment_control.study --full --online   # DPO + on-policy, 3 seeds

Writes to --out (default experiments/results/sentiment_control): summary.json, table.md,
frontier.png, frontier_online.png, masks.png, trajectories.png, ...; the runs (checkpoints,
pairs files) under <out>/runs, which is git-ignored and replaced on every invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from alignjax import data as D
from alignjax import models

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python experiments/sentiment_control/study.py` works too
    sys.path.insert(0, str(REPO))

from experiments.sentiment_control import data as SD  # noqa: E402
from experiments.sentiment_control import masks as MK  # noqa: E402
from experiments.sentiment_control import methods as ME  # noqa: E402
from experiments.sentiment_control import onpolicy as OP  # noqa: E402
from experiments.sentiment_control import policy as P  # noqa: E402
from experiments.sentiment_control import report as R  # noqa: E402

OUT = REPO / "experiments" / "results" / "sentiment_control"
OUT_FULL = REPO / "experiments" / "results" / "sentiment_control_full"
OUT_ONLINE_FULL = REPO / "experiments" / "results" / "sentiment_control_online_full"


@dataclasses.dataclass(frozen=True)
class Study:
    seed: int = 0
    sft_steps: int = 400
    train_prompts: int = 320
    samples_per_prompt: int = 4  # K completions per train prompt
    tau: float = 1.0  # Bradley-Terry temperature of the labels
    heldout_prompts: int = 128
    eval_samples: int = 4  # M completions per held-out prompt and policy
    heldout_pairs_per_prompt: int = 2
    max_new_tokens: int = 40
    sample_chunk: int = 256  # rows per sampler call (one compiled shape)
    prompt_length: int = 24  # prompts are left-padded to this (they have <= 18 tokens)
    max_length: int = 64  # prompt + completion in training (one compiled shape)
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    rm_steps: int = 100  # the reward model of the "rm" on-policy rows (train pairs, batch_size)
    trajectory_every: int = 10
    mask_examples: int = 4  # completions per method in masks.png
    methods: tuple[ME.Method, ...] = ME.DEFAULT_METHODS
    # training seeds of every preference run (data order, SparsePO's heads: seed + 2); the SFT
    # reference, the prompts and the pairs come from `seed`
    train_seeds: tuple[int, ...] = (0,)
    redraw_dead: bool = False  # re-train a SparsePO run whose head is dead at init (labelled)

    def runs(self) -> list[tuple[ME.Method, float, int]]:
        return [(m, b, t) for t in self.train_seeds for m in self.methods for b in m.betas]


QUICK = Study(
    sft_steps=100,
    train_prompts=64,
    heldout_prompts=32,
    eval_samples=2,
    sample_chunk=64,
    steps=30,
    batch_size=8,
    trajectory_every=5,
    rm_steps=30,
    methods=ME.QUICK_METHODS,
)
FULL = Study(methods=ME.METHODS, train_seeds=(0, 1, 2))
# Their middle beta (first training seed) logs held-out metrics every `trajectory_every` steps:
# log-likelihood trajectories and the DPO-dynamics diagnostics with the dispersion probe.
TRAJECTORIES = ("dpo", "sppo", "tdpo1", "sparsepo")


def _pairs(prompts, s: P.Samples, per_prompt: int, **kw) -> tuple[list[dict], dict]:
    """Gold rewards of the samples, then the Bradley-Terry pairs of each prompt's samples."""
    rewards = [SD.synthetic.sentiment_score(t) for t in s.texts]
    group = [slice(i * per_prompt, (i + 1) * per_prompt) for i in range(len(prompts))]
    rows, stats = SD.make_pairs(
        prompts, [s.texts[g] for g in group], [rewards[g] for g in group], **kw
    )
    stats.update(
        prompts=len(prompts),
        samples_per_prompt=per_prompt,
        sample_reward_mean=float(np.mean(rewards)),
        samples_ended_with_eos=float(s.finished.mean()),
    )
    return rows, stats


def build_data(study: Study, sft_dir: Path, data_dir: Path) -> dict:
    """Stage 2: prompts, reference samples, gold rewards, BT pairs (train and held-out), and
    the reference policy's own evaluation on the held-out prompts (its samples are the
    held-out pairs' completions)."""
    tok = D.shipped_tokenizer()
    ref = P.on_device(models.load_pretrained(sft_dir / "export" / "merged"))
    train_prompts = SD.draw_prompts("train", study.train_prompts, study.seed)
    heldout = SD.draw_prompts(
        "heldout", study.heldout_prompts, study.seed, frozenset(train_prompts)
    )
    if set(train_prompts) & set(heldout):
        raise AssertionError("train and held-out prompts overlap")
    key = jax.random.key(study.seed)
    ids, mask = SD.encode_prompts(tok, train_prompts, study.prompt_length)
    k, m = study.samples_per_prompt, study.eval_samples
    gen = dict(max_new_tokens=study.max_new_tokens, chunk=study.sample_chunk)
    s = P.sample(ref, ids, mask, tok, jax.random.fold_in(key, 0), per_prompt=k, **gen)
    rows, stats = _pairs(train_prompts, s, k, tau=study.tau, seed=study.seed)
    SD.write_jsonl(data_dir / "train_pairs.jsonl", rows)
    # the on-policy rows' prompt-only dataset: the same training prompts
    SD.write_jsonl(data_dir / "train_prompts.jsonl", [dict(prompt=p) for p in train_prompts])

    heldout_ids = SD.encode_prompts(tok, heldout, study.prompt_length)
    eval_key = jax.random.fold_in(key, 1)
    reference, hs = P.evaluate_policy(ref, ref, *heldout_ids, tok, eval_key, per_prompt=m, **gen)
    hrows, hstats = _pairs(
        heldout,
        hs,
        m,
        tau=study.tau,
        seed=study.seed + 1,
        pairs_per_prompt=study.heldout_pairs_per_prompt,
    )
    SD.write_jsonl(data_dir / "heldout_pairs.jsonl", hrows)
    # The dispersion probe: one more reference sample per held-out prompt, in neither set of
    # pairs (its own key), whose log-prob and entropy the trajectory runs log.
    ps = P.sample(ref, *heldout_ids, tok, jax.random.fold_in(key, 2), per_prompt=1, **gen)
    probe = [
        dict(prompt=heldout[ps.prompt_index[i]], completion=ps.texts[i])
        for i in range(len(ps.texts))
    ]
    SD.write_jsonl(data_dir / "probe.jsonl", probe)
    examples = [dict(prompt=heldout[hs.prompt_index[i]], completion=hs.texts[i]) for i in range(3)]
    return dict(
        train=stats,
        heldout=hstats,
        reference=reference,
        examples=examples,
        tokenizer=tok,
        model=ref,
        train_prompts=train_prompts,
        heldout_ids=heldout_ids,
        eval_key=eval_key,
    )


def _mask_rows(method, beta, seed, session, batches, tok, examples_wanted, init: bool):
    """Mask statistics of a run: the trained masks, and (`init`) its heads at initialisation,
    the control (the same for every beta of one seed). MaPO's mask is a function of the
    reference alone, so only one of its runs is analysed."""
    if method.loss == "mapo":
        states = [("reference activations", session.state)] if init else []
    else:
        states = [("trained", session.state)] + ([("init", session.initial_state)] if init else [])
    rows, examples = [], []
    for name, state in states:
        stats, ex = MK.mask_stats(
            session, state, batches, tok, keep_examples=examples_wanted if name != "init" else 0
        )
        examples = examples or ex
        for mask_name, s in stats.items():
            rows.append(
                dict(
                    method=method.name,
                    label=method.label,
                    beta=beta,
                    seed=seed,
                    mask=mask_name.removesuffix("_mask"),
                    state=name,
                    stats=s,
                )
            )
    return rows, examples


def _dead_at_init(mask_rows, method, seed) -> bool | None:
    """A learned head is dead when its initial mask is exactly 0 on every held-out completion
    token (`losses.sparse_mask.dead_heads`' criterion, on the held-out pairs)."""
    init = [
        r
        for r in mask_rows
        if r["method"] == method.name and r["seed"] == seed and r["state"] == "init"
    ]
    return any(r["stats"]["zero_fraction"] == 1.0 for r in init) if init else None


def run_all(study: Study, out: Path, *, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    work = out / "runs"
    shutil.rmtree(work, ignore_errors=True)  # runs resume from checkpoints: start afresh
    work.mkdir(parents=True)
    (work / ".gitignore").write_text("*\n")
    seconds = {}

    sft_dir = work / "sft"
    print(f"[1/6] SFT of the reference policy ({study.sft_steps} steps)", flush=True)
    seconds["sft"] = ME.train_run(ME.sft_config(sft_dir, steps=study.sft_steps, seed=study.seed))

    print("[2/6] sampling the reference, gold rewards, Bradley-Terry pairs", flush=True)
    t0 = time.perf_counter()
    d = build_data(study, sft_dir, work / "data")
    seconds["data"] = time.perf_counter() - t0
    tok, ref, eval_key = d["tokenizer"], d["model"], d["eval_key"]
    hids, hmask = d["heldout_ids"]
    reference = dict(d["reference"], train_seconds=seconds["sft"])
    print(
        f"      {d['train']['pairs']} train pairs (label noise "
        f"{d['train']['label_noise_rate']:.3f}), {d['heldout']['pairs']} held-out pairs; "
        f"reference reward {reference['reward']:.2f} ± {reference['reward_se']:.2f}",
        flush=True,
    )

    rm = None
    if any(m.online and m.scorer == "rm" for m in study.methods):
        print(f"[2b/6] reward model on the train pairs ({study.rm_steps} steps)", flush=True)
        rm_cfg = OP.reward_model_config(
            work / "reward_model",
            sft_dir=sft_dir,
            pairs=work / "data" / "train_pairs.jsonl",
            steps=study.rm_steps,
            batch_size=study.batch_size,
            seed=study.seed,
        )
        rm = OP.train_reward_model(rm_cfg, work / "data" / "heldout_pairs.jsonl")
        seconds["reward_model"] = rm["train_seconds"]
        print(
            f"      held-out pairs: accuracy {rm['accuracy_labels']:.3f} against the labels "
            f"(the gold order agrees with {rm['labels_agree_with_gold']:.3f} of them), "
            f"{rm['accuracy_gold']:.3f} against the gold order; correlation with the gold "
            f"reward {rm['gold_correlation']:.2f}",
            flush=True,
        )

    n_runs = len(study.runs())
    print(
        f"[3-5/6] {n_runs} preference runs ({len(study.train_seeds)} training seed(s)): "
        "train, evaluate, masks",
        flush=True,
    )
    sample_kw = dict(
        per_prompt=study.eval_samples,
        max_new_tokens=study.max_new_tokens,
        chunk=study.sample_chunk,
    )
    runs, mask_rows, mask_panels, curves, mask_curves = [], [], [], {}, {}
    head_seeds, dead_heads = {}, {}  # (method, seed) -> re-drawn head seed / dead at init
    batches = None
    first_seed = study.train_seeds[0]
    bar = tqdm(study.runs(), desc="runs", unit="run", disable=not progress, position=0)
    for method, beta, seed in bar:
        name = f"{method.name}_beta{beta:g}_seed{seed}"
        middle = method.betas[len(method.betas) // 2]
        traj = method.name in TRAJECTORIES and beta == middle and seed == first_seed
        kw = dict(
            sft_dir=sft_dir,
            pairs=work / "data" / "train_pairs.jsonl",
            steps=study.steps,
            batch_size=study.batch_size,
            learning_rate=study.learning_rate,
            seed=seed,
            eval_pairs=work / "data" / "heldout_pairs.jsonl" if traj else None,
            eval_every=study.trajectory_every,
            probe=work / "data" / "probe.jsonl",
        )
        key = (method.name, seed)
        dead, online_info = None, None
        if method.online:
            train_s, policy, online_info = _online_run(study, method, beta, seed, work, name,
                                                       sft_dir, d, ref, progress)  # fmt: skip
            t0 = time.perf_counter()
        else:
            cfg = ME.preference_config(
                method, beta, work / name, head_seed=head_seeds.get(key), **kw
            )
            train_s = ME.train_run(cfg)
            t0 = time.perf_counter()
            session, policy = P.load_run(work / name, ref)
            first = beta == method.betas[0]
            if method.masks or method.learned_heads:
                if batches is None:
                    batches = MK.load_pairs(
                        work / "data" / "heldout_pairs.jsonl", session, length=study.max_length
                    )
                rows, examples = _mask_rows(
                    method, beta, seed, session, batches, tok, study.mask_examples, init=first
                )
                if method.learned_heads and first:
                    dead = _dead_at_init(rows, method, seed)
                    head_seed = seed + 2  # `trainer`'s default head seed
                    while dead and study.redraw_dead:  # the labelled option: re-draw, re-train
                        head_seed += 1000
                        head_seeds[key] = head_seed
                        del session, policy
                        shutil.rmtree(work / name)
                        cfg = ME.preference_config(
                            method, beta, work / name, head_seed=head_seed, **kw
                        )
                        train_s += ME.train_run(cfg)
                        session, policy = P.load_run(work / name, ref)
                        rows, examples = _mask_rows(
                            method,
                            beta,
                            seed,
                            session,
                            batches,
                            tok,
                            study.mask_examples,
                            init=True,
                        )
                        dead = _dead_at_init(rows, method, seed)
                    dead_heads[key] = dead
                elif method.learned_heads:
                    dead = dead_heads.get(key)
                mask_rows += rows
                panel = beta == method.betas[0] if method.loss == "mapo" else beta == middle
                if panel and seed == first_seed:
                    what = "any beta" if method.loss == "mapo" else f"beta {beta:g}, trained"
                    for mask in ("reward", "kl") if method.independent_masks else ("reward",):
                        title = f"{method.label} ({what}): {mask} mask"
                        mask_panels.append((title, examples, f"{mask}_mask"))
        redrawn = head_seeds.get(key)
        result, s = P.evaluate_policy(policy, ref, hids, hmask, tok, eval_key, **sample_kw)
        run = dict(
            method=method.name,
            label=method.label,
            loss=method.loss,
            beta=beta,
            seed=seed,
            trained="LoRA r16" if method.lora else "full",
            train_seconds=train_s,
            dead_head=dead,
            redrawn_head_seed=redrawn,
            scorer=method.scorer if method.online else None,
            online=online_info,
            **result,
            examples=s.texts[:3],
        )
        if traj:
            curves[method.label] = work / name / "metrics.jsonl"
        if method.learned_heads and beta == 0.8 and seed == first_seed:
            mask_curves[method.label] = work / name / "metrics.jsonl"
        run["eval_seconds"] = time.perf_counter() - t0
        runs.append(run)
        flag = " (head dead at init)" if dead else f" (head re-drawn: {redrawn})" if redrawn else ""
        bar.write(
            f"  {method.label:40s} beta {beta:<6g} seed {seed} reward {run['reward']:+.2f} ± "
            f"{run['reward_se']:.2f}  KL {run['kl']:6.2f} ± {run['kl_se']:.2f}  "
            f"({train_s:.0f} s + {run['eval_seconds']:.0f} s){flag}"
        )
        del policy
    bar.close()
    seconds["preference_runs"] = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)

    print("[6/6] tables and figures", flush=True)
    configs = R.aggregate(runs, reference)
    figures = dict(
        frontier_figures(configs, reference, study.methods, out),
        masks=MK.plot_masks(mask_panels, out / "masks.png"),
        trajectories=R.plot_trajectories(curves, out / "trajectories.png"),
        dynamics=R.plot_dynamics(curves, out / "dynamics.png"),
        mask_training=R.plot_mask_training(mask_curves, out / "mask_training.png"),
    )
    table = R.runs_table(configs, reference, seeds=len(study.train_seeds))
    mtable = R.masks_table(mask_rows)
    dtable = R.dynamics_table(curves)
    verdict = R.verdict(configs, mask_rows, study.methods)
    seconds["total"] = time.perf_counter() - t_start
    (out / "table.md").write_text(f"{table}\n\n{mtable}\n\n{dtable}\n")
    summary = dict(
        config=_config_dict(study),
        data=dict(train=d["train"], heldout=d["heldout"], reference_examples=d["examples"]),
        reference=reference,
        reward_model=rm,
        runs=runs,
        configs=configs,
        masks=mask_rows,
        dynamics=R.dynamics_rows(curves),
        frontier=R.frontier_means(configs),
        verdict=verdict,
        figures={k: v.name for k, v in figures.items()},  # relative to the results folder
        seconds=seconds,
        versions=dict(jax=jax.__version__),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary | dict(table=table, masks_table=mtable, dynamics_table=dtable)


def frontier_figures(configs, reference, methods, out: Path) -> dict:
    """The frontier figures: the offline methods (SparsePO's faithful row only), the SparsePO
    variants with DPO and TDPO1, and (with on-policy rows) DPO with the on-policy rows."""
    main = [
        m
        for m in methods
        if not m.online and (not m.name.startswith("sparsepo_") or m.name == "sparsepo")
    ]
    sparse = [m for m in methods if m.name in ("dpo", "tdpo1") or m.loss == "sparsepo"]
    onpolicy = [m for m in methods if m.name == "dpo" or m.online]
    figures = dict(
        frontier=R.plot_frontier(configs, reference, main, out / "frontier.png"),
        frontier_sparsepo=R.plot_frontier(
            configs, reference, sparse, out / "frontier_sparsepo.png"
        ),
    )
    if any(m.online for m in methods):
        path = out / "frontier_online.png"
        figures["frontier_online"] = R.plot_frontier(configs, reference, onpolicy, path)
    return figures


def replot(out: Path) -> dict:
    """Re-draw the frontier figures of a finished study from its `summary.json` (the methods
    by name from `methods.BY_NAME`, as the run recorded them); returns the figure paths."""
    summary = json.loads((out / "summary.json").read_text())
    methods = []
    for m in summary["config"]["methods"]:
        base = ME.BY_NAME[m["name"]]
        methods.append(dataclasses.replace(base, betas=tuple(m["betas"])))
    return frontier_figures(summary["configs"], summary["reference"], methods, out)


def _online_run(study, method, beta, seed, work, name, sft_dir, d, ref, progress):
    """Train one on-policy row (`onpolicy.py`); returns (wall seconds, policy, record)."""
    t0 = time.perf_counter()
    gen = dict(max_new_tokens=study.max_new_tokens, prompt_length=study.prompt_length)
    if method.online in OP.ONLINE_METHODS:
        cfg = OP.online_config(method.online, beta, work / name, scorer=method.scorer,
                               sft_dir=sft_dir, prompts=work / "data" / "train_prompts.jsonl",
                               steps=study.steps, batch_size=study.batch_size,
                               learning_rate=study.learning_rate, seed=seed, **gen)  # fmt: skip
        ME.train_run(cfg)
        _, policy = P.load_run(work / name, ref)
        return time.perf_counter() - t0, policy, dict(method=method.online, steps=study.steps)
    steps = study.steps // OP.ITERATIONS
    base = ME.preference_config(method, beta, work / name / "base", sft_dir=sft_dir,
                                pairs=work / "data" / "train_pairs.jsonl", steps=steps,
                                batch_size=study.batch_size, learning_rate=study.learning_rate,
                                seed=seed)  # fmt: skip
    path, summary = OP.iterative_run(method.online, beta, work / name, base, d["train_prompts"],
                                     scorer=method.scorer, seed=seed,
                                     rollout_batch=max(study.sample_chunk // 4, 1),
                                     progress=progress, **gen)  # fmt: skip
    loaded = models.load_pretrained(path)
    policy = P.on_device(nnx.merge(nnx.graphdef(ref), nnx.state(loaded)))
    record = dict(
        method=method.online,
        iterations=OP.ITERATIONS,
        steps=steps * OP.ITERATIONS,
        pairs=[it["data"].get("pairs") for it in summary["iterations"]],
        sample_gold_reward=summary["sample_gold_reward"],
        iteration_seconds=[it["wall_s"] for it in summary["iterations"]],
    )
    return time.perf_counter() - t0, policy, record


def _config_dict(study: Study) -> dict:
    cfg = dataclasses.asdict(study)
    cfg["methods"] = [dataclasses.asdict(m) for m in study.methods]
    cfg["train_seeds"] = list(study.train_seeds)
    return cfg


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description="SparsePO controlled-sentiment study: reward vs KL of preference methods "
        "on the synthetic review language, and where token masks put their weight."
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {OUT}; with --full: {OUT_FULL})",
    )
    ap.add_argument("--quick", action="store_true", help="a small configuration (~3 min)")
    ap.add_argument(
        "--full",
        action="store_true",
        help="every method at every beta, 3 training seeds (see the README for the time)",
    )
    ap.add_argument(
        "--redraw-dead",
        action="store_true",
        help="re-train SparsePO runs whose mask head is dead at init with another "
        "head seed (labelled in the outputs)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seeds everything (default 0)")
    ap.add_argument(
        "--methods",
        default=None,
        help="run only these (comma-separated): " + ",".join(m.name for m in ME.METHODS),
    )
    ap.add_argument(
        "--online",
        action="store_true",
        help="only DPO's frontier and the on-policy rows (with --full: every beta, 3 seeds; "
        f"default --out then {OUT_ONLINE_FULL})",
    )
    ap.add_argument(
        "--replot",
        action="store_true",
        help="only re-draw the frontier figures of the study in --out from its summary.json",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    if args.online and args.methods:
        ap.error("--online and --methods exclude each other")
    base = QUICK if args.quick else FULL if args.full else Study()
    study = dataclasses.replace(base, seed=args.seed, redraw_dead=args.redraw_dead)
    if args.methods:
        names = args.methods.split(",")
        known = {m.name: ME.middle_beta(m) if args.quick else m for m in ME.METHODS}
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown methods {unknown}; choose from {sorted(known)}")
        study = dataclasses.replace(study, methods=tuple(known[n] for n in names))
    if args.online:
        keep = {m.name for m in ME.ONLINE_ONLY}
        pool = ME.ONLINE_ONLY if args.full else study.methods
        study = dataclasses.replace(study, methods=tuple(m for m in pool if m.name in keep))
    if args.replot:
        out = args.out or (OUT_ONLINE_FULL if args.online and args.full else
                           OUT_FULL if args.full else OUT)  # fmt: skip
        for name, path in replot(out).items():
            print(f"{name}: {path}")
        return {}
    if args.out is None:
        if args.online and args.full:
            args.out = OUT_ONLINE_FULL
        else:
            args.out = OUT_FULL if args.full else OUT
    args.out.mkdir(parents=True, exist_ok=True)
    import datasets

    datasets.disable_progress_bars()
    summary = run_all(study, args.out, progress=not args.no_progress)
    print(f"\n{summary['table']}\n\n{summary['masks_table']}\n\n{summary['dynamics_table']}\n")
    print("\n".join(summary["verdict"]))
    print(
        f"\nlabel noise of the train pairs: {summary['data']['train']['label_noise_rate']:.3f} "
        f"(tau {study.tau:g})"
    )
    for name, path in summary["figures"].items():
        print(f"{name}: {args.out / path}")
    print(f"summary: {args.out / 'summary.json'}\ntable: {args.out / 'table.md'}")
    print(f"wall time {summary['seconds']['total']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
