"""alignjax.train.dynamics: the DPO-dynamics diagnostics (specs/online.md section 7).

1. A toy policy (specs 7.2): softmax over the logits z = E theta of 16 single-token responses,
   so a response's sequence log-prob is log pi(y); reference = the initial policy; DPO on one
   pair with pi(y_l) < pi(y_w), plain gradient descent in float64. Eight problems: four tables
   (E = I) and four with shared parameters (y_w and y_l have similar embeddings). Checked
   against float64 NumPy derivations:
   - the exact DPO gradient on the logits is the spec's probability-space gradient
     dL/dpi(y_w) = -beta (1 - s(u)) / pi(y_w), dL/dpi(y_l) = +beta (1 - s(u)) / pi(y_l) pulled
     back through the softmax Jacobian (1e-12);
   - the log-prob rates of gradient flow, c <f_y - f_bar, f_w - f_l> with c = beta (1 - s(u)),
     against JAX's directional derivative (1e-12); from them: d logp_l/dt < d logp_w/dt always,
     d logp_w/dt = c (1 - pi_w + pi_l) > 0 for a table (no displacement), and d logp_w/dt < 0
     reached with shared parameters (displacement). The discrete steps obey the same orderings
     exactly (see the comments), and so does the dispersion: the mass outside {y_w, y_l} grows
     with shared parameters and shrinks for a table with pi_w > pi_l
     (dM/dt = -c (pi_w - pi_l) M there);
   - every diagnostic of the recorder against a NumPy recomputation from the saved log-probs
     (1e-12: float64 sums of 8 values, and log(pi_w / pi_l) taken through probabilities).
2. The recorder on hand-made arrays: baseline at step 0, exact deltas, displacement, the
   per-token ratio, the delta_ratio guard, token-count matching, the saved baseline.
3. Through the trainer (tiny preset): the probe step against a dense float64 computation
   (float32 kernel: 1e-5 relative, 1e-4 absolute); bad `data.probe` configs name the key; one
   device, a data x fsdp mesh and pmap agree (float32 summation order); a paired run with a
   probe logs every `eval/dynamics/*` name, all deltas exactly 0 at step 0, and a run stopped
   at step 4 and resumed logs bitwise the uninterrupted run's numbers (also when the baseline
   file is gone and is recomputed from the initial state).
"""

import doctest
import functools
import shutil

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import data
from alignjax.train import config as C
from alignjax.train import dynamics as DY
from alignjax.train import metrics, trainer

datasets.disable_progress_bars()

V, BETA, LR, STEPS = 16, 1.0, 1.0, 300


# ------------------------------------------------------------------------------ the toy model


def toy_problems():
    """(E [K, V, V], theta0 [K, V], w [K], l [K]): 4 tables, then 4 shared-parameter problems
    (3 features, zero-padded to V columns: padded parameters get no gradient)."""
    rng = np.random.default_rng(3)
    es, thetas, ws, ls = [], [], [], []
    for _ in range(4):  # a table: z = theta
        theta = rng.normal(size=V)
        order = np.argsort(-theta)
        es.append(np.eye(V))
        thetas.append(theta)
        ws.append(order[1])  # pi(y_l) < pi(y_w), neither the mode
        ls.append(order[6])
    for _ in range(4):
        # f_l = f_w + (0, 0.5, 0): theta_2 < 0 makes pi_l < pi_w; the other responses load
        # negatively on feature 2, so pushing y_l down (theta_2 falls) raises them and the
        # normaliser with them, and y_w (feature 2 = 0) loses probability. Feature 1 gives the
        # pair about half the mass at the start.
        f = np.zeros((V, V))
        f[:, :3] = rng.normal(size=(V, 3)) * 0.3 + [0.0, -1.0, 0.0]
        w, l = 0, 1
        f[w, :3] = [2.0 + 0.3 * rng.normal(), 0.0, 0.3 * rng.normal()]
        f[l, :3] = f[w, :3] + [0.0, 0.5, 0.0]
        theta = np.zeros(V)
        theta[:3] = [1.5, -1.0, rng.normal()]
        es.append(f)
        thetas.append(theta)
        ws.append(w)
        ls.append(l)
    return np.stack(es), np.stack(thetas), np.array(ws), np.array(ls)


def dpo_loss(z, ref_logp, w, l):
    """TRL's sigmoid DPO loss of one pair on the logits z of single-token responses."""
    logp = jax.nn.log_softmax(z)
    u = BETA * ((logp[w] - ref_logp[w]) - (logp[l] - ref_logp[l]))
    return -jax.nn.log_sigmoid(u)


def toy_logps(e, theta):
    return jax.nn.log_softmax(e @ theta)


def theta_grad(e, theta, ref_logp, w, l):
    return jax.grad(lambda th: dpo_loss(e @ th, ref_logp, w, l))(theta)


def train_toy(es, theta0, ws, ls):
    """Gradient descent on theta; the log-softmax of every saved step `[STEPS + 1, K, V]` and
    the thetas."""

    def one(e, theta, w, l):
        ref = jax.nn.log_softmax(e @ theta)

        def step(th, _):
            g = jax.grad(lambda t: dpo_loss(e @ t, ref, w, l))(th)
            th = th - LR * g
            return th, (th, jax.nn.log_softmax(e @ th))

        _, (ths, logps) = jax.lax.scan(step, theta, None, length=STEPS)
        return jnp.concatenate([theta[None], ths]), jnp.concatenate([ref[None], logps])

    thetas, logps = jax.jit(jax.vmap(one))(es, theta0, ws, ls)
    return np.asarray(thetas).swapaxes(0, 1), np.asarray(logps).swapaxes(0, 1)


@pytest.fixture(scope="module")
def toy():
    with jax.enable_x64(True):
        es, theta0, ws, ls = toy_problems()
        thetas, logps = train_toy(*map(jnp.asarray, (es, theta0, ws, ls)))
    assert logps.dtype == np.float64
    return es, thetas, logps, ws, ls


def numpy_spec_gradient(logp, ref, w, l):
    """dL/dz from the spec's dL/dpi (specs/online.md 7.2) and the softmax Jacobian."""
    pi = np.exp(logp)
    u = BETA * ((logp[w] - ref[w]) - (logp[l] - ref[l]))
    c = BETA * (1 - 1 / (1 + np.exp(-u)))
    d_pi = np.zeros(V)
    d_pi[w], d_pi[l] = -c / pi[w], c / pi[l]
    jac = np.diag(pi) - np.outer(pi, pi)  # d pi_j / d z_k
    return jac.T @ d_pi, c


def test_toy_gradient_is_the_spec_formula(toy, x64):
    es, thetas, logps, ws, ls = toy
    for k in range(len(ws)):
        for t in (0, 100, STEPS):
            z = es[k] @ thetas[t, k]
            want, _ = numpy_spec_gradient(logps[t, k], logps[0, k], ws[k], ls[k])
            got = jax.grad(dpo_loss)(jnp.asarray(z), jnp.asarray(logps[0, k]), ws[k], ls[k])
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
            # Only the pair's logits move, by -+ c: the normaliser cancels in logp_w - logp_l.
            assert np.count_nonzero(np.abs(want) > 1e-15) == 2


def test_toy_log_prob_rates_displacement_and_dispersion(toy, x64):
    es, thetas, logps, ws, ls = toy
    tables = range(4)  # then 4 shared-parameter problems
    for k in range(8):
        e, w, l = es[k], ws[k], ls[k]
        for t in (0, 150, STEPS):
            pi = np.exp(logps[t, k])
            _, c = numpy_spec_gradient(logps[t, k], logps[0, k], w, l)
            # Gradient flow d theta/dt = -dL/dtheta = c (f_w - f_l), so dz_y/dt = c <f_y, f_w - f_l>
            # and d logp_y/dt = c <f_y - f_bar, f_w - f_l>, f_bar = sum_y pi_y f_y.
            d = e[w] - e[l]
            rates = c * ((e - pi @ e) @ d)
            grad = theta_grad(e, thetas[t, k], logps[0, k], w, l)
            _, jvp = jax.jvp(functools.partial(toy_logps, e), (thetas[t, k],), (-grad,))
            np.testing.assert_allclose(np.asarray(jvp), rates, rtol=1e-12, atol=1e-14)
            # d logp_w/dt - d logp_l/dt = c |f_w - f_l|^2 > 0.
            assert rates[l] < rates[w]
            np.testing.assert_allclose(rates[w] - rates[l], c * d @ d, rtol=1e-12)
            if k in tables:  # d logp_w/dt = c (1 - pi_w + pi_l) > 0: no displacement
                np.testing.assert_allclose(rates[w], c * (1 - pi[w] + pi[l]), rtol=1e-12)
                assert rates[w] > 0
            else:  # the 3D-properties regime, reached: d logp_l/dt < d logp_w/dt < 0
                assert rates[l] < rates[w] < 0
            assert pi[l] < pi[w]
        # The discrete steps: logp_w - logp_l = z_w - z_l is linear in theta, so it rises by
        # exactly LR c |f_w - f_l|^2 per step. A table: logp_w rises (Jensen: the normaliser
        # rises by less than the step of z_w), the outside mass falls while pi_w > pi_l; shared:
        # logp_w falls (the normaliser rises by at least c <f_bar, f_w - f_l> > 0) and the mass
        # outside the pair grows.
        lw, ll = logps[:, k, w], logps[:, k, l]
        outside = 1 - np.exp(lw) - np.exp(ll)
        assert np.all(np.diff(ll) < np.diff(lw))
        if k in tables:
            assert np.all(np.diff(lw) > 0) and np.all(np.diff(outside) < 0)
        else:
            assert np.all(np.diff(lw) < 0) and np.all(np.diff(outside) > 0)
            assert outside[-1] > outside[0] + 0.2  # dispersion, not a rounding effect
            assert np.all(np.diff(ll) < np.diff(lw)) and np.all(np.diff(ll) < 0)


def test_toy_diagnostics_against_numpy(toy, x64):
    es, thetas, logps, ws, ls = toy
    k_idx = np.arange(len(ws))
    rng = np.random.default_rng(5)
    # The probe: 3 fixed reference samples per problem, drawn from pi_ref outside the pair.
    probe = []
    for k in k_idx:
        p = np.exp(logps[0, k])
        p[[ws[k], ls[k]]] = 0
        probe.append(rng.choice(V, size=3, replace=False, p=p / p.sum()))
    probe = np.stack(probe)

    def values(t):
        lp = logps[t]
        entropy = -np.sum(np.exp(lp) * lp, axis=-1)  # one position per response
        return {
            "chosen_logps": lp[k_idx, ws], "rejected_logps": lp[k_idx, ls],
            "chosen_tokens": np.ones(8), "rejected_tokens": np.ones(8),
            "probe_logps": lp[k_idx[:, None], probe].reshape(-1),
            "probe_entropy": np.repeat(entropy, 3), "probe_tokens": np.ones(24),
        }  # fmt: skip

    rec = DY.DynamicsRecorder()
    p0 = np.exp(logps[0])
    for t in range(0, STEPS + 1, 25):
        got = rec.record(t, values(t))
        pt = np.exp(logps[t])
        pw, pl = pt[k_idx, ws], pt[k_idx, ls]
        dc = np.mean(np.log(pw / p0[k_idx, ws]))
        dr = np.mean(np.log(pl / p0[k_idx, ls]))
        u = BETA * (np.log(pw / p0[k_idx, ws]) - np.log(pl / p0[k_idx, ls]))
        c = BETA * (1 - 1 / (1 + np.exp(-u)))
        grad_w, grad_l = -c / pw, c / pl  # dL/dpi (specs/online.md 7.2)
        want = {
            "dynamics/delta_logps/chosen": dc,
            "dynamics/delta_logps/rejected": dr,
            "dynamics/displacement": sum(pw[k] < p0[k, ws[k]] for k in k_idx) / 8,
            "dynamics/log_grad_ratio": np.mean(np.log(np.abs(grad_l) / np.abs(grad_w))),
            "dynamics/log_grad_ratio/per_token": np.mean(np.log(np.abs(grad_l / grad_w))),
            "dynamics/probe/logps": np.mean(np.log(pt[k_idx[:, None], probe])),
            "dynamics/probe/delta_logps": np.mean(
                np.log(pt[k_idx[:, None], probe] / p0[k_idx[:, None], probe])
            ),
            "dynamics/probe/entropy": np.mean(-np.sum(pt * np.log(pt), axis=-1)),
        }
        if abs(dc) >= DY.RATIO_FLOOR:
            want["dynamics/delta_ratio"] = dr / dc
        assert set(got) == set(want), t
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)
        if t == 0:
            assert all(got[n] == 0.0 for n in got if "delta" in n or n.endswith("displacement"))
    # The end of training: the four shared-parameter problems are displaced, the tables not;
    # the rejected log-prob fell further than the chosen one (the "drastic drop").
    assert got["dynamics/displacement"] == 0.5
    assert got["dynamics/delta_logps/rejected"] < got["dynamics/delta_logps/chosen"]
    assert got["dynamics/log_grad_ratio"] > 0  # pi_l < pi_w: the rejected gets the larger push


# ------------------------------------------------------------------------------ the recorder


def hand_values(chosen, rejected, ct=(2.0, 4.0, 1.0), rt=(1.0, 2.0, 2.0)):
    return {"chosen_logps": np.array(chosen, np.float32),
            "rejected_logps": np.array(rejected, np.float32),
            "chosen_tokens": np.array(ct, np.float32),
            "rejected_tokens": np.array(rt, np.float32)}  # fmt: skip


def test_recorder_on_hand_made_values(tmp_path):
    rec = DY.DynamicsRecorder(tmp_path / DY.BASELINE_FILE)
    v0 = hand_values([-4.0, -8.0, -2.0], [-3.0, -6.0, -4.0])
    with pytest.raises(ValueError, match="no step-0 baseline"):
        rec.record(5, v0)
    first = rec.record(0, v0, save=True)
    assert first == {
        "dynamics/delta_logps/chosen": 0.0,
        "dynamics/delta_logps/rejected": 0.0,
        "dynamics/displacement": 0.0,
        "dynamics/log_grad_ratio": (-1.0 - 2.0 + 2.0) / 3,
        "dynamics/log_grad_ratio/per_token": ((-2.0 + 3.0) + (-2.0 + 3.0) + (-2.0 + 2.0)) / 3,
    }  # no delta_ratio at step 0 (0 / 0)
    v1 = hand_values([-4.5, -7.0, -2.0], [-5.0, -7.0, -4.0])
    got = rec.record(10, v1)
    assert got["dynamics/delta_logps/chosen"] == 0.5 / 3  # (-0.5 + 1 + 0) / 3
    assert got["dynamics/delta_logps/rejected"] == -1.0  # (-2 - 1 + 0) / 3
    assert got["dynamics/displacement"] == 1 / 3  # only the first chosen fell
    assert got["dynamics/delta_ratio"] == -1.0 / (0.5 / 3)
    assert got["dynamics/log_grad_ratio"] == (0.5 + 0.0 + 2.0) / 3
    # Below the floor the ratio is left out, not logged as a huge or infinite number.
    tiny = hand_values([-4.0, -8.0, -2.0 + 2e-3], [-5.0, -7.0, -4.0])
    assert "dynamics/delta_ratio" not in rec.record(11, tiny)
    # A fresh recorder (a resumed run) reads the baseline back, bitwise.
    again = DY.DynamicsRecorder(tmp_path / DY.BASELINE_FILE)
    assert again.ready(v1) and again.record(10, v1) == got
    for k, v in DY.load_baseline(tmp_path / DY.BASELINE_FILE).items():
        assert v.dtype == np.float32 and np.array_equal(v, v0[k])
    # Other held-out examples (token counts or sizes differ; a probe added) do not match.
    assert not again.ready(hand_values([-4.5, -7.0, -2.0], [-5.0, -7.0, -4.0], ct=(2, 4, 2)))
    assert not again.ready(hand_values([-1.0, -2.0], [-1.0, -2.0], (1, 1), (1, 1)))
    assert not again.ready({**v1, "probe_logps": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        DY.pair_dynamics(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        DY.probe_dynamics(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    assert doctest.testmod(DY).failed == 0


def test_held_out_values_drop_padding():
    examples = {"chosen_logps": np.array([-1.0, -2.0, 0.0]),
                "rejected_logps": np.array([-3.0, -4.0, 0.0]),
                "chosen_tokens": np.array([1.0, 2.0, 0.0]),
                "rejected_tokens": np.array([3.0, 4.0, 0.0]), "valid": np.array([1, 1, 0]),
                "losses": np.zeros(3)}  # fmt: skip
    probe = {"logps": np.array([-5.0, 0.0]), "entropy": np.array([2.0, 0.0]),
             "tokens": np.array([4.0, 0.0]), "valid": np.array([1, 0])}  # fmt: skip
    got = DY.held_out_values(examples, probe)
    assert sorted(got) == sorted(DY.PAIR_KEYS + DY.PROBE_KEYS)
    assert got["rejected_tokens"].tolist() == [3.0, 4.0] and got["probe_logps"].tolist() == [-5.0]
    probe_metrics = DY.probe_dynamics(got["probe_logps"], [-6.0], got["probe_entropy"], [4.0])
    assert probe_metrics == {"dynamics/probe/logps": -5.0, "dynamics/probe/delta_logps": 1.0,
                             "dynamics/probe/entropy": 0.5}  # fmt: skip


# ------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small JSONL files: 16 training pairs, 6 held-out pairs, 5 probe rows (prompt +
    completion rows from pairs in neither set)."""
    out = tmp_path_factory.mktemp("dyn_data")
    rows = data.shipped_dataset("train").select(range(40)).to_list()
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    datasets.Dataset.from_list(pairs[:16]).to_json(str(out / "train.jsonl"))
    datasets.Dataset.from_list(pairs[16:22]).to_json(str(out / "eval.jsonl"))
    probe = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[30:35]]
    datasets.Dataset.from_list(probe).to_json(str(out / "probe.jsonl"))
    (out / "empty.jsonl").write_text("")
    return out


def run_overrides(files, out_dir, steps):
    return [
        f"out_dir={out_dir}", f"steps={steps}", f"data.train={files / 'train.jsonl'}",
        f"data.eval={files / 'eval.jsonl'}", f"data.probe={files / 'probe.jsonl'}",
        "data.batch_size=4", "data.eval_batch_size=4", "data.max_length=48",
        "data.buckets=[48]", "model.preset=tiny", "log_every=2", "eval_every=2",
        "eval_samples=0", "plot=false", "checkpoint.export_hf=false", "checkpoint.every=2",
        "checkpoint.asynchronous=false", "mesh.devices=1", "optim.schedule=constant",
        "optim.warmup_steps=0", "optim.learning_rate=5e-3",
    ]  # fmt: skip


@pytest.mark.slow  # a float64 model forward (suite budget)
def test_probe_step_against_dense_float64(files, tmp_path):
    cfg = C.load_config(None, run_overrides(files, tmp_path / "p", 2))
    session = trainer.setup(cfg)
    assert len(session.probe_data) == 5 and session.dynamics is not None
    examples, probe = session.eval_examples()
    assert probe["valid"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # two batches of 4, padded
    model = session.policy()
    want_lp, want_h, want_n = [], [], []
    for _, batch in session.eval_loader(session.probe_data).epoch(0):
        out = model(**jax.tree.map(jnp.asarray, batch).model_inputs())
        logits = np.asarray(out.last_hidden_state, np.float64) @ np.asarray(
            model.unembed(), np.float64
        )
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                      keepdims=True)) - logits.max(-1, keepdims=True)  # fmt: skip
        mask = np.asarray(batch.loss_mask, np.float64)
        token = np.take_along_axis(logp, np.asarray(batch.labels)[..., None], -1)[..., 0]
        want_lp.append(np.sum(token * mask, -1))
        want_h.append(np.sum(-np.sum(np.exp(logp) * logp, -1) * mask, -1))
        want_n.append(mask.sum(-1))
    # float32 kernel vs float64 dense: per-token errors ~1e-6 of values ~7, over ~15 tokens.
    np.testing.assert_allclose(probe["logps"], np.concatenate(want_lp), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(probe["entropy"], np.concatenate(want_h), rtol=1e-5, atol=1e-4)
    assert np.array_equal(probe["tokens"], np.concatenate(want_n))
    assert np.all(probe["tokens"][:5] > 0) and np.all(probe["entropy"][:5] > 0)
    # The pairs' per-token counts come with the evaluation: chosen and rejected both.
    w = examples["valid"] != 0
    assert w.sum() == 6 and np.all(examples["rejected_tokens"][w] > 0)


def test_bad_probe_configs_name_the_key(files, tmp_path):
    probe = f"data.probe={files / 'probe.jsonl'}"
    with pytest.raises(ValueError, match="`data.probe`.*task=paired"):
        C.load_config(None, ["task=sft", "data.train=shipped:sft", probe])
    with pytest.raises(ValueError, match="`data.probe`.*eval_every"):
        C.load_config(None, [probe, "eval_every=0"])
    tok = data.shipped_tokenizer()
    with pytest.raises(FileNotFoundError, match="`data.probe`.*does not exist"):
        DY.load_probe(C.load_config(None, [f"data.probe={tmp_path / 'nope.jsonl'}"]), tok)
    with pytest.raises(ValueError, match="`data.probe`.*empty"):
        DY.load_probe(C.load_config(None, [f"data.probe={files / 'empty.jsonl'}"]), tok)
    with pytest.raises(ValueError, match="`data.probe`.*paired rows"):
        DY.load_probe(C.load_config(None, [f"data.probe={files / 'eval.jsonl'}"]), tok)
    no_eval = run_overrides(files, tmp_path / "r", 2) + ["data.eval=null"]
    with pytest.raises(ValueError, match="`data.probe`.*no eval split"):
        trainer.train(C.load_config(None, no_eval), progress=False)


@pytest.mark.slow  # three setups and compilations (~15 s without the compilation cache)
def test_dynamics_agree_across_placements(files, tmp_path):
    """One device, a data x fsdp mesh and pmap: the same diagnostics after one update, to
    float32 summation order (sequence log-probs ~ -130: 1e-4 absolute)."""
    got = {}
    for name, mesh in [("one", ["mesh.devices=1"]), ("fsdp", ["mesh.devices=4", "mesh.fsdp=2"]),
                       ("pmap", ["mesh.devices=2", "mesh.pmap=true"])]:  # fmt: skip
        overrides = run_overrides(files, tmp_path / name, 2) + mesh + ["optim.learning_rate=2e-2"]
        session = trainer.setup(C.load_config(None, overrides))
        first = session.evaluate()
        assert first["dynamics/delta_logps/chosen"] == 0.0
        _, batch = next(trainer.train_loader(session).epoch(0))
        state, _ = session.step_fn(session.state, session.to_device(batch))
        got[name] = session.evaluate(session.placement.with_position(state, 0, 1))
    names = sorted(k for k in got["one"] if k.startswith("dynamics/"))
    assert len(names) == 9 and got["one"]["dynamics/delta_logps/rejected"] != 0.0
    for name in ("fsdp", "pmap"):
        assert sorted(k for k in got[name] if k.startswith("dynamics/")) == names
        for k in names:
            np.testing.assert_allclose(got[name][k], got["one"][k], rtol=1e-5, atol=1e-4,
                                       err_msg=f"{name} {k}")  # fmt: skip


NAMES = ["delta_logps/chosen", "delta_logps/rejected", "displacement", "log_grad_ratio",
         "log_grad_ratio/per_token", "probe/logps", "probe/delta_logps",
         "probe/entropy"]  # fmt: skip


def dynamics_rows(out_dir):
    rows = [r for r in metrics.read_jsonl(out_dir / "metrics.jsonl") if "eval/loss" in r]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/dynamics/")} for r in rows}


@pytest.mark.slow  # three tiny runs through the trainer (~30 s on 2 CPU cores)
def test_trainer_logs_dynamics_and_resumes_them_bitwise(files, tmp_path):
    straight = tmp_path / "straight"
    trainer.train(C.load_config(None, run_overrides(files, straight, 6)), progress=False)
    rows = dynamics_rows(straight)
    assert sorted(rows) == [0, 2, 4, 6]
    for step, row in rows.items():
        for name in NAMES:
            assert f"eval/dynamics/{name}" in row, (step, name)
    zero = rows[0]
    assert all(zero[f"eval/dynamics/{n}"] == 0.0 for n in NAMES if "delta" in n)
    assert zero["eval/dynamics/displacement"] == 0.0 and "eval/dynamics/delta_ratio" not in zero
    assert rows[6]["eval/dynamics/delta_logps/rejected"] != 0.0
    assert (straight / DY.BASELINE_FILE).is_file()
    report = (straight / "data_report.json").read_text()
    assert '"probe"' in report

    # Stopped after step 4 (constant schedule: the first 4 steps are the same), then resumed.
    resumed = tmp_path / "resumed"
    trainer.train(C.load_config(None, run_overrides(files, resumed, 4)), progress=False)
    recomputed = tmp_path / "recomputed"
    shutil.copytree(resumed, recomputed)
    (recomputed / DY.BASELINE_FILE).unlink()  # the initial state's evaluation again
    for out_dir in (resumed, recomputed):
        trainer.train(C.load_config(None, run_overrides(files, out_dir, 6)), progress=False)
        assert dynamics_rows(out_dir) == rows, out_dir
    baseline = DY.load_baseline(recomputed / DY.BASELINE_FILE)
    for k, v in DY.load_baseline(straight / DY.BASELINE_FILE).items():
        assert np.array_equal(baseline[k], v), k
