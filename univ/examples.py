"""What each feature fires on, collected while `match` encodes the MPPC window (no second pass):
per feature its top activations (value and row of the window), how many rows it fires on, and
quantiles of its non-zero values. One file per side and layer, keyed by what fixes the features
(SAE weights, activations, feature scale, window), shared by every comparison that encodes them.

From these, per feature, the offline proxies of how simple it is (the paper scored complexity by
hand or with a language model): the entropy of the token ids at its top activations (a feature
that fires on one token is simple), its firing density, and how many distinct contexts its top
activations come from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from . import files
from .store import Store, tokens_dir

TOP_K = 20
"""Top activations kept per feature."""
QUANTILES = (0.5, 0.9, 0.99)
"""Quantiles of a feature's non-zero values."""
QUANTILE_ROWS = 65_536
"""Dense features (neurons): quantiles over this many evenly spaced rows of the window."""


class Examples(NamedTuple):
    n: int
    """Rows of the window."""
    top_values: torch.Tensor
    """[k, F] float32, descending; 0 below a feature's last firing row."""
    top_rows: torch.Tensor
    """[k, F] int32: rows of the window; -1 where the feature fired on fewer than k rows."""
    count: torch.Tensor
    """[F] int64: rows where the feature is non-zero."""
    quantiles: torch.Tensor
    """[len(QUANTILES), F] float32 of the non-zero values (NaN for a feature that never fires)."""

    def save(self, path: Path) -> None:
        data = st_save({k: getattr(self, k).contiguous().cpu() for k in ("top_values", "top_rows", "count", "quantiles")},
                       metadata={"n": str(self.n), "quantiles": json.dumps(QUANTILES)})
        files.write_bytes(path, data)

    @classmethod
    def load(cls, path: Path) -> Examples | None:
        try:
            with safe_open(str(path), "pt") as f:
                n = int(f.metadata()["n"])
                t = {k: f.get_tensor(k) for k in ("top_values", "top_rows", "count", "quantiles")}
            return cls(n, t["top_values"], t["top_rows"], t["count"], t["quantiles"])
        except Exception:  # absent or damaged: the next match writes it again
            return None


class Collector:
    """Running top-k over the rows of a window, fed batch by batch as they are encoded."""

    def __init__(self, width: int, device, k: int = TOP_K):
        self.k = k
        self.values = torch.zeros(0, width, device=device)
        self.rows = torch.zeros(0, width, dtype=torch.long, device=device)
        self.count = torch.zeros(width, dtype=torch.long, device=device)

    def add(self, f: torch.Tensor, offset: int) -> None:
        f = f.float()
        self.count += (f != 0).sum(0)
        kk = min(self.k, len(f))
        v, i = f.topk(kk, dim=0)
        values, rows = torch.cat([self.values, v]), torch.cat([self.rows, i + offset])
        keep = min(self.k, len(values))
        self.values, pick = values.topk(keep, dim=0)
        self.rows = rows.gather(0, pick)

    def finish(self, n: int, quantiles: torch.Tensor) -> Examples:
        values, rows = self.values, self.rows
        if len(values) < self.k:  # a window shorter than k rows
            pad = self.k - len(values)
            values = torch.cat([values, values.new_zeros(pad, values.shape[1])])
            rows = torch.cat([rows, rows.new_full((pad, rows.shape[1]), -1)])
        fired = values > 0
        return Examples(n, torch.where(fired, values, 0.0).cpu(), torch.where(fired, rows, -1).int().cpu(),
                        self.count.cpu(), quantiles.float().cpu())


def sparse_quantiles(cols: torch.Tensor, vals: torch.Tensor, width: int) -> torch.Tensor:
    """Per feature, quantiles of its values in (cols, vals) form (all non-zero)."""
    cols = cols.long()
    order = torch.argsort(vals, stable=True)
    order = order[torch.argsort(cols[order], stable=True)]  # by feature, then by value
    sorted_vals = vals[order].float()
    counts = torch.bincount(cols, minlength=width)
    start = torch.cumsum(counts, 0) - counts
    out = torch.full((len(QUANTILES), width), float("nan"), device=vals.device)
    alive = counts > 0
    for i, q in enumerate(QUANTILES):
        idx = start + torch.floor(q * (counts - 1).clamp(min=0).double()).long()
        out[i, alive] = sorted_vals[idx[alive]]
    return out


def dense_quantiles(dense: torch.Tensor) -> torch.Tensor:
    """Per column, quantiles of its non-zero values over evenly spaced rows."""
    step = max(1, math.ceil(len(dense) / QUANTILE_ROWS))
    x = dense[::step].float()
    x = torch.where(x != 0, x, float("nan"))
    return torch.nanquantile(x, torch.tensor(QUANTILES, device=x.device), dim=0)


# -- the window's tokens --------------------------------------------------------------------------
class WindowTokens(NamedTuple):
    """The kept tokens of a window, row by row: what each activation row is."""

    ids: np.ndarray
    """[n] token id of each row."""
    context: np.ndarray
    """[n] the context (document) each row belongs to."""

    def span(self, row: int) -> tuple[int, int]:
        """First and last row (inclusive) of the context ``row`` belongs to (rows of one context
        are consecutive)."""
        c = self.context[row]
        return int(np.searchsorted(self.context, c, "left")), int(np.searchsorted(self.context, c, "right")) - 1


def window_tokens(tstore: Store, n: int) -> WindowTokens:
    toks, masks = [], []
    for index in sorted(tstore.chunks):
        chunk = tstore.read_chunk(index)
        toks.append(chunk["tokens"].numpy())
        masks.append(chunk["mask"].numpy())
    tokens, mask = np.concatenate(toks), np.concatenate(masks)
    context, position = np.nonzero(mask)
    return WindowTokens(tokens[context, position][:n], context[:n])


def token_store(cache_root: Path, key: str | None) -> Store | None:
    """The token store of that key in a cache, if it is there."""
    if key is None or not (tokens_dir(cache_root, key) / "manifest.json").is_file():
        return None
    return Store.read(tokens_dir(cache_root, key))


def token_store_of(store: Store, cache_dir: Path) -> Store | None:
    """The token store an activation store was cached from, if it is in the cache (stores given by
    path from elsewhere may have left theirs behind)."""
    key = store.config.get("tokens_store")
    roots = [cache_dir] + ([store.path.parents[3]] if len(store.path.parents) > 3 else [])
    return next((t for t in (token_store(root, key) for root in roots) if t is not None), None)


# -- how simple a feature is ----------------------------------------------------------------------
PROXIES = ("token_entropy", "density", "context_spread")


def _distinct_weighted(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[k, F] -> [k, F]: for each valid entry, how many valid entries of its column share its key."""
    same = (keys[:, None, :] == keys[None, :, :]) & valid[:, None, :] & valid[None, :, :]
    return same.sum(1).float()


def proxies(ex: Examples, window: WindowTokens | None) -> dict[str, torch.Tensor]:
    """Per feature: entropy (bits) of the token ids at its top activations, firing density, and
    the fraction of distinct contexts among its top activations (NaN where a proxy is undefined:
    no tokens known, or a feature that never fires)."""
    out = {"density": ex.count.double() / max(ex.n, 1)}
    valid = ex.top_rows >= 0
    m = valid.sum(0).double()
    if window is None:
        nan = torch.full_like(m, float("nan"))
        return {**out, "token_entropy": nan, "context_spread": nan.clone()}
    rows = ex.top_rows.clamp(min=0).long().numpy()
    ids = torch.from_numpy(window.ids[rows].astype(np.int64))
    ctx = torch.from_numpy(window.context[rows].astype(np.int64))
    c_ids, c_ctx = _distinct_weighted(ids, valid), _distinct_weighted(ctx, valid)
    vf = valid.double()
    p = torch.where(valid, c_ids.double() / m, 1.0)
    entropy = -(vf * torch.log2(p)).sum(0) / m  # 0/0: NaN for a feature that never fired
    spread = (vf / torch.where(valid, c_ctx.double(), 1.0)).sum(0) / m
    return {**out, "token_entropy": entropy, "context_spread": spread}


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranked = np.empty(len(x))
    ranked[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranked)
    return (sums / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho over the pairs where both are defined (None with fewer than 3, or a constant)."""
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return None
    rx, ry = ranks(x[keep]), ranks(y[keep])
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])
