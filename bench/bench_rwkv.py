"""RWKV-169M's forward (every block's output, as `univ cache` reads it) against Pythia-160M's in the
same run, random weights, with univ's WKV and with transformers' own (a Python loop over positions
on the CPU). Goal: RWKV at least half Pythia's tokens/s.

    python bench/bench_rwkv.py [--batch 4] [--len 1024] [--reps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_mamba import hooked_resid, pythia_160m, tokens_per_s  # noqa: E402

from univ import wkv  # noqa: E402
from univ.architectures import CONFIGS  # noqa: E402


def rwkv_169m():
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIGS["rwkv-169m"]))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    pythia = pythia_160m().to(device, dtype).eval()
    rwkv = rwkv_169m().to(device, dtype).eval()
    tokens = torch.randint(0, 50_000, (args.batch, args.len), device=device)

    def univ_rwkv(t):
        with wkv.in_transformers():
            return hooked_resid(rwkv.rwkv, rwkv.rwkv.blocks, t)

    fns = {"pythia-160m": lambda t: hooked_resid(pythia.gpt_neox, pythia.gpt_neox.layers, t),
           "rwkv-169m (univ's WKV)": univ_rwkv,
           "rwkv-169m (transformers' WKV)": lambda t: hooked_resid(rwkv.rwkv, rwkv.rwkv.blocks, t)}
    rates = tokens_per_s(fns, tokens, args.reps, device)
    print(json.dumps({"device": str(device), "batch": args.batch, "len": args.len,
                      "tokens_per_s": {k: round(v) for k, v in rates.items()},
                      "rwkv_over_pythia": round(rates["rwkv-169m (univ's WKV)"] / rates["pythia-160m"], 2),
                      "univ_over_transformers_wkv": round(rates["rwkv-169m (univ's WKV)"]
                                                          / rates["rwkv-169m (transformers' WKV)"], 2)}))


if __name__ == "__main__":
    main()
