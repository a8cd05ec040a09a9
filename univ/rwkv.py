"""RWKV-4 for the circuit analyses: a clean run's trace, and the last position re-run with one
layer's WKV state, time-mix output or written keys and values patched.

A block at position t (transformers' RwkvBlock, block 0 first applying pre_ln to the stream):

    x = ln1(h)_t, x' = ln1(h)_{t−1}                                   token shift
    k, v, r = K(x·μk + x'·(1−μk)), V(x·μv + x'·(1−μv)), σ(R(x·μr + x'·(1−μr)))
    wkv_t = (S_{t−1} + e^{u+k_t} v_t) / (D_{t−1} + e^{u+k_t})          the state entering t, and t itself
    h += O(r ⊙ wkv_t);  then the channel mix on ln2(h) and its own shift

Only the last position is re-run: every earlier position of every layer is as in the clean run,
so the shifted inputs and the states entering the last position come from the trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .wkv import State, wkv


@dataclass
class Trace:
    """Per layer, what the last position needs from the clean run."""

    resid_in: list[torch.Tensor]
    """[B, D]: the stream entering the block at the last position (after block 0's pre_ln)."""
    ln1_prev: list[torch.Tensor]
    """[B, D]: ln1 of the stream at the position before (the time mix's shifted input)."""
    ln2_prev: list[torch.Tensor]
    """[B, D]: ln2 of the stream at the position before (the channel mix's shifted input)."""
    ln1: list[torch.Tensor]
    """[B, T, D]: ln1 of the stream at every position (for keys and values written earlier)."""
    state: list[State | None]
    """The WKV state entering the last position (after the one before it); None without ``states``."""
    wkv: list[torch.Tensor | None]
    """[B, C]: WKV at the last position; None without ``states``."""
    att: list[torch.Tensor]
    """[B, D]: the time mix's output at the last position."""
    logits: torch.Tensor
    """[B, vocab] at the last position."""


def key_value_receptance(att, x: torch.Tensor, shifted: torch.Tensor):
    """The time mix's k, v, r from its input and its shifted input (any shape [..., D])."""
    k = att.key(x * att.time_mix_key[0, 0] + shifted * (1 - att.time_mix_key[0, 0]))
    v = att.value(x * att.time_mix_value[0, 0] + shifted * (1 - att.time_mix_value[0, 0]))
    r = torch.sigmoid(att.receptance(x * att.time_mix_receptance[0, 0] + shifted * (1 - att.time_mix_receptance[0, 0])))
    return k, v, r


def shifted(x: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> the previous position's values (zeros at the first), as transformers' time_shift."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)


def keys_values(lm, layer: int, ln1: torch.Tensor, prev: torch.Tensor | None = None):
    """k, v [B, T, C] of a layer at every position from its ln1 inputs (``prev``: the shifted
    inputs, if not ln1's own previous position)."""
    att = lm.blocks()[layer].attention
    k, v, _ = key_value_receptance(att, ln1, shifted(ln1) if prev is None else prev)
    return k, v


def state_before_last(lm, layer: int, k: torch.Tensor, v: torch.Tensor) -> State:
    """The WKV state after the next-to-last position, from keys and values [B, T, C]."""
    att = lm.blocks()[layer].attention
    return wkv(att.time_decay, att.time_first, k[:, :-1], v[:, :-1])[1]


@torch.no_grad()
def trace(lm, tokens: torch.Tensor, states: bool = True) -> Trace:
    """``states``: also every layer's WKV state entering the last position and its WKV there (a
    pass of the recurrence per layer); without, those fields hold None."""
    blocks = lm.blocks()
    seen: dict = {}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.ln1.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("ln1", i), (a[0], o))))
        hooks.append(block.ln2.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("ln2", i), o)))
        hooks.append(block.attention.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("att", i), o[0])))
        for name in ("key", "value"):  # the keys and values the forward wrote, for the states below
            hooks.append(getattr(block.attention, name).register_forward_hook(
                lambda m, a, o, i=i, name=name: seen.__setitem__((name, i), o)))
    try:
        logits = lm.logits(tokens)[:, -1].float()
    finally:
        for h in hooks:
            h.remove()
    tr = Trace([], [], [], [], [], [], [], logits)
    for i, block in enumerate(blocks):
        resid, x = seen[("ln1", i)]
        k, v = seen[("key", i)], seen[("value", i)]
        state = state_before_last(lm, i, k, v) if states else None
        tr.resid_in.append(resid[:, -1])
        tr.ln1.append(x)
        tr.ln1_prev.append(x[:, -2])
        tr.ln2_prev.append(seen[("ln2", i)][:, -2])
        tr.state.append(state)
        tr.wkv.append(_wkv_last(block.attention, state, k[:, -1], v[:, -1]) if states else None)
        tr.att.append(seen[("att", i)][:, -1])
    return tr


def _wkv_last(att, state: State, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """WKV at one position from the state entering it: [B, C]."""
    return wkv(att.time_decay, att.time_first, k[:, None], v[:, None], state)[0][:, 0]


@torch.no_grad()
def last_position(lm, tr: Trace, layer: int, state: State | None = None, att_out: torch.Tensor | None = None,
                  freeze: str | None = None) -> torch.Tensor:
    """Logits [B, vocab] at the last position with layer ``layer`` patched: the WKV state entering
    the last position (``state``) or its time mix's output there (``att_out``). Layers from
    ``layer`` up are re-run at the last position; ``freeze`` keeps every other layer's 'wkv' or
    time-mix output ('att') at its clean value (the direct path), None recomputes them."""
    h = tr.resid_in[layer]
    for m in range(layer, lm.n_layers):
        block = lm.blocks()[m]
        att = block.attention
        if m == layer and att_out is not None:
            out = att_out
        elif m != layer and freeze == "att":
            out = tr.att[m]
        else:
            k, v, r = key_value_receptance(att, block.ln1(h), tr.ln1_prev[m])
            if m != layer and freeze == "wkv":
                w = tr.wkv[m]
            else:
                w = _wkv_last(att, state if m == layer and state is not None else tr.state[m], k, v)
            out = att.output((r * w).to(r.dtype))
        h = h + out
        ff = block.feed_forward
        x, prev = block.ln2(h), tr.ln2_prev[m]
        key = torch.square(torch.relu(ff.key(x * ff.time_mix_key[0, 0] + prev * (1 - ff.time_mix_key[0, 0]))))
        rec = torch.sigmoid(ff.receptance(x * ff.time_mix_receptance[0, 0] + prev * (1 - ff.time_mix_receptance[0, 0])))
        h = h + rec * ff.value(key)
        if lm._halved(m):
            h = h / 2
    return lm.model.head(lm.model.rwkv.ln_out(h)).float()
