"""The `fit-sae` stage: one SAE per layer from one pass over the activation stores.

Rows are taken in windows of ``shuffle_tokens`` consecutive rows (a window spans several
chunks, so several documents); each window is permuted with a seed fixed by the window's index
and cut into batches. Chunk ``i`` of every layer is read once and feeds every layer's SAE.
The last ``eval_tokens`` rows of the store are held out for the metrics and never trained on.
A checkpoint (safetensors + JSON) is written at window boundaries; a killed run resumes there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import models
from .cache import CacheConfig, format_layers, run_cache
from .errors import UnivError
from .options import parse_layers
from .sae import SAE, SAEConfig
from .sae_train import TrainConfig, after_step, before_step, default_lr, lr_at, step_loss
from .store import Lock, Store, config_key, resid_hook, slug

log = logging.getLogger("univ")
CHECKPOINT = "checkpoint"


@dataclass
class FitConfig:
    """Options of `univ fit-sae` that shape the SAEs (the store they read is given separately)."""

    arch: str = "relu"
    """'relu' (the study's ReLU + L1) or 'topk'."""
    expansion: float = 32
    """d_sae = expansion × d_model."""
    l1: float = 5.0
    """L1 coefficient λ (relu), on token-normalised inputs of norm √d."""
    k: int = 32
    """Active latents per token (topk)."""
    lr: float | None = None
    """Peak Adam learning rate; None: 4e-4 (relu) or 2e-4/√(d_sae/2¹⁴) (topk)."""
    train_tokens: int | None = None
    """Training tokens; None: every training row once. More than the store holds: several passes."""
    batch_size: int = 4096
    """Rows per optimiser step."""
    seed: int = 42
    """Seed of the initialisation and of the batch order."""
    normalisation: str | None = None
    """'token', 'dataset' or 'none'; None: token (relu, as in the study) or dataset (topk)."""
    eval_tokens: int = 65_536
    """Rows held out at the end of the store for the metrics (at most a tenth of the store)."""
    shuffle_tokens: int = 131_072
    """Rows per shuffle window (rounded up to whole batches)."""
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


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch: int = 4096) -> dict:
    """L0, explained variance and dead fraction on held-out raw activations."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    l0 = sq_err = 0.0
    n = len(x)
    mean = x.float().mean(0)
    total_var = (x.float() - mean).pow(2).sum().item()
    for b in range(0, n, batch):
        xb = x[b:b + batch].float()
        f = sae.encode(xb)
        x_hat = sae.decode(f, sae.scale(xb))
        active = f > 0
        fired |= active.any(0)
        l0 += active.sum().item()
        sq_err += (x_hat - xb).pow(2).sum().item()
    return {"l0": l0 / n, "explained_variance": 1 - sq_err / max(total_var, 1e-12),
            "dead_fraction": 1 - fired.float().mean().item(), "eval_rows": n}


def _save_checkpoint(out_dirs: dict[int, Path], saes, opts, since, state: dict) -> None:
    for layer, out in out_dirs.items():
        tensors = {f"param.{k}": v.detach().cpu() for k, v in saes[layer].state_dict().items()}
        for name, p in saes[layer].named_parameters():
            for k, v in opts[layer].state.get(p, {}).items():
                tensors[f"adam.{name}.{k}"] = v.detach().cpu().reshape(v.shape)
        tensors["since_fired"] = since[layer].cpu()
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{CHECKPOINT}.safetensors.tmp")
        (out / f"{CHECKPOINT}.safetensors.tmp").replace(out / f"{CHECKPOINT}.safetensors")
        (out / f"{CHECKPOINT}.json.tmp").write_text(json.dumps(state) + "\n")
        (out / f"{CHECKPOINT}.json.tmp").replace(out / f"{CHECKPOINT}.json")


def _load_checkpoint(out: Path, sae: SAE, opt: torch.optim.Optimizer, device) -> tuple[dict, torch.Tensor] | None:
    if not (out / f"{CHECKPOINT}.json").is_file():
        return None
    state = json.loads((out / f"{CHECKPOINT}.json").read_text())
    tensors = load_file(out / f"{CHECKPOINT}.safetensors", device=str(device))
    sae.load_state_dict({k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")})
    for name, p in sae.named_parameters():
        keys = [k for k in tensors if k.startswith(f"adam.{name}.")]
        if keys:
            opt.state[p] = {k.removeprefix(f"adam.{name}."): tensors[k] for k in keys}
    return state, tensors["since_fired"]


def _make_optimizer(sae: SAE, lr: float, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused or None)


def fit(cfg: FitConfig, stores: list[LayerData], load_lm=None, tstore: Store | None = None,
        progress: bool = True) -> list[SAEResult]:
    """Train (or find) one SAE per layer; returns their held-out quality metrics.

    ``load_lm`` (a function returning the model) and ``tstore`` enable LM loss recovered; the
    model is loaded only when some metrics still need computing."""
    if cfg.expansion < 1:
        raise UnivError(f"--expansion must be at least 1, not {cfg.expansion}")
    if cfg.batch_size < 1:
        raise UnivError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    device = models.resolve_device(cfg.device)
    n_rows, d = check_stores(stores)
    d_sae = int(round(cfg.expansion * d))
    normalisation = cfg.normalisation or ("token" if cfg.arch == "relu" else "dataset")
    n_eval = min(cfg.eval_tokens, n_rows // 10)
    n_train = n_rows - n_eval
    if n_eval < 1 or n_train < cfg.batch_size:
        raise UnivError(f"the store holds {n_rows} rows: too few for batches of {cfg.batch_size} "
                        "plus held-out rows; cache more tokens or lower --batch-size")
    train_tokens = cfg.train_tokens or n_train
    steps = train_tokens // cfg.batch_size
    window = math.ceil(cfg.shuffle_tokens / cfg.batch_size) * cfg.batch_size
    lr = cfg.lr or default_lr(cfg.arch, d_sae)
    tc = TrainConfig(lr=lr, total_steps=steps,
                     matmul_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    sae_cfgs, keys, keyed = {}, {}, []
    for ld in stores:
        sc = SAEConfig(arch=cfg.arch, d_in=d, d_sae=d_sae, k=cfg.k if cfg.arch == "topk" else None,
                       l1=cfg.l1 if cfg.arch == "relu" else None, normalisation=normalisation,
                       store={"path": str(ld.store.path), "config": ld.store.config}, seed=cfg.seed)
        sc.check()
        sae_cfgs[ld.layer] = sc
        recipe = {"sae": {k: v for k, v in asdict(sc).items() if k != "univ_version"},
                  "train": {**asdict(tc), "matmul_dtype": str(tc.matmul_dtype)},
                  "train_tokens": train_tokens, "batch_size": cfg.batch_size, "eval_tokens": n_eval,
                  "window": window, "store_chunks": [c["sha256"] for c in ld.store.manifest["chunks"]]}
        keys[ld.layer] = recipe
        keyed.append(LayerData(ld.layer, ld.store, ld.out_dir / f"{cfg.arch}-{config_key(recipe)}"))
    stores = keyed

    todo = [ld for ld in stores if cfg.force or not (ld.out_dir / "metrics.json").is_file()]
    if todo:
        with Lock(todo[0].out_dir.parent):
            _train(cfg, todo, sae_cfgs, keys, tc, n_train, train_tokens, window, device, progress)
    results = []
    eval_rows = lm = None
    for ld in stores:
        metrics_path = ld.out_dir / "metrics.json"
        if not metrics_path.is_file() or ld in todo:
            if eval_rows is None:
                eval_rows = next(iter_windows(stores, n_train, n_rows, n_eval, device))
            sae = SAE.load(ld.out_dir, device)
            metrics = evaluate(sae, eval_rows[ld.layer])
            if load_lm is not None and tstore is not None:
                lm = lm or load_lm()
                # A centred store's SAE sees the stream minus its mean, which the model cannot see.
                recon = (lambda h, sae=sae: sae.reconstruct(h - h.mean(-1, keepdim=True))) \
                    if ld.store.config.get("centred") else sae.reconstruct
                metrics["loss_recovered"] = loss_recovered(lm, ld.layer, recon, tstore, n_eval,
                                                           cfg.loss_recovered_contexts)
            else:
                metrics["loss_recovered"] = None
            metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
        metrics = json.loads(metrics_path.read_text())
        results.append(SAEResult(ld.layer, ld.store.config.get("hook", f"layer{ld.layer}"), cfg.arch, d_sae,
                                 round(metrics["l0"], 2), round(metrics["explained_variance"], 4),
                                 round(metrics["dead_fraction"], 4),
                                 None if metrics["loss_recovered"] is None else round(metrics["loss_recovered"], 4),
                                 str(ld.out_dir)))
    return results


def _train(cfg: FitConfig, todo: list[LayerData], sae_cfgs, keys, tc: TrainConfig, n_train: int,
           train_tokens: int, window: int, device: torch.device, progress: bool) -> None:
    saes, opts, since = {}, {}, {}
    out_dirs = {ld.layer: ld.out_dir for ld in todo}
    for ld in todo:
        torch.manual_seed(cfg.seed)
        saes[ld.layer] = SAE(sae_cfgs[ld.layer]).to(device)
        opts[ld.layer] = _make_optimizer(saes[ld.layer], tc.lr, device)
        ld.out_dir.mkdir(parents=True, exist_ok=True)
    resumed = {} if cfg.force else {ld.layer: _load_checkpoint(ld.out_dir, saes[ld.layer], opts[ld.layer], device)
                                    for ld in todo}
    states = {json.dumps(r[0], sort_keys=True) if r else None for r in resumed.values()}
    if len(states) == 1 and None not in states:  # every layer stopped at the same window
        state = next(iter(resumed.values()))[0]
        since = {layer: r[1] for layer, r in resumed.items()}
    else:  # a fresh start (or checkpoints from different moments: start over rather than mix)
        state = {"window": 0, "step": 0}
        for ld in todo:
            opts[ld.layer] = _make_optimizer(saes[ld.layer], tc.lr, device)  # drop any half-loaded state
            gen = torch.Generator().manual_seed(cfg.seed)
            first = next(iter_windows([ld], 0, n_train, min(window, n_train), torch.device("cpu")))[ld.layer]
            saes[ld.layer].initialise(first[torch.randperm(len(first), generator=gen)[:4096]], gen)
            since[ld.layer] = torch.zeros(sae_cfgs[ld.layer].d_sae, dtype=torch.long, device=device)
    windows_per_pass = math.ceil(n_train / window)
    total_windows = math.ceil(train_tokens / window)
    bar = tqdm(total=tc.total_steps * cfg.batch_size, initial=state["step"] * cfg.batch_size,
               desc=f"fit-sae {len(todo)} layer(s)", unit="tok", unit_scale=True,
               disable=None if progress else True)
    last_save = time.monotonic()

    def done() -> bool:
        return state["window"] >= total_windows or state["step"] >= tc.total_steps

    with bar:
        while not done():
            # One pass over the training rows, from the window the run stands at.
            first = state["window"] % windows_per_pass
            for rows in iter_windows(todo, first * window, n_train, window, device):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["window"])
                perm = torch.randperm(len(next(iter(rows.values()))), generator=gen).to(device)
                n_batches = min(len(perm) // cfg.batch_size, tc.total_steps - state["step"])
                for layer, x in rows.items():
                    _train_window(saes[layer], opts[layer], x[perm], n_batches, cfg.batch_size, tc,
                                  state["step"], since[layer], layer)
                state["step"] += n_batches
                state["window"] += 1
                bar.update(n_batches * cfg.batch_size)
                if done():
                    break
                if time.monotonic() - last_save >= cfg.checkpoint_minutes * 60:
                    _save_checkpoint(out_dirs, saes, opts, since, state)
                    last_save = time.monotonic()
    for layer, sae in saes.items():
        sae.cfg.store["train"] = {"tokens": state["step"] * cfg.batch_size, "steps": state["step"],
                                  "lr": tc.lr, "batch_size": cfg.batch_size}
        sae.save(out_dirs[layer])
        (out_dirs[layer] / "recipe.json").write_text(json.dumps(keys[layer], indent=1, default=str) + "\n")
        for suffix in (".safetensors", ".json"):
            (out_dirs[layer] / f"{CHECKPOINT}{suffix}").unlink(missing_ok=True)
        (out_dirs[layer] / "metrics.json").unlink(missing_ok=True)


def _train_window(sae: SAE, opt, x: torch.Tensor, n_batches: int, batch: int, tc: TrainConfig,
                  step0: int, since_fired: torch.Tensor, layer: int) -> None:
    use_aux = sae.cfg.arch == "topk" and bool((since_fired >= tc.dead_tokens).any())
    bad = torch.full((), -1, dtype=torch.long, device=x.device)
    for b in range(n_batches):
        step = step0 + b
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        loss, _ = step_loss(sae, x[b * batch:(b + 1) * batch], tc, step, since_fired, use_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before_step(sae)
        opt.step()
        after_step(sae)
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), step, bad)
    if (first_bad := int(bad)) >= 0:  # one host sync per window, not per step
        raise UnivError(f"layer {layer}: the loss became non-finite at step {first_bad}; the last good "
                        "checkpoint is kept (try a lower --lr)")


@torch.no_grad()
def loss_recovered(lm: models.LM, layer: int, reconstruct, tstore: Store, n_eval: int,
                   n_contexts: int) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean) on held-out contexts: the last contexts of the
    token store whose kept tokens all lie in the held-out rows."""
    tokens, mask = _held_out_contexts(tstore, n_eval, n_contexts)
    tokens, mask = tokens.to(lm.device).long(), mask.to(lm.device)
    target = mask[:, :-1] & mask[:, 1:]  # predict kept tokens from kept positions

    def ce(replace=None) -> float:
        logits = lm.logits(tokens, {layer: replace} if replace else None)[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits[target], tokens[:, 1:][target])
        return loss.item()

    def splice(fn):
        def replace(h):
            out = h.clone()
            out[mask] = fn(h[mask]).to(h.dtype)
            return out
        return replace

    clean = ce()
    with_sae = ce(splice(reconstruct))
    zero = ce(splice(torch.zeros_like))
    return (zero - with_sae) / (zero - clean) if zero != clean else float("nan")


def _held_out_contexts(tstore: Store, n_eval: int, n_contexts: int) -> tuple[torch.Tensor, torch.Tensor]:
    toks, masks, kept = [], [], 0
    for index in sorted(tstore.chunks, reverse=True):
        chunk = tstore.read_chunk(index)
        for t, m in zip(chunk["tokens"].flip(0), chunk["mask"].flip(0)):
            if kept + int(m.sum()) > n_eval or len(toks) == n_contexts:
                return _stack(toks, masks)
            kept += int(m.sum())
            toks.append(t)
            masks.append(m)
    return _stack(toks, masks)


def _stack(toks, masks):
    if not toks:
        raise UnivError("no whole context lies in the held-out rows; raise --eval-tokens")
    return torch.stack(toks), torch.stack(masks)


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
    """fit-sae on a model's cached stores (cached first when missing) or on stores given by path."""
    if (cache_cfg is None) == (acts is None):
        raise UnivError("give either --model (its cached activations) or --acts STORE_DIR")
    if acts is not None:
        stores = stores_at(acts)
        owner = external_owner(acts)
        chosen = [LayerData(layer, stores[layer], sae_root(cache_dir, owner, stores[layer].path.name))
                  for layer in select_layers(stores, layers)]
        return fit(cfg, chosen, progress=progress)
    cache_cfg.layers = layers
    cached = run_cache(cache_cfg, progress)
    src = models.resolve(cache_cfg.models[0])
    device = models.resolve_device(cache_cfg.device)
    dtype = models.resolve_dtype(cache_cfg.dtype, device)
    root = Path(cached.models[0].store)
    chosen = [LayerData(layer, Store.read(root / resid_hook(layer)), sae_root(cache_dir, root.parent.name, resid_hook(layer)))
              for layer in parse_layers(layers, src.n_layers)]
    return fit(cfg, chosen, lambda: models.load_source(src, device, dtype), Store.read(cached.tokens_store), progress)
