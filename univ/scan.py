"""Mamba-1's causal depthwise conv and selective scan, without compiled extensions.

Layout everywhere: [batch, pos, channels] (channels contiguous), as the projections produce it.

    xc  = SiLU(causal_conv(x))                          conv over positions, one filter per channel
    Δ   = softplus(dt + dt_bias)
    h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t x_t) B_t          h: [channels, d_state]
    y_t = h_t C_t + D ⊙ x_t,   times SiLU(z_t) when a gate is given

Two back ends with the same signature: Triton kernels on CUDA (sequential over positions in
registers, parallel over batch × channels × chunks of positions, each thread holding every
state of its channels), and a vectorised PyTorch version for the CPU (one fused op per
position, exponentials computed in blocks; large scans go through scan_compiled instead). Both
can also return h_t at chosen positions, which the circuit analyses need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import scan_compiled

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

CPU_BLOCK = 16
LOG2_E = 1.4426950408889634
# Triton scan launch shape: positions per chunk, channels per program, warps, pipelining depth.
# block_e = 4 channels x 32 threads x num_warps: fewer per thread and Triton splits the states
# over threads (shuffles for y); more and registers spill (bench/scan_sass.py shows both).
# chunk 128 gives 16 x 12 x 8 programs at 16 x 1024, about one wave at the kernel's occupancy.
SCAN_CONFIG = {"chunk": 128, "block_e": 128, "num_warps": 1, "stages": 2}


def use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


# -- PyTorch reference paths ---------------------------------------------------------------------
def causal_conv_silu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, E], weight [E, K] -> SiLU(conv) [B, T, E] in float32 accumulation."""
    K = weight.shape[1]
    T = x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    xp = F.pad(x.to(acc), (0, 0, K - 1, 0))
    w = weight.to(acc)
    out = xp[:, 0:T] * w[:, 0]
    for k in range(1, K):
        out = out.addcmul_(xp[:, k:k + T], w[:, k])
    if bias is not None:
        out = out + bias.to(acc)
    return F.silu(out).to(x.dtype)


def selective_scan_torch(x, dt, A, B, C, D, dt_bias, z=None, state_positions=None):
    """See the module docstring. x, dt, z [Bt, T, E]; B, C [Bt, T, N]; A [E, N]; D, dt_bias [E].
    Returns y [Bt, T, E] (x's dtype) and, if state_positions is given, h at those positions
    [Bt, P, E, N] (float32, or float64 for float64 inputs)."""
    Bt, T, E = x.shape
    N = A.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    delta = F.softplus(dt.to(acc) + dt_bias.to(acc))
    dx = delta * x.to(acc)
    A = A.to(acc)
    h = torch.zeros(Bt, E, N, device=x.device, dtype=acc)
    y = torch.empty(Bt, T, E, device=x.device, dtype=acc)
    wanted = {int(p): i for i, p in enumerate(state_positions)} if state_positions is not None else {}
    states = torch.empty(Bt, len(wanted), E, N, device=x.device, dtype=acc) if wanted else None
    # Buffers reused by every block: fresh allocations of this size cost page faults on the CPU.
    L = min(CPU_BLOCK, T)
    dA_buf = torch.empty(Bt, L, E, N, device=x.device, dtype=acc)
    H_buf = torch.empty(Bt, L, E, N, device=x.device, dtype=acc)
    for t0 in range(0, T, L):
        t1 = min(T, t0 + L)
        dA, H = dA_buf[:, : t1 - t0], H_buf[:, : t1 - t0]
        torch.mul(delta[:, t0:t1, :, None], A, out=dA).exp_()           # Ā
        torch.mul(dx[:, t0:t1, :, None], B[:, t0:t1, None, :], out=H)  # B̄x, then h in place
        H[:, 0].addcmul_(dA[:, 0], h)
        for j in range(1, t1 - t0):
            H[:, j].addcmul_(dA[:, j], H[:, j - 1])
        h = H[:, -1].clone()
        y[:, t0:t1] = torch.mul(H, C[:, t0:t1, None, :], out=dA).sum(-1)
        for t in range(t0, t1):
            if t in wanted:
                states[:, wanted[t]] = H[:, t - t0]
    y = y + D.to(acc) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), states


# -- Triton kernels ------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _conv_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, T, E, sxb, sxt, sob, sot,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        pid_b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = e < E
        acc = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e, mask=emask, other=0.0).to(tl.float32)[None, :]
        for k in tl.static_range(K):
            src = t - (K - 1) + k
            m = ((src >= 0) & (src < T))[:, None] & emask[None, :]
            xv = tl.load(x_ptr + pid_b * sxb + src[:, None] * sxt + e[None, :], mask=m, other=0.0)
            w = tl.load(w_ptr + e * K + k, mask=emask, other=0.0)
            acc += xv.to(tl.float32) * w.to(tl.float32)[None, :]
        acc = acc * tl.sigmoid(acc)
        om = (t < T)[:, None] & emask[None, :]
        tl.store(out_ptr + pid_b * sob + t[:, None] * sot + e[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit
    def _scan_chunk_kernel(x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A2_ptr, D_ptr, bias_ptr, y_ptr,
                           hs_ptr, he_ptr, dec_ptr, h_ptr, slot_ptr,
                           T, E, P, n_chunks, sxb, sxt, sdb, sdt, szb, szt, sBb, sBt, sCb, sCt, syb, syt,
                           N: tl.constexpr, N_P2: tl.constexpr, HAS_Z: tl.constexpr, STORE_H: tl.constexpr,
                           OUTPUT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, STAGES: tl.constexpr):
        """One chunk of positions for BLOCK_E channels of one sequence.

        The state tile is [d_state, channels]: Triton spreads the contiguous channel axis over
        the threads, so each thread holds every state of its channels and the sum over states
        for y stays in registers (no shuffles). A2 = A·log2(e), [d_state, channels], so each
        decay is one exp2.

        OUTPUT=False: scan from h = 0 and write the chunk's end state and its total decay
        exp(A ΣΔ_t). OUTPUT=True: scan from the chunk's true start state and write y (and h at
        the asked positions)."""
        pid_b = tl.program_id(0)
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        c = tl.program_id(2)
        n = tl.arange(0, N_P2)
        emask = e < E
        nmask = n < N
        mask = nmask[:, None] & emask[None, :]
        A2 = tl.load(A2_ptr + n[:, None] * E + e[None, :], mask=mask, other=0.0)
        D = tl.load(D_ptr + e, mask=emask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32)
        state_off = ((pid_b * n_chunks + c) * N + n[:, None]) * E + e[None, :]
        if OUTPUT:
            h = tl.load(hs_ptr + state_off, mask=mask, other=0.0)
        else:
            h = tl.zeros((N_P2, BLOCK_E), tl.float32)
            dt_sum = tl.zeros((BLOCK_E,), tl.float32)
        t0 = c * CHUNK
        for t in tl.range(t0, tl.minimum(t0 + CHUNK, T), num_stages=STAGES):
            x = tl.load(x_ptr + pid_b * sxb + t * sxt + e, mask=emask, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + pid_b * sdb + t * sdt + e, mask=emask, other=0.0).to(tl.float32) + bias
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, threshold as torch's
            Bv = tl.load(B_ptr + pid_b * sBb + t * sBt + n, mask=nmask, other=0.0).to(tl.float32)
            h = tl.exp2(A2 * dt[None, :]) * h + Bv[:, None] * (dt * x)[None, :]
            if OUTPUT:
                Cv = tl.load(C_ptr + pid_b * sCb + t * sCt + n, mask=nmask, other=0.0).to(tl.float32)
                y = tl.sum(h * Cv[:, None], axis=0) + D * x
                if HAS_Z:
                    zv = tl.load(z_ptr + pid_b * szb + t * szt + e, mask=emask, other=0.0).to(tl.float32)
                    y = y * zv * tl.sigmoid(zv)
                tl.store(y_ptr + pid_b * syb + t * syt + e, y.to(y_ptr.dtype.element_ty), mask=emask)
                if STORE_H:
                    slot = tl.load(slot_ptr + t)
                    if slot >= 0:
                        tl.store(h_ptr + ((pid_b * P + slot) * E + e[None, :]) * N + n[:, None], h, mask=mask)
            else:
                dt_sum += dt
        if not OUTPUT:
            tl.store(he_ptr + state_off, h, mask=mask)
            tl.store(dec_ptr + state_off, tl.exp2(A2 * dt_sum[None, :]), mask=mask)

    @triton.jit
    def _chunk_states_kernel(he_ptr, dec_ptr, hs_ptr, M, n_chunks, BLOCK: tl.constexpr):
        """Start state of every chunk: h_start[c] = decay[c−1] ⊙ h_start[c−1] + h_end_local[c−1],
        over the M = d_state · channels numbers of one sequence's state."""
        pid_b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < M
        h = tl.zeros((BLOCK,), tl.float32)
        for c in range(n_chunks):
            off = (pid_b * n_chunks + c) * M + i
            tl.store(hs_ptr + off, h, mask=mask)
            h = tl.load(dec_ptr + off, mask=mask, other=0.0) * h + tl.load(he_ptr + off, mask=mask, other=0.0)


def _last_dim_contiguous(*ts):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(causal depthwise conv) of x [B, T, E] with weight [E, K]; output [B, T, E], x's dtype."""
    if use_triton(x):
        return causal_conv_silu_triton(x, weight, bias)
    return causal_conv_silu_torch(x, weight, bias)


def causal_conv_silu_triton(x, weight, bias):
    (x,) = _last_dim_contiguous(x)
    Bt, T, E = x.shape
    K = weight.shape[1]
    out = torch.empty(Bt, T, E, device=x.device, dtype=x.dtype)
    w = weight.contiguous()
    grid = (Bt, triton.cdiv(T, 32), triton.cdiv(E, 128))
    _conv_silu_kernel[grid](x, w, bias if bias is not None else w, out, T, E, x.stride(0), x.stride(1),
                            out.stride(0), out.stride(1), K=K, HAS_BIAS=bias is not None, BLOCK_T=32, BLOCK_E=128)
    return out


def selective_scan(x, dt, A, B, C, D, dt_bias, z=None, state_positions=None):
    """Dispatch to the Triton kernels on CUDA; on the CPU, large scans without states to
    scan_compiled (eager or compiled, as the run's configuration chose), else the PyTorch
    version. The same results from each, to float32 rounding."""
    if use_triton(x):
        return selective_scan_triton(x, dt, A, B, C, D, dt_bias, z, state_positions)
    if state_positions is None and scan_compiled.large(x, A):
        return scan_compiled.selective_scan_cpu(x, dt, A, B, C, D, dt_bias, z), None
    return selective_scan_torch(x, dt, A, B, C, D, dt_bias, z, state_positions)


def selective_scan_triton(x, dt, A, B, C, D, dt_bias, z=None, state_positions=None):
    """selective_scan_torch's contract, on the Triton kernels.

    The positions are cut into chunks scanned in parallel from a zero state; a short
    sequential pass over the chunks then gives each chunk its true start state, and a second
    parallel pass writes y. Twice the arithmetic, but T / CHUNK times the parallelism of a
    plain sequential scan, which at 4 channels per thread leaves most of a GPU idle. A chunk
    of at least T gives that single pass."""
    x, dt, B, C = _last_dim_contiguous(x, dt, B, C)
    if z is not None:
        (z,) = _last_dim_contiguous(z)
    Bt, T, E = x.shape
    N = A.shape[1]
    cfg = SCAN_CONFIG
    chunk = cfg["chunk"]
    n_chunks = triton.cdiv(T, chunk)
    y = torch.empty(Bt, T, E, device=x.device, dtype=x.dtype)
    P = len(state_positions) if state_positions is not None else 0
    if P:
        slots = torch.full((T,), -1, dtype=torch.int32, device=x.device)
        slots[torch.as_tensor(list(state_positions), device=x.device, dtype=torch.long)] = torch.arange(
            P, device=x.device, dtype=torch.int32)
        states = torch.empty(Bt, P, E, N, device=x.device, dtype=torch.float32)
    else:
        slots = states = y  # not read: STORE_H is off
    if n_chunks > 1:
        h_end, decay, h_start = (torch.empty(Bt, n_chunks, N, E, device=x.device, dtype=torch.float32)
                                 for _ in range(3))
    else:  # one pass from h = 0; the states pass and its buffers are not needed
        h_start = torch.zeros(Bt, 1, N, E, device=x.device, dtype=torch.float32)
        h_end = decay = h_start
    zz = z if z is not None else x
    A2 = (A.float() * LOG2_E).t().contiguous()
    args = (x, dt, zz, B, C, A2, D.contiguous(), dt_bias.contiguous(), y, h_start, h_end, decay, states, slots,
            T, E, max(P, 1), n_chunks, x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1),
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1))
    consts = dict(N=N, N_P2=triton.next_power_of_2(N), HAS_Z=z is not None, STORE_H=P > 0, CHUNK=chunk,
                  BLOCK_E=cfg["block_e"], STAGES=cfg["stages"], num_warps=cfg["num_warps"])
    grid = (Bt, triton.cdiv(E, cfg["block_e"]), n_chunks)
    if n_chunks > 1:
        _scan_chunk_kernel[grid](*args, OUTPUT=False, **consts)
        _chunk_states_kernel[(Bt, triton.cdiv(N * E, 1024))](h_end, decay, h_start, N * E, n_chunks, BLOCK=1024,
                                                              num_warps=4)
    _scan_chunk_kernel[grid](*args, OUTPUT=True, **consts)
    return y, (states if P else None)
