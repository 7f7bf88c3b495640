"""A TRL DPO recipe run by TRL 1.16 itself: the fixture behind "Coming from TRL".

    cd <repo root> && python tests/reference/generate_trl_recipe_run.py

(in a venv with torch==2.13.0 (CPU), trl==1.16.0, transformers==5.23.0, datasets, pyyaml; no
network, no jax). It (re)writes `tests/reference/fixtures/trl_recipe/`:

* `model/`: a tiny random `LlamaForCausalLM` (vocab 512, hidden 32, 2 layers, 4 heads / 2 KV
  heads, intermediate 64, untied embeddings; seeded init) written by transformers'
  `save_pretrained` in float32, and the shipped tokenizer (alignjax/data/assets/tokenizer,
  read by path: the reference venv has no jax) written there by `tokenizer.save_pretrained`;
* `data/train.jsonl`: the first 8 rows of alignjax/data/assets/reviews/train.jsonl, unchanged.
  `dataset_name` names the DIRECTORY: `trl dpo` loads it with `datasets.load_dataset(name)`,
  which takes a local directory (a file named `train.jsonl` becomes the "train" split) but not a
  path to a `.jsonl` file (datasets 5.2: "FileNotFoundError: Couldn't find any data file at
  .../train.jsonl"). The file is called `train.jsonl` rather than e.g. `pairs.jsonl` because
  alignjax's loader reads a directory's `<split>.jsonl` only (`datasets` would call any lone
  file "train");
* the grad norms stay below `max_grad_norm` (1.0, TRL's default, kept), so clipping, whose
  formula differs in the last bits between torch (+1e-6) and optax, never acts;
* `recipe.yaml`: a plain TRL DPO recipe (DPOConfig / ModelConfig / ScriptArguments fields), its
  paths relative to the repository root: the whole data set (8 pairs) is one batch, so data order
  cannot matter (only the order of a batch's mean); SGD (transformers' "sgd": torch.optim.SGD
  without momentum) at a constant 0.5 so the loss moves visibly in 4 steps without Adam's
  sign-like amplification of rounding differences; float32 throughout (`bf16: false`, TRL's
  ModelConfig.dtype default "float32"), no gradient checkpointing, CPU;
* `trl_run.json`: what TRL logged at each of the 4 steps (`trainer.state.log_history`): `loss`,
  `grad_norm`, `learning_rate` and DPO's `rewards/*`, `logps/*`, plus the versions, the recipe
  as parsed, the SHA-256 of the inputs and the collated batch's completion-token counts.

How TRL is run: exactly as `trl dpo --config recipe.yaml` runs it (the CLI `accelerate
launch`es trl/scripts/dpo.py, a single CPU process here): `trl.scripts.dpo.make_parser()` (a
`TrlParser` over ScriptArguments, DPOConfig, ModelConfig and DatasetMixtureConfig), its
`parse_args_and_config`, then `trl.scripts.dpo.main` itself, unmodified. The only addition is
`--output_dir <a temporary directory>` on the command line (so the final `save_model` does not
write into the repository) and a `DPOTrainer` subclass swapped into `trl` for the call, which
only remembers the trainer so that its `state.log_history` can be read; `main` builds it the
way it always does: the policy from `model_name_or_path` with the recipe's dtype, no `ref_model`
(TRL loads a second copy from the same path as the frozen reference), the tokenizer from the
model directory (AutoProcessor), `eval_dataset` None (`eval_strategy` "no"). Nothing else is
needed on CPU: `use_cpu: true` and `bf16: false` (TRL's DPOConfig defaults `bf16` to true).

What TRL logs as `loss` at step k (transformers 5.23 `Trainer._inner_training_loop` and
`_maybe_log_save_evaluate`, logging_steps 1, gradient_accumulation_steps 1, one process): the
`training_step` return of the k-th batch, i.e. DPOTrainer's loss on that batch computed by the
forward BEFORE the k-th optimizer step (with the parameters after k-1 updates), summed into
`tr_loss` and divided by the number of steps since the last log (1), unrounded. DPOTrainer's
`log` adds the mean of the metrics it stored during those steps (one batch each here), from the
same forward. This is how alignjax logs `train/loss` at step k, so step 1 is the initial model
(policy == reference: loss log 2, rewards 0). `grad_norm` is the norm before clipping
(`max_grad_norm` 1.0, TRL's default, which the recipe keeps), `learning_rate` the rate used by
the k-th update.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import accelerate  # noqa: E402
import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.scripts import dpo as trl_dpo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "alignjax" / "data" / "assets"
OUT = Path(__file__).resolve().parent / "fixtures" / "trl_recipe"
REL = OUT.relative_to(ROOT).as_posix()  # the recipe's paths are relative to the repo root
ROWS = 8
SEED = 20261124  # the random model's init (the recipe's `seed` is TRL's training seed)
MODEL = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
METRICS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)

RECIPE = f"""\
# A TRL 1.16 DPO recipe. From the repository root:
#   trl dpo --config {REL}/recipe.yaml
#   alignjax dpo --config {REL}/recipe.yaml
model_name_or_path: {REL}/model
dataset_name: {REL}/data
output_dir: runs/trl-recipe-dpo

per_device_train_batch_size: 8   # the whole data set (8 pairs) in one batch
max_steps: 4
optim: sgd
learning_rate: 0.5
lr_scheduler_type: constant
logging_steps: 1

beta: 0.1
max_length: 64

bf16: false
use_cpu: true
gradient_checkpointing: false
seed: 42
report_to: none
save_strategy: "no"
"""


def write_inputs() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "data").mkdir(parents=True)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(torch.float32)
    model.save_pretrained(OUT / "model")
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(OUT / "model")
    lines = (ASSETS / "reviews" / "train.jsonl").read_text().splitlines(keepends=True)[:ROWS]
    (OUT / "data" / "train.jsonl").write_text("".join(lines))
    (OUT / "recipe.yaml").write_text(RECIPE)


class _Recording(trl.DPOTrainer):
    """DPOTrainer unchanged; the instance is remembered so that its log can be read."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recording.made.append(self)


def run_trl(output_dir: str):
    """`trl dpo --config recipe.yaml --output_dir output_dir`, in this process."""
    parser = trl_dpo.make_parser()
    argv = ["--config", f"{REL}/recipe.yaml", "--output_dir", output_dir]
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
        argv, fail_with_unknown_args=False
    )
    original = trl.DPOTrainer
    trl.DPOTrainer = _Recording  # `main` does `from trl import DPOTrainer`
    try:
        trl_dpo.main(script_args, training_args, model_args, dataset_args)
    finally:
        trl.DPOTrainer = original
    (trainer,) = _Recording.made
    return trainer, (script_args, training_args, model_args)


def main() -> None:
    os.chdir(ROOT)
    write_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, (script_args, training_args, model_args) = run_trl(str(Path(tmp) / "out"))
    steps = [r for r in trainer.state.log_history if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4], trainer.state.log_history
    for r in steps:
        missing = [k for k in METRICS if k not in r]
        assert not missing, (missing, r)
    assert training_args.gradient_accumulation_steps == 1
    assert all(r["grad_norm"] < training_args.max_grad_norm for r in steps)  # no clipping
    assert str(trainer.model.dtype) == "torch.float32", trainer.model.dtype
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    train_rows = len(trainer.train_dataset)
    assert train_rows == ROWS, train_rows  # none dropped by max_length
    # the one batch as TRL's collator builds it: [chosen rows; rejected rows]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(train_rows)])
    completion = batch["completion_mask"].sum(dim=1).tolist()
    attended = int(batch["attention_mask"].sum())
    record = {
        "steps": [{"step": r["step"], **{k: r[k] for k in METRICS}} for r in steps],
        "meta": {
            "command": f"trl dpo --config {REL}/recipe.yaml (run in-process by "
            "tests/reference/generate_trl_recipe_run.py)",
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "trl": trl.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
                "datasets": datasets.__version__,
            },
            "model_init_seed": SEED,
            "model_config": MODEL,
            "train_rows": train_rows,
            "sha256": {
                name: hashlib.sha256((OUT / name).read_bytes()).hexdigest()
                for name in ("recipe.yaml", "data/train.jsonl", "model/model.safetensors")
            },
            "completion_tokens": {
                "chosen": completion[:train_rows],
                "rejected": completion[train_rows:],
                "note": "per sequence, sum of DataCollatorForPreference's completion_mask "
                "(EOS included, after max_length truncation); their total is what alignjax "
                "logs as train/completion_tokens each step",
            },
            "attention_tokens_per_step": attended,
            "num_tokens_note": "TRL's logged `num_tokens` is the CUMULATIVE count of attended "
            "tokens (prompt + completion, chosen and rejected) since the start of training: "
            "attention_tokens_per_step x step here",
            "parsed": {
                "loss_type": training_args.loss_type,
                "beta": training_args.beta,
                "max_length": training_args.max_length,
                "truncation_mode": training_args.truncation_mode,
                "optim": str(training_args.optim),
                "learning_rate": training_args.learning_rate,
                "lr_scheduler_type": str(training_args.lr_scheduler_type),
                "max_grad_norm": training_args.max_grad_norm,
                "weight_decay": training_args.weight_decay,
                "per_device_train_batch_size": training_args.per_device_train_batch_size,
                "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
                "max_steps": training_args.max_steps,
                "seed": training_args.seed,
                "bf16": training_args.bf16,
                "dtype": model_args.dtype,
                "dataset_name": script_args.dataset_name,
                "dataset_train_split": script_args.dataset_train_split,
                "torch_optimizer": type(trainer.optimizer.optimizer).__name__
                if hasattr(trainer.optimizer, "optimizer")
                else type(trainer.optimizer).__name__,
            },
        },
    }
    (OUT / "trl_run.json").write_text(json.dumps(record, indent=1) + "\n")
    for r in record["steps"]:
        print(
            f"step {r['step']}: loss {r['loss']:.9g}  margins {r['rewards/margins']:.6g}  "
            f"grad_norm {r['grad_norm']:.6g}"
        )
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
