"""`LlamaForCausalLM(..., keep_mask=)`: the last decoder layer's output projection and MLP run
only on a window that covers the kept positions (what the trainer's fused LM head reads).

Parity: at every kept position the hidden state, and the gradient of anything read there, equal
the full computation's. Both are the same float64 operations on the same values, except
attention (RoPE and the scores' softmax are float32 by design), which the two programs compile
into different fusions: float32 rounding, 2^-24 ~ 6e-8 per operation through two layers
(observed 2e-7 of the largest value). The tolerance, 1e-5 of the largest value, leaves a margin
of 50; a window that misses a kept position gives 0 there, an O(1) error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import data, models, online, peft
from alignjax.models.llama import window_widths
from alignjax.train import step as S

TOL = 1e-5
CFG = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def float64_model(implementation="grouped", remat=False):
    cfg = models.LlamaConfig(**CFG, attention_implementation=implementation)
    return models.LlamaForCausalLM(cfg, param_dtype=jnp.float64, remat=remat, rngs=nnx.Rngs(0))


def close(got, want, what):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0, what
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL * scale,
                               err_msg=what)  # fmt: skip


def test_window_widths():
    """Half the row (rounded up to a multiple of 8) and the whole row; short rows: no window."""
    assert window_widths(8) == (8,) and window_widths(15) == (15,)
    assert window_widths(16) == (8, 16)
    assert window_widths(40) == (24, 40)  # ceil(20 / 8) * 8
    assert window_widths(129) == (72, 129)
    assert window_widths(2048) == (1024, 2048)


@pytest.mark.parametrize("implementation,remat", [("grouped", False), ("blockwise", True)])
def test_values_and_gradients_at_kept_positions(x64, implementation, remat):
    """Kept positions in rows 0 and 2 (row 1 keeps none): [17, 30) fits the half window (24 of
    40 positions); the gradient of a weighted sum over them, with respect to every parameter,
    equals the full model's. Outside the window the hidden state is 0."""
    model = float64_model(implementation, remat)
    b, t = 3, 40
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, CFG["vocab_size"])
    keep = np.zeros((b, t), bool)
    keep[0, 17:30] = True
    keep[2, 20:25] = True
    keep = jnp.asarray(keep)
    weights = jax.random.normal(jax.random.key(2), (b, t, CFG["hidden_size"]), jnp.float64)

    def read(m, keep_mask):
        h = m(ids, keep_mask=keep_mask).last_hidden_state
        return jnp.sum(jnp.where(keep[..., None], h * weights, 0)), h

    g_full, h_full = nnx.grad(lambda m: read(m, None), has_aux=True)(model)
    g_kept, h_kept = nnx.grad(lambda m: read(m, keep), has_aux=True)(model)
    assert h_kept.dtype == jnp.float64
    close(jnp.where(keep[..., None], h_kept, 0), jnp.where(keep[..., None], h_full, 0), "values")
    # the window: width 24, from lo = 17 moved back to end at the row's end -> [16, 40)
    assert float(jnp.abs(h_kept[:, :16]).max()) == 0.0
    assert float(jnp.abs(h_kept[:, 16:]).min()) > 0
    kept = dict(jax.tree.leaves_with_path(g_kept))
    checked = 0
    for path, a in jax.tree.leaves_with_path(g_full):
        if jax.tree_util.keystr(path).startswith("['lm_head']"):  # not read: zero on both
            assert float(jnp.abs(kept[path]).max()) == 0.0
            continue
        close(kept[path], a, jax.tree_util.keystr(path))
        checked += 1
    assert checked == 2 * 9 + 2  # every layer's 9 parameters, the embedding, the final norm


def test_every_span_is_covered():
    """Exhaustive on a 24-position row: for every span [lo, hi) of kept positions (one row
    keeps it, the other row keeps nothing), each kept position's hidden state equals the full
    model's. One compiled function: the span is traced."""
    cfg = models.LlamaConfig(**CFG)
    model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))
    t = 24
    ids = jax.random.randint(jax.random.key(4), (2, t), 0, CFG["vocab_size"])
    full = np.asarray(model(ids).last_hidden_state)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda k: nnx.merge(graphdef, state)(ids, keep_mask=k).last_hidden_state)
    spans = [(lo, hi) for lo in range(t) for hi in range(lo + 1, t + 1)]
    for lo, hi in spans:
        keep = np.zeros((2, t), bool)
        keep[1, lo:hi] = True
        got = np.asarray(run(jnp.asarray(keep)))
        atol = TOL * np.abs(full).max()
        np.testing.assert_allclose(got[1, lo:hi], full[1, lo:hi], rtol=0, atol=atol,
                                   err_msg=f"span {lo}:{hi}")  # fmt: skip
    # nothing kept: a valid call (the window starts at 0), the values are not read
    assert np.isfinite(np.asarray(run(jnp.zeros((2, t), bool)))).all()


def test_errors_name_the_argument():
    model = models.LlamaForCausalLM(models.LlamaConfig(**CFG), rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"`keep_mask` must have shape \(2, 16\)"):
        model(ids, keep_mask=jnp.ones((2, 15), bool))
    for kw in ("output_hidden_states", "output_activations"):
        with pytest.raises(ValueError, match="keep_mask.*output_hidden_states"):
            model(ids, keep_mask=jnp.ones((2, 16), bool), **{kw: True})


def test_adapter_dropout_in_the_window_draws_from_the_layer_stream():
    """LoRA dropout on o_proj and down_proj (both run inside the window): the call works under
    jit and two calls draw two masks (the RNG state the switch returns is written back)."""
    model = models.LlamaForCausalLM(models.LlamaConfig(**CFG), rngs=nnx.Rngs(0))
    peft.apply(model, [peft.Rule(".*(o_proj|down_proj)", "lora", rank=2, alpha=4.0,
                                 dropout=0.5)], rngs=nnx.Rngs(1))  # fmt: skip
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.LoRAParam):
            v[...] = v[...] + 0.1
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
    keep = jnp.ones((2, 16), bool).at[:, :9].set(False)
    forward = nnx.jit(lambda m: m(ids, keep_mask=keep).last_hidden_state)
    first, second = (np.asarray(forward(model)) for _ in range(2))
    assert np.abs(first[:, 9:] - second[:, 9:]).max() > 0


class NoKeepMask(models.LlamaForCausalLM):
    """A model family whose `__call__` does not take `keep_mask` (it is optional)."""

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, *,
                 prefix_ids=None, output_hidden_states=False,
                 output_activations=False):  # fmt: skip
        return super().__call__(input_ids, attention_mask, positions, segment_ids,
                                prefix_ids=prefix_ids, output_hidden_states=output_hidden_states,
                                output_activations=output_activations)  # fmt: skip


def test_the_train_step_passes_the_loss_mask():
    """A DPO step with an online frozen reference (its rows' completions are the last half or
    less, so both models run their last layer on the half window) gives the log-probs, loss and
    gradient norm of the same step on a model without `keep_mask` (float32 sums of ~10
    log-probs: 1e-5), which the trainer detects and calls without it."""
    rng = np.random.default_rng(0)
    ex = [dict(chosen_input_ids=rng.integers(1, 64, 20).tolist(), chosen_prompt_length=12,
               rejected_input_ids=rng.integers(1, 64, 18).tolist(), rejected_prompt_length=12,
               row=i) for i in range(3)]  # fmt: skip
    batch = jax.tree.map(jnp.asarray, data.collate(ex, 24))
    spec = S.StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.5}, reference="frozen")
    opt = optax.sgd(1.0)
    out = []
    for cls in (models.LlamaForCausalLM, NoKeepMask):
        model = cls(models.LlamaConfig(**CFG), rngs=nnx.Rngs(0))
        assert models.takes_keep_mask(model) == (cls is models.LlamaForCausalLM)
        state = S.init_state(model, opt, wrt=nnx.Param, reference="frozen")
        step = S.build_step(spec, opt, donate=False)
        state, m = step(state, batch)
        state, m2 = step(state, batch)  # the reference and the policy now differ
        out.append((m, m2))
    for got, want in zip(out[0], out[1]):
        for key in ("logps/chosen", "logps/rejected", "loss", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert float(out[1][0]["grad_norm"]) > 1e-3


def test_teacher_forced_logps_pass_the_completion_mask():
    """GRPO / Online DPO's `online.teacher_forced_logps` (left-padded prompts of 12, completions
    of 8 with padding after an early stop): the log-probs equal a model's without `keep_mask`
    (float32, ~8 terms per sum: 1e-5 relative), and their gradients too."""
    rng = np.random.default_rng(5)
    prompt_mask = np.ones((2, 12), np.int32)
    prompt_mask[1, :3] = 0
    completion_mask = np.ones((2, 8), np.int32)
    completion_mask[0, 6:] = 0
    roll = online.Rollout(
        prompt_ids=jnp.asarray(rng.integers(1, 64, (2, 12)) * prompt_mask),
        prompt_mask=jnp.asarray(prompt_mask),
        completion_ids=jnp.asarray(rng.integers(1, 64, (2, 8)) * completion_mask),
        completion_mask=jnp.asarray(completion_mask),
        missing_eos=jnp.zeros(2, bool),
        logps=jnp.zeros((2, 8)),
        prompt_index=jnp.arange(2, dtype=jnp.int32),
        sample_index=jnp.zeros(2, jnp.int32),
        num_generations=1,
        layout="grouped",
    )
    out = []
    for cls in (models.LlamaForCausalLM, NoKeepMask):
        model = cls(models.LlamaConfig(**CFG), rngs=nnx.Rngs(0))
        total = lambda m: jnp.sum(online.teacher_forced_logps(m, roll))  # noqa: E731
        out.append((online.teacher_forced_logps(model, roll), nnx.grad(total)(model)))
    (lp, g), (lp_ref, g_ref) = out
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(scale, 1e-12))
