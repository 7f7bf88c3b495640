"""Trajectories of PyPI `adamp==0.3.0` (AdamP, SGDP) on `torch==2.13.0` (CPU), float64.

    pip install torch==2.13.0 adamp==0.3.0 numpy       # the [ref] extra
    python tests/reference/generate_adamp.py

The problem has every kind of parameter the optimizers treat differently:
* scale-invariant matrices: a conv kernel followed by BatchNorm2d (invariant per output channel),
  a linear layer followed by BatchNorm1d (per channel) and a linear layer followed by LayerNorm
  (invariant for the layer as a whole);
* a zero-initialised matrix added before the LayerNorm (the LoRA-B case: cos = 0, so the channel
  test fires with a zero weight direction);
* a non-invariant matrix (the classifier head) and 1-D parameters (norm gains and biases, the
  head bias).

Each configuration trains for STEPS steps on fixed random mini-batches. The fixture stores the
initial parameters, and for every step (stacked on a leading axis) the gradients the reference
computed and the parameters after its update (torch layout: weights (out, in), conv (out, in,
kh, kw)), so a replay through alignjax with the same gradients (teacher forcing) must reproduce
every step. It also stores, per
step and matrix, each view's max |cos(g, w)| * sqrt(row length) / delta (the projection fires
below 1), so steps on the knife edge can be reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import adamp
import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "fixtures" / "adamp.npz"
SEED = 20261126
STEPS = 20
N = 16
CONFIGS = {
    "adamp": dict(opt="AdamP", lr=1e-2),
    "adamp_wd": dict(opt="AdamP", lr=1e-2, weight_decay=0.1),
    "adamp_nesterov": dict(opt="AdamP", lr=1e-2, nesterov=True),
    "adamp_nesterov_wd": dict(opt="AdamP", lr=1e-2, weight_decay=0.1, nesterov=True),
    "sgdp_wd": dict(opt="SGDP", lr=0.1, weight_decay=1e-2),
    "sgdp_mom_damp": dict(opt="SGDP", lr=0.1, momentum=0.9, dampening=0.1),
    "sgdp_mom_wd": dict(opt="SGDP", lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgdp_nesterov_wd": dict(opt="SGDP", lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn2d = nn.BatchNorm2d(4)
        self.lin1 = nn.Linear(5, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)
        self.lin2 = nn.Linear(10, 6, bias=False)
        self.adapter = nn.Linear(10, 6, bias=False)
        nn.init.zeros_(self.adapter.weight)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, img, x):
        a = torch.relu(self.bn2d(self.conv(img))).mean(dim=(2, 3))
        b = torch.relu(self.bn1d(self.lin1(x)))
        h = torch.cat([a, b], dim=1)
        return self.head(torch.relu(self.ln(self.lin2(h) + self.adapter(h))))


def scores(w, g, delta=0.1, eps=1e-8):
    """(channel, layer) max |cos| * sqrt(d) / delta, torch's cosine_similarity convention."""
    out = []
    for rows in (w.reshape(w.shape[0], -1), w.reshape(1, -1)):
        grows = g.reshape(rows.shape)
        cos = np.abs((rows * grows).sum(1)) / (
            np.maximum(np.linalg.norm(rows, axis=1), eps)
            * np.maximum(np.linalg.norm(grows, axis=1), eps)
        )
        out.append(cos.max() * np.sqrt(rows.shape[1]) / delta)
    return out


def main():
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(SEED)
    init = Net()
    rng = np.random.default_rng(SEED)
    data = [
        (rng.normal(size=(N, 1, 5, 5)), rng.normal(size=(N, 5)), rng.integers(0, 3, N))
        for _ in range(STEPS)
    ]
    names = [n for n, _ in init.named_parameters()]
    arrays = {f"init/{n}": p.detach().numpy().copy() for n, p in init.named_parameters()}
    matrices = [n for n, p in init.named_parameters() if p.ndim > 1]
    for cfg_name, cfg in CONFIGS.items():
        net = Net()
        net.load_state_dict(init.state_dict())
        kwargs = {k: v for k, v in cfg.items() if k != "opt"}
        opt = getattr(adamp, cfg["opt"])(net.parameters(), **kwargs)
        score = np.zeros((STEPS, len(matrices), 2))
        grads = {n: [] for n in names}
        after = {n: [] for n in names}
        for step, (img, x, y) in enumerate(data):
            opt.zero_grad()
            logits = net(torch.tensor(img), torch.tensor(x))
            nn.functional.cross_entropy(logits, torch.tensor(y)).backward()
            params = dict(net.named_parameters())
            for i, n in enumerate(matrices):
                score[step, i] = scores(params[n].detach().numpy(), params[n].grad.numpy())
            for n in names:
                grads[n].append(params[n].grad.numpy().copy())
            opt.step()
            for n in names:
                after[n].append(params[n].detach().numpy().copy())
        for n in names:  # [STEPS, *shape] each
            arrays[f"{cfg_name}/grad/{n}"] = np.stack(grads[n])
            arrays[f"{cfg_name}/param/{n}"] = np.stack(after[n])
        arrays[f"{cfg_name}/scores"] = score
    meta = {
        "generator": "tests/reference/generate_adamp.py",
        "adamp": adamp.__version__ if hasattr(adamp, "__version__") else "0.3.0",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "seed": SEED,
        "dtype": "float64",
        "steps": STEPS,
        "params": names,
        "matrices": matrices,
        "configs": CONFIGS,
        "layout": "torch: Linear (out, in), Conv2d (out, in, kh, kw)",
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} (torch {torch.__version__}); {len(arrays)} arrays")


if __name__ == "__main__":
    main()
