"""Training (issue 7, in progress). Modules, imported by name
(`from alignjax.train import step, sharding, checkpoint`):

- `config`: frozen dataclasses, YAML / Python files, dotted overrides.
- `step`: TrainState and the jitted step (exact accumulation, frozen / adapters-disabled /
  precomputed reference, TR-DPO sync, non-finite guard).
- `reference`: precomputed reference log-probs, cached by a fingerprint of data and weights.
- `sharding`: the ("data", "fsdp", "tensor") mesh, partition rules, batch sharding, pmap.
- `checkpoint`: orbax checkpoints (every N, latest + best K, SIGKILL-safe, bitwise restore).
- `metrics`: JSONL + TensorBoard metrics, a tqdm progress bar with tokens/s.
- `loop`: `run` (data position, metrics, checkpoints) and `resume` (bitwise continuation).
"""
