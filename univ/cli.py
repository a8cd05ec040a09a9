"""The `univ` command line: parses options, calls the stages, prints their tables.

Tables go to stdout; progress bars and logs go to stderr, so `univ ... > table.md` is clean.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import typer

try:  # typer >= 0.2x bundles its own click; older typer uses click's exceptions
    from typer import TyperException as _UsageError
except ImportError:
    from click import ClickException as _UsageError

from . import flags
from .errors import UnivError
from .options import parse_count
from .tables import Format, render

app = typer.Typer(
    name="univ",
    help="Mechanistic similarity across language model architectures (SAE features, MPPC, circuits).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a '<bool>' placeholder, no box drawing in logs
)

FormatOpt = typer.Option(Format.github, "--format", help="Table format on stdout.")


def TableOpt(names: str):
    return typer.Option(None, "--table", help=f"Print only this table ({names}); csv and tsv need one.")


FeatureScaleOpt = typer.Option(
    "raw", "--feature-scale",
    help="SAE features correlated in the activations' own scale, encode(x)*|x|/sqrt(d) (raw: the authors'), "
         "or on the SAE's normalised inputs (normalised: univ's variant).")


def _fail(message: str, code: int = 1):
    typer.echo(f"univ: error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnivError as e:
            _fail(str(e))
        except OSError as e:  # disk full, permissions, files vanishing under us
            _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
        except KeyboardInterrupt:
            _fail("interrupted; rerun the same command to resume", 130)

    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(logging.Formatter):
    """'univ: info: ...', 'univ: warning: ...': the same shape as 'univ: error: ...'."""

    def format(self, record):
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"univ {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print univ's version."),
) -> None:
    log = logging.getLogger("univ")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("univ: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _data(models: list[str], dataset, split, dataset_revision, text_field, data_seed, tokens, ctx_len, chunk_tokens,
          **how):
    """The CacheConfig of a command's corpus options (the same for every command that reads one);
    without ``tokens`` the window is left to the caller (`univ all`'s preset)."""
    from .cache import CacheConfig

    window = {} if tokens is None else {"tokens": parse_count(tokens, "--tokens"), "ctx_len": ctx_len}
    return CacheConfig(models=models, dataset=dataset, split=split, dataset_revision=dataset_revision,
                       text_field=text_field, seed=data_seed, chunk_tokens=parse_count(chunk_tokens, "--chunk-tokens"),
                       **window, **how)


@app.command()
@user_errors
def cache(
    model: list[str] = typer.Option(..., "--model", "-m", help="Model alias, Hub id or local folder; repeat to cache several models over the same tokens."),
    dataset: str = flags.Dataset,
    split: str = flags.Split,
    dataset_revision: str = flags.DatasetRevision,
    text_field: str = flags.TextField,
    data_seed: int = flags.DataSeed,
    tokens: str = flags.Tokens,
    ctx_len: int = flags.CtxLen,
    chunk_tokens: str = flags.ChunkTokens,
    layers: str = typer.Option("all", "--layers", help="'all', '-1' (the last) or e.g. '0,3,5-7'."),
    batch_contexts: int = flags.BatchContexts,
    dtype: str = flags.Dtype,
    store_dtype: str = flags.StoreDtype,
    centre: str = flags.Centre,
    cpu_scan: str = flags.CpuScan,
    device: str = flags.Device,
    hook: str = typer.Option("resid_post", "--hook", help="resid_post (residual stream after each block) or neurons."),
    cache_dir: Path = flags.CacheDir,
    force: bool = typer.Option(False, "--force", help="Recompute the activation stores."),
    fmt: Format = FormatOpt,
) -> None:
    """Cache residual-stream activations of one or more models over one shared token store."""
    from .cache import run_cache

    cfg = _data(model, dataset, split, dataset_revision, text_field, data_seed, tokens, ctx_len, chunk_tokens,
                layers=layers, batch_size=batch_contexts, dtype=dtype, store_dtype=store_dtype, centre=centre,
                cpu_scan=cpu_scan, device=device, cache_dir=cache_dir, force=force, hook=hook)
    result = run_cache(cfg)
    typer.echo(render({"cache": [r._asdict() for r in result.models]}, fmt))


@app.command("fit-sae")
@user_errors
def fit_sae(
    model: str = typer.Option(None, "--model", "-m", help="Train on activations streamed off this model (the documents after the MPPC window and the held-out rows)."),
    acts: Path = typer.Option(None, "--acts", help="Or: an activation store folder (or a folder of them) in univ's format."),
    layers: str = typer.Option("all", "--layers", help="'all', '-1' (the last) or e.g. '0,3,5-7'."),
    arch: str = flags.Arch,
    expansion: float = flags.Expansion,
    l1: float = flags.L1,
    k: int = flags.K,
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: 4e-4 relu, 2e-4/sqrt(d_sae/16384) topk)."),
    sae_train_tokens: str = flags.SaeTrainTokens,
    sae_batch_size: int = flags.SaeBatchSize,
    sae_eval_tokens: str = flags.SaeEvalTokens,
    sae_seed: int = flags.SaeSeed,
    normalisation: str = typer.Option(None, "--normalisation", help="token, dataset or none (default: token for relu, dataset for topk)."),
    init_b_dec: str = typer.Option("zeros", "--init-b-dec", help="Decoder bias at initialisation: zeros (lm_saes') or geometric-median."),
    window_rows: str = typer.Option("256k", "--window-rows", help="Rows per shuffle window, which each batch is drawn from."),
    group_layers: int = typer.Option(None, "--group-layers", help="With --model: most layers per pass over the stream (default: as many as memory allows)."),
    memory_gb: float = typer.Option(None, "--memory-gb", help="With --model: memory for one group of layers (default: 90% of the GPU's free memory, half the RAM on a CPU)."),
    checkpoint_minutes: float = typer.Option(10.0, "--checkpoint-minutes", help="Minutes between checkpoints."),
    dataset: str = flags.Dataset,
    split: str = flags.Split,
    dataset_revision: str = flags.DatasetRevision,
    text_field: str = flags.TextField,
    data_seed: int = flags.DataSeed,
    tokens: str = flags.Tokens,
    ctx_len: int = flags.CtxLen,
    chunk_tokens: str = flags.ChunkTokens,
    batch_contexts: int = flags.BatchContexts,
    dtype: str = flags.Dtype,
    centre: str = flags.Centre,
    cpu_scan: str = flags.CpuScan,
    device: str = flags.Device,
    cache_dir: Path = flags.CacheDir,
    force: bool = typer.Option(False, "--force", help="Retrain even when a finished SAE exists."),
    fmt: Format = FormatOpt,
) -> None:
    """Train one sparse autoencoder per layer and print its held-out quality.

    With --model the corpus options say where the MPPC window lies (training skips it); with --acts
    they are not used."""
    from .fit import run_fit

    cfg = _sae_options(arch, expansion, l1, k, sae_train_tokens, sae_batch_size, sae_eval_tokens, sae_seed, device,
                       lr=lr, normalisation=normalisation, init_b_dec=init_b_dec,
                       window_rows=parse_count(window_rows, "--window-rows"), batch_contexts=batch_contexts,
                       group_layers=group_layers, memory_gb=memory_gb, checkpoint_minutes=checkpoint_minutes,
                       force=force)
    cache_cfg = None
    if model is not None:
        cache_cfg = _data([model], dataset, split, dataset_revision, text_field, data_seed, tokens, ctx_len,
                          chunk_tokens, batch_size=batch_contexts, dtype=dtype, centre=centre, cpu_scan=cpu_scan,
                          device=device, cache_dir=cache_dir)
    results = run_fit(cfg, layers, cache_dir, cache_cfg=cache_cfg, acts=acts)
    rows = [r._asdict() for r in results]
    if fmt is not Format.json:
        rows = [{k: ("n/a" if v is None else v) for k, v in r.items() if k != "path"} for r in rows]
    typer.echo(render({"fit-sae": rows}, fmt))


def _sae_options(arch, expansion, l1, k, sae_train_tokens, sae_batch_size, sae_eval_tokens, sae_seed, device, **more):
    from .fit import FitConfig

    return FitConfig(arch=arch, expansion=expansion, l1=l1, k=k, batch_size=sae_batch_size, seed=sae_seed, device=device,
                     train_tokens=parse_count(sae_train_tokens, "--sae-train-tokens") if sae_train_tokens else None,
                     eval_tokens=parse_count(sae_eval_tokens, "--sae-eval-tokens"), **more)


@app.command()
@user_errors
def match(
    model_a: str = typer.Option(None, "--model-a", help="Model A (alias, Hub id or folder)."),
    model_b: list[str] = typer.Option([], "--model-b", help="Model B; repeat to compare several models (every pair, named B, B2, B3, ...)."),
    model_c: str = typer.Option(None, "--model-c", help="For --skyline model-seed: A's architecture, another seed."),
    acts_a: Path = typer.Option(None, "--acts-a", help="Or: A's activation stores by path."),
    acts_b: Path = typer.Option(None, "--acts-b", help="Or: B's activation stores by path."),
    saes_a: Path = typer.Option(None, "--saes-a", help="With --acts-a: folder of A's SAEs (else raw activations)."),
    saes_b: Path = typer.Option(None, "--saes-b", help="With --acts-b: folder of B's SAEs."),
    layers_a: str = typer.Option("all", "--layers-a", help="A's layers: 'all' or e.g. '0,3,5-7'."),
    layers_b: str = typer.Option("all", "--layers-b", help="B's layers."),
    baseline: list[str] = typer.Option([], "--baseline", help="random-init (repeatable)."),
    skyline: list[str] = typer.Option([], "--skyline", help="sae-seed, model-seed (repeatable)."),
    neurons: bool = typer.Option(False, "--neurons", help="Also match neurons (MLP / conv+gate activations)."),
    neuron_tokens: str = typer.Option("100k", "--neuron-tokens", help="Window of the neuron comparisons."),
    dead_as_zero: bool = typer.Option(False, "--dead-as-zero", help="Count never-firing features as 0 (the authors' clamp) instead of leaving them out."),
    feature_scale: str = FeatureScaleOpt,
    table: str = TableOpt("summary, per-layer, depth, complexity; matrix with several --model-b"),
    arch: str = flags.Arch,
    expansion: float = flags.Expansion,
    l1: float = flags.L1,
    k: int = flags.K,
    sae_train_tokens: str = flags.SaeTrainTokens,
    sae_batch_size: int = flags.SaeBatchSize,
    sae_eval_tokens: str = flags.SaeEvalTokens,
    sae_seed: int = flags.SaeSeed,
    dataset: str = flags.Dataset,
    split: str = flags.Split,
    dataset_revision: str = flags.DatasetRevision,
    text_field: str = flags.TextField,
    data_seed: int = flags.DataSeed,
    tokens: str = flags.Tokens,
    ctx_len: int = flags.CtxLen,
    chunk_tokens: str = flags.ChunkTokens,
    batch_contexts: int = flags.BatchContexts,
    dtype: str = flags.Dtype,
    store_dtype: str = flags.StoreDtype,
    centre: str = flags.Centre,
    cpu_scan: str = flags.CpuScan,
    device: str = flags.Device,
    cache_dir: Path = flags.CacheDir,
    fmt: Format = FormatOpt,
) -> None:
    """MPPC between two models' SAE features (or every pair of several), both ways, depth maps, baselines and skylines."""
    from .match import MatchConfig
    from .match_stage import MatchRequest, matrix, run_match

    data = _data([], dataset, split, dataset_revision, text_field, data_seed, tokens, ctx_len, chunk_tokens,
                 batch_size=batch_contexts, dtype=dtype, store_dtype=store_dtype, centre=centre, cpu_scan=cpu_scan,
                 device=device)
    req = MatchRequest(
        model_a=model_a, model_b=model_b[0] if model_b else None, more_b=model_b[1:], model_c=model_c, acts_a=acts_a, acts_b=acts_b, saes_a=saes_a, saes_b=saes_b,
        layers_a=layers_a, layers_b=layers_b, baselines=baseline, skylines=skyline, neurons=neurons,
        neuron_tokens=parse_count(neuron_tokens, "--neuron-tokens"),
        data=data,
        fit=_sae_options(arch, expansion, l1, k, sae_train_tokens, sae_batch_size, sae_eval_tokens, sae_seed, device),
        match=MatchConfig(tokens=data.tokens, dead_as_zero=dead_as_zero, feature_scale=feature_scale, device=device),
        cache_dir=cache_dir)
    results = run_match(req)
    main_result = results[0]
    tables = {
        "summary": [row for c in results for row in c.summary(dead_as_zero)],
        "per-layer": main_result.per_layer(),
        "depth map (mean best correlation of A-layer features within each B layer)": main_result.depth_table(),
        "complexity (Spearman's rho of MPPC with each simplicity proxy, over live features)":
            [row for c in results for row in c.complexity_rows()],
        **({"matrix (mean MPPC between every pair of models, live features)": matrix(results, len(model_b))}
           if len(model_b) > 1 else {}),
    }
    if fmt is Format.json:
        tables["results"] = [{"comparison": c.name, "path": c.path} for c in results]
    typer.echo(render(tables, fmt, table))


EffectOpt = typer.Option(
    "direct", "--effect",
    help="direct (the authors' path patching: every other layer's last state / read-out, or every other "
         "head's last-position output, frozen clean) or total (univ's variant: all downstream recomputed).")


def _clean_rows(results) -> list[dict]:
    return [{"model": r.model, "family": r.family, "analysis": name, **clean}
            for r in results for name, clean in r.clean.items()]


@app.command()
@user_errors
def induction(
    model: str = typer.Option(..., "--model", "-m", help="Model alias, Hub id or folder."),
    n_seqs: int = typer.Option(256, "--n-seqs", help="Random sequences averaged over (the authors: 65,536)."),
    state_seqs: int = typer.Option(None, "--state-seqs", help="Mamba state->logit: the first N sequences only (default: all; the authors: 2,048)."),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per sequence (the repeated A is the last)."),
    seq_seed: int = flags.SeqSeed,
    batch_seqs: int = flags.BatchSeqs,
    effect: str = EffectOpt,
    conv_layers: str = typer.Option("auto", "--conv-layers", help="Mamba: layers given conv->state->logit; RWKV: shift->state->logit; e.g. 12,17 (auto: the two largest state->logit drops)."),
    conv_cumulative: bool = typer.Option(False, "--conv-cumulative", help="Mamba: accumulate the conv input swaps (s+2, then s+1 too, then s) as the authors' script did."),
    head: str = typer.Option(None, "--head", help="GPT-NeoX: induction head (5.0 or L5H0) for head->head (default: top head->logit)."),
    top: int = typer.Option(10, "--top", help="Rows shown per analysis (json: all)."),
    table: str = TableOpt("clean, state->logit, y->logit, conv->state->logit for Mamba; clean, state->logit, time-mix->logit, shift->state->logit for RWKV; clean, head->logit, head->L5H0 (K-composition) for GPT-NeoX"),
    dtype: str = flags.CircuitDtype,
    device: str = flags.Device,
    cache_dir: Path = flags.CacheDir,
    force: bool = typer.Option(False, "--force", help="Recompute even when cached."),
    fmt: Format = FormatOpt,
) -> None:
    """Path patching of the induction circuit: Mamba layers (state, y, conv), RWKV layers (state, time mix, token shift) or GPT-NeoX heads."""
    from . import models
    from .circuit import CircuitConfig
    from .induction import run_induction

    cfg = CircuitConfig(n_seqs=n_seqs, state_seqs=state_seqs, seq_len=seq_len, seed=seq_seed, batch=batch_seqs, device=device,
                        dtype=dtype, effect=effect, conv_layers=conv_layers, conv_cumulative=conv_cumulative, head=head)
    lm = models.load(model, device=device, dtype=dtype)
    r = run_induction(lm, cfg, cache_dir, force)
    tables = {"clean": _clean_rows([r])}
    for name, rows in r.rows.items():
        tables[name] = rows if fmt is Format.json else rows[:top]
    if fmt is Format.json:
        tables["config"] = [r.config]
    typer.echo(render(tables, fmt, table))


@app.command()
@user_errors
def offbyone(
    model: list[str] = typer.Option(..., "--model", "-m", help="Model(s); repeat to put families side by side."),
    layer: str = typer.Option("auto", "--layer", help="Mamba and RWKV: the layer (auto: the state->logit layer of `univ induction` that lowers p(B) most beyond its interval)."),
    head: str = typer.Option(None, "--head", help="GPT-NeoX: the head, 5.0 or L5H0 (default: the head->logit head of `univ induction`, outside layer 0, that lowers p(B) most beyond its interval)."),
    induction_seqs: int = typer.Option(None, "--induction-seqs", help="The induction run whose component is followed: its --n-seqs (default: univ induction's, 256)."),
    induction_state_seqs: int = typer.Option(None, "--induction-state-seqs", help="The induction run followed: its --state-seqs."),
    n_seqs: int = typer.Option(128, "--n-seqs", help="Sequences averaged over."),
    seq_len: int = typer.Option(129, "--seq-len", help="Tokens per sequence: A, B, filler, A."),
    seq_seed: int = flags.SeqSeed,
    batch_seqs: int = flags.BatchSeqs,
    effect: str = EffectOpt,
    swap_decay: bool = typer.Option(False, "--swap-decay", help="Mamba: also take the decay from the corrupted run, at p+1, as the authors' notebook did."),
    table: str = TableOpt("clean, off-by-one"),
    dtype: str = flags.CircuitDtype,
    device: str = flags.Device,
    cache_dir: Path = flags.CacheDir,
    force: bool = typer.Option(False, "--force", help="Recompute even when cached."),
    fmt: Format = FormatOpt,
) -> None:
    """The Off-by-One motif: change of B's logit when only the write at position p (B at 1) is corrupted."""
    from . import models
    from .circuit import CircuitConfig, NothingToFollow
    from .offbyone import POSITIONS, TABLE, default_induction, run_offbyone

    results = []
    for name in model:
        lm = models.load(name, device=device, dtype=dtype)
        mamba_only = layer if lm.family in ("mamba", "rwkv") else "auto"
        if lm.family == "gpt_neox" and layer != "auto" and len(model) == 1:
            raise UnivError("--layer is a Mamba and RWKV option; for GPT-NeoX give --head L.H")
        if lm.family != "gpt_neox" and head is not None and len(model) == 1:
            raise UnivError(f"--head is a GPT-NeoX option (attention heads); {lm.family} has none")
        if lm.family != "mamba" and swap_decay and len(model) == 1:
            raise UnivError("--swap-decay is a Mamba option (the SSM's decay)")
        cfg = CircuitConfig(n_seqs=n_seqs, seq_len=seq_len, seed=seq_seed, batch=batch_seqs, device=device, dtype=dtype,
                            effect=effect, head=head if lm.family == "gpt_neox" else None,
                            swap_decay=swap_decay and lm.family == "mamba")
        followed = default_induction(cfg, induction_seqs, induction_state_seqs)
        try:
            results.append(run_offbyone(lm, cfg, cache_dir, mamba_only, force, induction=followed))
        except NothingToFollow as e:
            raise UnivError(f"{name}: {e}") from None
    by_position = []
    for p in POSITIONS:
        row = {"position": p}
        for r in results:
            entry = next(e for e in r.rows[TABLE] if e["position"] == p)
            row[f"{r.model} [{entry['component']}] d_logit_B"] = entry["delta_logit_B"]
            row[f"{r.model} d_p_B"] = entry["delta_p_B"]
        by_position.append(row)
    tables = {"clean": _clean_rows(results), "off-by-one (B at position 1)": by_position}
    if fmt is Format.json:
        tables["config"] = [r.config for r in results]
    typer.echo(render(tables, fmt, table))


@app.command("all")
@user_errors
def all_(
    model_a: str = typer.Option(..., "--model-a", help="Model A (the study: pythia-160m)."),
    model_b: list[str] = typer.Option(..., "--model-b", help="Model B (the study: mamba-130m); repeat for several (e.g. rwkv-169m too): every pair is compared."),
    model_c: str = typer.Option(None, "--model-c", help="A's architecture with another seed, for the model-seed skyline."),
    preset: str = typer.Option("quick", "--preset", help="smoke (CPU, minutes), quick (one GPU, < 1 h), paper (the study's sizes)."),
    tokens: str = typer.Option(None, "--tokens", help="Override: tokens cached and matched."),
    ctx_len: int = typer.Option(None, "--ctx-len", help="Override: tokens per context."),
    arch: str = typer.Option(None, "--arch", help="Override: SAE architecture (relu, topk)."),
    expansion: float = typer.Option(None, "--expansion", help="Override: SAE width / d_model."),
    k: int = typer.Option(None, "--k", help="Override: TopK's k."),
    l1: float = typer.Option(None, "--l1", help="Override: ReLU SAE's L1 coefficient."),
    sae_batch_size: int = typer.Option(None, "--sae-batch-size", help="Override: SAE batch size."),
    sae_train_tokens: str = typer.Option(None, "--sae-train-tokens", help="Override: SAE training tokens (streamed)."),
    sae_eval_tokens: str = typer.Option(None, "--sae-eval-tokens", help="Override: SAE held-out rows."),
    neuron_tokens: str = typer.Option(None, "--neuron-tokens", help="Override: window of the neuron comparisons."),
    n_seqs: int = typer.Option(None, "--n-seqs", help="Override: sequences of the circuit analyses."),
    offbyone_len: int = typer.Option(None, "--offbyone-len", help="Override: length of the off-by-one sequences (129)."),
    neurons: bool = typer.Option(None, "--neurons/--no-neurons", help="Override: match neurons too."),
    feature_scale: str = FeatureScaleOpt,
    state_seqs: int = typer.Option(None, "--state-seqs", help="Override: sequences of Mamba's state->logit."),
    offbyone_seqs: int = typer.Option(None, "--offbyone-seqs", help="Override: sequences of the off-by-one analysis."),
    sae_seed: int = flags.SaeSeed,
    dataset: str = flags.Dataset,
    split: str = flags.Split,
    dataset_revision: str = flags.DatasetRevision,
    text_field: str = flags.TextField,
    data_seed: int = flags.DataSeed,
    chunk_tokens: str = flags.ChunkTokens,
    batch_contexts: int = flags.BatchContexts,
    dtype: str = typer.Option(None, "--dtype", help="Override: forward dtype of caching (paper: fp32; else auto)."),
    store_dtype: str = typer.Option(None, "--store-dtype", help="Override: storage dtype of the activations (paper: bf16; else auto)."),
    centre: str = flags.Centre,
    cpu_scan: str = flags.CpuScan,
    device: str = flags.Device,
    cache_dir: Path = flags.CacheDir,
    out: Path = typer.Option(None, "--out", help="Report folder (default: <cache-dir>/report)."),
    table: str = TableOpt("summary; matrix with several --model-b; json also: run"),
    fmt: Format = FormatOpt,
) -> None:
    """The whole study: cache, fit-sae, match, induction, offbyone, then a report with figures."""
    from .study import StudyConfig, run_all

    overrides = dict(tokens=parse_count(tokens, "--tokens") if tokens else None, ctx_len=ctx_len, arch=arch,
                     expansion=expansion, k=k, l1=l1, sae_batch_size=sae_batch_size,
                     sae_train_tokens=parse_count(sae_train_tokens, "--sae-train-tokens") if sae_train_tokens else None,
                     sae_eval_tokens=parse_count(sae_eval_tokens, "--sae-eval-tokens") if sae_eval_tokens else None,
                     neuron_tokens=parse_count(neuron_tokens, "--neuron-tokens") if neuron_tokens else None,
                     n_seqs=n_seqs, state_seqs=state_seqs, offbyone_seqs=offbyone_seqs, offbyone_len=offbyone_len,
                     neurons=neurons, dtype=dtype, store_dtype=store_dtype)
    data = _data([], dataset, split, dataset_revision, text_field, data_seed, None, None, chunk_tokens,
                 batch_size=batch_contexts, centre=centre, cpu_scan=cpu_scan, device=device, cache_dir=cache_dir)
    result = run_all(StudyConfig(model_a=model_a, model_b=model_b[0], more_b=model_b[1:], model_c=model_c,
                                 preset=preset, overrides=overrides,
                                 data=data, sae_seed=sae_seed, feature_scale=feature_scale, out=out))
    tables = {"summary": result.summary if fmt is Format.json else
              [{k: v for k, v in row.items() if k != "values"} for row in result.summary],
              **({"matrix": result.matrix} if result.matrix else {})}
    if fmt is Format.json:
        tables["run"] = [{"run": str(result.run_file), **result.report}]
    else:
        typer.echo(f"univ: report written to {result.report['report']}", err=True)
    typer.echo(render(tables, fmt, table))


@app.command()
@user_errors
def report(
    cache_dir: Path = flags.CacheDir,
    out: Path = typer.Option(None, "--out", help="Report folder (default: <cache-dir>/report)."),
    run: Path = typer.Option(None, "--run", help="A run.json (default: the latest run in the cache)."),
    fmt: Format = FormatOpt,
) -> None:
    """report.md, PNG figures and index.html (the feature-pair explorer) from the cache, without recomputing anything."""
    from .report import latest_run, write_report

    written = write_report(run or latest_run(cache_dir), out or cache_dir / "report")
    typer.echo(render({"report": [{"file": f} for f in [written["report"], written["page"], *written["figures"]]]}, fmt))


@app.command("export-sae")
@user_errors
def export_sae(
    sae_dir: Path = typer.Argument(..., help="An SAE folder (cfg.json, sae.safetensors), or a folder of them (e.g. univ-cache/saes/<model>)."),
    out: Path = typer.Argument(..., help="Where to write (the same sub-folders for several SAEs)."),
    to: str = typer.Option("saelens", "--to", help="Format: saelens (cfg.json + sae_weights.safetensors, SAELens >= 6)."),
    fmt: Format = FormatOpt,
) -> None:
    """Write univ's SAEs in another tool's layout, with univ's normalisation declared or folded in."""
    from .export import export

    typer.echo(render({"export-sae": [{"written": str(p)} for p in export(sae_dir, to, out)]}, fmt))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `univ` console script and of `python univ.py`."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="univ", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except _UsageError as e:  # usage errors: one line, exit 2 as click does
        if type(e).__name__ == "NoArgsIsHelpError":  # `univ` alone: its help, not an error line
            typer.echo(e.format_message())
        else:
            typer.echo(f"univ: error: {e.format_message()}", err=True)
        code = e.exit_code
    except typer.Abort:
        typer.echo("univ: error: aborted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
