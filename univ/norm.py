"""Mamba's block boundary in one pass: the residual add, then the next block's RMSNorm.

transformers computes, between two blocks,

    s       = residual + mixer_out                    the block's output (fp32 with residual_in_fp32)
    normed  = w · (x · rsqrt(mean(x²) + ε)).to(w's dtype),   x = s.to(w's dtype) in fp32

in about ten elementwise passes over [batch, pos, d_model]. On CUDA one Triton kernel reads s's
two terms once and writes s and normed; elsewhere the same maths runs as transformers' ops.
"""

from __future__ import annotations

import torch
from torch import nn

from .scan import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, s_ptr, out_ptr, n_rows, D, eps,
                             HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        off = rows[:, None] * D + cols[None, :]
        s = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            s += tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = s.to(s_ptr.dtype.element_ty)  # the sum rounds to the output's dtype, as torch's add does
        tl.store(s_ptr + off, s, mask=mask)
        x = s.to(out_ptr.dtype.element_ty).to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        normed = (x * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
        tl.store(out_ptr + off, normed.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module,
                 residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, normed) for s = hidden + delta (hidden alone when delta is None: the embeddings),
    s in float32 when residual_in_fp32; normed = norm(s in the norm's dtype)."""
    if use_triton(hidden):
        return add_rms_norm_triton(hidden, delta, norm, residual_in_fp32)
    s = hidden if delta is None else hidden + delta
    normed = norm(s.to(norm.weight.dtype))
    return (s.float() if residual_in_fp32 else s), normed


def add_rms_norm_triton(hidden, delta, norm, residual_in_fp32):
    w = norm.weight
    s_dtype = hidden.dtype if delta is None else torch.promote_types(hidden.dtype, delta.dtype)
    if residual_in_fp32:
        s_dtype = torch.float32
    hidden = hidden.contiguous()
    D = hidden.shape[-1]
    s = torch.empty(hidden.shape, device=hidden.device, dtype=s_dtype)
    normed = torch.empty(hidden.shape, device=hidden.device, dtype=w.dtype)
    n_rows = hidden.numel() // D
    block_d = triton.next_power_of_2(D)
    rows = max(1, 4096 // block_d)  # ~32 numbers a thread: 4 rows of Mamba-130M, 1 of Mamba-2.8B
    _add_rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        hidden, delta.contiguous() if delta is not None else hidden, w, s, normed, n_rows, D,
        norm.variance_epsilon, HAS_DELTA=delta is not None, BLOCK_D=block_d, ROWS=rows, num_warps=4)
    return s, normed
