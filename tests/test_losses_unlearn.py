"""Unlearning losses (GA, GradDiff, NPO, SimNPO) against the float64 NumPy derivations of the
official code (tests/reference/numpy_unlearn.py, committed fixture), finite differences, NPO's
gradient identities, jit, extreme inputs and input validation."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax import losses as L

DATA = np.load(Path(__file__).resolve().parent / "reference" / "fixtures" / "numpy_unlearn.npz")
META = json.loads(str(DATA["meta_json"]))
CASES = META["cases"]
LOSSES = {"grad_ascent": L.grad_ascent, "grad_diff": L.grad_diff, "npo": L.npo,
          "simnpo": L.simnpo}  # fmt: skip


def fixture_inputs():
    return {k[len("inputs/") :]: DATA[k] for k in DATA.files if k.startswith("inputs/")}


def make_batch(x, f=None, r=None, kl=None, dtype=jnp.float64, ref=None):
    as_f = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    return L.UnlearnBatch(
        forget_logps=as_f(x["forget"]) if f is None else f,
        forget_mask=jnp.asarray(x["forget_mask"]),
        retain_logps=as_f(x["retain"]) if r is None else r,
        retain_mask=jnp.asarray(x["retain_mask"]),
        ref_forget_logps=as_f(x["ref_forget"]) if ref is None else ref,
        retain_kl=as_f(x["kl"]) if kl is None else kl,
    )


def call_case(case, batch):
    """The alignjax loss for one fixture case (the NumPy keyword names mapped to ours)."""
    c = dict(case)
    fn = c.pop("fn")
    kw = {"retain_weight": c.pop("weight")} if "weight" in c else {}
    if "normalization" in c:
        kw["kl_normalization"] = c.pop("normalization")
    if "delta" in c:
        kw["log_ratio"] = c.pop("delta")
    kw.update(c)
    if fn == "gradient_difference":
        if kw.get("retain") == "none":
            return L.grad_ascent(batch)
        return L.grad_diff(batch, **kw)
    return LOSSES[fn](batch, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_official_formulas_x64(name, x64):
    x = fixture_inputs()
    batch = make_batch(x)

    def loss(f, r, kl):
        return call_case(CASES[name], make_batch(x, f, r, kl)).loss

    args = (batch.forget_logps, batch.retain_logps, batch.retain_kl)
    out = call_case(CASES[name], batch)
    np.testing.assert_allclose(out.loss, DATA[f"{name}/loss"], rtol=1e-10, atol=1e-12)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    for key, g in zip(("grad_forget", "grad_retain", "grad_retain_kl"), grads):
        np.testing.assert_allclose(g, DATA[f"{name}/{key}"], rtol=1e-10, atol=1e-12, err_msg=key)
    prefix = f"{name}/metrics/"
    metrics = [k[len(prefix) :] for k in DATA.files if k.startswith(prefix)]
    assert {"forget_nll", "logps/forget"} <= set(metrics)
    for key in metrics:
        np.testing.assert_allclose(out.metrics[key], DATA[prefix + key], rtol=1e-10, err_msg=key)
    assert out.losses.shape == (4,) and float(out.losses[2]) == 0.0  # the padding row


def test_precomputed_reference_sums_give_the_same_npo(x64):
    x = fixture_inputs()
    sums = jnp.asarray(np.where(x["forget_mask"] != 0, x["ref_forget"], 0.0).sum(-1))
    for log_ratio in ("sum", "token_mean"):
        a = L.npo(make_batch(x), log_ratio=log_ratio)
        b = L.npo(make_batch(x, ref=sums), log_ratio=log_ratio)
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-14)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences_x64(name, x64):
    x = fixture_inputs()
    kw = {} if name == "grad_ascent" else {"retain": "kl"}

    def loss(f, r, kl):
        return LOSSES[name](make_batch(x, f, r, kl), **kw).loss

    b = make_batch(x)
    args = (b.forget_logps, b.retain_logps, b.retain_kl)
    check_grads(loss, args, order=1, modes=["rev"], atol=1e-7, rtol=1e-7)
    if name != "grad_ascent":
        nll = lambda f, r: LOSSES[name](make_batch(x, f, r)).loss  # noqa: E731
        check_grads(nll, args[:2], order=1, modes=["rev"], atol=1e-7, rtol=1e-7)


def test_npo_gradient_equals_summed_log_prob_ga_at_initialisation(x64):
    """With policy = reference, grad L_NPO = 2 s(0) grad mean_i sum_t log pi(y_i,t): GA on the
    mean summed log-prob over the non-empty rows, which is `grad_ascent`'s token-mean gradient
    times (forget tokens / non-empty forget rows)."""
    x = fixture_inputs()
    m = jnp.asarray(x["forget_mask"])
    f = jnp.asarray(x["forget"])
    rows = float(jnp.sum(jnp.any(m != 0, -1)))
    tokens = float(jnp.sum(m != 0))
    for beta in (0.1, 2.0):
        g_npo = jax.grad(
            lambda p, b=beta: L.npo(make_batch(x, p, ref=f), beta=b, retain="none").loss
        )(f)
        g_sum = jax.grad(lambda p: jnp.sum(jnp.where(m != 0, p, 0.0)) / rows)(f)
        g_ga = jax.grad(lambda p: L.grad_ascent(make_batch(x, p)).loss)(f)
        np.testing.assert_allclose(g_npo, g_sum, rtol=1e-14, atol=0)
        np.testing.assert_allclose(g_npo, g_ga * tokens / rows, rtol=1e-14, atol=0)
        assert float(jnp.max(jnp.abs(g_npo - g_ga))) > 0.1  # not the token-mean GA itself
    # The weight 2 s(beta (log pi - log pi_ref)) falls below 1 once forgetting starts.
    lower = f - 1.0
    g = jax.grad(lambda p: L.npo(make_batch(x, p, ref=f), retain="none").loss)(lower)
    np.testing.assert_allclose(
        g, 2 * jax.nn.sigmoid(0.1 * -1.0 * jnp.sum(m != 0, -1))[:, None] * g_sum, rtol=1e-14
    )


def test_npo_beta_to_zero_is_gradient_ascent(x64):
    """(2/beta) softplus(beta u) = 2 log 2 / beta + u + O(beta u^2): the loss minus the constant
    tends to the mean summed log-ratio and the gradient to the summed-log-prob GA gradient."""
    x = fixture_inputs()
    m = x["forget_mask"]
    f = jnp.asarray(x["forget"])
    rows = np.any(m != 0, -1)
    ratio = np.where(m != 0, x["forget"] - x["ref_forget"], 0.0).sum(-1)[rows]
    g_sum = np.where(m != 0, 1.0 / rows.sum(), 0.0)
    for beta, tol in ((1e-4, 1e-4), (1e-7, 1e-7)):
        out = L.npo(make_batch(x), beta=beta, retain="none")
        np.testing.assert_allclose(out.loss - 2 * np.log(2) / beta, ratio.mean(), atol=10 * tol)
        g = jax.grad(lambda p, b=beta: L.npo(make_batch(x, p), beta=b, retain="none").loss)(f)
        np.testing.assert_allclose(g, g_sum, atol=tol)


def test_terms_accumulate_exactly_over_micro_batches(x64):
    """Summed (total, count) terms of two halves equal the full batch's loss."""
    x = fixture_inputs()
    halves = [
        {k: v[s] for k, v in x.items()} for s in (slice(0, 2), slice(2, None))
    ]  # forget rows 0-1 / 2-3 and retain rows 0-1 / 2
    for fn in (L.grad_diff, L.npo, L.simnpo):
        full = fn(make_batch(x), retain="kl")
        parts = [fn(make_batch(h), retain="kl") for h in halves]
        got = sum(
            t.weight * sum(p.terms[k].total for p in parts) / sum(p.terms[k].count for p in parts)
            for k, t in full.terms.items()
        )
        np.testing.assert_allclose(got, full.loss, rtol=1e-13)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiles_once_per_shape(name):
    kw = {} if name == "grad_ascent" else {"retain": "kl"}
    step = jax.jit(lambda b: LOSSES[name](b, **kw).loss)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        x = {k: v + rng.normal(0, 0.1, v.shape) * (k in ("forget", "ref_forget", "retain"))
             for k, v in fixture_inputs().items()}  # fmt: skip
        assert np.isfinite(float(step(make_batch(x, dtype=jnp.float32))))
    assert step._cache_size() == 1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_extremes_stay_finite(name):
    x = fixture_inputs()
    shape_f, shape_r = x["forget"].shape, x["retain"].shape
    for pol, ref in ((-1e4, 0.0), (-1e-3, -1e4)):
        xx = dict(x, forget=np.full(shape_f, pol), ref_forget=np.full(shape_f, ref),
                  retain=np.full(shape_r, -1e4), kl=np.full(shape_r, 1e4))  # fmt: skip
        for beta in (1e-4, 0.1, 50.0):
            kw = {} if name == "grad_ascent" else {"retain": "kl"}
            if name in ("npo", "simnpo"):
                kw["beta"] = beta

            def loss(f, r, kl, kw=kw, xx=xx):
                return LOSSES[name](make_batch(xx, f, r, kl, dtype=jnp.float32), **kw).loss

            b = make_batch(xx, dtype=jnp.float32)
            args = (b.forget_logps, b.retain_logps, b.retain_kl)
            value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
            assert np.isfinite(float(value)), (name, pol, beta)
            assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), (name, pol, beta)


def test_bad_batches_name_the_field():
    x = fixture_inputs()
    f, fm = jnp.asarray(x["forget"]), jnp.asarray(x["forget_mask"])
    r, rm = jnp.asarray(x["retain"]), jnp.asarray(x["retain_mask"])
    cases = [
        (dict(forget_logps=f, forget_mask=fm[:, :-1]), "forget_mask"),
        (dict(forget_logps=f[:0], forget_mask=fm[:0]), r"`forget_logps` has 0 rows"),
        (dict(forget_logps=f[0], forget_mask=fm[0]), "forget_logps"),
        (dict(forget_logps=fm, forget_mask=fm), "forget_logps.*floating"),
        (dict(forget_logps=f, forget_mask=None), "forget_mask"),
        (
            dict(forget_logps=f, forget_mask=fm, retain_logps=r[:0], retain_mask=rm[:0]),
            r"`retain_logps` has 0 rows",
        ),
        (dict(forget_logps=f, forget_mask=fm, retain_logps=r, retain_mask=rm[:1]), "retain_mask"),
        (dict(forget_logps=f, forget_mask=fm, ref_forget_logps=f[:, :2]), "ref_forget_logps"),
        (
            dict(
                forget_logps=f, forget_mask=fm, retain_logps=r, retain_mask=rm, retain_kl=r[:, :2]
            ),
            "retain_kl",
        ),
        (dict(forget_logps=f, forget_mask=fm, retain_kl=r), "retain_kl.*without `retain_logps`"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            L.UnlearnBatch(**kw)


def test_bad_hyperparameters_and_missing_inputs_name_the_argument():
    x = fixture_inputs()
    b = make_batch(x, dtype=jnp.float32)
    forget_only = L.UnlearnBatch(b.forget_logps, b.forget_mask, ref_forget_logps=b.forget_logps)
    no_kl = L.UnlearnBatch(b.forget_logps, b.forget_mask, b.retain_logps, b.retain_mask,
                           b.ref_forget_logps)  # fmt: skip
    no_ref = L.UnlearnBatch(b.forget_logps, b.forget_mask, b.retain_logps, b.retain_mask)
    for fn in (L.npo, L.simnpo):
        for beta in (0.0, -0.1):
            with pytest.raises(ValueError, match="beta"):
                fn(b, beta=beta)
        with pytest.raises(ValueError, match="npo_coeff"):
            fn(b, npo_coeff=-1.0)
    for fn in (L.grad_diff, L.npo, L.simnpo):
        with pytest.raises(ValueError, match="`retain` must be one of"):
            fn(b, retain="kl_div")
        with pytest.raises(ValueError, match="retain_weight"):
            fn(b, retain_weight=-1.0)
        with pytest.raises(ValueError, match="kl_normalization"):
            fn(b, retain="kl", kl_normalization="positions")
        with pytest.raises(ValueError, match="retain_logps"):
            fn(forget_only, retain="nll")
        with pytest.raises(ValueError, match="retain_kl"):
            fn(no_kl, retain="kl")
    with pytest.raises(ValueError, match="log_ratio"):
        L.npo(b, log_ratio="mean")
    with pytest.raises(ValueError, match="ref_forget_logps"):
        L.npo(no_ref)
    L.simnpo(no_ref)  # reference-free
    L.grad_ascent(forget_only)  # no retain set needed
    L.npo(forget_only, retain="none")
    L.simnpo(forget_only, retain="none")


def test_empty_sets_error_eagerly_and_contribute_nothing_under_jit():
    """A concrete mask without tokens is an error naming it; inside jit its term is (0, 0) with
    value 0 and zero gradient (an all-padding micro-batch)."""
    x = fixture_inputs()
    b = make_batch(x, dtype=jnp.float32)
    empty_f = L.UnlearnBatch(b.forget_logps, jnp.zeros_like(b.forget_mask), b.retain_logps,
                             b.retain_mask, b.ref_forget_logps)  # fmt: skip
    empty_r = L.UnlearnBatch(b.forget_logps, b.forget_mask, b.retain_logps,
                             jnp.zeros_like(b.retain_mask), b.ref_forget_logps)  # fmt: skip
    for fn in LOSSES.values():
        with pytest.raises(ValueError, match="`forget_mask` selects no tokens"):
            fn(empty_f)
    for fn in (L.grad_diff, L.npo, L.simnpo):
        with pytest.raises(ValueError, match="`retain_mask` selects no tokens"):
            fn(empty_r)
    for fn in LOSSES.values():
        kw = {} if fn is L.grad_ascent else {"retain": "none"}
        out = jax.jit(lambda bb, fn=fn, kw=kw: fn(bb, **kw))(empty_f)
        assert all(float(t.count) == 0 and float(t.value) == 0 for t in out.terms.values())
        assert float(out.loss) == 0.0

        def loss(p, mask, fn=fn, kw=kw):
            return fn(L.UnlearnBatch(p, mask, ref_forget_logps=b.ref_forget_logps), **kw).loss

        g = jax.jit(jax.grad(loss))(b.forget_logps, empty_f.forget_mask)
        assert float(jnp.max(jnp.abs(g))) == 0.0
