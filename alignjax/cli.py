"""The `alignjax` command line.

    alignjax train --config run.yaml optim.learning_rate=1e-4 loss.name=ipo
    alignjax eval --run runs/dpo [--step 200] [data.eval=path/to/test.jsonl]
    alignjax export --run runs/dpo [--out exported/] [--step 200]
    alignjax demo [--out runs/demo] [--quick]
    alignjax dpo|sft|kto|reward|grpo|rloo|online-dpo [--config recipe.yaml] [--dry-run]
             [--trl_field value ...] [dotted.key=value ...]

`train` takes a YAML or Python config (`alignjax.train.config`; no file: the defaults) and
dotted overrides; rerunning it on a run directory that has checkpoints resumes. `eval` and
`export` rebuild the run from its `config.yaml` and restore a checkpoint. `demo` is the
end-to-end example: SFT a tiny model on the shipped reviews, then DPO it with LoRA and the
adapters-disabled reference, and report the held-out reward accuracy (rerunning it on the same
`--out` resumes, so a finished demo only reprints its table). Bad configs exit with status 2 and
a message naming the key (ALIGNJAX_DEBUG=1 shows the traceback instead).

`dpo`, `sft`, `kto`, `reward`, `grpo`, `rloo` and `online-dpo` run a TRL recipe unchanged
(`alignjax.train.trl_recipe`, `trl_online_recipe`): a TRL config file with TRL's field names and
/ or TRL's flags (`--beta 0.1 --loss_type sigmoid ipo --loss_weights 0.8 0.2`, `--reward_funcs
sentiment my_lib.rewards.f`), then alignjax's dotted overrides; the mapping is printed before
the run (`--dry-run`: only printed).

On Linux the `alignjax` command restarts itself once with `GLIBC_TUNABLES` set to keep freed
memory in the heap (`GLIBC_HEAP`): XLA:CPU allocates a step's temporaries afresh every step, and
glibc otherwise maps and unmaps them, which costs page faults and system time. Measured with
`benchmarks/trl_head_to_head.py` at 128 tokens: 688 -> 645 ms per DPO step (dense attention),
665 -> 603 ms (blockwise). The process keeps its peak memory instead of returning it. An
existing `GLIBC_TUNABLES`, or `ALIGNJAX_GLIBC_TUNABLES=0`, leaves the process as it starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignjax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a config")
    t.add_argument("--config", help="a .yaml / .yml / .py config file (default: the defaults)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.learning_rate=1e-4")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on its held-out split")
    e.add_argument("--run", required=True, help="the run directory (holds config.yaml)")
    e.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.eval=test.jsonl")

    x = sub.add_parser("export", help="export a run's checkpoint to HF (merged) and HF PEFT")
    x.add_argument("--run", required=True, help="the run directory (holds config.yaml)")
    x.add_argument("--out", help="output directory (default: <run>/export)")
    x.add_argument("--step", type=int, help="which checkpoint (default: the latest)")

    d = sub.add_parser("demo", help="SFT then DPO + LoRA on the shipped data (a few minutes)")
    d.add_argument("--out", default="runs/demo", help="output directory")
    d.add_argument("--quick", action="store_true", help="a few steps only (tests)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name in TRL_COMMANDS:
        sub.add_parser(name, help=f"run a TRL `{name}` recipe (TRL's config fields and flags)")
    return p


TRL_COMMANDS = ("dpo", "sft", "kto", "reward", "grpo", "rloo", "online-dpo")


def _trl_main(command: str, argv: list[str]) -> int:
    """`alignjax <trl command> [--config FILE] [--dry-run] [--no-progress] [--flags] [k=v]`."""
    if any(a in ("-h", "--help") for a in argv):
        from alignjax.train import trl_online_recipe, trl_recipe

        print(__doc__.split("\n\n")[-1].strip())
        print(trl_recipe.__doc__)
        if command in trl_online_recipe.TASKS:
            print(trl_online_recipe.__doc__)
        return 0
    rest, config, dry, progress = [], None, False, True
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file")
            config, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a == "--dry-run":
            dry = True
        elif a == "--no-progress":
            progress = False
        else:
            rest.append(a)
        i += 1
    from alignjax.train import trl_recipe

    overrides = [a for a in rest if trl_recipe.is_override(a)]
    flags = [a for a in rest if not trl_recipe.is_override(a)]

    mapping = trl_recipe.from_trl(command, config, flags, overrides)
    print(mapping, flush=True)
    if dry:
        return 0
    from alignjax.train.trainer import train

    summary = train(mapping.config, progress=progress)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    trl = bool(argv) and argv[0] in TRL_COMMANDS
    args = None if trl else _parser().parse_args(argv)
    command = argv[0] if trl else args.command
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _trl_main(command, argv[1:]) if trl else _run(args)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("ALIGNJAX_DEBUG"):
            raise
        print(f"alignjax {command}: error: {err}", file=sys.stderr)
        print("(set ALIGNJAX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def _run(args) -> int:
    from alignjax.train import config as C

    if args.command == "train":
        from alignjax.train.trainer import train

        cfg = C.load_config(args.config, args.overrides)
        summary = train(cfg, progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
    elif args.command == "eval":
        from alignjax.train.trainer import evaluate_run

        print(json.dumps(evaluate_run(args.run, step=args.step, overrides=args.overrides),
                         indent=2))  # fmt: skip
    elif args.command == "export":
        from alignjax.train.trainer import export_run

        print(json.dumps(export_run(args.run, args.out, step=args.step), indent=2))
    else:
        from alignjax.train.demo import run_demo

        run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


GLIBC_HEAP = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
)


def entry() -> int:
    """The `alignjax` console command: `main()`, first restarted once with `GLIBC_HEAP` (see the
    module docstring) on Linux unless GLIBC_TUNABLES is set or ALIGNJAX_GLIBC_TUNABLES=0."""
    if (
        sys.platform.startswith("linux")
        and "GLIBC_TUNABLES" not in os.environ
        and os.environ.get("ALIGNJAX_GLIBC_TUNABLES", "1") != "0"
    ):
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_HEAP)
        try:
            os.execve(sys.executable, [sys.executable, "-m", "alignjax.cli", *sys.argv[1:]], env)
        except OSError:  # cannot restart (e.g. no executable path): run as we are
            pass
    return main()


if __name__ == "__main__":
    sys.exit(main())
