"""One process of tests/test_train_distributed.py's 2-process run (not a test module).

    python tests/distributed_worker.py <out_dir> <coordinator host:port> <process id>

Trains `trainer.train` once per layout of `LAYOUTS`, into `<out_dir>/<layout>`, as process
`<process id>` of 2: the config carries the coordinator address, the process count and id, so
the first `train` joins the run (`trainer.setup` -> `distributed.initialize`, before any other
JAX call) and the second finds it joined. Both processes write the same directories (orbax
checkpoints are collective; only process 0 writes metrics.jsonl, config.yaml, eval.json) and
each writes `summary<process id>.json`, the `train` summary it returned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROCESSES = 2
STEPS = 5
# 2 CPU devices per process, 4 in all.
# data x FSDP covers both a data-parallel split and sharded parameters; the 8-device layouts
# (data, fsdp, data x tensor, pmap) are tests/test_train_parallel.py's, in one process.
LAYOUTS = {"data2_fsdp2": ["mesh.data=2", "mesh.fsdp=2"]}


def overrides(out_dir, mesh: list[str]) -> list[str]:
    """The run shared by the workers and the 1-device reference (tests/test_train_parallel.py's,
    plus one evaluation batch of 8 pairs at steps 0 and 5)."""
    return [
        "model.preset=tiny", "task=paired", f"steps={STEPS}", f"out_dir={out_dir}",
        "log_every=1", "eval_samples=0", "plot=false", "checkpoint.export_hf=false",
        f"checkpoint.every={STEPS}", "checkpoint.asynchronous=false", "data.batch_size=8",
        "data.max_length=64", "data.buckets=[64]", "data.eval=shipped:test", "eval_batches=1",
        "data.eval_batch_size=8", "optim.name=sgd", "optim.learning_rate=0.2", "optim.b1=0.9",
        "optim.warmup_steps=0", "optim.schedule=constant", *mesh,
    ]  # fmt: skip


def main(out_dir: str, coordinator: str, process_id: int) -> None:
    from alignjax.train import config, trainer

    joined = [
        f"mesh.coordinator_address={coordinator}",
        f"mesh.num_processes={PROCESSES}",
        f"mesh.process_id={process_id}",
    ]
    for name, mesh in LAYOUTS.items():
        out = Path(out_dir) / name
        cfg = config.load_config(None, overrides(out, mesh + joined))
        summary = trainer.train(cfg, progress=False)

        import jax  # after `train` joined the run

        assert (jax.process_count(), jax.device_count()) == (PROCESSES, 4)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"summary{process_id}.json").write_text(json.dumps(summary))
        print(f"process {process_id}: {name} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
