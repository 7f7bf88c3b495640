"""Unlearning losses: gradient ascent, gradient difference, NPO and SimNPO (specs/online.md
section 5.1-5.3), with the official code's reductions.

A batch holds a forget set D_f and a retain set D_r as per-token policy log-probs with their
completion masks. NLL(y) = -sum_t log pi(y_t) (a sum); "HF loss" is `outputs.loss`, the token
mean of the NLL over every label of a batch. Token means are kept as (sum over tokens, number of
tokens) terms and per-sequence means as (sum over sequences, number of sequences) terms, so
micro-batch and multi-device accumulation is exact: the official trainers average per-micro-batch
HF losses instead, which differs when micro-batches hold different numbers of tokens.

Empty inputs: a forget or retain set with 0 rows is a ValueError when the batch is built (shapes
are static). A zero-length row (all-zero mask) is padding: it adds nothing to a token mean and is
left out of the per-sequence means of NPO / SimNPO (their counts are the non-empty rows). A mask
with no token at all, when it is concrete (outside `jit`), is a ValueError naming it for every
loss term that reads it; inside `jit` such a term is (0, 0), whose value is defined as 0 with a
zero gradient (what an all-padding micro-batch must contribute to an exact accumulation).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignjax.losses.types import LossOutput, LossTerm, check_beta, masked_sum
from alignjax.ops import _checks as C

RETAIN_TERMS = ("none", "nll", "kl")
LOG_RATIOS = ("sum", "token_mean")
KL_NORMALIZATIONS = ("tokens", "batchmean")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnlearnBatch:
    """F forget completions and R retain completions.

    Attributes:
      forget_logps, forget_mask: `[F, T]` policy per-token log-probs of the forget completions
        (values off the mask are ignored) and their 0/1 completion mask.
      retain_logps, retain_mask: `[R, T']` the same for the retain completions; None for losses
        without a retain term (`grad_ascent`, `retain="none"`).
      ref_forget_logps: reference log-probs of the forget completions, `[F, T]` per token or `[F]`
        precomputed sums (NPO's pre-unlearning model); None for reference-free losses.
      ref_retain_logps: the same for the retain completions (logged as `logratio/retain`).
      retain_kl: `[R, T']` per-token KL(ref || policy) at the retain positions, as the fused
        kernel gives it (the `retain="kl"` term).
    """

    forget_logps: jax.Array
    forget_mask: jax.Array
    retain_logps: jax.Array | None = None
    retain_mask: jax.Array | None = None
    ref_forget_logps: jax.Array | None = None
    ref_retain_logps: jax.Array | None = None
    retain_kl: jax.Array | None = None

    def __post_init__(self):
        if not hasattr(self.forget_logps, "shape"):
            return  # JAX rebuilding the pytree with placeholder leaves: nothing to validate
        _check_set(self, "forget")
        if self.retain_logps is None:
            for name in ("retain_mask", "ref_retain_logps", "retain_kl"):
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` is given without `retain_logps`")
            return
        _check_set(self, "retain")
        shape = tuple(self.retain_logps.shape)
        if hasattr(self.retain_kl, "shape") and tuple(self.retain_kl.shape) != shape:
            raise ValueError(
                f"`retain_kl` must have shape {shape} like `retain_logps`, "
                f"got {tuple(self.retain_kl.shape)}"
            )


def _check_set(batch: UnlearnBatch, part: str) -> None:
    """[..., N, T] log-probs with at least one row, a mask of the same shape, and a reference
    of the same shape or [..., N] sums."""
    name = f"{part}_logps"
    logps = getattr(batch, name)
    C.check_floating(name, logps)
    shape = tuple(logps.shape)
    if len(shape) < 2:
        raise ValueError(f"`{name}` must be [N, T], got {shape}")
    if shape[-2] == 0:
        raise ValueError(f"`{name}` has 0 rows: the {part} set is empty")
    mask = getattr(batch, f"{part}_mask")
    if mask is None:
        raise ValueError(f"`{part}_mask` is required with `{name}`")
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"`{part}_mask` must have shape {shape} like `{name}`, got {tuple(mask.shape)}"
        )
    ref = getattr(batch, f"ref_{part}_logps")
    if hasattr(ref, "shape") and tuple(ref.shape) not in (shape, shape[:-1]):
        raise ValueError(
            f"`ref_{part}_logps` must be [N, T] {shape} or [N] {shape[:-1]}, got {tuple(ref.shape)}"
        )


def _require_tokens(name: str, mask: jax.Array) -> None:
    """A concrete mask must select at least one token (traced masks are not checked)."""
    if C.is_concrete(mask) and not np.any(np.asarray(mask) != 0):
        raise ValueError(f"`{name}` selects no tokens: the set is empty")


def _check_weight(name: str, value) -> None:
    if isinstance(value, numbers.Real) and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")


def _token_nll(logps, mask) -> LossTerm:
    """HF `outputs.loss` as a term: (-sum of log-probs over the mask, number of tokens)."""
    total = -jnp.sum(masked_sum(logps, mask))
    return LossTerm(total, jnp.sum(mask != 0).astype(total.dtype), 1.0)


def _retain_term(batch: UnlearnBatch, retain: str, weight: float, kl_normalization: str):
    """The retain term (name, LossTerm) or None; `retain` in RETAIN_TERMS."""
    if retain not in RETAIN_TERMS:
        raise ValueError(f"`retain` must be one of {list(RETAIN_TERMS)}, got {retain!r}")
    if kl_normalization not in KL_NORMALIZATIONS:
        raise ValueError(
            f"`kl_normalization` must be one of {list(KL_NORMALIZATIONS)}, got {kl_normalization!r}"
        )
    _check_weight("retain_weight", weight)
    if retain == "none":
        return None
    if batch.retain_logps is None:
        raise ValueError(f"retain={retain!r} needs `retain_logps` and `retain_mask`")
    if retain == "nll":
        _require_tokens("retain_mask", batch.retain_mask)
        return "retain_nll", _token_nll(batch.retain_logps, batch.retain_mask)._replace(
            weight=weight
        )
    if batch.retain_kl is None:
        raise ValueError("retain='kl' needs `retain_kl` (per-token KL(ref || policy))")
    if kl_normalization == "tokens":
        _require_tokens("retain_mask", batch.retain_mask)
        total = jnp.sum(masked_sum(batch.retain_kl, batch.retain_mask))
        count = jnp.sum(batch.retain_mask != 0).astype(total.dtype)
    else:
        kl = batch.retain_kl.astype(C.result_dtype(batch.retain_kl.dtype))
        total = jnp.sum(kl)
        count = jnp.asarray(kl.size, total.dtype)
    return "retain_kl", LossTerm(total, count, weight)


def _nonempty(mask):
    return jnp.any(mask != 0, axis=-1)


def _lengths(mask, dtype):
    """Completion lengths clamped at 1 (empty rows are masked out where they are used)."""
    return jnp.maximum(jnp.sum(mask != 0, axis=-1), 1).astype(dtype)


def _row_means(values, rows):
    """Mean of `[F]` values over the non-empty rows (0 when none)."""
    return jnp.sum(jnp.where(rows, values, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def _output(name, per_row, rows, coeff, batch, retain_term, rewards) -> LossOutput:
    """LossOutput of a per-sequence forget term: the mean of `per_row` over the non-empty
    rows `rows`, with per-row implicit `rewards`."""
    per_row = jnp.where(rows, per_row, 0.0)
    forget = LossTerm(jnp.sum(per_row), jnp.sum(rows).astype(per_row.dtype), coeff)
    rewards = jnp.where(rows, rewards, 0.0)
    metrics = {"rewards/forget": _row_means(rewards, rows)}
    return _assemble(name, forget, per_row, batch, retain_term, metrics, rewards)


def _assemble(name, forget, per_row, batch, retain_term, metrics, rewards=None) -> LossOutput:
    """The terms (forget, then retain), per-row losses, rewards and the shared metrics."""
    terms = {name: forget}
    metrics = dict(metrics)
    rows = _nonempty(batch.forget_mask)
    seq = masked_sum(batch.forget_logps, batch.forget_mask)
    metrics["forget_nll"] = _token_nll(batch.forget_logps, batch.forget_mask).value
    metrics["logps/forget"] = _row_means(seq, rows)
    if batch.retain_logps is not None:
        metrics["retain_nll"] = _token_nll(batch.retain_logps, batch.retain_mask).value
        if batch.ref_retain_logps is not None:
            r_rows = _nonempty(batch.retain_mask)
            ratio = masked_sum(batch.retain_logps, batch.retain_mask) - masked_sum(
                batch.ref_retain_logps, batch.retain_mask
            )
            metrics["logratio/retain"] = _row_means(ratio, r_rows)
    if retain_term is not None:
        terms[retain_term[0]] = retain_term[1]
        metrics[retain_term[0]] = retain_term[1].value
    metrics = {k: lax.stop_gradient(v) for k, v in metrics.items()}
    zeros = jnp.zeros(per_row.shape, per_row.dtype)
    rewards = zeros if rewards is None else lax.stop_gradient(rewards)
    return LossOutput(terms, per_row, zeros, rewards, metrics)


def grad_ascent(batch: UnlearnBatch) -> LossOutput:
    """Gradient ascent on the forget set: L = -loss_f, loss_f the HF token-mean NLL over every
    forget token of the batch (WAGLE `GA`; specs/online.md 5.1).

    `losses[i]` is row i's own token-mean log-prob (0 for an empty row); `rejected_rewards`
    are 0. Metrics: `forget_nll` (token mean), `logps/forget` (mean summed log-prob).
    """
    return grad_diff(batch, retain_weight=0.0, retain="none")


def grad_diff(batch: UnlearnBatch, *, retain_weight: float = 1.0, retain: str = "nll",
              kl_normalization: str = "tokens") -> LossOutput:  # fmt: skip
    """Gradient difference: L = -loss_f + retain_weight * loss_r, both HF token means (WAGLE
    `GA_FT` with gamma = `retain_weight` = 1.0 as in every WAGLE config; specs/online.md 5.1).
    `retain="kl"` swaps loss_r for the retain KL term (see `npo`); `retain="none"` is GA.
    """
    _require_tokens("forget_mask", batch.forget_mask)
    term = _token_nll(batch.forget_logps, batch.forget_mask)
    forget = LossTerm(-term.total, term.count, 1.0)
    rows = _nonempty(batch.forget_mask)
    seq = masked_sum(batch.forget_logps, batch.forget_mask)
    per_row = jnp.where(rows, seq / _lengths(batch.forget_mask, seq.dtype), 0.0)
    retain_term = _retain_term(batch, retain, retain_weight, kl_normalization)
    return _assemble("grad_ascent", forget, per_row, batch, retain_term, {})


def npo(batch: UnlearnBatch, *, beta: float = 0.1, npo_coeff: float = 1.0,
        retain: str = "nll", retain_weight: float = 1.0, log_ratio: str = "sum",
        kl_normalization: str = "tokens") -> LossOutput:  # fmt: skip
    """Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868), as coded in
    licong-lin/negative-preference-optimization (`TOFU/dataloader.py`; specs/online.md 5.2):

        Delta_i = NLL_theta(y_i) - NLL_ref(y_i)        (summed NLL, `get_batch_loss`)
        L_NPO   = -(2/beta) mean_i log s(beta Delta_i) = (2/beta) mean_i softplus(-beta Delta_i)
        L       = npo_coeff * L_NPO + retain_weight * loss_r

    The mean runs over the non-empty forget rows. `retain`: "nll" is `npo_grad_diff` (the
    official default, `grad_diff_coeff` = `retain_weight`), "kl" is `npo_KL` (`KL_coeff` =
    `retain_weight`), "none" is plain NPO. The gradient is 2 s(-beta Delta_i) times that of the
    mean summed log-prob; at initialisation (policy = reference) the weight is 1, so NPO's
    gradient is that of GA on the mean *summed* log-prob, mean_i sum_t log pi(y_i,t) (which is
    `grad_ascent`'s token-mean gradient times tokens / non-empty rows); beta -> 0 gives GA too.

    `log_ratio="token_mean"` is WAGLE's `NPO_FT`: Delta_i from each row's token-mean NLL (WAGLE
    takes HF's batch token mean; the two agree at batch size 1, which every WAGLE config uses).

    The retain KL term (`retain="kl"`) is KL(ref || policy) from `batch.retain_kl`:
    `kl_normalization="tokens"` averages it over the retain completion tokens. The official term,
    `kl_div(log p_theta, log p_ref, reduction='batchmean', log_target=True)` over the flattened
    `(R * T, V)` logits, sums the KL over *every* position (prompt, padding and the last,
    label-less one) and divides by R * T. `"batchmean"` reproduces its normaliser: the sum of
    `retain_kl` over every entry of its `[R, T']` array (mask ignored) divided by R * T'. It
    equals the official value only when `retain_kl` holds the KL at all R * T logits positions;
    the fused kernel computes it at completion tokens only (zeros elsewhere), so with it the
    sum lacks the prompt and padding positions and the official term cannot be rebuilt from
    the batch.

    Metrics: `forget_nll`, `retain_nll`, `logps/forget`, `logratio/forget` (mean over non-empty
    rows of -Delta_i, i.e. log pi - log pi_ref, per token with `log_ratio="token_mean"`),
    `rewards/forget` (beta times it), the retain term. `rejected_rewards` holds -beta Delta_i
    per forget row and `losses` the per-row (2/beta) softplus(-beta Delta_i), both 0 on empty rows.
    """
    check_beta(beta)
    _check_weight("npo_coeff", npo_coeff)
    if log_ratio not in LOG_RATIOS:
        raise ValueError(f"`log_ratio` must be one of {list(LOG_RATIOS)}, got {log_ratio!r}")
    if batch.ref_forget_logps is None:
        raise ValueError("NPO needs `ref_forget_logps` (the model before unlearning)")
    _require_tokens("forget_mask", batch.forget_mask)
    retain_term = _retain_term(batch, retain, retain_weight, kl_normalization)
    rows = _nonempty(batch.forget_mask)
    ratio = masked_sum(batch.forget_logps, batch.forget_mask) - lax.stop_gradient(
        masked_sum(batch.ref_forget_logps, batch.forget_mask)
    )  # log pi - log pi_ref = -Delta
    if log_ratio == "token_mean":
        ratio = ratio / _lengths(batch.forget_mask, ratio.dtype)
    per_row = (2.0 / beta) * jax.nn.softplus(beta * ratio)
    out = _output("npo", per_row, rows, npo_coeff, batch, retain_term, beta * ratio)
    out.metrics["logratio/forget"] = lax.stop_gradient(_row_means(ratio, rows))
    return out


def simnpo(batch: UnlearnBatch, *, beta: float = 2.5, gamma: float = 0.0,
           npo_coeff: float = 0.1375, retain: str = "nll", retain_weight: float = 1.0,
           kl_normalization: str = "tokens") -> LossOutput:  # fmt: skip
    """SimNPO (Fan et al. 2024, arXiv:2410.07163), reference-free and length-normalised, as
    coded in OPTML-Group/Unlearn-Simple (`TOFU/dataloader.py` L269-290; specs/online.md 5.3):

        a_i = NLL_sum(y_i) / |y_i| - gamma
        L   = npo_coeff * (-(2/beta) mean_i log s(beta a_i)) + retain_weight * loss_r

    `gamma` is the CODE's gamma (subtracted from the average NLL inside s(beta .)). The paper
    writes s(-(beta/|y|) log pi - gamma_paper), so gamma_paper = beta * gamma (open-unlearning
    #123). Defaults from the official forget05 `forget.yaml`: beta 2.5, gamma 0, npo_coeff
    0.1375, `simnpo_grad_diff` (retain="nll", `grad_diff_coeff` = `retain_weight` = 1).
    |y_i| is the number of completion tokens (the code's count of non -100 labels, the same for
    completion-only labels); the mean runs over the non-empty rows. `retain`,
    `kl_normalization`: as in `npo`. `rejected_rewards` / `rewards/forget`: beta times the
    token-mean forget log-prob (SimPO's implicit reward).
    """
    check_beta(beta)
    _check_weight("npo_coeff", npo_coeff)
    _require_tokens("forget_mask", batch.forget_mask)
    retain_term = _retain_term(batch, retain, retain_weight, kl_normalization)
    rows = _nonempty(batch.forget_mask)
    mean_logps = masked_sum(batch.forget_logps, batch.forget_mask)
    mean_logps = mean_logps / _lengths(batch.forget_mask, mean_logps.dtype)
    a = -mean_logps - gamma
    per_row = (2.0 / beta) * jax.nn.softplus(-beta * a)  # -(2/beta) log s(beta a)
    return _output("simnpo", per_row, rows, npo_coeff, batch, retain_term, beta * mean_logps)
