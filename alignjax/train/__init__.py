"""Training (issue 7, in progress): `config` (frozen dataclasses, YAML / Python files, dotted
overrides) and `step` (TrainState, the jitted step with exact accumulation, the frozen /
adapters-disabled / precomputed reference and the non-finite guard). Import the modules:
`from alignjax.train import step, config`."""
