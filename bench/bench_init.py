"""Held-out explained variance of ReLU SAEs whose decoder bias starts at zero (lm_saes', the
default) or at the geometric median of a sample (univ's option), all else equal (the relu recipe,
fit-sae on a store of residual-like rows with a mean offset), over several seeds.

    python bench/bench_init.py --d 64 --tokens 3M --l1 1   # what the README reports (CPU, ~5 min)
    python bench/bench_init.py --d 768 --expansion 32 --tokens 20M   # the study's shape (GPU)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sae import make_acts  # noqa: E402
from univ.fit import FitConfig, LayerData, fit  # noqa: E402
from univ.options import parse_count  # noqa: E402
from univ.store import Store  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--expansion", type=float, default=8)
    parser.add_argument("--tokens", default="1M")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--l1", type=float, default=5.0)
    args = parser.parse_args()
    tokens = parse_count(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open_or_create(Path(tmp) / "acts", "acts", {"layer": 0})
        rows = min(tokens, 1_000_000) + 65_536
        x = make_acts(rows, args.d, torch.device("cpu"))
        for c, s in enumerate(range(0, rows, 65_536)):
            store.write_chunk(c, {"acts": x[s:s + 65_536]}, rows=len(x[s:s + 65_536]))
        store.set_complete(True)
        print(f"d {args.d}, {args.expansion}x, l1 {args.l1}, {tokens:,} training tokens, held-out 65,536 rows")
        for init in ("zeros", "geometric-median"):
            ev, l0 = [], []
            for seed in range(args.seeds):
                cfg = FitConfig(arch="relu", expansion=args.expansion, l1=args.l1, train_tokens=tokens, seed=seed,
                                init_b_dec=init, eval_tokens=65_536, window_rows=65_536)
                [r] = fit(cfg, [LayerData(0, store, Path(tmp) / init / str(seed))], progress=False)
                ev.append(r.explained_variance)
                l0.append(r.l0)
            print(f"b_dec {init:17}: explained variance {sum(ev) / len(ev):.4f} ({', '.join(f'{v:.4f}' for v in ev)}), "
                  f"L0 {sum(l0) / len(l0):.1f}", flush=True)


if __name__ == "__main__":
    main()
