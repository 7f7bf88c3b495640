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


@functools.partial(
    nnx.jit,
    static_argnames=(
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "stop_tokens",
        "pad_id",
        "logps_mode",
    ),
)
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
    if logps_mode not in LOGPS_MODES:
        raise ValueError(f"`logps_mode` must be one of {LOGPS_MODES}, got {logps_mode!r}")
    b, p = prompt_ids.shape
    cfg = model.config
    total = p + max_new_tokens
    cfg.check_length(total)
    # Only `CausalLM` members (`models.protocol`): the cache in the compute dtype, else the
    # parameters' (the LM head's, as the embedding's: `LlamaForCausalLM` keeps one param_dtype).
    dtype = model.unembed().dtype if model.dtype is None else model.dtype
    caches = [
        (
            jnp.zeros((b, total, cfg.kv_heads, cfg.dim_per_head), dtype),
            jnp.zeros((b, total, cfg.kv_heads, cfg.dim_per_head), dtype),
        )
        for _ in range(cfg.num_hidden_layers)
    ]
    key_valid = jnp.concatenate(
        [prompt_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], axis=1
    )
    slots = jnp.arange(total)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, -1) - 1, 0)
    mask = key_valid[:, None, None, :] & (slots[None, :] <= jnp.arange(p)[:, None])[None, None]
    mask = mask | (slots[None, :] == jnp.arange(p)[:, None])[None, None]  # padded queries
    hidden, caches = model.step_with_cache(prompt_ids, positions, mask, caches, 0)
    logits = model.logits(hidden[:, -1]).astype(jnp.float32)
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
        hidden, caches = model.step_with_cache(
            token[:, None], (next_pos + i)[:, None], step_mask, caches, slot
        )
        return model.logits(hidden[:, 0]).astype(jnp.float32), caches, done, tokens, logps, key

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
