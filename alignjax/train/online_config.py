"""The `online:` section of a run config (`task: online`): which on-policy method, how completions
are sampled and scored, and the method's hyperparameters, with TRL 1.16's defaults.

    alignjax train task=online online.method=grpo data.train=prompts.jsonl online.beta=0.04
    alignjax train task=online online.method=sppo data.train=prompts.jsonl online.iterations=3 \
        steps=100 online.beta=0.001

The on-policy step methods (`STEP_METHODS`: grpo, rloo, reinforce_kl, online_dpo, xpo,
nash_md) sample and train at every step (`train.online`). The iterative methods
(`ITERATIVE_METHODS`: iterative_dpo, sppo, cream) run `alignjax.online.run_iterative`
(`train.iterative_task`): `online.iterations` rounds of sample K per prompt -> score -> pairs
-> an offline run of `steps` steps (steps PER ITERATION).

Keys left None take the method's TRL default (`DEFAULTS`, `OnlineConfig.resolved`):

| key             | grpo      | rloo  | reinforce_kl | online_dpo | xpo       | nash_md   |
|-----------------|-----------|-------|--------------|------------|-----------|-----------|
| num_generations | 8         | 2     | 2            | 2 (fixed)  | 2 (fixed) | 2 (fixed) |
| max_new_tokens  | 512       | 512   | 64           | 64         | 64        | 64        |
| temperature     | 1.0       | 1.0   | 1.0          | 0.9        | 0.9       | 0.9       |
| beta            | 0.0       | 0.05  | 0.05         | 0.1        | 0.1       | 0.1       |
| loss_type       | dapo      | -     | -            | sigmoid    | sigmoid   | -         |
| alpha           | -         | -     | -            | -          | 1e-5      | -         |
| mixture_coef    | -         | -     | -            | -          | -         | 0.5       |

(GRPOConfig, RLOOConfig, OnlineDPOConfig; XPOConfig and NashMDConfig of TRL's git snapshot
@ f2cd5771, which inherit OnlineDPOConfig's; GRPO's beta 0 keeps no reference at all.) The pair
methods (`PAIR_METHODS`) sample two completions per prompt: online_dpo two from the policy, xpo
one from the policy and one from the frozen reference, nash_md one from the policy and one from
the geometric mixture of the policy and the reference (`online.mixture_coef`).

`data.batch_size` counts completions per optimizer step, as TRL GRPO's generation batch
(`per_device_train_batch_size` x processes x accumulation): each step samples
`data.batch_size / num_generations` prompts `num_generations` times. (TRL's Online DPO counts
prompts instead; here its batch of P prompts is `data.batch_size = 2 P`.)

Iterative methods read their keys as `IterativeConfig` fields (None: `IterativeConfig`'s
default; K, temperature and top_p: the recipe's, `alignjax.online.iterative.DEFAULTS`):
`num_generations` = K samples per prompt, `temperature`, `top_p` (1.0: no filtering),
`max_new_tokens`, `rewards` / `reward_weights` / `missing_eos_penalty` (the scorer of
iterative_dpo and sppo; cream's judge is the policy, its `rewards` are only reported),
`iterations`, `disjoint_prompts`, `prompt_length`, `rollout_batch`, `tau` (sppo),
`cream_strategy`, `cream_base` (cream), `gold_rewards` (reported, never trained on; None:
`rewards`), `eval_samples_per_prompt`, `eval_temperature`; `online.beta` is each iteration's
loss beta (None: the paired task's default; SPPO's recipe uses 0.001). `ONLY_FOR` lists which
methods read which keys: a key set to anything but its default for a method that does not read
it is an error.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "OnlineConfig",
    "METHODS",
    "STEP_METHODS",
    "PAIR_METHODS",
    "ITERATIVE_METHODS",
    "DEFAULTS",
    "ONLY_FOR",
    "validate_online",
    "needs_reference",
]

STEP_METHODS = ("grpo", "rloo", "reinforce_kl", "online_dpo", "xpo", "nash_md")
# two completions per prompt in two halves, [policy samples; second samples] (`layout`)
PAIR_METHODS = ("online_dpo", "xpo", "nash_md")
# `alignjax.online.iterative.METHODS` (not imported here: it loads the data stack)
ITERATIVE_METHODS = ("iterative_dpo", "sppo", "cream")
METHODS = STEP_METHODS + ITERATIVE_METHODS
DEFAULTS = {
    "grpo": dict(num_generations=8, max_new_tokens=512, temperature=1.0, beta=0.0,
                 loss_type="dapo"),
    "rloo": dict(num_generations=2, max_new_tokens=512, temperature=1.0, beta=0.05),
    "reinforce_kl": dict(num_generations=2, max_new_tokens=64, temperature=1.0, beta=0.05),
    "online_dpo": dict(num_generations=2, max_new_tokens=64, temperature=0.9, beta=0.1,
                       loss_type="sigmoid"),
    "xpo": dict(num_generations=2, max_new_tokens=64, temperature=0.9, beta=0.1,
                loss_type="sigmoid", alpha=1e-5),
    "nash_md": dict(num_generations=2, max_new_tokens=64, temperature=0.9, beta=0.1,
                    mixture_coef=0.5),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """On-policy training (`task: online`): every step samples completions of a batch of prompts
    with the policy, scores them with reward functions, and trains on them (`train.online`).

    The iterative methods instead run `online.iterations` rounds of sample -> score -> pairs ->
    offline training (`train.iterative_task`; their keys: the module docstring).

    Attributes:
      method: "grpo", "rloo", "reinforce_kl" (REINFORCE with the KL in the reward and a
        leave-one-out baseline, Korbak et al. 2022), "online_dpo", "xpo" (Online DPO against
        the reference's sample plus an exploration bonus) or "nash_md" (against a sample of
        the policy-reference geometric mixture); or an iterative method, "iterative_dpo",
        "sppo" or "cream".
      num_generations, max_new_tokens, temperature, beta, loss_type: None = the method's TRL
        default (module table).
      top_k, top_p: sampling filters (None: off, TRL's 0 / 1.0).
      stop_tokens: ids ending a completion; None: the tokenizer's EOS ([]: none).
      rewards: reward function names (`online.REWARDS`; a module in `imports` may register
        more), dotted import paths, or `reward_model:<path>` for a reward model trained by
        alignjax (`online.rewards` module docstring), called as TRL calls them:
        `fn(prompts, completions, completion_ids=..., **columns)` with the dataset's other
        columns; `reward_weights` (None: all 1).
      missing_eos_penalty: subtracted from the reward of a completion without a stop token.
      scale_rewards: GRPO's "group" / "batch" / "none".
      epsilon, epsilon_high: the clipped ratio's bounds (epsilon_high None: epsilon).
      delta: GRPO's two-sided clip (INTELLECT-2), None: off.
      importance_sampling_level: GRPO "token" or "sequence" (GSPO).
      use_bias_correction_kl: GRPO's k3 KL times the ratio (TRL 1.16's default).
      normalize_advantages, reward_clip_range: RLOO's options.
      baseline: REINFORCE's "loo" (leave-one-out mean within a prompt's samples) or None.
      num_iterations: mu, optimizer steps on each batch of rollouts (1: on-policy); the later
        ones use the sampler's log-probs at the temperature as the old policy's.
      log_samples: completions written to `rollouts.jsonl` every `log_every` steps (0: none).
      alpha: XPO's exploration weight (>= 0; None: 1e-5); only for xpo.
      mixture_coef: Nash-MD's c in [0, 1], the reference's share of the mixture's logits
        (None: 0.5); only for nash_md.
      iterations, disjoint_prompts, prompt_length, rollout_batch, tau, cream_strategy,
        cream_base, eval_samples_per_prompt, eval_temperature: the iterative methods'
        `IterativeConfig` fields of the same names (None: its default).
      gold_rewards: reward function names reported by the iterative methods, never trained on
        (`IterativeConfig.gold`; None: `rewards`).
    """

    method: str = "grpo"
    num_generations: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] | None = None
    rewards: tuple[str, ...] = ("sentiment",)
    reward_weights: tuple[float, ...] | None = None
    missing_eos_penalty: float | None = None
    scale_rewards: str = "group"
    loss_type: str | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    beta: float | None = None
    use_bias_correction_kl: bool = True
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, float] | None = None
    baseline: str | None = "loo"
    num_iterations: int = 1
    log_samples: int = 4
    iterations: int | None = None
    disjoint_prompts: bool | None = None
    prompt_length: int | None = None
    rollout_batch: int | None = None
    tau: float | None = None
    cream_strategy: str | None = None
    cream_base: str | None = None
    gold_rewards: tuple[str, ...] | None = None
    eval_samples_per_prompt: int | None = None
    eval_temperature: float | None = None
    alpha: float | None = None
    mixture_coef: float | None = None

    def resolved(self) -> OnlineConfig:
        """A copy with every None default filled in from the method's column of `DEFAULTS` (a
        step method; an iterative method's defaults are `IterativeConfig`'s)."""
        if self.method not in METHODS:
            raise ValueError(f"`online.method` must be one of {list(METHODS)}, got {self.method!r}")
        if self.method in ITERATIVE_METHODS:
            raise ValueError(f"online.method={self.method!r} runs `online.run_iterative` "
                             "(train.iterative_task.iterative_config), not the online "
                             "step")  # fmt: skip
        fill = {k: v for k, v in DEFAULTS[self.method].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    @property
    def layout(self) -> str:
        """The rollout's row layout: TRL Online DPO's two halves (the pair methods), else
        groups of G."""
        return "halves" if self.method in PAIR_METHODS else "grouped"


_REWARDED = (*STEP_METHODS, "iterative_dpo", "sppo")  # methods that train on `rewards`
# Which methods read a key; with any other method, a value other than the field's default is an
# error naming the key (never silently ignored).
ONLY_FOR = {
    **dict.fromkeys(("top_k", "stop_tokens", "scale_rewards", "loss_type", "epsilon",
                     "epsilon_high", "delta", "importance_sampling_level",
                     "use_bias_correction_kl", "normalize_advantages", "reward_clip_range",
                     "baseline", "num_iterations", "log_samples"), STEP_METHODS),
    **dict.fromkeys(("iterations", "disjoint_prompts", "prompt_length", "rollout_batch",
                     "gold_rewards", "eval_samples_per_prompt", "eval_temperature"),
                    ITERATIVE_METHODS),
    "tau": ("sppo",),
    "cream_strategy": ("cream",),
    "cream_base": ("cream",),
    "reward_weights": _REWARDED,
    "missing_eos_penalty": _REWARDED,
    "alpha": ("xpo",),
    "mixture_coef": ("nash_md",),
}  # fmt: skip


def needs_reference(o: OnlineConfig) -> bool:
    """Whether the method reads reference log-probs (a resolved config)."""
    return o.method in PAIR_METHODS or o.beta != 0


def _positive(key: str, value, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else True
    if not ok or not value > 0:
        kind = "a positive int" if integer else "> 0"
        raise ValueError(f"`{key}` must be {kind}, got {value!r}")


def validate_online(cfg) -> None:
    """`task: online`'s keys against each other and the rest of the run (a ValueError names the
    key). Reward names are checked (`online.rewards.check_reward`) after `imports` ran."""
    from alignjax.losses.advantages import SCALE_REWARDS
    from alignjax.losses.online_dpo import ONLINE_DPO_LOSS_TYPES
    from alignjax.losses.policy_gradient import IS_LEVELS, LOSS_TYPES

    method = cfg.online.method
    if method not in METHODS:
        raise ValueError(f"`online.method` must be one of {list(METHODS)}, got {method!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(OnlineConfig)}
    for key, methods in ONLY_FOR.items():
        value = getattr(cfg.online, key)
        if method not in methods and value != defaults[key]:
            hint = "; the loss is `loss.name`" if key == "loss_type" else ""
            raise ValueError(f"`online.{key}`={value!r} means nothing for online.method="
                             f"{method!r} (read by {list(methods)}): leave it unset"
                             f"{hint}")  # fmt: skip
    if method in ITERATIVE_METHODS:
        _validate_iterative(cfg)
        return
    o = cfg.online.resolved()
    g = o.num_generations
    _positive("online.num_generations", g, integer=True)
    if o.method in PAIR_METHODS and g != 2:
        raise ValueError(f"`online.num_generations` is 2 for {o.method} (a pair per prompt), "
                         f"got {g}")  # fmt: skip
    if g < 2:
        raise ValueError(f"`online.num_generations` must be >= 2 (a baseline needs siblings), "
                         f"got {g}")  # fmt: skip
    _positive("online.max_new_tokens", o.max_new_tokens, integer=True)
    _positive("online.temperature", o.temperature)
    _positive("online.top_k", o.top_k, integer=True, allow_none=True)
    if o.top_p is not None and not 0 < o.top_p <= 1:
        raise ValueError(f"`online.top_p` must be in (0, 1], got {o.top_p}")
    _positive("online.epsilon", o.epsilon)
    _positive("online.epsilon_high", o.epsilon_high, allow_none=True)
    _positive("online.delta", o.delta, allow_none=True)
    _positive("online.num_iterations", o.num_iterations, integer=True)
    if not o.beta >= 0:
        raise ValueError(f"`online.beta` must be >= 0, got {o.beta}")
    if o.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`online.scale_rewards` must be one of {list(SCALE_REWARDS)}, "
                         f"got {o.scale_rewards!r}")  # fmt: skip
    if o.importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"`online.importance_sampling_level` must be one of {list(IS_LEVELS)}, "
                         f"got {o.importance_sampling_level!r}")  # fmt: skip
    types = {"grpo": LOSS_TYPES, "online_dpo": ONLINE_DPO_LOSS_TYPES,
             "xpo": ONLINE_DPO_LOSS_TYPES}.get(o.method, (None,))  # fmt: skip
    if o.loss_type not in types:
        raise ValueError(f"`online.loss_type` for {o.method} must be one of {list(types)}, "
                         f"got {o.loss_type!r}")  # fmt: skip
    if o.baseline not in ("loo", None):
        raise ValueError(f"`online.baseline` must be 'loo' or null, got {o.baseline!r}")
    if o.method == "xpo" and not 0 <= o.alpha < float("inf"):
        raise ValueError(f"`online.alpha` must be >= 0, got {o.alpha}")
    if o.method == "nash_md" and not 0 <= o.mixture_coef <= 1:
        raise ValueError(f"`online.mixture_coef` must be in [0, 1], got {o.mixture_coef}")
    _check_rewards(o)
    _validate_run(cfg, o)


def _check_rewards(o: OnlineConfig) -> None:
    from alignjax.online.rewards import check_reward

    for key in ("rewards", "gold_rewards"):
        names = getattr(o, key)
        if names is None:
            continue
        if not names:
            raise ValueError(f"`online.{key}` is empty: name at least one reward function")
        for i, name in enumerate(names):
            try:
                check_reward(name)
            except ValueError as err:
                raise ValueError(f"`online.{key}[{i}]` {err}") from None
    if o.reward_weights is not None and len(o.reward_weights) != len(o.rewards):
        raise ValueError(f"`online.reward_weights` needs one weight per reward function "
                         f"({len(o.rewards)}), got {len(o.reward_weights)}")  # fmt: skip


def _validate_iterative(cfg) -> None:
    """An iterative method's keys (`ONLY_FOR` is checked already), then the per-iteration
    `task: paired` config it builds (`iterative_task.base_config`, validated as any run)."""
    from alignjax.online.iteration_data import CREAM_STRATEGIES
    from alignjax.train.iterative_task import base_config

    o = cfg.online
    if o.iterations is not None:
        _positive("online.iterations", o.iterations, integer=True)
    k = o.num_generations
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
        raise ValueError(f"`online.num_generations` (K samples per prompt) must be an int >= 2 "
                         f"(a pair), got {k!r}")  # fmt: skip
    for key in ("max_new_tokens", "prompt_length", "rollout_batch", "eval_samples_per_prompt"):
        _positive(f"online.{key}", getattr(o, key), integer=True, allow_none=True)
    for key in ("temperature", "eval_temperature", "tau"):
        _positive(f"online.{key}", getattr(o, key), allow_none=True)
    if o.top_p is not None and not 0 < o.top_p <= 1:
        raise ValueError(f"`online.top_p` must be in (0, 1], got {o.top_p}")
    if o.beta is not None and not o.beta >= 0:
        raise ValueError(f"`online.beta` must be >= 0, got {o.beta}")
    if o.cream_strategy is not None and o.cream_strategy not in CREAM_STRATEGIES:
        raise ValueError(f"`online.cream_strategy` must be one of {list(CREAM_STRATEGIES)}, "
                         f"got {o.cream_strategy!r}")  # fmt: skip
    default_rewards = OnlineConfig.__dataclass_fields__["rewards"].default
    if o.method == "cream" and o.gold_rewards is not None and o.rewards != default_rewards:
        raise ValueError("`online.rewards` means nothing for cream with `online.gold_rewards` "
                         "set (cream's judge is the policy; its rewards are only "
                         "reported): set one of them")  # fmt: skip
    _check_rewards(o)
    if cfg.loss.beta is not None:
        raise ValueError(f"task=online takes the beta of {o.method}'s loss as `online.beta`: "
                         "leave `loss.beta` unset")  # fmt: skip
    if cfg.data.format is not None:
        raise ValueError(f"`data.format`: {o.method} reads the prompt column of data.train / "
                         "data.eval and detects each iteration's pairs file; leave it "
                         "unset")  # fmt: skip
    base_config(cfg)


def _validate_run(cfg, o: OnlineConfig) -> None:
    """The online method against data, loss, reference, accumulation and checkpoints."""
    d, g, accum = cfg.data, o.num_generations, cfg.optim.grad_accum
    if d.batch_size % g:
        raise ValueError(f"`online.num_generations`={g} must divide `data.batch_size`="
                         f"{d.batch_size} (completions per step: data.batch_size / "
                         "num_generations prompts, each sampled num_generations "
                         "times)")  # fmt: skip
    prompts = d.batch_size // g
    if d.batch_size % accum or (o.method in PAIR_METHODS and prompts % accum):
        unit = "prompts (whole pairs)" if o.method in PAIR_METHODS else "completions"
        raise ValueError(f"`optim.grad_accum`={accum} must divide the step's {unit} "
                         f"(data.batch_size={d.batch_size}, "
                         f"online.num_generations={g})")  # fmt: skip
    if o.method == "reinforce_kl":
        if o.num_iterations != 1:
            raise ValueError("`online.num_iterations` must be 1 for reinforce_kl (on-policy)")
        if o.baseline == "loo" and (d.batch_size // accum) % g:
            raise ValueError(f"reinforce_kl's leave-one-out baseline needs whole groups per "
                             f"micro-batch: `optim.grad_accum`={accum} must divide the "
                             f"{prompts} prompts of a step")  # fmt: skip
    if d.packing:
        raise ValueError("`data.packing` does not apply to task=online (rollouts are padded rows)")
    loss = cfg.loss
    if loss.combine or loss.name not in (None, o.method) or loss.beta is not None:
        raise ValueError(f"task=online trains `online.method` ({o.method!r}) with `online.beta`: "
                         "leave loss.name / loss.combine / loss.beta unset (loss.kwargs adds "
                         "further keyword arguments of the loss)")  # fmt: skip
    ref = cfg.reference
    if needs_reference(o):
        if ref.mode not in ("frozen", "adapters_disabled"):
            raise ValueError(f"`reference.mode`={ref.mode!r}: {o.method} with beta="
                             f"{o.beta} reads reference log-probs, computed at every rollout: "
                             "use 'frozen' or 'adapters_disabled'")  # fmt: skip
        if ref.mode == "adapters_disabled" and cfg.peft.method is None:
            raise ValueError("reference.mode='adapters_disabled' needs adapters (set peft.method)")
        if ref.path is not None and cfg.peft.method is not None:
            raise ValueError("`reference.path` with PEFT is not supported by task=online")
    if ref.sync_every:
        raise ValueError("`reference.sync_every` (TR-DPO) is not supported by task=online")
    mu = o.num_iterations
    if mu > 1 and cfg.checkpoint.every % mu:
        raise ValueError(f"`checkpoint.every`={cfg.checkpoint.every} must be a multiple of "
                         f"`online.num_iterations`={mu}: a checkpoint inside a batch's "
                         "iterations could not resume it bitwise (its rollouts are not "
                         "saved)")  # fmt: skip
