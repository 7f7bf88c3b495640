"""A reward model: the Llama decoder plus a scalar value head read at each row's last real token.

This is HF's `LlamaForSequenceClassification` with `num_labels=1`, what TRL's RewardTrainer
builds: `score = Linear(D, 1, bias=False)` (init N(0, initializer_range = 0.02)) on the final
(normed) hidden state, read at the last non-padding token of each row. HF finds that token as the
rightmost one that is not `pad_token_id`; here it is the rightmost position with
`attention_mask` 1 (the same token for right- or left-padded rows, and still right when the
pad token is also EOS, where HF would read the token before the trailing EOS).

Why a head of the train state and not a new model class. The decoder stays the
`LlamaForCausalLM` every other task trains (so `init_from`, PEFT adapters, sharding rules,
remat and HF I/O apply unchanged), and the value head rides in `TrainState`'s trainable heads
(`init_state(..., heads={"score": ValueHead(D)})`, the slot SparsePO's mask heads use): it is
optimised, checkpointed, restored and placed with the policy, and parameter groups address it
as `heads/score/kernel` (`optim.groups: [{label: heads, learning_rate: ...}]`). The unused LM
head costs memory only, never compute: the step reads the final hidden states, not logits.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from alignjax import models
    >>> from alignjax.models.reward import ValueHead, sequence_scores
    >>> cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model, head = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), ValueHead(16, seed=1)
    >>> ids = jnp.array([[1, 5, 7, 0], [1, 4, 0, 0]])
    >>> sequence_scores(model, head, ids, (ids > 0).astype(jnp.int32)).shape
    (2,)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ValueHead", "last_token_index", "sequence_scores", "HEAD_NAME", "HF_HEAD_KEY"]

HEAD_NAME = "score"  # the head's name in `TrainState` (parameter paths `heads/score/...`)
HF_HEAD_KEY = "score.weight"  # LlamaForSequenceClassification's head, [num_labels, D]


class ValueHead(nnx.Module):
    """`r = h @ kernel`, one scalar per row of final hidden states `h` `[R, D]` (no bias, as HF).

    Args:
      hidden_size: D, the decoder's width.
      seed: the initialisation's PRNG seed.
      init_std: the kernel's N(0, std^2) initialisation (HF's `initializer_range`).
      param_dtype: the kernel's dtype.
    """

    def __init__(self, hidden_size: int, *, seed: int = 0, init_std: float = 0.02,
                 param_dtype=jnp.float32):  # fmt: skip
        key = jax.random.key(seed)
        init = init_std * jax.random.normal(key, (hidden_size, 1), jnp.float32)
        self.kernel = nnx.Param(init.astype(param_dtype))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """`[..., D]` -> `[...]` float32 scores."""
        w = self.kernel[...].astype(jnp.float32)
        return (hidden.astype(jnp.float32) @ w)[..., 0]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """`[R]` the rightmost position with `attention_mask` 1 (0 for an all-padding row)."""
    mask = jnp.asarray(attention_mask) != 0
    positions = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask, positions, 0), axis=-1)


def sequence_scores(model, head: ValueHead, input_ids, attention_mask, positions=None,
                    **model_kwargs) -> jax.Array:  # fmt: skip
    """r(x, y) `[R]` (float32) of right- or left-padded rows: `head` on `model`'s final hidden
    state at each row's last real token (`last_token_index`). Packed rows are not supported."""
    if model_kwargs.get("segment_ids") is not None:
        raise ValueError("reward scores read one sequence per row: packed rows (segment_ids) "
                         "are not supported (data.packing=false)")  # fmt: skip
    kw = {} if positions is None else {"positions": positions}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kw)
    h = out.last_hidden_state
    idx = last_token_index(attention_mask)
    last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    return head(last)
