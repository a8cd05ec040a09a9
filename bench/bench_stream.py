"""Streamed SAE training against training the same SAEs from an already cached store, in one run.

For each model (random weights): every layer's SAE is trained on N tokens streamed off the model
(fit-sae --model), then the same rows are written to activation stores and the same SAEs are
trained from them (fit-sae --acts). Printed: tokens/s of both, their ratio (the goal: streamed
>= 0.8x stored, i.e. the model's forward must not dominate), and the share of the streamed run's
time spent in the forward.

    python bench/bench_stream.py --size gpu   # Pythia-160M and Mamba-130M configs, 32x, batch 4096
    python bench/bench_stream.py --size cpu   # narrow models of both families (d 256, 4 layers), 32x
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from univ.tryout import corpus_and_tokenizer  # noqa: E402
from univ import fit, models, stream, trainer  # noqa: E402
from univ.data import DataConfig  # noqa: E402
from univ.store import Store  # noqa: E402

SIZES = {
    "gpu": dict(narrow=False, expansion=32, batch=4096, window=131_072, tokens=524_288, ctx=1024, contexts=16),
    "cpu": dict(narrow=True, expansion=32, batch=4096, window=32_768, tokens=65_536, ctx=256, contexts=16),
}


def _models(narrow: bool):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig, MambaForCausalLM

    if narrow:
        neox = GPTNeoXConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=1024, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
        mamba = MambaConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, state_size=16, expand=2,
                            conv_kernel=4, time_step_rank=16, bos_token_id=0, eos_token_id=0, pad_token_id=1)
        return {"pythia-narrow": lambda: GPTNeoXForCausalLM(neox), "mamba-narrow": lambda: MambaForCausalLM(mamba)}
    from bench_mamba import mamba_130m, pythia_160m

    return {"pythia-160m": pythia_160m, "mamba-130m": mamba_130m}


def bench(name: str, build, tokenizer, root: Path, size: dict, device: torch.device) -> None:
    torch.manual_seed(0)
    build().save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = models.load_source(models.resolve(str(root / name)), device, dtype)
    layers = list(range(lm.n_layers))
    cfg = fit.FitConfig(arch="relu", expansion=size["expansion"], batch_size=size["batch"], window_rows=size["window"],
                        train_tokens=size["tokens"], checkpoint_minutes=1e9, device=str(device))
    plan = fit._plan(cfg, lm.d_model, size["tokens"], device)
    sae_cfgs = {layer: fit._sae_config(cfg, plan, lm.d_model, {}) for layer in layers}
    source = stream.source(DataConfig(str(root / "corpus.txt"), ctx_len=size["ctx"]), 0, tokenizer, size["contexts"])
    outs = {layer: root / "saes" / name / str(layer) for layer in layers}

    forward = [0.0]
    real = lm.activations

    def timed(*a, **k):
        sync()
        t = time.perf_counter()
        out = real(*a, **k)
        sync()
        forward[0] += time.perf_counter() - t
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train(windows) -> float:
        sync()
        t = time.perf_counter()
        trainer.train(sae_cfgs, outs, windows, plan.tc, cfg.batch_size, cfg.seed, cfg.init_b_dec, device,
                      cfg.checkpoint_minutes, True, name, progress=False)
        sync()
        return time.perf_counter() - t

    lm.activations = timed
    streamed = train(fit._stream_windows(lm, source, layers, plan.window, False, device))
    share = forward[0] / streamed
    lm.activations = real
    stores = []
    for layer in layers:
        s = Store.open_or_create(root / "acts" / name / f"resid_post.{layer}", "acts", {"layer": layer})
        stores.append(fit.LayerData(layer, s, outs[layer]))
    done = 0
    for index, (rows, _) in enumerate(stream.windows(lm, source, layers, plan.window, device=torch.device("cpu"))):
        for ld in stores:
            ld.store.write_chunk(index, {"acts": rows[ld.layer]}, rows=len(rows[ld.layer]))
        done += plan.window
        if done >= size["tokens"] + plan.window:  # the first window twice: the initialisation reads it
            break
    stored = train(fit._store_windows(stores, done, plan.window, device))
    n = plan.tc.total_steps * cfg.batch_size
    print(f"{name:15} {len(layers):3d} layers  streamed {n / streamed:10,.0f} tok/s  stored {n / stored:10,.0f} tok/s  "
          f"ratio {stored / streamed:5.2f}  forward {100 * share:4.1f}% of the streamed time", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    size = SIZES[args.size]
    device = models.resolve_device("auto")
    print(f"bench_stream --size {args.size} on {device}: {size}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = corpus_and_tokenizer(root, n_docs=6000, words=(200, 900))
        for name, build in _models(size["narrow"]).items():
            bench(name, build, tokenizer, root, size, device)


if __name__ == "__main__":
    main()
