"""Tiny random Llama-family checkpoints and their `transformers` outputs (PyTorch, CPU).

    pip install torch==2.13.0 "transformers>=5,<6" safetensors numpy
    python tests/reference/generate_hf_models.py

(written with `transformers==5.23.0` on `torch==2.13.0+cpu`; no network: every model is built
from its config with a seeded random init, never downloaded.)

For each family in FAMILIES it writes `fixtures/hf_models/<name>/` with HF's own
`save_pretrained` (config.json, generation_config.json, model.safetensors, float32) and
`fixtures/hf_models/<name>/outputs.npz` holding:

* `input_ids`, `attention_mask` [3, 10]: row 0 unpadded, row 1 LEFT padded (first 3 zeros),
  row 2 RIGHT padded (last 2 zeros); padded slots hold token 0;
* `position_ids` [3, 10] = max(cumsum(attention_mask) - 1, 0), passed explicitly to the forward
  (so padded slots of row 2 carry 7, 7; transformers' own `generate` uses
  `masked_fill(attention_mask == 0, 0)` instead, which only changes padded slots);
* `logits` [3, 10, V] and `hidden_states` [L+1, 3, 10, D] (`output_hidden_states=True`, float32,
  eval, no grad). In transformers 5 entry 0 is the embedding output, entries 1..L-1 the decoder
  layers' outputs, and entry L is the FINAL-NORM output (`capture_outputs` replaces the last
  layer's output by `last_hidden_state`); the last decoder layer's raw output is captured with a
  hook on `model.norm` and stored as `last_layer_prenorm` [3, 10, D];
* `logits_f64`, `hidden_states_f64`, `last_layer_prenorm_f64`: the same forward after
  `model.double()`. NB transformers' rotary embedding computes the angles and cos/sin in float32
  even then (`position_ids.float() * inv_freq.float()`, inv_freq itself computed in float32),
  casting only the result to float64; so `logits_f64_rope64`, `hidden_states_f64_rope64` repeat
  the float64 forward with RoPE in float64 throughout (`rope_inv_freq_f64`, this file's float64
  transcription of HF's default/llama3 formula, checked against HF's float32 `rope_inv_freq`):
  that is the tight reference for a float64 implementation;
* `gen_input_ids`, `gen_attention_mask` [2, 7] (row 1 left padded by 3), greedy
  `generate(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)` in float32:
  `gen_tokens` [2, 6], `gen_logps` [2, 6] (log-softmax of each step's raw logits at the chosen
  token; `output_scores` equals `output_logits` here: no logits processor is active), `gen_logits`
  [2, 6, V];
* `meta_json`: versions, seed, the config dict as saved, the safetensors names/shapes/dtypes,
  attention implementation, checks, notes.

Norm gains are drawn around 1 and Qwen2's q/k/v biases around 0 (HF's init would set them to
exactly 1 and 0, which hides gain/bias bugs); everything else is HF's `_init_weights` with
`initializer_range=0.1`.

Loading a checkpoint written by alignjax (local directory, picked by config.json's model_type and
rope type) and recording transformers' outputs on the same inputs:

    python tests/reference/generate_hf_models.py --check-load DIR --out FILE.npz

writes `logits`, `logits_f64`, `hidden_states`, `last_layer_prenorm`, `gen_tokens`, `gen_logps`
(plus the inputs) and a `meta_json` with the loading report; it fails if transformers reports any
missing, unexpected or mismatched weight (which it would otherwise fill with random values), or
if a tied config loads untied (transformers 5 only warns when a tied checkpoint also stores a
different `lm_head.weight`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

OUT_DIR = Path(__file__).resolve().parent / "fixtures" / "hf_models"
SEED = 20261127
B, T = 3, 10
GEN_B, GEN_P, GEN_NEW = 2, 7, 6
COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
FAMILIES = {
    "llama": (
        LlamaConfig,
        dict(
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "llama3": (
        LlamaConfig,
        dict(
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": (
        MistralConfig,
        dict(
            tie_word_embeddings=False,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # tie_word_embeddings left at Qwen2Config's default (False); q/k/v biases are hard-wired in
    # Qwen2Attention (there is no attention_bias field).
    "qwen2": (
        Qwen2Config,
        dict(
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
}
NOTES = [
    "position_ids = max(cumsum(attention_mask, -1) - 1, 0), passed explicitly to every forward",
    "hidden_states[0] = embedding output; hidden_states[i] (1 <= i < L) = decoder layer i's output;"
    " hidden_states[L] = model.norm(layer L's output) (transformers 5 capture_outputs ties the last"
    " entry to last_hidden_state); last_layer_prenorm = layer L's raw output (hook on model.norm)",
    "outputs at padded slots (attention_mask == 0) are recorded but only valid slots are meaningful"
    " for comparison",
    "norm gains ~ 1 + 0.2 N(0,1) and biases ~ 0.1 N(0,1) (overriding HF's 1 / 0 init); all other"
    " weights HF _init_weights with initializer_range 0.1",
    "generate() uses a KV cache and its own position_ids (cumsum - 1, masked_fill(mask == 0, 0));"
    " gen_logps are log_softmax of output_logits at the chosen tokens (float32)",
    "transformers 5 save_pretrained always writes safetensors (no safe_serialization argument);"
    " tied models omit lm_head.weight from model.safetensors",
    "attention kernel: transformers 5 defaults to sdpa here; on valid slots eager agrees to ~1e-6,"
    " but query slots whose keys are all masked (row 1's left pads) differ: torch 2.13's CPU sdpa"
    " returns a zero attention output for a fully masked row, eager a uniform average over all"
    " keys",
    "logits_f64 = HF's float64 forward, whose RoPE cos/sin are still float32 values;"
    " logits_f64_rope64 = float64 forward with float64 RoPE (rope_inv_freq_f64)",
    "rope_inv_freq = model.model.rotary_emb.inv_freq (float32 as HF computes it; attention_scaling"
    " is 1.0 for default and llama3). llama3 fixture: head_dim 8, theta 5e5 -> base wavelengths"
    " 6.28, 167, 4443, 118140 vs low/high thresholds 16/4: frequency 0 takes the smoothed branch,"
    " 1..3 are divided by factor 8; the unscaled high-frequency branch (wavelen < 4) cannot occur",
]


def make_inputs():
    rng = np.random.default_rng(SEED)
    V = COMMON["vocab_size"]
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    ids = np.where(mask == 1, rng.integers(3, V, (B, T)), 0).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int64)
    gen_mask = np.ones((GEN_B, GEN_P), np.int64)
    gen_mask[1, :3] = 0
    gen_ids = np.where(gen_mask == 1, rng.integers(3, V, (GEN_B, GEN_P)), 0).astype(np.int64)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        gen_input_ids=gen_ids,
        gen_attention_mask=gen_mask,
    )


def build(name, index):
    cls, extra = FAMILIES[name]
    config = cls(**COMMON, **extra)
    torch.manual_seed(SEED + index)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED + 100 + index)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def forward(model, inputs):
    """logits, stacked hidden states and the last layer's pre-norm output, as numpy."""
    grabbed = {}
    hook = model.model.norm.register_forward_pre_hook(
        lambda mod, args: grabbed.__setitem__("prenorm", args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor(inputs["input_ids"]),
                attention_mask=torch.tensor(inputs["attention_mask"]),
                position_ids=torch.tensor(inputs["position_ids"]),
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        hook.remove()
    return (out.logits.numpy(), torch.stack(out.hidden_states).numpy(), grabbed["prenorm"].numpy())


def inv_freq_f64(config):
    """HF's default / llama3 RoPE inverse frequencies, evaluated in float64 (HF uses float32)."""
    rope = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope["rope_type"] == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    elif rope["rope_type"] != "default":
        raise NotImplementedError(rope["rope_type"])
    return inv


def forward_rope64(model, inputs):
    """`forward` in float64 with RoPE angles/cos/sin also in float64 (HF's rotary forward casts
    positions and inv_freq to float32 even for a float64 model)."""
    rotary = model.model.rotary_emb
    inv = torch.tensor(inv_freq_f64(model.config))
    hf = rotary.inv_freq.double()
    assert torch.allclose(inv, hf, rtol=1e-6, atol=0), (inv, hf)
    assert rotary.attention_scaling == 1.0

    def rope64(x, position_ids):
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary.forward = rope64
    try:
        return forward(model, inputs)
    finally:
        del rotary.forward


def generate(model, inputs):
    ids = torch.tensor(inputs["gen_input_ids"])
    with torch.no_grad():
        res = model.generate(
            input_ids=ids,
            attention_mask=torch.tensor(inputs["gen_attention_mask"]),
            do_sample=False,
            max_new_tokens=GEN_NEW,
            pad_token_id=0,
            eos_token_id=None,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = res.sequences[:, ids.shape[1] :]
    logits = torch.stack(res.logits, 1)
    scores = torch.stack(res.scores, 1)
    logp = torch.log_softmax(logits.double(), -1)
    chosen = logp.gather(-1, tokens[..., None])[..., 0]
    top2 = torch.topk(logits, 2, -1).values
    checks = {
        "scores_equal_logits": bool(torch.equal(scores, logits)),
        "greedy_is_argmax": bool(torch.equal(logits.argmax(-1), tokens)),
        "min_top1_top2_logit_gap": float((top2[..., 0] - top2[..., 1]).min()),
    }
    # teacher-forced full forward (no cache) over prompt + generated tokens, as a consistency check
    full_ids = res.sequences
    full_mask = torch.cat([torch.tensor(inputs["gen_attention_mask"]), torch.ones_like(tokens)], 1)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(
            input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos, use_cache=False
        ).logits
    P = ids.shape[1]
    full_step = full[:, P - 1 : -1]
    checks["max_abs_gen_logits_minus_full_forward"] = float((full_step - logits).abs().max())
    return tokens.numpy(), chosen.float().numpy(), logits.numpy(), checks


def safetensors_index(path):
    with safe_open(str(path), "pt") as f:
        return {
            k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()}
            for k in sorted(f.keys())
        }, f.metadata()


def valid_max_diff(a, b, mask):
    m = mask.astype(bool)
    return float(np.abs(a[m] - b[m]).max())


def run_all(model, inputs):
    arrays = {}
    model.float()
    arrays["logits"], arrays["hidden_states"], arrays["last_layer_prenorm"] = forward(model, inputs)
    arrays["rope_inv_freq"] = model.model.rotary_emb.inv_freq.detach().float().numpy()
    gen_tokens, gen_logps, gen_logits, gen_checks = generate(model, inputs)
    arrays.update(gen_tokens=gen_tokens, gen_logps=gen_logps, gen_logits=gen_logits)
    model.double()
    (arrays["logits_f64"], arrays["hidden_states_f64"], arrays["last_layer_prenorm_f64"]) = forward(
        model, inputs
    )
    arrays["rope_inv_freq_f64"] = inv_freq_f64(model.config)
    arrays["logits_f64_rope64"], arrays["hidden_states_f64_rope64"], _ = forward_rope64(
        model, inputs
    )
    model.float()
    return arrays, gen_checks


def family_of(config_json):
    model_type = config_json.get("model_type")
    rope = config_json.get("rope_parameters") or config_json.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "llama":
        return "llama3" if rope_type == "llama3" else "llama"
    if model_type in ("mistral", "qwen2"):
        return model_type
    raise SystemExit(f"no fixture family for model_type={model_type!r} rope_type={rope_type!r}")


def generate_fixtures():
    torch.use_deterministic_algorithms(True)
    inputs = make_inputs()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(FAMILIES):
        model = build(name, index)
        ckpt = OUT_DIR / name
        if ckpt.exists():
            shutil.rmtree(ckpt)
        model.save_pretrained(ckpt)
        names, st_meta = safetensors_index(ckpt / "model.safetensors")
        attn_default = model.config._attn_implementation
        arrays, gen_checks = run_all(model, inputs)

        # Other attention kernel, float32: agreement on valid slots (and on padded ones).
        model.set_attn_implementation("eager" if attn_default != "eager" else "sdpa")
        other_logits, _, _ = forward(model, inputs)
        model.set_attn_implementation(attn_default)
        # Round trip through from_pretrained (local), float32.
        reloaded, info = AutoModelForCausalLM.from_pretrained(
            ckpt, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
        re_logits, _, _ = forward(reloaded.eval(), inputs)

        mask = inputs["attention_mask"]
        L = model.config.num_hidden_layers
        hs = arrays["hidden_states_f64"]
        checks = {
            "max_abs_logits_f32_minus_f64_valid": valid_max_diff(
                arrays["logits"], arrays["logits_f64"], mask
            ),
            "max_abs_logits_f32_minus_f64_all": float(
                np.abs(arrays["logits"] - arrays["logits_f64"]).max()
            ),
            "max_abs_logits_f64_minus_f64_rope64_valid": valid_max_diff(
                arrays["logits_f64"], arrays["logits_f64_rope64"], mask
            ),
            f"max_abs_logits_{model.config._attn_implementation}_vs_other_valid": valid_max_diff(
                arrays["logits"], other_logits, mask
            ),
            f"max_abs_logits_{model.config._attn_implementation}_vs_other_all": float(
                np.abs(arrays["logits"] - other_logits).max()
            ),
            "last_hidden_is_norm_of_prenorm": float(
                np.abs(hs[L] - rms_norm(arrays["last_layer_prenorm_f64"], model, np.float64)).max()
            ),
            "logits_is_lm_head_of_last_hidden": float(
                np.abs(hs[L] @ lm_head(model).T - arrays["logits_f64"]).max()
            ),
            "reload_max_abs_logits": float(np.abs(re_logits - arrays["logits"]).max()),
            "reload_missing_unexpected_mismatched": [
                sorted(info.get("missing_keys", [])),
                sorted(info.get("unexpected_keys", [])),
                [str(x) for x in info.get("mismatched_keys", [])],
            ],
            "logits_std_valid": float(arrays["logits"][mask.astype(bool)].std()),
            **gen_checks,
        }
        cfg_saved = json.loads((ckpt / "config.json").read_text())
        meta = {
            "generator": "tests/reference/generate_hf_models.py",
            "family": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "seed": SEED + index,
            "config_class": FAMILIES[name][0].__name__,
            "config_kwargs": {**COMMON, **FAMILIES[name][1]},
            "config_saved": cfg_saved,
            "attn_implementation": attn_default,
            "position_ids_convention": "max(cumsum(attention_mask, -1) - 1, 0)",
            "generate_kwargs": dict(
                do_sample=False, max_new_tokens=GEN_NEW, pad_token_id=0, eos_token_id=None
            ),
            "hidden_states_layout": (
                "[L+1, B, T, D]: embeddings, layer 1..L-1 outputs, final norm(layer L)"
            ),
            "checkpoint_files": {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())},
            "safetensors_metadata": st_meta,
            "params": names,
            "tied_lm_head_absent": "lm_head.weight" not in names,
            "checks": checks,
            "notes": NOTES,
        }
        arrays.update(inputs)
        arrays["meta_json"] = np.array(json.dumps(meta))
        np.savez_compressed(ckpt / "outputs.npz", **arrays)
        print(
            f"wrote {ckpt} ({sum(meta['checkpoint_files'].values())} B checkpoint) "
            + json.dumps({k: v for k, v in checks.items() if not isinstance(v, list)})
        )
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


def rms_norm(x, model, dtype):
    w = model.model.norm.weight.detach().double().numpy().astype(dtype)
    eps = model.config.rms_norm_eps
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def lm_head(model):
    return model.lm_head.weight.detach().double().numpy()


def check_load(directory, out):
    directory = Path(directory)
    config_json = json.loads((directory / "config.json").read_text())
    family = family_of(config_json)
    fixture = np.load(OUT_DIR / family / "outputs.npz")
    inputs = {
        k: fixture[k]
        for k in (
            "input_ids",
            "attention_mask",
            "position_ids",
            "gen_input_ids",
            "gen_attention_mask",
        )
    }
    vocab = config_json.get("vocab_size")
    if vocab is not None and max(inputs["input_ids"].max(), inputs["gen_input_ids"].max()) >= vocab:
        raise SystemExit(f"fixture token ids exceed the checkpoint's vocab_size={vocab}")
    st_files = sorted(directory.glob("*.safetensors"))
    st_dtypes = {}
    for f in st_files:
        names, _ = safetensors_index(f)
        for v in names.values():
            st_dtypes[v["dtype"]] = st_dtypes.get(v["dtype"], 0) + 1
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    problems = {
        k: [str(x) for x in info.get(k, [])]
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    if any(problems.values()):
        raise SystemExit(f"transformers did not load {directory} cleanly: {problems}")
    tied_config = bool(model.config.tie_word_embeddings)
    tied_model = model.lm_head.weight is model.model.embed_tokens.weight
    if tied_config != tied_model:
        # transformers 5 only warns (and unties) when a tied config's checkpoint also holds a
        # different lm_head.weight.
        raise SystemExit(
            f"{directory}: tie_word_embeddings={tied_config} but lm_head tied={tied_model}"
        )
    problems["tie_word_embeddings"] = tied_config
    model.eval()
    torch.use_deterministic_algorithms(True)
    arrays, gen_checks = run_all(model, inputs)
    mask = inputs["attention_mask"]
    vs_fixture = {}
    if arrays["logits"].shape == fixture["logits"].shape:
        vs_fixture = {
            "max_abs_logits_minus_fixture_valid": valid_max_diff(
                arrays["logits"], fixture["logits"], mask
            ),
            "max_abs_logits_f64_minus_fixture_valid": valid_max_diff(
                arrays["logits_f64"], fixture["logits_f64"], mask
            ),
            "max_abs_logits_f64_rope64_minus_fixture_valid": valid_max_diff(
                arrays["logits_f64_rope64"], fixture["logits_f64_rope64"], mask
            ),
            "gen_tokens_equal_fixture": bool(
                np.array_equal(arrays["gen_tokens"], fixture["gen_tokens"])
            ),
        }
    meta = {
        "generator": "tests/reference/generate_hf_models.py --check-load",
        "checkpoint": str(directory),
        "family": family,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "config_json": config_json,
        "safetensors_files": [f.name for f in st_files],
        "safetensors_dtypes": st_dtypes,
        "loaded_dtype": (
            "float32 (from_pretrained dtype=torch.float32); logits_f64 after model.double()"
        ),
        "attn_implementation": model.config._attn_implementation,
        "loading_info": problems,
        "position_ids_convention": "max(cumsum(attention_mask, -1) - 1, 0)",
        "gen_checks": gen_checks,
        "vs_fixture_weights": vs_fixture,
        "note": (
            "inputs are those of fixtures/hf_models/<family>/outputs.npz; the vs_fixture"
            " numbers are only expected to be ~0 when DIR holds the fixture's own weights"
        ),
    }
    arrays.update(inputs)
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} (family {family}) " + json.dumps(vs_fixture))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check-load",
        metavar="DIR",
        help="load a local checkpoint directory and record transformers' outputs",
    )
    parser.add_argument("--out", metavar="FILE.npz", help="output of --check-load")
    args = parser.parse_args(argv)
    if args.check_load:
        if not args.out:
            parser.error("--check-load needs --out")
        check_load(args.check_load, args.out)
    else:
        generate_fixtures()


if __name__ == "__main__":
    sys.exit(main())
