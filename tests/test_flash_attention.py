"""`blockwise_attention` against the dense `grouped_query_attention` with the equivalent 4-D
mask (values and gradients w.r.t. q, k, v) on causal, padded, packed, sliding-window, GQA and
MHA inputs whose length is not a multiple of the block; the Llama with "blockwise" against
"grouped"; and the compiled memory of forward + backward against the dense path.

Tolerances: float32 1e-5. Both sides compute the same float32 scores and softmax; the blockwise
one sums exponentials and probability-weighted values block by block with a running maximum, i.e.
the same float32 terms in another order and with a rescaling, so they differ by a few ulps
(observed < 2e-6 on these O(1) values)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_models import CFG  # the tiny GQA Llama the model tests use

from alignjax import models
from alignjax.models.flash_attention import blockwise_attention

B, T, D = 2, 45, 8
BLOCKS = {"q_block": 16, "kv_block": 8}  # 45 = 2 * 16 + 13 = 5 * 8 + 5: padded internally


def dense_mask(valid, segments=None, window=None, prefix=None):
    """[B, 1, T, T] as `attention_mask_4d`, with an optional sliding window; `prefix`: the
    segment each query also sees (shared-prompt rows)."""
    i = np.arange(valid.shape[1])
    mask = (i[:, None] >= i[None, :])[None] & valid[:, None, :]
    if window is not None:
        mask &= (i[:, None] - window < i[None, :])[None]
    if segments is not None:
        same = segments[:, :, None] == segments[:, None, :]
        if prefix is not None:
            same |= prefix[:, :, None] == segments[:, None, :]
        mask &= same
    return jnp.asarray((mask | np.eye(len(i), dtype=bool))[:, None])


def inputs(heads, kv, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, heads, D))
    k, v = rng.standard_normal((2, B, T, kv, D))
    ct = rng.standard_normal((B, T, heads, D))
    return [jnp.asarray(x, dtype) for x in (q, k, v, ct)]


def left_right_padding():
    valid = np.ones((B, T), bool)
    valid[0, :11] = False  # left padding
    valid[1, 30:] = False  # right padding
    return valid


def packed_segments():
    segments = np.zeros((B, T), np.int32)
    segments[0, 12:], segments[0, 31:] = 1, 2
    segments[1, 5:], segments[1, 20:] = 1, 2
    valid = np.ones((B, T), bool)
    valid[1, 40:] = False  # padding after the last segment
    segments[1, 40:] = 3
    return valid, segments


def shared_prompts():
    """Shared-prompt rows (`data.pack(share_prompt=True)`): row 0 one pair [prompt | chosen |
    rejected] and padding, row 1 two pairs. A branch sees its own segment and its prompt's."""
    segments = np.zeros((B, T), np.int32)
    prefix = np.zeros((B, T), np.int32)
    valid = np.ones((B, T), bool)
    for row, spans in ((0, [(0, 10), (10, 25), (25, 40)]),
                       (1, [(0, 6), (6, 14), (14, 22), (22, 30), (30, 37), (37, 45)])):  # fmt: skip
        for n, (a, b) in enumerate(spans):
            segments[row, a:b] = n + 1
            prefix[row, a:b] = 3 * (n // 3) + 1  # the pair's prompt segment
    valid[0, 40:] = False
    return valid, segments, None, prefix


CASES = {
    "causal": lambda: (np.ones((B, T), bool), None, None, None),
    "left_and_right_padding": lambda: (left_right_padding(), None, None, None),
    "packed_3_segments": lambda: (*packed_segments(), None, None),
    "sliding_window": lambda: (left_right_padding(), None, 10, None),
    "shared_prompts": shared_prompts,
}


@functools.partial(jax.jit, static_argnums=0)  # one program per side, not an eager vjp
def value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_match_dense(case, heads, kv):
    valid, segments, window, prefix = CASES[case]()
    q, k, v, ct = inputs(heads, kv)
    mask = dense_mask(valid, segments, window, prefix)
    kw = dict(key_valid=jnp.asarray(valid), window=window, **BLOCKS)
    if segments is not None:
        kw["segment_ids"] = jnp.asarray(segments)
    if prefix is not None:
        kw["prefix_ids"] = jnp.asarray(prefix)

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, **kw)

    def dense(q, k, v):
        return models.grouped_query_attention(q, k, v, mask)

    got_out, got_grads = jax.jit(lambda *a: value_and_grads(blockwise, *a))(q, k, v, ct)
    want_out, want_grads = jax.jit(lambda *a: value_and_grads(dense, *a))(q, k, v, ct)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", got_grads, want_grads):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
    assert np.abs(np.asarray(got_grads[1])).max() > 0.1  # a real gradient, not all zeros


def test_block_classes_skip_hidden_pairs_and_unmask_full_ones():
    """The block pairs the kernel visits without a mask (FULL) or not at all (SKIP), on one
    shared-prompt row [prompt 16 | chosen 16 | rejected 16] in blocks of 8: the chosen branch's
    keys are skipped by the rejected branch's queries, the prompt's keys are FULL for both
    branches, the diagonal blocks are masked (PARTIAL), and the blocks above it are skipped.
    Padding makes a key block PARTIAL, or SKIP where all its keys are padding. (Correctness of
    every class is the parity test above; this checks that the classes are used at all.)"""
    from alignjax.models.flash_attention import FULL, PARTIAL, SKIP, _block_classes, _Blocks

    seg = jnp.repeat(jnp.arange(1, 4), 16)[None]
    pre = jnp.ones_like(seg)
    pos = jnp.arange(48)[None]
    lay = _Blocks(causal=True, window=None, q_block=8, kv_block=8, kv_length=48)
    got = np.asarray(_block_classes(lay, pos, pos, seg, seg, pre, jnp.ones((1, 48), bool)))
    assert np.all(got[np.triu_indices(6, 1)] == SKIP)
    assert np.all(np.diag(got) == PARTIAL)
    assert np.all(got[2:, :2] == FULL) and np.all(got[1, :1] == FULL)
    assert np.all(got[4:, 2:4] == SKIP) and got[3, 2] == FULL and got[5, 4] == FULL
    valid = jnp.ones((1, 48), bool).at[0, :8].set(False).at[0, 12].set(False)  # left padding
    got = np.asarray(_block_classes(lay, pos, pos, None, None, None, valid))
    assert got[0, 0] == PARTIAL  # padding queries attend to themselves
    assert np.all(got[1:, 0] == SKIP) and np.all(got[2:, 1] == PARTIAL)
    assert got[5, 4] == FULL and got[5, 2] == FULL


def test_default_blocks_of_256_from_1024_positions():
    """`default_block`: 128 below 1024 positions, 256 from 1024 on. At T = 1030 (four blocks of
    256 and a padded fifth), causal with right padding, values and gradients equal the dense path
    as in the test above."""
    from alignjax.models.flash_attention import default_block

    assert (default_block(1023), default_block(1024), default_block(8192)) == (128, 256, 256)
    rng = np.random.default_rng(7)
    t = 1030
    q = jnp.asarray(rng.standard_normal((1, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, 1, t, 2, 8)))
    ct = jnp.asarray(rng.standard_normal((1, t, 4, 8)), jnp.float32)
    valid = np.ones((1, t), bool)
    valid[0, 1000:] = False
    mask = dense_mask(valid)

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, key_valid=jnp.asarray(valid))

    def dense(q, k, v):
        return models.grouped_query_attention(q, k, v, mask)

    got_out, got_grads = value_and_grads(blockwise, q, k, v, ct)
    want_out, want_grads = value_and_grads(dense, q, k, v, ct)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_offsets_and_key_blocks_skipped_by_positions():
    """Queries after a prefix (positions offset by 20 against 65 keys) with separate query / key
    segment ids, against the dense mask built from the same positions."""
    rng = np.random.default_rng(3)
    t, s = 45, 65
    q = jnp.asarray(rng.standard_normal((B, t, 4, D)), jnp.float32)
    k, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, B, s, 2, D)))
    qpos, kpos = np.arange(t) + 20, np.arange(s)
    kseg = (kpos >= 30).astype(np.int32)[None].repeat(B, 0)
    qseg = (qpos >= 30).astype(np.int32)[None].repeat(B, 0)
    visible = (kpos[None, :] <= qpos[:, None]) & (qseg[:, :, None] == kseg[:, None, :])
    mask = jnp.asarray((visible | (kpos[None, :] == qpos[:, None]))[:, None])
    got = blockwise_attention(
        q, k, v, segment_ids=(jnp.asarray(qseg), jnp.asarray(kseg)),
        q_positions=jnp.asarray(qpos), k_positions=jnp.asarray(kpos), **BLOCKS,
    )  # fmt: skip
    want = models.grouped_query_attention(q, k, v, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward():
    """bf16 inputs: the blockwise output (float32 statistics, bf16 probabilities in the value
    product, as the dense path) against the dense path on the same bf16 inputs. Each side rounds
    its probabilities and its output to bf16 (8 significant bits, relative error 2^-9 per
    rounding): a few roundings of O(1) values give ~2^-9 * 4 = 8e-3; allow 2e-2 absolute."""
    valid = left_right_padding()
    q, k, v, _ = inputs(4, 2, jnp.bfloat16)
    got = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, key_valid=valid, **BLOCKS))(q, k, v)
    want = models.grouped_query_attention(q, k, v, dense_mask(valid))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0, atol=2e-2)


def test_compiled_memory_of_forward_and_backward_is_a_fraction_of_dense():
    """Temporary memory XLA allocates for forward + backward at T=2048 (B=1, H=4, d=32): the
    dense path holds [H, T, T] scores / probabilities (16 MiB each in float32), the blockwise
    one only [H, 128, 128] blocks. A property of the compiled program, not a measurement."""
    b, t, h, d = 1, 2048, 4, 32
    q, k, v = (jax.ShapeDtypeStruct((b, t, h, d), jnp.float32) for _ in range(3))
    mask = models.attention_mask_4d(jnp.ones((b, t), jnp.int32))

    def temp_bytes(fn):
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes(lambda q, k, v: models.grouped_query_attention(q, k, v, mask))
    blockwise = temp_bytes(blockwise_attention)
    assert dense > 64 * 2**20  # the dense program does hold the [H, T, T] scores
    assert blockwise < dense / 4, (blockwise, dense)


@pytest.fixture(scope="module")
def models_pair():
    grouped = models.LlamaForCausalLM(
        models.LlamaConfig(**{**CFG.__dict__, "attention_implementation": "grouped"}),
        rngs=nnx.Rngs(0),
    )
    cfg = models.LlamaConfig(**{**CFG.__dict__, "attention_implementation": "blockwise"})
    blockwise = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    return grouped, blockwise


def model_batches():
    """A padded batch (left padding in one row, right in the other) and a packed one (three
    segments, then padding), T = 150: two query blocks of the default 128."""
    t = 150
    ids = np.random.default_rng(4).integers(1, 50, (2, t))
    padded = np.ones((2, t), np.int32)
    padded[0, :17], padded[1, 120:] = 0, 0
    seg = np.zeros((2, t), np.int32)
    seg[:, 40:], seg[:, 97:] = 1, 2
    packed = np.ones((2, t), np.int32)
    packed[1, 140:] = 0
    return {"padded": (ids, padded, None), "packed": (ids, packed, seg)}


@pytest.mark.parametrize("batch", ["padded", "packed"])
def test_llama_blockwise_equals_grouped(models_pair, batch):
    """Logits and the gradient of the masked next-token loss w.r.t. every parameter."""
    ids, mask, seg = (None if x is None else jnp.asarray(x) for x in model_batches()[batch])

    def loss_and_logits(model):
        logits = model.logits(model(ids, mask, segment_ids=seg).last_hidden_state)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:]), logits

    results = []
    for model in models_pair:
        graphdef, params = nnx.split(model)

        def objective(params, graphdef=graphdef):
            return loss_and_logits(nnx.merge(graphdef, params))

        (loss, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
        results.append((loss, logits, grads))
    (l0, z0, g0), (l1, z1, g1) = results
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_llama_blockwise_decodes_through_the_dense_path(models_pair):
    """KV-cache generation keeps the dense mask: "blockwise" generates what "grouped" does."""
    grouped, blockwise = models_pair
    ids = jnp.asarray(np.random.default_rng(5).integers(1, 50, (2, 7)))
    mask = jnp.ones((2, 7), jnp.int32)
    a = models.generate(grouped, ids, mask, max_new_tokens=3)
    b = models.generate(blockwise, ids, mask, max_new_tokens=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)


def test_only_the_visible_key_blocks_are_visited():
    """The key-block range each query block walks (forward) and the query-block range each key
    block walks (backward): causal skips the blocks above the diagonal, a window also those left
    of it (64 positions in blocks of 16, window 20: query block 3 = 48..63 sees keys 29..63)."""
    from alignjax.models.flash_attention import _block_ranges, _Blocks

    pos = jnp.arange(64)[None]
    (lo, hi), (qlo, qhi) = _block_ranges(_Blocks(True, None, 16, 16, 64), pos, pos)
    np.testing.assert_array_equal(lo, [0, 0, 0, 0])
    np.testing.assert_array_equal(hi, [1, 2, 3, 4])
    np.testing.assert_array_equal(qlo, [0, 1, 2, 3])
    np.testing.assert_array_equal(qhi, [4, 4, 4, 4])
    (lo, hi), (qlo, qhi) = _block_ranges(_Blocks(True, 20, 16, 16, 64), pos, pos)
    np.testing.assert_array_equal(lo, [0, 0, 0, 1])
    np.testing.assert_array_equal(hi, [1, 2, 3, 4])
    np.testing.assert_array_equal(qhi, [3, 4, 4, 4])


# Pallas TPU kernels, run on CPU in Pallas' TPU interpret mode. Same tolerance as above: the
# kernels accumulate the same float32 terms block by block with a running maximum. Padding
# rows are compared nowhere: there each padding token attends to itself only (its own segment
# id), where the dense mask lets a right-padding query see the real keys; no real token reads
# those rows (their cotangent is zero here, as a masked loss makes it).
PALLAS = ["pallas_splash", "pallas_flash"]


@pytest.mark.parametrize("kernel", PALLAS)
@pytest.mark.parametrize(
    "case",  # the causal case in the everyday loop, the other masks with the slow set
    [
        c if c == "causal" else pytest.param(c, marks=pytest.mark.slow)
        for c in sorted(CASES)
        if c != "shared_prompts"  # no shared-prompt rows (`attention` refuses them)
    ],
)
def test_pallas_kernels_match_dense_in_interpret_mode(case, kernel):
    from alignjax.models.pallas_attention import pallas_attention

    valid, segments, window, _ = CASES[case]()
    q, k, v, ct = inputs(4, 2)
    real = jnp.asarray(valid[:, :, None, None])
    kw = dict(key_valid=jnp.asarray(valid), window=window, kernel=kernel, interpret=True)
    if segments is not None:
        kw["segment_ids"] = jnp.asarray(segments)
    if kernel == "pallas_flash" and window is not None:
        with pytest.raises(ValueError, match="no sliding window"):
            pallas_attention(q, k, v, **kw)
        return
    mask = dense_mask(valid, segments, window)
    got_out, got_grads = value_and_grads(lambda *a: pallas_attention(*a, **kw), q, k, v, ct * real)
    want_out, want_grads = value_and_grads(
        lambda *a: models.grouped_query_attention(*a, mask), q, k, v, ct * real
    )
    np.testing.assert_allclose(got_out * real, want_out * real, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
    assert np.abs(np.asarray(got_grads[1])).max() > 0.1


def test_pallas_implementations_need_a_tpu():
    from alignjax.models.attention import attention_masks

    q, k, v, _ = inputs(4, 2)
    mask = attention_masks(jnp.ones((B, T), jnp.int32), None, "pallas_splash")
    for kernel in PALLAS:
        with pytest.raises(ValueError, match=f'"{kernel}".*needs a TPU'):
            models.attention(q, k, v, mask, implementation=kernel, causal=True)


@pytest.mark.slow  # interpret mode through the whole model (suite budget)
@pytest.mark.parametrize("batch", ["padded", "packed"])
def test_llama_pallas_splash_equals_grouped_in_interpret_mode(models_pair, batch, monkeypatch):
    """The model's wiring of "pallas_splash" (2-D masks, GQA, T = 150 padded to 256), run in
    interpret mode on CPU: logits at real tokens, the masked loss and every parameter gradient."""
    from functools import partial
    from importlib import import_module

    from alignjax.models.pallas_attention import pallas_attention

    # `alignjax.models.attention` the module (the package's `attention` is the function)
    attention_module = import_module("alignjax.models.attention")
    monkeypatch.setattr(
        attention_module, "pallas_attention", partial(pallas_attention, interpret=True)
    )
    cfg = models.LlamaConfig(**{**CFG.__dict__, "attention_implementation": "pallas_splash"})
    pallas = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids, mask, seg = (None if x is None else jnp.asarray(x) for x in model_batches()[batch])
    (l0, z0, g0), (l1, z1, g1) = (
        masked_loss_and_grads(m, ids, mask, seg) for m in (models_pair[0], pallas)
    )
    real = np.asarray(mask, bool)[..., None]
    np.testing.assert_allclose(z1 * real, z0 * real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def masked_loss_and_grads(model, ids, mask, seg):
    """(masked next-token loss, logits, parameter gradients), jitted."""
    graphdef, params = nnx.split(model)

    def objective(params):
        m = nnx.merge(graphdef, params)
        logits = m.logits(m(ids, mask, segment_ids=seg).last_hidden_state)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:]), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return loss, logits, grads


def test_attention_applies_the_window_on_both_paths():
    """`attention(..., window=)`: "blockwise" on the 2-D mask against "grouped" on the 4-D one
    with the window band, values and gradients, on left / right padded rows."""
    from alignjax.models.attention import attention_masks

    valid, window = left_right_padding(), 10
    q, k, v, ct = inputs(4, 2)
    seq = attention_masks(jnp.asarray(valid, jnp.int32), None, "blockwise")
    dense = attention_masks(jnp.asarray(valid, jnp.int32), None, "grouped")

    def run(implementation, mask):
        def fn(q, k, v):
            return models.attention(
                q, k, v, mask, implementation=implementation, causal=True, window=window
            )

        return value_and_grads(fn, q, k, v, ct)

    (got, got_grads), (want, want_grads) = run("blockwise", seq), run("grouped", dense)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    no_window = models.grouped_query_attention(q, k, v, dense)
    assert np.abs(np.asarray(no_window - want)).max() > 1e-2  # the window changed the output


def test_llama_blockwise_applies_the_mistral_sliding_window(monkeypatch):
    """A Mistral config with `sliding_window` 40 and rows of 150 tokens: "blockwise" runs past
    the window (the dense paths refuse it) and equals the dense path with the window band,
    logits and every parameter gradient; the window changes the logits."""
    import alignjax.models.config as config_module

    base = {**CFG.__dict__, "model_type": "mistral", "sliding_window": 40}
    blockwise = models.LlamaForCausalLM(
        models.LlamaConfig(**{**base, "attention_implementation": "blockwise"}), rngs=nnx.Rngs(0)
    )
    grouped = models.LlamaForCausalLM(
        models.LlamaConfig(**{**base, "attention_implementation": "grouped"}), rngs=nnx.Rngs(0)
    )
    ids, mask, _ = (None if x is None else jnp.asarray(x) for x in model_batches()["padded"])
    with pytest.raises(ValueError, match="sliding window 40"):
        grouped(ids, mask)
    # The reference: the dense path, whose `attention` applies the same window band, let past
    # the length check for this comparison.
    monkeypatch.setattr(config_module, "WINDOWED_IMPLEMENTATIONS", ("blockwise", "grouped"))
    (l0, z0, g0), (l1, z1, g1) = (
        masked_loss_and_grads(m, ids, mask, None) for m in (grouped, blockwise)
    )
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    full = models.LlamaForCausalLM(
        models.LlamaConfig(**{**CFG.__dict__, "attention_implementation": "blockwise"}),
        rngs=nnx.Rngs(0),
    )
    _, z_full, _ = masked_loss_and_grads(full, ids, mask, None)
    assert np.abs(np.asarray(z_full - z1)).max() > 1e-4
    monkeypatch.undo()
    with pytest.raises(ValueError, match="sliding window 40"):  # the KV-cache decode refuses
        models.generate(blockwise, ids[:, :38], mask[:, :38], max_new_tokens=3)


def test_auto_is_grouped_up_to_256_positions_and_blockwise_beyond(models_pair):
    """On CPU "auto" takes the dense grouped path (a [B, 1, T, T] mask) for full sequences of up
    to `AUTO_BLOCKWISE_ABOVE` = 256 positions and "blockwise" (a 2-D `SequenceMask`) beyond:
    the "auto" Llama's logits are bitwise those of the named implementation on each side of the
    threshold (the same program), and "auto" at 300 tokens equals "grouped" to 1e-5."""
    from alignjax.models.attention import AUTO_BLOCKWISE_ABOVE, attention_masks
    from alignjax.models.attention import resolved_implementation as resolved
    from alignjax.models.flash_attention import SequenceMask

    assert jax.default_backend() == "cpu" and AUTO_BLOCKWISE_ABOVE == 256
    assert resolved("auto", 256) == "grouped" and resolved("auto", 257) == "blockwise"
    assert resolved("grouped", 4096) == "grouped" and resolved("blockwise", 8) == "blockwise"
    assert isinstance(attention_masks(jnp.ones((2, 257)), None, "auto"), SequenceMask)
    assert attention_masks(jnp.ones((2, 256)), None, "auto").shape == (2, 1, 256, 256)
    # A Mistral window is applied past its length where "auto" means "blockwise" only.
    mistral = models.LlamaConfig(**{**CFG.__dict__, "model_type": "mistral", "sliding_window": 40})
    mistral.check_length(300, full_sequence=True)
    with pytest.raises(ValueError, match="sliding window 40"):
        mistral.check_length(200, full_sequence=True)
    grouped, blockwise = models_pair
    auto = models.LlamaForCausalLM(models.LlamaConfig(**CFG.__dict__), rngs=nnx.Rngs(0))
    assert auto.config.attention_implementation == "auto"
    rng = np.random.default_rng(6)
    for t, same in ((256, grouped), (300, blockwise)):
        ids = jnp.asarray(rng.integers(1, 50, (2, t)))
        mask = np.ones((2, t), np.int32)
        mask[0, :21], mask[1, t - 30 :] = 0, 0  # left and right padding
        got = auto.logits(auto(ids, jnp.asarray(mask)).last_hidden_state)
        np.testing.assert_array_equal(got, same.logits(same(ids, mask).last_hidden_state))
        want = grouped.logits(grouped(ids, mask).last_hidden_state)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
