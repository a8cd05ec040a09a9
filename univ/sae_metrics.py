"""Held-out quality of an SAE: L0, explained variance, dead fraction, and LM loss recovered with
the reconstruction spliced into the model."""

from __future__ import annotations

import torch

from . import models
from .errors import UnivError
from .sae import SAE
from .store import Store


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch: int = 4096) -> dict:
    """L0, explained variance and dead fraction on held-out raw activations."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    l0 = sq_err = 0.0
    n = len(x)
    mean = x.float().mean(0)
    total_var = (x.float() - mean).pow(2).sum().item()
    for b in range(0, n, batch):
        xb = x[b:b + batch].float()
        f = sae.encode(xb)
        x_hat = sae.decode(f, sae.scale(xb))
        active = f > 0
        fired |= active.any(0)
        l0 += active.sum().item()
        sq_err += (x_hat - xb).pow(2).sum().item()
    return {"l0": l0 / n, "explained_variance": 1 - sq_err / max(total_var, 1e-12),
            "dead_fraction": 1 - fired.float().mean().item(), "eval_rows": n}


@torch.no_grad()
def loss_recovered(lm: models.LM, layer: int, reconstruct, tstore: Store, n_eval: int,
                   n_contexts: int) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean) on held-out contexts: the last contexts of the
    token store whose kept tokens all lie in the held-out rows."""
    tokens, mask = _held_out_contexts(tstore, n_eval, n_contexts)
    tokens, mask = tokens.to(lm.device).long(), mask.to(lm.device)
    target = mask[:, :-1] & mask[:, 1:]  # predict kept tokens from kept positions

    def ce(replace=None) -> float:
        logits = lm.logits(tokens, {layer: replace} if replace else None)[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits[target], tokens[:, 1:][target])
        return loss.item()

    def splice(fn):
        def replace(h):
            out = h.clone()
            out[mask] = fn(h[mask]).to(h.dtype)
            return out
        return replace

    clean = ce()
    with_sae = ce(splice(reconstruct))
    zero = ce(splice(torch.zeros_like))
    return (zero - with_sae) / (zero - clean) if zero != clean else float("nan")


def _held_out_contexts(tstore: Store, n_eval: int, n_contexts: int) -> tuple[torch.Tensor, torch.Tensor]:
    toks, masks, kept = [], [], 0
    for index in sorted(tstore.chunks, reverse=True):
        chunk = tstore.read_chunk(index)
        for t, m in zip(chunk["tokens"].flip(0), chunk["mask"].flip(0)):
            if kept + int(m.sum()) > n_eval or len(toks) == n_contexts:
                return _stack(toks, masks)
            kept += int(m.sum())
            toks.append(t)
            masks.append(m)
    return _stack(toks, masks)


def _stack(toks, masks):
    if not toks:
        raise UnivError("no whole context lies in the held-out rows; raise --sae-eval-tokens")
    return torch.stack(toks), torch.stack(masks)


def spliced(sae: SAE, centred: bool):
    """What loss recovered splices into the model: the reconstruction, of the stream minus its
    per-token mean when the SAE was trained on centred streams (a LayerNorm model cannot see it)."""
    if not centred:
        return sae.reconstruct
    return lambda h: sae.reconstruct(h - h.mean(-1, keepdim=True))
