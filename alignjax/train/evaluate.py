"""Evaluation on a held-out split: loss, reward accuracy and margins, log-likelihoods, and
optionally sampled completions.

    eval_step = build_eval_step(spec)
    result = evaluate(state, eval_step, loader)          # {"loss": ..., "rewards/accuracies": ...}

Exact over the split. The jitted step returns per-example values (losses, implicit rewards,
sequence log-probs, completion token counts) and the host averages them over the real examples
only (`batch.valid`), so the padding of the last batch never counts and the result does not
depend on the batch size. Metrics keep TRL's names:

- paired: `loss` (mean per-example loss), `rewards/chosen`, `rewards/rejected`,
  `rewards/accuracies` (fraction with r_chosen > r_rejected), `rewards/margins`,
  `logps/chosen`, `logps/rejected` (mean sequence log-probs), `nll/chosen` (token-mean NLL of
  the chosen completions);
- unpaired (KTO / BCO): `loss`, `rewards/chosen` / `rewards/rejected` as means over the
  desirable / undesirable examples, `rewards/margins` their difference;
- sft: `loss` = `nll` (token mean over the split) and `perplexity` = exp(nll);
- reward (a reward model): `loss`, `accuracy` (fraction with r_chosen > r_rejected), `margin`
  (mean r_chosen - r_rejected), `min_reward`, `mean_reward`, `max_reward` (TRL's names).

`loss` of a paired loss is the mean of `LossOutput.losses`, which equals the training loss for
every per-example-mean loss; losses with token-count terms (e.g. RPO's NLL part) are averaged
per example here.

`evaluate` is `eval_metrics(eval_examples(...))`: `eval_examples` returns the step's per-example
arrays over the split (paired: `chosen_logps`, `rejected_logps`, `chosen_tokens`,
`rejected_tokens`, `losses`, `chosen_rewards`, `rejected_rewards`, `valid`), which a paired run
also turns into the DPO-dynamics diagnostics `dynamics/*` (`train.dynamics`) without a second
forward pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.data.batching import collate_prompts
from alignjax.losses.types import masked_sum
from alignjax.models.sampling import generate
from alignjax.train.distributed import fetch
from alignjax.train.forward import loss_batch, token_stats
from alignjax.train.state import TrainState, model_of
from alignjax.train.step import StepSpec

__all__ = [
    "build_eval_step",
    "evaluate",
    "eval_examples",
    "eval_metrics",
    "sample_completions",
]


def build_eval_step(spec: StepSpec) -> Callable:
    """A jitted `(state, batch) -> per-example arrays` (see the module docstring)."""

    def step(state: TrainState, batch):
        logps, ref_logps, kl, mask, masks = token_stats(spec, state, state.params, batch)
        if spec.task == "reward":  # `logps` are the [chosen; rejected] scores
            out = spec.loss_fn(loss_batch(spec, batch, logps, mask), **spec.loss_kwargs)
            return {"losses": out.losses, "chosen_rewards": out.chosen_rewards,
                    "rejected_rewards": out.rejected_rewards, "valid": batch.valid}  # fmt: skip
        seq = masked_sum(logps, mask)
        tokens = jnp.sum(mask, axis=-1).astype(jnp.float32)
        if spec.task == "sft":
            return {"nll_sum": -seq, "tokens": tokens, "valid": batch.valid}
        kwargs = dict(spec.loss_kwargs)
        carried = spec.needs.state
        if carried is not None and state.loss_state is not None:
            kwargs = carried.apply(state.loss_state, kwargs)  # the statistics training reached
        lb = loss_batch(spec, batch, logps, mask, ref_logps, kl, masks)
        out = spec.loss_fn(lb, **kwargs)
        n = batch.valid.shape[0]
        res = {
            "losses": out.losses,
            "chosen_rewards": out.chosen_rewards,
            "rejected_rewards": out.rejected_rewards,
            "valid": batch.valid,
        }
        if spec.task == "unpaired":
            res["label"] = batch.label
            res["logps"], res["tokens"] = seq[:n], tokens[:n]
        else:
            res["chosen_logps"], res["rejected_logps"] = seq[:n], seq[n:]
            res["chosen_tokens"], res["rejected_tokens"] = tokens[:n], tokens[n:]
        return res

    return jax.jit(step)


def _mean(x, w) -> float:
    total = float(np.sum(w))
    return float(np.sum(np.asarray(x, np.float64) * w) / total) if total else float("nan")


def evaluate(
    state: TrainState,
    eval_step: Callable,
    loader,
    *,
    task: str = "paired",
    max_batches: int | None = None,
    to_device: Callable = lambda b: jax.tree.map(jnp.asarray, b),
) -> dict:
    """Metrics over the loader's epoch 0 (every example once, in order when shuffle=False).

    In a multi-process run every process must call it (each loads its own slice of every
    batch; the per-example results are gathered to all of them).

    Args:
      eval_step: `build_eval_step(spec)`, with `spec.task == task`.
      loader: a `data.DataLoader` over the held-out split (use remainder="pad" to keep every
        example; padding examples are excluded from every average).
      max_batches: stop after this many batches (None: the whole split).
    """
    cat = eval_examples(state, eval_step, loader, max_batches=max_batches, to_device=to_device)
    return eval_metrics(cat, task=task)


def eval_examples(
    state: TrainState,
    eval_step: Callable,
    loader,
    *,
    max_batches: int | None = None,
    to_device: Callable = lambda b: jax.tree.map(jnp.asarray, b),
) -> dict[str, np.ndarray]:
    """`eval_step`'s outputs over the loader's epoch 0, each concatenated over the batches into
    one flat NumPy array (padding examples included, `valid` 0 on them); arguments as
    `evaluate`'s. Any jitted `(state, batch) -> {name: [E] or [R] array}` works as the step."""
    parts: list[dict] = []
    for k, batch in loader.epoch(0):
        if max_batches is not None and k >= max_batches:
            break
        parts.append(fetch(eval_step(state, to_device(batch))))
    if not parts:
        raise ValueError("the evaluation loader yields no batch (split smaller than one batch?)")
    return {k: np.concatenate([np.asarray(p[k]).reshape(-1) for p in parts]) for k in parts[0]}


def eval_metrics(cat: dict, *, task: str = "paired") -> dict:
    """`evaluate`'s metrics from `eval_examples`' arrays (see the module docstring)."""
    w = cat["valid"].astype(np.float64)
    out = {"examples": int(w.sum())}
    if task == "sft":
        tokens = float(np.sum(cat["tokens"] * w))
        nll = float(np.sum(cat["nll_sum"] * w)) / max(tokens, 1.0)
        out.update(loss=nll, nll=nll, perplexity=math.exp(min(nll, 700.0)), tokens=int(tokens))
        return out
    out["loss"] = _mean(cat["losses"], w)
    chosen, rejected = cat["chosen_rewards"], cat["rejected_rewards"]
    if task == "reward":  # TRL RewardTrainer's names, over the real pairs
        real = w > 0
        both = np.concatenate([chosen[real], rejected[real]]).astype(np.float64)
        out["accuracy"] = _mean(chosen > rejected, w)
        out["margin"] = _mean(np.asarray(chosen, np.float64) - rejected, w)
        out.update(min_reward=float(both.min()), mean_reward=float(both.mean()),
                   max_reward=float(both.max()))  # fmt: skip
        return out
    if task == "unpaired":
        good, bad = w * cat["label"], w * (1 - cat["label"])
        out["rewards/chosen"] = _mean(chosen, good)
        out["rewards/rejected"] = _mean(rejected, bad)
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["logps/chosen"] = _mean(cat["logps"], good)
        out["logps/rejected"] = _mean(cat["logps"], bad)
        return out
    out["rewards/chosen"] = _mean(chosen, w)
    out["rewards/rejected"] = _mean(rejected, w)
    out["rewards/accuracies"] = _mean(chosen > rejected, w)
    # The per-example margins in float64: float32 differences would round each by up to 2^-24
    # of itself, which cancelling margins amplify in their mean (7e-9 relative on the demo).
    out["rewards/margins"] = _mean(np.asarray(chosen, np.float64) - rejected, w)
    out["logps/chosen"] = _mean(cat["chosen_logps"], w)
    out["logps/rejected"] = _mean(cat["rejected_logps"], w)
    tokens = float(np.sum(cat["chosen_tokens"] * w))
    out["nll/chosen"] = -float(np.sum(cat["chosen_logps"] * w)) / max(tokens, 1.0)
    return out


def sample_completions(
    state: TrainState,
    tokenizer,
    examples: Iterable[dict],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    path: str | Path | None = None,
) -> list[dict]:
    """Complete the prompts of tokenized examples (greedy, or sampled when temperature > 0);
    returns (and, with `path`, writes as JSONL) `{"row", "prompt", "completion"}` records."""
    examples = list(examples)
    if not examples:
        return []
    key = "input_ids" if "input_ids" in examples[0] else "chosen_input_ids"
    plen_key = "prompt_length" if key == "input_ids" else "chosen_prompt_length"
    length = max(max(int(e[plen_key]) for e in examples), 1)
    ids, mask = collate_prompts(examples, length, pad_id=tokenizer.pad_token_id or 0)
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    gen = generate(
        model_of(state),
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(seed) if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_tokens=stop,
        pad_id=tokenizer.pad_token_id or 0,
    )
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    records = []
    for i, e in enumerate(examples):
        prompt = tokenizer.decode(list(e[key][: e[plen_key]]), skip_special_tokens=True)
        completion = tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
        records.append({"row": int(e["row"]), "prompt": prompt, "completion": completion})
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records
