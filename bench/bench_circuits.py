"""Seconds of `induction` and `offbyone` at their default sizes on the real configs
(Pythia-160M, Mamba-130M) with random weights: the circuit analyses must take minutes on one GPU.

    python bench/bench_circuits.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_mamba import mamba_130m, pythia_160m  # noqa: E402
from univ import models  # noqa: E402
from univ.circuit import CircuitConfig  # noqa: E402
from univ.induction import run_induction  # noqa: E402
from univ.offbyone import run_offbyone  # noqa: E402


class VocabOnly:
    """What the circuit stages ask of a tokenizer: its size and its special ids."""

    all_special_ids = [0, 1]

    def __len__(self):
        return 50277


def adapter(family, model, config, device):
    src = models.ModelSource(f"random {family}", f"random/{family}", Path("."), "random", "hf", family, config)
    return models.ADAPTERS[family](src, model.to(device).eval().requires_grad_(False), VocabOnly())


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, float32")
    lms = [adapter("gpt_neox", pythia_160m(), {"num_hidden_layers": 12, "max_position_embeddings": 2048}, device),
           adapter("mamba", mamba_130m(), {"num_hidden_layers": 24}, device)]
    with tempfile.TemporaryDirectory() as tmp:
        for lm in lms:
            start = time.perf_counter()
            r = run_induction(lm, CircuitConfig(device=device), Path(tmp))
            t_ind = time.perf_counter() - start
            start = time.perf_counter()
            run_offbyone(lm, CircuitConfig(device=device, n_seqs=128, seq_len=129), Path(tmp))
            t_obo = time.perf_counter() - start
            print(f"{lm.family:9} induction (256 x 64): {t_ind:7.1f} s   offbyone (128 x 129): {t_obo:7.1f} s   "
                  f"tables: {', '.join(r.rows)}")


if __name__ == "__main__":
    main()
