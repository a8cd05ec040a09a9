"""The selective scan on the CPU, fused by torch.compile (Inductor's C++ backend).

Eager PyTorch runs a block of positions as about six passes over a [batch, block, channels,
d_state] buffer (the decay, its exp, the input, the recurrence, y's product and its sum), each
bound by memory. Compiled, a block is one loop over channels that keeps the states in
registers, about twice as fast.

Compiling costs ~30 s the first time on a machine and ~8 s from Inductor's disk cache, and the
compiled scan's float32 results differ from the eager one's in the last bits (up to ~3e-5). So
the path is a choice of the run's configuration (``--cpu-scan eager|compiled``, recorded with what
it computes), never of elapsed time: a store resumed after a kill, or computed on a busier
machine, holds the same bytes. 'eager' is the default; a run that asks for 'compiled' where
torch.compile cannot work stops with one line rather than change paths midway.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .errors import UnivError

BLOCK = 16
"""Positions per compiled call, unrolled in the compiled graph."""
MIN_UPDATES = 1 << 22
"""batch · positions · channels · d_state below which a scan is always eager."""
MODES = ("eager", "compiled")

_mode = "eager"
_compiled = None


@contextmanager
def mode(name: str):
    """Large CPU scans without states run ``name`` ('eager' or 'compiled') within the block."""
    global _mode
    if name not in MODES:
        raise UnivError(f"unknown --cpu-scan {name!r} (use {' or '.join(MODES)})")
    saved, _mode = _mode, name
    try:
        yield
    finally:
        _mode = saved


def _block(h, delta, dx, B, C, A):
    """BLOCK positions of the recurrence from state h [Bt, E, N]; Δ and Δ·x [Bt, BLOCK, E];
    B, C [Bt, BLOCK, N]. Returns the state after the block and C·h [Bt, BLOCK, E]. (Δ's
    softplus and the gate are compiled apart: in here Inductor recomputes them for every state.)"""
    ys = []
    for j in range(BLOCK):
        h = torch.exp(delta[:, j, :, None] * A) * h + dx[:, j, :, None] * B[:, j, None, :]
        ys.append((h * C[:, j, None, :]).sum(-1))
    return h, torch.stack(ys, 1)


def _prologue(dt, x, dt_bias):
    delta = F.softplus(dt + dt_bias)
    return delta, delta * x


def _epilogue(y, x, z, D):
    y = y + D * x
    return y * F.silu(z) if z is not None else y


def large(x: torch.Tensor, A: torch.Tensor) -> bool:
    """A CPU scan big enough to count towards compiling, and to run compiled."""
    return x.device.type == "cpu" and x.numel() * A.shape[1] >= MIN_UPDATES


def selective_scan_cpu(x, dt, A, B, C, D, dt_bias, z=None) -> torch.Tensor:
    """y of scan.selective_scan_torch (no states), by the path the run chose (see ``mode``)."""
    global _compiled
    if _mode == "compiled":
        if _compiled is None:
            _compiled = tuple(torch.compile(f, dynamic=True) for f in (_prologue, _block, _epilogue))
        try:
            return _scan(*_compiled, x, dt, A, B, C, D, dt_bias, z)
        except Exception as e:  # Inductor raises many types for a missing or failing C++ compiler
            raise UnivError(f"--cpu-scan compiled: torch.compile fails on this machine ({type(e).__name__}); "
                            "use --cpu-scan eager (a different cache key)") from None
    from .scan import selective_scan_torch

    return selective_scan_torch(x, dt, A, B, C, D, dt_bias, z)[0]


def _scan(prologue, block, epilogue, x, dt, A, B, C, D, dt_bias, z):
    Bt, T, E = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    delta, dx = prologue(dt.to(acc), xa, dt_bias.to(acc))
    B, C, A = B.to(acc), C.to(acc), A.to(acc)
    pad = -T % BLOCK
    if pad:  # past the end Δ = 0: the state neither decays nor takes input
        delta, dx, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (delta, dx, B, C))
    h = torch.zeros(Bt, E, A.shape[1], dtype=acc)
    ys = []
    for t0 in range(0, T + pad, BLOCK):
        s = slice(t0, t0 + BLOCK)
        h, y = block(h, delta[:, s], dx[:, s], B[:, s], C[:, s], A)
        ys.append(y)
    y = epilogue(torch.cat(ys, 1)[:, :T], xa, z.to(acc) if z is not None else None, D.to(acc))
    return y.to(x.dtype)
