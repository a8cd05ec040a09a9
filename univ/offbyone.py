"""The `offbyone` stage: at which position does token B's information enter the model's memory?

Sequences: A at 0, B at 1, random filler, A again at the end; the corrupted run replaces B.
Mamba: in one layer, the last state is rebuilt by unrolling h_t = Ā_t h_{t−1} + B̄_t x_t with
only the write at position p taken from the corrupted run (p = 1..4), then read out at the last
position with every other layer's history clean. GPT-NeoX, the analogue: one head's keys and
values at position p taken from the corrupted run. The change of B's logit and probability per
p shows where B enters: in Mamba the study saw it at p = 2, one position late.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import torch

from . import models, patching
from .errors import UnivError
from .induction import CircuitConfig, CircuitResult, _batches, _Mean, _other, parse_head, result_path, run_induction, token_ids

POSITIONS = (1, 2, 3, 4)


def offbyone_data(lm: models.LM, cfg: CircuitConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    ids = token_ids(lm)
    n, T = cfg.n_seqs, cfg.seq_len
    x = ids[torch.randint(len(ids), (n, T), generator=g)]
    x[:, -1] = x[:, 0]
    x[:, 1] = _other(ids, x[:, 0], g)  # B differs from A
    corrupted = x.clone()
    corrupted[:, 1] = _other(ids, x[:, 1], g)
    return {"clean": x, "corrupted": corrupted, "b": x[:, 1], "s": torch.zeros(n, dtype=torch.long)}


def _top(result: CircuitResult, table: str) -> str:
    """The component whose patch moves p(B) most (either way: in a model that has not learned
    the task the sign of the change is noise)."""
    return max(result.rows[table], key=lambda r: abs(r["drop"]))["component"]


@torch.no_grad()
def run_offbyone(lm: models.LM, cfg: CircuitConfig, cache_dir, layer: str = "auto", force: bool = False) -> CircuitResult:
    from .induction import check

    check(cfg, lm, min_len=6)
    if lm.family == "mamba" and layer != "auto":
        try:
            chosen = int(layer)
        except ValueError:
            raise UnivError(f"--layer must be 'auto' or a layer number, not {layer!r}") from None
        if not 0 <= chosen < lm.n_layers:
            raise UnivError(f"layer {chosen} is out of range: the model has layers 0-{lm.n_layers - 1}")
    elif lm.family == "gpt_neox" and layer != "auto":
        raise UnivError("--layer is a Mamba option; for GPT-NeoX give --head L.H")
    path = result_path(cache_dir, lm, f"offbyone-{layer}", cfg)
    if path.is_file() and not force:
        return CircuitResult.load(path)
    # The layer or head is chosen by `induction` at its own sequence length, on as many sequences.
    ind_cfg = dataclasses.replace(cfg, seq_len=CircuitConfig.seq_len)
    data = offbyone_data(lm, cfg)
    T = cfg.seq_len
    means = _Mean()
    if lm.family == "mamba":
        chosen = int(layer) if layer != "auto" else int(_top(run_induction(lm, ind_cfg, cache_dir), "state->logit").split()[1])
        mixer = lm.model.backbone.layers[chosen].mixer
        component = f"layer {chosen}"
        for batch in _batches(data, cfg.batch, lm.device):
            clean = patching.mamba_trace(lm.model, batch["clean"], [T - 2, T - 1])
            corr = patching.mamba_trace(lm.model, batch["corrupted"], [])
            means.add("clean", clean.logits, batch["b"])
            decay, write = patching.writes(mixer, clean.traces[chosen])
            _, write_corr = patching.writes(mixer, corr.traces[chosen])
            for p in POSITIONS:
                w = write.clone()
                w[:, p] = write_corr[:, p]
                h = patching.rebuilt_last_state(decay, w)
                means.add(p, patching.last_position(lm.model, clean, chosen, state_last=h), batch["b"])
    else:
        head = parse_head(cfg.head, lm) if cfg.head else tuple(
            int(v) for v in _top(run_induction(lm, ind_cfg, cache_dir), "head->logit")[1:].split("H"))
        component = f"L{head[0]}H{head[1]} keys and values"
        for batch in _batches(data, cfg.batch, lm.device):
            means.add("clean", lm.logits(batch["clean"])[:, -1], batch["b"])
            for p in POSITIONS:
                pos = torch.full_like(batch["s"], p)
                kv = {}
                with patching.neox_keys_values(lm, head[0], head[1], pos, store=kv):
                    lm.logits(batch["corrupted"])
                with patching.neox_keys_values(lm, head[0], head[1], pos, values=kv["kv"]):
                    means.add(p, lm.logits(batch["clean"])[:, -1], batch["b"])
    clean_p, clean_logit = means.get("clean")
    result = CircuitResult("offbyone", lm.family, lm.source.name, {**asdict(cfg), "component": component},
                           clean_p, clean_logit)
    rows = []
    for p in POSITIONS:
        pp, lg = means.get(p)
        rows.append({"position": p, "component": component, "delta_logit_B": lg - clean_logit,
                     "delta_p_B": pp - clean_p})
    result.rows["write at position p corrupted"] = rows
    result.save(path)
    return result
