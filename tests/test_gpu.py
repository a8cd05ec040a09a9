"""GPU paths against their CPU references. Skipped without CUDA; run on a GPU machine with
`python -m pytest tests/test_gpu.py` before changing the kernels."""

import pytest
import torch

from conftest import MAMBA_130M
from test_mamba import _hf_resid, _random_mamba
from test_sae import dense_topk
from univ import mamba, scan

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and scan.HAVE_TRITON), reason="needs CUDA and Triton")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(Bt, T, E, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xz = torch.randn(Bt, T, 2 * E, device="cuda", generator=g).to(dtype)
    dt = torch.randn(Bt, T, E, device="cuda", generator=g).to(dtype)
    dbl = torch.randn(Bt, T, 7 + 2 * N, device="cuda", generator=g).to(dtype)
    A = -torch.rand(E, N, device="cuda", generator=g) * 4 - 0.1
    D, bias = torch.randn(E, device="cuda", generator=g), torch.randn(E, device="cuda", generator=g)
    return xz[..., :E], xz[..., E:], dt, dbl[..., 7:7 + N], dbl[..., 7 + N:], A, D, bias


@pytest.mark.parametrize("shape", [(2, 300, 200, 16), (3, 77, 96, 12), (1, 1024, 1536, 16)])
def test_triton_scan_equals_torch_scan(shape):
    x, z, dt, B, C, A, D, bias = _inputs(*shape, torch.float32)
    pos = [0, 7, shape[1] - 1]
    y, h = scan.selective_scan(x, dt, A, B, C, D, bias, z=z, state_positions=pos)
    ref_y, ref_h = scan.selective_scan_torch(x, dt, A, B, C, D, bias, z=z, state_positions=pos)
    assert rel(y, ref_y) < 1e-5 and rel(h, ref_h) < 1e-5
    y2, _ = scan.selective_scan(x, dt, A, B, C, D, bias)
    assert rel(y2, scan.selective_scan_torch(x, dt, A, B, C, D, bias)[0]) < 1e-5


def test_triton_scan_in_bf16_is_within_bf16_rounding():
    x, z, dt, B, C, A, D, bias = _inputs(4, 512, 256, 16, torch.bfloat16)
    y, _ = scan.selective_scan(x, dt, A, B, C, D, bias, z=z)
    ref, _ = scan.selective_scan_torch(x.float(), dt.float(), A, B.float(), C.float(), D, bias, z=z.float())
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2


def test_triton_conv_equals_torch_conv():
    x, *_ = _inputs(2, 333, 200, 16, torch.float32)
    w, b = torch.randn(200, 4, device="cuda"), torch.randn(200, device="cuda")
    assert rel(scan.causal_conv_silu(x, w, b), scan.causal_conv_silu_torch(x, w, b)) < 1e-6


def _mamba_130m():
    return _random_mamba(**MAMBA_130M).cuda()


def test_mamba_130m_blocks_equal_transformers_on_gpu():
    model = _mamba_130m()
    tokens = torch.randint(0, 50280, (2, 256), device="cuda")
    out = _hf_resid(model, tokens)
    with torch.no_grad():
        inputs = [model.backbone.embeddings(tokens)] + out[:23]
        for layer in range(24):
            ours = mamba.block_forward(model.backbone.layers[layer], inputs[layer])
            assert rel(ours, out[layer]) < 1e-5, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_kernel_equals_transformers_ops_on_gpu(dtype):
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    from univ.norm import add_rms_norm_triton

    norm = MambaRMSNorm(768, eps=1e-5).to("cuda", dtype)
    norm.weight.data = torch.rand(768, device="cuda").to(dtype) + 0.5
    residual = torch.randn(4, 300, 768, device="cuda")
    delta = torch.randn(4, 300, 768, device="cuda").to(dtype)
    s, normed = add_rms_norm_triton(residual, delta, norm, True)
    assert torch.equal(s, residual + delta)
    ref = norm(s.to(dtype))
    assert normed.dtype == dtype and rel(normed, ref) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_mamba_130m_resid_equals_transformers_on_gpu():
    """The walk with fused block boundaries, end to end in float32: rounding only (random
    weights amplify it with depth, as on the CPU)."""
    model = _mamba_130m()
    tokens = torch.randint(0, 50280, (2, 256), device="cuda")
    for layer, (ours, ref) in enumerate(zip(mamba.resid(model, tokens, list(range(24))), _hf_resid(model, tokens))):
        assert rel(ours, ref) < 1e-3, layer


def test_mamba_130m_bf16_blocks_stay_close_to_fp32():
    """Stated tolerance: fed the same input, a bf16 block (bf16 weights and activations, float32
    scan state) is within 2 % (relative norm) of the float32 block. End to end, random weights
    amplify rounding chaotically (transformers' own bf16 Mamba drifts as far), so the check is
    per block."""
    model = _mamba_130m()
    tokens = torch.randint(0, 50280, (2, 256), device="cuda")
    inputs = [model.backbone.embeddings(tokens).detach()] + [h.detach() for h in mamba.resid(model, tokens, list(range(23)))]
    with torch.no_grad():
        ref = [mamba.block_forward(model.backbone.layers[i], inputs[i]) for i in range(24)]
        model.to(torch.bfloat16)
        for i in range(24):
            got = mamba.block_forward(model.backbone.layers[i], inputs[i].to(torch.bfloat16))
            assert rel(got.float(), ref[i]) < 2e-2, i


def test_topk_sae_sparse_backward_on_gpu():
    """On the GPU: the sparse TopK backward equals dense autograd (float32 matmul), and the bf16
    matmul gives nearly the same loss."""
    from univ.sae import SAE, SAEConfig
    from univ.sae_train import TrainConfig, step_loss

    sae = SAE(SAEConfig(arch="topk", d_in=768, d_sae=8192, k=32, normalisation="dataset"))
    g = torch.Generator().manual_seed(0)
    sae.initialise(torch.randn(4096, 768, generator=g), g)
    sae.cuda()
    x = torch.randn(4096, 768, device="cuda")
    tc = TrainConfig(lr=1e-4, total_steps=10)
    loss, _ = step_loss(sae, x, tc, 0, torch.zeros(8192, dtype=torch.long, device="cuda"), use_aux=False)
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    xn, _, f = dense_topk(sae, x, 32)
    dense_loss = ((f @ sae.W_dec + sae.b_dec - xn) ** 2).sum(-1).mean()
    dense_loss.backward()
    for name, p in sae.named_parameters():
        assert rel(sparse[name], p.grad) < 1e-4, name
    bf16_loss, _ = step_loss(sae, x, TrainConfig(lr=1e-4, total_steps=10, matmul_dtype=torch.bfloat16), 0,
                             torch.zeros(8192, dtype=torch.long, device="cuda"), use_aux=False)
    assert abs(bf16_loss.item() - loss.item()) / loss.item() < 1e-2
