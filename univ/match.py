"""The `match` stage: MPPC between two models' features, both ways, the depth map, and the
reference points (random-init baseline, SAE-seed and model-seed skylines, neurons).

MPPC of feature i of A: the largest Pearson correlation, over the shared token window, between
f_i and any feature g_j of B in any of B's layers (and the reverse). Features that never fire
in the window are counted and, by default, left out of the summaries; with ``dead_as_zero``
they count as 0, which is what the authors' variance clamp gives them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from . import files, models
from .correlate import Encoded, PairMax, encode_window, pair_max
from .errors import UnivError
from .examples import PROXIES, QUANTILES, TOP_K, Examples, proxies, spearman, token_store_of, window_tokens
from .progress import bar as progress_bar
from .store import Store, config_key, slug

log = logging.getLogger("univ")
THRESHOLDS = (0.5, 0.7, 0.9)


@dataclass
class MatchConfig:
    """Options of the matching itself."""

    tokens: int = 1_000_000
    """Window: the first this-many rows of the stores (all rows if fewer)."""
    dead_as_zero: bool = False
    """Count never-firing features as MPPC 0 in the summaries (default: leave them out)."""
    feature_scale: str = "raw"
    """SAE features correlated on the activations' own scale ('raw', encode(x)·‖x‖/√d, what the
    authors correlated) or on the SAE's normalised inputs ('normalised', univ's variant)."""
    batch_rows: int = 8192
    """Rows encoded at a time."""
    device: str = "auto"
    """auto, cpu, cuda."""


@dataclass
class Side:
    """One model's features: per layer, an activation store and an encoder (None: the
    activations are the features, as for neurons)."""

    label: str
    stores: dict[int, Store]
    encoders: dict[int, Callable[[torch.Tensor], torch.Tensor] | None]
    ident: dict
    """What fixes the features (stores' and SAEs' identities, the feature scale), for the result's key."""


class Comparison(NamedTuple):
    name: str
    a: str
    b: str
    layers_a: list[int]
    layers_b: list[int]
    tokens: int
    a_value: torch.Tensor
    """[La, Fa] best correlation of each A feature over all of B's features."""
    a_layer: torch.Tensor
    """[La, Fa] position (in layers_b) of the B layer holding the best match."""
    a_index: torch.Tensor
    a_fires: torch.Tensor
    b_value: torch.Tensor
    b_layer: torch.Tensor
    b_index: torch.Tensor
    b_fires: torch.Tensor
    depth: torch.Tensor
    """[La, Lb] mean over A-layer-l live features of their best correlation within B-layer m."""
    path: str
    examples: dict = {}
    """Side ('a', 'b') -> layer -> its examples file, relative to the comparison's folder."""
    tokens_store: str | None = None
    """Key of the token store the window's rows come from."""
    complexity: dict = {}
    """Side ('a', 'b') -> proxy -> Spearman's rho between MPPC and the proxy over live features."""

    def complexity_rows(self) -> list[dict]:
        return [{"comparison": self.name, "direction": direction,
                 **{f"rho_{p}": self.complexity.get(side, {}).get(p) for p in PROXIES}}
                for side, direction in (("a", f"{self.a} -> {self.b}"), ("b", f"{self.b} -> {self.a}"))]

    def summary(self, dead_as_zero: bool) -> list[dict]:
        rows = []
        for direction, value, fires in ((f"{self.a} -> {self.b}", self.a_value, self.a_fires),
                                        (f"{self.b} -> {self.a}", self.b_value, self.b_fires)):
            v = value.flatten().double()
            f = fires.flatten()
            v = torch.where(f, v, 0.0) if dead_as_zero else v[f]
            row = {"comparison": self.name, "direction": direction, "features": int(f.numel()),
                   "alive": int(f.sum()), "mean": _r(v.mean()), "median": _r(v.median())}
            for t in THRESHOLDS:
                row[f">={t}"] = _r((v >= t).double().mean())
            rows.append(row)
        return rows

    def per_layer(self) -> list[dict]:
        rows = []
        for side, layers, value, fires, other, best in (
                (self.a, self.layers_a, self.a_value, self.a_fires, self.layers_b, self.a_layer),
                (self.b, self.layers_b, self.b_value, self.b_fires, self.layers_a, self.b_layer)):
            for i, layer in enumerate(layers):
                alive = fires[i]
                counts = torch.bincount(best[i][alive], minlength=len(other))
                rows.append({"comparison": self.name, "model": side, "layer": layer, "alive": int(alive.sum()),
                             "mean_mppc": _r(value[i][alive].double().mean()) if alive.any() else None,
                             "most_matches_in_layer": other[int(counts.argmax())] if alive.any() else None})
        return rows

    def depth_table(self) -> list[dict]:
        return [{f"{self.a} layer": la, **{f"{self.b} {lb}": _r(self.depth[i, j]) for j, lb in enumerate(self.layers_b)}}
                for i, la in enumerate(self.layers_a)]


def _r(x) -> float:
    x = float(x)
    return round(x, 4) if x == x else float("nan")


def _token_store_of(side: Side) -> tuple[str | None, list[int]]:
    first = side.stores[min(side.stores)]
    return first.config.get("tokens_store"), [c["rows"] for c in first.manifest["chunks"]]


def check_paired(a: Side, b: Side) -> None:
    """Refuse stores that were not built from the same token store."""
    (ka, rows_a), (kb, rows_b) = _token_store_of(a), _token_store_of(b)
    for side, key in ((a, ka), (b, kb)):
        if key is None:
            raise UnivError(f"{side.label}'s activation stores do not record their token store "
                            "(config.tokens_store); univ cannot tell that their rows are the same tokens")
        if any(s.config.get("tokens_store") != key for s in side.stores.values()):
            raise UnivError(f"{side.label}'s layers come from different token stores")
    if ka != kb or rows_a != rows_b:
        raise UnivError(f"{a.label} and {b.label} were cached from different token stores ({ka} vs {kb}); "
                        "cache both from the same corpus and tokenizer")


def _encode(side: Side, layer: int, n: int, cfg: MatchConfig, device, examples: Path | None = None) -> Encoded:
    """One layer's features over the window; with ``examples`` (a file), what each feature fires on:
    read from there when an earlier comparison of this side wrote it, else collected on the way
    and written."""
    known = Examples.load(examples) if examples is not None else None
    store, encoder = side.stores[layer], side.encoders[layer]

    def batches():
        done = 0
        for index in sorted(store.chunks):
            if done >= n:
                return
            acts = store.read_chunk(index)["acts"][: n - done]
            for s in range(0, len(acts), cfg.batch_rows):
                x = acts[s:s + cfg.batch_rows].to(device)
                with torch.no_grad():
                    yield (encoder(x.float()) if encoder is not None else x).detach()
            done += len(acts)

    first = store.read_chunk(min(store.chunks))["acts"][:1].to(device)
    width = (encoder(first.float()) if encoder is not None else first).shape[-1]
    enc = encode_window(batches(), width, sparse=encoder is not None, device=device,
                        examples=examples is not None and known is None)
    if known is not None:
        return enc._replace(examples=known)
    if examples is not None:
        enc.examples.save(examples)
    return enc


def examples_dir(out_root: Path, side: Side, n: int) -> Path:
    """Where a side's examples live: keyed by what fixes its features and the window, so every
    comparison that encodes the same side shares them."""
    return out_root / "examples" / f"{slug(side.label)}-{config_key({'side': side.ident, 'tokens': n})}"


def _complexity(exs: list, value: torch.Tensor, fires: torch.Tensor, window) -> dict:
    """Spearman's rho between each live feature's MPPC and each simplicity proxy (``window``: the
    window's tokens, None when its token store is not at hand)."""
    per_layer = [proxies(ex, window) for ex in exs]
    alive = fires.flatten().cpu().numpy()
    mppc = value.flatten().double().cpu().numpy()[alive]
    return {p: spearman(mppc, torch.cat([x[p] for x in per_layer]).numpy()[alive]) for p in PROXIES}


def compare(name: str, a: Side, b: Side, cfg: MatchConfig, out_root: Path, progress: bool = True) -> Comparison:
    """MPPC both ways between every layer of A and every layer of B (or the cached result)."""
    check_paired(a, b)
    rows = sum(c["rows"] for c in a.stores[min(a.stores)].manifest["chunks"])
    n = min(cfg.tokens, rows)
    key = config_key({"a": a.ident, "b": b.ident, "tokens": n})
    out = out_root / f"{slug(name)}-{key}"  # keyed by the sides' content, however the models were named
    if (saved := load_comparison(out)) is not None:
        return saved
    device = models.resolve_device(cfg.device)
    la, lb = sorted(a.stores), sorted(b.stores)
    ex_dirs = {"a": examples_dir(out_root, a, n), "b": examples_dir(out_root, b, n)}
    for side, d in ((a, ex_dirs["a"]), (b, ex_dirs["b"])):
        if not (d / "config.json").is_file():
            files.write_json(d / "config.json", {"side": side.label, "features": side.ident, "tokens": n,
                                                 "top_k": TOP_K, "quantiles": list(QUANTILES)})
    # B's layers are encoded once and kept; A's one at a time: memory holds B and one layer of A.
    with progress_bar(len(lb), f"match {name}: encode {b.label}", "layer", 0, progress) as bar:
        enc_b = {}
        for layer in lb:
            enc_b[layer] = _encode(b, layer, n, cfg, device, ex_dirs["b"] / f"layer-{layer}.safetensors")
            bar.update()
    fb = enc_b[lb[0]].width
    a_val = a_lay = a_idx = None
    a_fires, ex_a = [], []
    b_val = torch.full((len(lb), fb), -2.0, dtype=torch.float64, device=device)
    b_lay = torch.zeros(len(lb), fb, dtype=torch.long, device=device)
    b_idx = torch.zeros_like(b_lay)
    depth = torch.zeros(len(la), len(lb), dtype=torch.float64, device=device)
    pairs = out / "pairs"  # each finished layer pair, so that an interrupted match resumes there
    with progress_bar(len(la) * len(lb), f"match {name}", "layer pair", 0, progress) as bar:
        for i, l_a in enumerate(la):
            enc_a = _encode(a, l_a, n, cfg, device, ex_dirs["a"] / f"layer-{l_a}.safetensors")
            ex_a.append(enc_a.examples)
            if a_val is None:
                _check_memory(enc_a, enc_b, device)
                a_val = torch.full((len(la), enc_a.width), -2.0, dtype=torch.float64, device=device)
                a_lay = torch.zeros(len(la), enc_a.width, dtype=torch.long, device=device)
                a_idx = torch.zeros_like(a_lay)
            alive = enc_a.fires
            a_fires.append(alive)
            for j, l_b in enumerate(lb):
                pm = _pair(pairs / f"{l_a}-{l_b}.safetensors", enc_a, enc_b[l_b], device)
                depth[i, j] = pm.a_value[alive].mean() if alive.any() else float("nan")
                better = pm.a_value > a_val[i]
                a_val[i] = torch.where(better, pm.a_value, a_val[i])
                a_lay[i] = torch.where(better, j, a_lay[i])
                a_idx[i] = torch.where(better, pm.a_index, a_idx[i])
                better = pm.b_value > b_val[j]
                b_val[j] = torch.where(better, pm.b_value, b_val[j])
                b_lay[j] = torch.where(better, i, b_lay[j])
                b_idx[j] = torch.where(better, pm.b_index, b_idx[j])
                bar.update()
            del enc_a
    b_fires = torch.stack([enc_b[l].fires for l in lb]).cpu()
    tstore = token_store_of(a.stores[la[0]], out_root.parent)  # both sides' rows are these tokens (check_paired)
    window = window_tokens(tstore, n) if tstore is not None else None
    complexity = {"a": _complexity(ex_a, a_val, torch.stack(a_fires), window),
                  "b": _complexity([enc_b[l].examples for l in lb], b_val, b_fires, window)}
    examples = {side: {layer: os.path.relpath(ex_dirs[side] / f"layer-{layer}.safetensors", out)
                       for layer in layers} for side, layers in (("a", la), ("b", lb))}
    result = Comparison(name, a.label, b.label, la, lb, n,
                        a_val.float().cpu(), a_lay.cpu(), a_idx.cpu(), torch.stack(a_fires).cpu(),
                        b_val.float().cpu(), b_lay.cpu(), b_idx.cpu(), b_fires,
                        depth.float().cpu(), str(out), examples,
                        a.stores[la[0]].config.get("tokens_store"), complexity)
    _save(result, out, {"a": a.ident, "b": b.ident})
    shutil.rmtree(pairs, ignore_errors=True)
    return result


def _pair(path: Path, a: Encoded, b: Encoded, device) -> PairMax:
    """One layer pair's maxima, read back if an earlier (interrupted) run finished it."""
    try:
        t = load_file(path, device=str(device))
        return PairMax(t["a_value"], t["a_index"], t["b_value"], t["b_index"])
    except Exception:  # absent, or unreadable: compute it
        pm = pair_max(a, b)
        files.write_bytes(path, st_save({k: v.contiguous().cpu() for k, v in pm._asdict().items()}))
        return pm


def _nbytes(e: Encoded) -> int:
    return sum(t.numel() * t.element_size() for t in (e.rows, e.cols, e.vals, e.dense) if t is not None)


def _check_memory(a: Encoded, b: dict[int, Encoded], device) -> None:
    """Refuse, with the numbers, a match that cannot fit: with B's layers and one of A's encoded,
    a layer pair needs its float64 cross moments [F_a, F_b] and a few blocks of correlations."""
    fb = next(iter(b.values())).width
    need = 8 * a.width * fb + 4 * 8 * 4096 * fb
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > free:
        held = sum(_nbytes(e) for e in b.values()) + _nbytes(a)
        raise UnivError(f"a layer pair needs {need / 2**30:.1f} GiB ({a.width:,} x {fb:,} features) and "
                        f"{free / 2**30:.1f} GiB are free (the encoded layers hold {held / 2**30:.1f} GiB); "
                        "lower --tokens or --expansion")


_TENSORS = ("a_value", "a_layer", "a_index", "a_fires", "b_value", "b_layer", "b_index", "b_fires", "depth")


def _save(c: Comparison, out: Path, ident: dict) -> None:
    data = st_save({k: getattr(c, k).contiguous() for k in _TENSORS})
    files.write_bytes(out / "mppc.safetensors", data)
    meta = {"name": c.name, "a": c.a, "b": c.b, "layers_a": c.layers_a, "layers_b": c.layers_b,
            "tokens": c.tokens, "mppc_sha256": hashlib.sha256(data).hexdigest(), "feature_scale": {side: ident[side].get("feature_scale") for side in ident},
            "inputs": ident, "examples": c.examples, "tokens_store": c.tokens_store, "complexity": c.complexity,
            "summary": c.summary(False), "summary_dead_as_zero": c.summary(True)}
    files.write_json(out / "summary.json", meta)  # last: its presence marks a finished comparison


def load_comparison(out: Path) -> Comparison | None:
    """A saved comparison, or None when it is missing or cannot be read (then it is recomputed)."""
    meta = files.read_json(out / "summary.json")
    try:
        data = (out / "mppc.safetensors").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["mppc_sha256"]:
            log.warning("%s is corrupt (sha256 differs from summary.json); it will be computed again", out)
            return None
        t = st_load(data)
        examples = {side: {int(layer): f for layer, f in by_layer.items()} for side, by_layer in meta["examples"].items()}
        return Comparison(meta["name"], meta["a"], meta["b"], meta["layers_a"], meta["layers_b"], meta["tokens"],
                          *(t[k] for k in _TENSORS[:-1]), t["depth"], str(out), examples, meta["tokens_store"],
                          meta["complexity"])
    except Exception:  # missing, truncated or not what this univ writes: compute it again
        return None
