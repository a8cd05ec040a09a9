"""RWKV-4's WKV, the recurrence inside its time mixing, without compiled extensions.

Per channel, with decay w = −exp(time_decay) < 0 and bonus u = time_first:

    S_t = e^w S_{t−1} + e^{k_t} v_t          D_t = e^w D_{t−1} + e^{k_t}
    wkv_t = (S_{t−1} + e^{u + k_t} v_t) / (D_{t−1} + e^{u + k_t})

RWKV's kernels (and transformers') keep the state as (num, den, max) with S = num·e^max, max the
largest exponent so far, so nothing overflows. On CUDA a Triton kernel runs the recurrence in
registers, one program per (batch, block of channels), as RWKV's CUDA kernel does (transformers
needs a kernel from the Hub for that). On the CPU a loop over positions with every operation in
place: measured on a 2-core CPU at d 768, 1024 positions, 1.4x transformers' loop at batch 1 and
level at batch 4 and 16. (Because the decay does not depend on the input, S_t is a cumulative
sum, e^{t w} Σ_{j≤t} e^{k_j − j w} v_j; computed for all positions at once with
log-cumulative-sum-exp, it needs float64 against the cancellation in t w and was 6x slower than
the loop there.) Both return the state after the last position (the circuit analyses rebuild the
one entering the last position from patched keys and values) and, when asked, after every
position (transformers' only the last).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from .scan import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


class State(NamedTuple):
    """(num, den, max), [B, C] (or [B, T, C] per position), float32: S = num·e^max, D = den·e^max."""

    num: torch.Tensor
    den: torch.Tensor
    max: torch.Tensor


EMPTY_MAX = -1e38
"""transformers' max before any token."""


def wkv_torch(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              state: State | None = None, states: bool = False) -> tuple[torch.Tensor, State, State | None]:
    """k, v [B, T, C] -> (wkv [B, T, C] in k's dtype, the state after the last position, and with
    ``states`` the state after every position [B, T, C]). RWKV's recurrence in float32, one
    position at a time, every operation in place on preallocated [B, C] buffers."""
    B, T, C = k.shape
    w = -torch.exp(time_decay.float())
    u = time_first.float()
    kT, vT = k.transpose(0, 1).float().contiguous(), v.transpose(0, 1).float().contiguous()  # [T, B, C]
    out = torch.empty_like(kT)
    if state is None:
        num, den = kT.new_zeros(B, C), kT.new_zeros(B, C)
        mx = kT.new_full((B, C), EMPTY_MAX)
    else:
        num, den, mx = (x.float().clone() for x in state)
    every = State(*(torch.empty_like(kT) for _ in range(3))) if states else None
    ku, m, e1, e2, a, b, mw = (kT.new_empty(B, C) for _ in range(7))
    for t in range(T):
        kt, vt = kT[t], vT[t]
        torch.add(kt, u, out=ku)                     # the output: state before t, plus e^{u + k_t} v_t
        torch.maximum(mx, ku, out=m)
        torch.sub(mx, m, out=e1).exp_()
        torch.sub(ku, m, out=e2).exp_()
        torch.mul(e1, num, out=a).addcmul_(e2, vt)
        torch.mul(e1, den, out=b).add_(e2)
        torch.div(a, b, out=out[t])
        torch.add(mx, w, out=mw)                     # the state after t: decayed, plus e^{k_t} v_t
        torch.maximum(mw, kt, out=m)
        torch.sub(mw, m, out=e1).exp_()
        torch.sub(kt, m, out=e2).exp_()
        num.mul_(e1).addcmul_(e2, vt)
        den.mul_(e1).add_(e2)
        mx.copy_(m)
        if every is not None:
            every.num[t], every.den[t], every.max[t] = num, den, mx
    if every is not None:
        every = State(*(x.transpose(0, 1) for x in every))
    return out.transpose(0, 1).to(k.dtype), State(num, den, mx), every


if HAVE_TRITON:

    @triton.jit
    def _wkv_kernel(w_ptr, u_ptr, k_ptr, v_ptr, out_ptr, s0_ptr, st_ptr, T, C,
                    HAS_STATE: tl.constexpr, ALL_STATES: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cs < C
        w = -tl.exp(tl.load(w_ptr + cs, mask=ok, other=0.0))
        u = tl.load(u_ptr + cs, mask=ok, other=0.0)
        if HAS_STATE:
            num = tl.load(s0_ptr + (0 * tl.num_programs(0) + b) * C + cs, mask=ok, other=0.0)
            den = tl.load(s0_ptr + (1 * tl.num_programs(0) + b) * C + cs, mask=ok, other=0.0)
            mx = tl.load(s0_ptr + (2 * tl.num_programs(0) + b) * C + cs, mask=ok, other=-1e38)
        else:
            num = tl.zeros([BLOCK], dtype=tl.float32)
            den = tl.zeros([BLOCK], dtype=tl.float32)
            mx = tl.full([BLOCK], -1e38, dtype=tl.float32)
        base = b * T * C
        for t in range(T):
            kt = tl.load(k_ptr + base + t * C + cs, mask=ok, other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + base + t * C + cs, mask=ok, other=0.0).to(tl.float32)
            m_out = tl.maximum(mx, kt + u)
            e1 = tl.exp(mx - m_out)
            e2 = tl.exp(kt + u - m_out)
            y = (e1 * num + e2 * vt) / (e1 * den + e2)
            tl.store(out_ptr + base + t * C + cs, y.to(out_ptr.dtype.element_ty), mask=ok)
            m_st = tl.maximum(mx + w, kt)
            e1 = tl.exp(mx + w - m_st)
            e2 = tl.exp(kt - m_st)
            num = e1 * num + e2 * vt
            den = e1 * den + e2
            mx = m_st
            if ALL_STATES:
                at = base + t * C + cs
                tl.store(st_ptr + at, num, mask=ok)
                tl.store(st_ptr + tl.num_programs(0) * T * C + at, den, mask=ok)
                tl.store(st_ptr + 2 * tl.num_programs(0) * T * C + at, mx, mask=ok)
        if not ALL_STATES:
            tl.store(st_ptr + b * C + cs, num, mask=ok)
            tl.store(st_ptr + (tl.num_programs(0) + b) * C + cs, den, mask=ok)
            tl.store(st_ptr + (2 * tl.num_programs(0) + b) * C + cs, mx, mask=ok)


def wkv_triton(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               state: State | None = None, states: bool = False, block: int = 128) -> tuple[torch.Tensor, State, State | None]:
    """wkv_torch's contract, the recurrence in registers (float32, as RWKV's kernels)."""
    B, T, C = k.shape
    k, v = k.contiguous(), v.contiguous()
    out = torch.empty_like(k)
    s0 = torch.stack([x.float() for x in state]).contiguous() if state is not None else out.new_empty(1, dtype=torch.float32)
    st = torch.empty((3, B, T, C) if states else (3, B, C), device=k.device, dtype=torch.float32)
    _wkv_kernel[(B, triton.cdiv(C, block))](time_decay.float().contiguous(), time_first.float().contiguous(), k, v,
                                            out, s0, st, T, C, HAS_STATE=state is not None, ALL_STATES=states,
                                            BLOCK=block)
    every = State(*st) if states else None
    last = State(*(x[:, -1] for x in st)) if states else State(*st)
    return out, last, every


def wkv(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        state: State | None = None, states: bool = False) -> tuple[torch.Tensor, State, State | None]:
    """WKV over [B, T, C]: the Triton kernel on CUDA, the in-place loop elsewhere."""
    run = wkv_triton if use_triton(k) else wkv_torch
    return run(time_decay, time_first, k, v, state, states)


def _for_transformers(time_decay, time_first, key, value, state=None, return_state=False):
    """transformers' rwkv_linear_attention, computed by wkv()."""
    out, last, _ = wkv(time_decay, time_first, key, value, State(*state) if state is not None else None)
    return out, ([last.num, last.den, last.max] if return_state or state is not None else None)


@contextmanager
def in_transformers():
    """transformers' RWKV computes its WKV with univ's while inside."""
    from transformers.models.rwkv import modeling_rwkv

    theirs = modeling_rwkv.rwkv_linear_attention
    modeling_rwkv.rwkv_linear_attention = _for_transformers
    try:
        yield
    finally:
        modeling_rwkv.rwkv_linear_attention = theirs
