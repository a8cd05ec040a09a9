"""The `fit-sae` stage: one SAE per layer, trained from activations streamed off the model
(``--model``; stream.py) or read from activation stores (``--acts``).

Both feed one trainer (trainer.py) with *windows*: blocks of rows of every layer, each permuted
with a seed fixed by the window's index and cut into batches. Streamed, a window is the next
``window_rows`` rows of the training stream, which starts after the documents of the MPPC window
and of the held-out rows, so the SAEs never see what `match` measures or what their metrics are
measured on. Stored, a window is consecutive rows of the stores (several chunks, so several
documents), and the last ``eval_tokens`` rows of the store are held out.

Streamed training runs the layers in groups that fit the device's memory, one pass over the
stream per group (all layers in one pass when they fit; see ``layer_groups``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import files, models, scan_compiled, stream, trainer
from .cache import CacheConfig, build_token_store, computed, data_config, format_layers, model_identity, model_key
from .errors import UnivError
from .options import parse_layers
from .sae import SAE, SAEConfig
from .sae_metrics import evaluate, loss_recovered, spliced
from .sae_train import TrainConfig, default_lr, train_config
from .store import Lock, Store, config_key, ensure_writable, resid_hook, slug

log = logging.getLogger("univ")
STREAM_TOKENS = 100_000_000
"""Streamed training tokens per SAE when none are given: the smallest budget of lm_saes' example
configs of the time (100M-1.6B; its default was 300M)."""


@dataclass
class FitConfig:
    """Options of `univ fit-sae` that shape the SAEs and their training."""

    arch: str = "relu"
    """'relu' (the study's ReLU + L1) or 'topk'."""
    expansion: float = 32
    """d_sae = expansion × d_model."""
    l1: float = 5.0
    """L1 coefficient λ (relu), on token-normalised inputs of norm √d."""
    k: int = 32
    """Active latents per token (topk)."""
    lr: float | None = None
    """Peak Adam learning rate; None: 4e-4 (relu, lm_saes') or 2e-4/√(d_sae/2¹⁴) (topk)."""
    train_tokens: int | None = None
    """Training tokens; None: 100M streamed (--model), the store's training rows once (--acts)."""
    batch_size: int = 4096
    """Rows per optimiser step."""
    seed: int = 42
    """Seed of the initialisation and of the batch order."""
    normalisation: str | None = None
    """'token', 'dataset' or 'none'; None: token (relu, as in the study) or dataset (topk)."""
    init_b_dec: str = "zeros"
    """Decoder bias at initialisation: 'zeros' (lm_saes') or 'geometric-median' of a sample."""
    eval_tokens: int = 65_536
    """Held-out rows: a token store of the documents after the MPPC window (--model), or the last
    rows of the store (--acts; at most a tenth of it)."""
    window_rows: int = 262_144
    """Rows per shuffle window (at most the training tokens, rounded up to whole batches): what one
    batch is drawn from."""
    batch_contexts: int = 16
    """Streamed: contexts per forward pass of the model."""
    group_layers: int | None = None
    """Streamed: most layers trained per pass over the stream (None: as many as memory allows)."""
    memory_gb: float | None = None
    """Streamed: memory for one group (None: 90 % of the GPU's free memory, half the RAM on a CPU)."""
    loss_recovered_contexts: int = 8
    """Held-out contexts on which LM loss recovered is measured (with a model)."""
    checkpoint_minutes: float = 10.0
    """Write a checkpoint at the first window boundary after this many minutes (0: every window)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    force: bool = False
    """Retrain even when a finished SAE with the same config exists."""


class SAEResult(NamedTuple):
    layer: int
    hook: str
    arch: str
    d_sae: int
    train_tokens: int
    l0: float
    explained_variance: float
    dead_fraction: float
    loss_recovered: float | None
    path: str


@dataclass
class LayerData:
    """One layer's activation store and where its SAE goes."""

    layer: int
    store: Store
    out_dir: Path


class _Plan(NamedTuple):
    """What every layer's SAE shares."""

    d_sae: int
    normalisation: str
    tc: TrainConfig
    train_tokens: int
    window: int


def _plan(cfg: FitConfig, d: int, train_tokens: int, device: torch.device) -> _Plan:
    if cfg.expansion < 1 or not math.isfinite(cfg.expansion):
        raise UnivError(f"--expansion must be at least 1, not {cfg.expansion}")
    if cfg.batch_size < 1:
        raise UnivError(f"--sae-batch-size must be at least 1, not {cfg.batch_size}")
    if train_tokens < cfg.batch_size:
        raise UnivError(f"--sae-train-tokens ({train_tokens}) must be at least one batch ({cfg.batch_size})")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UnivError(f"--lr must be a positive number, not {cfg.lr}")
    if not 0 <= cfg.seed < 2**63:
        raise UnivError(f"--sae-seed must be between 0 and 2**63 - 1, not {cfg.seed}")
    d_sae = int(round(cfg.expansion * d))
    weights = 16 * 2 * d * d_sae  # float32 weights, gradients and two Adam moments
    if weights > (budget := memory_budget(cfg, device)):
        raise UnivError(f"an SAE of {d_sae:,} latents needs {weights / 2**30:.1f} GiB for its weights and Adam state; "
                        f"{budget / 2**30:.1f} GiB are available (lower --expansion)")
    normalisation = cfg.normalisation or ("token" if cfg.arch == "relu" else "dataset")
    tc = train_config(cfg.arch, cfg.lr or default_lr(cfg.arch, d_sae), train_tokens // cfg.batch_size, cfg.batch_size,
                      torch.bfloat16 if device.type == "cuda" else torch.float32)
    window = math.ceil(min(cfg.window_rows, train_tokens) / cfg.batch_size) * cfg.batch_size
    return _Plan(d_sae, normalisation, tc, train_tokens, window)


def _sae_config(cfg: FitConfig, plan: _Plan, d: int, source: dict) -> SAEConfig:
    sc = SAEConfig(arch=cfg.arch, d_in=d, d_sae=plan.d_sae, k=cfg.k if cfg.arch == "topk" else None,
                   l1=cfg.l1 if cfg.arch == "relu" else None, normalisation=plan.normalisation, store=source,
                   seed=cfg.seed)
    sc.check()
    return sc


def _recipe(cfg: FitConfig, plan: _Plan, sc: SAEConfig, **source) -> dict:
    """Everything that fixes an SAE's weights: its key, and recipe.json beside it."""
    return {"sae": {k: v for k, v in asdict(sc).items() if k not in ("univ_version", "store", "weights_sha256")},
            "train": {**asdict(plan.tc), "matmul_dtype": str(plan.tc.matmul_dtype)}, "train_tokens": plan.train_tokens,
            "batch_size": cfg.batch_size, "window": plan.window, "init_b_dec": cfg.init_b_dec, **source}


def _train(cfg: FitConfig, plan: _Plan, sae_cfgs: dict[int, SAEConfig], out_dirs: dict[int, Path], recipes: dict,
           windows: trainer.Windows, device: torch.device, desc: str, progress: bool) -> None:
    saes = trainer.train(sae_cfgs, out_dirs, windows, plan.tc, cfg.batch_size, cfg.seed, cfg.init_b_dec, device,
                         cfg.checkpoint_minutes, cfg.force, desc, progress)
    for layer, sae in saes.items():
        out = out_dirs[layer]
        (out / "metrics.json").unlink(missing_ok=True)
        (out / "cfg.json").unlink(missing_ok=True)  # unfinished until sae.save writes it again
        files.write_json(out / "recipe.json", recipes[layer])
        sae.save(out)
        trainer.drop_checkpoint(out)


def _todo(cfg: FitConfig, out_dirs: dict[int, Path]) -> list[int]:
    """Layers whose SAE is not finished (SAE.save writes cfg.json after the weights) or whose
    weights no longer match their recorded sha256 (then said, and trained again)."""
    todo = []
    for layer, out in out_dirs.items():
        finished = files.read_json(out / "cfg.json") is not None
        if cfg.force or not finished or not SAE.intact(out):
            if finished and not cfg.force:
                log.warning("%s is damaged (its weights do not match cfg.json); it will be trained again", out)
            todo.append(layer)
    return todo


def _measured(out: Path) -> bool:
    return files.read_json(out / "metrics.json") is not None


def _result(layer: int, hook: str, cfg: FitConfig, plan: _Plan, out: Path) -> SAEResult:
    m = files.read_json(out / "metrics.json")
    return SAEResult(layer, hook, cfg.arch, plan.d_sae, plan.train_tokens, round(m["l0"], 2),
                     round(m["explained_variance"], 4), round(m["dead_fraction"], 4),
                     None if m["loss_recovered"] is None else round(m["loss_recovered"], 4), str(out))


# -- training from activation stores --------------------------------------------------------------
def _rows_of(store: Store) -> list[int]:
    return [store.chunks[i]["rows"] for i in sorted(store.chunks)]


def check_stores(stores: list[LayerData]) -> tuple[int, int]:
    """(rows, d) shared by the stores; a clear error for anything a trainer cannot use."""
    first = stores[0].store
    rows = _rows_of(first)
    d = None
    for ld in stores:
        s = ld.store
        if not s.complete:
            raise UnivError(f"{s.path} is incomplete; finish it with univ cache first")
        if _rows_of(s) != rows:
            raise UnivError(f"{s.path} and {first.path} do not hold the same rows")
        sample = s.read_chunk(min(s.chunks))
        if "acts" not in sample:
            raise UnivError(f"{s.path}: chunks hold no 'acts' tensor")
        acts = sample["acts"]
        if acts.ndim != 2 or not acts.dtype.is_floating_point:
            raise UnivError(f"{s.path}: 'acts' must be a 2-D float tensor, not {acts.dtype} {tuple(acts.shape)}")
        if d is not None and acts.shape[1] != d:
            raise UnivError(f"{s.path}: width {acts.shape[1]} differs from the other layers' {d}")
        d = acts.shape[1]
    return sum(rows), d


def iter_windows(stores: list[LayerData], start: int, stop: int, window: int,
                 device: torch.device) -> Iterator[dict[int, torch.Tensor]]:
    """Rows [start, stop) of every layer, ``window`` rows at a time, each chunk read once."""
    offsets, pos = [], 0
    for r in _rows_of(stores[0].store):
        offsets.append(pos)
        pos += r
    chunk_ids = sorted(stores[0].store.chunks)
    pending: dict[int, list[torch.Tensor]] = {ld.layer: [] for ld in stores}
    have = 0  # rows pending, all layers alike
    cursor = start
    for ci, off, rows in zip(chunk_ids, offsets, _rows_of(stores[0].store)):
        if off + rows <= start or off >= stop:
            continue
        lo, hi = max(start, off) - off, min(stop, off + rows) - off
        for ld in stores:
            pending[ld.layer].append(ld.store.read_chunk(ci)["acts"][lo:hi])
        have += hi - lo
        while have >= window or (off + rows >= stop and have > 0):
            take = min(window, have)
            out = {}
            for layer, parts in pending.items():
                cat = torch.cat(parts)
                out[layer] = cat[:take].to(device, non_blocking=True)
                pending[layer] = [cat[take:]]
            have -= take
            cursor += take
            yield out

def fit(cfg: FitConfig, stores: list[LayerData], load_lm=None, tstore: Store | None = None,
        progress: bool = True) -> list[SAEResult]:
    """Train (or find) one SAE per layer from activation stores; returns their held-out quality.

    ``load_lm`` (a function returning the model) and ``tstore`` enable LM loss recovered; the
    model is loaded only when some metrics still need computing."""
    device = models.resolve_device(cfg.device)
    n_rows, d = check_stores(stores)
    n_eval = min(cfg.eval_tokens, n_rows // 10)
    n_train = n_rows - n_eval
    if n_eval < 1 or n_train < cfg.batch_size:
        raise UnivError(f"the store holds {n_rows} rows: too few for batches of {cfg.batch_size} "
                        "plus held-out rows; cache more tokens or lower --sae-batch-size")
    plan = _plan(cfg, d, cfg.train_tokens or n_train, device)
    by_layer = {ld.layer: ld for ld in stores}
    sae_cfgs, recipes, out_dirs = {}, {}, {}
    for ld in stores:
        sc = _sae_config(cfg, plan, d, {"path": str(ld.store.path), "config": ld.store.config})
        recipe = _recipe(cfg, plan, sc, eval_tokens=n_eval,
                         store_chunks=[c["sha256"] for c in ld.store.manifest["chunks"]])
        sae_cfgs[ld.layer], recipes[ld.layer] = sc, recipe
        out_dirs[ld.layer] = ld.out_dir / f"{cfg.arch}-{config_key(recipe)}"
    todo = _todo(cfg, out_dirs)
    if todo:
        with Lock(out_dirs[todo[0]].parent):
            _train(cfg, plan, {layer: sae_cfgs[layer] for layer in todo}, out_dirs, recipes,
                   _store_windows([by_layer[layer] for layer in todo], n_train, plan.window, device), device,
                   f"fit-sae {len(todo)} layer(s)", progress)
    eval_rows, lm = None, None
    for ld in stores:
        out = out_dirs[ld.layer]
        if not _measured(out):
            if eval_rows is None:
                eval_rows = next(iter_windows(stores, n_train, n_rows, n_eval, device))
            sae = SAE.load(out, device)
            metrics = evaluate(sae, eval_rows[ld.layer])
            metrics["loss_recovered"] = None
            if load_lm is not None and tstore is not None:
                lm = lm or load_lm()
                metrics["loss_recovered"] = loss_recovered(lm, ld.layer, spliced(sae, bool(ld.store.config.get("centred"))),
                                                           tstore, n_eval, cfg.loss_recovered_contexts)
            files.write_json(out / "metrics.json", metrics)
    return [_result(ld.layer, ld.store.config.get("hook", f"layer{ld.layer}"), cfg, plan, out_dirs[ld.layer])
            for ld in stores]


def _store_windows(stores: list[LayerData], n_train: int, window: int, device: torch.device) -> trainer.Windows:
    """Windows of consecutive training rows, pass after pass; a window's index fixes its rows."""
    per_pass = math.ceil(n_train / window)

    def windows(state: dict):
        k = state["window"]
        while True:
            for rows in iter_windows(stores, (k % per_pass) * window, n_train, window, device):
                yield rows, None
                k += 1

    return windows


# -- training from activations streamed off the model ---------------------------------------------
def fit_stream(cfg: FitConfig, src: models.ModelSource, data: CacheConfig, layers: list[int], cache_dir: Path,
               progress: bool = True) -> list[SAEResult]:
    """Train (or find) one SAE per layer from activations computed on the fly. ``data`` gives the
    corpus, the MPPC window (``tokens``) and the forward dtype; see stream.py for the split."""
    device = models.resolve_device(cfg.device)
    how = computed(dataclasses.replace(data, hook="resid_post", store_dtype="auto"), src, device)
    plan = _plan(cfg, src.d_model, cfg.train_tokens or STREAM_TOKENS, device)
    if cfg.eval_tokens < 1:
        raise UnivError(f"--sae-eval-tokens must be positive, not {cfg.eval_tokens}")
    ensure_writable(cache_dir)
    tokenizer = models.load_tokenizer(src)
    data = dataclasses.replace(data, cache_dir=cache_dir)
    window_key, window_store = build_token_store(data, tokenizer, progress)
    held_key, held_out = build_token_store(dataclasses.replace(data, tokens=cfg.eval_tokens), tokenizer, progress,
                                           first_doc=_docs_end(window_store))
    source = stream.source(data_config(data), _docs_end(held_out), tokenizer, cfg.batch_contexts)
    mkey = model_key(src, how)
    identity = {"model": mkey, "window_tokens": window_key, "held_out_tokens": held_key,
                "first_doc": source.first_doc, "batch_contexts": cfg.batch_contexts}
    sae_cfgs, recipes, out_dirs = {}, {}, {}
    for layer in layers:
        sc = _sae_config(cfg, plan, src.d_model, {"stream": identity, "config": {
            "model": model_identity(src), "layer": layer, "hook": resid_hook(layer), "model_name": src.name,
            **how.extras()}})
        sae_cfgs[layer], recipes[layer] = sc, _recipe(cfg, plan, sc, stream=identity)
        out_dirs[layer] = sae_root(cache_dir, mkey, resid_hook(layer)) / f"{cfg.arch}-{config_key(recipes[layer])}"
    todo = _todo(cfg, out_dirs)
    unmeasured = [layer for layer in layers if layer in todo or not _measured(out_dirs[layer])]
    if unmeasured:
        lm = models.load_source(src, device, how.dtype)
        groups = layer_groups(unmeasured, src.d_model, plan, cfg, lm.dtype.itemsize, device)
        with Lock(cache_dir / "saes" / mkey), scan_compiled.mode("compiled" if how.compiled_scan else "eager"):
            for i, group in enumerate(groups):
                train_now = [layer for layer in group if layer in todo]
                if train_now:
                    _train(cfg, plan, {layer: sae_cfgs[layer] for layer in train_now}, out_dirs, recipes,
                           _stream_windows(lm, source, train_now, plan.window, how.centred, device), device,
                           f"fit-sae {src.short_name} group {i + 1}/{len(groups)} (layers {format_layers(train_now)})",
                           progress)
                rows = stream.store_rows(lm, held_out, group, cfg.batch_contexts, how.centred)
                for layer in group:
                    sae = SAE.load(out_dirs[layer], device)
                    metrics = evaluate(sae, rows[layer])
                    metrics["loss_recovered"] = loss_recovered(lm, layer, spliced(sae, how.centred), held_out, held_out.rows,
                                                               cfg.loss_recovered_contexts)
                    files.write_json(out_dirs[layer] / "metrics.json", metrics)
                del rows
    return [_result(layer, resid_hook(layer), cfg, plan, out_dirs[layer]) for layer in layers]


def _docs_end(tstore: Store) -> int:
    """Documents of the corpus up to the end of a complete token store."""
    return tstore.chunks[max(tstore.chunks)]["docs_end"]


def _stream_windows(lm, source: stream.Source, layers: list[int], window: int, centred: bool,
                    device: torch.device) -> trainer.Windows:
    def windows(state: dict):
        start = stream.Position(*state["position"]) if state.get("position") else stream.START
        return stream.windows(lm, source, layers, window, start, centred, device)

    return windows


def bytes_per_layer(d: int, d_sae: int, window: int, act_bytes: int, batch: int) -> tuple[int, int]:
    """(bytes each layer of a group holds, bytes the group needs once) when training streamed:
    per layer the SAE's float32 weights, gradients and two Adam moments, and its window of rows
    plus the rows pending for the next one; once, a permuted copy of one window and the
    activations of one training step (about eight batch × d_sae float32 tensors)."""
    per_layer = 16 * (2 * d * d_sae + d_sae + d) + 2 * window * d * act_bytes
    return per_layer, window * d * act_bytes + 8 * batch * d_sae * 4


def memory_budget(cfg: FitConfig, device: torch.device) -> float:
    """Bytes SAE training may use: cfg.memory_gb, else 90 % of the GPU's free memory or half the RAM."""
    if cfg.memory_gb is not None:
        return cfg.memory_gb * 2**30
    if device.type == "cuda":
        return 0.9 * torch.cuda.mem_get_info(device)[0]
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def layer_groups(layers: list[int], d: int, plan: _Plan, cfg: FitConfig, act_bytes: int,
                 device: torch.device) -> list[list[int]]:
    """Consecutive groups of layers that fit the memory budget (memory_budget), at most
    cfg.group_layers each."""
    per_layer, once = bytes_per_layer(d, plan.d_sae, plan.window, act_bytes, cfg.batch_size)
    budget = memory_budget(cfg, device)
    size = int((budget - once) // per_layer)
    if size < 1:
        raise UnivError(f"one layer's SAE training needs about {(per_layer + once) / 2**30:.1f} GiB and "
                        f"{budget / 2**30:.1f} GiB are available; lower --expansion or the window")
    size = min(size, cfg.group_layers or size)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def sae_root(cache_dir: Path, owner: str, hook: str) -> Path:
    return cache_dir / "saes" / owner / hook


def external_owner(acts: Path) -> str:
    """Folder name under saes/ for stores given by path."""
    return f"{slug(acts.resolve().name)}-{config_key({'acts': str(acts.resolve())})}"


def stores_at(acts: Path) -> dict[int, Store]:
    """The activation stores at a path: one store folder, or a folder of them (one per hook)."""
    if not acts.exists():
        raise UnivError(f"activation store {acts} does not exist")
    if (acts / "manifest.json").is_file():
        folders = [acts]
    else:
        folders = sorted(p for p in acts.iterdir() if (p / "manifest.json").is_file())
    if not folders:
        raise UnivError(f"{acts} holds no activation store (no manifest.json)")
    out = {}
    for i, folder in enumerate(folders):
        store = Store.read(folder)
        out[int(store.config.get("layer", i))] = store
    return dict(sorted(out.items()))


def select_layers(stores: dict[int, Store], layers: str) -> list[int]:
    if layers.strip().lower() == "all":
        return list(stores)
    chosen = parse_layers(layers, max(stores) + 1)
    missing = [layer for layer in chosen if layer not in stores]
    if missing:
        raise UnivError(f"layer {missing[0]} is not in the store (it has {format_layers(list(stores))})")
    return chosen


def run_fit(cfg: FitConfig, layers: str, cache_dir: Path, cache_cfg: CacheConfig | None = None,
            acts: Path | None = None, progress: bool = True) -> list[SAEResult]:
    """fit-sae streamed off a model (``cache_cfg``: its corpus and MPPC window) or on stores by path."""
    if (cache_cfg is None) == (acts is None):
        raise UnivError("give either --model (activations streamed off it) or --acts STORE_DIR")
    if acts is not None:
        stores = stores_at(acts)
        owner = external_owner(acts)
        chosen = [LayerData(layer, stores[layer], sae_root(cache_dir, owner, stores[layer].path.name))
                  for layer in select_layers(stores, layers)]
        results = fit(cfg, chosen, progress=progress)
    else:
        src = models.resolve(cache_cfg.models[0])
        results = fit_stream(cfg, src, cache_cfg, parse_layers(layers, src.n_layers), cache_dir, progress)
    owner = cache_cfg.models[0] if cache_cfg else str(acts)
    for warning in doubts(results, cfg.batch_size):
        if (owner, warning) not in _WARNED:  # `univ all` asks for the same SAEs in several stages
            _WARNED.add((owner, warning))
            log.warning("%s: %s", owner, warning)
    return results


_WARNED: set[tuple[str, str]] = set()


MIN_STEPS = 1000
"""Fewer optimiser steps than this and an SAE has barely left its initialisation (lm_saes' smallest
example configs ran ~25k steps)."""
DENSE_L0 = 0.25
"""An SAE whose L0 is above this fraction of its width is not sparse: its features are not features."""


def doubts(results: list[SAEResult], batch_size: int) -> list[str]:
    """What makes these SAEs' numbers mean little, in words (none for a sound run)."""
    out = []
    steps = min((r.train_tokens // batch_size for r in results), default=MIN_STEPS)
    if steps < MIN_STEPS:
        out.append(f"the SAEs were trained for {steps} steps (--sae-train-tokens / --sae-batch-size); under "
                   f"{MIN_STEPS} they have barely left their initialisation, so their metrics and matches mean little")
    dense = [r for r in results if r.l0 > DENSE_L0 * r.d_sae]
    if dense:
        worst = max(dense, key=lambda r: r.l0)
        out.append(f"{len(dense)} of {len(results)} SAEs fire on more than {DENSE_L0:.0%} of their latents per token "
                   f"(layer {worst.layer}: L0 {worst.l0:g} of {worst.d_sae}); they are not sparse (train longer, "
                   "raise --l1 or lower --k), and matching them is slow and means little")
    return out
