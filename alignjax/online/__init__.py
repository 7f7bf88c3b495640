"""On-policy and iterative alignment: rollouts (sample -> masks, flags, sampling log-probs) and
scorers (reward functions, Bradley-Terry win rates, pair selection), SPPO's self-play step
and CREAM's consistency-weighted DPO.

    r = online.rollout(model, prompt_ids, prompt_mask, key, num_generations=8,
                       max_new_tokens=64, temperature=1.0, stop_tokens=(eos,))
    texts = online.decode_completions(tok, r.completion_ids, r.completion_mask)
    s = online.score([online.sentiment_reward], prompts, texts, missing_eos=r.missing_eos,
                     missing_eos_penalty=1.0)
    groups = online.by_prompt(s.total, 8)                     # [B, G] GRPO groups
    old_logps = r.logps                                       # = teacher_forced_logps(T)

Modules: `alignjax.online.rollout` (layouts, `Rollout`, `rollout`, `teacher_forced_logps`; the
package attribute `online.rollout` is the function) and `scorers` (`score`, `sentiment_reward`,
decoding, `bradley_terry_win_rates`, pair selection).
"""

from alignjax.online import iteration_data, iterative, phases, rewards, scorers
from alignjax.online.cream import (
    Consistency,
    PairSelection,
    consistency,
    cream_dpo,
    kendall_tau,
    pair_consistency,
    preference_pairs,
)
from alignjax.online.iteration_data import (
    Samples,
    best_worst_pairs,
    cream_pairs,
    cream_rewards,
    sppo_pairs,
)
from alignjax.online.iterative import (
    IterativeConfig,
    iteration_config,
    policy_source,
    prompt_splits,
    run_iterative,
)
from alignjax.online.phases import Phases, Sampling, data_step, default_phases
from alignjax.online.reward_model import load_reward_model, reward_model_scorer
from alignjax.online.rewards import REWARDS, get_reward, register_reward
from alignjax.online.rollout import (
    LAYOUTS,
    Rollout,
    by_prompt,
    repeat_prompts,
    rollout,
    row_indices,
    teacher_forced_logps,
)
from alignjax.online.scorers import (
    PairIndex,
    Scores,
    bradley_terry_win_rates,
    decode_completions,
    decode_prompts,
    first_second_pairs,
    max_min_pairs,
    reward_function_name,
    score,
    sentiment_reward,
    win_rate_vs_policy,
)
from alignjax.online.selfplay import (
    SPPOTargets,
    exploitability,
    multiplicative_weights_step,
    policy_win_rates,
    sppo_tabular,
    sppo_targets,
    tabular_sppo_fit,
)

__all__ = [
    # rollouts
    "LAYOUTS",
    "Rollout",
    "by_prompt",
    "repeat_prompts",
    "rollout",
    "row_indices",
    "teacher_forced_logps",
    # scorers and the reward functions by name (configs' `online.rewards`)
    "scorers",
    "rewards",
    "REWARDS",
    "reward_model_scorer",
    "load_reward_model",
    "get_reward",
    "register_reward",
    "PairIndex",
    "Scores",
    "bradley_terry_win_rates",
    "decode_completions",
    "decode_prompts",
    "first_second_pairs",
    "max_min_pairs",
    "reward_function_name",
    "score",
    "sentiment_reward",
    "win_rate_vs_policy",
    # SPPO self-play: the data step and the tabular game
    "SPPOTargets",
    "exploitability",
    "multiplicative_weights_step",
    "policy_win_rates",
    "sppo_tabular",
    "sppo_targets",
    "tabular_sppo_fit",
    # CREAM: consistency and its DPO loss
    "Consistency",
    "PairSelection",
    "consistency",
    "cream_dpo",
    "kendall_tau",
    "pair_consistency",
    "preference_pairs",
    # iterative methods: iterative DPO, SPPO's self-play loop, CREAM (a driver over phases;
    # `alignjax.online.cream_loss`, the registered "cream" loss, is imported by CREAM runs only)
    "iteration_data",
    "iterative",
    "phases",
    "IterativeConfig",
    "iteration_config",
    "policy_source",
    "prompt_splits",
    "run_iterative",
    "Phases",
    "Samples",
    "Sampling",
    "data_step",
    "default_phases",
    "best_worst_pairs",
    "cream_pairs",
    "cream_rewards",
    "sppo_pairs",
]
