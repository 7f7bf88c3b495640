"""Rollouts: prompts -> `num_generations` sampled completions each, with the masks, flags and
sampling log-probs that on-policy losses read (specs/online.md sections 1.1, 3.2 and 8).

Layouts of the N = B * G rows (B prompts, G = `num_generations`), as TRL lays them out:

- "grouped" (TRL GRPO / RLOO, `RepeatSampler`): consecutive groups of G, row `b * G + k` is
  sample k of prompt b; group statistics are `x.reshape(B, G)`.
- "halves" (TRL Online DPO, `prompt_ids.repeat(2, 1)`): G blocks of B, row `k * B + b` is sample
  k of prompt b; for G = 2 rows 0..B-1 are the first samples, B..2B-1 the second.

`rollout` samples on `models.generate` (one key for the whole batch: every row draws its own
tokens) and keeps, as TRL's `truncate_right`, everything up to and including the first stop
token: `completion_mask` is 1 through the stop token, 0 after it, where `completion_ids` hold
`pad_id`. `missing_eos` marks rows with no stop token in `max_new_tokens` (a row whose stop token
is its last token is not missing it). The log-probs are those of the sampling temperature,
log softmax(logits / T) with no top-k / top-p filtering (`generate(logps_mode="temperature")`),
so they equal `teacher_forced_logps(model, r, temperature=T)` up to float rounding: the
"old" log-probs of GRPO's ratio. Pass `logps_mode="sampler"` for the filtered distribution the
tokens were drawn from (vLLM's `processed_logprobs`, for importance-sampling corrections).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from alignjax import models, online
    >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2)
    >>> model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> ids = jnp.asarray([[0, 5, 6], [7, 8, 9]]); mask = jnp.asarray([[0, 1, 1], [1, 1, 1]])
    >>> r = online.rollout(model, ids, mask, jax.random.key(0), num_generations=2,
    ...                    max_new_tokens=4, temperature=0.9, stop_tokens=(3,))
    >>> r.completion_ids.shape, r.prompt_index.tolist(), r.sample_index.tolist()
    ((4, 4), [0, 0, 1, 1], [0, 1, 0, 1])
    >>> forced = nnx.jit(online.teacher_forced_logps, static_argnames="temperature")
    >>> bool(jnp.allclose(forced(model, r, temperature=0.9), r.logps, atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import ops
from alignjax.models.sampling import generate, generate_mixture
from alignjax.ops import _checks as C

__all__ = [
    "LAYOUTS",
    "Rollout",
    "repeat_prompts",
    "row_indices",
    "by_prompt",
    "rollout",
    "teacher_forced_logps",
]

LAYOUTS = ("grouped", "halves")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "missing_eos",
        "logps",
        "prompt_index",
        "sample_index",
    ],
    meta_fields=["num_generations", "layout"],
)
@dataclasses.dataclass(frozen=True)
class Rollout:
    """N = B * G sampled completions (a pytree; `num_generations` and `layout` are static).

    Attributes:
      prompt_ids, prompt_mask: `[N, P]` the left-padded prompt of every row (repeated).
      completion_ids: `[N, C]` int32 sampled tokens, `pad_id` after the first stop token.
      completion_mask: `[N, C]` int32, 1 on the completion tokens through the first stop token.
      missing_eos: `[N]` bool, True where no stop token was sampled.
      logps: `[N, C]` float32 log-probs of the sampled tokens (`generate`'s `logps_mode`;
        rollout's default: at the sampling temperature), 0 off `completion_mask`.
      prompt_index: `[N]` int32, the row of the prompt batch each row samples from (the group
        id of GRPO's advantages).
      sample_index: `[N]` int32, which of the G samples of its prompt the row is (0..G-1).
      num_generations: G.
      layout: "grouped" or "halves" (module docstring).
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    completion_ids: jax.Array
    completion_mask: jax.Array
    missing_eos: jax.Array
    logps: jax.Array
    prompt_index: jax.Array
    sample_index: jax.Array
    num_generations: int
    layout: str

    @property
    def completion_lengths(self) -> jax.Array:
        """`[N]` completion tokens per row, the stop token included."""
        return jnp.sum(self.completion_mask, -1)

    @property
    def input_ids(self) -> jax.Array:
        """`[N, P + C]` prompt and completion, left padding before, `pad_id` after."""
        return jnp.concatenate([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> jax.Array:
        """`[N, P + C]` 1 on the prompt and on the completion through its stop token."""
        return jnp.concatenate(
            [self.prompt_mask.astype(jnp.int32), self.completion_mask.astype(jnp.int32)], 1
        )


def _check_layout(num_generations, layout: str) -> None:
    if isinstance(num_generations, bool) or int(num_generations) != num_generations:
        raise ValueError(f"`num_generations` must be an int >= 1, got {num_generations!r}")
    if num_generations < 1:
        raise ValueError(f"`num_generations` must be >= 1, got {num_generations}")
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")


def row_indices(
    num_prompts: int, num_generations: int, layout: str = "grouped"
) -> tuple[np.ndarray, np.ndarray]:
    """`(prompt_index, sample_index)`, both `[B * G]` int32: which prompt and which of its G
    samples every row of the layout holds."""
    _check_layout(num_generations, layout)
    rows = np.arange(num_prompts * num_generations)
    if layout == "grouped":
        prompt, sample = rows // num_generations, rows % num_generations
    else:
        prompt, sample = rows % num_prompts, rows // num_prompts
    return prompt.astype(np.int32), sample.astype(np.int32)


def repeat_prompts(
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    num_generations: int,
    layout: str = "grouped",
) -> tuple[jax.Array, jax.Array]:
    """`[B, P]` prompts -> `[B * G, P]` rows in `layout`: "grouped" repeats every prompt G times
    in a row (`np.repeat(x, G, 0)`), "halves" stacks G copies of the batch (`np.tile(x, (G, 1))`,
    torch's `x.repeat(G, 1)`)."""
    _check_layout(num_generations, layout)
    for name, x in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask)):
        if jnp.ndim(x) != 2:
            raise ValueError(f"`{name}` must be [B, P], got shape {jnp.shape(x)}")
    if jnp.shape(prompt_mask) != jnp.shape(prompt_ids):
        raise ValueError(
            f"`prompt_mask` must have the shape of `prompt_ids` {jnp.shape(prompt_ids)}, "
            f"got {jnp.shape(prompt_mask)}"
        )
    prompt, _ = row_indices(jnp.shape(prompt_ids)[0], num_generations, layout)
    return jnp.asarray(prompt_ids)[prompt], jnp.asarray(prompt_mask)[prompt]


def by_prompt(values: jax.Array, num_generations: int, layout: str = "grouped") -> jax.Array:
    """Per-row values `[B * G, ...]` -> `[B, G, ...]`, entry `[b, k]` = sample k of prompt b
    (e.g. rewards to GRPO groups, or to SPPO's `[P, K]` score matrix)."""
    _check_layout(num_generations, layout)
    values = jnp.asarray(values)
    n = values.shape[0] if values.ndim else 0
    if values.ndim == 0 or n % num_generations:
        raise ValueError(
            f"`values` must have B * num_generations rows, got {n} rows for "
            f"num_generations={num_generations}"
        )
    if layout == "grouped":
        return values.reshape(n // num_generations, num_generations, *values.shape[1:])
    return values.reshape(num_generations, n // num_generations, *values.shape[1:]).swapaxes(0, 1)


def _check_prompts(prompt_ids, prompt_mask) -> None:
    for name, x in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"`{name}` must hold integers, got {jnp.result_type(x)}")
    if not C.is_concrete(prompt_mask) or not getattr(prompt_mask, "is_fully_addressable", True):
        return  # traced, or spread over several processes (not readable here)
    mask = np.asarray(prompt_mask)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("`prompt_mask` must be 0/1")
    empty = np.flatnonzero(~mask.any(-1))
    if empty.size:
        raise ValueError(f"`prompt_mask` row {int(empty[0])} is all zeros: an empty prompt")
    unpadded = np.flatnonzero(mask[:, -1] == 0)
    if unpadded.size:
        raise ValueError(
            f"`prompt_mask` row {int(unpadded[0])} ends in padding: prompts must be left-padded"
        )


def rollout(
    model,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    num_generations: int,
    layout: str = "grouped",
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: tuple[int, ...] = (),
    pad_id: int = 0,
    logps_mode: str = "temperature",
    mixture_with=None,
    mixture_coef: float = 0.5,
) -> Rollout:
    """Sample `num_generations` completions of every prompt (one `models.generate` call), or
    from the geometric mixture of `model` and `mixture_with` (`models.generate_mixture`).

    Args:
      model: a `models.CausalLM`.
      prompt_ids, prompt_mask: `[B, P]` left-padded prompts (every row non-empty).
      key: PRNG key; the same key gives the same rollout.
      num_generations: G >= 1 samples per prompt.
      layout: "grouped" (GRPO) or "halves" (Online DPO), see the module docstring.
      max_new_tokens, temperature, top_k, top_p: `generate`'s sampling settings
        (`temperature == 0` is greedy: every sample of a prompt is the same).
      stop_tokens: token ids that end a completion (EOS, end-of-turn); empty: every row runs to
        `max_new_tokens` and is `missing_eos`.
      pad_id: written after the stop token.
      logps_mode: which log-probs `Rollout.logps` holds (`generate`); "temperature" default.
      mixture_with: a second `models.CausalLM` (Nash-MD: the reference): sample from
        softmax((1 - c) l_model + c l_ref) token by token, c = `mixture_coef`; the log-probs
        are the mixture's.

    Raises:
      ValueError: `num_generations` < 1, an unknown `layout`, shapes that differ, a prompt row
        that is empty or right-padded (the row is named), or a non-integer prompt.
    """
    ids, mask = repeat_prompts(prompt_ids, prompt_mask, num_generations, layout)
    _check_prompts(prompt_ids, prompt_mask)  # rows named in the caller's batch
    stop_tokens = tuple(int(t) for t in stop_tokens)
    settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=int(pad_id),
                    logps_mode=logps_mode)  # fmt: skip
    if mixture_with is None:
        gen = generate(model, ids, mask, key, **settings)
    else:
        gen = generate_mixture(model, mixture_with, ids, mask, key, mixture_coef, **settings)
    completion_mask = jnp.arange(max_new_tokens)[None, :] < gen.lengths[:, None]
    stopped = jnp.any(jnp.isin(gen.tokens, jnp.asarray(stop_tokens or (-1,))) & completion_mask, -1)
    prompt, sample = row_indices(jnp.shape(prompt_ids)[0], num_generations, layout)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        completion_ids=gen.tokens,
        completion_mask=completion_mask.astype(jnp.int32),
        missing_eos=~stopped,
        logps=jnp.where(completion_mask, gen.logps, 0.0),
        prompt_index=jnp.asarray(prompt),
        sample_index=jnp.asarray(sample),
        num_generations=int(num_generations),
        layout=layout,
    )


def teacher_forced_logps(model, rollout: Rollout, *, temperature: float = 1.0, **head_kwargs):
    """Per-token log softmax(logits / temperature) of the completion tokens in one forward of
    prompt + completion, `[N, C]` float32, 0 off `completion_mask`.

    Differentiable in the model's parameters (use it inside `nnx.grad`); the LM head runs fused
    (`ops.fused_token_logps`, no `[N, T, V]` logits). `temperature=T` reproduces the rollout's
    sampling log-probs (GRPO scores `logits / T`); Online DPO's loss uses `temperature=1.0`.
    `head_kwargs` go to `ops.fused_token_logps` (`chunk_size`, `precision`, ...).
    """
    p = rollout.prompt_ids.shape[1]
    c = rollout.completion_ids.shape[1]
    ids = rollout.input_ids
    attention = rollout.attention_mask
    completion = jnp.concatenate(
        [jnp.zeros_like(rollout.prompt_mask, jnp.int32), rollout.completion_mask.astype(jnp.int32)],
        1,
    )
    labels, mask = ops.next_token_alignment(ids, attention, completion)
    out = model(ids, attention)
    logps = ops.fused_token_logps(
        out.last_hidden_state, model.unembed(), labels, mask, temperature=temperature, **head_kwargs
    )
    return logps[:, p - 1 : p - 1 + c]
