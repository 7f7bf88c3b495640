"""Policies from runs, sampling, per-token log-probs, gold reward and the Monte-Carlo KL.

KL(pi || pi_ref) of the completion distribution given a prompt x is
E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ] over the sampled
completion tokens (the EOS included when sampled). It is estimated on the policy's own samples
at temperature 1, M per held-out prompt; both log-probs come from a forward pass of each model
on the sampled token ids themselves (no re-tokenization), so the reference policy's estimate is
exactly 0. The sampler's own log-probs (`Generation.logps`) are kept to check the forward pass
(`logp_check`). Standard errors treat prompts as the independent units: the SE of the mean of
per-prompt averages (the M samples of one prompt are not independent draws of the population).
The gold reward counts lexicon words, so it grows with the number of sentiment sentences a
completion has; `positive_share` (positive / all lexicon words over the samples) is the
length-free view of the same preference, and `bounded_reward` (`bounded_score`: the sigmoid of
the lexicon balance, in (0, 1), per completion, with its standard error) a bounded gold score
that, like the paper's sentiment classifier, stops paying for more sentiment words once a
completion is clearly positive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax import models
from alignjax.data import synthetic
from alignjax.train import open_run

__all__ = [
    "Samples",
    "load_run",
    "on_device",
    "sample",
    "sequence_logps",
    "evaluate_policy",
    "bounded_score",
    "mean_se",
]


@dataclasses.dataclass
class Samples:
    """M completions of each of N prompts, row = prompt * M + m."""

    prompt_index: np.ndarray  # [N M]
    tokens: np.ndarray  # [N M, max_new_tokens] (pad after the stop)
    lengths: np.ndarray  # [N M] tokens up to and including EOS
    logps: np.ndarray  # [N M, max_new_tokens] the sampler's log-probs
    texts: list[str]
    finished: np.ndarray  # [N M] ended with EOS


def load_run(run_dir: str | Path, like: nnx.Module):
    """(session, policy) of a finished run (`train.open_run`: the latest checkpoint's state in
    `session.state`, the state before training in `session.initial_state`) and the policy as a
    plain model (LoRA adapters merged), committed to the default device like the reference
    `like`, so the sampler (`nnx.jit`) compiles once for every policy."""
    session = open_run(run_dir, overrides=["data.eval=null"])
    policy = session.policy(merged=True)
    return session, on_device(nnx.merge(nnx.graphdef(like), nnx.state(policy)))


def on_device(model: nnx.Module) -> nnx.Module:
    """The model with its arrays committed to the default device (see `load_run`)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))


def sample(
    model,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    tokenizer,
    key: jax.Array,
    *,
    per_prompt: int,
    max_new_tokens: int,
    chunk: int = 256,
) -> Samples:
    """`per_prompt` samples at temperature 1 for each prompt, in fixed-size chunks (one compiled
    shape; the last chunk is padded with repeated rows) with key `fold_in(key, chunk index)`."""
    ids = np.repeat(prompt_ids, per_prompt, axis=0)
    mask = np.repeat(prompt_mask, per_prompt, axis=0)
    n = ids.shape[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or 0
    parts = []
    for k, start in enumerate(range(0, n, chunk)):
        rows = np.arange(start, start + chunk) % n
        gen = models.generate(
            model,
            jnp.asarray(ids[rows]),
            jnp.asarray(mask[rows]),
            jax.random.fold_in(key, k),
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            stop_tokens=(eos,),
            pad_id=pad,
        )
        take = min(chunk, n - start)
        parts.append([np.asarray(x)[:take] for x in gen])
    tokens, logps, lengths = (np.concatenate(p) for p in zip(*parts))
    finished = np.array([lengths[i] > 0 and tokens[i, lengths[i] - 1] == eos for i in range(n)])
    texts = [
        tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
        for i in range(n)
    ]
    index = np.repeat(np.arange(prompt_ids.shape[0]), per_prompt)
    return Samples(index, tokens, lengths, logps, texts, finished)


@functools.partial(nnx.jit, static_argnames=("n_new",))
def _token_logps(model, ids, mask, n_new):
    out = model(ids, mask)
    logits = model.logits(out.last_hidden_state[:, -n_new - 1 : -1]).astype(jnp.float32)
    logps = jax.nn.log_softmax(logits, -1)
    return jnp.take_along_axis(logps, ids[:, -n_new:, None], -1)[..., 0]


def sequence_logps(
    model, prompt_ids: np.ndarray, prompt_mask: np.ndarray, s: Samples, chunk: int = 256
) -> np.ndarray:
    """Per-token log-probs `[N M, max_new_tokens]` of the sampled completions under `model`
    (0 after each completion's end), by a forward pass on left-padded prompt + completion."""
    n, n_new = s.tokens.shape
    ids = np.concatenate([prompt_ids[s.prompt_index], s.tokens], axis=1).astype(np.int32)
    inside = np.arange(n_new)[None, :] < s.lengths[:, None]
    mask = np.concatenate([prompt_mask[s.prompt_index], inside], axis=1).astype(np.int32)
    out = []
    for start in range(0, n, chunk):
        rows = np.arange(start, start + chunk) % n
        lp = np.asarray(
            _token_logps(model, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]), n_new=n_new)
        )
        out.append(lp[: min(chunk, n - start)])
    return np.where(inside, np.concatenate(out), 0.0)


_WORD = re.compile(r"[a-z]+")
_POSITIVE = frozenset(synthetic.POSITIVE + synthetic.POSITIVE_VERBS)
_NEGATIVE = frozenset(synthetic.NEGATIVE + synthetic.NEGATIVE_VERBS)


def lexicon_counts(text: str) -> tuple[int, int]:
    """(# positive, # negative) lexicon words: the two terms of `sentiment_score`."""
    words = _WORD.findall(text.lower())
    return sum(w in _POSITIVE for w in words), sum(w in _NEGATIVE for w in words)


def bounded_score(text: str) -> float:
    """sigmoid(# positive - # negative lexicon words): the bounded gold score."""
    return 1.0 / (1.0 + math.exp(-synthetic.sentiment_score(text)))


def mean_se(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean of `values` and the standard error of the mean of the per-group means."""
    values = np.asarray(values, np.float64)
    per_group = np.array([values[groups == g].mean() for g in np.unique(groups)])
    se = per_group.std(ddof=1) / np.sqrt(len(per_group)) if len(per_group) > 1 else float("nan")
    return float(values.mean()), float(se)


def evaluate_policy(
    policy,
    reference,
    prompt_ids,
    prompt_mask,
    tokenizer,
    key,
    *,
    per_prompt: int,
    max_new_tokens: int,
    chunk: int = 256,
) -> tuple[dict, Samples]:
    """Gold reward and KL(policy || reference) on samples of the held-out prompts."""
    s = sample(policy, prompt_ids, prompt_mask, tokenizer, key, per_prompt=per_prompt,
               max_new_tokens=max_new_tokens, chunk=chunk)  # fmt: skip
    own = sequence_logps(policy, prompt_ids, prompt_mask, s, chunk)
    if policy is reference:
        ref = own
    else:
        ref = sequence_logps(reference, prompt_ids, prompt_mask, s, chunk)
    kl = (own - ref).sum(axis=1)
    rewards = np.array([synthetic.sentiment_score(t) for t in s.texts], np.float64)
    bounded = np.array([bounded_score(t) for t in s.texts], np.float64)
    pos, neg = np.sum([lexicon_counts(t) for t in s.texts], axis=0)
    inside = np.arange(s.tokens.shape[1])[None, :] < s.lengths[:, None]
    r_mean, r_se = mean_se(rewards, s.prompt_index)
    kl_mean, kl_se = mean_se(kl, s.prompt_index)
    b_mean, b_se = mean_se(bounded, s.prompt_index)
    result = dict(
        reward=r_mean,
        reward_se=r_se,
        bounded_reward=b_mean,
        bounded_reward_se=b_se,
        kl=kl_mean,
        kl_se=kl_se,
        samples=int(len(rewards)),
        mean_length=float(s.lengths.mean()),
        finished=float(s.finished.mean()),
        distinct=len(set(s.texts)) / len(s.texts),
        positive_share=float(pos / max(pos + neg, 1)),
        logp_check=float(np.max(np.abs(np.where(inside, own - s.logps, 0.0)))),
    )
    return result, s
