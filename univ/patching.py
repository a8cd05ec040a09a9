"""Activation and path patching helpers shared by the circuit analyses.

Mamba: a traced forward (every layer's conv input and output, Δ, B, C, gate, y and the states
at chosen positions), and a last-position step that re-runs only the final position through
the layers above a patched component while every layer's history (its conv window and its
state at the previous position) stays clean. That is path patching "component → logit": the
patched component reaches the logits only through the last position's residual stream.

GPT-NeoX: hooks that read or replace one head's output (the input of attention.dense) or one
head's keys and values (the output of query_key_value) at per-sequence positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mamba import MixerTrace, block_forward


@dataclass
class MambaRun:
    """One traced forward of a Mamba model."""

    tokens: torch.Tensor
    resid_in: list[torch.Tensor]
    """Residual stream entering each block, [batch, pos, d_model]."""
    traces: list[MixerTrace]
    logits: torch.Tensor
    """Logits at the last position, float32 [batch, vocab]."""


@torch.no_grad()
def mamba_trace(model, tokens: torch.Tensor, state_positions: list[int]) -> MambaRun:
    backbone = model.backbone
    hidden = backbone.embeddings(tokens)
    resid_in, traces = [], []
    for block in backbone.layers:
        resid_in.append(hidden)
        trace = MixerTrace()
        hidden = block_forward(block, hidden, trace, state_positions)
        traces.append(trace)
    logits = model.lm_head(backbone.norm_f(hidden[:, -1].to(backbone.norm_f.weight.dtype))).float()
    return MambaRun(tokens, resid_in, traces, logits)


def delta_and_A(mixer, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ [.., E], A [E, N]) from the raw dt_proj output."""
    delta = F.softplus(dt_raw.float() + mixer.dt_proj.bias.float())
    return delta, -torch.exp(mixer.A_log.float())


@torch.no_grad()
def last_position(model, clean: MambaRun, layer: int, state_prev=None, state_last=None, y_last=None) -> torch.Tensor:
    """Logits at the last position when, in ``layer``, the state entering the last position
    (``state_prev``), the state at the last position (``state_last``) or the SSM output there
    (``y_last``, gated) is replaced; the layers above re-run the last position on their clean
    histories. Returns float32 [batch, vocab]."""
    backbone = model.backbone
    T = clean.tokens.shape[1]
    hidden = clean.resid_in[layer][:, -1]
    for i in range(layer, len(backbone.layers)):
        block, tr = backbone.layers[i], clean.traces[i]
        mixer = block.mixer
        residual = hidden.float() if block.residual_in_fp32 else hidden
        u = block.norm(hidden.to(block.norm.weight.dtype))
        E, R, N = mixer.intermediate_size, mixer.time_step_rank, mixer.ssm_state_size
        xz = F.linear(u, mixer.in_proj.weight, mixer.in_proj.bias)
        x, z = xz[..., :E], xz[..., E:]
        K = mixer.conv1d.weight.shape[-1]
        window = torch.cat([tr.x[:, T - K:T - 1], x[:, None]], 1).float()  # clean history, new last input
        xc = (window * mixer.conv1d.weight.squeeze(1).float().T).sum(1)
        if mixer.conv1d.bias is not None:
            xc = xc + mixer.conv1d.bias.float()
        xc = F.silu(xc)
        dbl = F.linear(xc.to(mixer.x_proj.weight.dtype), mixer.x_proj.weight).float()
        dt, Bv, Cv = dbl[..., :R], dbl[..., R:R + N], dbl[..., R + N:]
        delta, A = delta_and_A(mixer, F.linear(dt.to(mixer.dt_proj.weight.dtype), mixer.dt_proj.weight))
        h_prev = tr.states[:, tr.state_positions.index(T - 2)].float()
        if i == layer and state_prev is not None:
            h_prev = state_prev.float()
        h = torch.exp(delta[..., None] * A) * h_prev + (delta * xc)[..., None] * Bv[:, None, :]
        if i == layer and state_last is not None:
            h = state_last.float()
        y = ((h * Cv[:, None, :]).sum(-1) + mixer.D.float() * xc) * F.silu(z.float())
        if i == layer and y_last is not None:
            y = y_last.float()
        hidden = residual + F.linear(y.to(mixer.out_proj.weight.dtype), mixer.out_proj.weight, mixer.out_proj.bias)
    return model.lm_head(backbone.norm_f(hidden.to(backbone.norm_f.weight.dtype))).float()


def writes(mixer, trace: MixerTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ā_t, B̄_t x_t) at every position: [batch, pos, E, N] each, float32."""
    delta, A = delta_and_A(mixer, trace.dt)
    decay = torch.exp(delta[..., None] * A)
    write = (delta * trace.xc.float())[..., None] * trace.B.float()[..., None, :]
    return decay, write


def rebuilt_last_state(decay: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """h at the last position by unrolling h_t = Ā_t h_{t−1} + B̄_t x_t from h = 0."""
    h = torch.zeros_like(write[:, 0])
    for t in range(write.shape[1]):
        h = decay[:, t] * h + write[:, t]
    return h


# -- GPT-NeoX ------------------------------------------------------------------------------------
def _rows(positions: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(positions), device=positions.device)


@contextmanager
def neox_heads(lm, capture: dict | None = None, patch: dict | None = None):
    """Read and replace per-head attention outputs (the input of attention.dense).

    ``capture``: {layer: positions [batch]}; the dict yielded holds, after the forward,
    {layer: z at those positions [batch, heads, d_head]}. ``patch``: {(layer, head):
    (positions [batch], values [batch, d_head])} replaces that head's output there."""
    handles, out = [], {}
    cfg = lm.model.config
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H
    capture = capture or {}
    patch = patch or {}
    layers = set(capture) | {layer for layer, _ in patch}
    for layer in layers:
        def pre(module, args, layer=layer):
            z = args[0]
            if layer in capture:
                pos = capture[layer]
                out[layer] = z[_rows(pos), pos].view(len(pos), H, dh).clone()
            mods = [(h, p) for (lay, h), p in patch.items() if lay == layer]
            if not mods:
                return None
            z = z.clone()
            for head, (pos, values) in mods:
                z[_rows(pos), pos, head * dh:(head + 1) * dh] = values.to(z.dtype)
            return (z, *args[1:])

        handles.append(lm.blocks()[layer].attention.dense.register_forward_pre_hook(pre))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def neox_keys_values(lm, layer: int, head: int, positions: torch.Tensor, values: torch.Tensor | None = None,
                     store: dict | None = None):
    """Read (into ``store['kv']``) or replace one head's keys and values at per-sequence
    positions. GPT-NeoX lays query_key_value's output out per head as [q | k | v]."""
    cfg = lm.model.config
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H

    def hook(module, args, output):
        qkv = output.view(*output.shape[:-1], H, 3 * dh)
        if store is not None:
            store["kv"] = qkv[_rows(positions), positions, head, dh:].clone()
        if values is None:
            return None
        qkv = qkv.clone()
        qkv[_rows(positions), positions, head, dh:] = values.to(qkv.dtype)
        return qkv.view(output.shape)

    handle = lm.blocks()[layer].attention.query_key_value.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
