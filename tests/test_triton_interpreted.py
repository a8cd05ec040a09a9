"""univ's Triton kernels against the PyTorch paths, run by Triton's interpreter on the CPU
(conftest sets TRITON_INTERPRET=1 without CUDA), so every CI run checks the kernels' maths.
Needs triton >= 3.7: 3.6's interpreter fails on numpy >= 2.4. On a GPU machine
tests/test_gpu.py checks the compiled kernels instead."""

import os

import pytest
import torch

from univ import norm as norm_mod
from univ import scan


def _interpreter_usable() -> bool:
    if not scan.HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7)


pytestmark = pytest.mark.skipif(not _interpreter_usable(), reason="needs triton >= 3.7 in interpreter mode (no CUDA)")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(Bt, T, E, N, seed=0):
    """x and z as strided halves of one projection, B and C as slices of another, as in the mixer."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(Bt, T, 2 * E, generator=g)
    dbl = torch.randn(Bt, T, 3 + 2 * N, generator=g)
    dt = torch.randn(Bt, T, E, generator=g)
    A = -torch.rand(E, N, generator=g) * 4 - 0.1
    D, bias = torch.randn(E, generator=g), torch.randn(E, generator=g)
    return xz[..., :E], xz[..., E:], dt, dbl[..., 3:3 + N], dbl[..., 3 + N:], A, D, bias


@pytest.mark.parametrize("chunk", [16, 64])  # three chunks with a short last one; one chunk
@pytest.mark.parametrize("N", [16, 5])
def test_scan_kernel_equals_torch_scan(monkeypatch, chunk, N):
    monkeypatch.setitem(scan.SCAN_CONFIG, "chunk", chunk)
    x, z, dt, B, C, A, D, bias = _inputs(2, 45, 40, N)
    pos = [0, 15, 16, 44]
    y, h = scan.selective_scan_triton(x, dt, A, B, C, D, bias, z=z, state_positions=pos)
    ref_y, ref_h = scan.selective_scan_torch(x, dt, A, B, C, D, bias, z=z, state_positions=pos)
    assert rel(y, ref_y) < 1e-6 and rel(h, ref_h) < 1e-6
    y_plain, no_states = scan.selective_scan_triton(x, dt, A, B, C, D, bias)
    assert no_states is None
    assert rel(y_plain, scan.selective_scan_torch(x, dt, A, B, C, D, bias)[0]) < 1e-6


def test_scan_kernel_reads_and_writes_bf16(monkeypatch):
    """bf16 activations, as the study caches them: y within bf16 rounding of the float32 scan."""
    monkeypatch.setitem(scan.SCAN_CONFIG, "chunk", 16)
    x, z, dt, B, C, A, D, bias = (t.bfloat16() if t.dim() == 3 else t for t in _inputs(2, 45, 40, 16))
    y, _ = scan.selective_scan_triton(x, dt, A, B, C, D.bfloat16(), bias.bfloat16(), z=z)
    ref, _ = scan.selective_scan_torch(x.float(), dt.float(), A, B.float(), C.float(), D.bfloat16().float(),
                                       bias.bfloat16().float(), z=z.float())
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_kernel_equals_torch_conv(with_bias):
    x, *_ = _inputs(2, 45, 40, 4, seed=1)
    w, b = torch.randn(40, 4), (torch.randn(40) if with_bias else None)
    assert rel(scan.causal_conv_silu_triton(x, w, b), scan.causal_conv_silu_torch(x, w, b)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("first_block", [True, False])
def test_add_rms_norm_kernel_equals_transformers_ops(dtype, residual_in_fp32, first_block):
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    g = torch.Generator().manual_seed(2)
    norm = MambaRMSNorm(40, eps=1e-5).to(dtype)
    norm.weight.data = (torch.rand(40, generator=g) + 0.5).to(dtype)
    hidden = torch.randn(3, 7, 40, generator=g)
    hidden = hidden.to(dtype if first_block or not residual_in_fp32 else torch.float32)
    delta = None if first_block else torch.randn(3, 7, 40, generator=g).to(dtype)
    s, normed = norm_mod.add_rms_norm_triton(hidden, delta, norm, residual_in_fp32)
    ref_s, ref_normed = norm_mod.add_rms_norm(hidden, delta, norm, residual_in_fp32)
    assert s.dtype == ref_s.dtype and normed.dtype == ref_normed.dtype == dtype
    # The interpreter truncates float32 -> bfloat16 where compiled Triton (and torch) round to
    # nearest, so in bf16 the sum may be one unit in the last place off (test_gpu checks exactness).
    ulp = 0 if s.dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(s, ref_s, rtol=ulp, atol=0)
    assert rel(normed, ref_normed) < (1e-6 if dtype == torch.float32 else 1e-2)
