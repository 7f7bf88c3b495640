"""`CausalLM`: what the trainer, the evaluator and the sampler use of a model.

A new model family implements these members (`LlamaForCausalLM` is the reference); nothing else
of the model is read by `alignjax.train` or `alignjax.models.generate`. Checkpoint I/O
(`load_pretrained` / `save_pretrained`, `config.to_hf`), sharding rules and PEFT targets go by
the Llama module paths and are not part of the protocol.

Where each member is used:

- `__call__` -> `ModelOutput`: every forward pass of training and evaluation, called as
  `model(**batch.model_inputs(), output_hidden_states=..., output_activations=...)` (the
  trainer's forward, `train.forward.policy_outputs`, formerly `train.step._hidden_and_head`;
  `model_inputs` holds input_ids, attention_mask, positions and, for packed batches,
  segment_ids, and for shared-prompt batches (`data.pack(share_prompt=True)`) prefix_ids: a
  family that does not take `prefix_ids` cannot train on those), and `train.reference`
  (precomputed reference log-probs). A loss's mask
  provider reads the reference's `hidden_states[1:]` (SparsePO's mask heads) or `activations`
  (MaPO).
- `unembed()`: the LM head handed with `last_hidden_state` to `ops.fused_token_logps` /
  `ops.fused_token_stats`, which never materialise the `[B, T, V]` logits (train step,
  evaluation, reference log-probs).
- `logits(hidden)`: the sampler's next-token logits (`generate`), one position at a time.
- `step_with_cache(...)`: the sampler's prefill and decode steps against a KV cache.
- `dtype`: the compute dtype (None: the parameters' dtype); the sampler's KV-cache dtype.
- `config`: the architecture; the trainer reads `vocab_size` (against the tokenizer),
  `num_hidden_layers` and `hidden_size` (SparsePO's mask heads); the sampler reads
  `num_hidden_layers`, `kv_heads`, `dim_per_head` (cache shapes) and `check_length(total)`.

`isinstance(model, CausalLM)` checks that the members exist, not their signatures.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from alignjax.models.llama import ModelOutput

__all__ = ["CausalLM"]


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model as `alignjax.train` and `alignjax.models.generate` use it.

    Attributes:
      config: the architecture (hashable: models keep it as static graph metadata, and equal
        architectures must compare equal so that jitted functions compile once). Read:
        `vocab_size`, `hidden_size`, `num_hidden_layers` (trainer); `num_hidden_layers`,
        `kv_heads` (key/value heads), `dim_per_head` and `check_length(length)` (raises
        ValueError for a length the model cannot attend over) (sampler).
      dtype: the compute dtype as a `jnp.dtype`, or None to compute in the parameters' dtype;
        the sampler allocates its KV cache in it (None: in `unembed().dtype`).
    """

    config: Any
    dtype: Any

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
        output_activations: bool = False,
    ) -> ModelOutput:
        """The forward pass: hidden states, not logits.

        Args:
          input_ids: `[B, T]` int token ids.
          attention_mask: `[B, T]` 1 on real tokens, 0 on padding (None: all ones).
          positions: `[B, T]` int RoPE positions (None: derived from the mask and segments).
          segment_ids: `[B, T]` int packed-sequence ids (tokens attend within their segment);
            None for unpacked rows.
          output_hidden_states: also return the embeddings and every layer's output.
          output_activations: also return per-layer activations (MaPO).

        Returns:
          `ModelOutput(last_hidden_state [B, T, D] after the final norm, hidden_states,
          activations)`; the optional fields are None unless requested. `hidden_states` is a
          tuple of L + 1 `[B, T, D]` arrays (embeddings first, `hidden_states[1:]` the layers:
          SparsePO stacks those), `activations` a tuple of L dicts of `[B, T, ...]` arrays by group
          name, at least MaPO's "attn", "mlp" and "resid" (`ops.mapo_activation_mask` reads the
          groups `StepSpec.mapo_groups` names).
        """
        ...

    def unembed(self) -> jax.Array:
        """The `[D, V]` LM-head matrix (the transposed embedding when tied), differentiable with
        respect to the model's parameters: `ops.fused_token_logps(out.last_hidden_state,
        model.unembed(), labels, mask)` gives the per-token log-probs the losses train on. The
        head has no bias (the fused ops take one as `bias=`, but the trainer passes none)."""
        ...

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[..., D] -> [..., V]` logits `hidden @ unembed()` in the compute dtype (the sampler
        casts them to float32)."""
        ...

    def step_with_cache(
        self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, caches: list, index
    ) -> tuple[jax.Array, list]:
        """Run T new tokens against a KV cache: `input_ids` / `positions` `[B, T]`, `mask`
        `[B, 1, T, S]` booleans (True: key slot visible), `caches` one `(k, v)` pair of
        `[B, S, config.kv_heads, config.dim_per_head]` buffers per layer, `index` the first slot
        the new keys / values are written to. Returns the final hidden states `[B, T, D]`
        (after the final norm, as `last_hidden_state`) and the updated caches."""
        ...
