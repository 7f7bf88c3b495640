"""`task: online` with the iterative methods (alignjax.train.iterative_task): the run config and
command line route to `online.run_iterative`.

Fast tests: every key an iterative method does not read (and every iterative key with a step
method) set to a non-default value is a ValueError naming it, as are bad values; the
`IterativeConfig` and base `TrainConfig` built from a run config equal hand-written ones (the
recipe defaults come from `iterative.DEFAULTS`); the prompt sets (prompt ids kept, data.eval
"auto" / a source / null); and `alignjax train --config x.yaml` hands `run_iterative` exactly
those arguments (`run_iterative` replaced by a recorder: no model).

Slow tests: each method end to end through `alignjax.cli.main(["train", ...])` on a fresh tiny
preset model (2 iterations of 2 steps, 6 new tokens, 6 prompts) against a direct `run_iterative`
call with the equivalent hand-written configs in another directory: the same summary up to the
directory and the wall times, the same samples and pairs files byte for byte, the same final
parameters bitwise; rerunning the command trains nothing and returns the same summary.
"""

import json
import random

import numpy as np
import pytest
import yaml

from alignjax import cli, online
from alignjax.data import synthetic
from alignjax.online import iterative as IT
from alignjax.train import config as C
from alignjax.train import iterative_task as T
from alignjax.train import online_config as OC

REWARD = "test_iterative_task_length"


def length_reward(prompts, completions, **kwargs):
    """Distinct values for distinct completion lengths: best-vs-worst pairs do not tie."""
    return [float(len(c)) for c in completions]


@pytest.fixture(autouse=True, scope="module")
def registered_reward():
    online.register_reward(REWARD, length_reward, overwrite=True)
    yield
    online.REWARDS.pop(REWARD, None)


def run_config(*overrides, method="sppo"):
    return C.load_config(None, ["task=online", f"online.method={method}", *overrides])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- validation


def test_methods_are_the_drivers():
    assert OC.ITERATIVE_METHODS == IT.METHODS
    assert set(OC.METHODS) == set(OC.STEP_METHODS) | set(IT.METHODS)
    with pytest.raises(ValueError, match="run_iterative"):
        run_config().online.resolved()


@pytest.mark.parametrize(
    "method, overrides, key",
    [
        ("sppo", ["online.iterations=0"], "`online.iterations`"),
        ("sppo", ["online.epsilon=0.3"], "`online.epsilon`"),
        ("cream", ["online.loss_type=ipo"], "`online.loss_type`"),
        ("iterative_dpo", ["online.scale_rewards=batch"], "`online.scale_rewards`"),
        ("sppo", ["online.num_iterations=2"], "`online.num_iterations`"),
        ("sppo", ["online.top_k=5"], "`online.top_k`"),
        ("sppo", ["online.stop_tokens=[1]"], "`online.stop_tokens`"),
        ("iterative_dpo", ["online.tau=2.0"], "`online.tau`"),
        ("sppo", ["online.cream_strategy=dyn"], "`online.cream_strategy`"),
        ("iterative_dpo", ["online.cream_base=runs/x"], "`online.cream_base`"),
        ("cream", ["online.missing_eos_penalty=1.0"], "`online.missing_eos_penalty`"),
        ("cream", ["online.reward_weights=[1.0]"], "`online.reward_weights`"),
        (
            "cream",
            [f"online.rewards=[{REWARD}]", "online.gold_rewards=[sentiment]"],
            "`online.rewards`",
        ),
        ("grpo", ["online.iterations=2"], "`online.iterations`"),
        ("rloo", ["online.disjoint_prompts=false"], "`online.disjoint_prompts`"),
        ("online_dpo", ["online.rollout_batch=8"], "`online.rollout_batch`"),
        ("grpo", ["online.gold_rewards=[sentiment]"], "`online.gold_rewards`"),
        ("reinforce_kl", ["online.eval_temperature=0.5"], "`online.eval_temperature`"),
        ("sppo", ["online.num_generations=1"], "`online.num_generations`"),
        ("sppo", ["online.max_new_tokens=0"], "`online.max_new_tokens`"),
        ("sppo", ["online.prompt_length=0"], "`online.prompt_length`"),
        ("sppo", ["online.rollout_batch=0"], "`online.rollout_batch`"),
        ("sppo", ["online.eval_samples_per_prompt=0"], "`online.eval_samples_per_prompt`"),
        ("sppo", ["online.temperature=0"], "`online.temperature`"),
        ("sppo", ["online.eval_temperature=0"], "`online.eval_temperature`"),
        ("sppo", ["online.tau=0"], "`online.tau`"),
        ("sppo", ["online.top_p=1.5"], "`online.top_p`"),
        ("sppo", ["online.beta=-1"], "`online.beta`"),
        ("cream", ["online.cream_strategy=toporder"], "`online.cream_strategy`"),
        ("sppo", ["online.rewards=[]"], "`online.rewards`"),
        ("sppo", ["online.gold_rewards=[nope]"], "`online.gold_rewards[0]`"),
        ("sppo", ["online.reward_weights=[1.0, 2.0]"], "`online.reward_weights`"),
        ("sppo", ["loss.beta=0.1"], "`loss.beta`"),
        ("sppo", ["loss.name=nope"], "`loss.name`"),
        ("sppo", ["data.format=prompt_only"], "`data.format`"),
        ("rlhf", [], "`online.method`"),
    ],
)
def test_validation_names_the_key(method, overrides, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        run_config(*overrides, method=method)


def test_cli_reports_the_key(capsys):
    assert cli.main(["train", "task=online", "online.method=sppo", "online.epsilon=0.1"]) == 2
    assert "`online.epsilon`=0.1 means nothing for online.method='sppo'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("method", IT.METHODS)
def test_defaults_are_the_recipes(method, tmp_path):
    it = T.iterative_config(run_config(method=method)).resolved()
    d = IT.DEFAULTS[method]
    top_p = None if d.top_p == 1.0 else d.top_p
    assert (it.samples_per_prompt, it.temperature, it.top_p) == (
        d.samples_per_prompt,
        d.temperature,
        top_p,
    )
    assert it == IT.IterativeConfig(method=method).resolved()
    base = T.base_config(run_config(method=method))
    assert base.loss.name is None and base.loss.beta is None
    assert IT.iteration_config(it, base, tmp_path, 0).loss.name == d.loss
    named = T.base_config(run_config("loss.name=ipo", method=method))
    assert IT.iteration_config(it, named, tmp_path, 0).loss.name == "ipo"


def test_configs_equal_hand_written(tmp_path):
    cfg = run_config(
        "seed=3", "steps=7", "out_dir=runs/x", "data.train=p.jsonl", "data.eval=e.jsonl",
        "data.columns={prompt: question}", "data.batch_size=4", "online.beta=0.001",
        "online.iterations=2", "online.num_generations=4", "online.temperature=0.8",
        "online.top_p=1.0", "online.max_new_tokens=8", "online.prompt_length=16",
        "online.rollout_batch=4", "online.disjoint_prompts=false",
        f"online.rewards=[{REWARD}, sentiment]", "online.reward_weights=[2.0, 1.0]",
        "online.missing_eos_penalty=1.0", "online.tau=0.5", "online.gold_rewards=[sentiment]",
        "online.eval_samples_per_prompt=2", "online.eval_temperature=0.5",
        "optim.learning_rate=1e-3", "reference.mode=precomputed",
    )  # fmt: skip
    assert T.iterative_config(cfg) == IT.IterativeConfig(
        method="sppo", iterations=2, samples_per_prompt=4, temperature=0.8, top_p=1.0,
        max_new_tokens=8, prompt_length=16, rollout_batch=4, disjoint_prompts=False,
        reward=(length_reward, online.sentiment_reward), reward_weights=(2.0, 1.0),
        missing_eos_penalty=1.0, tau=0.5, gold=(online.sentiment_reward,),
        eval_samples_per_prompt=2, eval_temperature=0.5, seed=3,
    )  # fmt: skip
    assert T.base_config(cfg) == C.TrainConfig(
        task="paired", seed=3, steps=7, out_dir="runs/x",
        data=C.DataConfig(train="p.jsonl", eval=None, batch_size=4),
        loss=C.LossConfig(beta=0.001), optim=C.OptimConfig(learning_rate=1e-3),
        reference=C.ReferenceConfig(mode="precomputed"),
    )  # fmt: skip
    cream = run_config("online.cream_strategy=dyn", f"online.cream_base={tmp_path}",
                       method="cream")  # fmt: skip
    assert T.iterative_config(cream) == IT.IterativeConfig(
        method="cream", cream_strategy="dyn", cream_base=str(tmp_path)
    )


def test_prompt_sets(tmp_path):
    rows = [{"prompt": f"prompt {i}", "prompt_id": f"p{i}", "x": i} for i in range(25)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [{"question": "q 0"}, {"question": "q 1"}])
    want = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"]} for r in rows]
    # data.eval=auto, >= 20 prompts: data.eval_fraction of them held out with data.seed
    cfg = run_config(f"data.train={train}", "data.eval_fraction=0.2", "data.seed=1")
    got, heldout = T.prompt_sets(cfg)
    drawn = set(np.random.default_rng(1).permutation(25)[:5].tolist())  # 0.2 x 25, sorted
    assert heldout == [want[i] for i in sorted(drawn)]
    assert got == [want[i] for i in range(25) if i not in drawn]
    assert T.prompt_sets(run_config(f"data.train={train}", "data.eval=null")) == (want, None)
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert T.prompt_sets(run_config(f"data.train={few}")) == (["a", "b"], None)
    # a source; data.columns.prompt names the column of both sets
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "a"}])
    cfg = run_config(
        f"data.train={renamed}", f"data.eval={held}", "data.columns={prompt: question}"
    )
    assert T.prompt_sets(cfg) == (["a"], ["q 0", "q 1"])
    with pytest.raises(ValueError, match="`data.eval`.*no prompt column 'prompt'"):
        T.prompt_sets(run_config(f"data.train={train}", f"data.eval={held}"))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "a"}]}])
    with pytest.raises(ValueError, match="`data.train`.*text prompts"):
        T.prompt_sets(run_config(f"data.train={chat}", "data.eval=null"))


def test_auto_on_the_shipped_pairs_evaluates_the_shipped_test_prompts(monkeypatch):
    import datasets

    from alignjax.train import data as TD

    def fake(source, cfg):
        return datasets.Dataset.from_dict({"prompt": [source], "chosen": ["x"]})

    monkeypatch.setattr(TD, "raw_split", fake)
    assert T.prompt_sets(run_config()) == (["shipped:train"], ["shipped:test"])


def test_cli_config_file_calls_run_iterative(tmp_path, monkeypatch, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    heldout = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "c", "prompt_id": 7}])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dict(
        task="online", steps=5, out_dir=str(tmp_path / "run"),
        data=dict(train=str(prompts), eval=str(heldout), batch_size=2),
        online=dict(method="iterative_dpo", iterations=2, max_new_tokens=4, rewards=[REWARD]),
    )))  # fmt: skip
    calls = []

    def recorder(cfg, base, prompts, out_dir, *, eval_prompts=None, phases=None, progress=True):
        calls.append((cfg, base, prompts, out_dir, eval_prompts, phases, progress))
        return {"method": cfg.method}

    monkeypatch.setattr(IT, "run_iterative", recorder)
    assert cli.main(["train", "--no-progress", "--config", str(tmp_path / "run.yaml"),
                     "online.method=cream", "online.rewards=[sentiment]"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == {"method": "cream"}
    it, base, got, out_dir, heldout_got, phases, progress = calls[0]
    assert it == IT.IterativeConfig(method="cream", iterations=2, max_new_tokens=4)
    assert base == C.TrainConfig(
        task="paired",
        steps=5,
        out_dir=str(tmp_path / "run"),
        data=C.DataConfig(train=str(prompts), eval=None, batch_size=2),
    )
    assert (got, heldout_got) == (["a", "b"], [{"prompt": "c", "prompt_id": 7}])
    assert (out_dir, phases, progress) == (str(tmp_path / "run"), None, False)
    with pytest.raises(ValueError, match="`online.iterations`=3 disjoint"):
        T.train_iterative(run_config(f"data.train={prompts}", "online.iterations=3"))


# ----------------------------------------------------------------------------- end to end

TIMING = ("wall_s", "train/step_time", "train/tokens_per_s")


def comparable(summary, out):
    """The summary with `out` as "<out>" and the wall-clock numbers removed."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(json.dumps(summary).replace(str(out), "<out>")))


def params_of(path):
    from flax import nnx

    from alignjax import models

    model = models.load_pretrained(path)
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
@pytest.mark.parametrize("method", IT.METHODS)
def test_command_equals_run_iterative(method, tmp_path, capsys):
    rows = [{"prompt": synthetic.review_opening(random.Random(f"it-{i}")), "prompt_id": f"p{i}"}
            for i in range(6)]  # fmt: skip
    heldout = [synthetic.review_opening(random.Random(f"it-heldout-{i}")) for i in range(2)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in heldout])
    common = dict(steps=2, log_every=1, eval_every=0, eval_samples=0, plot=False,
                  checkpoint=dict(asynchronous=False), mesh=dict(devices=1))  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dict(
        task="online", out_dir=str(tmp_path / "cli"), model=dict(preset="tiny"),
        data=dict(train=str(prompts), eval=str(eval_file), batch_size=2, max_length=32),
        online=dict(method=method, iterations=2, max_new_tokens=6, eval_samples_per_prompt=2),
        **common,
    )))  # fmt: skip
    rewards = [] if method == "cream" else [f"online.rewards=[{REWARD}]"]
    argv = ["train", "--no-progress", "--config", str(tmp_path / "run.yaml"), *rewards]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)

    it = IT.IterativeConfig(method=method, iterations=2, max_new_tokens=6,
                            eval_samples_per_prompt=2,
                            reward=online.sentiment_reward if method == "cream" else
                            length_reward)  # fmt: skip
    common.update(checkpoint=C.CheckpointConfig(asynchronous=False),
                  mesh=C.MeshConfig(devices=1))  # fmt: skip
    base = C.TrainConfig(task="paired", model=C.ModelConfig(preset="tiny"),
                         data=C.DataConfig(train=str(prompts), eval=None, batch_size=2,
                                           max_length=32), **common)  # fmt: skip
    direct = IT.run_iterative(it, base, rows, tmp_path / "direct", eval_prompts=heldout,
                              progress=False)  # fmt: skip
    assert comparable(summary, tmp_path / "cli") == comparable(direct, tmp_path / "direct")
    assert len(summary["gold_reward"]) == 3 and all(np.isfinite(summary["sample_gold_reward"]))
    for t in range(2):
        for name in ("samples.jsonl", "pairs.jsonl", "data.json"):
            a, b = (tmp_path / d / f"iter_{t}" / name for d in ("cli", "direct"))
            assert a.read_bytes() == b.read_bytes(), (t, name)
        assert summary["iterations"][t]["train"]["last"]["step"] == 2
    got, want = params_of(summary["policy"]), params_of(direct["policy"])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    # Rerunning the command resumes: both iterations are finished, nothing is trained again.
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == summary
