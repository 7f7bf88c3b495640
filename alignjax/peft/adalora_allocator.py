"""AdaLoRA's rank allocator (Zhang et al. 2023, arXiv:2303.10512) as pure functions on pytrees,
with the exact semantics of PEFT's `RankAllocator` and `AdaLoraModel.update_and_allocate`
(specs/peft.md section 3).

Each adapted layer holds the SVD-shaped increment of Sec. 3.1, `dW = P diag(lambda) Q`, in the
Flax layout `a = Q^T (in, r)`, `e = lambda (r,)`, `b = P^T (r, out)`, so `y += ((x a) * e) b * s`.
The allocator sees `params` and `grads` as mappings `name -> (a, e, b)`. Sec. 3.2:

    I(w)  = |w * dL/dw|                                sensitivity of every entry
    I_bar = beta1 I_bar + (1 - beta1) I                smoothed sensitivity
    U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|      uncertainty (uses the new I_bar)
    s(w)  = I_bar * U_bar
    S_i   = s(e_i) + mean_in s(a[:, i]) + mean_out s(b[i, :])    triplet score

and at allocation steps every `e_i` with `S_i <= kthvalue(S, b0 - b(t))` is set to zero. The
budget `b(t)` (total number of kept singular values) follows the cubic schedule of Sec. 3.3:

    b(t) = b0                                          t <= t_init
    b(t) = bT + (b0 - bT) (1 - (t - t_init) / (T - t_final - t_init))^3   (truncated to int)
    b(t) = bT                                          t > T - t_final

Pruning only zeroes `e`; `a`, `b` keep their shape and the scale keeps `init_r`, exactly as in
PEFT (which also leaves the optimizer state untouched: a pruned `e_i` can regrow before the
next allocation).

Example (after each optimizer step; `cfg` is static):

    >>> cfg = AdaLoraSchedule(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=5)
    >>> params = {"q": (jnp.ones((3, 4)), jnp.arange(4.0), jnp.ones((4, 2)))}
    >>> state = init_allocator(params)
    >>> allocate = jax.jit(functools.partial(update_and_allocate, cfg=cfg))
    >>> params, state, info = allocate(params, params, state, 2)  # grads = params here
    >>> int(info.budget), params["q"][1].tolist()
    (2, [0.0, 0.0, 2.0, 3.0])
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Triplet = tuple[jax.Array, jax.Array, jax.Array]
AdapterTree = Mapping[str, Triplet]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraSchedule:
    """The allocation hyperparameters of PEFT's `AdaLoraConfig` (same names and defaults).

    Args:
      init_r: initial rank of every layer.
      target_r: target *average* rank; the final budget is `target_r * n_layers`.
      tinit: warm-up steps without pruning (`t <= tinit`).
      tfinal: final steps that only re-apply the fixed rank pattern (`t > T - tfinal`).
      deltaT: allocation interval in the budgeting phase.
      total_step: T, required (PEFT's default None is rejected as in PEFT).
      beta1, beta2: EMA factors of the sensitivity and of the uncertainty, in (0, 1).

    Stricter than PEFT (which fails later, inside training, or silently misbehaves): `deltaT >= 1`,
    `tinit, tfinal >= 0` and `0 <= target_r <= init_r`.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815  (PEFT's name)
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"AdaLoraSchedule.{field}: {why} (got {getattr(self, field)!r})")

        if self.total_step is None or self.total_step <= 0:
            fail("total_step", "AdaLoRA needs the total number of training steps, > 0")
        if self.init_r < 0:
            fail("init_r", "must be >= 0")
        if not 0 <= self.target_r <= self.init_r:
            fail("target_r", f"must be in [0, init_r={self.init_r}]")
        if self.tinit < 0:
            fail("tinit", "must be >= 0")
        if self.tfinal < 0:
            fail("tfinal", "must be >= 0")
        if self.tinit >= self.total_step - self.tfinal:
            fail("tinit", "no budgeting phase: need tinit < total_step - tfinal")
        if self.deltaT < 1:
            fail("deltaT", "must be >= 1")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, "must be in (0, 1)")

    @property
    def final_step(self) -> int:
        """`T - tfinal`: the step that fixes the rank pattern."""
        return self.total_step - self.tfinal


class AllocatorState(NamedTuple):
    """EMAs of sensitivity (`ipt`) and uncertainty (`unc`), shaped like the adapter params, and the
    latest rank pattern (`name -> bool (r,)`, True = kept). Before the first allocation the
    pattern is all True, the jit-shaped equivalent of PEFT's `rank_pattern=None`."""

    ipt: dict[str, Triplet]
    unc: dict[str, Triplet]
    rank_pattern: dict[str, jax.Array]


class AllocationInfo(NamedTuple):
    budget: jax.Array  # int32 b(t)
    mask_now: jax.Array  # bool: the schedule's `mask_ind` (True throughout t > T - tfinal)
    allocated: jax.Array  # bool: a threshold allocation happened this step
    threshold: jax.Array  # kthvalue used (NaN when none; -inf when k = 0)
    kept_ranks: dict[str, jax.Array]  # int32 sum of the rank pattern per layer


def adalora_scale(alpha: float, init_r: int) -> float:
    """Output multiplier of an AdaLoRA layer: `scaling / (ranknum + 1e-5)` with PEFT's
    `scaling = alpha if alpha > 0 else float(r)` and `ranknum = init_r` forever (pruning and
    reloading keep it). PEFT adds the 1e-5 to a float32 `ranknum`; the difference is < 1 ulp."""
    scaling = alpha if alpha > 0 else float(init_r)
    return scaling / (init_r + 1e-5)


def _peft_budget(step: int, init_budget: int, target_budget: int, cfg: AdaLoraSchedule):
    """PEFT's `RankAllocator.budget_schedule`, in Python float64 as PEFT evaluates it."""
    if step <= cfg.tinit:
        return init_budget, False
    if step > cfg.final_step:
        return target_budget, True
    mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    budget = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
    return budget, step % cfg.deltaT == 0


@functools.lru_cache(maxsize=64)
def _budget_drops(init_budget: int, target_budget: int, cfg: AdaLoraSchedule) -> np.ndarray:
    """First step at which the budget falls to `init_budget - j`, for j = 1..b0 - bT.

    A float32 cubic under jit could truncate differently from PEFT's float64 near integers; the
    budget is non-increasing in t, so it is `b0 - #{drops <= t}` exactly with these steps.
    """
    steps = range(cfg.tinit + 1, cfg.final_step + 1)  # b(final_step) = bT exactly (coeff 0)

    def first_step_at_most(b: int) -> int:
        def at_most(t: int) -> bool:
            return _peft_budget(t, init_budget, target_budget, cfg)[0] <= b

        return steps[bisect.bisect_left(steps, True, key=at_most)]

    drops = [first_step_at_most(b) for b in range(init_budget - 1, target_budget - 1, -1)]
    return np.asarray(drops, np.int32)


def budget_schedule(
    step: int | jax.Array, *, init_budget: int, target_budget: int, cfg: AdaLoraSchedule
) -> tuple[int, bool] | tuple[jax.Array, jax.Array]:
    """`(b(t), mask_ind)` of PEFT's cubic schedule. Python ints in, Python values out; an array
    (possibly traced) step gives int32 / bool arrays with identical values."""
    if isinstance(step, int | np.integer):
        return _peft_budget(int(step), init_budget, target_budget, cfg)
    step = jnp.asarray(step, jnp.int32)
    drops = jnp.asarray(_budget_drops(init_budget, target_budget, cfg))
    budget = init_budget - jnp.sum(step >= drops, dtype=jnp.int32)
    mask_ind = jnp.where(
        step <= cfg.tinit,
        False,
        jnp.where(step > cfg.final_step, True, step % cfg.deltaT == 0),
    )
    return budget, mask_ind


def init_allocator(
    params: AdapterTree, rank_pattern: Mapping[str, jax.Array] | None = None
) -> AllocatorState:
    """Zero EMAs; the rank pattern is all True unless one is given (e.g. on resume)."""

    def zeros():  # distinct buffers: a donated state must not hold one array twice
        return {n: tuple(jnp.zeros_like(x) for x in t) for n, t in params.items()}

    if rank_pattern is None:
        rank_pattern = {n: jnp.ones(t[1].shape, bool) for n, t in params.items()}
    pattern = {n: jnp.asarray(rank_pattern[n], bool).reshape(-1) for n in params}
    return AllocatorState(ipt=zeros(), unc=zeros(), rank_pattern=pattern)


def triplet_scores(ipt: AdapterTree, unc: AdapterTree) -> dict[str, jax.Array]:
    """`S_i = s(e_i) + mean_in s(a[:, i]) + mean_out s(b[i, :])` with `s = ipt * unc`, summed in
    PEFT's order `s_E + (s_A + s_B)` (`_combine_ipt`)."""
    out = {}
    for n, (ia, ie, ib) in ipt.items():
        ua, ue, ub = unc[n]
        out[n] = ie * ue + (jnp.mean(ia * ua, axis=0) + jnp.mean(ib * ub, axis=1))
    return out


def update_and_allocate(
    params: AdapterTree,
    grads: AdapterTree,
    state: AllocatorState,
    step: int | jax.Array,
    cfg: AdaLoraSchedule,
) -> tuple[dict[str, Triplet], AllocatorState, AllocationInfo]:
    """One call of PEFT's `AdaLoraModel.update_and_allocate(step)`; jit with `cfg` static.

    Call it after the optimizer step, with the post-step params and the grads of that step
    (PEFT's documented order). Every phase is selected with `jnp.where`, so one compilation
    serves all steps:

    - `t < T - tfinal`: update the EMAs; if `mask_ind`, zero `e_i` where `S_i <= thr` and record
      the rank pattern `~(S <= thr)` (PEFT stores it in the config at every allocation).
    - `t == T - tfinal`: no EMA update (the scores are those of the last update, so if the
      budget already reached `bT` this repeats the previous allocation); allocate to
      `b(t) = bT` regardless of `deltaT`, record the pattern, reset the EMAs to zero.
    - `t > T - tfinal`: zero `e` outside the stored pattern.

    `thr` is the k-th smallest of all triplet scores, `k = b0 - b(t)` with `b0` the total rank of
    `params`; ties at `thr` are all pruned (more than k may go). For k = 0 (only possible when
    `target_r == init_r`) nothing is pruned, where PEFT's `torch.kthvalue(k=0)` would raise.

    Returns the params with the new `e`, the new state and an `AllocationInfo`.
    """
    init_budget = sum(int(t[1].shape[0]) for t in params.values())
    target_budget = cfg.target_r * len(params)
    step = jnp.asarray(step, jnp.int32)
    budget, mask_ind = budget_schedule(
        step, init_budget=init_budget, target_budget=target_budget, cfg=cfg
    )
    before_final = step < cfg.final_step
    at_final = step == cfg.final_step

    b1, b2 = cfg.beta1, cfg.beta2
    ipt, unc = {}, {}
    for n, triplet in params.items():
        ipt_n, unc_n = [], []
        for p, g, i_bar, u_bar in zip(triplet, grads[n], state.ipt[n], state.unc[n]):
            sensitivity = jnp.abs(p * g)
            new_i = b1 * i_bar + (1 - b1) * sensitivity
            new_u = b2 * u_bar + (1 - b2) * jnp.abs(sensitivity - new_i)
            ipt_n.append(jnp.where(before_final, new_i, i_bar))
            unc_n.append(jnp.where(before_final, new_u, u_bar))
        ipt[n], unc[n] = tuple(ipt_n), tuple(unc_n)

    scores = triplet_scores(ipt, unc)
    k = init_budget - budget
    allocate = (before_final & mask_ind) | at_final
    threshold = jnp.full((), -jnp.inf)  # no singular values at all: nothing to rank
    if init_budget > 0:
        all_scores = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
        threshold = jnp.where(k > 0, all_scores[jnp.clip(k - 1, 0, init_budget - 1)], -jnp.inf)

    new_params, pattern = {}, {}
    for n, (a, e, b) in params.items():
        # `~(S <= thr)` rather than `S > thr`: PEFT's form, which keeps a NaN score.
        keep_now = ~(scores[n] <= threshold)
        pattern[n] = jnp.where(allocate, keep_now, state.rank_pattern[n])
        prune = jnp.where(step > cfg.final_step, ~state.rank_pattern[n], allocate & ~keep_now)
        new_params[n] = (a, jnp.where(prune, jnp.zeros_like(e), e), b)

    def reset(tree):
        return {
            n: tuple(jnp.where(at_final, jnp.zeros_like(x), x) for x in t) for n, t in tree.items()
        }

    new_state = AllocatorState(ipt=reset(ipt), unc=reset(unc), rank_pattern=pattern)
    info = AllocationInfo(
        budget=budget,
        mask_now=mask_ind,
        allocated=allocate,
        threshold=jnp.where(allocate, threshold, jnp.nan),
        kept_ranks={n: jnp.sum(m, dtype=jnp.int32) for n, m in pattern.items()},
    )
    return new_params, new_state, info


def _safe_frobenius(x: jax.Array) -> jax.Array:
    # torch.norm's backward is 0 at a zero residual; a bare sqrt would give NaN there.
    sq = jnp.sum(jnp.square(x))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def orthogonal_regularizer(params: AdapterTree) -> jax.Array:
    """PEFT's `R = mean_{P in all a, b} ||C_P - I||_F` (AdaLoraModel.forward): in the Flax layout
    `C_a = a^T a` and `C_b = b b^T` (r x r; PEFT's `A A^T`, `B^T B`). Not squared and averaged
    over the 2L matrices, unlike Sec. 3.1's `||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`. Add
    `orth_reg_weight * R` (PEFT default 0.5) to the loss yourself."""
    terms = []
    for a, _, b in params.values():
        for cov in (a.T @ a, b @ b.T):
            terms.append(_safe_frobenius(cov - jnp.eye(cov.shape[0], dtype=cov.dtype)))
    return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros(())


def slice_to_rank_pattern(
    params: AdapterTree, rank_pattern: Mapping[str, jax.Array]
) -> dict[str, Triplet]:
    """Export the kept ranks only, as PEFT's `_get_adapter_state_dict` /
    `resize_state_dict_by_rank_pattern` do: `a[:, keep]`, `e[keep]`, `b[keep, :]`. Layers
    absent from the pattern pass through. Python side (data-dependent shapes), not jittable.
    The sliced layer keeps the scale of `init_r` (`adalora_scale(alpha, init_r)`)."""
    out = {}
    for n, (a, e, b) in params.items():
        if n not in rank_pattern:
            out[n] = (a, e, b)
            continue
        keep = np.asarray(rank_pattern[n], bool).reshape(-1)
        # on the host: boolean indexing has data-dependent shapes
        a, e, b = np.asarray(a), np.asarray(e), np.asarray(b)
        out[n] = (jnp.asarray(a[:, keep]), jnp.asarray(e[keep]), jnp.asarray(b[keep, :]))
    return out


def expand_from_rank_pattern(
    sliced: AdapterTree, rank_pattern: Mapping[str, jax.Array]
) -> dict[str, Triplet]:
    """Inverse of `slice_to_rank_pattern`: scatter the kept ranks back to `init_r` with zeros
    at pruned ranks (`a`, `e` and `b`), so the layer computes the same output. PEFT instead
    resizes the module to the kept rank (`resize_modules_by_rank_pattern`), which is equivalent;
    note the zero columns do enter `orthogonal_regularizer` if training continues."""
    out = {}
    for n, (a, e, b) in sliced.items():
        if n not in rank_pattern:
            out[n] = (a, e, b)
            continue
        keep = np.asarray(rank_pattern[n], bool).reshape(-1)
        if int(keep.sum()) != e.shape[0]:
            raise ValueError(f"{n}: rank pattern keeps {int(keep.sum())} ranks, e has {e.shape[0]}")
        full = (
            np.zeros((a.shape[0], keep.shape[0]), a.dtype),
            np.zeros(keep.shape, e.dtype),
            np.zeros((keep.shape[0], b.shape[1]), b.dtype),
        )
        full[0][:, keep], full[1][keep], full[2][keep, :] = a, e, b
        out[n] = tuple(jnp.asarray(x) for x in full)
    return out
