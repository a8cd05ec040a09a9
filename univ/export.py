"""`univ export-sae`: univ's SAEs in other tools' on-disk layouts.

SAELens (≥ 6): a folder with ``cfg.json`` and ``sae_weights.safetensors`` (W_enc [d_in, d_sae],
b_enc, W_dec [d_sae, d_in], b_dec), loaded by ``sae_lens.SAE.load_from_disk``. The maps are the
same: f = act((x̃ − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec, with x̃ the normalised input.
univ's token-wise normalisation (every token to norm √d) is SAELens' ``constant_norm_rescale``,
declared; a dataset-wide constant is folded into the weights. SAELens' ``encode`` then returns
univ's ``encode`` (``features(x, 'normalised')``); multiply by ‖x‖/√d for the 'raw' scale the
study correlated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from . import files
from .errors import UnivError
from .sae import SAE

FORMATS = ("saelens",)
ARCHITECTURES = {"relu": "standard", "topk": "topk"}
NORMALISE = {"token": "constant_norm_rescale", "dataset": "none", "none": "none"}


def saelens_files(sae: SAE) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json, weights) of one SAE in SAELens' layout."""
    cfg = sae.cfg
    w_enc, b_enc, w_dec, b_dec = (t.detach().float().cpu() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    if cfg.normalisation != "token":  # x̃ = x / s with one constant s (1 for 'none'): folded in
        s = float(sae.data_scale)
        w_enc, w_dec, b_dec = w_enc / s, w_dec * s, b_dec * s
    store = cfg.store.get("config", {})
    layer = store.get("layer")
    metadata = {"model_name": store.get("model_name"), "hook_name": f"blocks.{layer}.hook_resid_post",
                "hook_layer": layer, "prepend_bos": True,
                "univ": {"hook": store.get("hook"), "centred": store.get("centred", False), "arch": cfg.arch,
                         "normalisation": cfg.normalisation, "seed": cfg.seed, "weights_sha256": cfg.weights_sha256,
                         "raw_features": "encode(x) * |x| / sqrt(d_in)" if cfg.normalisation == "token"
                         else f"encode(x) * {float(sae.data_scale)!r}"}}
    out = {"architecture": ARCHITECTURES[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": NORMALISE[cfg.normalisation],
           "reshape_activations": "none", **({"k": cfg.k} if cfg.arch == "topk" else {}), "metadata": metadata}
    return out, {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}


def sae_dirs(root: Path) -> list[Path]:
    """One SAE folder, or every SAE folder below ``root``."""
    if (root / "cfg.json").is_file():
        return [root]
    found = sorted(p.parent for p in root.rglob("cfg.json") if (p.parent / "sae.safetensors").is_file())
    if not found:
        raise UnivError(f"{root} holds no SAE (no cfg.json with sae.safetensors)")
    return found


def export(root: Path, to: str, out: Path) -> list[Path]:
    """Write every SAE at ``root`` in format ``to`` under ``out`` (same relative folders)."""
    if to not in FORMATS:
        raise UnivError(f"unknown format {to!r} (use {' or '.join(FORMATS)})")
    written = []
    for d in sae_dirs(root):
        cfg, weights = saelens_files(SAE.load(d))
        target = out / d.relative_to(root) if d != root else out
        files.write_bytes(target / "sae_weights.safetensors", st_save({k: v.contiguous() for k, v in weights.items()}))
        files.write_text(target / "cfg.json", json.dumps(cfg, indent=2))
        written.append(target)
    return written
