"""Sparse autoencoders: the study's ReLU + L1, and TopK; files, encode and decode.

Shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.
The SAE works on normalised inputs x̃ = x / scale(x):

- ``token``: every token rescaled to norm √d_in (the study's setting);
- ``dataset``: one constant, fixed from data at initialisation, so that the mean norm is √d_in;
- ``none``.

``encode`` takes raw activations; ``decode`` returns raw activations, multiplying back by the
scale. With ``token`` normalisation the scale belongs to each token, so pass
``scale=sae.scale(x)`` to ``decode`` (``reconstruct(x)`` does the round trip).

``features(x, 'raw')`` gives the features in the activations' own scale, encode(x)·scale(x):
what the authors' SAE library (lm_saes) returns from its encode, and what they correlated.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import __version__, files
from .errors import UnivError

ARCHS = ("relu", "topk")
NORMALISATIONS = ("token", "dataset", "none")
FEATURE_SCALES = ("raw", "normalised")
INIT_B_DEC = ("zeros", "geometric-median")


@dataclass
class SAEConfig:
    """What an SAE is; saved as cfg.json next to its weights."""

    arch: str
    """'relu' (ReLU + L1 on f_i‖W_dec,i‖, the study's) or 'topk' (k largest pre-activations)."""
    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of latents."""
    k: int | None = None
    """Active latents per token (topk)."""
    l1: float | None = None
    """L1 coefficient λ (relu)."""
    normalisation: str = "token"
    """'token', 'dataset' or 'none' (see the module docstring)."""
    store: dict = field(default_factory=dict)
    """Where the training activations came from: store path, tokens and model keys, hook."""
    seed: int = 0
    """Seed of the initialisation and the batch order."""
    weights_sha256: str | None = None
    """sha256 of sae.safetensors, written by save and checked by load."""
    univ_version: str = __version__

    def check(self) -> None:
        if self.arch not in ARCHS:
            raise UnivError(f"unknown SAE architecture {self.arch!r} (use {' or '.join(ARCHS)})")
        if self.normalisation not in NORMALISATIONS:
            raise UnivError(f"unknown normalisation {self.normalisation!r} (use {', '.join(NORMALISATIONS)})")
        if self.d_sae < 1 or self.d_in < 1:
            raise UnivError(f"SAE sizes must be positive (d_in {self.d_in}, d_sae {self.d_sae})")
        if self.arch == "topk" and not (self.k is not None and 0 < self.k < self.d_sae):
            raise UnivError(f"--k must be between 1 and d_sae - 1 = {self.d_sae - 1}, not {self.k}")
        if self.arch == "relu" and not (self.l1 is not None and self.l1 >= 0 and math.isfinite(self.l1)):
            raise UnivError(f"--l1 must be a non-negative number, not {self.l1}")


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d, n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.zeros(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        # Constant scale of 'dataset' normalisation (1 otherwise): x̃ = x / data_scale.
        self.register_buffer("data_scale", torch.ones(()))

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, generator: torch.Generator, b_dec: str = "zeros") -> None:
        """Random decoder rows, W_enc = W_decᵀ, b_dec 'zeros' (lm_saes, the authors') or the
        'geometric-median' of the sample (univ's option)."""
        if b_dec not in INIT_B_DEC:
            raise UnivError(f"unknown --init-b-dec {b_dec!r} (use {' or '.join(INIT_B_DEC)})")
        cfg = self.cfg
        w = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        if cfg.arch == "relu":
            w *= 0.1  # small rows: L1 on f‖W_dec‖ then shapes the norms (Anthropic, 2024)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        sample = sample.float().to(self.W_dec.device)
        if cfg.normalisation == "dataset":
            self.data_scale.fill_(sample.norm(dim=-1).mean().item() / math.sqrt(cfg.d_in))
        if b_dec == "geometric-median":
            self.b_dec.copy_(geometric_median(sample / self.scale(sample)))
        else:
            self.b_dec.zero_()

    # -- the maps ----------------------------------------------------------------------------
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token factor s with x̃ = x / s, shape [..., 1]."""
        if self.cfg.normalisation == "token":
            return x.float().norm(dim=-1, keepdim=True).clamp_min(1e-8) / math.sqrt(self.cfg.d_in)
        return self.data_scale.expand(*x.shape[:-1], 1)

    def pre_acts(self, x_norm: torch.Tensor) -> torch.Tensor:
        return (x_norm - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.arch == "relu":
            return F.relu(pre)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features [..., d_sae] of raw activations [..., d_in]."""
        x = x.to(self.W_enc.dtype)
        return self.activate(self.pre_acts(x / self.scale(x).to(x.dtype)))

    def features(self, x: torch.Tensor, feature_scale: str = "raw") -> torch.Tensor:
        """Features of raw activations on the chosen scale: 'raw' = encode(x)·scale(x) (with
        token-wise normalisation a per-token factor ‖x‖/√d, which Pearson correlation is not
        blind to), 'normalised' = encode(x)."""
        f = self.encode(x)
        if feature_scale == "normalised":
            return f
        if feature_scale != "raw":
            raise UnivError(f"unknown feature scale {feature_scale!r} (use {' or '.join(FEATURE_SCALES)})")
        return f * self.scale(x.to(self.W_enc.dtype)).to(f.dtype)

    def decode(self, f: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Raw activations from features; ``scale`` is ``self.scale(x)`` (needed for 'token')."""
        if scale is None:
            if self.cfg.normalisation == "token":
                raise ValueError("token-wise normalisation: pass scale=sae.scale(x) to decode")
            scale = self.data_scale
        return (f @ self.W_dec + self.b_dec) * scale.to(f.dtype)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), self.scale(x.to(self.W_enc.dtype)))

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        data = st_save(tensors)
        self.cfg.weights_sha256 = hashlib.sha256(data).hexdigest()
        files.write_bytes(directory / "sae.safetensors", data)
        files.write_json(directory / "cfg.json", asdict(self.cfg))  # last: its presence marks a finished SAE

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> SAE:
        """The SAE in a folder; a clear error when it is missing, unreadable or its weights are
        not the ones its cfg.json recorded."""
        directory = Path(directory)
        try:
            cfg = SAEConfig(**json.loads((directory / "cfg.json").read_text()))
            data = (directory / "sae.safetensors").read_bytes()
        except (OSError, ValueError, TypeError) as e:
            raise UnivError(f"cannot load an SAE from {directory}: {e}") from None
        if cfg.weights_sha256 is not None and _digest(directory / "sae.safetensors", data) != cfg.weights_sha256:
            raise UnivError(f"{directory / 'sae.safetensors'} is corrupt (sha256 differs from cfg.json); "
                            "fit-sae trains it again")
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise UnivError(f"cannot read {directory / 'sae.safetensors'}: {e}".splitlines()[0]) from None
        sae = cls(cfg).to(device)
        sae.load_state_dict({k: v.to(device) for k, v in tensors.items()})
        return sae

    @staticmethod
    def intact(directory: Path) -> bool:
        """A finished SAE whose weights match the sha256 its cfg.json recorded."""
        cfg = files.read_json(Path(directory) / "cfg.json")
        try:
            return isinstance(cfg, dict) and cfg.get("weights_sha256") == _digest(Path(directory) / "sae.safetensors")
        except OSError:
            return False


_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path, data: bytes | None = None) -> str:
    """sha256 of a file, hashed once per process while its size and mtime stay the same (univ all
    checks every SAE several times: fit-sae, then each comparison of match)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes() if data is None else data).hexdigest()
    return _DIGESTS[key]


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows."""
    guess = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - guess).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - guess).norm() < eps * (1 + guess.norm()):
            return new
        guess = new
    return guess
