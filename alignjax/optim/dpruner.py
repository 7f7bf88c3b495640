"""D-Pruner: general (OBS) importance, the generality regulariser, dual importance, pruning.

D-Pruner (Zhang et al., NAACL 2024 Findings, arXiv:2405.06275); the formulas are those of the
author-committed code compressionOrg/D-Pruner (spec `online.md` 5.5, L557-584):

1. `hessian_from_inputs` (or streamed: `hessian_init` / `hessian_update` / `hessian_finalize`):
   H = (2/n) X X^T of a linear map's calibration inputs, dead inputs set to 1, damping
   `percdamp * mean(diag H)` (`code/general.py::add_batch` and `fasterprune`, spec L562-565);
2. `obs_importance`: the general importance G = W^2 / diag(U)^2, U = chol(H^-1) upper, block-wise
   over the input columns, by default on the weights as SparseGPT prunes them (spec L566-567);
3. `regularised_gradient` and `dual_importance_step` (`code/src/lomo.py::fuse_update_zero3`,
   spec L568-577);
4. `percentile_prune_mask`, `prune_llama_params`, `sparsity_report` (`code/save_model.py`,
   `code/save_model_iterative.py`, spec L578-581).

Layout: every weight-shaped array here (W, G, gradients, I, masks) is the Flax kernel layout
[d_in, d_out] of `alignjax.models` parameters, so it lines up with `params` and their gradients.
The code's PyTorch weights are [d_out, d_in]; its "input columns" are our rows (axis 0).
Convert with `kernel_from_torch` / `torch_from_kernel` (a transpose).

    h = hessian_from_inputs(x)                      # x: [n_seq, n_tokens, d_in] inputs of W
    G = obs_importance(kernel, h)                   # [d_in, d_out]
    g = regularised_gradient(grad, G, lr)           # each step, before the SGD update
    I = dual_importance_step(I, g, kernel)          # theta before the update
    mask = percentile_prune_mask(I, 0.52)           # False = pruned
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from alignjax.optim.labels import path_string

DPRUNER_SPARSITY = 0.52  # `--sparsity` of general.py and the percentile of save_model*.py
DPRUNER_LAMBDA = 0.1  # `lambda_weight`, hard-coded in lomo.py
PERCDAMP = 0.01  # `--percdamp` of general.py
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _float(*xs: Any) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def kernel_from_torch(w: jax.Array) -> jax.Array:
    """A PyTorch `nn.Linear.weight` [d_out, d_in] as a Flax kernel [d_in, d_out] (and back:
    `torch_from_kernel`); importance and masks convert the same way."""
    if np.ndim(w) != 2:
        raise ValueError(f"`w` must be a matrix, got shape {np.shape(w)}")
    return jnp.asarray(w).T


torch_from_kernel = kernel_from_torch


# ----------------------------------------------------------------------------- Hessian


class HessianState(NamedTuple):
    """Running H = (2 / nsamples) sum x x^T, as `General_Pruner.add_batch` keeps it."""

    h: jax.Array
    nsamples: jax.Array


def hessian_init(d_in: int, dtype: Any = None) -> HessianState:
    """Zero H [d_in, d_in] (float32; float64 under x64 if `dtype` asks) and zero samples."""
    dtype = jnp.float32 if dtype is None else dtype
    return HessianState(jnp.zeros((d_in, d_in), dtype), jnp.zeros((), jnp.int32))


def hessian_update(state: HessianState, x: jax.Array) -> HessianState:
    """Adds a batch of inputs `x` [..., n_tokens, d_in] exactly as `add_batch`:
    H *= n / (n + m); n += m; x' = sqrt(2 / n) x; H += x'^T x' over all tokens.

    m counts *sequences* (the code's `inp.shape[0]`; every leading axis here), not tokens: a 2-D
    `x` is one sequence. So H = (2 / n_seq) sum_tokens x x^T, which is the spec's `(2/n) X X^T`
    with n = the number of calibration samples (128 sequences of 2048 tokens in the paper).
    """
    x = jnp.asarray(x)
    d = state.h.shape[0]
    if x.ndim < 2 or x.shape[-1] != d:
        raise ValueError(f"`x` must have shape [..., n_tokens, {d}], got {x.shape}")
    m = int(np.prod(x.shape[:-2])) if x.ndim > 2 else 1
    n_new = state.nsamples + m
    dt = state.h.dtype
    h = state.h * (state.nsamples.astype(dt) / n_new.astype(dt))
    xs = jnp.sqrt(2.0 / n_new.astype(dt)) * x.reshape(-1, d).astype(dt)
    return HessianState(h + xs.T @ xs, n_new)


def dead_inputs(h: jax.Array) -> jax.Array:
    """The inputs whose (undamped) diagonal of H is 0: never active on the calibration data."""
    return jnp.diag(_check_square(h)) == 0


def hessian_finalize(state: HessianState, percdamp: float = PERCDAMP) -> jax.Array:
    """`fasterprune`'s preparation: H_jj = 1 on dead inputs, then + percdamp * mean(diag H) on
    the diagonal (the mean taken after the dead inputs were set to 1, as the code does)."""
    h = _check_square(state.h if isinstance(state, HessianState) else state)
    if not percdamp >= 0:
        raise ValueError(f"`percdamp` must be >= 0, got {percdamp!r}")
    diag = jnp.diag(h)
    diag = jnp.where(diag == 0, jnp.ones_like(diag), diag)
    diag = diag + percdamp * jnp.mean(diag)
    idx = jnp.arange(h.shape[0])
    return h.at[idx, idx].set(diag)


def hessian_from_inputs(x: jax.Array, percdamp: float = PERCDAMP, dtype: Any = None) -> jax.Array:
    """H = (2 / n_seq) X X^T of the inputs `x` [..., n_tokens, d_in] of one linear map, dead
    inputs set to 1 and damped (`hessian_update`, `hessian_finalize`). `dtype` defaults to
    float32, or float64 if `x` is float64.

    Example:
      >>> h = hessian_from_inputs(jnp.array([[1.0, 0.0], [1.0, 0.0]]))  # one sequence, 2 tokens
      >>> [[round(v, 4) for v in row] for row in h.tolist()]  # 2/1 * 2 (+ damp), dead -> 1
      [[4.025, 0.0], [0.0, 1.025]]
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"`x` must have shape [..., n_tokens, d_in], got {x.shape}")
    state = hessian_init(x.shape[-1], _float(x) if dtype is None else dtype)
    return hessian_finalize(hessian_update(state, x), percdamp)


def _check_square(h: Any) -> jax.Array:
    h = jnp.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"`h` must be a square matrix, got shape {h.shape}")
    return h


def inverse_hessian_cholesky(h: jax.Array) -> jax.Array:
    """U upper with U^T U = H^-1 (the code: cholesky, cholesky_inverse, cholesky upper). Then
    diag(U)_j^2 = [(H[j:, j:])^-1]_00, the OBS inverse-Hessian diagonal once the inputs before
    j are fixed; for j = 0 it is [H^-1]_00."""
    h = _check_square(h)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
    return jnp.linalg.cholesky(h_inv).T


# ----------------------------------------------------------------------------- general importance


def _prune_block(w1: jax.Array, u1: jax.Array, mask1: jax.Array):
    """SparseGPT's column loop on one block ([d_out, count], torch layout): q = w with the
    masked entries 0, err = (w - q) / U_ii, later columns -= err U_i,: (U upper, so the row
    update leaves the earlier columns unchanged)."""

    def body(i, carry):
        w1, q1, err1 = carry
        w = w1[:, i]
        q = jnp.where(mask1[:, i], jnp.zeros_like(w), w)
        err = (w - q) / u1[i, i]
        w1 = w1 - err[:, None] * u1[i][None, :]
        return w1, q1.at[:, i].set(q), err1.at[:, i].set(err)

    zeros = jnp.zeros_like(w1)
    _, q1, err1 = jax.lax.fori_loop(0, w1.shape[1], body, (w1, zeros, zeros))
    return q1, err1


def obs_importance(
    w: jax.Array,
    h: jax.Array,
    *,
    blocksize: int = 128,
    sparsity: float = DPRUNER_SPARSITY,
    procedure: str = "sparsegpt",
    dead: jax.Array | None = None,
    return_pruned: bool = False,
) -> Any:
    """General importance G = W^2 / diag(U)^2 (U = `inverse_hessian_cholesky(h)`) of a kernel
    `w` [d_in, d_out] with `h` = `hessian_from_inputs` of its inputs [d_in, d_in].

    `procedure="sparsegpt"` (default: `general.py::fasterprune`, what produced the released
    general importance): input blocks of `blocksize` in order; each block's G is computed on the
    *current* weights (already updated by the OBS error propagation of the earlier blocks); in
    that block the entries with G <= the `int(numel * sparsity)`-th smallest G (sorted, 0-based)
    are pruned, column by column with SparseGPT's error propagation, and the remaining columns
    updated by Err1 @ U[block, later]. `procedure="plain"`: G on the unmodified weights (no
    pruning; then `blocksize` and `sparsity` do not matter, since diag(U) is global). Weights on
    `dead` inputs (`dead_inputs` of the undamped H) are set to 0 first, as the code does.

    Returns G [d_in, d_out] in float32 (float64 if an input is), and with `return_pruned` also
    the SparseGPT-pruned kernel (the code writes it back; D-Pruner keeps only G and later prunes
    the original weights).
    """
    if procedure not in ("sparsegpt", "plain"):
        raise ValueError(f"`procedure` must be 'sparsegpt' or 'plain', got {procedure!r}")
    h = _check_square(h)
    w = jnp.asarray(w)
    if w.ndim != 2 or w.shape[0] != h.shape[0]:
        raise ValueError(f"`w` must be a kernel [d_in={h.shape[0]}, d_out], got shape {w.shape}")
    if not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
        raise ValueError(f"`blocksize` must be a positive int, got {blocksize!r}")
    _check_sparsity(sparsity)
    dt = _float(w, h)
    wt = w.T.astype(dt)  # torch layout [d_out, d_in]: the code's columns
    if dead is not None:
        if np.shape(dead) != (h.shape[0],):
            raise ValueError(f"`dead` must have shape ({h.shape[0]},), got {np.shape(dead)}")
        wt = jnp.where(jnp.asarray(dead)[None, :], jnp.zeros((), dt), wt)
    u = inverse_hessian_cholesky(h.astype(dt))
    diag = jnp.diag(u)
    if procedure == "plain":
        g = wt**2 / diag[None, :] ** 2
        return (g.T, wt.T) if return_pruned else g.T
    cols, blocks = wt.shape[1], []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = wt[:, i1:i2], u[i1:i2, i1:i2]
        g1 = w1**2 / jnp.diag(u1)[None, :] ** 2
        blocks.append(g1)
        thresh = jnp.sort(g1.ravel())[int(g1.size * sparsity)]
        q1, err1 = _prune_block(w1, u1, g1 <= thresh)
        wt = wt.at[:, i1:i2].set(q1)
        wt = wt.at[:, i2:].add(-(err1 @ u[i1:i2, i2:]))
    g = jnp.concatenate(blocks, axis=1)
    return (g.T, wt.T) if return_pruned else g.T


# ----------------------------------------------------------------------------- domain training


def _check_like(x: Any, like: Any, name: str, like_name: str) -> None:
    if jax.tree.structure(x) != jax.tree.structure(like):
        raise ValueError(f"`{name}` does not match the structure of `{like_name}`")
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(like)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"`{name}` has shape {np.shape(a)}, `{like_name}` has {np.shape(b)}")


def regularised_gradient(g: Any, G: Any, lr: float, lam: float = DPRUNER_LAMBDA) -> Any:
    """g' = g + lam * 2 * lr^2 * G * g^2 / 1000 (`lomo.py::fuse_update_zero3`, spec L571-573).

    The gradient of the paper's penalty lam * sum G (theta' - theta)^2 with theta' - theta =
    -lr g, up to the 1/1000, which is the code's constant and could not be checked against the
    paper. `g`, `G`: arrays (or pytrees) of one shape; the code applies it to the gradient
    before clipping by the global norm and before the SGD step (and, under fp16 loss scaling,
    to the still-scaled gradient). Computed in at least float32.
    """
    _check_like(G, g, "G", "g")
    return jax.tree.map(
        lambda gi, Gi: _f(gi) + lam * 2 * lr**2 * (_f(Gi) * _f(gi) ** 2) / 1000, g, G
    )


def _f(x: Any) -> jax.Array:
    return jnp.asarray(x, _float(x))


def dual_importance_step(importance: Any, g_reg: Any, theta: Any) -> Any:
    """I + | g' theta + (g' theta)^2 / 2000 + theta^3 | per element (`lomo.py`, spec L574-577),
    with g' = `regularised_gradient` and theta the weights before that step's update.

    As written in the code: the paper describes a second-order Taylor estimate with an
    empirical-Fisher Hessian; the 1/2000 and the cubic term theta^3 are the code's and could not
    be checked against the paper. Start from `importance` = zeros of the kernel's shape.
    """
    _check_like(g_reg, importance, "g_reg", "importance")
    _check_like(theta, importance, "theta", "importance")

    def step(i, g, t):
        gt = _f(g) * _f(t)
        return _f(i) + jnp.abs(gt + gt**2 / 2000 + _f(t) ** 3)

    return jax.tree.map(step, importance, g_reg, theta)


# ----------------------------------------------------------------------------- pruning


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.number)):
        raise TypeError(f"`sparsity` must be a number in (0, 1), got {sparsity!r}")
    if not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"`sparsity` must be in (0, 1), got {sparsity!r}")
    return float(sparsity)


def percentile_prune_mask(
    importance: jax.Array, sparsity: float = DPRUNER_SPARSITY, *, block: int | None = None
) -> jax.Array:
    """False (pruned) where importance <= threshold, threshold = the `sparsity` quantile of the
    matrix with linear interpolation (`np.percentile(I, 52)` default, = `torch.quantile`'s
    default); ties at the threshold are pruned (the code's `<=`).

    `block`: thresholds per block of `block` input rows of the kernel [d_in, d_out] (the code's
    input columns; the last block may be shorter), as `save_model_iterative.py`, which uses
    blocks of 128 for d_in = 4096 and of 344 for down_proj (d_in = 11008): 32 blocks each.
    """
    sparsity = _check_sparsity(sparsity)
    imp = jnp.asarray(importance)
    if imp.ndim == 0:
        raise ValueError("`importance` must have at least one axis")
    if block is not None and (not isinstance(block, (int, np.integer)) or block < 1):
        raise ValueError(f"`block` must be a positive int or None, got {block!r}")
    imp = imp.astype(_float(imp))
    if block is None:
        return imp > jnp.quantile(imp, sparsity, method="linear")
    parts = [
        imp[i : i + block] > jnp.quantile(imp[i : i + block], sparsity, method="linear")
        for i in range(0, imp.shape[0], block)
    ]
    return jnp.concatenate(parts, axis=0)


def is_llama_projection(path: str) -> bool:
    """True for the kernels of the seven pruned maps: `.../layers/<i>/self_attn/{q,k,v,o}_proj/
    kernel` and `.../layers/<i>/mlp/{gate,up,down}_proj/kernel`."""
    parts = path.split("/")
    if len(parts) < 5 or parts[-1] != "kernel" or parts[-2] not in LLAMA_PROJECTIONS:
        return False
    group = "mlp" if parts[-2] in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return parts[-3] == group and parts[-4].isdigit() and parts[-5] == "layers"


def _kernels(params: Any) -> dict[str, Any]:
    return {path_string(p): leaf for p, leaf in jtu.tree_flatten_with_path(params)[0]}


def _check_masks(params: Any, masks: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(masks, Mapping):
        raise TypeError("`masks` must map parameter paths (`path_string`) to bool arrays")
    leaves = _kernels(params)
    for key, m in masks.items():
        if key not in leaves:
            raise ValueError(f"`masks` key {key!r} is not a parameter path of `params`")
        if not is_llama_projection(key):
            raise ValueError(f"`masks` key {key!r} is not one of the seven Llama projections")
        if np.shape(m) != np.shape(leaves[key]):
            raise ValueError(
                f"`masks` {key!r} has shape {np.shape(m)}, the parameter {np.shape(leaves[key])}"
            )
    return leaves


def prune_llama_params(params: Any, masks: Mapping[str, Any]) -> Any:
    """`params` with the kernels named in `masks` (`path_string` -> bool, False = pruned) set to
    0 where the mask is False; everything else (embeddings, norms, LM head, biases, unnamed
    kernels) is returned unchanged. Only the seven projection kernels may be named. Prune the
    original weights, not the domain-trained ones (`save_model.py`).

    Example:
      >>> p = {"layers": [{"mlp": {"up_proj": {"kernel": jnp.ones((2, 1))}}}]}
      >>> m = {"layers/0/mlp/up_proj/kernel": jnp.array([[True], [False]])}
      >>> prune_llama_params(p, m)["layers"][0]["mlp"]["up_proj"]["kernel"].tolist()
      [[1.0], [0.0]]
    """
    _check_masks(params, masks)

    def prune(path, leaf):
        m = masks.get(path_string(path))
        if m is None:
            return leaf
        return jnp.where(jnp.asarray(m, bool), leaf, jnp.zeros((), jnp.result_type(leaf)))

    return jtu.tree_map_with_path(prune, params)


def sparsity_report(params: Any, masks: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fraction of zeros per projection kernel ("per_matrix": path -> fraction), over the seven
    projections ("projections") and over all parameters ("overall", the code's count of zeros
    over `model.parameters()`). With `masks`, the kernels are counted as `prune_llama_params`
    would leave them."""
    if masks is not None:
        params = prune_llama_params(params, masks)
    per, zp, np_, za, na = {}, 0, 0, 0, 0
    for key, leaf in _kernels(params).items():
        zeros, size = int(jnp.sum(jnp.asarray(leaf) == 0)), int(np.size(leaf))
        za, na = za + zeros, na + size
        if is_llama_projection(key):
            per[key] = zeros / size
            zp, np_ = zp + zeros, np_ + size
    return {
        "per_matrix": per,
        "projections": zp / np_ if np_ else 0.0,
        "overall": za / na if na else 0.0,
    }


__all__ = [
    "DPRUNER_LAMBDA",
    "DPRUNER_SPARSITY",
    "LLAMA_PROJECTIONS",
    "PERCDAMP",
    "HessianState",
    "dead_inputs",
    "dual_importance_step",
    "hessian_finalize",
    "hessian_from_inputs",
    "hessian_init",
    "hessian_update",
    "inverse_hessian_cholesky",
    "is_llama_projection",
    "kernel_from_torch",
    "obs_importance",
    "percentile_prune_mask",
    "prune_llama_params",
    "regularised_gradient",
    "sparsity_report",
    "torch_from_kernel",
]
