"""univ's explicit Mamba forward and its scan against transformers' own implementation."""

import pytest
import torch

from conftest import MAMBA_130M
from univ import mamba, models, scan_compiled
from univ.errors import UnivError
from univ.scan import causal_conv_silu_torch, selective_scan, selective_scan_torch


def _random_mamba(**cfg):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(**cfg)).eval()


def _hf_resid(model, tokens):
    out = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o)) for i, b in enumerate(model.backbone.layers)]
    with torch.no_grad():
        model(input_ids=tokens)
    for h in hooks:
        h.remove()
    return [out[i] for i in range(len(out))]


def test_explicit_forward_equals_transformers_on_a_tiny_model(assets):
    lm = models.load(str(assets["mamba"]), device="cpu")
    tokens = torch.randint(0, 300, (3, 70))  # longer than one CPU scan block
    ours = lm.resid(tokens, list(range(lm.n_layers)))
    for layer, ref in enumerate(_hf_resid(lm.model, tokens)):
        torch.testing.assert_close(ours[layer], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_each_block_equals_transformers_on_the_130m_config():
    """Fed the same input, each of the 24 blocks matches transformers' to float32 rounding.
    (Run end to end, the two differ by rounding only, which random weights amplify with
    depth: residual norms grow to ~1e3.)"""
    model = _random_mamba(**MAMBA_130M)
    tokens = torch.randint(0, 50280, (2, 40))
    refs = _hf_resid(model, tokens)
    with torch.no_grad():
        inputs = [model.backbone.embeddings(tokens), *refs[:-1]]
        for layer, (x, ref) in enumerate(zip(inputs, refs)):
            ours = mamba.block_forward(model.backbone.layers[layer], x)
            assert ((ours - ref).norm() / ref.norm()).item() < 1e-6, layer
    ours = mamba.resid(model, tokens, [23])[0]
    assert ((ours - refs[23]).norm() / refs[23].norm()).item() < 1e-3


def test_scan_matches_a_plain_loop_and_returns_states():
    g = torch.Generator().manual_seed(0)
    Bt, T, E, N = 2, 150, 6, 5
    x, dt, z = (torch.randn(Bt, T, E, generator=g) for _ in range(3))
    B, C = torch.randn(Bt, T, N, generator=g), torch.randn(Bt, T, N, generator=g)
    A, D, bias = -torch.rand(E, N, generator=g) - 0.1, torch.randn(E, generator=g), torch.randn(E, generator=g)
    y, states = selective_scan_torch(x, dt, A, B, C, D, bias, z=z, state_positions=[0, 64, 149])
    delta = torch.nn.functional.softplus(dt + bias)
    h = torch.zeros(Bt, E, N)
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        expected = ((h * C[:, t, None, :]).sum(-1) + D * x[:, t]) * torch.nn.functional.silu(z[:, t])
        torch.testing.assert_close(y[:, t], expected, rtol=1e-5, atol=1e-5)
        if t in (0, 64, 149):
            torch.testing.assert_close(states[:, [0, 64, 149].index(t)], h, rtol=1e-5, atol=1e-5)


def test_causal_conv_matches_torch_conv1d():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 9, 5, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=3, groups=5)[..., :9]
    torch.testing.assert_close(causal_conv_silu_torch(x, w, b), torch.nn.functional.silu(ref).transpose(1, 2))


def _scan_inputs(Bt, T, E, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(Bt, T, 2 * E, generator=g)
    dbl = torch.randn(Bt, T, 2 * N, generator=g)
    A = -torch.rand(E, N, generator=g) * 4 - 0.1
    return (xz[..., :E], torch.randn(Bt, T, E, generator=g), A, dbl[..., :N], dbl[..., N:],
            torch.randn(E, generator=g), torch.randn(E, generator=g), xz[..., E:])


@pytest.fixture
def fresh_cpu_scan(monkeypatch):
    """scan_compiled as a new process finds it, with every CPU scan counted as large."""
    monkeypatch.setattr(scan_compiled, "MIN_UPDATES", 0)
    monkeypatch.setattr(scan_compiled, "_compiled", None)
    return monkeypatch


def test_cpu_scan_is_eager_unless_the_run_asks_for_compiled(fresh_cpu_scan):
    """The path is the run's choice, never elapsed time: without --cpu-scan compiled nothing compiles."""
    import time

    fresh_cpu_scan.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled without being asked"))
    clock = iter(range(0, 10**9, 1000))  # every scan seems to take 1000 s: a long, busy run
    fresh_cpu_scan.setattr(time, "perf_counter", lambda: float(next(clock)))
    x, dt, A, B, C, D, bias, z = _scan_inputs(1, 20, 8, 4)
    for _ in range(3):
        y, _ = selective_scan(x, dt, A, B, C, D, bias, z=z)
        assert torch.equal(y, selective_scan_torch(x, dt, A, B, C, D, bias, z=z)[0])


def test_compiled_cpu_scan_equals_the_eager_one(fresh_cpu_scan):
    """Asked for, large CPU scans without states go through torch.compile; a length that is not
    a whole number of compiled blocks is padded with Δ = 0."""
    x, dt, A, B, C, D, bias, z = _scan_inputs(2, 45, 40, 5)
    try:
        with scan_compiled.mode("compiled"):
            y, states = selective_scan(x, dt, A, B, C, D, bias, z=z)
    except UnivError:
        pytest.skip("torch.compile's C++ backend does not work here")
    assert states is None and scan_compiled._compiled is not None
    torch.testing.assert_close(y, selective_scan_torch(x, dt, A, B, C, D, bias, z=z)[0], rtol=1e-5, atol=1e-5)


def test_compiled_cpu_scan_that_cannot_compile_stops_in_one_line(fresh_cpu_scan):
    def broken(*args):
        raise RuntimeError("no compiler")

    fresh_cpu_scan.setattr(scan_compiled, "_compiled", (broken, broken, broken))
    x, dt, A, B, C, D, bias, z = _scan_inputs(1, 20, 8, 4)
    with pytest.raises(UnivError, match="--cpu-scan compiled: torch.compile fails on this machine"):
        with scan_compiled.mode("compiled"):
            selective_scan(x, dt, A, B, C, D, bias, z=z)
    with pytest.raises(UnivError, match="unknown --cpu-scan"):
        with scan_compiled.mode("fast"):
            pass
