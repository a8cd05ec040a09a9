"""Tokens/s of the activation-cache forward: Pythia-160M vs Mamba-130M (random weights, real
configs), through univ and through transformers' own Mamba fallback, in one run.

    python bench/bench_mamba.py                    # GPU: batch 16 x 1024, bf16; CPU: 1 x 256, fp32
    python bench/bench_mamba.py --sweep --parts    # GPU: first the scan's launch shapes, then
                                                   # where one Mamba layer's time goes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ import mamba, scan, scan_compiled  # noqa: E402


def pythia_160m():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                            num_attention_heads=12, intermediate_size=3072,
                                            max_position_embeddings=2048, rotary_pct=0.25))


def mamba_130m():
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16,
                                        expand=2, conv_kernel=4, time_step_rank=48))


def hooked_resid(model, blocks, tokens):
    """Every block's output through forward hooks (how univ reads GPT-NeoX, and transformers' Mamba)."""
    out = []
    hooks = [b.register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out


def tokens_per_s(fns: dict, tokens, reps, device) -> dict:
    """Median tokens/s of each forward, timed in turn within every repetition so that a busy
    spell on a shared machine hits all of them alike rather than one."""
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():
        fn(tokens)  # warm-up: kernels compiled, caches filled
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: tokens.numel() / statistics.median(ts) for name, ts in times.items()}


def eager_scan(fn):
    """fn() with the CPU scan eager (univ's default), to show what --cpu-scan compiled gains."""
    with scan_compiled.mode("eager"):
        return fn()


def layer_parts(model, tokens, reps, device):
    """Median milliseconds of each step of one Mamba layer (layer 1: a float32 residual in)."""
    import torch.nn.functional as F

    from univ.norm import add_rms_norm

    block = model.backbone.layers[1]
    mx = block.mixer
    E, R, N = mx.intermediate_size, mx.time_step_rank, mx.ssm_state_size
    u = model.backbone.embeddings(tokens)
    resid = u.float()
    xz = F.linear(u, mx.in_proj.weight)
    x, z = xz[..., :E], xz[..., E:]
    w = mx.conv1d.weight.squeeze(1)
    xc = scan.causal_conv_silu(x, w, mx.conv1d.bias)
    dbl = F.linear(xc, mx.x_proj.weight)
    dt = F.linear(dbl[..., :R], mx.dt_proj.weight)
    A = -torch.exp(mx.A_log.float())
    y, _ = scan.selective_scan(xc, dt, A, dbl[..., R:R + N], dbl[..., R + N:], mx.D, mx.dt_proj.bias, z=z)
    steps = {
        "residual add + RMSNorm": lambda: add_rms_norm(resid, u, block.norm, True),
        "in_proj": lambda: F.linear(u, mx.in_proj.weight),
        "conv + SiLU": lambda: scan.causal_conv_silu(x, w, mx.conv1d.bias),
        "x_proj": lambda: F.linear(xc, mx.x_proj.weight),
        "dt_proj": lambda: F.linear(dbl[..., :R], mx.dt_proj.weight),
        "A = -exp(A_log)": lambda: -torch.exp(mx.A_log.float()),
        "selective scan": lambda: scan.selective_scan(xc, dt, A, dbl[..., R:R + N], dbl[..., R + N:], mx.D,
                                                      mx.dt_proj.bias, z=z),
        "out_proj": lambda: F.linear(y, mx.out_proj.weight),
    }
    ms = {k: tokens.numel() / v * 1e3 for k, v in tokens_per_s({k: (lambda t, f=f: f()) for k, f in steps.items()},
                                                               tokens, reps, device).items()}
    for k, v in ms.items():
        print(f"  {k:24} {v:8.3f} ms per layer")
    print(f"  {'sum':24} {sum(ms.values()):8.3f} ms per layer, x{len(model.backbone.layers)} layers")


def sweep_scan(batch, length, device):
    """Time the Triton scan alone over launch shapes; keep the fastest in scan.SCAN_CONFIG."""
    import itertools

    from triton.testing import do_bench

    E, N = 1536, 16
    g = torch.Generator(device=device).manual_seed(0)
    x, dt, z = (torch.randn(batch, length, E, device=device, generator=g).bfloat16() for _ in range(3))
    B, C = (torch.randn(batch, length, N, device=device, generator=g).bfloat16() for _ in range(2))
    A, D, bias = -torch.rand(E, N, device=device) - 0.1, torch.randn(E, device=device), torch.randn(E, device=device)
    best = None
    # 4 channels per thread (block_e / warps = 128) keeps the states in-thread without spills;
    # (64, 1) splits them over 2 threads, for comparison.
    shapes = itertools.product((64, 128, 256, length), ((128, 1), (256, 2), (64, 1)), (1, 2, 3))
    for chunk, (block_e, warps), stages in shapes:
        scan.SCAN_CONFIG.update(chunk=chunk, block_e=block_e, num_warps=warps, stages=stages)
        try:
            ms = do_bench(lambda: scan.selective_scan(x, dt, A, B, C, D, bias, z=z), warmup=5, rep=20,
                          return_mode="median")
        except Exception as e:  # a shape the compiler rejects
            print(f"scan {dict(scan.SCAN_CONFIG)}: failed ({type(e).__name__})")
            continue
        print(f"scan {dict(scan.SCAN_CONFIG)}: {ms:.3f} ms per layer")
        if best is None or ms < best[0]:
            best = (ms, dict(scan.SCAN_CONFIG))
    scan.SCAN_CONFIG.update(best[1])
    print(f"fastest: {best[1]} at {best[0]:.3f} ms per layer")


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16 if cuda else 1)
    ap.add_argument("--len", type=int, default=1024 if cuda else 256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-hf-mamba", action="store_true", help="transformers' fallback is slow; skip it")
    ap.add_argument("--sweep", action="store_true", help="first time the Triton scan's launch shapes (GPU)")
    ap.add_argument("--parts", action="store_true", help="then time each step of one Mamba layer")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    # The CPU scan compiled (--cpu-scan compiled); eager_scan() shows the default.
    scan_compiled._mode = "compiled"
    if args.sweep and cuda:
        sweep_scan(args.batch, args.len, device)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    tokens = torch.randint(0, 50000, (args.batch, args.len), device=device)
    pythia = pythia_160m().to(device, dtype).eval()
    mam = mamba_130m().to(device, dtype).eval()
    layers_m = list(range(24))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}, torch {torch.__version__}, dtype {dtype}, batch {args.batch} x {args.len}")
    forwards = {
        "pythia-160m (univ: hooks)": lambda t: hooked_resid(pythia.gpt_neox, pythia.gpt_neox.layers, t),
        "mamba-130m (univ)": lambda t: mamba.resid(mam, t, layers_m),
    }
    if not cuda:
        forwards["mamba-130m (univ, eager scan)"] = lambda t: eager_scan(lambda: mamba.resid(mam, t, layers_m))
    with torch.no_grad():
        tps = tokens_per_s(forwards, tokens, args.reps, device)
        if not args.skip_hf_mamba:
            tps |= tokens_per_s({"mamba-130m (transformers)": lambda t: hooked_resid(mam.backbone, mam.backbone.layers, t)},
                                tokens, 1, device)
    for k, v in tps.items():
        print(f"{k:28} {v:12,.0f} tokens/s")
    univ_m, univ_p = tps["mamba-130m (univ)"], tps["pythia-160m (univ: hooks)"]
    print(f"ratio univ Mamba / univ Pythia:        {univ_m / univ_p:.3f}   (goal >= 0.5)")
    if "mamba-130m (univ, eager scan)" in tps:
        print(f"  with the eager CPU scan:             {tps['mamba-130m (univ, eager scan)'] / univ_p:.3f}")
    if "mamba-130m (transformers)" in tps:
        print(f"ratio univ Mamba / transformers Mamba: {univ_m / tps['mamba-130m (transformers)']:.1f}")
    if args.parts:
        print("one Mamba-130M layer, step by step:")
        with torch.no_grad():
            layer_parts(mam, tokens, args.reps, device)


if __name__ == "__main__":
    main()
