"""Training: the trainer as composable parts. Modules, imported by name
(`from alignjax.train import step, hooks, placement`):

- `config`: frozen dataclasses, YAML / Python files, dotted overrides, validated choices.
- `builders`: name -> factory registries (optimizers, schedules, model presets, PEFT methods)
  and the optimizer with parameter groups.
- `state`: TrainState, `init_state`, `model_of`. `forward`: the reference's outputs, per-token
  statistics, token masks and the loss batch. `step`: StepSpec (the loss's `LossNeeds`) and the
  jitted step (exact accumulation, non-finite guard, TR-DPO sync).
- `placement`: one device, a mesh, pmap, several processes. `sharding`: meshes and rules.
- `loop`: `run` over batches with `hooks` (metrics, progress, evaluation, checkpoints, ...).
- `checkpoint`, `metrics`, `reference` (precomputed reference log-probs), `evaluate`, `data`,
  `dynamics` (DPO-dynamics diagnostics of paired runs).
- `online` (task online: the rollout phase, sample -> score -> advantages, feeding the step),
  `online_step` (a batch of scored rollouts as the step's batch kind), `online_config`.
- `session`: `setup` (a run's parts from a config) and `open_run`; `trainer`: `train`,
  `evaluate_run`, `export_run` (what the `alignjax` command runs).

`open_run`, `setup` and `train` are also reachable here (`alignjax.train.open_run(run_dir)`).
"""

__all__ = ["open_run", "setup", "train"]


def __getattr__(name):  # lazy: `from alignjax.train import config` stays light
    if name in ("open_run", "setup"):
        from alignjax.train import session

        return getattr(session, name)
    if name == "train":
        from alignjax.train import trainer

        return trainer.train
    raise AttributeError(f"module 'alignjax.train' has no attribute {name!r}")
