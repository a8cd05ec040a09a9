"""Activation and path patching helpers shared by the circuit analyses.

Mamba: a traced forward (every layer's conv input and output, Δ, B, C, gate, y and the states
at chosen positions); a last-position step that re-runs only the final position through the
layers above a patched component while every layer's history (its conv window and its state at
the previous position) stays clean, each layer above keeping its clean last state or read-out
when asked (the authors' direct paths); and a whole-sequence re-run from a patched SSM input.

GPT-NeoX: hooks that read, freeze or replace heads' outputs (the input of attention.dense) or
one head's keys and values (the output of query_key_value) at per-sequence positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mamba import MixerTrace, block_forward, residual_of, ssm_forward


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
    return MambaRun(tokens, resid_in, traces, _logits(model, hidden[:, -1]))


def _logits(model, last_hidden: torch.Tensor) -> torch.Tensor:
    norm_f = model.backbone.norm_f
    return model.lm_head(norm_f(last_hidden.to(norm_f.weight.dtype))).float()


def delta_and_A(mixer, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ [.., E], A [E, N]) from the raw dt_proj output."""
    delta = F.softplus(dt_raw.float() + mixer.dt_proj.bias.float())
    return delta, -torch.exp(mixer.A_log.float())


def state_at(trace: MixerTrace, pos: int) -> torch.Tensor:
    """h at a traced position, float32 [batch, E, N]."""
    return trace.states[:, trace.state_positions.index(pos)].float()


def readout(trace: MixerTrace, pos: int) -> torch.Tensor:
    """The SSM read-out C·h at a traced position, before the D skip and the gate: float32 [batch, E]."""
    return (state_at(trace, pos) * trace.C[:, pos, None, :].float()).sum(-1)


def conv_at(mixer, window: torch.Tensor) -> torch.Tensor:
    """SiLU(conv) at one position from its input window [batch, K, E] (oldest first), float32."""
    xc = (window.float() * mixer.conv1d.weight.squeeze(1).float().T).sum(1)
    if mixer.conv1d.bias is not None:
        xc = xc + mixer.conv1d.bias.float()
    return F.silu(xc)


FREEZES = ("state", "y")


@torch.no_grad()
def last_position(model, clean: MambaRun, layer: int, state_prev=None, state_last=None, y_ssm=None,
                  freeze: str | None = None) -> torch.Tensor:
    """Logits at the last position when, in ``layer``, the state entering the last position
    (``state_prev``), the state at the last position (``state_last``) or the SSM read-out C·h there
    (``y_ssm``, before the D skip and the gate) is replaced.

    The layers above re-run the last position on their clean histories (conv window, state at
    the previous position). ``freeze`` is what each of them keeps from the clean run there:
    'state' its last state h (C, the D skip and the gate recomputed), 'y' its read-out C·h (the
    D skip and the gate recomputed), None nothing (the total effect). Returns float32 [batch, vocab]."""
    backbone = model.backbone
    T = clean.tokens.shape[1]
    hidden = clean.resid_in[layer][:, -1]
    for i in range(layer, len(backbone.layers)):
        block, tr = backbone.layers[i], clean.traces[i]
        mixer = block.mixer
        u = block.norm(hidden.to(block.norm.weight.dtype))
        E, R, N = mixer.intermediate_size, mixer.time_step_rank, mixer.ssm_state_size
        xz = F.linear(u, mixer.in_proj.weight, mixer.in_proj.bias)
        x, z = xz[..., :E], xz[..., E:]
        K = mixer.conv1d.weight.shape[-1]
        xc = conv_at(mixer, torch.cat([tr.x[:, T - K:T - 1], x[:, None]], 1))  # clean history, new last input
        dbl = F.linear(xc.to(mixer.x_proj.weight.dtype), mixer.x_proj.weight).float()
        dt, Bv, Cv = dbl[..., :R], dbl[..., R:R + N], dbl[..., R + N:]
        delta, A = delta_and_A(mixer, F.linear(dt.to(mixer.dt_proj.weight.dtype), mixer.dt_proj.weight))
        here, above = i == layer, i > layer
        if here and y_ssm is not None:
            read = y_ssm.float()
        elif above and freeze == "y":
            read = readout(tr, T - 1)
        else:
            if here and state_last is not None:
                h = state_last.float()
            elif above and freeze == "state":
                h = state_at(tr, T - 1)
            else:
                h_prev = state_prev.float() if here and state_prev is not None else state_at(tr, T - 2)
                h = torch.exp(delta[..., None] * A) * h_prev + (delta * xc)[..., None] * Bv[:, None, :]
            read = (h * Cv[:, None, :]).sum(-1)
        y = (read + mixer.D.float() * xc) * F.silu(z.float())
        hidden = residual_of(block, hidden) + F.linear(y.to(mixer.out_proj.weight.dtype), mixer.out_proj.weight,
                                                      mixer.out_proj.bias)
    return _logits(model, hidden)


@torch.no_grad()
def from_ssm_input(model, clean: MambaRun, layer: int, xc: torch.Tensor, freeze_states: bool) -> torch.Tensor:
    """Logits at the last position when ``layer``'s SSM input (SiLU of its conv output) is ``xc``
    [batch, pos, E] and everything from that layer up is recomputed over the whole sequence;
    with ``freeze_states`` every layer above keeps its clean last state h (as the authors'
    conv_to_state_to_logit.py)."""
    backbone = model.backbone
    T = clean.tokens.shape[1]
    block, tr = backbone.layers[layer], clean.traces[layer]
    y = ssm_forward(block.mixer, xc.to(tr.xc.dtype), tr.gate)
    hidden = residual_of(block, clean.resid_in[layer]) + F.linear(
        y.to(block.mixer.out_proj.weight.dtype), block.mixer.out_proj.weight, block.mixer.out_proj.bias)
    for i in range(layer + 1, len(backbone.layers)):
        frozen = state_at(clean.traces[i], T - 1) if freeze_states else None
        hidden = block_forward(backbone.layers[i], hidden, last_state=frozen)
    return _logits(model, hidden[:, -1])


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
def neox_heads(lm, capture: dict | None = None, patch: dict | None = None, freeze: dict | None = None):
    """Read and replace per-head attention outputs (the input of attention.dense).

    ``capture``: {layer: positions [batch]}; the dict yielded holds, after the forward,
    {layer: z at those positions [batch, heads, d_head]} (as the layer computed it, before any
    replacement). ``freeze``: {layer: (positions [batch], values [batch, heads, d_head])} sets
    every head's output there; ``patch``: {(layer, head): (positions [batch], values [batch,
    d_head])} then replaces one head's output."""
    handles, out = [], {}
    cfg = lm.model.config
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H
    capture = capture or {}
    patch = patch or {}
    freeze = freeze or {}
    layers = set(capture) | set(freeze) | {layer for layer, _ in patch}
    for layer in layers:
        def pre(module, args, layer=layer):
            z = args[0]
            if layer in capture:
                pos = capture[layer]
                out[layer] = z[_rows(pos), pos].view(len(pos), H, dh).clone()
            mods = [(h, p) for (lay, h), p in patch.items() if lay == layer]
            if not mods and layer not in freeze:
                return None
            z = z.clone()
            if layer in freeze:
                pos, values = freeze[layer]
                z[_rows(pos), pos] = values.reshape(len(pos), H * dh).to(z.dtype)
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
