"""univ's matcher against a dense float32 reference (fᵀg by torch matmul per layer pair) on the
same SAE-like sparse features, in one run; seconds for both, their ratio, the largest
difference between their correlations, and the time the study's size would take
(24,576 features per layer, 12 × 24 layer pairs, 1M tokens), extrapolated linearly from the
measured per-pair, per-token time.

    python bench/bench_match.py              # GPU: 24,576 features, 2 x 2 layers, 50k tokens
    python bench/bench_match.py --size cpu   # 1,024 features, 2 x 2 layers, 20k tokens
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ.correlate import CLAMP, Encoded, pair_max  # noqa: E402

SIZES = {"study": dict(features=24576, tokens=50_000, l0=50), "cpu": dict(features=1024, tokens=20_000, l0=20)}
STUDY_PAIRS, STUDY_TOKENS = 12 * 24, 1_000_000


def sparse_features(n, width, l0, device, seed):
    """Per token l0 active features drawn from a skewed frequency law; positive values."""
    g = torch.Generator(device=device).manual_seed(seed)
    freq = torch.rand(width, device=device, generator=g).pow(3) + 1e-3
    cols = torch.cat([torch.multinomial(freq.expand(min(4096, n - s), width), l0, generator=g)
                      for s in range(0, n, 4096)])
    cols = cols.sort(1).values
    rows = torch.arange(n, device=device).repeat_interleave(l0)
    vals = torch.rand(n * l0, device=device, generator=g) * 3 + 0.1
    cols = cols.flatten()
    s = torch.zeros(width, dtype=torch.float64, device=device).index_add_(0, cols, vals.double())
    s2 = torch.zeros(width, dtype=torch.float64, device=device).index_add_(0, cols, vals.double() ** 2)
    return Encoded(n, width, rows.int(), cols.int(), vals, None, s, s2, s2 > 0)


def dense_of(e: Encoded) -> torch.Tensor:
    d = torch.zeros(e.n, e.width, device=e.sum.device)
    d[e.rows.long(), e.cols.long()] = e.vals
    return d


def reference_pair(fa: torch.Tensor, fb: torch.Tensor):
    n = len(fa)
    cross = fa.T @ fb
    ma, mb = fa.mean(0), fb.mean(0)
    va, vb = fa.var(0, unbiased=False), fb.var(0, unbiased=False)
    corr = (cross / n - ma[:, None] * mb[None, :]) / torch.sqrt((va[:, None] * vb[None, :]).clamp_min(CLAMP))
    return corr.max(1).values, corr.max(0).values


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="study" if cuda else "cpu")
    ap.add_argument("--layers", type=int, default=2, help="layers per side (pairs = layers²)")
    args = ap.parse_args()
    size = SIZES[args.size]
    device = torch.device("cuda" if cuda else "cpu")
    n, width, l0 = size["tokens"], size["features"], size["l0"]
    a = [sparse_features(n, width, l0, device, seed=i) for i in range(args.layers)]
    b = [sparse_features(n, width, l0, device, seed=100 + i) for i in range(args.layers)]
    pairs = args.layers ** 2
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}, torch {torch.__version__}; {width} features per layer, L0 {l0}, {n} tokens, {pairs} layer pairs")

    pair_max(a[0], b[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    ours = [pair_max(x, y) for x in a for y in b]
    sync(device)
    t_univ = time.perf_counter() - start

    dense_a, dense_b = [dense_of(x) for x in a], [dense_of(y) for y in b]
    reference_pair(dense_a[0][:1000], dense_b[0][:1000])
    sync(device)
    start = time.perf_counter()
    refs = [reference_pair(x, y) for x in dense_a for y in dense_b]
    sync(device)
    t_ref = time.perf_counter() - start

    diff = max(max((o.a_value.float() - r[0]).abs().max().item(), (o.b_value.float() - r[1]).abs().max().item())
               for o, r in zip(ours, refs))
    scale = STUDY_PAIRS * STUDY_TOKENS / (pairs * n)
    print(f"{'impl':10} {'seconds':>9} {'ratio':>7}")
    print(f"{'reference':10} {t_ref:9.2f} {1.0:7.2f}")
    print(f"{'univ':10} {t_univ:9.2f} {t_ref / t_univ:7.2f}")
    if args.size == "study":  # same width and sparsity as the study: only tokens and pairs scale
        print(f"study size (288 pairs x 1M tokens), extrapolated: reference {t_ref * scale / 60:.1f} min, "
              f"univ {t_univ * scale / 60:.1f} min")
    print(f"largest |univ - reference| over the best correlations: {diff:.2e}")


if __name__ == "__main__":
    main()
