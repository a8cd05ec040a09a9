"""One training step per SAE architecture, with the sparse TopK encoder/decoder backward.

Parameters stay float32; on a GPU the dense encoder matmul runs in bf16. The TopK path never
materialises a dense gradient over all latents: its backward touches only the k active ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sae import SAE


@dataclass
class TrainConfig:
    """Optimisation settings shared by every layer's SAE."""

    lr: float
    """Peak Adam learning rate."""
    total_steps: int
    """Steps in the whole run (for the warm-ups)."""
    lr_warmup_frac: float = 0.1
    """Fraction of the steps over which the learning rate rises linearly from 0 (lm_saes: 10 %)."""
    lr_cooldown_frac: float = 0.1
    """Fraction of the steps at the end over which it falls linearly to 0 (lm_saes: 10 %)."""
    l1_warmup_frac: float = 0.1
    """Fraction of the steps over which λ rises linearly from 0 (relu; lm_saes: 10 %)."""
    aux_k: int = 512
    """Dead latents used by the AuxK loss (topk; capped at d_sae / 2)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (topk)."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead (topk AuxK)."""
    matmul_dtype: torch.dtype = torch.float32
    """Dtype of the dense encoder matmul (bf16 on GPU)."""


class _SparsePre(torch.autograd.Function):
    """Pre-activations at chosen latents, ``pre[b, idx[b, j]]``, with a sparse backward.

    The dense product ``pre`` is computed once without autograd (it is needed to choose the
    latents); the backward touches only the chosen latents' encoder columns, so it costs
    O(batch · k · d) instead of O(batch · d_sae · d).
    """

    @staticmethod
    def forward(ctx, x_norm, b_dec, W_enc, b_enc, pre, idx):
        ctx.save_for_backward(x_norm - b_dec, idx, W_enc)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, g):
        xc, idx, W_enc = ctx.saved_tensors
        n_latents, batch = W_enc.shape[1], xc.shape[0]
        cols = idx.flatten()
        rows = torch.arange(batch, device=xc.device).repeat_interleave(idx.shape[1])
        g = g.flatten().float()
        # d loss / d W_enc[:, j] = Σ_b g_bj (x̃_b − b_dec), over the tokens where j was chosen.
        G = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (n_latents, batch), check_invariants=False)
        grad_W_enc = torch.sparse.mm(G, xc).T
        grad_b_enc = torch.zeros(n_latents, device=g.device).index_add_(0, cols, g)
        return None, -(W_enc @ grad_b_enc), grad_W_enc, grad_b_enc, None, None


def _dense_pre(sae: SAE, x_norm: torch.Tensor, mm_dtype: torch.dtype) -> torch.Tensor:
    return ((x_norm - sae.b_dec).to(mm_dtype) @ sae.W_enc.to(mm_dtype)).float() + sae.b_enc


def topk_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """x̂ = Σ_j vals_j W_dec[idx_j] + b_dec, as a gather: O(batch · k · d)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum") + b_dec


def step_loss(sae: SAE, x: torch.Tensor, tc: TrainConfig, step: int, since_fired: torch.Tensor,
              use_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mse) of one batch of raw activations; updates ``since_fired`` in place
    (training tokens since each latent last fired)."""
    cfg = sae.cfg
    x = x.float()
    x_norm = x / sae.scale(x)
    if cfg.arch == "relu":
        f = F.relu(_dense_pre(sae, x_norm, tc.matmul_dtype))
        x_hat = (f.to(tc.matmul_dtype) @ sae.W_dec.to(tc.matmul_dtype)).float() + sae.b_dec
        mse = (x_hat - x_norm).pow(2).sum(-1).mean()
        l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        lam = cfg.l1 * l1_factor(step, tc)
        since_fired.add_(len(x)).masked_fill_((f > 0).any(0), 0)
        return mse + lam * l1, mse
    with torch.no_grad():
        pre = _dense_pre(sae, x_norm, tc.matmul_dtype)
        idx = pre.topk(cfg.k, dim=-1, sorted=False).indices
    vals = F.relu(_SparsePre.apply(x_norm, sae.b_dec, sae.W_enc, sae.b_enc, pre, idx))
    x_hat = topk_decode(vals, idx, sae.W_dec, sae.b_dec)
    mse = (x_hat - x_norm).pow(2).sum(-1).mean()
    # index_add rather than boolean indexing: no host sync on a GPU.
    fired = torch.zeros(cfg.d_sae, device=x.device).index_add_(0, idx.flatten(), (vals.detach() > 0).flatten().float())
    since_fired.add_(len(x)).masked_fill_(fired > 0, 0)
    if not use_aux:
        return mse, mse
    dead = since_fired >= tc.dead_tokens
    return mse + tc.aux_coef * _aux_loss(sae, x_norm, pre, x_norm - x_hat.detach(), dead, tc), mse


def _aux_loss(sae: SAE, x_norm, pre, residual, dead, tc: TrainConfig) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the most active dead latents try to explain what the live ones
    missed. Fixed-size and masked, so it needs no host sync to count the dead."""
    k_aux = min(tc.aux_k, sae.cfg.d_sae // 2)
    with torch.no_grad():
        idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
    vals = F.relu(_SparsePre.apply(x_norm, sae.b_dec, sae.W_enc, sae.b_enc, pre, idx)) * dead[idx]
    recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum")
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (recon - residual).pow(2).sum(-1).mean() / denom


def lr_at(step: int, tc: TrainConfig) -> float:
    """lm_saes' 'constantwithwarmup': min((step + 1) / warm-up, (total − step) / cool-down, 1) × lr."""
    warm = max(1.0, tc.lr_warmup_frac * tc.total_steps)
    factor = min(1.0, (step + 1) / warm)
    if tc.lr_cooldown_frac > 0:
        factor = min(factor, (tc.total_steps - step) / max(1.0, tc.lr_cooldown_frac * tc.total_steps))
    return tc.lr * factor


def l1_factor(step: int, tc: TrainConfig) -> float:
    """λ's warm-up, as lm_saes: min(1, step / warm-up steps), 0 at the first step."""
    warm = int(tc.l1_warmup_frac * tc.total_steps)
    return 1.0 if warm <= 0 else min(1.0, step / warm)


def train_config(arch: str, lr: float, total_steps: int, batch: int, matmul_dtype: torch.dtype) -> TrainConfig:
    """relu: the authors' recipe (lm_saes, September 2024: 10 % warm-up of lr and λ, 10 % linear
    cool-down to 0); topk: univ's (1 % warm-up, no cool-down; a latent silent for 1M tokens, or a
    tenth of a shorter run, counts as dead for AuxK)."""
    if arch == "relu":
        return TrainConfig(lr=lr, total_steps=total_steps, matmul_dtype=matmul_dtype)
    return TrainConfig(lr=lr, total_steps=total_steps, lr_warmup_frac=0.01, lr_cooldown_frac=0.0,
                       dead_tokens=min(1_000_000, max(batch, total_steps * batch // 10)), matmul_dtype=matmul_dtype)


def default_lr(arch: str, d_sae: int) -> float:
    """relu: the study's 4e-4; topk: 2e-4 scaled by 1/√(d_sae / 2¹⁴) (Gao et al. 2024)."""
    return 4e-4 if arch == "relu" else 2e-4 / math.sqrt(d_sae / 2**14)


@torch.no_grad()
def after_step(sae: SAE) -> None:
    """TopK keeps unit-norm decoder rows."""
    if sae.cfg.arch == "topk":
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


@torch.no_grad()
def before_step(sae: SAE) -> None:
    """TopK: drop the gradient component along each decoder row, which the renorm would undo."""
    if sae.cfg.arch == "topk" and sae.W_dec.grad is not None:
        w, g = sae.W_dec, sae.W_dec.grad
        g.sub_((g * w).sum(1, keepdim=True) * w)
