"""A training run from a `TrainConfig`: data, model, PEFT, optimizer, reference, placement,
loop, evaluation, checkpoints, export. What `alignjax train / eval / export` run.

    summary = train(load_config("run.yaml", ["loss.beta=0.2"]))

The run directory (`cfg.out_dir`):

    config.yaml            the resolved config (what `eval` / `export` / a resume rebuild from)
    metrics.jsonl, tb/     train/* and eval/* metrics (TRL's names), TensorBoard events
    checkpoints/<step>/    orbax checkpoints (adapter-only with checkpoint.adapters_only)
    eval.json              the final evaluation; samples.jsonl: completions of held-out prompts
    export/merged/         HF safetensors + config + tokenizer (adapters merged)
    export/adapter/        the adapters in HF PEFT format (PEFT runs)
    curves.png             training and evaluation curves

Starting `train` on a directory that holds checkpoints resumes from the latest one (bitwise the
same continuation as an uninterrupted run). The model is a local HF directory (`model.path`),
a previous run (`init_from`), or a random model of a `PRESETS` size with the tokenizer's
vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax import data as D
from alignjax import models, peft
from alignjax.optim import adamp, sgdp
from alignjax.train import checkpoint as C
from alignjax.train import config as cfg_lib
from alignjax.train import evaluate as E
from alignjax.train import loop as L
from alignjax.train import metrics as M
from alignjax.train import reference as R
from alignjax.train import sharding as SH
from alignjax.train import step as S

__all__ = ["PRESETS", "Session", "setup", "train", "evaluate_run", "export_run"]

log = logging.getLogger(__name__)

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "base": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4),
}  # fmt: skip
TASK_KINDS = {
    "sft": ("language_modeling", "prompt_completion"),
    "paired": ("paired", "sppo"),
    "unpaired": ("unpaired",),
}
OPTIMIZERS = ("adamw", "adam", "sgd", "adamp", "sgdp")
SCHEDULES = ("constant", "linear", "cosine")


# ----------------------------------------------------------------------------- building blocks


def _dtype(name: str | None):
    return None if name is None else jnp.dtype(name)


def load_tokenizer(cfg: cfg_lib.TrainConfig):
    source = cfg.data.tokenizer
    if source == "shipped":
        return D.shipped_tokenizer()
    if source == "model":
        return D.load_tokenizer(_model_dir(cfg))
    return D.load_tokenizer(source)


def _model_dir(cfg: cfg_lib.TrainConfig) -> Path | None:
    """The HF directory the policy starts from (`init_from` or `model.path`), if any."""
    source = cfg.init_from or cfg.model.path
    if source is None:
        return None
    path = Path(source)
    if (path / "export" / "merged" / "config.json").is_file():  # a previous run
        return path / "export" / "merged"
    if not (path / "config.json").is_file():
        what = "init_from" if cfg.init_from else "model.path"
        raise ValueError(f"`{what}` {source!r} is neither an HF model directory (config.json) "
                         "nor a run directory with export/merged")  # fmt: skip
    return path


def build_model(cfg: cfg_lib.TrainConfig, tokenizer) -> models.LlamaForCausalLM:
    kw = dict(
        dtype=_dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        remat=cfg.model.remat,
    )
    directory = _model_dir(cfg)
    if directory is not None:
        model = models.load_pretrained(directory, **kw)
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                             f"the tokenizer's ({len(tokenizer)})")  # fmt: skip
        return model
    if cfg.model.preset not in PRESETS:
        raise ValueError(f"`model.preset` must be one of {sorted(PRESETS)}, got "
                         f"{cfg.model.preset!r}")  # fmt: skip
    arch = models.LlamaConfig(vocab_size=len(tokenizer), **PRESETS[cfg.model.preset])
    return models.LlamaForCausalLM(arch, rngs=nnx.Rngs(cfg.seed), **kw)


def add_adapters(cfg: cfg_lib.TrainConfig, model) -> list[str]:
    p = cfg.peft
    if p.method is None:
        return []
    rule = peft.Rule(p.targets, p.method, rank=p.r, alpha=p.alpha, options=dict(p.kwargs))
    adapted = peft.apply(model, [rule], rngs=nnx.Rngs(cfg.seed + 1))
    if not adapted:
        raise ValueError(f"`peft.targets` {p.targets!r} matches no linear layer; the layers are "
                         f"{peft.linear_paths(model)[:8]} ...")  # fmt: skip
    return adapted


def mask_heads(cfg: cfg_lib.TrainConfig, model, spec: S.StepSpec) -> dict:
    """SparsePO's mask heads (`losses.sparse_mask.SparseMaskHead`) on the model's layers, one
    per name in `spec.head_names`; dropout off (the step carries no dropout rng)."""
    from alignjax.losses.sparse_mask import SparseMaskHead

    arch = model.config
    return {
        name: SparseMaskHead(
            arch.num_hidden_layers,
            arch.hidden_size,
            variant=cfg.loss.mask_head,
            dropout=0.0,
            rngs=nnx.Rngs(cfg.seed + 2 + k),
        )
        for k, name in enumerate(spec.head_names)
    }


def build_optimizer(cfg: cfg_lib.TrainConfig):
    """(optax transform, learning-rate schedule) from `cfg.optim` over `cfg.steps` updates."""
    o = cfg.optim
    if o.name not in OPTIMIZERS:
        raise ValueError(f"`optim.name` must be one of {OPTIMIZERS}, got {o.name!r}")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"`optim.schedule` must be one of {SCHEDULES}, got {o.schedule!r}")
    warmup = min(o.warmup_steps, max(cfg.steps - 1, 0))
    decay = max(cfg.steps - warmup, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.learning_rate, 0.0, decay)
    else:
        after = optax.cosine_decay_schedule(o.learning_rate, decay)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup]
    ) if warmup else after  # fmt: skip
    if o.name == "adamw":
        tx = optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay)
    elif o.name == "adam":
        tx = optax.adam(schedule, o.b1, o.b2, o.eps)
    elif o.name == "sgd":
        tx = optax.sgd(schedule, momentum=o.b1 or None)
    elif o.name == "adamp":
        tx = adamp(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay)
    else:
        tx = sgdp(schedule, momentum=o.b1, weight_decay=o.weight_decay)
    if o.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    return tx, schedule


def load_split(source: str, cfg: cfg_lib.TrainConfig, tokenizer, task: str):
    """`shipped:<split>` (train / test / sft) or a local file / directory (`path` or
    `path::split`), tokenized and checked against the task."""
    if source.startswith("shipped:"):
        raw = D.shipped_dataset(source.split(":", 1)[1], cache_dir=cfg.data.cache_dir)
    else:
        path, _, split = source.partition("::")
        raw = D.load_preference_dataset(path, split=split or "train", cache_dir=cfg.data.cache_dir)
    d = cfg.data
    tok_cfg = D.TokenizeConfig(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        max_completion_length=d.max_completion_length,
        truncation_mode=d.truncation_mode,
    )
    tokenized = D.tokenize_dataset(
        raw, tokenizer, config=tok_cfg, columns=dict(d.columns) or None, on_error=d.on_error
    )
    if tokenized.format.kind not in TASK_KINDS[task]:
        raise ValueError(
            f"{source!r} holds {tokenized.format.kind} rows, but task={task!r} needs "
            f"{' or '.join(TASK_KINDS[task])} rows"
        )
    if tokenized.report.n_skipped:
        log.warning("%s: %s", source, tokenized.report)
    return tokenized


def loss_kwargs(cfg: cfg_lib.TrainConfig) -> dict:
    kw = dict(cfg.loss.kwargs)
    if cfg.task != "sft":
        kw.setdefault("beta", cfg.loss.beta)
    return kw


def _loss(cfg: cfg_lib.TrainConfig):
    """A registered loss name, or the weighted combination of `loss.combine`."""
    if not cfg.loss.combine:
        return cfg.loss.name
    from alignjax import losses

    return losses.combine([(name, float(w)) for name, w in cfg.loss.combine])


# ----------------------------------------------------------------------------------- session


@dataclasses.dataclass
class Session:
    """Everything a run is made of (see `setup`)."""

    cfg: cfg_lib.TrainConfig
    out_dir: Path
    tokenizer: Any
    train_data: Any
    eval_data: Any
    spec: S.StepSpec
    optimizer: Any
    schedule: Any
    state: S.TrainState
    placement: L.Placement
    to_device: Any
    step_fn: Any
    put_batch: Any = None
    mesh: Any = None
    ref_caches: tuple = (None, None)  # precomputed reference log-probs (train, eval split)
    adapted: list = dataclasses.field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    # -- checkpoints: adapter-only drops the frozen base (rebuilt from the model source)
    def _saveable(self, state):
        state = self.placement.to_checkpoint(state)
        if self.cfg.checkpoint.adapters_only:
            state = state.replace(rest=None)
        return state

    def checkpointer(self) -> C.Checkpointer:
        c = self.cfg.checkpoint
        return C.Checkpointer(
            self.out_dir / "checkpoints",
            every=c.every,
            keep=c.keep,
            best_metric=c.best_metric,
            best_mode=c.best_mode,
            asynchronous=c.asynchronous,
        )

    def restore(self, checkpointer, step: int | None = None):
        """The state of a checkpoint (default: the latest), placed like the session's."""
        fresh = self.state
        target = self._saveable(fresh)
        restored, _ = checkpointer.restore(step, target=target)
        if self.cfg.checkpoint.adapters_only:
            restored = restored.replace(rest=self.placement.to_checkpoint(fresh).rest)
        return self.placement.from_checkpoint(restored, fresh)

    def host_state(self, state=None) -> S.TrainState:
        """The state with every array whole on this host (a collective across processes)."""
        state = self.placement.to_checkpoint(self.state if state is None else state)
        if jax.process_count() > 1:
            from alignjax.train.distributed import fetch

            state = fetch(state)
        return state

    def eval_loader(self):
        if self.eval_data is None:
            return None
        d = self.cfg.data
        n = d.eval_batch_size
        n = -(-n // jax.process_count()) * jax.process_count()
        return D.DataLoader(
            self.eval_data,
            D.LoaderConfig(
                batch_size=n,
                shuffle=False,
                buckets=d.buckets,
                remainder="pad",
                kto_kl=self.spec.kto_kl,
            ),
        )

    def evaluate(self, state=None) -> dict:
        """Metrics on the eval split (`evaluate.evaluate`), on the host copy for pmap runs."""
        loader = self.eval_loader()
        if loader is None:
            return {}
        state = self.state if state is None else state
        if isinstance(self.placement, L.PmapPlacement):
            state, to_device = self.host_state(state), _attach(self.ref_caches[1], _to_jax)
        else:
            to_device = _attach(self.ref_caches[1], self.put_batch)
        if not hasattr(self, "_eval_step"):
            self._eval_step = E.build_eval_step(self.spec)
        return E.evaluate(
            state,
            self._eval_step,
            loader,
            task=self.spec.task,
            max_batches=self.cfg.eval_batches,
            to_device=to_device,
        )


def split_batch_for_pmap(batch: D.Batch, n: int) -> D.Batch:
    """`[k E, ...]` rows (k blocks of E examples: `[chosen; rejected]`) and `[E]` per-example
    arrays -> `[n, ...]` per device, each device holding `[chosen; rejected]` of its own E / n
    examples (a plain split of the rows would pair one device's chosen rows with another's)."""
    examples = batch.valid.shape[0]
    if examples % n:
        raise ValueError(f"a batch of {examples} examples does not split over {n} devices")
    rows = batch.input_ids.shape[0]
    sides = rows // examples

    def one(x):
        x = np.asarray(x)
        if x.ndim and x.shape[0] == rows and sides > 1:
            x = x.reshape(sides, n, examples // n, *x.shape[1:]).swapaxes(0, 1)
            return x.reshape(n, rows // n, *x.shape[3:])
        return SH.split_for_pmap(x, n)

    return jax.tree.map(one, batch)


def _to_jax(batch):
    return jax.tree.map(jnp.asarray, batch)


def _attach(cache, then):
    if cache is None:
        return then
    return lambda batch: then(cache.attach(batch))


def distributed_init(cfg: cfg_lib.TrainConfig) -> None:
    from alignjax.train import distributed

    m = cfg.mesh
    distributed.initialize(m.coordinator_address, m.num_processes, m.process_id)


def setup(cfg: cfg_lib.TrainConfig, *, with_train_data: bool = True) -> Session:
    """Build a run's session (no training): tokenizer, data, model, state, placement, step."""
    distributed_init(cfg)
    if cfg.task not in TASK_KINDS:
        raise ValueError(f"`task` must be one of {sorted(TASK_KINDS)}, got {cfg.task!r}")
    if cfg.steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {cfg.steps}")
    out_dir = Path(cfg.out_dir)
    tokenizer = load_tokenizer(cfg)
    train_data = load_split(cfg.data.train, cfg, tokenizer, cfg.task) if with_train_data else None
    eval_data = load_split(cfg.data.eval, cfg, tokenizer, cfg.task) if cfg.data.eval else None

    model = build_model(cfg, tokenizer)
    adapted = add_adapters(cfg, model)
    mode = "none" if cfg.task == "sft" else cfg.reference.mode
    if mode == "adapters_disabled" and not adapted:
        raise ValueError("reference.mode='adapters_disabled' needs adapters (set peft.method)")
    kto_kl = cfg.task == "unpaired" and cfg.loss.name == "kto"
    spec = S.StepSpec(
        task=cfg.task,
        loss=_loss(cfg),
        loss_kwargs=loss_kwargs(cfg),
        reference=mode,
        kto_kl=kto_kl,
        sync_every=cfg.reference.sync_every,
        sync_alpha=cfg.reference.sync_alpha,
        row_blocks=jax.process_count(),  # each process feeds its own [chosen; rejected] block
        independent_masks=cfg.loss.independent_masks,
    )
    if cfg.data.packing and (cfg.mesh.pmap or jax.process_count() > 1):
        raise ValueError("packed batches index their host's rows; use data.packing=false with "
                         "mesh.pmap or several processes")  # fmt: skip
    optimizer, schedule = build_optimizer(cfg)
    wrt = peft.AdapterParam if adapted else nnx.Param
    heads = mask_heads(cfg, model, spec)
    state = S.init_state(
        model, optimizer, wrt=wrt, reference=mode, seed=cfg.seed, loss=spec.loss, heads=heads
    )
    if cfg.reference.path is not None and mode in ("frozen", "precomputed"):
        ref_model = models.load_pretrained(cfg.reference.path)
        if mode == "frozen":
            if adapted:
                raise ValueError("reference.path with PEFT: use mode 'precomputed'")
            state = state.replace(ref=nnx.state(ref_model, nnx.Param))
    else:
        ref_model = None

    ref_caches = (None, None)
    if mode == "precomputed":
        if kto_kl:
            raise ValueError("KTO's mismatched rows have no precomputed reference log-probs; "
                             "use reference.mode 'frozen' or 'adapters_disabled'")  # fmt: skip
        if cfg.data.packing:
            raise ValueError("precomputed reference log-probs need padded batches (packing off)")
        ref = ref_model
        if ref is None:  # the initial policy (with its adapters, which start as the identity)
            ref = S.model_of(state)
        cache_dir = cfg.reference.cache_dir or str(out_dir / "ref_cache")
        ref_caches = tuple(
            None if t is None else _precompute(ref, t, cache_dir, cfg)
            for t in (train_data, eval_data)
        )

    devices = jax.devices()
    if cfg.mesh.devices != -1:
        if not 1 <= cfg.mesh.devices <= len(devices):
            raise ValueError(f"`mesh.devices`={cfg.mesh.devices}: there are {len(devices)}")
        devices = devices[: cfg.mesh.devices]
    mesh = None
    if cfg.mesh.pmap:
        local = [d for d in devices if d.process_index == jax.process_index()]
        placement = L.PmapPlacement(local)
        state = SH.replicate(state, local)
        step_fn = S.build_step(spec, optimizer, learning_rate=schedule, axis_name="batch")
        put_batch = lambda b: split_batch_for_pmap(b, len(local))  # noqa: E731
    elif len(devices) > 1:
        m = cfg.mesh
        mesh = SH.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
        specs = SH.param_specs(state, mesh)
        shardings = SH.state_shardings(mesh, specs)
        state = SH.shard_state(state, mesh, specs)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step_fn = S.build_step(
            spec, optimizer, learning_rate=schedule, out_shardings=(shardings, replicated)
        )
        placement = L.Placement()
        put_batch = lambda b: SH.shard_batch(b, mesh)  # noqa: E731
    else:
        placement = L.Placement()
        # Committed, like the state every step returns: otherwise step 2 compiles again.
        state = jax.device_put(state, devices[0])
        step_fn = S.build_step(spec, optimizer, learning_rate=schedule)
        put_batch = lambda b: jax.device_put(b, devices[0])  # noqa: E731
    return Session(
        cfg=cfg,
        out_dir=out_dir,
        tokenizer=tokenizer,
        train_data=train_data,
        eval_data=eval_data,
        spec=spec,
        optimizer=optimizer,
        schedule=schedule,
        state=state,
        placement=placement,
        to_device=_attach(ref_caches[0], put_batch),
        step_fn=step_fn,
        put_batch=put_batch,
        mesh=mesh,
        ref_caches=ref_caches,
        adapted=adapted,
    )


def _precompute(ref, tokenized, cache_dir, cfg):
    cache = R.precompute(ref, tokenized, cache_dir=cache_dir, batch_size=cfg.data.eval_batch_size)
    log.info("reference log-probs: %s (%s)", cache.path, "reused" if cache.loaded else "new")
    return cache


# --------------------------------------------------------------------------------------- run


def _train_loader(session: Session):
    d, o = session.cfg.data, session.cfg.optim
    if d.batch_size % o.grad_accum:
        raise ValueError(f"`data.batch_size` {d.batch_size} is not divisible by "
                         f"`optim.grad_accum` {o.grad_accum}")  # fmt: skip
    return D.DataLoader(
        session.train_data,
        D.LoaderConfig(
            batch_size=d.batch_size // o.grad_accum,
            seed=d.seed,
            buckets=d.buckets,
            sort_window=d.sort_window,
            packing=d.packing,
            pack_length=d.pack_length,
            pack_rows=d.pack_rows,
            kto_kl=session.spec.kto_kl,
        ),
    )


def train(cfg: cfg_lib.TrainConfig, *, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns a summary (final eval metrics, paths)."""
    session = setup(cfg)
    out = session.out_dir
    if session.is_main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg_lib.to_dict(cfg), sort_keys=False))
    loader = _train_loader(session)
    with session.checkpointer() as ckpt:
        state = session.state
        if ckpt.latest_step() is not None:
            state = session.restore(ckpt)
            log.info("resumed from step %d", ckpt.latest_step())
        done = session.placement.host_position(state)[0]
        purge = done + 1 if done else None
        writer = M.MetricsWriter(out, purge_step=purge) if session.is_main else None
        bar = M.Progress(cfg.steps, initial=done, enabled=progress, desc=cfg.task)
        last_eval: dict = {}

        def eval_fn(state):
            last_eval.clear()
            last_eval.update(session.evaluate(state))
            return dict(last_eval)

        try:
            state = L.run(
                state,
                session.step_fn,
                loader,
                steps=cfg.steps,
                to_device=session.to_device,
                checkpointer=_AdapterOnly(ckpt, session) if cfg.checkpoint.adapters_only else ckpt,
                writer=writer,
                progress=bar,
                log_every=cfg.log_every,
                eval_fn=eval_fn if session.eval_data is not None else None,
                eval_every=cfg.eval_every,
                accum=cfg.optim.grad_accum,
                placement=session.placement,
            )
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    session.state = state
    summary = {"steps": cfg.steps, "out_dir": str(out), "skipped": int(np.max(state.skipped))}
    if session.eval_data is not None:
        summary["eval"] = dict(last_eval) or session.evaluate(state)
    needs_host = (cfg.eval_samples and session.eval_data is not None) or cfg.checkpoint.export_hf
    host = session.host_state(state) if needs_host else None  # every process takes part
    if session.is_main:
        if cfg.eval_samples and session.eval_data is not None:
            (out / "samples.jsonl").unlink(missing_ok=True)
            n = min(cfg.eval_samples, len(session.eval_data))
            E.sample_completions(
                host,
                session.tokenizer,
                [session.eval_data[i] for i in range(n)],
                max_new_tokens=cfg.sample_tokens,
                path=out / "samples.jsonl",
            )
        if cfg.checkpoint.export_hf:
            summary["export"] = export_run(session, out / "export", state=host)
        if cfg.plot:
            summary["curves"] = str(M.plot_curves(out / "metrics.jsonl", out / "curves.png"))
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
    return summary


class _AdapterOnly:
    """A Checkpointer view that saves states without the frozen base weights."""

    def __init__(self, ckpt, session):
        self.ckpt, self.session = ckpt, session
        self.best_metric = ckpt.best_metric

    def save(self, step, state, **kw):
        return self.ckpt.save(step, state.replace(rest=None), **kw)

    def wait(self):
        self.ckpt.wait()


# ------------------------------------------------------------------------- eval and export


def _session_from_run(run_dir: str | Path, overrides=()) -> Session:
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml (not a run directory)")
    cfg = cfg_lib.load_config(config, overrides)
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    return setup(cfg, with_train_data=False)


def _restore_latest(session: Session, step: int | None = None) -> None:
    with session.checkpointer() as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {session.out_dir / 'checkpoints'}")
        session.state = session.restore(ckpt, step)


def evaluate_run(run_dir: str | Path, *, step: int | None = None, overrides=()) -> dict:
    """Evaluate a run's checkpoint (default: the latest) on its eval split (or
    `data.eval=...` in `overrides`)."""
    session = _session_from_run(run_dir, overrides)
    if session.eval_data is None:
        raise ValueError("the run has no eval split; pass data.eval=<source>")
    _restore_latest(session, step)
    result = session.evaluate()
    result["step"] = session.placement.host_position(session.state)[0]
    return result


def export_run(
    session_or_dir, out: str | Path | None = None, *, step: int | None = None, state=None
) -> dict:
    """Write `out/merged` (HF safetensors, adapters merged, plus the tokenizer) and, for PEFT
    runs, `out/adapter` (HF PEFT format). From a session, or a run directory's checkpoint."""
    if isinstance(session_or_dir, Session):
        session = session_or_dir
    else:
        session = _session_from_run(session_or_dir)
        _restore_latest(session, step)
    out = Path(out) if out is not None else session.out_dir / "export"
    model = S.model_of(session.host_state() if state is None else state)
    paths = {}
    if session.adapted:
        path = peft.export_adapters(model, out / "adapter")
        session.tokenizer.save_pretrained(str(out / "adapter"))
        paths["adapter"] = str(path)
        model = peft.unload(model, merge_first=True)
    merged = models.save_pretrained(model, out / "merged")
    session.tokenizer.save_pretrained(str(out / "merged"))
    paths["merged"] = str(merged)
    return paths
