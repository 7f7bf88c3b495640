"""Generation with a KV cache for `LlamaForCausalLM` (or any `models.CausalLM`): a batch of
left-padded prompts, greedy or sampled (temperature, top-k, top-p), stop tokens; returns the new
tokens and their log-probs (`logps_mode`: under the temperature-free model distribution by
default). One jit-compiled function per (model graph definition, batch, prompt length,
max_new_tokens, sampling settings): models of one architecture share it, whatever spelling of
their dtypes built them.

Which log-probs (`logps_mode`), for a sampled token y with logits z:

- "model" (default): log softmax(z)[y], the T = 1 model (what offline DPO-style losses score).
- "temperature": log softmax(z / T)[y], no top-k / top-p filtering: exactly what a teacher-forced
  forward with `logits / T` gives (`ops.fused_token_logps(..., temperature=T)`, TRL GRPO's
  `old_per_token_logps`), so on-policy importance ratios start at 1 whatever the filtering.
- "sampler": log softmax(filter(z / T))[y], the distribution the token was drawn from (top-k /
  top-p applied and renormalised; vLLM's `processed_logprobs`, what TRL's vLLM importance-
  sampling correction reads). Differs from "temperature" only when filtering removes mass.

Greedy decoding (`temperature == 0`) has no temperature: "temperature" is then "model", and
"sampler" is 0 (the argmax has probability 1).

`generate_mixture` samples from the geometric mixture of two models, pi_mix ∝ pi^(1-c) pi_ref^c,
token by token (Nash-MD's opponent, TRL's `GeometricMixtureWrapper`): the next-token logits are
`mixture_logits(l, l_ref, c)` = (1 - c) l + c l_ref, each model with its own KV cache (TRL
recomputes both models without a cache; the distribution is the same), then the usual
temperature / top-k / top-p sampling and `logps_mode` on the mixed logits.

The cache holds prompt + new tokens, [B, P + N, kv_heads, head_dim] per layer. Prompt slot j is
visible where the prompt mask is 1; generated slots are always real. Positions continue from
each row's prompt length, so left padding does not shift them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

LOGPS_MODES = ("model", "temperature", "sampler")
_STATIC = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_tokens", "pad_id",
           "logps_mode")  # fmt: skip


class Generation(NamedTuple):
    """`tokens` [B, N] (after a stop token: `pad_id`), `logps` [B, N] log p(token) (0 after a
    stop) under the model's own distribution, or as `generate(logps_mode=...)` asks, `lengths`
    [B] tokens up to and including the first stop token."""

    tokens: jax.Array
    logps: jax.Array
    lengths: jax.Array


def _filter(logits, top_k, top_p):
    if top_k is not None:
        kth = jnp.sort(logits, axis=-1)[..., -top_k][..., None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, -1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep_sorted = jnp.cumsum(probs, -1) - probs < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def mixture_logits(logits: jax.Array, ref_logits: jax.Array, mixture_coef) -> jax.Array:
    """The geometric mixture's next-token logits (1 - c) l + c l_ref: softmax of them is
    pi^(1-c) pi_ref^c renormalised, Nash-MD's regularised policy (Munos et al. 2023,
    arXiv:2312.00886; TRL's `GeometricMixtureWrapper.forward` returns their log-softmax)."""
    return (1.0 - mixture_coef) * logits + mixture_coef * ref_logits


@functools.partial(nnx.jit, static_argnames=_STATIC)
def generate(
    model,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    logps_mode: str = "model",
) -> Generation:
    """Greedy when `temperature == 0`, else sampled from softmax(logits / temperature) after
    top-k / top-p filtering (`rng` required). `logps_mode` ("model", "temperature" or
    "sampler", see the module docstring) picks which log-probs `Generation.logps` holds."""
    return _decode((model,), lambda logits: logits[0], prompt_ids, prompt_mask, rng,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
                   logps_mode=logps_mode)  # fmt: skip


@functools.partial(nnx.jit, static_argnames=_STATIC)
def generate_mixture(
    model,
    ref_model,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array | None = None,
    mixture_coef: float | jax.Array = 0.5,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    logps_mode: str = "model",
) -> Generation:
    """`generate` from the geometric mixture of `model` and `ref_model` (module docstring):
    next-token logits `mixture_logits(l, l_ref, mixture_coef)`, c = 0 is `model`, c = 1
    `ref_model` (two models with one vocabulary; c is traced: one compilation for every c).
    `Generation.logps` are the mixture's (`logps_mode` applied to the mixed logits)."""
    sizes = (model.config.vocab_size, ref_model.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"the mixture's models need one vocabulary, got vocab_size {sizes}")
    coef = jnp.asarray(mixture_coef, jnp.float32)
    return _decode((model, ref_model), lambda logits: mixture_logits(*logits, coef), prompt_ids,
                   prompt_mask, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
                   logps_mode=logps_mode)  # fmt: skip


def _decode(
    models, combine, prompt_ids, prompt_mask, rng, *, max_new_tokens, temperature, top_k, top_p,
    stop_tokens, pad_id, logps_mode,
) -> Generation:  # fmt: skip
    """The sampling loop over one or more models, each with its own KV cache; `combine` maps
    their float32 next-token logits (a tuple) to the logits sampled from."""
    if logps_mode not in LOGPS_MODES:
        raise ValueError(f"`logps_mode` must be one of {LOGPS_MODES}, got {logps_mode!r}")
    b, p = prompt_ids.shape
    total = p + max_new_tokens

    def new_cache(model):
        cfg = model.config
        cfg.check_length(total)
        # Only `CausalLM` members (`models.protocol`): the cache in the compute dtype, else the
        # parameters' (the LM head's, as the embedding's: `LlamaForCausalLM` keeps one
        # param_dtype).
        dtype = model.unembed().dtype if model.dtype is None else model.dtype
        shape = (b, total, cfg.kv_heads, cfg.dim_per_head)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                for _ in range(cfg.num_hidden_layers)]  # fmt: skip

    key_valid = jnp.concatenate(
        [prompt_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], axis=1
    )
    slots = jnp.arange(total)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, -1) - 1, 0)
    mask = key_valid[:, None, None, :] & (slots[None, :] <= jnp.arange(p)[:, None])[None, None]
    mask = mask | (slots[None, :] == jnp.arange(p)[:, None])[None, None]  # padded queries

    def advance(tokens, positions, mask, caches, index, last):
        """Every model one call further: the combined next-token logits and the caches."""
        outs = [m.step_with_cache(tokens, positions, mask, c, index)
                for m, c in zip(models, caches)]  # fmt: skip
        logits = tuple(m.logits(h[:, last]).astype(jnp.float32) for m, (h, _) in zip(models, outs))
        return combine(logits), [c for _, c in outs]

    logits, caches = advance(prompt_ids, positions, mask, [new_cache(m) for m in models], 0, -1)
    next_pos = jnp.sum(prompt_mask, -1).astype(jnp.int32)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    key = jax.random.key(0) if rng is None else rng

    def pick(logits, key):
        if temperature == 0.0:
            token = jnp.argmax(logits, -1)
            if logps_mode == "sampler":  # the argmax has probability 1
                return token, jnp.zeros(token.shape, jnp.float32)
            scored = logits
        else:
            scaled = logits / temperature
            filtered = _filter(scaled, top_k, top_p)
            token = jax.random.categorical(key, filtered, -1)
            scored = {"model": logits, "temperature": scaled, "sampler": filtered}[logps_mode]
        logps = jax.nn.log_softmax(scored, -1)
        return token, jnp.take_along_axis(logps, token[:, None], -1)[:, 0]

    def body(i, carry):
        logits, caches, done, tokens, logps, key = carry
        key, sub = jax.random.split(key)
        token, logp = pick(logits, sub)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, i].set(token)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        done = done | jnp.isin(token, stops)
        slot = p + i
        step_mask = (key_valid & (slots <= slot)[None, :])[:, None, None, :]
        logits, caches = advance(token[:, None], (next_pos + i)[:, None], step_mask, caches,
                                 slot, 0)  # fmt: skip
        return logits, caches, done, tokens, logps, key

    init = (
        logits,
        caches,
        jnp.zeros((b,), bool),
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
        key,
    )
    _, _, _, tokens, logps, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    is_stop = jnp.isin(tokens, stops)
    first = jnp.where(jnp.any(is_stop, -1), jnp.argmax(is_stop, -1) + 1, max_new_tokens)
    return Generation(tokens, logps, first)
