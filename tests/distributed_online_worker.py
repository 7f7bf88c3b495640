"""One process of tests/test_train_distributed_online.py's 2-process run (not a test module).

    python tests/distributed_online_worker.py <out_dir> <coordinator host:port> <process id>

Trains `trainer.train` with `task=online` once per run of `RUNS`, into `<out_dir>/<name>`, as
process `<process id>` of 2 (2 CPU devices each, 4 in all), on the prompts the test wrote to
`<out_dir>/prompts.jsonl` and `<out_dir>/eval_prompts.jsonl`. The config carries the
coordinator address, the process count and id, so the first `train` joins the run
(`trainer.setup` -> `distributed.initialize`, before any other JAX call) and the second finds it
joined. Both processes write the same directories (orbax checkpoints are collective; only
process 0 writes metrics.jsonl and rollouts.jsonl) and each writes `summary<process id>.json`,
the `train` summary it returned. The runs import this file (`imports`) for their reward,
`odd_tokens`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROCESSES = 2
STEPS = 3
REWARD = "odd_tokens"
# name -> (the method's keys, the 2-process mesh). GRPO with the KL (the reference's log-probs
# are computed under the mesh) and batch-scaled advantages (a statistic of the whole batch), on
# data x FSDP (sharded parameters in the sampler), evaluated at steps 0 and 3; Online DPO (the
# "halves" layout: each process's rows are not one block of the batch) on a data mesh.
RUNS = {
    "grpo_kl": (
        ["online.method=grpo", "online.beta=0.04", "online.scale_rewards=batch",
         "online.num_generations=4", "data.eval={eval}", "data.eval_batch_size=8",
         "eval_batches=1", "eval_every=3"],
        ["mesh.data=2", "mesh.fsdp=2"],
    ),
    "online_dpo": (
        ["online.method=online_dpo", "online.num_generations=2", "data.eval=null"],
        ["mesh.data=4"],
    ),
}  # fmt: skip


def odd_tokens(prompts, completions, completion_ids, **kwargs):
    """A reward that varies between samples of a tiny random model (the sentiment reward is
    0 on its completions): the share of odd token ids in the completion."""
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _register() -> None:
    from alignjax import online

    online.register_reward(REWARD, odd_tokens, overwrite=True)


_register()


def overrides(out_dir, prompts_dir, name: str, mesh: list[str]) -> list[str]:
    """The run `name` shared by the workers and the 1-device reference
    (tests/test_train_online.py's parallel runs: 16 rollouts a step, SGD with momentum)."""
    keys, _ = RUNS[name]
    prompts_dir = Path(prompts_dir)
    keys = [k.format(eval=prompts_dir / "eval_prompts.jsonl") for k in keys]
    return [
        "task=online", f"data.train={prompts_dir / 'prompts.jsonl'}", f"out_dir={out_dir}",
        "data.batch_size=16", "data.buckets=[32]", "online.max_new_tokens=6", "plot=false",
        "eval_samples=0", "checkpoint.export_hf=false", f"steps={STEPS}", "log_every=1",
        f"checkpoint.every={STEPS}", "checkpoint.asynchronous=false", "optim.name=sgd",
        "optim.learning_rate=0.2", "optim.b1=0.9", "optim.warmup_steps=0",
        "optim.schedule=constant", f"imports=[{Path(__file__).resolve()}]",
        f"online.rewards=[{REWARD}]", *keys, *mesh,
    ]  # fmt: skip


def main(out_dir: str, coordinator: str, process_id: int) -> None:
    from alignjax.train import config, trainer

    joined = [
        f"mesh.coordinator_address={coordinator}",
        f"mesh.num_processes={PROCESSES}",
        f"mesh.process_id={process_id}",
    ]
    for name, (_, mesh) in RUNS.items():
        out = Path(out_dir) / name
        cfg = config.load_config(None, overrides(out, out_dir, name, mesh + joined))
        summary = trainer.train(cfg, progress=False)

        import jax  # after `train` joined the run

        assert (jax.process_count(), jax.device_count()) == (PROCESSES, 4)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"summary{process_id}.json").write_text(json.dumps(summary))
        print(f"process {process_id}: {name} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
