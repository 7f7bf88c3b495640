"""Reward functions by name, for configs (`online.rewards: [sentiment]`).

A reward function has TRL's signature `fn(prompts, completions, **kwargs) -> list[float | None]`
(see `scorers.score`); the trainer passes `completion_ids` and the dataset's other columns as
keyword arguments, so a function should accept `**kwargs`. Register your own in a module that
the run's `imports` lists:

    >>> from alignjax import online
    >>> def has_digit(prompts, completions, **kwargs):
    ...     return [float(any(c.isdigit() for c in text)) for text in completions]
    >>> _ = online.register_reward("has_digit", has_digit)
    >>> online.get_reward("has_digit") is has_digit
    True
"""

from __future__ import annotations

from collections.abc import Callable

from alignjax.online.scorers import sentiment_reward

__all__ = ["REWARDS", "register_reward", "get_reward"]

REWARDS: dict[str, Callable] = {"sentiment": sentiment_reward}


def register_reward(name: str, fn: Callable, *, overwrite: bool = False) -> Callable:
    """Make `fn` reachable as `online.rewards: [name]` in a config; returns `fn`."""
    if not callable(fn):
        raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
    if name in REWARDS and not overwrite and REWARDS[name] is not fn:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True")
    REWARDS[name] = fn
    return fn


def get_reward(name: str) -> Callable:
    """The reward function registered as `name`; a ValueError lists the names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None
