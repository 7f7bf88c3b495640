"""alignjax.losses DPO family against fixtures made by TRL 1.16.0's own loss code.

Tolerances: losses, metrics and gradients w.r.t. the per-token policy log-probs match TRL to
<= 1e-10 relative under x64 (float64 end to end, up to summation order) and <= 1e-5 in float32;
TRL's alpha-divergence cases were computed by TRL in float32 (it has no float64 branch), so they
get 1e-5 everywhere.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax import losses as L

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_dpo.npz"
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["meta_json"]))
CASES = sorted(META["cases"])
METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


def case_loss(name):
    """The alignjax loss for a fixture case, from its TRL configuration."""
    case = META["cases"][name]
    cfg = case["config"]
    kwargs = dict(
        beta=cfg["beta"],
        label_smoothing=cfg["label_smoothing"],
        f_divergence=cfg["f_divergence_type"],
        f_alpha=cfg["f_alpha_divergence_coef"],
        ld_alpha=cfg["ld_alpha"],
        use_weighting=cfg["use_weighting"],
        discopop_tau=cfg["discopop_tau"],
    )
    if case["loss_types"] == ["sigmoid"]:
        kwargs["label_smoothing"] = 0.0  # TRL >= 0.29 ignores it for sigmoid (ours: cDPO)
    if case["loss_types"] == ["sft"]:
        return L.get("sft")  # a pure NLL: none of the DPO hyperparameters apply
    if len(case["loss_types"]) == 1:
        fn = L.get(case["loss_types"][0])
        return lambda batch: fn(batch, **kwargs)
    for key in ("label_smoothing",):
        kwargs.pop(key)
    return L.combine(list(zip(case["loss_types"], case["loss_weights"])), **kwargs)


def make_batch(policy, dtype):
    shift = DATA["completion_mask"][:, 1:]
    return L.PreferenceBatch.from_stacked(
        policy,
        jnp.asarray(shift),
        jnp.asarray(DATA["ref_logps"], dtype),
        log_sum_sq=jnp.asarray(DATA["log_sum_sq_probs"], dtype),
    )


def run(name, dtype):
    fn = case_loss(name)

    def total(policy):
        out = fn(make_batch(policy, dtype))
        return out.loss, out

    policy = jnp.asarray(DATA["policy_logps"], dtype)
    (loss, out), grad = jax.value_and_grad(total, has_aux=True)(policy)
    return loss, out, grad


def close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) <= tol * max(1.0, np.max(np.abs(want)))


@pytest.mark.parametrize("name", CASES)
def test_matches_trl_x64(name, x64):
    tol = 1e-10 if META["cases"][name]["config"]["dtype"] == "float64" else 1e-5
    loss, out, grad = run(name, jnp.float64)
    assert loss.dtype == jnp.float64
    assert close(loss, DATA[f"{name}/loss"], tol), (float(loss), float(DATA[f"{name}/loss"]))
    assert close(grad, DATA[f"{name}/grad_policy_logps"], tol)
    if META["cases"][name]["loss_types"] == ["sft"]:
        return  # a pure NLL term defines no rewards; TRL's trainer logs DPO rewards regardless
    for key in METRICS:
        k_tol = max(tol, 1e-7) if key == "rewards/accuracies" else tol  # TRL: float32 accuracy
        assert close(out.metrics[key], DATA[f"{name}/{key}"], k_tol), key


@pytest.mark.parametrize(
    "name",
    [
        "sigmoid",
        "ipo",
        "aot",
        "exo_pair_ls1e-3",
        "sigmoid_wpo",
        "ipo_ld0.3",
        "mpo",
        "sigmoid_alpha0.5",
    ],
)
def test_matches_trl_float32(name):
    loss, out, grad = run(name, jnp.float32)
    assert loss.dtype == jnp.float32
    assert close(loss, DATA[f"{name}/loss"], 1e-5)
    assert close(grad, DATA[f"{name}/grad_policy_logps"], 1e-5)


@pytest.mark.parametrize("loss_type", L.FORMULAS)
def test_check_grads_x64(loss_type, x64):
    """jax.test_util.check_grads (reverse mode, finite differences) on every formula."""
    rng = np.random.default_rng(0)
    kwargs = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
    fn = L.get(loss_type)
    ref = jnp.asarray(DATA["ref_logps"], jnp.float64)
    mask = jnp.asarray(DATA["completion_mask"][:, 1:])

    def f(policy):
        return fn(L.PreferenceBatch.from_stacked(policy, mask, ref), **kwargs).loss

    policy = jnp.asarray(DATA["policy_logps"] + 0.01 * rng.standard_normal(ref.shape))
    check_grads(f, (policy,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_cdpo_label_smoothing_on_sigmoid(x64):
    """Our documented opt-in: sigmoid with label_smoothing is conservative DPO (cDPO)."""
    batch = make_batch(jnp.asarray(DATA["policy_logps"]), jnp.float64)
    out = L.get("sigmoid")(batch, label_smoothing=0.3)
    s = L.pair_scores(batch)
    z = 0.1 * (s.a - s.b)
    want = -(0.7 * jax.nn.log_sigmoid(z) + 0.3 * jax.nn.log_sigmoid(-z))
    np.testing.assert_allclose(out.losses, want, rtol=1e-12)


def test_compiles_once_per_shape():
    fn = jax.jit(
        lambda policy, ref, mask: (
            L.get("ipo")(L.PreferenceBatch.from_stacked(policy, mask, ref)).loss
        )
    )
    mask = jnp.asarray(DATA["completion_mask"][:, 1:])
    for k in range(3):
        policy = jnp.asarray(DATA["policy_logps"] * (1 + 0.1 * k), jnp.float32)
        fn(policy, jnp.asarray(DATA["ref_logps"], jnp.float32), mask).block_until_ready()
    assert fn._cache_size() == 1


def test_extreme_and_empty_inputs_are_finite():
    """+-1e4 log-ratios (the fixture holds a zero-length rejected completion), beta 1e-4 to 50."""
    mask = jnp.asarray(DATA["completion_mask"][:, 1:])
    policy = jnp.where(mask != 0, -1e4, 0.0)
    ref = jnp.where(mask != 0, 1e4, 0.0)

    def total(p, loss_type, beta, kwargs):
        batch = L.PreferenceBatch.from_stacked(p, mask, ref)
        return L.get(loss_type)(batch, beta=beta, **kwargs).loss

    for loss_type in L.FORMULAS:
        kwargs = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
        for beta in (1e-4, 0.1, 50.0):
            value, grad = jax.value_and_grad(total)(policy, loss_type, beta, kwargs)
            assert np.isfinite(value) and np.all(np.isfinite(grad)), (loss_type, beta)


def test_bad_hyperparameters():
    batch = make_batch(jnp.asarray(DATA["policy_logps"], jnp.float32), jnp.float32)
    with pytest.raises(ValueError, match="beta"):
        L.dpo(batch, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo(batch, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair"):
        L.dpo(batch, loss_type="exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match=r"available: \['aot'"):
        L.get("dpo_v2")
    with pytest.raises(ValueError, match="f_divergence"):
        L.dpo(batch, loss_type="nca_pair", f_divergence="forward_kl")
    with pytest.raises(ValueError, match="chosen_mask"):
        L.PreferenceBatch(
            batch.chosen_logps, batch.rejected_logps, batch.chosen_mask[:, :-1], batch.rejected_mask
        )


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_batch_coupled_losses_are_exact_under_pmap(loss_type):
    """With axis_name, 8 devices holding one pair each reproduce the full-batch result."""
    rng = np.random.default_rng(5)
    n, t = jax.device_count(), 5
    pol = jnp.asarray(-rng.gamma(2.0, 1.0, (2 * n, t)), jnp.float32)
    ref = pol + jnp.asarray(rng.normal(0, 0.5, (2 * n, t)), jnp.float32)
    mask = jnp.ones((2 * n, t), jnp.int32)
    full = L.get(loss_type)(L.PreferenceBatch.from_stacked(pol, mask, ref), label_smoothing=0.1)

    def per_device(pc, pr, rc, rr, m):
        batch = L.PreferenceBatch(pc, pr, m, m, rc, rr)
        out = L.get(loss_type)(batch, label_smoothing=0.1, axis_name="d")
        return out.losses

    split = lambda x: x.reshape(n, 1, t)  # noqa: E731
    got = jax.pmap(per_device, axis_name="d")(
        split(pol[:n]), split(pol[n:]), split(ref[:n]), split(ref[n:]), split(mask[:n])
    )
    np.testing.assert_allclose(np.asarray(got).reshape(-1), full.losses, rtol=1e-6)
    # Without axis_name each device would sort only its own pair (TRL's per-device behaviour).
    alone = jax.pmap(
        lambda *a: (
            L.get(loss_type)(
                L.PreferenceBatch(a[0], a[1], a[4], a[4], a[2], a[3]), label_smoothing=0.1
            ).losses
        )
    )(split(pol[:n]), split(pol[n:]), split(ref[:n]), split(ref[n:]), split(mask[:n]))
    assert not np.allclose(np.asarray(alone).reshape(-1), full.losses, rtol=1e-6)


def test_combine_routes_hyperparameters(x64):
    batch = make_batch(jnp.asarray(DATA["policy_logps"]), jnp.float64)
    mixed = L.combine([("sigmoid", 1.0), ("cpo", 0.5), ("sft", 0.2)], beta=0.3, ld_alpha=0.5)
    out = mixed(batch)
    want = (
        L.dpo(batch, beta=0.3, ld_alpha=0.5).loss
        + 0.5 * L.cpo(batch, beta=0.3).loss
        + 0.2 * L.sft(batch).loss
    )
    np.testing.assert_allclose(out.loss, want, rtol=1e-12)
    with pytest.raises(ValueError, match="betta"):
        L.combine([("sigmoid", 1.0), ("sft", 1.0)], betta=0.3)
