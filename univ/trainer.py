"""The SAE training loop shared by stream-fed and store-fed training: windows of rows in, one SAE
per layer out, with checkpoints a killed run resumes from exactly.

A *window* is a block of rows of every layer being trained (the same tokens for each); it is
permuted with a seed fixed by the window's index and cut into batches. A checkpoint is written
at a window boundary, one file per layer (weights, Adam state, dead-latent counters and the run's
position in its metadata), written to a temporary name, fsynced and renamed: a kill leaves
either the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import UnivError
from .progress import bar as progress_bar
from .sae import SAE, SAEConfig
from .sae_train import TrainConfig, after_step, before_step, lr_at, step_loss
from . import files

CHECKPOINT = "checkpoint.safetensors"
INIT_ROWS = 4096
"""Rows of the first window that initialise an SAE (dataset scale, geometric median)."""

Windows = Callable[[dict], Iterator[tuple[dict[int, torch.Tensor], dict | None]]]
"""windows(state) -> ({layer: rows}, position after the window) from the run's position on."""


def train(saes_cfg: dict[int, SAEConfig], out_dirs: dict[int, Path], windows: Windows, tc: TrainConfig,
          batch_size: int, seed: int, init_b_dec: str, device: torch.device, checkpoint_minutes: float,
          fresh: bool, desc: str, progress: bool) -> dict[int, SAE]:
    """Train one SAE per layer for tc.total_steps steps over the windows; resumes from the layers'
    checkpoints when every one of them stands at the same point (``fresh``: ignore them)."""
    saes = {layer: SAE(c).to(device) for layer, c in saes_cfg.items()}
    opts = {layer: _optimizer(sae, tc.lr, device) for layer, sae in saes.items()}
    resumed = {} if fresh else {layer: _load(out_dirs[layer], saes[layer], opts[layer], device) for layer in saes}
    states = {json.dumps(r[0], sort_keys=True) if r else None for r in resumed.values()}
    if len(states) == 1 and None not in states:  # every layer stopped at the same window
        state = next(iter(resumed.values()))[0]
        since = {layer: r[1] for layer, r in resumed.items()}
        stream = windows(state)
    else:  # a fresh start (or checkpoints from different moments: start over rather than mix)
        state = {"window": 0, "step": 0, "position": None}
        stream = windows(state)
        head = next(stream)  # the first window initialises the SAEs, then trains them
        first, stream = head[0], itertools.chain([head], stream)
        since = {}
        for layer, sae in saes.items():
            opts[layer] = _optimizer(sae, tc.lr, device)  # drop any half-loaded state
            gen = torch.Generator().manual_seed(seed)
            rows = first[layer].cpu()
            sae.initialise(rows[torch.randperm(len(rows), generator=gen)[:INIT_ROWS]], gen, init_b_dec)
            since[layer] = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    bar = progress_bar(tc.total_steps * batch_size, desc, "tok", state["step"] * batch_size, progress)
    last_save = time.monotonic()
    with bar:
        for rows, position in stream if state["step"] < tc.total_steps else ():
            gen = torch.Generator().manual_seed(seed * 1_000_003 + state["window"])
            perm = torch.randperm(len(next(iter(rows.values()))), generator=gen).to(device)
            n_batches = min(len(perm) // batch_size, tc.total_steps - state["step"])
            for layer, x in rows.items():
                _train_window(saes[layer], opts[layer], x.to(device)[perm], n_batches, batch_size, tc,
                              state["step"], since[layer], layer)
            state = {"window": state["window"] + 1, "step": state["step"] + n_batches, "position": position}
            bar.update(n_batches * batch_size)
            if state["step"] >= tc.total_steps:
                break
            if time.monotonic() - last_save >= checkpoint_minutes * 60:
                for layer in saes:
                    save_checkpoint(out_dirs[layer], saes[layer], opts[layer], since[layer], state)
                last_save = time.monotonic()
    for layer, sae in saes.items():
        sae.cfg.store["train"] = {"tokens": state["step"] * batch_size, "steps": state["step"], "lr": tc.lr,
                                  "batch_size": batch_size}
    return saes


def _train_window(sae: SAE, opt, x: torch.Tensor, n_batches: int, batch: int, tc: TrainConfig,
                  step0: int, since_fired: torch.Tensor, layer: int) -> None:
    use_aux = sae.cfg.arch == "topk" and bool((since_fired >= tc.dead_tokens).any())
    bad = torch.full((), -1, dtype=torch.long, device=x.device)
    for b in range(n_batches):
        step = step0 + b
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        loss, _ = step_loss(sae, x[b * batch:(b + 1) * batch], tc, step, since_fired, use_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before_step(sae)
        opt.step()
        after_step(sae)
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), step, bad)
    if (first_bad := int(bad)) >= 0:  # one host sync per window, not per step
        raise UnivError(f"layer {layer}: the loss became non-finite at step {first_bad}; the last good "
                        "checkpoint is kept (try a lower --lr)")


def _optimizer(sae: SAE, lr: float, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused or None)


def save_checkpoint(out: Path, sae: SAE, opt: torch.optim.Optimizer, since: torch.Tensor, state: dict) -> None:
    tensors = {f"param.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
    for name, p in sae.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"adam.{name}.{k}"] = v.detach().cpu().reshape(v.shape)
    tensors["since_fired"] = since.cpu()
    out.mkdir(parents=True, exist_ok=True)
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"state": json.dumps(state)})
    files.write_bytes(out / CHECKPOINT, data)


def _load(out: Path, sae: SAE, opt: torch.optim.Optimizer, device) -> tuple[dict, torch.Tensor] | None:
    """(state, since_fired) from a checkpoint; None when there is none or it cannot be read."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            state = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged checkpoint is no checkpoint: train from the start
        return None
    sae.load_state_dict({k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")})
    for name, p in sae.named_parameters():
        keys = [k for k in tensors if k.startswith(f"adam.{name}.")]
        if keys:
            opt.state[p] = {k.removeprefix(f"adam.{name}."): tensors[k] for k in keys}
    return state, tensors["since_fired"]


def drop_checkpoint(out: Path) -> None:
    (out / CHECKPOINT).unlink(missing_ok=True)
