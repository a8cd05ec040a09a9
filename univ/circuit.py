"""What the circuit analyses (`induction`, `offbyone`) share: their config, their result, the
random sequences they draw from, and running means of p(B) and logit(B) over batches."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import files, models
from .errors import UnivError
from .options import parse_layers
from .store import config_key

EFFECTS = ("direct", "total")


@dataclass
class CircuitConfig:
    """Options shared by `induction` and `offbyone`."""

    n_seqs: int = 256
    """Sequences averaged over (every analysis but Mamba's state->logit; the authors: 65,536)."""
    state_seqs: int | None = None
    """Mamba state->logit: the first this-many sequences (None: all n_seqs; the authors: 2,048)."""
    seq_len: int = 64
    """Tokens per sequence (induction: 64; offbyone: 129)."""
    seed: int = 0
    """Seed of the random sequences."""
    batch: int = 64
    """Sequences per forward pass."""
    device: str = "auto"
    dtype: str = "fp32"
    """Circuits run in float32 by default: Mamba's logits are ~64 and bf16 would blur p(B)."""
    effect: str = "direct"
    """'direct' (the authors' path patching: every other layer's last state / read-out / head
    output frozen to its clean value) or 'total' (univ's variant: everything downstream recomputed)."""
    conv_layers: str = "auto"
    """Mamba: layers given conv->state->logit, e.g. '12,17'; auto: the two largest state->logit drops."""
    conv_cumulative: bool = False
    """Mamba: accumulate the conv input swaps as the authors' script did (s+2, then s+1 too, then s)."""
    head: str | None = None
    """GPT-NeoX: the induction head 'L.H' (or 'L5H0') for head->head (default: the top head->logit)."""
    swap_decay: bool = False
    """Off-by-One (Mamba): also take the decay Ā from the corrupted run, at p + 1 (the authors' notebook)."""


@dataclass
class CircuitResult:
    experiment: str
    family: str
    model: str
    config: dict
    clean_p: float
    clean_logit: float
    rows: dict[str, list[dict]] = field(default_factory=dict)
    """Per analysis, one row per component: p_B, logit_B, drop (the analysis' clean p − patched p)."""
    clean: dict[str, dict] = field(default_factory=dict)
    """Per analysis, its sequences' clean p_B and logit_B, and how many (n_seqs)."""

    def save(self, path: Path) -> None:
        files.write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> CircuitResult | None:
        """The saved result, or None when there is none or it cannot be read (then it is recomputed)."""
        saved = files.read_json(path)
        try:
            return cls(**saved) if isinstance(saved, dict) else None
        except TypeError:
            return None


def check(cfg: CircuitConfig, lm: models.LM, min_len: int = 4) -> None:
    if cfg.seq_len < min_len:
        raise UnivError(f"--seq-len must be at least {min_len}, not {cfg.seq_len}")
    if cfg.n_seqs < 1:
        raise UnivError(f"--n-seqs must be at least 1, not {cfg.n_seqs}")
    if cfg.state_seqs is not None and cfg.state_seqs < 1:
        raise UnivError(f"--state-seqs must be at least 1, not {cfg.state_seqs}")
    if cfg.batch < 1:
        raise UnivError(f"--batch-seqs must be at least 1, not {cfg.batch}")
    if cfg.effect not in EFFECTS:
        raise UnivError(f"unknown --effect {cfg.effect!r} (use {' or '.join(EFFECTS)})")
    if lm.family != "gpt_neox" and cfg.head is not None:
        raise UnivError(f"--head is a GPT-NeoX option (attention heads); {lm.family} has none")
    if lm.family == "rwkv" and (cfg.conv_cumulative or cfg.swap_decay):
        raise UnivError("--conv-cumulative and --swap-decay are Mamba options (RWKV has no conv, and a fixed decay)")
    if lm.family == "gpt_neox" and (cfg.conv_layers != "auto" or cfg.conv_cumulative):
        raise UnivError("--conv-layers (Mamba, RWKV) and --conv-cumulative (Mamba) are not GPT-NeoX options: it has "
                        "neither conv nor token shift")
    if lm.family == "gpt_neox" and cfg.swap_decay:
        raise UnivError("--swap-decay is a Mamba option (the SSM's decay)")
    if lm.family != "gpt_neox" and cfg.conv_layers != "auto":
        parse_layers(cfg.conv_layers, lm.n_layers)
    if lm.family == "gpt_neox" and cfg.head is not None:
        parse_head(cfg.head, lm)
    if lm.source.max_ctx is not None and cfg.seq_len > lm.source.max_ctx:
        raise UnivError(f"--seq-len {cfg.seq_len} is beyond the model's limit of {lm.source.max_ctx}")


def parse_head(text: str, lm: models.LM) -> tuple[int, int]:
    """'5.0' or 'L5H0' -> (5, 0), checked against the model."""
    import re

    m = re.fullmatch(r"\s*(?:L(\d+)H(\d+)|(\d+)\.(\d+))\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UnivError(f"--head must look like 5.0 or L5H0 (layer and head), not {text!r}")
    layer, head = (int(v) for v in (m.group(1, 2) if m.group(1) else m.group(3, 4)))
    H = lm.model.config.num_attention_heads
    if not (0 <= layer < lm.n_layers and 0 <= head < H):
        raise UnivError(f"head {text} is out of range: layers 0-{lm.n_layers - 1}, heads 0-{H - 1}")
    return layer, head


def token_ids(lm: models.LM) -> torch.Tensor:
    """Ids the random sequences draw from: the tokenizer's, minus special tokens."""
    n = min(len(lm.tokenizer), lm.model.config.vocab_size)
    special = set(lm.tokenizer.all_special_ids)
    return torch.tensor([i for i in range(n) if i not in special])


def other_ids(ids: torch.Tensor, avoid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random id per entry, different from ``avoid``."""
    out = ids[torch.randint(len(ids), avoid.shape, generator=g)]
    clash = out == avoid
    while clash.any():
        out[clash] = ids[torch.randint(len(ids), (int(clash.sum()),), generator=g)]
        clash = out == avoid
    return out


def _p_and_logit(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(len(target), device=logits.device)
    logits = logits.float()
    return F.softmax(logits, -1)[rows, target], logits[rows, target]


Z95 = 1.96
"""Half-widths are 95 % normal intervals over sequences."""


class Means:
    """Running means of p(B) and logit(B) over batches, per component, and of each component's
    drop in p(B) against the clean run on the same sequences (for its interval)."""

    def __init__(self):
        self.sums: dict = {}

    def add(self, key, logits, target, clean: torch.Tensor | None = None) -> torch.Tensor:
        """Add a batch; ``clean`` is the clean run's p(B) on the same sequences (see the return
        value of the clean add). Returns this batch's p(B) per sequence."""
        p, lg = _p_and_logit(logits, target)
        s = self.sums.setdefault(key, [0.0, 0.0, 0, 0.0, 0.0])
        d = (clean - p) if clean is not None else p  # the clean run's own spread, for its interval
        s[0] += p.sum().item()
        s[1] += lg.sum().item()
        s[2] += len(p)
        s[3] += d.sum().item()
        s[4] += d.double().pow(2).sum().item()
        return p

    def get(self, key) -> tuple[float, float]:
        s = self.sums[key]
        return s[0] / s[2], s[1] / s[2]

    def half_width(self, key) -> float:
        """95 % half-width of the mean drop (or, for a clean key, of the mean p(B))."""
        s = self.sums[key]
        n = s[2]
        var = max(s[4] / n - (s[3] / n) ** 2, 0.0) * n / max(n - 1, 1)
        return Z95 * math.sqrt(var / n)

    def clean(self, key, chance: float) -> dict:
        """The clean run: p(B) with its interval, and whether it is above chance (1/|ids|)."""
        p, lg = self.get(key)
        ci = self.half_width(key)
        return {"n_seqs": self.sums[key][2], "p_B": p, "p_B_ci": ci, "logit_B": lg, "chance": chance,
                "solved": p - ci > chance}

    def rows(self, keys, clean_p: float, label) -> list[dict]:
        """One row per component, ranked by the drop in p(B); ``stands_out`` when the drop's 95 %
        interval (paired over sequences) leaves out 0."""
        rows = []
        for key in keys:
            p, lg = self.get(key)
            ci = self.half_width(key)
            rows.append({"component": label(key), "p_B": p, "logit_B": lg, "drop": clean_p - p, "drop_ci": ci,
                         "stands_out": abs(clean_p - p) > ci})
        return sorted(rows, key=lambda r: -r["drop"])


def batches(data: dict, size: int, device, limit: int | None = None):
    """The sequences' tensors, ``size`` sequences at a time (the first ``limit`` only, if given)."""
    n = min(len(data["b"]), limit or len(data["b"]))
    for lo in range(0, n, size):
        yield {k: v[lo:min(lo + size, n)].to(device) for k, v in data.items()}


def result_path(cache_dir: Path, lm: models.LM, experiment: str, cfg: CircuitConfig, **extra) -> Path:
    from .cache import Computed, model_key

    key = config_key({**asdict(cfg), **extra})
    return cache_dir / "circuits" / model_key(lm.source, Computed.plain(lm.dtype)) / f"{experiment}-{key}.json"


class NothingToFollow(UnivError):
    """The induction run has no component whose patch lowers p(B) beyond its interval."""


def followed(result: CircuitResult, table: str) -> str:
    """The component whose patch lowers p(B) most among those that stand out (their 95 % interval
    leaves out 0): the authors followed the largest drop, Mamba's layer 17 and Pythia's L5H0. A
    GPT-NeoX head in layer 0 cannot be an induction head (it sees no earlier token's content)."""
    rows = [r for r in result.rows[table] if not r["component"].startswith("L0H")]
    lowering = [r for r in rows if r["stands_out"] and r["drop"] > 0]
    if not lowering:
        top = max(rows, key=lambda r: r["drop"])
        raise NothingToFollow(
            f"no {table} component of the induction run lowers p(B) beyond its 95 % interval (largest: "
            f"{top['component']}, {top['drop']:.2g} ± {top['drop_ci']:.2g}); give --layer (Mamba, RWKV) or "
            "--head (GPT-NeoX) to follow one anyway")
    return max(lowering, key=lambda r: r["drop"])["component"]
