"""A run's parts, built from a `TrainConfig`: tokenizer, data, model, adapters, step spec,
optimizer, state, reference caches, placement and step. `setup` composes them; `open_run`
restores a finished or interrupted run (config, tokenizer, model, state) for evaluation,
export, analysis or sampling.

    session = setup(cfg)                               # nothing trained yet
    run = open_run("runs/dpo")                         # the latest checkpoint's state
    policy = run.policy(merged=True)                   # an nnx.Module, adapters merged
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

from alignjax import data as D
from alignjax import models, peft
from alignjax.train import builders as B
from alignjax.train import checkpoint as C
from alignjax.train import config as cfg_lib
from alignjax.train import dynamics as DY
from alignjax.train import evaluate as E
from alignjax.train import reference as R
from alignjax.train import step as S
from alignjax.train.data import load_data, load_retain
from alignjax.train.placement import Placement, make_placement

__all__ = ["Session", "setup", "open_run", "build_model", "build_spec", "load_tokenizer"]

log = logging.getLogger(__name__)


def load_tokenizer(cfg: cfg_lib.TrainConfig):
    source = cfg.data.tokenizer
    if source == "shipped":
        return D.shipped_tokenizer()
    if source == "model":
        return D.load_tokenizer(model_dir(cfg))
    return D.load_tokenizer(source)


def model_dir(cfg: cfg_lib.TrainConfig) -> Path | None:
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
    """The policy: an HF directory / previous run, or a random model of `model.preset` size."""
    # dtype names as given: the model canonicalises them (one graph definition either way).
    kw = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    directory = model_dir(cfg)
    if directory is not None:
        model = models.load_pretrained(directory, **kw)
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                             f"the tokenizer's ({len(tokenizer)})")  # fmt: skip
        return model
    arch = models.LlamaConfig(vocab_size=len(tokenizer), **B.PRESETS[cfg.model.preset])
    return models.LlamaForCausalLM(arch, rngs=nnx.Rngs(cfg.seed), **kw)


def add_adapters(cfg: cfg_lib.TrainConfig, model) -> list[str]:
    p = cfg.peft
    if p.method is None:
        return []
    method = B.PEFT_METHODS[p.method]
    adapted = method.apply(model, p, cfg.seed + 1, method.layer_kwargs(p))
    if not adapted:
        raise ValueError(f"`peft.targets` {p.targets!r} matches no linear layer; the layers are "
                         f"{peft.linear_paths(model)[:8]} ...")  # fmt: skip
    return adapted


def build_spec(cfg: cfg_lib.TrainConfig, *, adapted: bool) -> S.StepSpec:
    """The step spec: the loss (a name or `loss.combine`) and its needs, reference, mask
    options, TR-DPO sync, the PEFT method's regulariser; one row block per process."""
    if cfg.task == "online":  # the method's loss at the sampling temperature
        from alignjax.train.online_step import online_spec

        return online_spec(cfg)
    mode = cfg.reference.mode
    loss = cfg.loss.name
    if cfg.loss.combine:
        from alignjax import losses

        loss = losses.combine([(name, float(w)) for name, w in cfg.loss.combine])
    kwargs = dict(cfg.loss.kwargs)
    if cfg.task in ("paired", "unpaired"):
        kwargs.setdefault("beta", 0.1 if cfg.loss.beta is None else cfg.loss.beta)
    elif cfg.task == "unlearn" and cfg.loss.beta is not None:  # else the loss's own default
        kwargs.setdefault("beta", cfg.loss.beta)
    mask_options = dict(cfg.loss.mask_options)
    if cfg.loss.mask_head != "all":
        if "variant" in mask_options:
            raise ValueError("loss.mask_head and loss.mask_options.variant both set the head "
                             "variant: give one")  # fmt: skip
        mask_options["variant"] = cfg.loss.mask_head
    method = B.PEFT_METHODS.get(cfg.peft.method) if cfg.peft.method else None
    regularizer = method.regularizer(cfg.peft) if method and method.regularizer else None
    try:
        spec = S.StepSpec(
            task=cfg.task,
            loss=loss,
            loss_kwargs=kwargs,
            reference=mode,
            sync_every=cfg.reference.sync_every,
            sync_alpha=cfg.reference.sync_alpha,
            row_blocks=jax.process_count(),  # each process feeds its own [chosen; rejected] block
            independent_masks=cfg.loss.independent_masks,
            mask_options=mask_options,
            regularizer=regularizer,
        )
    except ValueError as err:
        raise ValueError(f"loss.name / reference.mode: {err}") from None
    if spec.reference == "adapters_disabled" and not adapted:
        raise ValueError("reference.mode='adapters_disabled' needs adapters (set peft.method)")
    # KTO's KL baseline reads mismatched rows; other unpaired losses do not.
    return dataclasses.replace(spec, kto_kl=cfg.task == "unpaired" and spec.loss == "kto")


def build_state(cfg, model, optimizer, spec: S.StepSpec, adapted: list) -> S.TrainState:
    """The initial state: trainable params (adapters only under PEFT), the loss's heads (task
    reward: the value head "score") and carried state, the reference (`reference.path`:
    another checkpoint as the frozen one)."""
    heads = {} if spec.masks is None else spec.masks.heads(model.config, seed=cfg.seed + 2)
    if spec.task == "reward":  # the reward model's value head (`models.reward`)
        from alignjax.models.reward import HEAD_NAME, ValueHead

        heads = {HEAD_NAME: ValueHead(model.config.hidden_size, seed=cfg.seed + 2)}
    state = S.init_state(
        model,
        optimizer,
        wrt=peft.AdapterParam if adapted else nnx.Param,
        reference=spec.reference,
        seed=cfg.seed,
        loss=spec.loss,
        heads=heads,
    )
    if cfg.reference.path is not None and spec.reference == "frozen":
        if adapted:
            raise ValueError("reference.path with PEFT: use mode 'precomputed'")
        ref_model = models.load_pretrained(cfg.reference.path)
        state = state.replace(ref=nnx.state(ref_model, nnx.Param))
    return state


def reference_caches(cfg, spec, state, train_data, eval_data, out_dir: Path) -> tuple:
    """Precomputed reference log-probs of the train and eval splits (mode "precomputed"):
    the reference checkpoint `reference.path`, else the initial policy."""
    if spec.reference != "precomputed" or cfg.task == "online":  # online: at each rollout
        return (None, None)
    if spec.kto_kl:
        raise ValueError("KTO's mismatched rows have no precomputed reference log-probs; "
                         "use reference.mode 'frozen' or 'adapters_disabled'")  # fmt: skip
    if cfg.data.packing:
        raise ValueError("precomputed reference log-probs need padded batches (packing off)")
    ref = S.model_of(state)  # the initial policy (adapters start as the identity)
    if cfg.reference.path is not None:
        ref = models.load_pretrained(cfg.reference.path)
    cache_dir = cfg.reference.cache_dir or str(out_dir / "ref_cache")
    out = []
    for split in (train_data, eval_data):
        if split is None:
            out.append(None)
            continue
        cache = R.precompute(ref, split, cache_dir=cache_dir, batch_size=cfg.data.eval_batch_size)
        log.info("reference log-probs: %s (%s)", cache.path, "reused" if cache.loaded else "new")
        out.append(cache)
    return tuple(out)


def _attach(cache, then):
    if cache is None:
        return then
    return lambda batch: then(cache.attach(batch))


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
    placement: Placement
    step_fn: Any
    ref_caches: tuple = (None, None)  # precomputed reference log-probs (train, eval split)
    retain_data: Any = None  # task unlearn: the retain set (`train_data` is the forget set)
    mask: Any = None  # the importance mask (`mask:` config), a bool pytree like state.params
    adapted: list = dataclasses.field(default_factory=list)
    initial_state: Any = None  # the state before training (`open_run`, a resumed `train`)
    probe_data: Any = None  # `data.probe`, the DPO-dynamics dispersion probe's rows
    dynamics: Any = None  # paired runs with an eval split: a `dynamics.DynamicsRecorder`
    rollouts: Any = None  # task online: the rollout phase and step (`online.OnlinePhase`)
    _eval_step: Any = None
    _probe_step: Any = None

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def to_device(self):
        """Host train batch -> device batch (with the precomputed reference attached)."""
        return _attach(self.ref_caches[0], self.placement.put_batch)

    def saveable(self, state):
        """What a checkpoint stores: adapter-only drops the frozen base (rebuilt from the model
        source on restore)."""
        return state.replace(rest=None) if self.cfg.checkpoint.adapters_only else state

    def checkpointer(self) -> C.Checkpointer:
        c = self.cfg.checkpoint
        return C.Checkpointer(self.out_dir / "checkpoints", every=c.every, keep=c.keep,
                              best_metric=c.best_metric, best_mode=c.best_mode,
                              asynchronous=c.asynchronous)  # fmt: skip

    def restore(self, checkpointer, step: int | None = None):
        """The state of a checkpoint (default: the latest), placed like the session's."""
        fresh = self.placement.to_checkpoint(self.state)
        restored, _ = checkpointer.restore(step, target=self.saveable(fresh))
        if self.cfg.checkpoint.adapters_only:
            restored = restored.replace(rest=fresh.rest)
        return self.placement.from_checkpoint(restored, self.state)

    def host_state(self, state=None) -> S.TrainState:
        """The state with every array whole on this host (a collective across processes)."""
        return self.placement.host_state(self.state if state is None else state)

    def policy(self, state=None, *, merged: bool = False) -> nnx.Module:
        """The policy of `state` (default: the session's) as a host model; `merged=True` merges
        and removes PEFT adapters (a plain model, e.g. for sampling)."""
        model = S.model_of(self.host_state(state))
        return peft.unload(model, merge_first=True) if merged and self.adapted else model

    def eval_loader(self, split=None):
        """Every row of `split` (default: the eval split) once, in order, padded batches of
        `data.eval_batch_size` (rounded up to the process count); None without a split."""
        split = self.eval_data if split is None else split
        if split is None:
            return None
        d = self.cfg.data
        n = -(-d.eval_batch_size // jax.process_count()) * jax.process_count()
        config = D.LoaderConfig(batch_size=n, shuffle=False, buckets=d.buckets,
                                remainder="pad", kto_kl=self.spec.kto_kl)  # fmt: skip
        return D.DataLoader(split, config)

    def unlearn_loader(self) -> D.UnlearnLoader:
        """Task unlearn's training batches: `data.batch_size / optim.grad_accum` forget rows
        with as many retain rows (`data.UnlearnLoader`)."""
        d, o = self.cfg.data, self.cfg.optim
        if d.batch_size % o.grad_accum or d.packing:
            raise ValueError(f"task=unlearn: `data.batch_size` {d.batch_size} must split into "
                             f"`optim.grad_accum` {o.grad_accum} micro-batches, and "
                             "`data.packing` false (padded [forget; retain] rows)")  # fmt: skip
        config = D.LoaderConfig(batch_size=d.batch_size // o.grad_accum, seed=d.seed,
                                buckets=d.buckets, sort_window=d.sort_window)  # fmt: skip
        return D.UnlearnLoader(self.train_data, self.retain_data, config)

    def _evaluate_unlearn(self, state) -> dict:
        """Task unlearn: token-mean NLL and perplexity of the forget set (`forget/...`), the
        retain set (`retain/...`) and `data.eval` if given (no prefix), under the policy."""
        spec = S.StepSpec(task="sft", loss="sft", reference="none")
        state, put = self.placement.eval_inputs(self.state if state is None else state)
        if self._eval_step is None:
            self._eval_step = E.build_eval_step(spec)
        out = {}
        for prefix, split in (("forget/", self.train_data), ("retain/", self.retain_data),
                              ("", self.eval_data)):  # fmt: skip
            if split is None:
                continue
            res = E.evaluate(state, self._eval_step, self.eval_loader(split), task="sft",
                             max_batches=self.cfg.eval_batches, to_device=put)  # fmt: skip
            out.update({f"{prefix}{k}": v for k, v in res.items()})
        return out

    def evaluate(self, state=None) -> dict:
        """Metrics on the eval split (`evaluate.evaluate`); {} without one. Paired runs add the
        DPO-dynamics diagnostics `dynamics/*` (`train.dynamics`; an evaluation of a step-0
        state is their baseline). Task unlearn: the forget, retain (and eval) sets' NLL. Task
        online: the reward of sampled completions of the held-out prompts."""
        if self.cfg.task == "unlearn":
            return self._evaluate_unlearn(state)
        if self.eval_data is None:
            return {}
        if self.cfg.task == "online":  # sampled completions of the held-out prompts
            return self.rollouts.evaluate(self.state if state is None else state)
        state = self.state if state is None else state
        examples, probe = self.eval_examples(state)
        out = E.eval_metrics(examples, task=self.spec.task)
        if self.dynamics is not None:
            out.update(self._dynamics(state, DY.held_out_values(examples, probe)))
        return out

    def eval_examples(self, state=None) -> tuple[dict, dict | None]:
        """The eval step's per-example arrays over the eval split (`evaluate.eval_examples`)
        and the probe step's over `data.probe` (None without a probe)."""
        placed, put = self.placement.eval_inputs(self.state if state is None else state)
        if self._eval_step is None:
            self._eval_step = E.build_eval_step(self.spec)
        n = self.cfg.eval_batches
        examples = E.eval_examples(placed, self._eval_step, self.eval_loader(), max_batches=n,
                                   to_device=_attach(self.ref_caches[1], put))  # fmt: skip
        if self.probe_data is None:
            return examples, None
        if self._probe_step is None:
            self._probe_step = DY.build_probe_step()
        probe = E.eval_examples(placed, self._probe_step, self.eval_loader(self.probe_data),
                                max_batches=n, to_device=put)  # fmt: skip
        return examples, probe

    def _dynamics(self, state, values: dict) -> dict:
        """`dynamics/*` of held-out values against the step-0 baseline: kept from this
        session's step-0 evaluation, else read from the run directory, else recomputed from
        `initial_state` (saved only where no baseline file exists)."""
        rec = self.dynamics
        step = self.placement.host_position(state)[0]
        if step and not rec.ready(values):
            if self.initial_state is None:
                log.warning("step %d: no step-0 baseline for the dynamics/* diagnostics (evaluate "
                            "the initial state first); not logged", step)  # fmt: skip
                return {}
            log.info("dynamics/*: the step-0 baseline is recomputed from the initial state")
            baseline = DY.held_out_values(*self.eval_examples(self.initial_state))
            missing = not rec.path.is_file()
            rec.record(0, baseline, save=self.is_main and missing)
        return rec.record(step, values, save=self.is_main)


def distributed_init(cfg: cfg_lib.TrainConfig) -> None:
    from alignjax.train import distributed

    m = cfg.mesh
    distributed.initialize(m.coordinator_address, m.num_processes, m.process_id)


def setup(cfg: cfg_lib.TrainConfig, *, with_train_data: bool = True) -> Session:
    """Build a run's session (no training): tokenizer, data, model, state, placement, step."""
    distributed_init(cfg)
    out_dir = Path(cfg.out_dir).absolute()
    tokenizer = load_tokenizer(cfg)
    with_train_data = with_train_data or cfg.task == "unlearn"  # the forget set is evaluated
    train_data, eval_data = load_data(cfg, tokenizer, with_train_data=with_train_data)
    retain_data = load_retain(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    adapted = add_adapters(cfg, model)
    spec = build_spec(cfg, adapted=bool(adapted))
    if cfg.data.packing and (cfg.mesh.pmap or jax.process_count() > 1):
        raise ValueError("packed batches index their host's rows; use data.packing=false with "
                         "mesh.pmap or several processes")  # fmt: skip
    method = B.PEFT_METHODS[cfg.peft.method] if cfg.peft.method else None
    optimizer, schedule = B.build_optimizer(cfg, peft_method=method)
    placement = make_placement(cfg.mesh)
    session = Session(cfg=cfg, out_dir=out_dir, tokenizer=tokenizer, train_data=train_data,
                      eval_data=eval_data, spec=spec, optimizer=optimizer, schedule=schedule,
                      state=None, placement=placement, step_fn=None, retain_data=retain_data,
                      adapted=adapted)  # fmt: skip
    if cfg.task == "paired" and eval_data is not None:  # no held-out pairs: nothing to probe
        session.probe_data = DY.load_probe(cfg, tokenizer)
        session.dynamics = DY.DynamicsRecorder(out_dir / DY.BASELINE_FILE)
    if cfg.mask.score is not None or cfg.mask.path is not None:
        from alignjax.train.importance import mask_optimizer, run_mask

        initial = placement.put_state(build_state(cfg, model, optax.identity(), spec, adapted))
        session.mask = run_mask(cfg, initial, session.unlearn_loader, placement=placement,
                                out_dir=out_dir, is_main=session.is_main)  # fmt: skip
        del initial
        optimizer = session.optimizer = mask_optimizer(optimizer, session.mask, cfg.mask.mode)
    state = build_state(cfg, model, optimizer, spec, adapted)
    session.ref_caches = reference_caches(cfg, spec, state, train_data, eval_data, out_dir)
    session.state = placement.put_state(state)
    session.step_fn = placement.build_step(spec, optimizer, learning_rate=schedule)
    if cfg.task == "online":
        from alignjax.train.online import OnlinePhase

        session.rollouts = OnlinePhase(session)
    return session


def open_run(run_dir: str | Path, step: int | None = None, *, overrides=()) -> Session:
    """A run restored from its directory: the config it was trained with (`config.yaml`, plus
    `overrides`), tokenizer, model, and the checkpoint `step` (default: the latest) in
    `session.state`; the state before training stays in `session.initial_state`. The training
    data is not loaded (`data.eval` is, if the config names one)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml (not a run directory)")
    cfg = cfg_lib.load_config(config, overrides)
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    session = setup(cfg, with_train_data=False)
    session.initial_state = session.state
    with session.checkpointer() as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {session.out_dir / 'checkpoints'}")
        session.state = session.restore(ckpt, step)
    return session
