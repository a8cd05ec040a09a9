"""Command-line options that several subcommands share, each defined once (name, default, help),
and the way back from a stage's config to the flags that give it (the rerun hints of `univ all`).

One name means one thing everywhere: `--data-seed` orders the corpus, `--sae-seed` initialises the
SAEs, `--seq-seed` draws the circuits' random sequences; `--batch-contexts` counts contexts per
forward pass, `--sae-batch-size` SAE rows per step, `--batch-seqs` circuit sequences per pass.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import typer

DEFAULT_DATASET = "Skylion007/openwebtext"

# The corpus, read the same way by every command that reads one (cache, fit-sae --model, match,
# all), so that each finds the token store the others made.
Dataset = typer.Option(DEFAULT_DATASET, "--dataset", envvar="UNIV_DATASET",
                       help="Hugging Face dataset name, or a local .txt/.jsonl/.parquet file or folder.")
Split = typer.Option("train", "--split", help="Dataset split (Hugging Face datasets).")
DatasetRevision = typer.Option(None, "--dataset-revision", help="Dataset revision on the Hub, e.g. refs/convert/parquet.")
TextField = typer.Option("text", "--text-field", help="Field holding the text (.jsonl, .parquet, Hub datasets).")
DataSeed = typer.Option(42, "--data-seed", help="Seed of the document order.")
Tokens = typer.Option("1M", "--tokens", help="The MPPC window: kept tokens cached and correlated (10000, 250k, 1M).")
CtxLen = typer.Option(1024, "--ctx-len", help="Tokens per context, BOS included.")
ChunkTokens = typer.Option("65536", "--chunk-tokens", help="Context tokens per chunk file of the stores (the unit of resumption).")
BatchContexts = typer.Option(16, "--batch-contexts", help="Contexts per forward pass of the model.")

# How activations are computed and where they go.
CacheDir = typer.Option(Path("univ-cache"), "--cache-dir", envvar="UNIV_CACHE", help="Cache root.")
Device = typer.Option("auto", "--device", help="auto (cuda when available), cpu, cuda, cuda:N.")
Dtype = typer.Option("auto", "--dtype", help="Forward dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")
StoreDtype = typer.Option("auto", "--store-dtype", help="Dtype the activations are stored in: auto (the forward dtype), bf16, fp16, fp32.")
CpuScan = typer.Option(
    "eager", "--cpu-scan",
    help="Mamba on the CPU: eager (PyTorch) or compiled (torch.compile, faster scans, last bits differ); part of the cache key.")
Centre = typer.Option(
    "layernorm", "--centre",
    help="layernorm: store the residual stream of models that read it through LayerNorm (GPT-NeoX) minus its "
         "per-token mean, as TransformerLens caches it (the authors'); none: as computed.")

# SAEs (fit-sae, and match and all, which fit them on the way).
Arch = typer.Option("relu", "--arch", help="relu (ReLU + L1, the study's) or topk.")
Expansion = typer.Option(32, "--expansion", help="d_sae = expansion x d_model.")
L1 = typer.Option(5.0, "--l1", help="L1 coefficient (relu).")
K = typer.Option(32, "--k", help="Active latents per token (topk).")
SaeTrainTokens = typer.Option(None, "--sae-train-tokens", help="SAE training tokens (default: 100M streamed off the model; a store's training rows once with fit-sae --acts).")
SaeBatchSize = typer.Option(4096, "--sae-batch-size", help="SAE rows per optimiser step.")
SaeEvalTokens = typer.Option("64k", "--sae-eval-tokens", help="SAE held-out rows: documents after the MPPC window (or the end of a store given with --acts, at most a tenth).")
SaeSeed = typer.Option(42, "--sae-seed", help="Seed of the SAE initialisation and batch order (the sae-seed skyline uses it + 1).")

# Circuits (induction, offbyone).
SeqSeed = typer.Option(0, "--seq-seed", help="Seed of the random sequences.")
BatchSeqs = typer.Option(64, "--batch-seqs", help="Sequences per forward pass.")
CircuitDtype = typer.Option("fp32", "--dtype", help="fp32 (default), bf16, fp16.")

# Config field -> flag, for the rerun hints. A field whose value is its default is left out.
CORPUS = {"dataset": "--dataset", "split": "--split", "dataset_revision": "--dataset-revision",
          "text_field": "--text-field", "seed": "--data-seed", "tokens": "--tokens", "ctx_len": "--ctx-len",
          "chunk_tokens": "--chunk-tokens", "batch_size": "--batch-contexts", "dtype": "--dtype",
          "store_dtype": "--store-dtype", "centre": "--centre", "cpu_scan": "--cpu-scan", "device": "--device"}
SAE = {"arch": "--arch", "expansion": "--expansion", "l1": "--l1", "k": "--k", "train_tokens": "--sae-train-tokens",
       "batch_size": "--sae-batch-size", "eval_tokens": "--sae-eval-tokens", "seed": "--sae-seed"}
CIRCUIT = {"n_seqs": "--n-seqs", "state_seqs": "--state-seqs", "seq_len": "--seq-len", "seed": "--seq-seed",
           "batch": "--batch-seqs", "dtype": "--dtype", "device": "--device", "effect": "--effect"}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def of(cfg, names: dict[str, str], skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that set ``cfg``'s non-default fields among ``names`` (field -> flag)."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name not in names or f.name in skip:
            continue
        value = getattr(cfg, f.name)
        if value is None or value == _default(f):
            continue
        out += [names[f.name], str(value)]
    return out


def command(*parts) -> str:
    """A shell command line: `univ` and the parts, quoted; None and '' left out."""
    return "univ " + " ".join(shlex.quote(str(p)) for p in parts if p is not None and p != "")
