"""One process of the 2-process `jax.distributed` run of tests/test_train_distributed.py, and the
setup (model, data, optimizer, loss) that the test's single-device reference shares with it.

    ALIGNJAX_COORDINATOR=127.0.0.1:PORT ALIGNJAX_NUM_PROCESSES=2 ALIGNJAX_PROCESS_ID=I \\
        python tests/distributed_worker.py OUT.npz

Every process trains the same tiny Llama for `STEPS` DPO steps on each mesh of `LAYOUTS`, loading
only its own slice of every global batch; process 0 writes per-step losses, the final parameters
and the first global batch (all gathered from the devices of both processes) to OUT.npz.
"""

from __future__ import annotations

import sys

import numpy as np

STEPS = 5
BATCH = 8  # global, in pairs
EXAMPLES = 64
LENGTH = 64
LAYOUTS = {"data4": {"data": -1}, "data2_fsdp2": {"data": 2, "fsdp": 2}}


def config():
    from alignjax.models import LlamaConfig

    return LlamaConfig(
        vocab_size=512,  # the shipped tokenizer's
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def tiny_model():
    """Parameters drawn in NumPy from a fixed seed into the abstract model: the same values in
    every process, and no eager initialisation kernels to compile."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alignjax.models import LlamaForCausalLM

    cfg = config()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"unexpected non-float model state {x}")
        if x.ndim == 1:  # norm weights around 1
            return jnp.asarray(1 + rng.normal(0, 0.1, x.shape), x.dtype)
        return jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def loader(process_index: int, process_count: int):
    import datasets

    from alignjax import data

    datasets.disable_progress_bars()
    raw = data.shipped_dataset("train").select(range(EXAMPLES))
    tokenized = data.tokenize_dataset(
        raw, data.shipped_tokenizer(), config=data.TokenizeConfig(max_length=LENGTH)
    )
    return data.DataLoader(
        tokenized,
        data.LoaderConfig(batch_size=BATCH, seed=0, buckets=(LENGTH,)),
        process_index=process_index,
        process_count=process_count,
    )


def optimizer():
    """AdamW with eps = 1e-4 instead of optax's 1e-8: the update g / (|g| + eps) then moves
    smoothly with the gradient (see the test's docstring for why the default cannot be compared
    at 1e-5)."""
    import optax

    return optax.adamw(1e-3, eps=1e-4)


def step_spec():
    from alignjax.train import step as S

    return S.StepSpec(task="paired", loss="sigmoid", loss_kwargs={"beta": 0.1})


def flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def main(out_path: str) -> None:
    from alignjax.train import distributed

    info = distributed.initialize()  # everything from the ALIGNJAX_* environment
    assert info.process_count == 2 and info.device_count == 4, info

    import jax

    from alignjax.train import sharding
    from alignjax.train import step as S

    opt = optimizer()
    host_loader = loader(jax.process_index(), jax.process_count())
    out: dict[str, np.ndarray] = {}
    for name, axes in LAYOUTS.items():
        mesh = sharding.make_mesh(**axes)
        state = S.init_state(tiny_model(), opt, reference="frozen", seed=0)
        state = sharding.shard_state(state, mesh, sharding.param_specs(state, mesh))
        step = S.build_step(step_spec(), opt)
        losses = []
        for k, host_batch in host_loader.epoch(0):
            if k == STEPS:
                break
            batch = distributed.shard_host_batch(host_batch, mesh)
            if k == 0:
                out[f"{name}/host_examples"] = np.asarray(host_batch.valid.shape[0])
                for field in ("input_ids", "loss_mask", "rows"):
                    out[f"{name}/batch0/{field}"] = distributed.fetch(getattr(batch, field))
            state, metrics = step(state, batch)
            losses.append(distributed.fetch(metrics["loss"]))
        out[f"{name}/loss"] = np.asarray(losses)
        for key, value in flat(distributed.fetch(state.params)).items():
            out[f"{name}/param{key}"] = value
    if info.is_main:
        np.savez(out_path, **out)
    print(f"process {info.process_index}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
