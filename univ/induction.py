"""The `induction` stage: path patching of the induction circuit, for Mamba and GPT-NeoX.

Task (the study's): ``seq_len`` uniformly random token ids, no BOS; s < seq_len / 2; the last
token is A = x[s] again, and the correct next token is B = x[s+1]. Metric: p(B) and the logit of
B at the last position, averaged over the sequences; components are ranked by the drop in p(B).

Mamba, per layer: state→logit (the state entering the last position taken from a run where B
was replaced, the last write clean, every other layer's history clean) and y→logit (the SSM
output at the last position taken from a run without the repeated A); then, for the top
layers, conv→state→logit (the conv output at s+1 or s+2 recomputed with one of its inputs taken
from a random-sequence run). GPT-NeoX: head→logit (one head's output at the last position from
a random-sequence run), then head→head into the top induction head (an earlier head's output
at s+1 from the random-sequence run, the induction head recomputed, its output spliced into the
clean run at the last position).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models, patching
from .errors import UnivError
from .store import config_key


@dataclass
class CircuitConfig:
    """Options shared by `induction` and `offbyone`."""

    n_seqs: int = 256
    """Sequences averaged over."""
    seq_len: int = 64
    """Tokens per sequence (induction: 64; offbyone: 129)."""
    seed: int = 0
    """Seed of the random sequences."""
    batch: int = 64
    """Sequences per forward pass."""
    device: str = "auto"
    dtype: str = "fp32"
    """Circuits run in float32 by default: Mamba's logits are ~64 and bf16 would blur p(B)."""
    top_layers: int | None = None
    """Mamba only: layers (by state→logit drop) that get the conv→state→logit analysis (default 2)."""
    head: str | None = None
    """GPT-NeoX only: the induction head 'L.H' for head→head (default: the top head→logit)."""


@dataclass
class CircuitResult:
    experiment: str
    family: str
    model: str
    config: dict
    clean_p: float
    clean_logit: float
    rows: dict[str, list[dict]] = field(default_factory=dict)
    """Per analysis, one row per component: p_B, logit_B, drop (clean p − patched p)."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(asdict(self), indent=1) + "\n")
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, path: Path) -> CircuitResult:
        return cls(**json.loads(path.read_text()))


def check(cfg: CircuitConfig, lm: models.LM, min_len: int = 4) -> None:
    if cfg.seq_len < min_len:
        raise UnivError(f"--seq-len must be at least {min_len}, not {cfg.seq_len}")
    if cfg.n_seqs < 1:
        raise UnivError(f"--n-seqs must be at least 1, not {cfg.n_seqs}")
    if lm.family == "mamba" and cfg.head is not None:
        raise UnivError("--head is a GPT-NeoX option (attention heads); Mamba has none")
    if lm.family == "gpt_neox" and cfg.top_layers is not None:
        raise UnivError("--top-layers is a Mamba option (conv→state analysis); GPT-NeoX has no conv")
    if lm.source.max_ctx is not None and cfg.seq_len > lm.source.max_ctx:
        raise UnivError(f"--seq-len {cfg.seq_len} is beyond the model's limit of {lm.source.max_ctx}")


def token_ids(lm: models.LM) -> torch.Tensor:
    """Ids the random sequences draw from: the tokenizer's, minus special tokens."""
    n = min(len(lm.tokenizer), lm.model.config.vocab_size)
    special = set(lm.tokenizer.all_special_ids)
    return torch.tensor([i for i in range(n) if i not in special])


def _other(ids: torch.Tensor, avoid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random id per row, different from ``avoid``."""
    out = ids[torch.randint(len(ids), avoid.shape, generator=g)]
    clash = out == avoid
    while clash.any():
        out[clash] = ids[torch.randint(len(ids), (int(clash.sum()),), generator=g)]
        clash = out == avoid
    return out


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
    no_b[rows, s + 1] = _other(ids, b, g)
    no_a = x.clone()
    no_a[rows, -1] = _other(ids, x[rows, -1], g)
    rand = ids[torch.randint(len(ids), (n, T), generator=g)]
    return {"clean": x, "no_b": no_b, "no_a": no_a, "random": rand, "s": s, "b": b}


def _p_and_logit(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(len(target), device=logits.device)
    logits = logits.float()
    return F.softmax(logits, -1)[rows, target], logits[rows, target]


class _Mean:
    """Running means of p(B) and logit(B) over batches, per component."""

    def __init__(self):
        self.sums: dict = {}

    def add(self, key, logits, target):
        p, lg = _p_and_logit(logits, target)
        s = self.sums.setdefault(key, [0.0, 0.0, 0])
        s[0] += p.sum().item()
        s[1] += lg.sum().item()
        s[2] += len(p)

    def get(self, key) -> tuple[float, float]:
        s = self.sums[key]
        return s[0] / s[2], s[1] / s[2]


def _batches(data: dict, size: int, device):
    n = len(data["s"])
    for lo in range(0, n, size):
        yield {k: v[lo:lo + size].to(device) for k, v in data.items()}


def _rows(means: _Mean, keys, clean_p: float, label) -> list[dict]:
    rows = []
    for key in keys:
        p, lg = means.get(key)
        rows.append({"component": label(key), "p_B": p, "logit_B": lg, "drop": clean_p - p})
    return sorted(rows, key=lambda r: -r["drop"])


@torch.no_grad()
def mamba_induction(lm: models.LM, cfg: CircuitConfig) -> CircuitResult:
    data = induction_data(lm, cfg)
    model, T, L = lm.model, cfg.seq_len, lm.n_layers
    means = _Mean()
    runs = []
    for batch in _batches(data, cfg.batch, lm.device):
        clean = patching.mamba_trace(model, batch["clean"], [T - 2, T - 1])
        no_b = patching.mamba_trace(model, batch["no_b"], [T - 2])
        no_a = patching.mamba_trace(model, batch["no_a"], [])
        means.add("clean", clean.logits, batch["b"])
        for layer in range(L):
            prev = no_b.traces[layer].states[:, 0]
            means.add(("state", layer), patching.last_position(model, clean, layer, state_prev=prev), batch["b"])
            means.add(("y", layer), patching.last_position(model, clean, layer, y_last=no_a.traces[layer].y[:, -1]),
                      batch["b"])
        runs.append(batch)
    clean_p, clean_logit = means.get("clean")
    result = CircuitResult("induction", "mamba", lm.source.name, asdict(cfg), clean_p, clean_logit)
    result.rows["state->logit"] = _rows(means, [("state", i) for i in range(L)], clean_p, lambda k: f"layer {k[1]}")
    result.rows["y->logit"] = _rows(means, [("y", i) for i in range(L)], clean_p, lambda k: f"layer {k[1]}")
    top = [int(r["component"].split()[1]) for r in result.rows["state->logit"][: cfg.top_layers or 2]]
    conv = _Mean()
    K = model.backbone.layers[0].mixer.conv1d.weight.shape[-1]
    for batch in runs:
        # Traced again rather than kept from the first pass: all layers' traces of every batch
        # would not fit in memory at the study's sizes, and the top layers are known only now.
        clean = patching.mamba_trace(model, batch["clean"], [T - 2, T - 1])
        rand = patching.mamba_trace(model, batch["random"], [])
        for layer in top:
            for out_off in (1, 2):
                for j in range(K):
                    in_off = out_off - (K - 1) + j
                    h = _conv_patched_state(model, clean, rand, layer, batch["s"] + out_off, batch["s"] + in_off)
                    conv.add((layer, out_off, in_off), patching.last_position(model, clean, layer, state_last=h),
                             batch["b"])
    keys = [(layer, o, o - (K - 1) + j) for layer in top for o in (1, 2) for j in range(K)]
    result.rows["conv->state->logit"] = _rows(
        conv, keys, clean_p, lambda k: f"layer {k[0]}: conv out at s{k[1]:+d}, input at s{k[2]:+d}")
    return result


def _conv_patched_state(model, clean, rand, layer: int, out_pos: torch.Tensor, in_pos: torch.Tensor) -> torch.Tensor:
    """The last state of ``layer`` when the conv output at out_pos (per row) is recomputed with
    its input at in_pos taken from the random-sequence run."""
    mixer = model.backbone.layers[layer].mixer
    tr, tr_r = clean.traces[layer], rand.traces[layer]
    rows = torch.arange(len(out_pos), device=out_pos.device)
    K = mixer.conv1d.weight.shape[-1]
    window_pos = out_pos[:, None] - (K - 1) + torch.arange(K, device=out_pos.device)  # [b, K]
    valid = window_pos >= 0
    window = tr.x[rows[:, None], window_pos.clamp_min(0)].float() * valid[..., None]
    swap = window_pos == in_pos[:, None]
    window = torch.where(swap[..., None], tr_r.x[rows[:, None], window_pos.clamp_min(0)].float(), window)
    xc = (window * mixer.conv1d.weight.squeeze(1).float().T).sum(1)
    if mixer.conv1d.bias is not None:
        xc = xc + mixer.conv1d.bias.float()
    xc = F.silu(xc)
    R, N = mixer.time_step_rank, mixer.ssm_state_size
    dbl = F.linear(xc.to(mixer.x_proj.weight.dtype), mixer.x_proj.weight).float()
    dt = F.linear(dbl[..., :R].to(mixer.dt_proj.weight.dtype), mixer.dt_proj.weight)
    decay, write = patching.writes(mixer, tr)
    delta, A = patching.delta_and_A(mixer, dt)
    decay[rows, out_pos] = torch.exp(delta[..., None] * A)
    write[rows, out_pos] = (delta * xc)[..., None] * dbl[..., R:R + N][:, None, :]
    return patching.rebuilt_last_state(decay, write)


def parse_head(text: str, lm: models.LM) -> tuple[int, int]:
    try:
        layer, head = (int(v) for v in text.split("."))
    except ValueError:
        raise UnivError(f"--head must look like 5.0 (layer.head), not {text!r}") from None
    H = lm.model.config.num_attention_heads
    if not (0 <= layer < lm.n_layers and 0 <= head < H):
        raise UnivError(f"head {text} is out of range: layers 0-{lm.n_layers - 1}, heads 0-{H - 1}")
    return layer, head


@torch.no_grad()
def neox_induction(lm: models.LM, cfg: CircuitConfig) -> CircuitResult:
    data = induction_data(lm, cfg)
    L, H, T = lm.n_layers, lm.model.config.num_attention_heads, cfg.seq_len
    means = _Mean()
    last = lambda b: torch.full_like(b["s"], T - 1)  # noqa: E731
    for batch in _batches(data, cfg.batch, lm.device):
        means.add("clean", lm.logits(batch["clean"])[:, -1], batch["b"])
        with patching.neox_heads(lm, capture={layer: last(batch) for layer in range(L)}) as z_rand:
            lm.logits(batch["random"])
        for layer in range(L):
            for head in range(H):
                with patching.neox_heads(lm, patch={(layer, head): (last(batch), z_rand[layer][:, head])}):
                    means.add((layer, head), lm.logits(batch["clean"])[:, -1], batch["b"])
    clean_p, clean_logit = means.get("clean")
    result = CircuitResult("induction", "gpt_neox", lm.source.name, asdict(cfg), clean_p, clean_logit)
    result.rows["head->logit"] = _rows(means, [(l, h) for l in range(L) for h in range(H)], clean_p,
                                       lambda k: f"L{k[0]}H{k[1]}")
    if cfg.head:
        ind = parse_head(cfg.head, lm)
    else:
        later = [r for r in result.rows["head->logit"] if not r["component"].startswith("L0H")]
        top = max(later, key=lambda r: abs(r["drop"]))  # the head whose patch moves p(B) most
        ind = tuple(int(v) for v in top["component"][1:].split("H"))
    comp = _Mean()
    for batch in _batches(data, cfg.batch, lm.device):
        s1 = batch["s"] + 1
        with patching.neox_heads(lm, capture={layer: s1 for layer in range(ind[0])}) as z_rand:
            lm.logits(batch["random"])
        for layer in range(ind[0]):
            for head in range(H):
                with patching.neox_heads(lm, capture={ind[0]: last(batch)},
                                         patch={(layer, head): (s1, z_rand[layer][:, head])}) as z_ind:
                    lm.logits(batch["clean"])
                with patching.neox_heads(lm, patch={ind: (last(batch), z_ind[ind[0]][:, ind[1]])}):
                    comp.add((layer, head), lm.logits(batch["clean"])[:, -1], batch["b"])
    result.rows[f"head->L{ind[0]}H{ind[1]} (K-composition)"] = _rows(
        comp, [(l, h) for l in range(ind[0]) for h in range(H)], clean_p, lambda k: f"L{k[0]}H{k[1]}")
    return result


def result_path(cache_dir: Path, lm: models.LM, experiment: str, cfg: CircuitConfig) -> Path:
    from .cache import model_key

    return cache_dir / "circuits" / model_key(lm.source, lm.dtype) / f"{experiment}-{config_key(asdict(cfg))}.json"


def run_induction(lm: models.LM, cfg: CircuitConfig, cache_dir: Path, force: bool = False) -> CircuitResult:
    check(cfg, lm)
    path = result_path(cache_dir, lm, "induction", cfg)
    if path.is_file() and not force:
        return CircuitResult.load(path)
    result = mamba_induction(lm, cfg) if lm.family == "mamba" else neox_induction(lm, cfg)
    result.save(path)
    return result
