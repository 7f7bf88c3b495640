"""The study's on-policy rows: GRPO with KL, RLOO, online DPO (`task: online`), iterative DPO and
SPPO's self-play loop (`online.run_iterative`, 3 iterations), each scored by the gold reward or
by a reward model trained on the study's own pairs (`task: reward`).

Budget. The offline runs see 100 steps x 16 pairs = 3200 sequences. The on-policy runs get the
same count: GRPO / RLOO / online DPO train 100 steps on 32 completions each (GRPO and RLOO: 8
prompts x G = 4 samples; online DPO: 16 prompts x 2), sampled by the policy being trained at
temperature 1 with the study's completion budget (40 tokens); iterative DPO and SPPO run 3
iterations of 33 steps x 16 pairs, each iteration sampling K = 4 completions of every training
prompt from the current policy (at temperature 1, top-p off: the distribution whose KL is
measured) and training against it as the frozen reference. Same optimizer and schedule as the
offline rows (AdamW 1e-3, cosine, warm-up). The KL on the frontier is always to the SFT
reference, never to the last iterate.

Scorers. "gold": the lexicon balance itself (`online.sentiment_reward`, what the evaluation
measures), noise-free; the offline rows instead learn from Bradley-Terry labels drawn from it
(15% against the gold order), so gold-scored on-policy rows have strictly more information.
"rm": a value head on the SFT model trained on the study's train pairs (the noisy labels the
offline rows see; TRL RewardTrainer's loss) and registered as the reward function "study_rm":
the like-for-like comparison. Iterative DPO takes best-vs-worst of the K samples by the score;
SPPO turns the K scores into Bradley-Terry win rates with tau = 1 (the labels' own model,
`compute_prob.py`'s role).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from alignjax import online
from alignjax.train import config as C
from alignjax.train import trainer

__all__ = [
    "ONLINE_METHODS",
    "ITERATIVE_METHODS",
    "RM_REWARD",
    "online_config",
    "reward_model_config",
    "train_reward_model",
    "iterative_run",
]

ONLINE_METHODS = ("grpo", "rloo", "online_dpo")  # task: online
ITERATIVE_METHODS = ("iterative_dpo", "sppo")  # online.run_iterative
RM_REWARD = "study_rm"  # the registered name of the study's reward model
GENERATIONS = {"grpo": 4, "rloo": 4, "online_dpo": 2}
ITERATIONS = 3


def _reward_name(scorer: str) -> str:
    if scorer == "gold":
        return "sentiment"
    if scorer == "rm":
        if RM_REWARD not in online.REWARDS:
            raise RuntimeError("the study's reward model is not trained yet (train_reward_model)")
        return RM_REWARD
    raise ValueError(f"scorer must be 'gold' or 'rm', got {scorer!r}")


def online_config(
    method: str,
    beta: float,
    out_dir: Path,
    *,
    scorer: str,
    sft_dir: Path,
    prompts: Path,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    max_new_tokens: int,
    prompt_length: int,
) -> C.TrainConfig:
    """A `task: online` run of `method` (grpo / rloo / online_dpo) from the SFT policy, with
    `2 * batch_size` completions per step (the offline rows' sequences per step), KL weight
    `beta` to the frozen SFT reference (GRPO: the k3 estimator in the loss; RLOO: in the
    reward; online DPO: its beta)."""
    if method not in ONLINE_METHODS:
        raise ValueError(f"method must be one of {ONLINE_METHODS}, got {method!r}")
    return C.TrainConfig(
        task="online",
        steps=steps,
        seed=seed,
        out_dir=str(out_dir),
        log_every=max(steps // 20, 1),
        eval_every=0,
        eval_samples=0,
        plot=False,
        init_from=str(sft_dir),
        online=C.OnlineConfig(
            method=method,
            num_generations=GENERATIONS[method],
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            beta=beta,
            loss_type="sigmoid" if method == "online_dpo" else "dapo" if method == "grpo" else None,
            rewards=(_reward_name(scorer),),
            log_samples=2,
        ),
        data=C.DataConfig(
            train=str(prompts),
            eval=None,
            max_length=prompt_length,
            batch_size=2 * batch_size,
            buckets=(prompt_length,),
            seed=seed,
        ),
        optim=C.OptimConfig(learning_rate=learning_rate, warmup_steps=min(10, steps // 4)),
        reference=C.ReferenceConfig(mode="frozen"),
        checkpoint=C.CheckpointConfig(every=steps, keep=1, asynchronous=False, export_hf=False),
        mesh=C.MeshConfig(devices=1),
    )


def reward_model_config(
    out_dir: Path, *, sft_dir: Path, pairs: Path, steps: int, batch_size: int, seed: int
) -> C.TrainConfig:
    """The study's reward model: a value head on the SFT policy, TRL RewardTrainer's
    Bradley-Terry loss on the train pairs, the whole model trained (AdamW 1e-3, cosine).
    The pairs file's SPPO columns are dropped (`<out_dir>/pairs.jsonl`: prompt, chosen,
    rejected), since a reward task reads plain preference rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = out_dir / "pairs.jsonl"
    with plain.open("w") as f:
        for line in Path(pairs).read_text().splitlines():
            if line:
                r = json.loads(line)
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return C.TrainConfig(
        task="reward",
        steps=steps,
        seed=seed,
        out_dir=str(out_dir),
        log_every=max(steps // 10, 1),
        eval_every=0,
        eval_samples=0,
        plot=False,
        init_from=str(sft_dir),
        data=C.DataConfig(
            train=str(plain),
            eval=None,
            max_length=64,
            batch_size=batch_size,
            buckets=(64,),
            seed=seed,
        ),  # fmt: skip
        optim=C.OptimConfig(learning_rate=1e-3, warmup_steps=min(10, steps // 4)),
        checkpoint=C.CheckpointConfig(every=steps, keep=1, asynchronous=False, export_hf=True),
        mesh=C.MeshConfig(devices=1),
    )


def train_reward_model(cfg: C.TrainConfig, heldout_pairs: Path) -> dict:
    """Train the reward model, register it as `RM_REWARD`, and measure it on the held-out
    pairs: accuracy against their Bradley-Terry labels and against the gold order (pairs with
    equal gold rewards are not in the file), and the correlation of its scores with the gold
    reward over the held-out completions."""
    t0 = time.perf_counter()
    trainer.train(cfg, progress=True)
    seconds = time.perf_counter() - t0
    scorer = online.reward_model_scorer(Path(cfg.out_dir) / "export" / "merged")
    online.register_reward(RM_REWARD, scorer, overwrite=True)
    rows = [json.loads(line) for line in heldout_pairs.read_text().splitlines() if line]
    prompts = [r["prompt"] for r in rows]
    chosen = np.asarray(scorer(prompts, [r["chosen"] for r in rows]))
    rejected = np.asarray(scorer(prompts, [r["rejected"] for r in rows]))
    gold_c = np.asarray(online.sentiment_reward(prompts, [r["chosen"] for r in rows]))
    gold_r = np.asarray(online.sentiment_reward(prompts, [r["rejected"] for r in rows]))
    scores, gold = np.concatenate([chosen, rejected]), np.concatenate([gold_c, gold_r])
    return dict(
        train_seconds=seconds,
        heldout_pairs=len(rows),
        accuracy_labels=float(np.mean(chosen > rejected)),
        accuracy_gold=float(np.mean((chosen > rejected) == (gold_c > gold_r))),
        labels_agree_with_gold=float(np.mean(gold_c > gold_r)),
        gold_correlation=float(np.corrcoef(scores, gold)[0, 1]),
    )


def iterative_run(
    method: str,
    beta: float,
    out_dir: Path,
    base: C.TrainConfig,
    prompts: list[str],
    *,
    scorer: str,
    seed: int,
    max_new_tokens: int,
    prompt_length: int,
    rollout_batch: int,
    progress: bool = True,
) -> tuple[str, dict]:
    """`ITERATIONS` rounds of iterative DPO or SPPO from the SFT policy (`base`: the offline
    preference config, its steps per iteration); returns the last policy's directory and the
    loop's summary (per iteration: pairs, mean score of the samples, wall time)."""
    if method not in ITERATIVE_METHODS:
        raise ValueError(f"method must be one of {ITERATIVE_METHODS}, got {method!r}")
    fn = online.get_reward(_reward_name(scorer))
    it = online.IterativeConfig(
        method=method,
        iterations=ITERATIONS,
        samples_per_prompt=4,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        prompt_length=prompt_length,
        rollout_batch=rollout_batch,
        disjoint_prompts=False,
        reward=(fn,),
        tau=1.0,
        gold=(online.sentiment_reward,),
        seed=seed,
    )
    base = dataclasses.replace(base, loss=dataclasses.replace(base.loss, beta=beta))
    summary = online.run_iterative(it, base, prompts, out_dir, progress=progress)
    return summary["policy"], summary
