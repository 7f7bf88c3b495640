"""Properties every registered loss must have, checked by iterating `losses.available()`, so a
newly registered loss is covered automatically:

* gradients: `jax.test_util.check_grads` (reverse mode, finite differences) in x64 w.r.t. the
  per-token policy log-probs;
* one compilation per input shape under jit;
* finite values and gradients at +-1e4 log-ratios, with a zero-length completion in the batch,
  for beta from 1e-4 to 50;
* a ValueError for beta <= 0 (< 0 for GRPO's, REINFORCE's and Nash-MD's KL weight; and
  label_smoothing outside [0, 0.5) where it applies);
* under pmap over 8 devices with `axis_name` (where the loss takes it), per-example losses and
  the (sum, count) terms summed over devices equal the single-device result on the full batch.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from alignjax import losses as L

UNPAIRED = {"kto", "apo_zero_unpaired", "bco"}
UNLEARN = {n for n in L.available() if "unlearn" in L.needs_of(n).tasks}
ONLINE = {n for n in L.available() if "online" in L.needs_of(n).tasks}
ON_POLICY_ONLY = {"online_dpo", "reinforce_kl"}  # they read no sampler log-probs
REWARD = {n for n in L.available() if "reward" in L.needs_of(n).tasks}
NAMES = L.available()
N, T = 8, 5  # N pairs (one per device under pmap), T tokens


def accepts(fn, key):
    return key in inspect.signature(fn).parameters


def inputs(rng, scale=1.0, dtype=jnp.float64):
    """Stacked [chosen; rejected] per-token arrays; row N + 2 is a zero-length completion."""
    m = (rng.random((2 * N, T)) > 0.25).astype(np.int32)
    m[:, 0] = 1
    m[N + 2] = 0
    pol = -rng.gamma(2.0, 1.0, (2 * N, T))
    ref = pol + rng.normal(0.0, 0.5, (2 * N, T))
    if scale != 1.0:  # valid log-probs (<= 0) with per-token log-ratios of -1e4 / +1e4
        chosen = np.arange(2 * N)[:, None] < N
        pol = np.where(chosen, -scale, -1e-3) * np.ones((2 * N, T))
        ref = np.where(chosen, 0.0, -scale) * np.ones((2 * N, T))
    a = dict(
        pol=pol,
        ref=ref,
        m=m,
        kl=rng.gamma(1.0, 0.3, (2 * N, T)),
        reward_mask=np.maximum(rng.normal(0.5, 0.5, (2 * N, T)), 0.0),
        kl_mask=np.maximum(rng.normal(0.5, 0.5, (2 * N, T)), 0.0),
        log_sum_sq=-rng.gamma(2.0, 0.5, (2 * N, T)),
        chosen_win_prob=rng.uniform(0.3, 1.0, N),
        rejected_win_prob=rng.uniform(0.0, 0.6, N),
        win_prob=rng.uniform(0.4, 1.0, N),
        labels=(np.arange(2 * N) % 3 == 0),
        kl_pol=-rng.gamma(2.0, 1.0, (2 * N, T)),
    )
    a["kl_ref"] = a["kl_pol"] - rng.uniform(0.0, 0.4, (2 * N, T))
    # online losses: 2N sampled completions ([first; second] halves for online DPO), a stale
    # sampler close enough for the clipped ratios to stay off their kinks
    a["old"] = pol + rng.normal(0.0, 0.02, (2 * N, T))
    a["adv"] = rng.normal(0.0, 1.0, 2 * N)
    a["rewards"] = rng.normal(0.0, 1.0, 2 * N)
    a["eos"] = rng.random(2 * N) > 0.3
    # Nash-MD: each row's opponent (a mixture sample) score and EOS flag
    a["opp_rewards"] = rng.normal(0.0, 1.0, 2 * N)
    a["opp_eos"] = rng.random(2 * N) > 0.3
    return {k: jnp.asarray(v, dtype if v.dtype.kind == "f" else None) for k, v in a.items()}


def build(name, a, pol):
    """The batch `name` consumes, with `pol` ([2N, T]) as the policy log-probs."""
    if name in UNPAIRED:
        return L.UnpairedBatch(pol, a["m"], a["labels"], a["ref"], a["kl_pol"], a["kl_ref"], a["m"])
    if name in ONLINE:
        old = None if name in ON_POLICY_ONLY else a["old"]
        return L.ScoredRolloutBatch(pol, a["m"], a["adv"], old, a["ref"], rewards=a["rewards"],
                                    contains_eos=a["eos"], opponent_rewards=a["opp_rewards"],
                                    opponent_contains_eos=a["opp_eos"])  # fmt: skip
    if name in REWARD:  # a reward model's scores: here the masked sequence sums, with margins
        n, scores = pol.shape[0] // 2, jnp.sum(pol * a["m"], axis=-1)
        return L.RewardBatch(scores[:n], scores[n:], a["rewards"][:n])
    if name in UNLEARN:  # forget = the first half of the rows, retain = the rest (one empty)
        m, ref, n = a["m"], a["ref"], pol.shape[0] // 2
        return L.UnlearnBatch(pol[:n], m[:n], pol[n:], m[n:], ref[:n], ref[n:], a["kl"][n:])
    fields = {k: a[k] for k in ("kl", "reward_mask", "kl_mask", "log_sum_sq")}
    fields.update({k: a[k] for k in ("chosen_win_prob", "rejected_win_prob", "win_prob")})
    return L.PreferenceBatch.from_stacked(pol, a["m"], a["ref"], **fields)


def kwargs_for(name, **extra):
    fn = L.get(name)
    kw = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    if name == "reinforce_kl":  # a leave-one-out baseline couples rows the pmap split separates
        kw["baseline"] = None
    kw.update({k: v for k, v in extra.items() if accepts(fn, k)})
    return kw


def loss_of(name, a, **extra):
    fn, kw = L.get(name), kwargs_for(name, **extra)
    return lambda pol: fn(build(name, a, pol), **kw)


def test_registry_lists_every_family():
    expected = {"sigmoid", "ipo", "aot", "sft", "cpo", "simpo", "orpo", "kto", "bco", "sppo"}
    expected |= {"tdpo1", "tdpo2", "sparsepo", "mapo", "token_constrained_sft"}
    assert expected <= set(NAMES)
    with pytest.raises(ValueError, match=r"unknown loss 'dpo_v3'; available: \["):
        L.get("dpo_v3")


@pytest.mark.parametrize("name", NAMES)
def test_check_grads_x64(name, x64):
    a = inputs(np.random.default_rng(1))
    # BCO's default delta is this batch's (detached) mean reward, which finite differences would
    # move; a fixed delta, as in training, makes the loss a function of the log-probs alone.
    # REINFORCE's KL-shaped reward and Nash-MD's per-token KL weight are stop-gradient functions
    # of the log-probs (score-function estimators), which finite differences would
    # differentiate: checked without the KL.
    no_kl = name in ("reinforce_kl", "nash_md")
    f = loss_of(name, a, delta=0.02, **({"beta": 0.0} if no_kl else {}))
    check_grads(lambda p: f(p).loss, (a["pol"],), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_compiles_once_per_shape(name):
    # Counted traces, not `_cache_size()`: jit's C++ dispatch cache may decline to hold an
    # executable (it did for the two AOT losses on a CI machine) without recompiling; a new
    # trace is what a new shape or a non-static Python value would cost.
    traces = []

    def loss(a, p):
        traces.append(name)
        return loss_of(name, a)(p).loss

    step = jax.jit(loss)
    for seed in range(3):
        a = inputs(np.random.default_rng(seed), dtype=jnp.float32)
        assert np.isfinite(float(step(a, a["pol"])))
    assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_extremes_stay_finite(name):
    a = inputs(np.random.default_rng(3), scale=1e4, dtype=jnp.float32)
    for beta in (1e-4, 0.1, 50.0):
        f = loss_of(name, a, beta=beta)
        value, grad = jax.value_and_grad(lambda p, f=f: f(p).loss)(a["pol"])
        assert np.isfinite(float(value)), (name, beta)
        assert np.all(np.isfinite(np.asarray(grad))), (name, beta)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters(name):
    a = inputs(np.random.default_rng(4), dtype=jnp.float32)
    fn = L.get(name)
    if accepts(fn, "beta"):
        # GRPO's, REINFORCE's and Nash-MD's beta is a KL weight: 0 turns the penalty off
        for beta in (-0.1,) if name in ("grpo", "reinforce_kl", "nash_md") else (0.0, -0.1):
            with pytest.raises(ValueError, match="beta"):
                loss_of(name, a, beta=beta)(a["pol"])
    if accepts(fn, "label_smoothing") and name != "exo_pair":
        for eps in (-0.1, 0.5):
            with pytest.raises(ValueError, match="label_smoothing"):
                loss_of(name, a, label_smoothing=eps)(a["pol"])


@pytest.mark.parametrize("name", NAMES)
def test_pmap_equals_full_batch(name):
    assert jax.device_count() == N
    a = inputs(np.random.default_rng(5), dtype=jnp.float32)
    full = loss_of(name, a)(a["pol"])
    use_axis = accepts(L.get(name), "axis_name")

    def per_device(shard):
        local = {
            k: (v.reshape(2, *v.shape[2:]) if v.ndim >= 2 and v.shape[:2] == (1, 2) else v)
            for k, v in shard.items()
        }
        extra = {"axis_name": "d"} if use_axis else {}
        out = loss_of(name, local, **extra)(local["pol"])
        totals = {k: lax.psum(t.total, "d") for k, t in out.terms.items()}
        counts = {k: lax.psum(t.count, "d") for k, t in out.terms.items()}
        return out.losses, totals, counts

    shards = {
        k: (
            jnp.stack([v[:N], v[N:]], axis=1)[:, None]
            if v.shape[0] == 2 * N
            else v.reshape(N, 1, *v.shape[1:])
        )
        for k, v in a.items()
    }
    losses, totals, counts = jax.pmap(per_device, axis_name="d")(shards)
    for k, term in full.terms.items():
        np.testing.assert_allclose(np.asarray(totals[k])[0], term.total, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(counts[k])[0], term.count)
    got_loss = sum(
        t.weight * np.asarray(totals[k])[0] / np.asarray(counts[k])[0]
        for k, t in full.terms.items()
    )
    np.testing.assert_allclose(got_loss, full.loss, rtol=2e-5)
    if any(float(t.count) != full.losses.shape[0] for t in full.terms.values()):
        return  # a token-mean term (sft / NLL): per-example losses hold the local batch mean
    losses = np.asarray(losses)  # [N devices, rows per device]
    if name in UNPAIRED or (name in ONLINE and losses.shape[1] == 2):  # one loss per row
        got = np.concatenate([losses[:, 0], losses[:, 1]])  # rows: [chosen rows; rejected rows]
    else:
        got = losses.reshape(-1)
    np.testing.assert_allclose(got, full.losses, rtol=2e-5, atol=1e-6)


def test_trl_keyword_spellings(rng):
    """`f_divergence_type` / `f_alpha_divergence_coef` (DPOConfig's names) are aliases of
    `f_divergence` / `f_alpha`: the same loss bit for bit; both spellings at once are an error;
    combinations route them like the originals."""
    a = inputs(rng)
    batch = L.PreferenceBatch.from_stacked(a["pol"], a["m"], a["ref"])
    fn = L.get("sigmoid")
    ours = fn(batch, f_divergence="alpha_divergence", f_alpha=0.3)
    trl = fn(batch, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    np.testing.assert_array_equal(ours.losses, trl.losses)
    assert float(ours.loss) != float(fn(batch).loss)
    with pytest.raises(TypeError, match="not both"):
        fn(batch, f_divergence="js_divergence", f_divergence_type="js_divergence")
    mixed = L.combine([("sigmoid", 1.0), ("sft", 0.5)], f_divergence_type="forward_kl")
    want = L.combine([("sigmoid", 1.0), ("sft", 0.5)], f_divergence="forward_kl")
    np.testing.assert_array_equal(mixed(batch).losses, want(batch).losses)
    # registering an already aliased function again keeps one alias each
    L.register("test_sigmoid_again", fn, overwrite=True)
    assert list(inspect.signature(L.get("test_sigmoid_again")).parameters).count(
        "f_divergence_type") == 1  # fmt: skip
