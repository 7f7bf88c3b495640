"""DPO train-step tokens/s head to head: alignjax, TRL's `DPOTrainer` and a plain PyTorch loop on
the same model shapes, tokens, reference mode and optimizer, at several tokens per row.

Setup (all sides): a Llama of vocab 8192, width 256, 4 layers, 8 query / 4 key-value heads, MLP
688, float32, random weights (the same shapes, not the same values: timing does not depend on
them); DPO sigmoid loss, beta 0.1, with an online frozen reference (a second copy of the initial
model runs a forward in every step); AdamW, lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight
decay, no gradient clipping. The same random tokens on every side: `pairs_for(T)` pairs per step
(8 at T <= 128, 2 at T <= 512, else 1), rows `[chosen; rejected]` of exactly T tokens, no padding,
the completion the second half of each row (the prompt is shared by the two sides of a pair).

Rows, each in its own persistent child process (JSON lines over stdin / stdout):
  alignjax            `train.step.build_step(StepSpec(loss="sigmoid", loss_kwargs={"beta": 0.1},
                      reference="frozen"), optax.adamw(1e-4, weight_decay=0))`, jitted, default
                      attention ("auto": on CPU the dense grouped path up to 256 tokens per row,
                      "blockwise" beyond).
  alignjax shared prompt  the same step on the same pairs packed with their prompt shared
                      (`data.pack(..., share_prompt=True)`, one row per pair: [prompt[:-1] |
                      prompt[-1], chosen | prompt[-1], rejected]): the prompt is computed once
                      per pair instead of twice, with the same loss and gradients up to
                      float rounding.
  alignjax blockwise  the same with `attention_implementation="blockwise"` (key/value blocks of
                      128, 256 from 1024 tokens, with an online softmax; it skips the blocks
                      above the causal diagonal): the same program as "alignjax" from 512 on.
  TRL DPOTrainer      (`--ref-python`, torch + transformers + trl) `trl.DPOTrainer` with a
                      `transformers.LlamaForCausalLM` of the same config and an explicit frozen
                      `ref_model` copy, `DPOConfig(loss_type sigmoid, beta 0.1, max_length T,
                      precompute_ref_log_probs=False, use_cpu=True, max_grad_norm=0, ...)`, its
                      own optimizer (`trainer.create_optimizer()`: TrainingArguments' AdamW).
  PyTorch loop        (`--ref-python`) the same HF model; the reference copy under
                      `torch.no_grad()`; logits -> log_softmax -> gather of the completion tokens,
                      summed per row; `-logsigmoid(beta * margin)`; `torch.optim.AdamW`.
Both torch children call `torch.set_num_threads(--threads)` (default: the CPU count, as XLA:CPU).

Timed region, one optimizer step on a batch prepared before the clock starts:
  alignjax   `state, metrics = step(state, batch)` and `jax.block_until_ready((state, metrics))`
             (the batch is already a device array; forward of policy and reference, loss,
             backward, AdamW update, all in the one jitted call).
  TRL        `trainer.training_step(model, inputs)` (TRL's `_compute_loss`: policy forward with
             its fused LM-head log-probs, the reference forward under no_grad, the loss and its
             metrics, `accelerator.backward`) + `optimizer.step()` + `optimizer.zero_grad()`;
             `inputs` is the output of TRL's own collator (`trainer.data_collator`) on the
             pre-tokenized rows, built once.
  PyTorch    policy forward, reference forward under no_grad, loss, `loss.backward()`,
             `optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`.
Process setting: by default every child starts without `GLIBC_TUNABLES` (as `python` starts);
`--heap cli` starts every child (alignjax, TRL and PyTorch alike) with the heap setting the
`alignjax` command applies by default (`alignjax.cli.GLIBC_HEAP`: glibc keeps freed memory
instead of unmapping it, so large temporaries are not faulted in afresh every step). It speeds
up the torch sides more than alignjax (README).

Each side runs two untimed steps first (alignjax: its compile and a warm-up). Then `--rounds`
rounds alternate the alignjax rows / TRL / PyTorch (the order rotating by one row each round,
so that no row always runs first) and the matmul probe at each
length, each timing `--reps` steps; a row's time is the median over rounds of the median of its
steps, so that a slow spell of the shared machine hits every row.

Utilisation = model FLOPs per step (`train_step.step_flops`, reference "frozen": 6 N n + 3 A for
the policy plus 2 N n + A for the reference forward, attention counted over the full T x T
scores) / step time / the best float32 `jnp.dot` rate measured in this run (train_step's two
probes, an S x S x S product and the MLP up-projection shape, in the alignjax child, every
round). The torch children time the same shapes with `torch.mm` for the notes.

Usage:
  python benchmarks/trl_head_to_head.py --ref-python /tmp/ref/bin/python            # all lengths
  python benchmarks/trl_head_to_head.py --ref-python /tmp/ref/bin/python --quick    # smoke test
  ... --lengths 128 512                                                             # a subset
Results go to benchmarks/results/trl_head_to_head.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

MODEL = dict(vocab=8192, hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4)
QUICK_MODEL = dict(vocab=512, hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2)
LENGTHS = (128, 512, 1024, 2048)
QUICK_LENGTHS = (32, 64)
BETA, LR = 0.1, 1e-4
FRAMEWORKS = (
    "alignjax", "alignjax shared prompt", "alignjax blockwise", "TRL DPOTrainer", "PyTorch loop"
)  # fmt: skip


def pairs_for(length: int, quick: bool = False) -> int:
    if quick:
        return 2
    return 8 if length <= 128 else 2 if length <= 512 else 1


def tokens(vocab: int, pairs: int, length: int, seed: int = 0):
    """(prompt [P, T/2], chosen [P, T - T/2], rejected [P, T - T/2]) int lists, ids >= 3 (0-2
    are the TRL tokenizer's pad / eos / unk)."""
    import numpy as np

    rng = np.random.default_rng(seed + length)
    half = length // 2
    prompt = rng.integers(3, vocab, (pairs, half))
    chosen = rng.integers(3, vocab, (pairs, length - half))
    rejected = rng.integers(3, vocab, (pairs, length - half))
    return prompt.tolist(), chosen.tolist(), rejected.tolist()


def hf_config(m: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip


def flops_cfg(m: dict):
    """The attributes `train_step.step_flops` reads, as alignjax's LlamaConfig spells them."""
    return types.SimpleNamespace(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"], kv_heads=m["kv_heads"],
        dim_per_head=m["hidden"] // m["heads"],
    )  # fmt: skip


# ----------------------------------------------------------------------------- children


def shared_length(length: int) -> int:
    """Tokens of one shared-prompt row for rows of `length` (prompt = the first half), rounded
    up to a multiple of 8: (P - 1) + 2 (C + 1)."""
    half = length // 2
    return -(-((half - 1) + 2 * (length - half + 1)) // 8) * 8


class AlignjaxSide:
    def __init__(self, m: dict, implementation: str, share_prompt: bool = False):
        self.m, self.implementation, self.share_prompt = m, implementation, share_prompt

    def setup(self, length: int, pairs: int) -> dict:
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from alignjax import data, models
        from alignjax.train import step as S

        m = self.m
        cfg = models.LlamaConfig(
            vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
            num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
            num_key_value_heads=m["kv_heads"], max_position_embeddings=4096,
            attention_implementation=self.implementation,
        )  # fmt: skip
        prompt, chosen, rejected = tokens(m["vocab"], pairs, length)
        examples = [
            dict(chosen_input_ids=p + c, chosen_prompt_length=len(p), rejected_input_ids=p + r,
                 rejected_prompt_length=len(p), row=i)
            for i, (p, c, r) in enumerate(zip(prompt, chosen, rejected))
        ]  # fmt: skip
        if self.share_prompt:
            batch, used = data.pack(examples, shared_length(length), pairs, share_prompt=True)
            assert used == pairs, used
        else:
            batch = data.collate(examples, length)
            assert batch.input_ids.shape == (2 * pairs, length), batch.input_ids.shape
        self.batch = jax.tree.map(jnp.asarray, batch)
        self.completion = int(batch.loss_mask.sum())
        optimizer = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
        model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        self.state = S.init_state(model, optimizer, wrt=nnx.Param, reference="frozen")
        spec = S.StepSpec(loss="sigmoid", loss_kwargs={"beta": BETA}, reference="frozen")
        self.step_fn = S.build_step(spec, optimizer)
        t0 = time.perf_counter()
        loss = self.step()
        compile_s = time.perf_counter() - t0
        loss = self.step()
        return dict(compile_s=compile_s, loss=loss, completion_tokens=self.completion)

    def step(self) -> float:
        import jax

        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])

    def probe(self, length: int, pairs: int, size: int, reps: int) -> dict:
        import jax
        import train_step

        ns = types.SimpleNamespace(matmul_size=size, pairs_per_batch=pairs, length=length)
        out = {}
        for name, (flops, dot, ops) in train_step.matmul_probes(ns, flops_cfg(self.m)).items():
            t = train_step.timed(lambda d=dot, x=ops: jax.block_until_ready(d(*x)), reps)
            out[name] = flops / t
        return out


def _torch_probe(m: dict, length: int, pairs: int, size: int, reps: int) -> dict:
    import torch

    n = 2 * pairs * length
    shapes = {
        f"{size}x{size}x{size}": ((size, size), (size, size)),
        f"MLP {n}x{m['hidden']}x{m['intermediate']}": (
            (n, m["hidden"]),
            (m["hidden"], m["intermediate"]),
        ),
    }
    out = {}
    for name, (a, b) in shapes.items():
        x, y = torch.randn(*a), torch.randn(*b)
        for _ in range(2):
            torch.mm(x, y)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        out[name] = 2 * a[0] * a[1] * b[1] / statistics.median(times)
    return out


class TorchSide:
    """The plain PyTorch loop."""

    def __init__(self, m: dict):
        self.m = m

    def _models(self):
        import copy

        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(hf_config(self.m)).float()
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        return model, ref

    def _rows(self, length: int, pairs: int):
        import torch

        prompt, chosen, rejected = tokens(self.m["vocab"], pairs, length)
        rows = [p + c for p, c in zip(prompt, chosen)] + [p + r for p, r in zip(prompt, rejected)]
        ids = torch.tensor(rows, dtype=torch.long)
        comp = torch.zeros_like(ids)
        comp[:, length // 2 :] = 1
        return ids, comp

    def setup(self, length: int, pairs: int) -> dict:
        import torch

        self.model, self.ref = self._models()
        self.model.train()
        self.ids, comp = self._rows(length, pairs)
        self.attn = torch.ones_like(self.ids)
        self.labels = self.ids[:, 1:].unsqueeze(-1)
        self.mask = comp[:, 1:].float()
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        t0 = time.perf_counter()
        self.step()
        first = time.perf_counter() - t0
        return dict(compile_s=first, loss=self.step(), completion_tokens=int(self.mask.sum()))

    def sequence_logps(self, model):
        logits = model(input_ids=self.ids, attention_mask=self.attn, use_cache=False).logits
        logp = logits[:, :-1].log_softmax(-1).gather(-1, self.labels).squeeze(-1)
        return (logp * self.mask).sum(-1)

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            ref = self.sequence_logps(self.ref)
        pol = self.sequence_logps(self.model)
        pc, pr = pol.chunk(2)
        rc, rr = ref.chunk(2)
        loss = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def probe(self, length: int, pairs: int, size: int, reps: int) -> dict:
        return _torch_probe(self.m, length, pairs, size, reps)


class TRLSide(TorchSide):
    def _tokenizer(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
        vocab.update({f"t{i}": i for i in range(3, self.m["vocab"])})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        )

    def setup(self, length: int, pairs: int) -> dict:
        import tempfile

        import datasets
        import torch
        from trl import DPOConfig, DPOTrainer

        datasets.disable_progress_bars()
        model, ref = self._models()
        prompt, chosen, rejected = tokens(self.m["vocab"], pairs, length)
        # A text dataset only to construct the trainer (it tokenizes it); the timed inputs are the
        # pre-tokenized rows through TRL's own collator.
        text = lambda ids: "".join(f" t{i}" for i in ids)  # noqa: E731
        ds = datasets.Dataset.from_dict(dict(
            prompt=[text(p).strip() for p in prompt], chosen=[text(c) for c in chosen],
            rejected=[text(r) for r in rejected],
        ))  # fmt: skip
        self.tmp = tempfile.TemporaryDirectory()
        cfg = DPOConfig(
            output_dir=self.tmp.name, per_device_train_batch_size=pairs, max_length=length,
            beta=BETA, loss_type=["sigmoid"], learning_rate=LR, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.0,
            lr_scheduler_type="constant", warmup_steps=0, report_to=[], save_strategy="no",
            logging_steps=10**9, precompute_ref_log_probs=False, use_cpu=True, bf16=False,
            fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
            disable_dropout=True, dataset_num_proc=None,
        )  # fmt: skip
        self.trainer = DPOTrainer(
            model=model, ref_model=ref, args=cfg, train_dataset=ds,
            processing_class=self._tokenizer(),
        )  # fmt: skip
        examples = [
            dict(prompt_ids=p, chosen_ids=c, rejected_ids=r)
            for p, c, r in zip(prompt, chosen, rejected)
        ]
        self.inputs = self.trainer.data_collator(examples)
        ids = self.inputs["input_ids"]
        assert tuple(ids.shape) == (2 * pairs, length), ids.shape
        assert int(self.inputs["attention_mask"].sum()) == 2 * pairs * length
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop
        self.opt = self.trainer.optimizer
        self.model = self.trainer.model
        # The trainer's dataset tokenizes our text to the same ids (a check of the tokenizer).
        row = self.trainer.train_dataset[0]
        same = row["prompt_ids"] == prompt[0] and row["chosen_ids"][: len(chosen[0])] == chosen[0]
        t0 = time.perf_counter()
        self.step()
        first = time.perf_counter() - t0
        return dict(
            compile_s=first, loss=self.step(), optimizer=type(self.opt).__name__,
            completion_tokens=int(self.inputs["completion_mask"][:, 1:].sum()),
            dataset_tokens_match=bool(same), torch_threads=torch.get_num_threads(),
        )  # fmt: skip

    def step(self) -> float:
        loss = self.trainer.training_step(self.model, self.inputs)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def child_main(kind: str, m: dict, threads: int) -> None:
    if kind in ("trl", "torch"):
        import torch

        torch.set_num_threads(threads)
        side = TRLSide(m) if kind == "trl" else TorchSide(m)
    else:
        implementation = "blockwise" if kind == "alignjax-blockwise" else "auto"
        side = AlignjaxSide(m, implementation, share_prompt=kind == "alignjax-shared")
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the JSON lines
    print(json.dumps({"ready": kind}), file=out, flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            break
        try:
            if op == "setup":
                res = side.setup(**msg)
            elif op == "time":
                times = []
                for _ in range(msg["reps"]):
                    t0 = time.perf_counter()
                    side.step()
                    times.append(time.perf_counter() - t0)
                res = dict(times=times)
            elif op == "probe":
                res = side.probe(**msg)
            else:
                raise ValueError(op)
        except Exception as e:  # reported to the parent, which stops
            import traceback

            traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {e}")
        print(json.dumps(res), file=out, flush=True)


class Child:
    def __init__(self, name: str, python: str, kind: str, m: dict, threads: int, heap: str):
        self.name = name
        cmd = [python, __file__, "--child", kind, "--model-json", json.dumps(m)]
        cmd += ["--threads", str(threads)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        env.pop("GLIBC_TUNABLES", None)
        if heap == "cli":
            from alignjax.cli import GLIBC_HEAP

            env["GLIBC_TUNABLES"] = GLIBC_HEAP
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.recv()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} child exited (rc {self.proc.wait()})")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"{self.name}: {res['error']}")
        return res

    def __call__(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self):
        try:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- parent


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", default="/tmp/ref/bin/python",
                    help="Python with torch, transformers, trl (TRL, PyTorch rows)")  # fmt: skip
    ap.add_argument("--lengths", type=int, nargs="+", help=f"tokens per row, default {LENGTHS}")
    ap.add_argument("--rounds", type=int, help="default 3 (quick: 1)")
    ap.add_argument("--reps", type=int, help="timed steps per row per round, default 2")
    ap.add_argument("--matmul-size", type=int, help="the square probe, default 1024")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--skip", nargs="*", default=[], choices=FRAMEWORKS, metavar="ROW",
                    help=f"rows to leave out, of {FRAMEWORKS}")  # fmt: skip
    ap.add_argument(
        "--heap",
        choices=("default", "cli"),
        default="default",
        help="every child without GLIBC_TUNABLES, or with the `alignjax` command's (cli)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 lengths, 1 round")
    ap.add_argument("--out", type=Path, default=RESULTS / "trl_head_to_head")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.lengths = a.lengths or list(QUICK_LENGTHS if a.quick else LENGTHS)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.reps = a.reps or (1 if a.quick else 2)
    a.matmul_size = a.matmul_size or (256 if a.quick else 1024)
    return a


def run(args, on_length=None) -> dict:
    import train_step

    m = QUICK_MODEL if args.quick else MODEL
    specs = {
        "alignjax": (sys.executable, "alignjax"),
        "alignjax shared prompt": (sys.executable, "alignjax-shared"),
        "alignjax blockwise": (sys.executable, "alignjax-blockwise"),
        "TRL DPOTrainer": (args.ref_python, "trl"),
        "PyTorch loop": (args.ref_python, "torch"),
    }
    names = [n for n in FRAMEWORKS if n not in args.skip]
    children = {}
    try:
        for n in names:
            children[n] = Child(n, specs[n][0], specs[n][1], m, args.threads, args.heap)
        results = []
        for length in args.lengths:
            pairs = pairs_for(length, args.quick)
            t0 = time.perf_counter()
            setup = {n: c("setup", length=length, pairs=pairs) for n, c in children.items()}
            rounds = {n: [] for n in children}
            probes, torch_probes = [], []
            pk = dict(length=length, pairs=pairs, size=args.matmul_size, reps=5)
            for k in range(args.rounds):
                # the order rotates by one row each round: no row always runs first (right after
                # another process's steps) or last
                order = list(children)[k % len(children) :] + list(children)[: k % len(children)]
                for n in order:
                    rounds[n].append(
                        statistics.median(children[n]("time", reps=args.reps)["times"])
                    )
                prober = children.get("alignjax") or children.get("alignjax blockwise")
                if prober:
                    probes.append(prober("probe", **pk))
                torcher = children.get("PyTorch loop") or children.get("TRL DPOTrainer")
                if torcher:
                    torch_probes.append(torcher("probe", **pk))
            med = lambda ps: {k: statistics.median(p[k] for p in ps) for k in ps[0]} if ps else {}  # noqa: E731
            tokens_per_step = 2 * pairs * length
            flops = train_step.step_flops(flops_cfg(m), 2 * pairs, length, "frozen", 0)["step"]
            results.append(dict(
                length=length, pairs=pairs, rows=2 * pairs, tokens_per_step=tokens_per_step,
                completion_tokens_per_step=setup[names[0]]["completion_tokens"],
                model_flops=flops, matmul_flops_per_s=med(probes),
                torch_matmul_flops_per_s=med(torch_probes), wall_s=time.perf_counter() - t0,
                frameworks={n: dict(
                    s_per_step=statistics.median(rounds[n]), round_s=rounds[n], **setup[n],
                ) for n in children},
            ))  # fmt: skip
            print(f"[{length} tokens: {results[-1]['wall_s']:.0f} s] " + ", ".join(
                f"{n} {1e3 * statistics.median(r):.0f} ms" for n, r in rounds.items()
            ), file=sys.stderr, flush=True)  # fmt: skip
            if on_length:  # the lengths so far, in case a later one does not finish
                on_length(finish(args, m, results))
    finally:
        for c in children.values():
            c.close()
    return finish(args, m, results)


def finish(args, m: dict, results: list) -> dict:
    """Speeds, ratios and utilisation (over the best probe of the lengths so far)."""
    peak = max((v for r in results for v in r["matmul_flops_per_s"].values()), default=None)
    for r in results:
        for f in r["frameworks"].values():
            f["tokens_per_s"] = r["tokens_per_step"] / f["s_per_step"]
            f["model_flops_per_s"] = r["model_flops"] / f["s_per_step"]
            f["utilisation"] = f["model_flops_per_s"] / peak if peak else None
        fw = r["frameworks"]
        for ours, suffix in (("alignjax", ""), ("alignjax shared prompt", "_shared")):
            for other, key in (("TRL DPOTrainer", "vs_trl"), ("PyTorch loop", "vs_torch")):
                if ours in fw and other in fw:
                    r[key + suffix] = fw[ours]["tokens_per_s"] / fw[other]["tokens_per_s"]
    return dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("child", "model_json")},
        model=m, beta=BETA, learning_rate=LR, peak_matmul_flops_per_s=peak, results=results,
    )  # fmt: skip


def report(res: dict) -> str:
    m, a = res["model"], res["args"]
    names = [n for n in FRAMEWORKS if n in res["results"][0]["frameworks"]]
    short = {"alignjax": "alignjax", "alignjax shared prompt": "alignjax shared",
             "alignjax blockwise": "alignjax blockwise", "TRL DPOTrainer": "TRL",
             "PyTorch loop": "PyTorch"}  # fmt: skip
    heap = a.get("heap", "default")
    lines = [
        f"DPO (sigmoid, beta {res['beta']}) step with an online frozen reference, AdamW lr "
        f"{res['learning_rate']} (no weight decay, no clipping); Llama vocab {m['vocab']}, width "
        f"{m['hidden']}, MLP {m['intermediate']}, {m['layers']} layers, {m['heads']}/"
        f"{m['kv_heads']} heads; float32, random tokens, completion = second half of each row; "
        f"median of {a['rounds']} rounds x {a['reps']} steps; torch threads {a['threads']}; "
        + (
            "every child with the `alignjax` command's GLIBC_TUNABLES heap setting."
            if heap == "cli"
            else "no heap setting."
        ),
        "",
        "| tokens / row | pairs | "
        + " | ".join(f"{short[n]} tok/s" for n in names)
        + " | alignjax / TRL | alignjax / PyTorch | shared / TRL | shared / PyTorch | "
        + " | ".join(f"{short[n]} util." for n in names)
        + " |",
        "|" + "---:|" * (2 + 2 * len(names) + 4),
    ]
    for r in res["results"]:
        fw = r["frameworks"]
        ratio = lambda k, r=r: f"{r[k]:.2f}x" if k in r else ""  # noqa: E731
        util = lambda f: "" if f["utilisation"] is None else f"{100 * f['utilisation']:.0f}%"  # noqa: E731
        lines.append(
            f"| {r['length']} | {r['pairs']} | "
            + " | ".join(f"{fw[n]['tokens_per_s']:.0f}" for n in names)
            + f" | {ratio('vs_trl')} | {ratio('vs_torch')} | {ratio('vs_trl_shared')} | "
            + f"{ratio('vs_torch_shared')} | "
            + " | ".join(util(fw[n]) for n in names)
            + " |"
        )
    lines += ["", "ms per step (first untimed step's seconds, alignjax: its compile):", ""]
    for r in res["results"]:
        lines.append(
            f"- {r['length']} tokens x {r['rows']} rows ({r['model_flops'] / 1e9:.1f} model "
            "GFLOP): "
            + ", ".join(
                f"{n} {1e3 * r['frameworks'][n]['s_per_step']:.0f} "
                f"({r['frameworks'][n]['compile_s']:.1f} s)"
                for n in names
            )
        )
    peak = res["peak_matmul_flops_per_s"]
    lines.append("")
    if peak:
        lines.append(
            f"Utilisation = model FLOP/s / {peak / 1e9:.1f} GFLOP/s, the best float32 `jnp.dot` "
            "probe of the run; per length (jnp.dot | torch.mm, GFLOP/s): "
            + "; ".join(
                f"{r['length']}: "
                + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r["matmul_flops_per_s"].items())
                + " | "
                + ", ".join(f"{v / 1e9:.1f}" for v in r["torch_matmul_flops_per_s"].values())
                for r in res["results"]
            )
            + "."
        )
    lines.append(
        "Model FLOPs count attention over the full T x T scores and the LM head at every "
        "position; every side is credited the same FLOPs. alignjax does fewer: its attention "
        "skips the blocks above the causal diagonal, and its fused LM head computes only the "
        "positions from the first to the last completion token (here the second half of each "
        "row). The shared-prompt row is credited the same FLOPs too, though it runs each "
        "prompt once per pair."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child_main(args.child, json.loads(args.model_json), args.threads)
        return 0

    def save(res: dict) -> str:
        text = report(res)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
        return text

    print(save(run(args, on_length=save)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
