"""On-policy training (`task: online`): a rollout phase (sample -> score -> advantages) feeding the
same jitted step as every other task (`train.online_step`).

    alignjax train task=online online.method=grpo data.train=prompts.jsonl online.beta=0.04

Each step (every `online.num_iterations` steps when mu > 1) the `OnlinePhase`:

1. takes the step's `data.batch_size / num_generations` prompts from the prompt loader (a
   prompt-only dataset, or any dataset with a prompt column; each batch is served mu times),
2. samples `num_generations` completions of each (`online.rollout` under the run's placement:
   "grouped" rows for GRPO / RLOO / REINFORCE, "halves" for Online DPO; XPO and Nash-MD sample
   the second half from the reference or the policy-reference mixture, `train.online_pairs`)
   with the key
   `fold_in(fold_in(state.rng, ROLLOUT_STREAM), step)`, so a resumed run samples the same,
3. decodes and scores them on the host (`online.score`: TRL's reward-function signature, the
   dataset's other columns and `completion_ids` as keyword arguments, None -> NaN),
4. computes the advantages of the whole batch (`losses.group_advantages`,
   `losses.rloo_advantages` with the KL in the reward), the reference's log-probs when the
   method reads them (`online_step.reference_logps`) and, when mu > 1, the old policy's (the
   sampler's log-probs at the temperature, equal to the teacher-forced ones to 1e-5),
5. runs the step on the resulting `OnlineBatch` and returns its metrics with the rollout's.

Metrics (TRL's names): `reward`, `reward_std`, `rewards/<fn>/mean|std`, `frac_reward_zero_std`,
`completions/{mean,min,max}_length`, `completions/clipped_ratio` (share without a stop token),
`completions/mean_terminated_length`, `entropy` (GRPO / RLOO / REINFORCE: the token mean of
-log pi_T of the sampled tokens, an unbiased estimate of the sampling distribution's entropy;
TRL computes it exactly from the logits), then the loss's own (`clip_ratio/*`, `kl`,
`objective/*`, `rewards/chosen|rejected|accuracies|margins`, `logps/*`,
`val/contain_eos_token`), and `time/rollout`, `time/train` (seconds of each phase in the step).
Every `log_every` steps the first `online.log_samples` rollouts go to `rollouts.jsonl`.

Resume: the rollout key and the prompt position live in the state, so a resumed run repeats
the uninterrupted one bitwise; with mu > 1 checkpoints fall on rollout boundaries
(`checkpoint.every` a multiple of mu, validated).

Several processes (`jax.distributed`, a mesh over every process's devices; not pmap). Each
process's loader serves its slice of the step's prompts, as the offline loader splits rows,
and the slices are gathered (`distributed.gather_rows`) into the global prompt batch, the
1-process run's. The sampler then runs under the mesh like the training step: the policy's
sharded parameters as they are, the rollout rows split over the batch axes, so each process's
devices sample their block of rows (its own prompts' groups in the "grouped" layout), with
the 1-process run's key on the same global rows: the same tokens (random bits, like every
value of a jitted program, do not depend on how the arrays are sharded). Each process then
scores on its host only the rows of its own prompts (a reward function sees its process's
rows, as in TRL) and the scores are gathered. The host arrays of a rollout are small
(`[N, P + C]` tokens and log-probs, fetched with `distributed.fetch`), so every process holds
all of them: advantages with batch statistics (GRPO's `scale_rewards="batch"`, RLOO's
normalisation), the metrics and the step's batch are computed by the 1-process code on the
same values (groups never straddle processes: no group statistic needs a collective), and the
batch goes to the devices in the 1-process row layout (`sharding.shard_global_batch`; the step
needs no `row_blocks`). The evaluation gathers its prompts and scores the same way, and only
process 0 writes `rollouts.jsonl`. Tested (tests/test_train_distributed_online.py): 2 processes
x 2 CPU devices sample the 1-device run's tokens and rewards exactly, and match its losses and
parameters to 1e-5 (measured: 1.2e-7 and 2.1e-7 of each leaf's largest entry).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from time import perf_counter

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import data as D
from alignjax import losses as L
from alignjax.losses.advantages import ZERO_STD_ATOL, nanstd
from alignjax.online.rewards import get_reward
from alignjax.online.rollout import rollout, row_indices
from alignjax.online.scorers import Scores, decode_completions, score
from alignjax.train import hooks as H
from alignjax.train import metrics as M
from alignjax.train import sharding as SH
from alignjax.train.data import raw_split
from alignjax.train.distributed import fetch, gather_rows
from alignjax.train.online_config import PAIR_METHODS, needs_reference
from alignjax.train.online_pairs import OPPONENT_METHODS, pair_fields, sample_pairs
from alignjax.train.online_step import (
    OnlineBatch,
    completion_to_rows,
    online_batch,
    reference_logps,
    rollout_rows,
)
from alignjax.train.placement import MeshPlacement, SingleDevice
from alignjax.train.state import model_of, model_params

__all__ = ["OnlinePhase", "PromptLoader", "Generation", "rollout_key", "left_padded"]

log = logging.getLogger(__name__)

ROLLOUT_STREAM, EVAL_STREAM = 0x524F, 0x4556  # fold_in constants: "RO", "EV"
SAMPLES_FILE = "rollouts.jsonl"


def rollout_key(rng_data, step: int, stream: int = ROLLOUT_STREAM) -> jax.Array:
    """The sampling key of `step`: a pure function of the state's rng (restored by resume)."""
    key = jax.random.wrap_key_data(np.asarray(jax.device_get(rng_data)))
    return jax.random.fold_in(jax.random.fold_in(key, stream), step)


def left_padded(batch, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A loader's right-padded prompt rows -> left-padded `(ids, mask)` for the sampler."""
    ids, attention = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    out, mask = np.full_like(ids, pad_id), np.zeros_like(attention)
    for i, n in enumerate(attention.sum(1)):
        out[i, ids.shape[1] - n :] = ids[i, :n]
        mask[i, ids.shape[1] - n :] = 1
    return out, mask


class PromptLoader:
    """Every batch of a prompt `DataLoader` `repeat` times in a row (`online.num_iterations`),
    so the loop's data position counts optimizer steps."""

    def __init__(self, loader: D.DataLoader, repeat: int = 1):
        self.loader, self.repeat = loader, repeat

    def __len__(self) -> int:
        return len(self.loader) * self.repeat

    def epoch(self, epoch: int, start: int = 0):
        r = self.repeat
        for k, batch in self.loader.epoch(epoch, start=start // r):
            for j in range(r):
                if k * r + j >= start:
                    yield k * r + j, batch


@dataclasses.dataclass
class Generation:
    """One batch of scored rollouts: the step's `batch` (placed), host `metrics`, the first
    rollouts as records (`samples`), and when it was sampled (before update `step` + 1)."""

    step: int
    batch: OnlineBatch
    metrics: dict
    samples: list
    tokens: int


class OnlinePhase:
    """The rollout phase and the step of a `task: online` session (`session.rollouts`):
    `phase(state, prompt_batch) -> (state, metrics)` is the loop's step function."""

    def __init__(self, session):
        if jax.process_count() > 1 and not isinstance(session.placement, MeshPlacement):
            raise ValueError("task=online with several processes runs on a mesh over every "
                             "process's devices (mesh.pmap=false, mesh.devices=-1)")  # fmt: skip
        cfg = session.cfg
        self.session, self.cfg, self.o = session, cfg, cfg.online.resolved()
        prompts = cfg.data.batch_size // self.o.num_generations
        if prompts % jax.process_count():
            raise ValueError(f"`data.batch_size` / `online.num_generations` = {prompts} prompts "
                             f"a step do not split over {jax.process_count()} "
                             "processes")  # fmt: skip
        self.placement, self.spec = session.placement, session.spec
        self.tokenizer = session.tokenizer
        self.pad_id = self.tokenizer.pad_token_id or 0
        eos = self.tokenizer.eos_token_id
        default = () if eos is None else (eos,)
        self.stop_tokens = default if self.o.stop_tokens is None else tuple(self.o.stop_tokens)
        self.reward_fns = [get_reward(name) for name in self.o.rewards]
        self.dpo = self.o.method in PAIR_METHODS  # scored without the penalty (the loss's)
        self.opponent = self.o.method in OPPONENT_METHODS
        self.needs_ref = needs_reference(self.o)
        self.adapters_off = self.needs_ref and cfg.reference.mode == "adapters_disabled"
        self.ref_params = None  # the frozen reference: `reference.path`, else the initial policy
        if self.needs_ref and not self.adapters_off and cfg.reference.path is not None:
            from flax import nnx

            from alignjax import models

            loaded = nnx.state(models.load_pretrained(cfg.reference.path), nnx.Param)
            self.ref_params = self._put(loaded, rows=False)
        elif self.needs_ref and not self.adapters_off:  # a copy: the step donates the state
            initial = model_params(self.placement.to_checkpoint(session.state))
            self.ref_params = jax.tree.map(jnp.copy, initial)
        split = session.train_data if session.train_data is not None else session.eval_data
        self.conversational = split is not None and split.format.conversational
        self._raw: dict = {}
        self.current: Generation | None = None

    def loader(self) -> PromptLoader:
        """The training prompts, `data.batch_size / num_generations` a step, each batch served
        `num_iterations` times."""
        d = self.cfg.data
        config = D.LoaderConfig(batch_size=d.batch_size // self.o.num_generations, seed=d.seed,
                                buckets=d.buckets, sort_window=d.sort_window)  # fmt: skip
        return PromptLoader(D.DataLoader(self.session.train_data, config), self.o.num_iterations)

    # ------------------------------------------------------------------ placement helpers

    def _put(self, tree, *, rows: bool = True):
        """Host arrays onto the run's devices: rows split over a mesh's batch axes (when they
        divide), parameters like the state's."""
        p = self.placement
        if isinstance(p, MeshPlacement):
            if rows:  # every process holds the whole batch (module docstring)
                n = int(np.prod([p.mesh.shape[a] for a in SH.BATCH_AXES]))
                if all(np.shape(x)[0] % n == 0 for x in jax.tree.leaves(tree)):
                    return SH.shard_global_batch(tree, p.mesh)
                if jax.process_count() == 1:
                    return tree
                return jax.device_put(
                    tree, jax.sharding.NamedSharding(p.mesh, jax.sharding.PartitionSpec())
                )
            return SH.shard_state(tree, p.mesh, SH.param_specs(tree, p.mesh))
        if isinstance(p, SingleDevice):
            return jax.device_put(tree, p.device)
        return tree  # pmap: the rollout phase runs on the first replica

    def raw_prompts(self, source: str):
        if source not in self._raw:
            self._raw[source] = raw_split(source, self.cfg)
        return self._raw[source]

    def _eval_source(self) -> str:
        d = self.cfg.data
        if d.eval != "auto":
            return d.eval
        return "shipped:test" if d.train == "shipped:train" else d.train

    # ------------------------------------------------------------------ the rollout phase

    def sample(self, state, prompts, key, num_generations: int, layout: str, *,
               opponent: bool = False) -> dict:  # fmt: skip
        """Host arrays of `num_generations` rollouts of each prompt of the global batch of
        which `prompts` is this process's loader slice (every process gets all rows); with
        `opponent`, the second half from XPO's / Nash-MD's opponent (`online_pairs`)."""
        ids, mask = left_padded(prompts, self.pad_id)
        ids, mask, rows, valid = gather_rows((ids, mask, np.asarray(prompts.rows),
                                              np.asarray(prompts.valid)))  # fmt: skip
        prompt, _ = row_indices(ids.shape[0], num_generations, layout)
        ids, mask = ids[prompt], mask[prompt]
        o = self.o
        settings = dict(max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                        top_k=o.top_k, top_p=o.top_p, stop_tokens=tuple(self.stop_tokens),
                        pad_id=self.pad_id, logps_mode="temperature")  # fmt: skip
        if opponent:
            out = sample_pairs(self, state, ids, mask, key, settings)
        else:
            r = rollout(model_of(state), *self._put((ids, mask)), key, num_generations=1,
                        **settings)  # fmt: skip
            out = fetch((r.completion_ids, r.completion_mask, r.missing_eos, r.logps))
        names = ("completion_ids", "completion_mask", "missing_eos", "logps")
        rows = rows[prompt]  # a padding example's row is -1
        rows = np.where(rows >= 0, rows, rows.max())
        return dict(zip(names, map(np.asarray, out)), prompt_ids=ids, prompt_mask=mask,
                    rows=rows, prompt_index=prompt, valid=valid[prompt])  # fmt: skip

    def score(self, s: dict, source: str, *, penalty: bool = True) -> tuple[Scores, list, list]:
        """`(scores, prompts, completions)` of sampled rows: the raw dataset's prompts and
        other columns, the decoded completions and their ids, as TRL's reward functions get
        them."""
        raw = self.raw_prompts(source)
        prompt_column = dict(self.cfg.data.columns).get("prompt", "prompt")
        table = raw[[int(r) for r in s["rows"]]]
        prompts = table.pop(prompt_column)
        completions = decode_completions(self.tokenizer, s["completion_ids"], s["completion_mask"],
                                         conversational=self.conversational)  # fmt: skip
        ids = [row[m != 0].tolist() for row, m in zip(s["completion_ids"], s["completion_mask"])]
        o = self.o
        scores = score(self.reward_fns, prompts, completions, weights=o.reward_weights,
                       columns={k: v for k, v in table.items() if k != "completion_ids"},
                       completion_ids=ids, missing_eos=s["missing_eos"],
                       missing_eos_penalty=o.missing_eos_penalty if penalty else None)  # fmt: skip
        if len(o.rewards) == len(scores.names):  # metrics under the config's names
            scores = scores._replace(names=tuple(o.rewards))
        return scores, prompts, completions

    def score_rows(self, s: dict, source: str, *, penalty: bool = True) -> Scores:
        """The scores of every row of a sample: each process scores the rows of its own
        prompts (its loader slice) and the scores are gathered in row order."""
        count = jax.process_count()
        if count == 1:
            return self.score(s, source, penalty=penalty)[0]
        per = (int(s["prompt_index"].max()) + 1) // count  # prompts a process loaded
        mine = np.flatnonzero(s["prompt_index"] // per == jax.process_index())
        keys = ("rows", "completion_ids", "completion_mask", "missing_eos")
        local, _, _ = self.score({k: s[k][mine] for k in keys}, source, penalty=penalty)
        order, per_fn, total = gather_rows((mine, local.per_function, local.total))
        out_fn, out_total = np.empty_like(per_fn), np.empty_like(total)
        out_fn[order], out_total[order] = per_fn, total
        return local._replace(per_function=out_fn, total=out_total)

    def records(self, s: dict, scores: Scores, adv, step: int) -> list:
        """The first `online.log_samples` rollouts as `rollouts.jsonl` records (process 0)."""
        n = min(self.o.log_samples, len(adv)) if jax.process_index() == 0 else 0
        if n == 0:
            return []
        prompt_column = dict(self.cfg.data.columns).get("prompt", "prompt")
        raw = self.raw_prompts(self.cfg.data.train)
        prompts = raw[[int(r) for r in s["rows"][:n]]][prompt_column]
        completions = decode_completions(self.tokenizer, s["completion_ids"][:n],
                                         s["completion_mask"][:n],
                                         conversational=self.conversational)  # fmt: skip
        return [
            {"step": step + 1, "prompt": prompts[i], "completion": completions[i],
             "reward": None if np.isnan(scores.total[i]) else float(scores.total[i]),
             "advantage": float(adv[i])}
            for i in range(n)
        ]  # fmt: skip

    def advantages(self, scores: Scores, s: dict, ref_completion) -> tuple[np.ndarray, dict]:
        """Per-row advantages of the whole batch and the reward metrics."""
        o, g = self.o, self.o.num_generations
        names = [n if n not in scores.names[:i] else f"{n}_{i}" for i, n in
                 enumerate(scores.names)]  # fmt: skip
        metrics = L.reward_metrics(scores.per_function, o.reward_weights, names)
        total = scores.total
        if o.method == "grpo":
            adv, m = L.group_advantages(total, g, scale_rewards=o.scale_rewards)
        elif o.method == "rloo":
            adv, m = L.rloo_advantages(total, g, beta=o.beta, old_logps=s["logps"],
                                       ref_logps=ref_completion, mask=s["completion_mask"],
                                       normalize=o.normalize_advantages,
                                       reward_clip_range=o.reward_clip_range)  # fmt: skip
        else:
            if o.method == "reinforce_kl" and np.isnan(total).any():
                row = int(np.flatnonzero(np.isnan(total))[0])
                raise ValueError(f"reinforce_kl needs a reward for every completion; every "
                                 f"reward function {list(scores.names)} returned None for "
                                 f"rollout row {row}")  # fmt: skip
            adv = np.zeros_like(total)
            m = {"reward": np.nanmean(total), "reward_std": nanstd(total)}
            if o.method == "reinforce_kl":
                std = nanstd(total.reshape(-1, g), axis=1)
                m["frac_reward_zero_std"] = np.mean(np.abs(std) <= ZERO_STD_ATOL)
        metrics.update(m)
        return np.asarray(adv, np.float32), {k: float(v) for k, v in metrics.items()}

    def generate(self, state, prompts, step: int) -> Generation:
        """One batch of scored rollouts for update `step` + 1 (module docstring)."""
        o, spec = self.o, self.spec
        policy = self.placement.to_checkpoint(state)
        key = rollout_key(policy.rng, step)
        s = self.sample(policy, prompts, key, o.num_generations, o.layout,
                        opponent=self.opponent)  # fmt: skip
        p, c = s["prompt_ids"].shape[1], s["completion_ids"].shape[1]
        rows = rollout_rows(s["prompt_ids"], s["prompt_mask"], s["completion_ids"],
                            s["completion_mask"])  # fmt: skip
        scores = self.score_rows(s, self.cfg.data.train, penalty=not self.dpo)
        kept, extra = np.arange(len(s["missing_eos"])), {}
        if self.opponent:  # the rows the step trains on, with their opponents' scores
            kept, extra, pair_metrics = pair_fields(o.method, s, scores, o.reward_weights)
            rows = {k: v[kept] for k, v in rows.items()}
        ref = None
        if self.needs_ref:
            tokens = OnlineBatch(valid=None, advantages=None, rewards=None, contains_eos=None,
                                 **rows)  # fmt: skip
            ref = reference_logps(policy, self.ref_params, self._put(tokens),
                                  adapters_off=self.adapters_off,
                                  temperature=spec.temperature)  # fmt: skip
            ref = np.asarray(fetch(ref))
        ref_completion = None if ref is None else ref[:, p - 1 : p - 1 + c]
        if self.opponent:
            adv, metrics = np.zeros(len(kept), np.float32), pair_metrics
            if o.method == "nash_md":  # TRL logs it; the loss does not know it
                metrics["mixture_coef"] = float(o.mixture_coef)
            mine = slice(0, len(s["missing_eos"]) // 2)  # lengths of the policy's samples
        else:
            adv, metrics = self.advantages(scores, s, ref_completion)
            mine = slice(None)
        metrics.update(completion_metrics(s["completion_mask"][mine], s["missing_eos"][mine]))
        mask = s["completion_mask"]
        if not self.dpo:
            metrics["entropy"] = float(-np.sum(s["logps"] * mask) / max(mask.sum(), 1))
        old = None
        if o.num_iterations > 1 and o.method in ("grpo", "rloo"):
            old = completion_to_rows(s["logps"], p, p + c)
        fields = dict(rows, advantages=adv, rewards=scores.total[kept].astype(np.float32),
                      contains_eos=~s["missing_eos"][kept], old_logps=old,
                      ref_logps=ref if spec.reference == "precomputed" else None,
                      **extra)  # fmt: skip
        pairs = self.dpo and o.method != "nash_md"  # Nash-MD trains on the policy's half
        batch = online_batch(fields, pairs=pairs, accum=self.cfg.optim.grad_accum)
        if jax.process_count() > 1:  # every host holds the whole batch
            placed = SH.shard_global_batch(batch, self.placement.mesh)
        else:
            placed = self.placement.put_batch(batch)
        return Generation(step, placed, metrics, self.records(s, scores, adv, step),
                          int(mask.sum()))  # fmt: skip

    def __call__(self, state, prompts):
        """The loop's step: a new batch of rollouts every mu steps, then the jitted step."""
        mu = self.o.num_iterations
        step = self.placement.host_position(state)[0]
        start = step - step % mu
        t0 = perf_counter()
        if self.current is None or self.current.step != start:
            if step != start:
                log.warning("step %d: resumed inside a batch's %d iterations; its rollouts are "
                            "sampled again with the current policy", step, mu)  # fmt: skip
            self.current = self.generate(state, prompts, start)
        t1 = perf_counter()
        state, metrics = self.session.step_fn(state, self.current.batch)
        jax.block_until_ready(metrics["loss"])
        extra = dict(self.current.metrics)
        extra.update({"time/rollout": t1 - t0, "time/train": perf_counter() - t1})
        shape = np.shape(metrics["loss"])  # pmap: one value per replica
        metrics = dict(metrics)
        metrics.update({k: np.full(shape, v, np.float32) for k, v in extra.items()})
        return state, metrics

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, state) -> dict:
        """One completion of every held-out prompt at the sampling temperature (a fixed key):
        its mean reward (`reward`, `reward_std`, `rewards/<fn>/mean`) and lengths."""
        session, o = self.session, self.o
        policy = self.placement.to_checkpoint(state)
        base = rollout_key(policy.rng, 0, EVAL_STREAM)
        per_fn, totals, masks, missing = [], [], [], []
        for k, batch in session.eval_loader().epoch(0):
            if self.cfg.eval_batches is not None and k >= self.cfg.eval_batches:
                break
            s = self.sample(policy, batch, jax.random.fold_in(base, k), 1, "grouped")
            keep = s["valid"] != 0
            scores = self.score_rows(s, self._eval_source(), penalty=not self.dpo)
            per_fn.append(scores.per_function[keep])
            totals.append(scores.total[keep])
            masks.append(s["completion_mask"][keep])
            missing.append(s["missing_eos"][keep])
        if not totals:
            return {}
        total = np.concatenate(totals)
        out = {"reward": float(np.nanmean(total)), "reward_std": float(nanstd(total))}
        for name, col in zip(o.rewards, np.concatenate(per_fn).T):
            out[f"rewards/{name}/mean"] = float(np.nanmean(col))
        out.update(completion_metrics(np.concatenate(masks), np.concatenate(missing)))
        return out

    def hook(self, every: int, *, progress: bool = True) -> H.Hook:
        return RolloutHook(self, every, progress=progress)


def completion_metrics(mask, missing_eos) -> dict:
    """TRL's `completions/*` lengths and the share of completions without a stop token."""
    lengths = np.asarray(mask).sum(1).astype(np.float64)
    missing = np.asarray(missing_eos, bool)
    done = lengths[~missing] if (~missing).any() else np.zeros(1)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(missing.mean()),
        "completions/mean_terminated_length": float(done.mean()),
    }


class RolloutHook(H.Hook):
    """The rollout phase's progress bar (sampled tokens/s, mean reward) and `rollouts.jsonl`:
    the first `online.log_samples` rollouts every `every` steps (rows after the resumed step
    are dropped first, so a resumed run's file is the uninterrupted run's)."""

    def __init__(self, phase: OnlinePhase, every: int, *, progress: bool = True):
        self.phase, self.every, self.progress = phase, every, progress
        self.path = Path(phase.session.out_dir) / SAMPLES_FILE
        self.bar, self.seen = None, None

    def start(self, ctx):
        mu = self.phase.o.num_iterations
        self.bar = M.Progress(-(-ctx.steps // mu), initial=ctx.step // mu, desc="rollout",
                              enabled=self.progress, position=1, leave=False)  # fmt: skip
        if self.phase.session.is_main and self.path.is_file():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            kept = [r for r in rows if r["step"] <= ctx.step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def after_step(self, ctx):
        current = self.phase.current
        if current is not None and current is not self.seen:
            self.seen = current
            self.bar.update(tokens=current.tokens, reward=current.metrics["reward"])
        if self.phase.session.is_main and current is not None and ctx.due(self.every):
            with self.path.open("a") as f:
                for record in current.samples:
                    f.write(json.dumps({**record, "step": ctx.step}) + "\n")

    def end(self, ctx):
        if self.bar is not None:
            self.bar.close()
