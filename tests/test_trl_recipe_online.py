"""TRL reward and on-policy recipes (`alignjax reward|grpo|rloo|online-dpo`,
`alignjax.train.trl_online_recipe`).

Every expected alignjax value is derived by hand from TRL 1.16's sources (paths under
`trl/`; transformers 5.23 for the shared TrainingArguments), never from running the mapping:

- GRPO / RLOO batch: `GRPOConfig.__post_init__` (trainer/grpo_config.py L1098-1100, RLOO
  rloo_config.py L661-663) sets steps_per_generation = gradient_accumulation_steps and the
  generation batch = per_device_train_batch_size x processes x steps_per_generation
  completions; one generation batch serves `num_iterations` optimizer steps
  (grpo_trainer.py L1538 `generate_every = steps_per_generation * num_iterations`).
- GRPO / RLOO epochs: the train dataloader's batch is per-device x steps_per_generation
  (grpo_trainer.py L1275) over `RepeatSampler(batch_size=generation_batch_size //
  num_generations, repeat_count=num_iterations * steps_per_generation)` (L1309-1316), whose
  length drops the last partial batch of prompts (trainer/utils.py L951-952); transformers
  divides by gradient_accumulation_steps (trainer.py L2559-2563). Optimizer steps per epoch:
  floor(rows / prompts per step) x num_iterations.
- Online DPO: a batch of per-device prompts (experimental/online_dpo/online_dpo_trainer.py
  L1147 `batch_size = len(prompts)`) scored as `2 * prompts` (L1214), so 2 completions a
  prompt; `max_length` cuts prompt + completion on the left (L1107); a one-element `beta` list
  is a float (online_dpo_config.py L381).
- rewards: `trl grpo` puts `reward_model_name_or_path` first, then each of `reward_funcs`
  (scripts/grpo.py L92-105, scripts/rloo.py the same).
- GRPO `scale_rewards: false` is "none" (grpo_config.py L1078); beta 0 keeps no reference, with
  PEFT the reference is the adapters-off policy (grpo_trainer.py L984-990).
- RewardTrainer: `center_rewards_coefficient * mean((r_c + r_r)^2)` added when not None
  (reward_trainer.py L794-795).

Defaults where a recipe is silent are read from `trl_fields.json` (TRL's dataclass defaults,
written by tests/reference/generate_trl_configs.py). The end-to-end runs (slow) run each
command through `cli.main` for 2 steps of a tiny model: the logged learning rate follows TRL's
default linear decay exactly (float32 rounding: 1e-6 relative), the number of completions per
step is TRL's, and the rollouts' logged rewards are the configured reward functions' values
(the same functions, so sentiment counts exactly; the reward model to 1e-5, float32 forwards
at two padded batch shapes, as tests/test_train_reward.py).
"""

import json
import logging

import datasets
import numpy as np
import pytest

from alignjax import cli, online
from alignjax.online import rewards as RW
from alignjax.online.scorers import sentiment_reward
from alignjax.train import config as C
from alignjax.train import metrics
from alignjax.train import trl_recipe as R

MESH1 = ["mesh.devices=1"]  # one data-parallel device: per-device batch = global batch
DOTTED = "alignjax.online.scorers.sentiment_reward"  # a reward by import path, as TRL takes it
ROWS = 50


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl_online") / "prompts.jsonl"
    datasets.Dataset.from_list([{"prompt": f"review {i}:"} for i in range(ROWS)]).to_json(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl_online") / "pairs.jsonl"
    rows = [{"prompt": f"review {i}:", "chosen": " great.", "rejected": " awful."}
            for i in range(ROWS)]  # fmt: skip
    datasets.Dataset.from_list(rows).to_json(str(path))
    return str(path)


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """A directory with a reward model's files (the mapping only looks for them)."""
    path = tmp_path_factory.mktemp("rm") / "export" / "merged"
    path.mkdir(parents=True)
    (path / "reward_head.safetensors").write_bytes(b"")
    return str(path)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def default(command, name):
    return R.trl_fields()["classes"][command]["fields"][name]["default"]


def test_the_inventory_holds_the_reward_and_online_trainers():
    classes = R.trl_fields()["classes"]
    assert {k: classes[k]["class"] for k in ("reward", "grpo", "rloo", "online-dpo",
                                             "grpo_script", "rloo_script")} == {
        "reward": "RewardConfig", "grpo": "GRPOConfig", "rloo": "RLOOConfig",
        "online-dpo": "OnlineDPOConfig", "grpo_script": "GRPOScriptArguments",
        "rloo_script": "RLOOScriptArguments",
    }  # fmt: skip
    # TRL's docstrings: GRPOConfig L64, L70, L172, L237, L412; RLOOConfig L59, L167;
    # OnlineDPOConfig's `learning_rate` 5e-7, `beta` [0.1]; RewardConfig's learning_rate 1e-4
    assert [default("grpo", n) for n in ("num_generations", "max_completion_length", "beta",
                                         "loss_type", "learning_rate")] == [
        8, 512, 0.0, "dapo", 1e-6]  # fmt: skip
    assert [default("rloo", n) for n in ("num_generations", "beta")] == [2, 0.05]
    names = ("learning_rate", "beta", "max_new_tokens", "temperature")
    assert [default("online-dpo", n) for n in names] == [5e-7, [0.1], 64, 0.9]
    assert default("reward", "learning_rate") == 1e-4
    assert "reward_funcs" in classes["grpo_script"]["fields"]
    assert "reward_model_path" in classes["online-dpo"]["fields"]


def test_grpo_recipe_field_by_field(tmp_path, prompts, rm, caplog):
    recipe = write(tmp_path, f"""
model_name_or_path: ckpt/base
dataset_name: {prompts}
output_dir: runs/trl-grpo
per_device_train_batch_size: 6
gradient_accumulation_steps: 2
num_train_epochs: 2
learning_rate: 3.0e-6
logging_steps: 2
save_steps: 4
bf16: false
gradient_checkpointing: false
num_generations: 4
max_completion_length: 48
temperature: 0.7
top_k: 20
top_p: 0.95
beta: 0.04
loss_type: dr_grpo
epsilon: 0.1
epsilon_high: 0.28
delta: 1.5
scale_rewards: false
importance_sampling_level: sequence
use_bias_correction_kl: false
num_iterations: 2
mask_truncated_completions: false
reward_model_name_or_path: {rm}
reward_funcs: [sentiment, {DOTTED}]
reward_weights: [1.0, 0.5, 0.25]
use_peft: true
lora_r: 8
lora_dropout: 0.0
log_completions: true
use_vllm: true
""")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        m = R.from_trl("grpo", recipe, overrides=MESH1)
    cfg, o = m.config, m.config.online
    assert cfg.task == "online" and o.method == "grpo"
    # 6 completions a device x 1 device x 2 accumulation = the generation batch (L1098-1100)
    assert cfg.data.batch_size == 12 and cfg.optim.grad_accum == 2
    # 12 / 4 = 3 prompts a step; floor(50 / 3) = 16 batches, each served mu = 2 times
    assert cfg.steps == 2 * (ROWS // 3) * 2
    assert (o.num_generations, o.max_new_tokens, o.temperature, o.top_k, o.top_p) == (
        4, 48, 0.7, 20, 0.95)  # fmt: skip
    assert (o.beta, o.loss_type, o.epsilon, o.epsilon_high, o.delta) == (
        0.04, "dr_grpo", 0.1, 0.28, 1.5)  # fmt: skip
    assert (o.scale_rewards, o.importance_sampling_level, o.use_bias_correction_kl) == (
        "none", "sequence", False)  # fmt: skip
    assert o.num_iterations == 2 and cfg.checkpoint.every == 4
    # the reward model first, then the functions, in TRL's order; the weights follow it
    assert o.rewards == (f"reward_model:{rm}", "sentiment", DOTTED)
    assert o.reward_weights == (1.0, 0.5, 0.25)
    assert cfg.reference.mode == "adapters_disabled"  # PEFT and beta > 0: disable_adapter
    assert (cfg.peft.method, cfg.peft.r) == ("lora", 8)
    assert cfg.data.max_length is None and cfg.data.max_prompt_length is None  # no prompt cut
    assert (cfg.optim.learning_rate, cfg.log_every, cfg.model.path) == (3e-6, 2, "ckpt/base")
    assert cfg.model.dtype is None and not cfg.model.remat
    for name in ("log_completions", "use_vllm"):
        assert any(f"`{name}`" in w for w in m.warnings)
    assert "online.num_generations = 4" in m.table()


def test_grpo_defaults_are_trls(prompts):
    m = R.from_trl("grpo", values={"dataset_name": prompts}, overrides=MESH1)
    cfg, o = m.config, m.config.online
    assert cfg.optim.learning_rate == default("grpo", "learning_rate")
    assert o.num_generations == default("grpo", "num_generations")
    assert o.max_new_tokens == default("grpo", "max_completion_length")
    assert (o.beta, o.loss_type) == (default("grpo", "beta"), default("grpo", "loss_type"))
    assert (o.temperature, o.epsilon) == (
        default("grpo", "temperature"),
        default("grpo", "epsilon"),
    )
    assert o.top_k is None and o.top_p is None  # TRL's top_k 0 / top_p 1.0: no filter
    # per-device 8 completions x 1 x 1; 8 generations: 1 prompt a step; 3 epochs of 50 steps
    per_device = default("grpo", "per_device_train_batch_size")
    assert cfg.data.batch_size == per_device
    prompts_per_step = per_device // default("grpo", "num_generations")
    assert cfg.steps == default("grpo", "num_train_epochs") * (ROWS // prompts_per_step)
    assert "(TRL default)" in m.table()
    assert any("`reward_funcs`" in w for w in m.warnings)  # none given: alignjax's default
    assert o.rewards == C.OnlineConfig().rewards


def test_rloo_recipe(tmp_path, prompts):
    recipe = write(tmp_path, f"""
dataset_name: {prompts}
per_device_train_batch_size: 4
max_steps: 10
save_strategy: "no"
num_generations: 4
max_completion_length: 16
beta: 0.1
epsilon_high: 0.3
normalize_advantages: true
reward_clip_range: [-2, 2]
num_iterations: 3
max_prompt_length: 32
reward_funcs: [sentiment]
""")  # fmt: skip
    m = R.from_trl("rloo", recipe, overrides=MESH1)
    cfg, o = m.config, m.config.online
    assert (o.method, cfg.data.batch_size, cfg.steps) == ("rloo", 4, 10)
    assert (o.num_generations, o.max_new_tokens, o.beta, o.epsilon_high) == (4, 16, 0.1, 0.3)
    assert o.normalize_advantages and o.reward_clip_range == (-2.0, 2.0)
    assert cfg.optim.learning_rate == default("rloo", "learning_rate")
    # only the final save, on a rollout boundary: the smallest multiple of 3 past 10 steps
    assert o.num_iterations == 3 and cfg.checkpoint.every == 12
    assert cfg.data.max_prompt_length == 32  # TRL <= 0.2x: the prompt's last 32 tokens
    assert cfg.reference.mode == "frozen"  # beta > 0 without PEFT: a frozen initial policy
    silent = R.from_trl("rloo", values={"dataset_name": prompts, "max_steps": 2},
                        overrides=MESH1).config.online  # fmt: skip
    assert (silent.num_generations, silent.beta) == (default("rloo", "num_generations"),
                                                     default("rloo", "beta"))  # fmt: skip


def test_online_dpo_recipe(tmp_path, prompts, rm):
    recipe = write(tmp_path, f"""
dataset_name: {prompts}
per_device_train_batch_size: 3
gradient_accumulation_steps: 2
num_train_epochs: 1
beta: [0.2]
loss_type: ipo
max_new_tokens: 32
max_length: 100
temperature: 0.7
missing_eos_penalty: 1.5
reward_model_path: {rm}
reward_weights: [2.0]
""")  # fmt: skip
    m = R.from_trl("online-dpo", recipe, overrides=MESH1)
    cfg, o = m.config, m.config.online
    assert (o.method, o.num_generations) == ("online_dpo", 2)
    # 3 prompts a device x 1 x 2 accumulation, 2 completions each
    assert cfg.data.batch_size == 2 * 3 * 2
    # transformers over the prompts: ceil(ceil(50 / 3) / 2) = 9 optimizer steps
    assert cfg.steps == 9
    assert (o.beta, o.loss_type, o.max_new_tokens, o.temperature) == (0.2, "ipo", 32, 0.7)
    assert o.missing_eos_penalty == 1.5
    assert o.rewards == (f"reward_model:{rm}",) and o.reward_weights == (2.0,)
    assert cfg.data.max_prompt_length == 100 - 32  # prompt + completion within max_length
    assert cfg.optim.learning_rate == default("online-dpo", "learning_rate")
    assert cfg.reference.mode == "frozen"


def test_reward_recipe(tmp_path, pairs, caplog):
    recipe = write(tmp_path, f"""
dataset_name: {pairs}
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
num_train_epochs: 1
max_length: 256
center_rewards_coefficient: 0.01
use_peft: true
lora_task_type: SEQ_CLS
lora_dropout: 0.0
""")  # fmt: skip
    m = R.from_trl("reward", recipe, overrides=MESH1)
    cfg = m.config
    assert (cfg.task, cfg.loss.name, dict(cfg.loss.kwargs)) == (
        "reward", "reward", {"center_rewards_coefficient": 0.01})  # fmt: skip
    assert cfg.reference.mode == "none" and cfg.data.max_length == 256
    assert cfg.data.batch_size == 8 and cfg.steps == 7  # ceil(ceil(50 / 4) / 2)
    assert cfg.optim.learning_rate == default("reward", "learning_rate")
    assert not m.warnings and cfg.peft.method == "lora"
    # PEFT's CAUSAL_LM without `score` saved: TRL's head would stay random; alignjax says so
    values = {"dataset_name": pairs, "max_steps": 2, "use_peft": True, "lora_dropout": 0.0}
    with caplog.at_level(logging.WARNING):
        warned = R.from_trl("reward", values=values, overrides=MESH1)
    assert any("`lora_task_type`" in w for w in warned.warnings)
    saved = R.from_trl("reward", values={**values, "lora_modules_to_save": ["score"]},
                       overrides=MESH1)  # fmt: skip
    assert not saved.warnings
    assert R.from_trl("reward", values={"dataset_name": pairs, "max_steps": 2},
                      overrides=MESH1).config.loss.kwargs == {}  # fmt: skip


@pytest.mark.parametrize("command, name, closest", [
    ("grpo", "num_generation", "num_generations"),
    ("rloo", "normalise_advantages", "normalize_advantages"),
    ("online-dpo", "max_new_token", "max_new_tokens"),
    ("reward", "center_reward_coefficient", "center_rewards_coefficient"),
])  # fmt: skip
def test_a_misspelt_field_names_the_closest(command, name, closest):
    with pytest.raises(ValueError, match=rf"`{name}`.*did you mean `{closest}`"):
        R.from_trl(command, values={name: 1})


@pytest.mark.parametrize("command, values, match", [
    ("grpo", {"mask_truncated_completions": True}, r"`mask_truncated_completions` = True"),
    ("rloo", {"mask_truncated_completions": True}, r"`mask_truncated_completions` = True"),
    ("grpo", {"steps_per_generation": 4}, r"`steps_per_generation` = 4.*one rollout batch"),
    ("grpo", {"generation_batch_size": 16}, r"`generation_batch_size` = 16"),
    ("grpo", {"loss_type": "cispo"}, r"`loss_type` = 'cispo'"),
    ("grpo", {"entropy_coef": 0.01}, r"`entropy_coef` = 0.01"),
    ("grpo", {"multi_objective_aggregation": "normalize_then_sum"},
     r"`multi_objective_aggregation`"),
    ("grpo", {"sync_ref_model": True}, r"`sync_ref_model` = True"),
    ("grpo", {"reward_funcs": ["accuracy_reward"]}, r"`reward_funcs`.*TRL built-in"),
    ("grpo", {"reward_funcs": ["sentiment"], "reward_weights": [1.0, 2.0]}, r"`reward_weights`"),
    ("grpo", {"num_iterations": 2, "save_steps": 3}, r"`save_steps` = 3"),
    ("grpo", {"num_generations": 3}, r"`num_generations` = 3"),
    ("rloo", {"reward_model_name_or_path": "no/such/rm"}, r"`reward_model_name_or_path`"),
    ("online-dpo", {"repetition_penalty": 1.1}, r"`repetition_penalty` = 1.1"),
    ("online-dpo", {"beta": [0.1, 0.05]}, r"`beta` = \[0.1, 0.05\]: a beta per epoch"),
    ("online-dpo", {"max_length": 64}, r"`max_length` = 64"),
    ("reward", {"use_peft": True, "lora_modules_to_save": ["lm_head"]},
     r"`lora_modules_to_save`"),
])  # fmt: skip
def test_what_alignjax_cannot_honour_is_refused(prompts, pairs, command, values, match):
    data = pairs if command == "reward" else prompts
    with pytest.raises(ValueError, match=match):
        R.from_trl(command, values={"dataset_name": data, "max_steps": 2, **values},
                   overrides=MESH1)  # fmt: skip


def test_refused_fields_at_trls_default_are_fine(prompts):
    values = {"mask_truncated_completions": False, "entropy_coef": 0.0, "shuffle_dataset": True,
              "steps_per_generation": 2, "gradient_accumulation_steps": 2}  # fmt: skip
    m = R.from_trl("grpo", values={"dataset_name": prompts, "max_steps": 2, **values},
                   overrides=MESH1)  # fmt: skip
    assert m.config.optim.grad_accum == 2 and "mask_truncated_completions" in m.table()


@pytest.mark.parametrize("command", [
    "grpo",
    pytest.param("rloo", marks=pytest.mark.slow),  # suite budget: ~2 s each
    pytest.param("online-dpo", marks=pytest.mark.slow),
    pytest.param("reward", marks=pytest.mark.slow),
])  # fmt: skip
def test_every_trl_field_is_mapped_warned_or_refused(prompts, pairs, command):
    """As tests/test_trl_recipe.py: no field set off TRL's default is silently dropped."""
    silent = []
    for name, meta in sorted(R._fields_of(command).items()):
        if name in ("dataset_name", "max_steps", "output_dir", "model_name_or_path"):
            continue
        d = meta["default"]
        if isinstance(d, bool):
            value = not d
        elif isinstance(d, int):
            value = d + 3
        elif isinstance(d, float):
            value = d + 0.25
        else:
            value = ["x"] if isinstance(d, list) else "x"
        data = pairs if command == "reward" else prompts
        try:
            m = R.from_trl(command, values={"dataset_name": data, "max_steps": 2, name: value})
        except (ValueError, TypeError) as err:
            assert name in str(err), (name, str(err))
            continue
        if not (name in m.table() or any(f"`{name}`" in w for w in m.warnings)):
            silent.append(name)
    assert not silent, f"silently dropped TRL fields: {silent}"


@pytest.mark.parametrize("command", ["reward", "grpo", "rloo", "online-dpo"])
def test_cli_dry_run_prints_the_mapping(prompts, pairs, command, capsys):
    data = pairs if command == "reward" else prompts
    argv = [command, "--dry-run", "--dataset_name", data, "--max_steps", "2"]
    if command in ("grpo", "rloo"):
        argv += ["--reward_funcs", "sentiment", DOTTED, "--reward_weights", "1", "0.5"]
    assert cli.main([*argv, "seed=3", *MESH1]) == 0
    out = capsys.readouterr().out
    assert f"TRL `{command}` recipe -> alignjax config:" in out and "alignjax config:" in out
    assert "(alignjax overrides)" in out and "seed: 3" in out
    if command in ("grpo", "rloo"):
        assert f"online.rewards = ['sentiment', '{DOTTED}']" in out
        assert "online.reward_weights = [1.0, 0.5]" in out
    assert cli.main([command, "--dry-run", "--dataset_name", data, "--beta_x", "1"]) == 2
    assert "`beta_x`" in capsys.readouterr().err


def test_reward_names_resolve_as_trl_scripts_do(rm, tmp_path):
    assert RW.get_reward(DOTTED) is sentiment_reward
    RW.check_reward(f"reward_model:{rm}")
    with pytest.raises(ValueError, match="holds no reward model"):
        RW.check_reward(f"reward_model:{tmp_path}")
    with pytest.raises(ValueError, match="neither a registered reward function nor"):
        RW.check_reward("alignjax.online.scorers.no_such_reward")
    cfg = C.load_config(None, ["task=online", f"online.rewards=[sentiment, {DOTTED}]"])
    assert cfg.online.rewards == ("sentiment", DOTTED)


# -- end to end: 2 steps of the tiny preset through `cli.main` -----------------------------------

RUN = ["--max_steps", "2", "--logging_steps", "1", "--bf16", "false",
       "--gradient_checkpointing", "false", "--no-progress", *MESH1, "model.preset=tiny",
       "plot=false", "eval_samples=0", "checkpoint.asynchronous=false"]  # fmt: skip


def run(command, out, *args):
    assert cli.main([command, "--output_dir", str(out), *args, *RUN]) == 0
    return [r for r in metrics.read_jsonl(out / "metrics.jsonl") if "train/loss" in r]


def rollouts(out):
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def check_linear_decay(rows, lr):
    """transformers' linear schedule, no warm-up, 2 steps: lr, then lr / 2."""
    np.testing.assert_allclose([r["train/learning_rate"] for r in rows], [lr, lr / 2], rtol=1e-6)


def completions_per_step(rows):
    return [round(r["train/completion_tokens"] / r["train/completions/mean_length"]) for r in rows]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, pairs):
    out = tmp_path_factory.mktemp("e2e") / "rm"
    rows = run("reward", out, "--dataset_name", pairs, "--per_device_train_batch_size", "4",
               "--max_length", "64", "--center_rewards_coefficient", "0.01")  # fmt: skip
    return out, rows


@pytest.mark.slow  # a 2-step run (~1 min on a shared CPU)
def test_reward_end_to_end(rm_run):
    out, rows = rm_run
    assert [r["step"] for r in rows] == [1, 2]
    check_linear_decay(rows, default("reward", "learning_rate"))
    assert all({"train/accuracy", "train/margin", "train/mean_reward"} <= set(r) for r in rows)
    assert (out / "export" / "merged" / "reward_head.safetensors").is_file()


@pytest.mark.slow
def test_grpo_end_to_end(tmp_path, prompts):
    out = tmp_path / "grpo"
    rows = run("grpo", out, "--dataset_name", prompts, "--per_device_train_batch_size", "4",
               "--num_generations", "2", "--max_completion_length", "4", "--reward_funcs",
               "sentiment", DOTTED, "--reward_weights", "1.0", "0.5",
               "checkpoint.export_hf=false")  # fmt: skip
    check_linear_decay(rows, default("grpo", "learning_rate"))
    assert completions_per_step(rows) == [4, 4]  # per_device counts completions
    assert all(r["train/completions/max_length"] <= 4 for r in rows)
    for r in rollouts(out):  # the weighted sum of the two (identical) functions
        assert r["reward"] == 1.5 * sentiment_reward([r["prompt"]], [r["completion"]])[0]


@pytest.mark.slow
def test_rloo_end_to_end(tmp_path, prompts):
    out = tmp_path / "rloo"
    rows = run("rloo", out, "--dataset_name", prompts, "--per_device_train_batch_size", "4",
               "--num_generations", "2", "--max_completion_length", "4", "--num_iterations", "2",
               "--reward_funcs", "sentiment", "checkpoint.export_hf=false")  # fmt: skip
    check_linear_decay(rows, default("rloo", "learning_rate"))
    assert completions_per_step(rows) == [4, 4]
    # num_iterations 2: one rollout batch serves both optimizer steps
    by_step = {}
    for r in rollouts(out):
        by_step.setdefault(r["step"], []).append((r["prompt"], r["completion"], r["reward"]))
    assert sorted(by_step) == [1, 2] and by_step[1] == by_step[2]


@pytest.mark.slow
def test_online_dpo_end_to_end_with_an_alignjax_reward_model(tmp_path, prompts, rm_run):
    out, rm_dir = tmp_path / "odpo", rm_run[0]
    rows = run("online-dpo", out, "--dataset_name", prompts, "--per_device_train_batch_size",
               "2", "--max_new_tokens", "4", "--reward_model_path", str(rm_dir),
               "checkpoint.export_hf=false")  # fmt: skip
    check_linear_decay(rows, default("online-dpo", "learning_rate"))
    assert completions_per_step(rows) == [4, 4]  # 2 prompts a device, 2 completions each
    assert all(f"train/rewards/reward_model:{rm_dir}/mean" in r for r in rows)
    logged = rollouts(out)
    scorer = online.reward_model_scorer(rm_dir)
    got = scorer([r["prompt"] for r in logged], [r["completion"] for r in logged])
    np.testing.assert_allclose(got, [r["reward"] for r in logged], atol=1e-5)
