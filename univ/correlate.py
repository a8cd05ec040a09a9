"""Pearson statistics between two sets of features over the same tokens, and their maxima.

Statistics are raw moments accumulated in float64: n, Σf, Σf², Σg, Σg² and Σ f gᵀ. The inputs
are float32 (or bf16) values, whose pairwise products are exact in float64, so the only
rounding is float64 summation; the cancellation of the one-pass formula then matters only when
mean² / variance approaches 1e8 or so, far beyond anything SAE features or neurons show (a
float32 one-pass formula breaks near 1e3, which the tests check).

Σ f gᵀ is accumulated sparsely for SAE features (a sparse × sparse product per block of
tokens: O(L0_a · L0_b) work per token instead of O(F_a · F_b)), densely for neurons.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .examples import Collector, Examples, dense_quantiles, sparse_quantiles

CLAMP = 1e-12
"""The authors' floor on the denominator sqrt((nΣf² − (Σf)²)(nΣg² − (Σg)²)), in those n²-scaled
units (feature/cal_cor/cal_correlation.py): it only ever catches a feature that is constant."""


class Encoded(NamedTuple):
    """One layer's features over the window: sparse (rows, cols, vals) or dense [n, F]."""

    n: int
    width: int
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    vals: torch.Tensor | None
    dense: torch.Tensor | None
    sum: torch.Tensor
    sum_sq: torch.Tensor
    fires: torch.Tensor
    """Bool [F]: the feature is non-zero on at least one token."""
    constant: torch.Tensor
    """Bool [F]: the feature takes one value on every token of the window (its correlations are 0)."""
    examples: Examples | None = None
    """What each feature fires on (top rows, density, quantiles), collected in the same pass."""

    @property
    def is_sparse(self) -> bool:
        return self.dense is None


def encode_window(batches, width: int, sparse: bool, device, examples: bool = False) -> Encoded:
    """Collect features from an iterator of [rows, F] tensors (already on the device); with
    ``examples``, each feature's top activations, density and quantiles on the way."""
    rows, cols, vals, dense = [], [], [], []
    top = Collector(width, device) if examples else None
    s = torch.zeros(width, dtype=torch.float64, device=device)
    s2 = torch.zeros(width, dtype=torch.float64, device=device)
    lo = torch.full((width,), float("inf"), dtype=torch.float64, device=device)
    hi = torch.full((width,), float("-inf"), dtype=torch.float64, device=device)
    n = 0
    for f in batches:
        f64 = f.double()
        s += f64.sum(0)
        s2 += f64.pow(2).sum(0)
        lo = torch.minimum(lo, f64.amin(0))
        hi = torch.maximum(hi, f64.amax(0))
        if top is not None:
            top.add(f, n)
        if sparse:
            r, c = f.nonzero(as_tuple=True)
            rows.append((r + n).int())
            cols.append(c.int())
            vals.append(f[r, c].float())
        else:
            dense.append(f)
        n += len(f)
    fires, constant = s2 > 0, lo == hi
    if sparse:
        r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        ex = top.finish(n, sparse_quantiles(c, v, width)) if top is not None else None
        return Encoded(n, width, r, c, v, None, s, s2, fires, constant, ex)
    d = torch.cat(dense)
    ex = top.finish(n, dense_quantiles(d)) if top is not None else None
    return Encoded(n, width, None, None, None, d, s, s2, fires, constant, ex)


def cross_moment(a: Encoded, b: Encoded, block_rows: int = 8192) -> torch.Tensor:
    """Σ_t f_t g_tᵀ, float64 [F_a, F_b]."""
    out = torch.zeros(a.width, b.width, dtype=torch.float64, device=a.sum.device)
    if not (a.is_sparse and b.is_sparse):
        fa, fb = _dense(a), _dense(b)
        for s in range(0, a.n, block_rows):
            out.addmm_(fa[s:s + block_rows].double().T, fb[s:s + block_rows].double())
        return out
    flat = out.view(-1)
    # Entries are in row order (nonzero() is row-major): a block of tokens is a contiguous range.
    edges = torch.arange(0, a.n + block_rows, block_rows, device=a.rows.device, dtype=a.rows.dtype)
    bounds_a, bounds_b = torch.searchsorted(a.rows, edges).tolist(), torch.searchsorted(b.rows, edges).tolist()
    for i, start in enumerate(range(0, a.n, block_rows)):
        rows = min(block_rows, a.n - start)
        (la, ha), (lb, hb) = bounds_a[i:i + 2], bounds_b[i:i + 2]
        if la == ha or lb == hb:
            continue
        # (A block)ᵀ (B block) as a sparse × sparse product: O(L0_a · L0_b) work per token.
        at = torch.sparse_coo_tensor(torch.stack([a.cols[la:ha].long(), (a.rows[la:ha] - start).long()]),
                                     a.vals[la:ha].double(), (a.width, rows), check_invariants=False)
        bt = torch.sparse_coo_tensor(torch.stack([(b.rows[lb:hb] - start).long(), b.cols[lb:hb].long()]),
                                     b.vals[lb:hb].double(), (rows, b.width), check_invariants=False)
        with warnings.catch_warnings():  # torch calls its internal CSR conversion "beta"
            warnings.simplefilter("ignore", UserWarning)
            prod = torch.sparse.mm(at, bt).coalesce()
        idx = prod.indices()
        flat.index_add_(0, idx[0] * b.width + idx[1], prod.values())
    return out


def _dense(e: Encoded) -> torch.Tensor:
    if e.dense is not None:
        return e.dense
    d = torch.zeros(e.n, e.width, device=e.sum.device, dtype=e.vals.dtype)
    d[e.rows.long(), e.cols.long()] = e.vals
    return d


class PairMax(NamedTuple):
    """Best correlations between one layer of A and one layer of B."""

    a_value: torch.Tensor
    """[F_a] max over B's features of corr(f_i, g_j)."""
    a_index: torch.Tensor
    """[F_a] the j reaching it."""
    b_value: torch.Tensor
    b_index: torch.Tensor


def correlation(a: Encoded, b: Encoded, cross: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Pearson correlations (float64) of A's features (optionally a slice of them) with all of B's,
    as the authors computed them: (nΣfg − ΣfΣg) / max(sqrt((nΣf² − (Σf)²)(nΣg² − (Σg)²)), 1e-12).

    A constant feature (a dead one, above all) scores exactly 0, whatever float64 rounding leaves
    in its variance; every other pair gets its true correlation, however rarely both fire."""
    rows = rows or slice(0, a.width)
    n = a.n
    sa, sb = a.sum[rows], b.sum
    ss_a = (n * a.sum_sq[rows] - sa ** 2).clamp_min(0)
    ss_b = (n * b.sum_sq - sb ** 2).clamp_min(0)
    num = n * cross[rows] - sa[:, None] * sb[None, :]
    corr = num / torch.sqrt(ss_a[:, None] * ss_b[None, :]).clamp_min(CLAMP)
    return corr.masked_fill_(a.constant[rows][:, None] | b.constant[None, :], 0.0)


def pair_max(a: Encoded, b: Encoded, block: int = 4096) -> PairMax:
    """Max correlation both ways between two layers, without holding the whole matrix twice."""
    if a.n != b.n:
        raise ValueError(f"feature windows differ: {a.n} vs {b.n} tokens")
    cross = cross_moment(a, b)
    a_val = torch.empty(a.width, dtype=torch.float64, device=cross.device)
    a_idx = torch.empty(a.width, dtype=torch.long, device=cross.device)
    b_val = torch.full((b.width,), -2.0, dtype=torch.float64, device=cross.device)
    b_idx = torch.zeros(b.width, dtype=torch.long, device=cross.device)
    for s in range(0, a.width, block):
        corr = correlation(a, b, cross, slice(s, s + block))
        a_val[s:s + block], a_idx[s:s + block] = corr.max(1)
        v, i = corr.max(0)
        better = v > b_val
        b_val = torch.where(better, v, b_val)
        b_idx = torch.where(better, i + s, b_idx)
    return PairMax(a_val, a_idx, b_val, b_idx)
