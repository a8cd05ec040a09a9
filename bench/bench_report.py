"""Size and build time of the explorer's data at the study's scale, on synthetic examples: one A
layer of 24,576 SAE features (Pythia-160M at 32x) whose partners sit in B layers of the same
width, over a 1M-token window of 1024-token contexts and a 50k vocabulary.

    python bench/bench_report.py [--features 24576]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ.examples import TOP_K, Examples, WindowTokens  # noqa: E402
from univ.explorer import _js, _layer_file, columns  # noqa: E402


class _Comparison:
    """The fields of a match result that one explorer file reads."""

    def __init__(self, features: int, b_layers: int, g: torch.Generator):
        self.layers_a, self.layers_b = [0], list(range(b_layers))
        self.a_fires = torch.ones(1, features, dtype=torch.bool)
        self.a_value = torch.rand(1, features, generator=g)
        self.a_layer = torch.randint(b_layers, (1, features), generator=g)
        self.a_index = torch.randint(features, (1, features), generator=g)


def _examples(features: int, n: int, g: torch.Generator) -> Examples:
    rows = torch.randint(n, (TOP_K, features), generator=g, dtype=torch.int64)
    # Features fire in bursts: half of each feature's top rows sit near its maximum.
    rows[TOP_K // 2:] = (rows[:1] + torch.randint(-12, 13, (TOP_K // 2, features), generator=g)).clamp(0, n - 1)
    values = torch.sort(torch.rand(TOP_K, features, generator=g) * 10, dim=0, descending=True).values
    return Examples(n, values, rows.int(), torch.randint(1, n // 100, (features,), generator=g),
                    torch.zeros(3, features))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=24_576)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    ctx = 1023  # kept tokens per 1024-token context (BOS dropped)
    n = args.tokens
    window = WindowTokens(np.random.default_rng(0).integers(0, 50_000, n), np.arange(n) // ctx)
    c = _Comparison(args.features, 24, g)
    examples = {"a": {0: _examples(args.features, n, g)}, "b": {m: _examples(args.features, n, g) for m in range(24)}}
    start = time.perf_counter()
    cols = columns(examples)  # once per comparison
    read = time.perf_counter() - start
    start = time.perf_counter()
    text = _js("univ.layer", "main-a0", _layer_file(c, cols, 0, window, set()))
    seconds = time.perf_counter() - start
    size = len(text.encode())
    print(json.dumps({"features": args.features, "file_mb": round(size / 2**20, 1),
                      "bytes_per_feature": round(size / args.features), "seconds_per_layer_file": round(seconds, 1),
                      "seconds_reading_examples": round(read, 1)}))


if __name__ == "__main__":
    main()
