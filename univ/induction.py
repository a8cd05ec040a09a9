"""The `induction` stage: path patching of the induction circuit, for Mamba and GPT-NeoX, with the
authors' definitions (github SmallMelon-L/Universality, circuit/induction) as the defaults.

Task (the study's): ``seq_len`` uniformly random token ids, no BOS; s < seq_len / 2; the last
token is A = x[s] again, and the correct next token is B = x[s+1]. Metric: p(B) and the logit of
B at the last position, averaged over the sequences; components are ranked by the drop in p(B).

Mamba, per layer (``effect='direct'``: every other layer keeps its clean last-position state,
resp. read-out; 'total': the layers above recompute theirs):
- state->logit: the state at the last position rebuilt from the state before it in a run where
  B was replaced (the corrupted history) and the clean current write;
- y->logit: the SSM read-out C·h at the last position (before the D skip and the gate) from a
  run without the repeated A;
- conv->state->logit (``conv_layers``): the conv output at s+1 or s+2 recomputed with one input
  taken from a run with s and s+1 replaced, that layer re-run over the whole sequence.
GPT-NeoX: head->logit (one head's output at the last position from a random-sequence run, the
other heads there frozen clean), then head->head into the induction head (an earlier head
patched at s+1 with the other heads there frozen, the induction head recomputed on that
residual and spliced into the clean run at the last position, the other heads there frozen).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from . import models, patching, rwkv
from .circuit import (CircuitConfig, CircuitResult, Means, NothingToFollow, batches, check, followed,
                      other_ids, parse_head, result_path, token_ids)
from .options import parse_layers
from .progress import bar as progress_bar

log = logging.getLogger("univ")


def induction_data(lm: models.LM, cfg: CircuitConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    ids = token_ids(lm)
    n, T = cfg.n_seqs, cfg.seq_len
    x = ids[torch.randint(len(ids), (n, T), generator=g)]
    s = torch.randint(0, T // 2, (n,), generator=g)
    rows = torch.arange(n)
    x[rows, -1] = x[rows, s]
    b = x[rows, s + 1]
    no_b = x.clone()
    no_b[rows, s + 1] = other_ids(ids, b, g)
    no_a = x.clone()
    no_a[rows, -1] = other_ids(ids, x[rows, -1], g)
    rand = ids[torch.randint(len(ids), (n, T), generator=g)]
    no_ab = no_b.clone()  # the conv analysis' corrupted run: A (at s) and B (at s+1) replaced
    no_ab[rows, s] = other_ids(ids, x[rows, s], g)
    return {"clean": x, "no_b": no_b, "no_a": no_a, "no_ab": no_ab, "random": rand, "s": s, "b": b}


def _state_table(result: CircuitResult, means: Means, cfg: CircuitConfig, n_layers: int, chance: float) -> list[int]:
    """Fill the state->logit table (Mamba, RWKV); return the layers its follow-up analysis looks
    into: --conv-layers, or the two largest drops."""
    result.clean["state->logit"] = means.clean("clean state", chance)
    result.rows["state->logit"] = means.rows([("state", i) for i in range(n_layers)],
                                             result.clean["state->logit"]["p_B"], lambda k: f"layer {k[1]}")
    if cfg.conv_layers != "auto":
        return parse_layers(cfg.conv_layers, n_layers)
    return [int(r["component"].split()[1]) for r in result.rows["state->logit"][:2]]


def _bar(total: int, desc: str, progress: bool):
    return progress_bar(total, desc, "seq", 0, progress)


@torch.no_grad()
def mamba_induction(lm: models.LM, cfg: CircuitConfig, progress: bool = True) -> CircuitResult:
    data = induction_data(lm, cfg)
    chance = 1 / len(token_ids(lm))
    model, T, L = lm.model, cfg.seq_len, lm.n_layers
    direct = cfg.effect == "direct"
    n_state = min(cfg.state_seqs or cfg.n_seqs, cfg.n_seqs)
    means = Means()
    result = CircuitResult("induction", "mamba", lm.source.name, dataclasses.asdict(cfg), 0.0, 0.0)
    with _bar(n_state + cfg.n_seqs, f"induction {lm.source.short_name}", progress) as bar:
        for batch in batches(data, cfg.batch, lm.device, limit=n_state):
            clean = patching.mamba_trace(model, batch["clean"], [T - 2, T - 1])
            no_b = patching.mamba_trace(model, batch["no_b"], [T - 2])
            ref = means.add("clean state", clean.logits, batch["b"])
            for layer in range(L):
                logits = patching.last_position(model, clean, layer, state_prev=patching.state_at(no_b.traces[layer], T - 2),
                                                 freeze="state" if direct else None)
                means.add(("state", layer), logits, batch["b"], ref)
            bar.update(len(batch["b"]))
        conv_layers = _state_table(result, means, cfg, L, chance)
        conv_keys = []
        for batch in batches(data, cfg.batch, lm.device):
            clean = patching.mamba_trace(model, batch["clean"], [T - 2, T - 1])
            no_a = patching.mamba_trace(model, batch["no_a"], [T - 1])
            no_ab = patching.mamba_trace(model, batch["no_ab"], [])
            ref = means.add("clean", clean.logits, batch["b"])
            for layer in range(L):
                logits = patching.last_position(model, clean, layer, y_ssm=patching.readout(no_a.traces[layer], T - 1),
                                                freeze="y" if direct else None)
                means.add(("y", layer), logits, batch["b"], ref)
            for layer in conv_layers:
                for key, logits in _conv_patches(model, clean, no_ab, layer, batch["s"], cfg):
                    means.add(key, logits, batch["b"], ref)
                    conv_keys += [key] if key not in conv_keys else []
            bar.update(len(batch["b"]))
    clean = result.clean["y->logit"] = result.clean["conv->state->logit"] = means.clean("clean", chance)
    result.clean_p, result.clean_logit = clean["p_B"], clean["logit_B"]
    result.rows["y->logit"] = means.rows([("y", i) for i in range(L)], clean["p_B"], lambda k: f"layer {k[1]}")
    result.rows["conv->state->logit"] = means.rows(conv_keys, clean["p_B"], _conv_label)
    return result


@torch.no_grad()
def rwkv_induction(lm: models.LM, cfg: CircuitConfig, progress: bool = True) -> CircuitResult:
    """RWKV, per layer, as for Mamba: state->logit (the WKV state entering the last position from
    the run without B; every other layer's WKV there frozen clean), time-mix->logit (the time mix's
    output at the last position from the run without the repeated A; every other layer's frozen
    clean), and, for the two largest state->logit drops (or --conv-layers), shift->state->logit:
    the write at s+1 or s+2 recomputed with one of its two inputs (the token-shifted one, or the
    position's own) from the run with s and s+1 replaced, the state rebuilt from there."""
    data = induction_data(lm, cfg)
    chance = 1 / len(token_ids(lm))
    L = lm.n_layers
    freeze = cfg.effect == "direct"
    n_state = min(cfg.state_seqs or cfg.n_seqs, cfg.n_seqs)
    means = Means()
    result = CircuitResult("induction", "rwkv", lm.source.name, dataclasses.asdict(cfg), 0.0, 0.0)
    with _bar(n_state + cfg.n_seqs, f"induction {lm.source.short_name}", progress) as bar:
        for batch in batches(data, cfg.batch, lm.device, limit=n_state):
            clean, no_b = rwkv.trace(lm, batch["clean"]), rwkv.trace(lm, batch["no_b"])
            ref = means.add("clean state", clean.logits, batch["b"])
            for layer in range(L):
                logits = rwkv.last_position(lm, clean, layer, state=no_b.state[layer], freeze="wkv" if freeze else None)
                means.add(("state", layer), logits, batch["b"], ref)
            bar.update(len(batch["b"]))
        shift_layers = _state_table(result, means, cfg, L, chance)
        shift_keys = [("shift", layer, off, which) for layer in shift_layers for off in (1, 2)
                      for which in ("shifted", "current")]
        for batch in batches(data, cfg.batch, lm.device):
            clean = rwkv.trace(lm, batch["clean"])
            no_a, no_ab = (rwkv.trace(lm, batch[k], states=False) for k in ("no_a", "no_ab"))
            ref = means.add("clean", clean.logits, batch["b"])
            for layer in range(L):
                logits = rwkv.last_position(lm, clean, layer, att_out=no_a.att[layer], freeze="att" if freeze else None)
                means.add(("att", layer), logits, batch["b"], ref)
            for key in shift_keys:
                state = _shift_patched_state(lm, clean, no_ab, key, batch["s"])
                logits = rwkv.last_position(lm, clean, key[1], state=state, freeze="wkv" if freeze else None)
                means.add(key, logits, batch["b"], ref)
            bar.update(len(batch["b"]))
    clean = result.clean["time-mix->logit"] = result.clean["shift->state->logit"] = means.clean("clean", chance)
    result.clean_p, result.clean_logit = clean["p_B"], clean["logit_B"]
    result.rows["time-mix->logit"] = means.rows([("att", i) for i in range(L)], clean["p_B"], lambda k: f"layer {k[1]}")
    result.rows["shift->state->logit"] = means.rows(shift_keys, clean["p_B"], _shift_label)
    return result


def _shift_label(key) -> str:
    _, layer, off, which = key
    source = f"s+{off - 1}" if which == "shifted" else f"s+{off}"
    return f"layer {layer}: write at s+{off}, its {which} input ({source}) corrupted"


def _shift_patched_state(lm, clean, corrupted, key, s: torch.Tensor):
    """The state entering the last position with the write at s+off recomputed from one input of
    the corrupted run: the token-shifted one (position s+off−1) or the position's own."""
    _, layer, off, which = key
    rows = torch.arange(len(s), device=s.device)
    x, xc = clean.ln1[layer], corrupted.ln1[layer]
    prev = rwkv.shifted(x)
    p = s + off
    if which == "shifted":
        prev[rows, p] = xc[rows, p - 1]
    else:
        x = x.clone()
        x[rows, p] = xc[rows, p]
    k, v = rwkv.keys_values(lm, layer, x, prev)
    return rwkv.state_before_last(lm, layer, k, v)


def _p_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1)[torch.arange(len(target), device=logits.device), target]


def _conv_label(key) -> str:
    _, layer, out_off, first, last = key
    inputs = f"input at s+{first}" if first == last else f"inputs at s+{first}..s+{last}"
    return f"layer {layer}: conv out at s+{out_off}, {inputs}"


def _conv_patches(model, clean, corrupted, layer: int, s: torch.Tensor, cfg: CircuitConfig):
    """(key, logits) per conv swap of ``layer``: the conv output at s+1 and at s+2 recomputed with
    its input at s+out, ..., s+1, s taken from the corrupted run in turn (one at a time, or, with
    conv_cumulative, each added to the ones before as in the authors' script)."""
    mixer = model.backbone.layers[layer].mixer
    tr, tr_c = clean.traces[layer], corrupted.traces[layer]
    K = mixer.conv1d.weight.shape[-1]
    rows = torch.arange(len(s), device=s.device)
    for out_off in (1, 2):
        out_pos = s + out_off
        window_pos = out_pos[:, None] - (K - 1) + torch.arange(K, device=s.device)  # [batch, K]
        valid = (window_pos >= 0)[..., None]
        window = tr.x[rows[:, None], window_pos.clamp_min(0)].float() * valid
        window_c = tr_c.x[rows[:, None], window_pos.clamp_min(0)].float() * valid
        swapped = torch.zeros(K, dtype=torch.bool, device=s.device)
        for in_off in range(out_off, max(-1, out_off - K), -1):
            if not cfg.conv_cumulative:
                swapped = torch.zeros_like(swapped)
            swapped[in_off - out_off + K - 1] = True
            xc = tr.xc.clone()
            xc[rows, out_pos] = patching.conv_at(mixer, torch.where(swapped[None, :, None], window_c, window)).to(xc.dtype)
            first = in_off
            last = out_off if cfg.conv_cumulative else in_off
            yield (("conv", layer, out_off, first, last),
                   patching.from_ssm_input(model, clean, layer, xc, freeze_states=cfg.effect == "direct"))


@torch.no_grad()
def neox_induction(lm: models.LM, cfg: CircuitConfig, progress: bool = True) -> CircuitResult:
    data = induction_data(lm, cfg)
    chance = 1 / len(token_ids(lm))
    L, H, T = lm.n_layers, lm.model.config.num_attention_heads, cfg.seq_len
    direct = cfg.effect == "direct"
    means = Means()
    bar = _bar(2 * cfg.n_seqs, f"induction {lm.source.short_name}", progress)
    with bar:
        for batch in batches(data, cfg.batch, lm.device):
            last = torch.full_like(batch["s"], T - 1)
            with patching.neox_heads(lm, capture={layer: last for layer in range(L)}) as z_clean:
                ref = means.add("clean", lm.logits(batch["clean"])[:, -1], batch["b"])
            with patching.neox_heads(lm, capture={layer: last for layer in range(L)}) as z_rand:
                lm.logits(batch["random"])
            freeze = {layer: (last, z_clean[layer]) for layer in range(L)} if direct else None
            for layer in range(L):
                for head in range(H):
                    with patching.neox_heads(lm, patch={(layer, head): (last, z_rand[layer][:, head])}, freeze=freeze):
                        means.add((layer, head), lm.logits(batch["clean"])[:, -1], batch["b"], ref)
            bar.update(len(batch["b"]))
        clean = means.clean("clean", chance)
        result = CircuitResult("induction", "gpt_neox", lm.source.name, dataclasses.asdict(cfg), clean["p_B"],
                               clean["logit_B"], clean={"head->logit": clean})
        result.rows["head->logit"] = means.rows([(l, h) for l in range(L) for h in range(H)], clean["p_B"],
                                                lambda k: f"L{k[0]}H{k[1]}")
        if cfg.head:
            ind = parse_head(cfg.head, lm)
        else:
            try:
                top = followed(result, "head->logit")
            except NothingToFollow as e:  # still computed, but the table's head is not an induction head
                later = [r for r in result.rows["head->logit"] if not r["component"].startswith("L0H")]
                top = max(later, key=lambda r: r["drop"])["component"]
                log.warning("%s: %s; K-composition is computed into %s, the largest drop, which is noise",
                            lm.source.name, e.args[0].split("; give")[0], top)
            ind = tuple(int(v) for v in top[1:].split("H"))
        comp = Means()
        for batch in batches(data, cfg.batch, lm.device):
            last, s1 = torch.full_like(batch["s"], T - 1), batch["s"] + 1
            earlier = range(ind[0])
            with patching.neox_heads(lm, capture={layer: s1 for layer in earlier}) as z_rand:
                lm.logits(batch["random"])
            with patching.neox_heads(lm, capture={layer: s1 for layer in earlier}) as z_clean_s1:
                lm.logits(batch["clean"])
            with patching.neox_heads(lm, capture={layer: last for layer in range(L)}) as z_clean:
                ref = _p_of(lm.logits(batch["clean"])[:, -1], batch["b"])
            freeze_s1 = {layer: (s1, z_clean_s1[layer]) for layer in earlier} if direct else None
            freeze_last = {layer: (last, z_clean[layer]) for layer in range(L)} if direct else None
            for layer in earlier:
                for head in range(H):
                    with patching.neox_heads(lm, capture={ind[0]: last}, patch={(layer, head): (s1, z_rand[layer][:, head])},
                                             freeze=freeze_s1) as z_ind:
                        lm.logits(batch["clean"])
                    with patching.neox_heads(lm, patch={ind: (last, z_ind[ind[0]][:, ind[1]])}, freeze=freeze_last):
                        comp.add((layer, head), lm.logits(batch["clean"])[:, -1], batch["b"], ref)
            bar.update(len(batch["b"]))
    name = f"head->L{ind[0]}H{ind[1]} (K-composition)"
    result.clean[name] = clean
    result.rows[name] = comp.rows([(l, h) for l in range(ind[0]) for h in range(H)], clean["p_B"],
                                  lambda k: f"L{k[0]}H{k[1]}")
    return result


def induction_path(cache_dir, lm: models.LM, cfg: CircuitConfig):
    return result_path(cache_dir, lm, "induction", dataclasses.replace(cfg, swap_decay=False))


def run_induction(lm: models.LM, cfg: CircuitConfig, cache_dir, force: bool = False,
                  progress: bool = True) -> CircuitResult:
    check(cfg, lm)
    path = induction_path(cache_dir, lm, cfg)
    if not force and (saved := CircuitResult.load(path)) is not None:
        return saved
    run = {"mamba": mamba_induction, "rwkv": rwkv_induction, "gpt_neox": neox_induction}[lm.family]
    result = run(lm, cfg, progress)
    result.save(path)
    return result
