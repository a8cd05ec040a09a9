"""univ's SAE trainer against a plain PyTorch reference, on the same activations, in one run.

The reference is what one writes first: dense float32 matmuls, torch.optim.Adam without
fusion, dense TopK. Both train the same number of steps from the same initialisation; the
script prints tokens/s, their ratio, and the held-out FVU each reaches (speed must not cost
quality).

    python bench/bench_sae.py --size study    # d=768, 32x (24,576 latents), batch 4096 (GPU)
    python bench/bench_sae.py --size cpu      # a small shape for the CPU
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ.sae_metrics import evaluate  # noqa: E402
from univ.trainer import _optimizer, _train_window  # noqa: E402
from univ.sae import SAE, SAEConfig  # noqa: E402
from univ.sae_train import TrainConfig  # noqa: E402

SIZES = {"study": dict(d=768, expansion=32, batch=4096, steps=150),
         "cpu": dict(d=128, expansion=8, batch=1024, steps=30)}


def make_acts(n: int, d: int, device, seed=0) -> torch.Tensor:
    """Residual-like rows: sparse non-negative mixtures of 8·d random directions, plus noise and a mean."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_dirs = 8 * d
    dirs = torch.randn(n_dirs, d, device=device, generator=g) / math.sqrt(d)
    out = torch.empty(n, d, device=device)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        idx = torch.randint(0, n_dirs, (m, 24), device=device, generator=g)
        coef = torch.rand(m, 24, device=device, generator=g) * 4
        out[s:s + m] = torch.nn.functional.embedding_bag(idx, dirs, per_sample_weights=coef, mode="sum")
    out += 0.05 * torch.randn(n, d, device=device, generator=g) + 0.5
    return out


class Reference(torch.nn.Module):
    """The plain version: dense float32 everywhere."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.cfg = sae.cfg
        for name, p in sae.named_parameters():
            setattr(self, name, torch.nn.Parameter(p.detach().clone()))
        self.data_scale = sae.data_scale.clone()

    def loss(self, x):
        if self.cfg.normalisation == "token":
            x = x * math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True)
        else:
            x = x / self.data_scale
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.cfg.arch == "relu":
            f = torch.relu(pre)
            l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            l1 = 0.0
        x_hat = f @ self.W_dec + self.b_dec
        return (x_hat - x).pow(2).sum(-1).mean() + (self.cfg.l1 or 0.0) * l1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_univ(sae, x, tc, batch, steps, device):
    opt = _optimizer(sae, tc.lr, device)
    since = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    window = 32
    _train_window(sae, opt, x[: 3 * batch], 3, batch, tc, 0, since, 0)  # warm-up (compilation, caches)
    sync(device)
    start = time.perf_counter()
    for w in range(0, steps, window):
        n = min(window, steps - w)
        _train_window(sae, opt, x[w * batch:(w + n) * batch], n, batch, tc, w, since, 0)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def time_reference(ref, x, lr, batch, steps, device):
    opt = torch.optim.Adam(ref.parameters(), lr=lr, foreach=False, fused=False)

    def step(xb):
        loss = ref.loss(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ref.cfg.arch == "topk":
            with torch.no_grad():
                ref.W_dec /= ref.W_dec.norm(dim=1, keepdim=True)

    for b in range(3):
        step(x[b * batch:(b + 1) * batch])
    sync(device)
    start = time.perf_counter()
    for b in range(steps):
        step(x[b * batch:(b + 1) * batch])
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="study" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--arch", choices=["relu", "topk", "both"], default="both")
    args = ap.parse_args()
    size = SIZES[args.size]
    steps = args.steps or size["steps"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, batch = size["d"], size["batch"]
    d_sae = d * size["expansion"]
    x = make_acts((steps + 4) * batch, d, device)
    held_out = make_acts(16 * 1024, d, device, seed=1)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"d={d}, d_sae={d_sae}, batch={batch}, steps={steps}")
    print(f"{'arch':6} {'impl':10} {'tokens/s':>12} {'ratio':>7} {'FVU':>8}")
    for arch in (["relu", "topk"] if args.arch == "both" else [args.arch]):
        cfg = SAEConfig(arch=arch, d_in=d, d_sae=d_sae, k=32 if arch == "topk" else None,
                        l1=5.0 if arch == "relu" else None, normalisation="token" if arch == "relu" else "dataset")
        torch.manual_seed(0)
        sae = SAE(cfg).to(device)
        sae.initialise(x[:4096].cpu(), torch.Generator().manual_seed(0))
        sae.to(device)
        ref = Reference(sae).to(device)
        lr = 4e-4 if arch == "relu" else 2e-4 / math.sqrt(d_sae / 2**14)
        tc = TrainConfig(lr=lr, total_steps=steps + 3,
                         matmul_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        ref_tps = time_reference(ref, x, lr, batch, steps, device)
        univ_tps = time_univ(sae, x, tc, batch, steps, device)
        ref_sae = SAE(cfg).to(device)
        ref_sae.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=False)
        ref_sae.data_scale.copy_(ref.data_scale)
        fvu_ref = 1 - evaluate(ref_sae, held_out)["explained_variance"]
        fvu_univ = 1 - evaluate(sae, held_out)["explained_variance"]
        print(f"{arch:6} {'reference':10} {ref_tps:12,.0f} {1.0:7.2f} {fvu_ref:8.4f}")
        print(f"{arch:6} {'univ':10} {univ_tps:12,.0f} {univ_tps / ref_tps:7.2f} {fvu_univ:8.4f}")


if __name__ == "__main__":
    main()
