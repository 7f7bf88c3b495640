"""AdaLoRA rank allocator against an independent float64 NumPy transcription of PEFT 0.21.2's
`RankAllocator` + `AdaLoraModel.update_and_allocate` (torch layout, explicit loops), replayed
step by step on the same params and grads. EMAs to <= 1e-12 in x64 (same float64 arithmetic in
another order); budgets, flags, masked `e` and rank patterns exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.peft import adalora_allocator as aa

# (in, out) of each adapted layer
SHAPES = {"attn.q": (5, 4), "attn.v": (3, 7), "mlp.up": (6, 2)}
CFG = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=1, total_step=12, beta1=0.85, beta2=0.85)


class PeftRankAllocator:
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate, written from the source, on
    torch-layout float64 NumPy arrays: A (r, in), E (r, 1), B (out, r)."""

    def __init__(self, names, init_r, cfg):
        self.cfg, self.names = cfg, sorted(names)
        self.init_bgt = init_r * len(names)
        self.target_bgt = cfg["target_r"] * len(names)
        self.reset_ipt()
        self.rank_pattern = None

    def reset_ipt(self):
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}

    def budget_schedule(self, step):
        c = self.cfg
        if step <= c["tinit"]:
            return self.init_bgt, False
        if step > c["total_step"] - c["tfinal"]:
            return self.target_bgt, True
        mul = 1 - (step - c["tinit"]) / (c["total_step"] - c["tfinal"] - c["tinit"])
        return int((self.init_bgt - self.target_bgt) * mul**3 + self.target_bgt), step % c[
            "deltaT"
        ] == 0

    def update_ipt(self, model, grads):
        b1, b2 = self.cfg["beta1"], self.cfg["beta2"]
        for key, p in model.items():
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = np.zeros_like(p)
                self.exp_avg_unc[key] = np.zeros_like(p)
            ipt = np.abs(p * grads[key])
            self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
            self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * np.abs(
                ipt - self.exp_avg_ipt[key]
            )

    def mask_to_budget(self, model, budget):
        triplet, all_scores = {}, []
        for n in self.names:
            s = {m: self.exp_avg_ipt[(n, m)] * self.exp_avg_unc[(n, m)] for m in "AEB"}
            r = s["E"].shape[0]
            for i in range(r):
                row_a = sum(s["A"][i, j] for j in range(s["A"].shape[1])) / s["A"].shape[1]
                col_b = sum(s["B"][k, i] for k in range(s["B"].shape[0])) / s["B"].shape[0]
                triplet[(n, i)] = s["E"][i, 0] + (row_a + col_b)
                all_scores.append(triplet[(n, i)])
        threshold = sorted(all_scores)[self.init_bgt - budget - 1]  # torch.kthvalue, 1-based
        pattern = {}
        for n in self.names:
            E = model[(n, "E")]
            pattern[n] = [not (triplet[(n, i)] <= threshold) for i in range(E.shape[0])]
            for i in range(E.shape[0]):
                if triplet[(n, i)] <= threshold:
                    E[i, 0] = 0.0
        return pattern, threshold

    def update_and_allocate(self, model, grads, step):
        """Returns (budget, mask_ind, threshold or None); mutates model in place."""
        final = self.cfg["total_step"] - self.cfg["tfinal"]
        budget, mask_ind = self.budget_schedule(step)
        threshold = None
        if step < final:
            self.update_ipt(model, grads)
            if mask_ind:
                self.rank_pattern, threshold = self.mask_to_budget(model, budget)
        elif step == final:
            self.rank_pattern, threshold = self.mask_to_budget(model, budget)
            self.reset_ipt()
        else:
            for n in self.names:
                for i, keep in enumerate(self.rank_pattern[n]):
                    if not keep:
                        model[(n, "E")][i, 0] = 0.0
        return budget, mask_ind, threshold


def to_torch(tree):
    out = {}
    for n, (a, e, b) in tree.items():
        out[(n, "A")], out[(n, "E")], out[(n, "B")] = a.T.copy(), e[:, None].copy(), b.T.copy()
    return out


def to_flax(model, names):
    return {n: (model[(n, "A")].T, model[(n, "E")][:, 0], model[(n, "B")].T) for n in names}


def random_tree(rng, r, scale=1.0):
    return {
        n: (
            scale * rng.standard_normal((i, r)),
            scale * rng.standard_normal(r),
            scale * rng.standard_normal((r, o)),
        )
        for n, (i, o) in SHAPES.items()
    }


def jnp_tree(tree):
    return {n: tuple(jnp.asarray(x) for x in t) for n, t in tree.items()}


@pytest.mark.parametrize("delta_t", [1, 2])
def test_matches_peft_transcription_every_step(x64, delta_t):
    cfg = aa.AdaLoraSchedule(**{**CFG, "deltaT": delta_t})
    ref_cfg = {**CFG, "deltaT": delta_t}
    rng = np.random.default_rng(0)
    params = random_tree(rng, cfg.init_r)
    ref = PeftRankAllocator(SHAPES, cfg.init_r, ref_cfg)
    state = aa.init_allocator(jnp_tree(params))
    # a fresh callable: jax.jit shares its cache between wrappers of the same function
    jitted = jax.jit(lambda p, g, s, t: aa.update_and_allocate(p, g, s, t, cfg))
    pruned_regrown = False
    for step in range(cfg.total_step):
        grads = random_tree(rng, cfg.init_r)
        # optimizer step first: PEFT's documented order is step() -> update_and_allocate(t)
        params = {n: tuple(p - 0.1 * g for p, g in zip(params[n], grads[n])) for n in params}
        if step > cfg.final_step:
            pruned_regrown |= any(
                np.any(params[n][1][~np.asarray(state.rank_pattern[n])] != 0) for n in params
            )
        model = to_torch(params)
        budget, mask_ind, thr = ref.update_and_allocate(model, to_torch(grads), step)
        new_params, state, info = jitted(jnp_tree(params), jnp_tree(grads), state, step)

        assert int(info.budget) == budget, step
        assert bool(info.mask_now) == mask_ind, step
        assert bool(info.allocated) == (thr is not None), step
        if thr is None:
            assert np.isnan(info.threshold)
        else:
            np.testing.assert_allclose(float(info.threshold), thr, rtol=1e-12, atol=0)
        want = to_flax(model, ref.names)
        for n in SHAPES:
            np.testing.assert_array_equal(np.asarray(new_params[n][1]), want[n][1])
            np.testing.assert_array_equal(np.asarray(new_params[n][0]), params[n][0])
            for m, leaf in zip("AEB", range(3)):
                for got_tree, want_dict in (
                    (state.ipt, ref.exp_avg_ipt),
                    (state.unc, ref.exp_avg_unc),
                ):
                    got = np.asarray(got_tree[n][leaf])
                    w = to_flax(want_dict, [n])[n][leaf] if want_dict else np.zeros_like(got)
                    np.testing.assert_allclose(
                        got, w, rtol=0, atol=1e-12, err_msg=f"{step} {n} {m}"
                    )
            if ref.rank_pattern is not None:
                np.testing.assert_array_equal(
                    np.asarray(state.rank_pattern[n]), ref.rank_pattern[n]
                )
                assert int(info.kept_ranks[n]) == sum(ref.rank_pattern[n])
        params = {n: (params[n][0], np.asarray(new_params[n][1]), params[n][2]) for n in params}

    assert jitted._cache_size() == 1
    assert pruned_regrown  # the final phase really had to re-zero regrown singular values
    kept = sum(int(info.kept_ranks[n]) for n in SHAPES)
    assert kept <= ref.target_bgt and kept >= 1
    assert any(not all(ref.rank_pattern[n]) for n in SHAPES)


def test_budget_schedule_hand_table():
    # init_bgt = 12, target_bgt = 6, tinit = 2, tfinal = 3, T = 12: D = T - tfinal - tinit = 7.
    # t <= 2: 12. t = 3..8: int(6 * (1 - (t - 2) / 7)^3 + 6):
    #   t=3: 6 * 216/343 = 3.78 -> 9;  t=4: 6 * 125/343 = 2.19 -> 8;  t=5: 6 * 64/343 = 1.12 -> 7;
    #   t=6: 6 * 27/343 = 0.47 -> 6;   t=7: 0.14 -> 6;   t=8: 0.017 -> 6.
    # t = 9 = T - tfinal: coefficient 0 -> 6 (mask by deltaT, forced anyway); t > 9: 6, True.
    cfg = aa.AdaLoraSchedule(**CFG)
    budgets = [12, 12, 12, 9, 8, 7, 6, 6, 6, 6, 6, 6]
    masks = [False] * 3 + [True] * 9
    kw = dict(init_budget=12, target_budget=6, cfg=cfg)
    assert [aa.budget_schedule(t, **kw) for t in range(12)] == list(zip(budgets, masks))
    steps = jnp.arange(12, dtype=jnp.int32)
    b, m = jax.jit(jax.vmap(lambda t: aa.budget_schedule(t, **kw)))(steps)
    assert b.tolist() == budgets and m.tolist() == masks


@pytest.mark.parametrize(
    "init_budget, target_budget, kw",
    [
        (36, 9, dict(tinit=0, tfinal=1, total_step=4)),  # 27 * (2/3)^3 = 8 up to rounding
        (100, 20, dict(tinit=3, tfinal=7, total_step=51, deltaT=3)),
        (7, 7, dict(tinit=1, tfinal=1, total_step=5)),
    ],
)
def test_budget_schedule_jit_equals_python_float64(init_budget, target_budget, kw):
    # under jit the budget comes from precomputed float64 drop steps, not a float32 cubic
    cfg = aa.AdaLoraSchedule(**kw)
    fn = jax.jit(
        lambda t: aa.budget_schedule(
            t, init_budget=init_budget, target_budget=target_budget, cfg=cfg
        )
    )
    for t in range(-2, cfg.total_step + 3):
        b, m = fn(jnp.int32(t))
        want = aa.budget_schedule(t, init_budget=init_budget, target_budget=target_budget, cfg=cfg)
        assert (int(b), bool(m)) == want, t


def manual_state(scores, rank):
    # ipt = score, unc = 1 on e; zero on a and b, so S = score exactly
    zeros = lambda i, o: (jnp.zeros((i, rank)), jnp.zeros(rank), jnp.zeros((rank, o)))  # noqa: E731
    ipt = {
        n: (zeros(2, 2)[0], jnp.asarray(s, jnp.float32), zeros(2, 2)[2]) for n, s in scores.items()
    }
    unc = {n: (zeros(2, 2)[0], jnp.ones(rank), zeros(2, 2)[2]) for n in scores}
    params = {
        n: (jnp.ones((2, rank)), jnp.arange(1.0, rank + 1), jnp.ones((rank, 2))) for n in scores
    }
    pattern = {n: jnp.ones(rank, bool) for n in scores}
    return params, aa.AllocatorState(ipt, unc, pattern)


def test_ties_at_threshold_prune_more_than_k():
    # final step: no EMA update, budget = target_bgt = 2 * 2 = 4, k = 8 - 4 = 4; 4th smallest
    # is 3.0 and three scores equal it, so 6 triplets go (PEFT masks S <= thr).
    cfg = aa.AdaLoraSchedule(init_r=4, target_r=2, tinit=0, tfinal=2, total_step=6)
    params, state = manual_state({"x": [1.0, 3.0, 5.0, 3.0], "y": [2.0, 3.0, 4.0, 6.0]}, 4)
    new, state, info = jax.jit(aa.update_and_allocate, static_argnames="cfg")(
        params, params, state, cfg.final_step, cfg=cfg
    )
    assert float(info.threshold) == 3.0 and int(info.budget) == 4
    assert np.asarray(new["x"][1]).tolist() == [0.0, 0.0, 3.0, 0.0]
    assert np.asarray(new["y"][1]).tolist() == [0.0, 0.0, 3.0, 4.0]
    assert {n: int(k) for n, k in info.kept_ranks.items()} == {"x": 1, "y": 2}
    assert all(float(jnp.abs(x).max()) == 0.0 for t in state.ipt.values() for x in t)  # reset


def test_k_zero_prunes_nothing():
    # target_r == init_r: k = 0, where torch.kthvalue would raise; nothing is pruned
    cfg = aa.AdaLoraSchedule(init_r=3, target_r=3, tinit=0, tfinal=1, total_step=4)
    params, state = manual_state({"x": [1.0, 2.0, 0.0]}, 3)
    new, state, info = jax.jit(aa.update_and_allocate, static_argnames="cfg")(
        params, params, state, cfg.final_step, cfg=cfg
    )
    assert float(info.threshold) == -np.inf and bool(info.allocated)
    np.testing.assert_array_equal(new["x"][1], params["x"][1])
    assert int(info.kept_ranks["x"]) == 3


def test_orthogonal_regularizer_matches_numpy(x64):
    rng = np.random.default_rng(1)
    tree = random_tree(rng, 4, scale=0.5)
    want = []
    for A, B in ((a.T, b.T) for a, _, b in tree.values()):  # torch layout
        want.append(np.sqrt(np.sum((A @ A.T - np.eye(4)) ** 2)))  # lora_A: p @ p.T
        want.append(np.sqrt(np.sum((B.T @ B - np.eye(4)) ** 2)))  # lora_B: p.T @ p
    got = jax.jit(aa.orthogonal_regularizer)(jnp_tree(tree))
    np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-13)
    # exactly orthonormal factors: value 0 and a finite (zero) gradient, like torch.norm
    q = np.linalg.qr(rng.standard_normal((5, 3)))[0]
    ortho = {"l": (jnp.asarray(q), jnp.ones(3), jnp.asarray(q.T))}
    assert float(jax.jit(aa.orthogonal_regularizer)(ortho)) < 1e-14
    grads = jax.jit(jax.grad(aa.orthogonal_regularizer))(ortho)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_slice_and_expand_round_trip():
    rng = np.random.default_rng(2)
    tree = jax.tree.map(lambda x: x.astype(np.float32), random_tree(rng, 6))
    pattern = {
        "attn.q": np.array([1, 0, 1, 1, 0, 0], bool),
        "attn.v": np.zeros(6, bool),
        "mlp.up": np.ones(6, bool),
    }
    sliced = aa.slice_to_rank_pattern(jnp_tree(tree), pattern)
    assert [sliced[n][1].shape[0] for n in SHAPES] == [3, 0, 6]
    # PEFT's resize_state_dict_by_rank_pattern in torch layout: A[idx], E[idx], B[:, idx]
    torch_full, torch_sliced = to_torch(tree), to_torch(jax.tree.map(np.asarray, sliced))
    for (n, m), x in torch_full.items():
        want = x[:, pattern[n]] if m == "B" else x[pattern[n]]
        np.testing.assert_array_equal(torch_sliced[(n, m)], want)

    back = aa.expand_from_rank_pattern(sliced, pattern)
    for n, (a, e, b) in tree.items():
        keep = pattern[n]
        got = [np.asarray(x) for x in back[n]]
        np.testing.assert_array_equal(got[0], np.where(keep[None, :], a, 0))
        np.testing.assert_array_equal(got[1], np.where(keep, e, 0))
        np.testing.assert_array_equal(got[2], np.where(keep[:, None], b, 0))
        # same adapter output as the pruned full-rank layer
        np.testing.assert_allclose(
            (got[0] * got[1]) @ got[2], (a * np.where(keep, e, 0)) @ b, atol=1e-6
        )
        resliced = aa.slice_to_rank_pattern(back, pattern)[n]
        for x, y in zip(resliced, sliced[n]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="attn.q"):
        aa.expand_from_rank_pattern(jnp_tree(tree), {"attn.q": pattern["attn.q"]})


def test_adalora_scale():
    assert aa.adalora_scale(32, 12) == 32 / 12.00001
    assert aa.adalora_scale(0, 12) == 12.0 / 12.00001


@pytest.mark.parametrize(
    "field, value",
    [
        ("total_step", None),
        ("total_step", 0),
        ("tinit", 9),  # tinit >= total_step - tfinal = 12 - 3
        ("tfinal", 10),  # tinit = 2 >= 12 - 10: reported on tinit, as PEFT words it
        ("beta1", 1.0),
        ("beta2", 0.0),
        ("deltaT", 0),
        ("target_r", 7),
        ("init_r", -1),
    ],
)
def test_bad_config_names_the_field(field, value):
    named = "tinit" if field == "tfinal" else field
    with pytest.raises(ValueError, match=f"AdaLoraSchedule.{named}"):
        aa.AdaLoraSchedule(**{**CFG, field: value})
