"""KTO / APO-zero-unpaired against fixtures from TRL 1.16.0's KTOTrainer._compute_loss.

Tolerance <= 1e-12 relative in x64 (float64 end to end in both); the KL baseline is exercised
with and without its clamp at 0.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import losses as L

FIXTURE = Path(__file__).resolve().parent / "reference" / "fixtures" / "trl_other.npz"
DATA = np.load(FIXTURE)
META = json.loads(str(DATA["meta_json"]))["cases"]["kto"]
INP = {k.split("/", 1)[1]: DATA[k] for k in DATA.files if k.startswith("kto_inputs/")}


def make(policy, name):
    shift = jnp.asarray(INP["completion_mask"][:, 1:])
    return L.UnpairedBatch(
        logps=policy,
        mask=shift,
        labels=jnp.asarray(INP["label"]),
        ref_logps=jnp.asarray(INP["ref_logps"]),
        kl_logps=jnp.asarray(INP["kl_policy_logps"]),
        ref_kl_logps=jnp.asarray(DATA[f"{name}/kl_ref_logps"]),
        kl_mask=jnp.asarray(INP["kl_completion_mask"][:, 1:]),
    )


@pytest.mark.parametrize("name", sorted(META))
def test_matches_trl(name, x64):
    cfg = META[name]
    fn = L.get(cfg["loss_type"])
    kwargs = {k: v for k, v in cfg.items() if k != "loss_type"}

    def total(p):
        out = fn(make(p, name), **kwargs)
        return out.loss, out

    policy = jnp.asarray(INP["policy_logps"], jnp.float64)
    (loss, out), grad = jax.value_and_grad(total, has_aux=True)(policy)
    np.testing.assert_allclose(loss, DATA[f"{name}/loss"], rtol=1e-12)
    np.testing.assert_allclose(grad, DATA[f"{name}/grad_policy_logps"], rtol=1e-12, atol=1e-15)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "kl",
    ):
        if f"{name}/{key}" in DATA.files:
            np.testing.assert_allclose(
                out.metrics[key], DATA[f"{name}/{key}"], rtol=1e-12, atol=1e-15, err_msg=key
            )


def test_kl_baseline_is_exact_under_pmap():
    n = jax.device_count()
    rng = np.random.default_rng(2)
    logps = jnp.asarray(-rng.gamma(2.0, 1.0, (n, 4)), jnp.float32)
    ref = logps + jnp.asarray(rng.normal(0, 0.5, (n, 4)), jnp.float32)
    kl = jnp.asarray(-rng.gamma(2.0, 1.0, (n, 3)), jnp.float32)
    kl_ref = kl - jnp.asarray(rng.uniform(0, 0.3, (n, 3)), jnp.float32)
    mask, kl_mask = jnp.ones((n, 4), jnp.int32), jnp.ones((n, 3), jnp.int32)
    labels = jnp.asarray(np.arange(n) % 2)
    full = L.kto(L.UnpairedBatch(logps, mask, labels, ref, kl, kl_ref, kl_mask))

    def one(*a):
        return L.kto(L.UnpairedBatch(*a), axis_name="d").losses

    split = [x.reshape(n, 1, *x.shape[1:]) for x in (logps, mask, labels, ref, kl, kl_ref, kl_mask)]
    got = jax.pmap(one, axis_name="d")(*split)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), full.losses, rtol=1e-6)


def test_bad_inputs():
    policy = jnp.asarray(INP["policy_logps"])
    batch = make(policy, "kto")
    with pytest.raises(ValueError, match="KTO `loss_type`"):
        L.kto(batch, loss_type="sigmoid")
    with pytest.raises(ValueError, match="kl_logps"):
        L.kto(L.UnpairedBatch(batch.logps, batch.mask, batch.labels, batch.ref_logps))
    with pytest.raises(ValueError, match="labels"):
        L.UnpairedBatch(batch.logps, batch.mask, batch.labels[:-1], batch.ref_logps)


BCO = np.load(FIXTURE.parent / "trl_bco.npz")
BCO_META = json.loads(str(BCO["meta_json"]))


def bco_step(step, dtype):
    x = {k: BCO[f"inputs/step{step}/{k}"] for k in ("labels", "mask", "policy", "ref", "prob")}
    batch = L.UnpairedBatch(
        jnp.asarray(x["policy"], dtype),
        jnp.asarray(x["mask"]),
        jnp.asarray(x["labels"]),
        jnp.asarray(x["ref"], dtype),
    )
    return batch, x


@pytest.mark.parametrize("name", sorted(BCO_META["cases"]))
def test_bco_matches_trl_over_steps(name, x64):
    """Three steps of TRL 0.28's BCOTrainer.bco_loss with its RunningMoments. Given TRL's delta,
    loss, rewards and gradients match to 1e-10 (float64 both sides). TRL keeps its running
    moments in float32, so our float32 moments (and the loss computed from them) match to 1e-6
    relative, float32 rounding of the statistics."""
    cfg = BCO_META["cases"][name]
    beta = cfg["beta"]
    state = L.init_reward_moments(jnp.float32)
    for step in range(BCO_META["steps"]):
        batch, x = bco_step(step, jnp.float64)
        key = f"{name}/step{step}"
        state = L.update_reward_moments(state, L.bco_rewards(batch, beta))
        np.testing.assert_allclose(np.asarray(state, np.float64), BCO[f"{key}/moments"], rtol=1e-6)
        weights = None
        if cfg["udm"]:
            weights = L.bco_udm_weights(
                jnp.asarray(x["prob"]),
                min_density_ratio=cfg["min_density_ratio"],
                max_density_ratio=cfg["max_density_ratio"],
            )

        def total(p, delta, batch=batch, weights=weights):
            b = L.UnpairedBatch(p, batch.mask, batch.labels, batch.ref_logps)
            out = L.bco(b, beta=beta, delta=delta, udm_weights=weights)
            return out.loss, out

        delta = jnp.asarray(BCO[f"{key}/delta"])
        (loss, out), grad = jax.value_and_grad(total, has_aux=True)(batch.logps, delta)
        np.testing.assert_allclose(loss, BCO[f"{key}/loss"], rtol=1e-10)
        np.testing.assert_allclose(grad, BCO[f"{key}/grad_policy_logps"], rtol=1e-10, atol=1e-14)
        desirable = x["labels"]
        chosen = np.asarray(out.chosen_rewards)[desirable]
        rejected = np.asarray(out.rejected_rewards)[~desirable]
        np.testing.assert_allclose(chosen, BCO[f"{key}/chosen_rewards"], rtol=1e-10)
        np.testing.assert_allclose(rejected, BCO[f"{key}/rejected_rewards"], rtol=1e-10)
        np.testing.assert_allclose(out.metrics["delta"], delta)
        # With our own running mean instead of TRL's:
        ours = total(batch.logps, state.mean.astype(jnp.float64))[0]
        np.testing.assert_allclose(ours, BCO[f"{key}/loss"], rtol=1e-6)
        if step == 0:  # no delta: this batch's mean reward, which is TRL's first-step delta
            default = L.bco(batch, beta=beta, udm_weights=weights).loss
            np.testing.assert_allclose(default, BCO[f"{key}/loss"], rtol=1e-6)


def test_bco_delta_and_moments_are_exact_under_pmap():
    n = jax.device_count()
    rng = np.random.default_rng(4)
    logps = jnp.asarray(-rng.gamma(2.0, 1.0, (2 * n, 4)), jnp.float32)
    ref = logps + jnp.asarray(rng.normal(0, 0.5, (2 * n, 4)), jnp.float32)
    mask = jnp.ones((2 * n, 4), jnp.int32)
    labels = jnp.asarray(np.arange(2 * n) % 3 == 0)
    full_batch = L.UnpairedBatch(logps, mask, labels, ref)
    full = L.bco(full_batch)
    state0 = L.init_reward_moments()
    full_state = L.update_reward_moments(state0, L.bco_rewards(full_batch))

    def one(*a):
        b = L.UnpairedBatch(*a)
        state = L.update_reward_moments(state0, L.bco_rewards(b), axis_name="d")
        return L.bco(b, axis_name="d").losses, state

    split = [x.reshape(n, 2, *x.shape[1:]) for x in (logps, mask, labels, ref)]
    got, state = jax.pmap(one, axis_name="d")(*split)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), full.losses, rtol=1e-6)
    for field, want in zip(state, full_state):
        np.testing.assert_allclose(np.asarray(field), np.full(n, want), rtol=1e-6)


def test_bco_moments_ignore_empty_batches_and_bad_inputs():
    state = L.init_reward_moments()
    same = L.update_reward_moments(state, jnp.ones(3), mask=jnp.zeros(3))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(state))
    with pytest.raises(ValueError, match="rewards"):
        L.update_reward_moments(state, jnp.ones((2, 3)))
    batch, _ = bco_step(0, jnp.float32)
    with pytest.raises(ValueError, match="udm_weights"):
        L.bco(batch, udm_weights=jnp.ones(3))
    with pytest.raises(ValueError, match="delta"):
        L.bco(batch, delta=jnp.ones(2))
    with pytest.raises(ValueError, match="beta"):
        L.bco(batch, beta=-1.0)
