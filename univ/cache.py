"""The `cache` stage: one token store per corpus and tokenizer, and each model's residual
streams over it, one activation store per layer, resumable chunk by chunk."""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import files, models, scan_compiled
from .data import DataConfig, is_local, iter_contexts, iter_texts, resolved
from .errors import UnivError
from .options import parse_layers
from .progress import bar as progress_bar
from .store import HOOKS, Lock, Store, acts_dir, config_key, ensure_writable, resid_hook, slug, tokens_dir

log = logging.getLogger("univ")


@dataclass
class CacheConfig:
    """Options of `univ cache`."""

    models: list[str]
    """Model aliases, Hub ids or local directories; they must share one tokenizer."""
    dataset: str
    """Hugging Face dataset name, or a local .txt / .jsonl / .parquet file or folder."""
    tokens: int = 1_000_000
    """Kept tokens (rows per activation store); BOS, EOS and PAD positions do not count."""
    ctx_len: int = 1024
    """Tokens per context, BOS included."""
    layers: str = "all"
    """Blocks whose output is cached: 'all' or a list such as '0,3,5-7'."""
    batch_size: int = 16
    """Contexts per forward pass."""
    dtype: str = "auto"
    """Forward dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    store_dtype: str = "auto"
    """Storage dtype of the activations: auto (the forward dtype), bf16, fp16 or fp32. The study
    ran its models in fp32 and stored bf16."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    seed: int = 42
    """Seed of the document order."""
    split: str = "train"
    """Dataset split (Hugging Face datasets)."""
    dataset_revision: str | None = None
    """Dataset revision on the Hub (e.g. 'refs/convert/parquet')."""
    text_field: str = "text"
    """Field holding the text (.jsonl, .parquet, Hugging Face datasets)."""
    chunk_tokens: int = 65_536
    """Context tokens per chunk file; the unit of resumption."""
    cache_dir: Path = field(default_factory=lambda: Path("univ-cache"))
    """Root of the cache."""
    force: bool = False
    """Recompute the activation stores even when complete."""
    hook: str = "resid_post"
    """What to cache: 'resid_post' (residual stream after each block) or 'neurons'."""
    cpu_scan: str = "eager"
    """Mamba on the CPU: large scans 'eager' (PyTorch) or 'compiled' (torch.compile, ~2x faster
    scans, last bits differ): chosen here, recorded in the key, never switched midway."""
    centre: str = "layernorm"
    """'layernorm': the residual stream of a model that reads it through LayerNorm (GPT-NeoX) is
    stored minus its per-token mean over d_model, which the model cannot see. TransformerLens'
    default processing does that, and the authors cached Pythia through it (Mamba's RMSNorm sees
    the mean: never centred). 'none': stored as the model computes it."""


class ModelCacheSummary(NamedTuple):
    model: str
    layers: str
    rows: int
    d_model: int
    store: str
    seconds: float
    tokens_per_s: float


class CacheResult(NamedTuple):
    tokens_store: Path
    tokens_key: str
    models: list[ModelCacheSummary]


class Computed(NamedTuple):
    """How a model's activations are computed and stored, beyond its weights."""

    dtype: torch.dtype
    store_dtype: torch.dtype
    centred: bool
    compiled_scan: bool
    """Mamba on the CPU: large scans through torch.compile (--cpu-scan compiled)."""

    @classmethod
    def plain(cls, dtype: torch.dtype) -> Computed:
        """Computed in ``dtype`` and kept so (circuits, which store no activations)."""
        return cls(dtype, dtype, False, False)

    def extras(self) -> dict:
        """What differs from the plain setting (stored as computed, not centred, eager scan): only
        those enter keys and configs, so that stores cached before these options keep theirs."""
        return {**({"store_dtype": _name(self.store_dtype)} if self.store_dtype != self.dtype else {}),
                **({"centred": True} if self.centred else {}),
                **({"cpu_scan": "compiled"} if self.compiled_scan else {})}


def computed(cfg: CacheConfig, src: models.ModelSource, device: torch.device) -> Computed:
    dtype = models.resolve_dtype(cfg.dtype, device)
    store_dtype = dtype if cfg.store_dtype == "auto" else models.resolve_dtype(cfg.store_dtype, device)
    if cfg.cpu_scan not in scan_compiled.MODES:
        raise UnivError(f"unknown --cpu-scan {cfg.cpu_scan!r} (use {' or '.join(scan_compiled.MODES)})")
    return Computed(dtype, store_dtype, cfg.hook == "resid_post" and models.centred(src, cfg.centre),
                    cfg.cpu_scan == "compiled" and src.family == "mamba" and device.type == "cpu")


def model_key(src: models.ModelSource, how: Computed) -> str:
    """Folder name of a model's activations (or SAEs, or circuit results): readable prefix plus a
    hash of what fixes its values."""
    key_config = {"model": "local" if src.is_local else src.ref, "revision": src.revision,
                  "layout": src.layout, "dtype": _name(how.dtype), **how.extras()}
    return f"{slug(src.short_name)}-{config_key(key_config)}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _data_identity(dataset: str) -> dict:
    """Local corpora are keyed by their files' paths, sizes and times; Hub datasets by name."""
    if not is_local(dataset):
        return {"hub": dataset}
    root = Path(dataset).expanduser().resolve()
    if not root.exists():
        raise UnivError(f"dataset path {dataset!r} does not exist")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {"local": str(root), "files": [[str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns]
                                          for f in paths]}


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts = []
    for _, run in itertools.groupby(enumerate(layers), lambda p: p[1] - p[0]):
        run = [layer for _, layer in run]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


def data_config(cfg: CacheConfig) -> DataConfig:
    """The corpus a CacheConfig reads, with the revision that will actually be read."""
    return resolved(DataConfig(cfg.dataset, cfg.split, cfg.dataset_revision, cfg.text_field, cfg.ctx_len, cfg.seed))


def _token_store_config(cfg: CacheConfig, tokenizer, first_doc: int = 0) -> tuple[str, dict]:
    """(key, config) of the token store a CacheConfig reads, before any tokenizing."""
    data = data_config(cfg)
    bos = models.bos_id(tokenizer)
    drop = models.special_ids(tokenizer)
    pad = bos  # padding sits after the document, masked: its value only has to be the same for everyone
    per_chunk = max(1, cfg.chunk_tokens // cfg.ctx_len)
    config = {
        "data": {**vars(data), "dataset": _data_identity(cfg.dataset)},
        "tokens": cfg.tokens,
        "contexts_per_chunk": per_chunk,
        "tokenizer": models.tokenizer_fingerprint(tokenizer),
        "bos": bos,
        "pad": int(pad),
        "dropped_ids": drop,
        **({"first_doc": first_doc} if first_doc else {}),
    }
    return f"{slug(Path(cfg.dataset).stem if is_local(cfg.dataset) else cfg.dataset)}-{config_key(config)}", config


def token_store_key(cfg: CacheConfig, tokenizer) -> str:
    return _token_store_config(cfg, tokenizer)[0]


def _cached(cfg: CacheConfig, src: models.ModelSource, tokens_key: str, device: torch.device) -> bool:
    """Every store of the model for the requested layers is complete (nothing to compute)."""
    how = computed(cfg, src, device)
    root = acts_dir(cfg.cache_dir, model_key(src, how), tokens_key, "")
    manifests = [files.read_json(root / resid_hook(layer, cfg.hook) / "manifest.json")
                 for layer in parse_layers(cfg.layers, src.n_layers)]
    return all(isinstance(m, dict) and m.get("complete") for m in manifests)


def build_token_store(cfg: CacheConfig, tokenizer, progress: bool = True, first_doc: int = 0) -> tuple[str, Store]:
    """Tokenize the corpus into the shared token store (or find it complete). Returns (key, store).
    ``first_doc``: start after that many documents of the seeded order (the SAEs' held-out rows
    follow the MPPC window's documents); chunks record ``docs_end`` counted from the corpus start."""
    key, config = _token_store_config(cfg, tokenizer, first_doc)
    data = data_config(cfg)
    bos, pad, drop = config["bos"], config["pad"], config["dropped_ids"]
    per_chunk = config["contexts_per_chunk"]
    path = tokens_dir(cfg.cache_dir, key)
    with Lock(path):
        store = Store.open_or_create(path, "tokens", config)
        try:
            _fill_token_store(cfg, store, data, tokenizer, bos, int(pad), drop, per_chunk, progress, first_doc)
        except BaseException:
            if not store.manifest["chunks"]:  # leave no empty store behind
                shutil.rmtree(path, ignore_errors=True)
            raise
    return key, store


def _fill_token_store(cfg: CacheConfig, store: Store, data: DataConfig, tokenizer, bos: int, pad: int,
                      drop: list[int], per_chunk: int, progress: bool, first_doc: int) -> None:
    """Tokenize into the store, resuming after its longest intact prefix of chunks."""
    good = set(store.verify())
    whole = sorted(good) == list(range(len(good))) and (store.rows == cfg.tokens or store.manifest.get("exhausted"))
    if store.complete and whole:
        return
    if store.complete:  # an edited or truncated manifest: resume rather than trust it
        log.warning("%s is marked complete but does not hold its %d tokens; it will be completed", store.path,
                    cfg.tokens)
        store.set_complete(False)
    store.clean_temporaries()
    # Resume after the longest intact prefix: chunk i+1 starts where chunk i's documents end.
    start = 0
    while start in good:
        start += 1
    store.manifest["chunks"] = [c for c in store.manifest["chunks"] if c["index"] < start]
    done = store.chunks
    skip_docs = done[start - 1]["docs_end"] if start else first_doc
    kept = store.rows
    if kept >= cfg.tokens:  # killed after the last chunk, before the manifest said so: nothing to add
        store.set_complete(True)
        return
    bar = progress_bar(cfg.tokens, "tokenize", "tok", kept, progress)
    texts = itertools.islice(iter_texts(data), skip_docs, None)
    buf: list = []
    index, docs_end = start, skip_docs

    def flush():
        nonlocal index, kept, buf
        rows = int(sum(c.mask.sum() for c in buf))
        store.write_chunk(index, {"tokens": torch.from_numpy(np.stack([c.tokens for c in buf])),
                                  "mask": torch.from_numpy(np.stack([c.mask for c in buf]))},
                          rows=rows, contexts=len(buf), docs_end=docs_end,
                          cut_docs=sum(c.cut > 0 for c in buf), cut_tokens=sum(c.cut for c in buf))
        kept += rows
        bar.update(rows)
        index, buf = index + 1, []

    with bar:
        for n_docs, ctx in iter_contexts(texts, tokenizer, cfg.ctx_len, bos, pad, drop):
            docs_end = skip_docs + n_docs
            if ctx is None:
                continue
            remaining = cfg.tokens - kept - int(sum(c.mask.sum() for c in buf))
            positions = np.flatnonzero(ctx.mask)
            if len(positions) >= remaining:  # cut the last context: the store holds exactly `tokens`
                ctx.mask[positions[remaining:]] = False
                buf.append(ctx)
                break
            buf.append(ctx)
            if len(buf) == per_chunk:
                flush()
        if buf:
            flush()
    if kept == 0:
        after = f" after its first {first_doc} documents (the MPPC window)" if first_doc else ""
        raise UnivError(f"dataset {cfg.dataset!r} has no text to tokenize{after}")
    if kept < cfg.tokens:
        log.warning("dataset %s has only %d tokens (asked for %d); the store holds them all",
                    cfg.dataset, kept, cfg.tokens)
    cut_docs, cut_tokens = (sum(c.get(k, 0) for c in store.chunks.values()) for k in ("cut_docs", "cut_tokens"))
    if cut_docs:  # by design (one context per document, as the study cut them), but worth knowing
        contexts = sum(c["contexts"] for c in store.chunks.values())
        log.info("tokenize: %d of %d documents were longer than --ctx-len %d and were cut (%d tokens left out)",
                 cut_docs, contexts, cfg.ctx_len, cut_tokens)
    store.set_complete(True, **({"exhausted": True} if kept < cfg.tokens else {}))


def model_identity(src: models.ModelSource) -> dict:
    """The model in an activation store's (or a streamed SAE's) config."""
    return {"ref": "local" if src.is_local else src.ref, "revision": src.revision, "layout": src.layout,
            "family": src.family}


def _act_config(src: models.ModelSource, how: Computed, tokens_key: str, layer: int, hook: str) -> dict:
    return {"model": model_identity(src),
            "dtype": _name(how.dtype), **how.extras(), "tokens_store": tokens_key, "hook": resid_hook(layer, hook),
            "layer": layer, "d_model": src.d_model}


def cache_model(cfg: CacheConfig, src: models.ModelSource, tokens_key: str, tstore: Store,
                progress: bool = True) -> ModelCacheSummary:
    """Fill (or verify) one model's activation stores for the requested layers."""
    device = models.resolve_device(cfg.device)
    how = computed(cfg, src, device)
    layers = parse_layers(cfg.layers, src.n_layers)
    mkey = model_key(src, how)
    root = acts_dir(cfg.cache_dir, mkey, tokens_key, "")
    with Lock(root):
        stores = {}
        for layer in layers:
            s = Store.open_or_create(acts_dir(cfg.cache_dir, mkey, tokens_key, resid_hook(layer, cfg.hook)), "acts",
                                     _act_config(src, how, tokens_key, layer, cfg.hook),
                                     force=cfg.force)
            s.manifest["model_name"] = src.name
            s.clean_temporaries()
            stores[layer] = s
        # A chunk is intact when its bytes match and it holds one row per kept token of its token chunk.
        intact = {layer: {i for i in s.verify() if i in tstore.chunks and s.chunks[i]["rows"] == tstore.chunks[i]["rows"]}
                  for layer, s in stores.items()}
        todo = {i: [layer for layer in layers if i not in intact[layer]] for i in sorted(tstore.chunks)}
        todo = {i: missing for i, missing in todo.items() if missing}
        if todo:
            _forward_chunks(cfg, src, device, how, tstore, stores, todo, progress)
        for s in stores.values():
            if not s.complete:
                s.set_complete(True)
    seconds = max(s.manifest["seconds"] for s in stores.values())
    rows = tstore.rows
    return ModelCacheSummary(src.name, format_layers(layers), rows, src.d_model, str(root),
                             round(seconds, 2), round(rows / seconds) if seconds else 0.0)


def _forward_chunks(cfg, src, device, how: Computed, tstore: Store, stores: dict[int, Store],
                    todo: dict[int, list[int]], progress: bool) -> None:
    lm = models.load_source(src, device, how.dtype)
    chunk_rows = tstore.chunks
    bar = progress_bar(sum(chunk_rows[i]["rows"] for i in todo), f"cache {src.short_name}", "tok", 0, progress)
    with bar:
        for index, layers in todo.items():
            with scan_compiled.mode("compiled" if how.compiled_scan else "eager"):
                _forward_chunk(cfg, lm, tstore, index, layers, stores, how, bar)


def _forward_chunk(cfg, lm, tstore: Store, index: int, layers: list[int], stores: dict[int, Store],
                   how: Computed, bar) -> None:
    """One token chunk through the model; one activation chunk per missing layer. The bar moves per
    forward batch: a small run may be a single chunk."""
    chunk = tstore.read_chunk(index)
    tokens, mask = chunk["tokens"], chunk["mask"]
    start = time.perf_counter()
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in range(0, len(tokens), cfg.batch_size):
        t, m = tokens[b:b + cfg.batch_size], mask[b:b + cfg.batch_size]
        width = int(m.any(0).nonzero().max()) + 1  # causal models: later positions change nothing
        resid = lm.activations(cfg.hook, t[:, :width].long(), layers, centre=how.centred)
        m = m[:, :width].to(resid.device)
        for j, layer in enumerate(layers):
            parts[layer].append(resid[j][m].to(how.store_dtype).cpu())
        bar.update(int(m.sum()))
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for layer in layers:
        acts = torch.cat(parts[layer])
        stores[layer].add_seconds(seconds)
        stores[layer].write_chunk(index, {"acts": acts}, rows=len(acts))


def run_cache(cfg: CacheConfig, progress: bool = True) -> CacheResult:
    """Tokenize once, then cache every model's residual streams over the same tokens."""
    if cfg.tokens <= 0:
        raise UnivError(f"--tokens must be positive, not {cfg.tokens}")
    if cfg.ctx_len < 2:
        raise UnivError(f"--ctx-len must be at least 2 (BOS and one token), not {cfg.ctx_len}")
    if cfg.batch_size < 1:
        raise UnivError(f"--batch-contexts must be at least 1, not {cfg.batch_size}")
    if not cfg.models:
        raise UnivError("give at least one --model")
    if cfg.hook not in HOOKS:
        raise UnivError(f"unknown hook {cfg.hook!r} (use {' or '.join(HOOKS)})")
    sources = [models.resolve(name) for name in cfg.models]
    device = models.resolve_device(cfg.device)
    for src in sources:
        computed(cfg, src, device)
        parse_layers(cfg.layers, src.n_layers)
        if src.max_ctx is not None and cfg.ctx_len > src.max_ctx:
            raise UnivError(f"--ctx-len {cfg.ctx_len} is beyond {src.name}'s limit of {src.max_ctx} tokens")
    tokenizers = [models.load_tokenizer(src) for src in sources]
    prints = [models.tokenizer_fingerprint(t) for t in tokenizers]
    for src, fp in zip(sources[1:], prints[1:]):
        if fp != prints[0]:
            raise UnivError(f"{sources[0].name} and {src.name} have different tokenizers, "
                            "so their activations cannot be paired token for token")
    ensure_writable(cfg.cache_dir)
    key = token_store_key(cfg, tokenizers[0])
    for src in sources:  # a model that cannot load fails now, not after the corpus is tokenized
        if not _cached(cfg, src, key, device):
            models.load_source(src, device, computed(cfg, src, device).dtype)  # loaded only to check, then dropped
    key, tstore = build_token_store(cfg, tokenizers[0], progress)
    summaries = [cache_model(cfg, src, key, tstore, progress) for src in sources]
    return CacheResult(tstore.path, key, summaries)
