"""An explicit Mamba-1 forward on transformers' MambaForCausalLM weights.

transformers' own Mamba is slow without mamba-ssm (a Python loop over positions on large
temporaries) and its fused paths hide the conv output and the states. This module runs the
same maths through univ's scan (Triton on CUDA, vectorised PyTorch on the CPU) and exposes,
per layer, what the analyses need: the conv input and output, Δ, B, C, the gate, y and the
states h_t at chosen positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .norm import add_rms_norm
from .scan import causal_conv_silu, selective_scan


@dataclass
class MixerTrace:
    """What one mixer computed, [batch, pos, ...] each; filled when tracing is asked for."""

    x: torch.Tensor | None = None
    """Conv input (the first half of in_proj)."""
    xc: torch.Tensor | None = None
    """SiLU(conv output): the SSM input."""
    gate: torch.Tensor | None = None
    """z (the second half of in_proj); the output is y · SiLU(z)."""
    dt: torch.Tensor | None = None
    """dt_proj output before bias and softplus."""
    B: torch.Tensor | None = None
    C: torch.Tensor | None = None
    y: torch.Tensor | None = None
    """Gated SSM output, the input of out_proj."""
    states: torch.Tensor | None = None
    """h_t at the asked positions, [batch, positions, d_inner, d_state], float32."""
    state_positions: list[int] = field(default_factory=list)


def mixer_forward(mixer: nn.Module, u: torch.Tensor, trace: MixerTrace | None = None,
                  state_positions: list[int] | None = None, last_state: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' MambaMixer.forward (no cache) on u [batch, pos, d_model]; see ssm_forward
    for ``last_state``."""
    E = mixer.intermediate_size
    xz = F.linear(u, mixer.in_proj.weight, mixer.in_proj.bias)
    x, z = xz[..., :E], xz[..., E:]
    conv_w = mixer.conv1d.weight.squeeze(1)
    xc = causal_conv_silu(x, conv_w, mixer.conv1d.bias if mixer.use_conv_bias else None)
    if trace is not None:
        trace.x = x
    y = ssm_forward(mixer, xc, z, trace, state_positions, last_state)
    return F.linear(y.to(u.dtype), mixer.out_proj.weight, mixer.out_proj.bias)


def ssm_forward(mixer: nn.Module, xc: torch.Tensor, z: torch.Tensor, trace: MixerTrace | None = None,
                state_positions: list[int] | None = None, last_state: torch.Tensor | None = None) -> torch.Tensor:
    """The gated SSM output y = (C·h + D·xc)·SiLU(z), [batch, pos, E], from the SSM input xc
    (SiLU of the conv output) and the gate z. With ``last_state`` [batch, E, N] the last position
    reads out that state instead of its own h (a state frozen by path patching)."""
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    x_dbl = F.linear(xc, mixer.x_proj.weight)
    dt_r, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    dt = F.linear(dt_r, mixer.dt_proj.weight)
    A = -torch.exp(mixer.A_log.to(torch.promote_types(mixer.A_log.dtype, torch.float32)))
    y, states = selective_scan(xc, dt, A, B, C, mixer.D, mixer.dt_proj.bias, z=z,
                               state_positions=state_positions)
    if last_state is not None:
        read = (last_state.float() * C[:, -1, None, :].float()).sum(-1)
        y = y.clone()
        y[:, -1] = ((read + mixer.D.float() * xc[:, -1].float()) * F.silu(z[:, -1].float())).to(y.dtype)
    if trace is not None:
        trace.xc, trace.gate, trace.dt, trace.B, trace.C, trace.y = xc, z, dt, B, C, y
        trace.states, trace.state_positions = states, list(state_positions or [])
    return y


def block_forward(block: nn.Module, hidden: torch.Tensor, trace: MixerTrace | None = None,
                  state_positions: list[int] | None = None, last_state: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' MambaBlock.forward: residual + mixer(RMSNorm(residual))."""
    normed = block.norm(hidden.to(dtype=block.norm.weight.dtype))
    return residual_of(block, hidden) + mixer_forward(block.mixer, normed, trace, state_positions, last_state)


def residual_of(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The residual stream a block adds its mixer's output to (float32 with residual_in_fp32)."""
    return hidden.to(torch.float32) if block.residual_in_fp32 else hidden


@torch.no_grad()
def _walk(model: nn.Module, tokens: torch.Tensor, layers: list[int], traced: bool) -> dict:
    """Run the blocks up to the deepest asked layer; per asked layer, its output and (if traced)
    its mixer's trace. Equal to block_forward layer by layer, but each block boundary (the
    residual add and the next block's RMSNorm) is one add_rms_norm pass."""
    blocks = model.backbone.layers[: max(layers) + 1]
    wanted, out = set(layers), {}
    residual, delta, trace = model.backbone.embeddings(tokens), None, None
    for i, block in enumerate(blocks):
        residual, normed = add_rms_norm(residual, delta, block.norm, block.residual_in_fp32)
        if i - 1 in wanted:
            out[i - 1] = (residual, trace)
        trace = MixerTrace() if traced and i in wanted else None
        delta = mixer_forward(block.mixer, normed, trace)
    out[len(blocks) - 1] = (residual + delta, trace)
    return out


def resid(model: nn.Module, tokens: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """resid_post of the given layers, stopping after the deepest one."""
    out = _walk(model, tokens, layers, traced=False)
    return [out[i][0] for i in layers]


def neurons(model: nn.Module, tokens: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Per layer concat(SiLU(conv output), SiLU(gate)): [batch, pos, 2·d_inner], the study's Mamba 'neurons'."""
    out = _walk(model, tokens, layers, traced=True)
    return [torch.cat([out[i][1].xc, F.silu(out[i][1].gate)], dim=-1) for i in layers]
