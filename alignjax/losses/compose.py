"""The loss registry and weighted combinations.

`get(name)` returns a loss `(batch, **hyperparameters) -> LossOutput` by its TRL `loss_type`
name (or the paper's name where TRL has none), taking TRL's keyword spellings too
(`f_divergence_type`, `f_alpha_divergence_coef`: `TRL_ALIASES`); `available()` lists the
names; `register(name, fn)` adds a user-written loss. `combine([(name_or_fn, weight), ...])`
builds one loss from several: the unreduced terms are kept side by side (so accumulation stays
exact), per-example losses add with their weights, rewards come from the first term that
defines them, and every term's metrics are kept (prefixed by the term name when two terms log
the same key).

Example (MPO, TRL's recipe):
    >>> from alignjax.losses import combine
    >>> mpo = combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence

import jax.numpy as jnp

from alignjax.losses import dpo as _dpo
from alignjax.losses import online as _online
from alignjax.losses import reference_free as _rf
from alignjax.losses import reward as _reward
from alignjax.losses import sppo as _sppo
from alignjax.losses import token as _token
from alignjax.losses import unlearn as _unlearn
from alignjax.losses import unpaired as _unpaired
from alignjax.losses.needs import LossNeeds, merge_needs
from alignjax.losses.policy_gradient import grpo_loss as _grpo
from alignjax.losses.policy_gradient import rloo_loss as _rloo
from alignjax.losses.sft import sft as _sft
from alignjax.losses.sparse_mask import SparsePOMasks
from alignjax.losses.types import LossOutput, LossTerm

LossFn = Callable[..., LossOutput]
_REGISTRY: dict[str, LossFn] = {}
_NEEDS: dict[str, LossNeeds] = {}

# TRL's keyword spellings -> ours (`DPOConfig.f_divergence_type` / `f_alpha_divergence_coef`)
TRL_ALIASES = {"f_divergence_type": "f_divergence", "f_alpha_divergence_coef": "f_alpha"}


def _with_aliases(fn: LossFn) -> LossFn:
    """`fn` also taking TRL's keyword names (`TRL_ALIASES`) for the hyperparameters it has;
    giving both spellings of one is an error."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    aliases = {
        a: ours
        for a, ours in TRL_ALIASES.items()
        if ours in sig.parameters and a not in sig.parameters  # not already aliased
    }
    if not aliases:
        return fn

    @functools.wraps(fn)
    def aliased(batch, *args, **kwargs):
        for alias, ours in aliases.items():
            if alias in kwargs:
                if ours in kwargs:
                    raise TypeError(f"give `{ours}` or its TRL spelling `{alias}`, not both")
                kwargs[ours] = kwargs.pop(alias)
        return fn(batch, *args, **kwargs)

    extra = [inspect.Parameter(a, inspect.Parameter.KEYWORD_ONLY, default=None) for a in aliases]
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    aliased.__signature__ = sig.replace(parameters=params)
    if hasattr(fn, "loss_needs"):
        aliased.loss_needs = fn.loss_needs
    return aliased


def register(
    name: str, fn: LossFn, *, needs: LossNeeds | None = None, overwrite: bool = False
) -> LossFn:
    """Make `fn` reachable as `get(name)`, with what it needs from the training step
    (`LossNeeds`; default: a paired loss on reference log-probs, like DPO)."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"loss {name!r} is already registered; pass overwrite=True to replace it")
    if needs is not None and not isinstance(needs, LossNeeds):
        raise TypeError(f"`needs` must be a LossNeeds, got {type(needs).__name__}")
    _REGISTRY[name] = _with_aliases(fn)
    _NEEDS[name] = needs if needs is not None else getattr(fn, "loss_needs", LossNeeds())
    return _REGISTRY[name]


def available() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> LossFn:
    """The registered loss called `name`; a ValueError lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {available()}") from None


def needs_of(loss: str | LossFn) -> LossNeeds:
    """What a loss needs from the step: a registered name's `LossNeeds`, a function's
    `loss_needs` attribute (set by `combine`, or by hand), the record of a registered function,
    else the default (paired, reference log-probs)."""
    if isinstance(loss, str):
        get(loss)
        return _NEEDS[loss]
    found = getattr(loss, "loss_needs", None)
    if found is not None:
        return found
    for name, fn in _REGISTRY.items():
        if fn is loss or getattr(fn, "__wrapped__", None) is loss:
            return _NEEDS[name]
    return LossNeeds()


def _accepts(fn: LossFn, key: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def combine(parts: Sequence[tuple[str | LossFn, float]], **shared) -> LossFn:
    """sum_k w_k * loss_k as one loss. Each hyperparameter in `shared` (or given at call time)
    goes to every part whose signature accepts it; one that no part accepts is an error."""
    if not parts:
        raise ValueError("`parts` must name at least one loss")
    resolved = []
    for spec, weight in parts:
        fn = get(spec) if isinstance(spec, str) else spec
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", "custom")
        resolved.append((name, fn, float(weight)))

    def route(kwargs):
        routed = [{k: v for k, v in kwargs.items() if _accepts(fn, k)} for _, fn, _ in resolved]
        unused = set(kwargs) - set().union(*routed)
        if unused:
            raise ValueError(
                f"hyperparameters {sorted(unused)} are accepted by none of "
                f"{[name for name, _, _ in resolved]}"
            )
        return routed

    route(shared)  # fail at construction time on a typo

    def combined(batch, **kwargs) -> LossOutput:
        routed = route({**shared, **kwargs})
        outs = [(name, fn(batch, **kw), w) for (name, fn, w), kw in zip(resolved, routed)]
        terms, metrics = {}, {}
        for name, out, w in outs:
            for key, term in out.terms.items():
                key = key if key not in terms else f"{name}/{key}"
                terms[key] = LossTerm(term.total, term.count, term.weight * w)
            for key, value in out.metrics.items():
                metrics[key if key not in metrics else f"{name}/{key}"] = value
        losses = sum(w * out.losses for _, out, w in outs)
        rewarded = [out for name, out, _ in outs if name != "sft"] or [outs[0][1]]
        metrics.update({f"loss/{n}": jnp.mean(o.losses) for n, o, _ in outs})
        return LossOutput(
            terms=terms,
            losses=losses,
            chosen_rewards=rewarded[0].chosen_rewards,
            rejected_rewards=rewarded[0].rejected_rewards,
            metrics=metrics,
        )

    combined.loss_needs = merge_needs([needs_of(fn) for _, fn, _ in resolved])
    return combined


_FREE = LossNeeds(reference=False)
for _name in _dpo.FORMULAS:
    register(_name, functools.partial(_dpo.dpo, loss_type=_name))
register("sft", _sft, needs=LossNeeds(tasks=("sft", "paired"), reference=False))
register("cpo", _rf.cpo, needs=_FREE)
register("simpo", functools.partial(_rf.cpo, loss_type="simpo", cpo_alpha=0.0), needs=_FREE)
register("orpo", _rf.orpo, needs=_FREE)
register("sppo", _sppo.sppo)
register("sppo_single", _sppo.sppo_single)
register("tdpo1", functools.partial(_token.tdpo, version=1), needs=LossNeeds(kl=True))
register("tdpo2", functools.partial(_token.tdpo, version=2), needs=LossNeeds(kl=True))
register("sparsepo", _token.sparsepo, needs=LossNeeds(kl=True, masks=SparsePOMasks()))
register("mapo", _token.mapo, needs=LossNeeds(kl=True, masks=_token.MaPOMasks()))
register("token_constrained_sft", _token.token_constrained_sft,
         needs=LossNeeds(tasks=("sft", "paired")))  # fmt: skip
_UNPAIRED = LossNeeds(tasks=("unpaired",))
register("kto", _unpaired.kto, needs=_UNPAIRED)
register("bco", _unpaired.bco, needs=LossNeeds(tasks=("unpaired",), state=_unpaired.BCO_MOMENTS))
register("apo_zero_unpaired", functools.partial(_unpaired.kto, loss_type="apo_zero_unpaired"),
         needs=_UNPAIRED)  # fmt: skip


def _unlearn_needs(reference: bool, default_retain: str | None) -> LossNeeds:
    """An unlearning loss's needs: `retain="kl"` reads the per-token KL(ref || policy) on the
    retain rows (so the reference runs in the step)."""
    base = LossNeeds(tasks=("unlearn",), reference=reference)
    with_kl = dataclasses.replace(base, kl=True)

    def depends(kwargs):
        return with_kl if kwargs.get("retain", default_retain) == "kl" else base

    return dataclasses.replace(base, depends=depends)


register("grad_ascent", _unlearn.grad_ascent, needs=_unlearn_needs(False, None))
register("grad_diff", _unlearn.grad_diff, needs=_unlearn_needs(False, "nll"))
register("npo", _unlearn.npo, needs=_unlearn_needs(True, "nll"))
register("simnpo", _unlearn.simnpo, needs=_unlearn_needs(False, "nll"))
# On-policy losses on a batch of scored rollouts (task online; `losses.online`)
register("grpo", _grpo, needs=_online.ONLINE_NEEDS["grpo"])
register("rloo", _rloo, needs=_online.ONLINE_NEEDS["rloo"])
register("reinforce_kl", _online.reinforce_kl, needs=_online.ONLINE_NEEDS["reinforce_kl"])
register("online_dpo", _online.online_dpo, needs=_online.ONLINE_NEEDS["online_dpo"])
register("xpo", _online.xpo, needs=_online.ONLINE_NEEDS["xpo"])
register("nash_md", _online.nash_md, needs=_online.ONLINE_NEEDS["nash_md"])
# The reward model's Bradley-Terry loss on scalar scores (task reward; `losses.reward`)
register("reward", _reward.reward_loss, needs=LossNeeds(tasks=("reward",), reference=False))
