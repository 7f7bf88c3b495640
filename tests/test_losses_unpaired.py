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
