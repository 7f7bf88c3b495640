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

Two more kinds of name, as `trl grpo` takes them (`reward_funcs`, `reward_model_name_or_path`):

- a dotted import path, `my_lib.rewards.custom_reward` (imported with the working directory on
  `sys.path`, as TRL's scripts do);
- `reward_model:<path>`, a reward model trained by alignjax (`task: reward`; a run directory or
  its `export/merged`), scored by `reward_model.reward_model_scorer`. It is loaded when the run
  starts; the config check only looks for its files.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from alignjax.online.scorers import sentiment_reward

__all__ = ["REWARDS", "REWARD_MODEL_PREFIX", "register_reward", "get_reward", "check_reward"]

REWARDS: dict[str, Callable] = {"sentiment": sentiment_reward}
REWARD_MODEL_PREFIX = "reward_model:"


def register_reward(name: str, fn: Callable, *, overwrite: bool = False) -> Callable:
    """Make `fn` reachable as `online.rewards: [name]` in a config; returns `fn`."""
    if not callable(fn):
        raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
    if name in REWARDS and not overwrite and REWARDS[name] is not fn:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True")
    REWARDS[name] = fn
    return fn


def _imported(name: str) -> Callable:
    module_name, _, attr = name.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{name!r} is neither a registered reward function nor an importable "
                         f"one ({err}); registered: {sorted(REWARDS)}") from None  # fmt: skip
    if not callable(fn):
        raise ValueError(f"{name!r} is not callable")
    return fn


def check_reward(name: str) -> None:
    """A ValueError naming the problem if `name` would not resolve (see the module docstring);
    nothing is loaded (a reward model's files are only looked for)."""
    if name in REWARDS:
        return
    if name.startswith(REWARD_MODEL_PREFIX):
        from alignjax.online.reward_model import _export_dir

        try:
            _export_dir(name[len(REWARD_MODEL_PREFIX) :])
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        return
    if "." in name.strip("."):
        _imported(name)
        return
    raise ValueError(f"{name!r} is not a registered reward function; available: "
                     f"{sorted(REWARDS)} (register more with online.register_reward in a module "
                     "listed in `imports`, or give a dotted import path)")  # fmt: skip


def get_reward(name: str) -> Callable:
    """The reward function `name` stands for (module docstring); a ValueError otherwise."""
    if name in REWARDS:
        return REWARDS[name]
    if name.startswith(REWARD_MODEL_PREFIX):
        from alignjax.online.reward_model import reward_model_scorer

        return reward_model_scorer(name[len(REWARD_MODEL_PREFIX) :])
    if "." in name.strip("."):
        return _imported(name)
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
