"""The `offbyone` stage: at which position does token B's information enter the model's memory?

Sequences: A at 0, B at 1, random filler, A again at the end; the corrupted run replaces B.
Mamba: in one layer, the last state is rebuilt by unrolling h_t = Ā_t h_{t−1} + B̄_t x_t with
only the write at position p taken from the corrupted run (p = 1..4), then read out at the last
position with every other layer's history clean and (effect 'direct', the authors') every other
layer's last state frozen clean. ``swap_decay`` also takes Ā from the corrupted run, at p + 1, as
the authors' notebook did (an indexing quirk: it changes which decay multiplies the old state).
RWKV, as for Mamba: the state entering the last position rebuilt with only the write at p (its
key and value) from the corrupted run. GPT-NeoX, the analogue: one head's keys and values at
position p taken from the corrupted run.
The change of B's logit and probability per p shows where B enters: in Mamba the study saw it
at p = 2, one position late.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch

from . import models, patching, rwkv
from .circuit import (CircuitConfig, CircuitResult, Means, batches, check, followed, other_ids, parse_head,
                      result_path, token_ids)
from .errors import UnivError
from .induction import induction_path, run_induction

POSITIONS = (1, 2, 3, 4)
TABLE = "write at position p corrupted"


def offbyone_data(lm: models.LM, cfg: CircuitConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    ids = token_ids(lm)
    n, T = cfg.n_seqs, cfg.seq_len
    x = ids[torch.randint(len(ids), (n, T), generator=g)]
    x[:, -1] = x[:, 0]
    x[:, 1] = other_ids(ids, x[:, 0], g)  # B differs from A
    corrupted = x.clone()
    corrupted[:, 1] = other_ids(ids, x[:, 1], g)
    return {"clean": x, "corrupted": corrupted, "b": x[:, 1]}


def default_induction(cfg: CircuitConfig, n_seqs: int | None = None, state_seqs: int | None = None) -> CircuitConfig:
    """The induction run whose component offbyone follows: `univ induction`'s (its sequence count
    and length unless given) with the same seed, batch, device, dtype and effect."""
    return dataclasses.replace(cfg, n_seqs=n_seqs or CircuitConfig.n_seqs, state_seqs=state_seqs,
                               seq_len=CircuitConfig.seq_len, head=None, swap_decay=False)


def _follows(lm: models.LM, cfg: CircuitConfig, layer: str) -> bool:
    """Whether the component comes from an induction run (neither --layer nor --head given)."""
    return layer == "auto" and not (lm.family == "gpt_neox" and cfg.head)


def offbyone_path(cache_dir, lm: models.LM, cfg: CircuitConfig, layer: str = "auto",
                  induction: CircuitConfig | None = None) -> Path:
    """Where run_offbyone keeps its result; keyed by the induction run it follows, if it does."""
    ind = induction_path(cache_dir, lm, induction or default_induction(cfg)).name if _follows(lm, cfg, layer) else None
    return result_path(cache_dir, lm, f"offbyone-{layer}", cfg, **({"induction": ind} if ind else {}))


@torch.no_grad()
def run_offbyone(lm: models.LM, cfg: CircuitConfig, cache_dir, layer: str = "auto", force: bool = False,
                 induction: CircuitConfig | None = None, progress: bool = True) -> CircuitResult:
    """``induction``: the induction settings whose top component is followed when ``layer`` (or
    ``cfg.head``) is not given (default: ``default_induction(cfg)``)."""
    check(cfg, lm, min_len=6)
    if lm.family in ("mamba", "rwkv") and layer != "auto":
        try:
            chosen = int(layer)
        except ValueError:
            raise UnivError(f"--layer must be 'auto' or a layer number, not {layer!r}") from None
        if not 0 <= chosen < lm.n_layers:
            raise UnivError(f"layer {chosen} is out of range: the model has layers 0-{lm.n_layers - 1}")
    elif lm.family == "gpt_neox" and layer != "auto":
        raise UnivError("--layer is a Mamba and RWKV option; for GPT-NeoX give --head L.H")
    ind_cfg = induction or default_induction(cfg)
    follows = _follows(lm, cfg, layer)
    path = offbyone_path(cache_dir, lm, cfg, layer, induction)
    if not force and (saved := CircuitResult.load(path)) is not None:
        return saved
    data = offbyone_data(lm, cfg)
    T = cfg.seq_len
    means = Means()
    if lm.family == "mamba":
        chosen = int(followed(run_induction(lm, ind_cfg, cache_dir, progress=progress), "state->logit").split()[1]) \
            if follows else int(layer)
        mixer = lm.model.backbone.layers[chosen].mixer
        component = f"layer {chosen}"
        freeze = "state" if cfg.effect == "direct" else None
        for batch in batches(data, cfg.batch, lm.device):
            clean = patching.mamba_trace(lm.model, batch["clean"], [T - 2, T - 1])
            corr = patching.mamba_trace(lm.model, batch["corrupted"], [])
            ref = means.add("clean", clean.logits, batch["b"])
            decay, write = patching.writes(mixer, clean.traces[chosen])
            decay_corr, write_corr = patching.writes(mixer, corr.traces[chosen])
            for p in POSITIONS:
                d, w = decay.clone(), write.clone()
                w[:, p] = write_corr[:, p]
                if cfg.swap_decay:
                    d[:, p] = decay_corr[:, p + 1]
                h = patching.rebuilt_last_state(d, w)
                means.add(p, patching.last_position(lm.model, clean, chosen, state_last=h, freeze=freeze), batch["b"],
                          ref)
    elif lm.family == "rwkv":
        chosen = int(followed(run_induction(lm, ind_cfg, cache_dir, progress=progress), "state->logit").split()[1]) \
            if follows else int(layer)
        component = f"layer {chosen}"
        for batch in batches(data, cfg.batch, lm.device):
            clean, corr = rwkv.trace(lm, batch["clean"]), rwkv.trace(lm, batch["corrupted"], states=False)
            ref = means.add("clean", clean.logits, batch["b"])
            k, v = rwkv.keys_values(lm, chosen, clean.ln1[chosen])
            k_c, v_c = rwkv.keys_values(lm, chosen, corr.ln1[chosen])
            for p in POSITIONS:
                kp, vp = k.clone(), v.clone()
                kp[:, p], vp[:, p] = k_c[:, p], v_c[:, p]
                state = rwkv.state_before_last(lm, chosen, kp, vp)
                means.add(p, rwkv.last_position(lm, clean, chosen, state=state,
                                                 freeze="wkv" if cfg.effect == "direct" else None), batch["b"], ref)
    else:
        head = parse_head(cfg.head, lm) if cfg.head else tuple(
            int(v) for v in followed(run_induction(lm, ind_cfg, cache_dir, progress=progress), "head->logit")[1:].split("H"))
        component = f"L{head[0]}H{head[1]} keys and values"
        for batch in batches(data, cfg.batch, lm.device):
            ref = means.add("clean", lm.logits(batch["clean"])[:, -1], batch["b"])
            for p in POSITIONS:
                pos = torch.full_like(batch["b"], p)
                kv = {}
                with patching.neox_keys_values(lm, head[0], head[1], pos, store=kv):
                    lm.logits(batch["corrupted"])
                with patching.neox_keys_values(lm, head[0], head[1], pos, values=kv["kv"]):
                    means.add(p, lm.logits(batch["clean"])[:, -1], batch["b"], ref)
    clean = means.clean("clean", 1 / len(token_ids(lm)))
    result = CircuitResult("offbyone", lm.family, lm.source.name, {**asdict(cfg), "component": component},
                           clean["p_B"], clean["logit_B"], clean={TABLE: clean})
    rows = []
    for p in POSITIONS:
        pp, lg = means.get(p)
        rows.append({"position": p, "component": component, "delta_logit_B": lg - clean["logit_B"],
                     "delta_p_B": pp - clean["p_B"], "delta_p_B_ci": means.half_width(p)})
    result.rows[TABLE] = rows
    result.save(path)
    return result
