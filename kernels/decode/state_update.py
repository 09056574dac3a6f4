"""One decoding step of the selective scan in Triton (state updated in place).

state (batch, dim, N) float32; x, dt, z (batch, dim) fp32/fp16/bf16; A (dim, N) float32;
B, C (batch, N) or (batch, G, N); D, dt_bias (dim,) float32. Any strides. A program owns BD
channels of one batch row: load the (BD, N) state, one step, store it back, y = <C, h> + D x,
gated by silu(z). No autotuning: a re-run of an in-place kernel would apply the step twice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    dim, N, dpg,
    ss_b, ss_d, ss_n, sx_b, sx_d, sdt_b, sdt_d, sa_d, sa_n,
    sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sz_b, sz_d, sy_b, sy_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BD: tl.constexpr, NP: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    dmask = offs_d < dim
    nmask = offs_n < N
    tmask = dmask[:, None] & nmask[None, :]
    grp = offs_d // dpg  # (BD,): a block may straddle groups here, so index B, C per channel
    od = offs_d.to(tl.int64)
    s_ptrs = state_ptr + b * ss_b + od[:, None] * ss_d + offs_n[None, :] * ss_n
    h = tl.load(s_ptrs, mask=tmask, other=0.0)
    x = tl.load(x_ptr + b * sx_b + od * sx_d, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sdt_b + od * sdt_d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=dmask, other=0.0)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    A = tl.load(A_ptr + od[:, None] * sa_d + offs_n[None, :] * sa_n, mask=tmask, other=0.0)
    Bt = tl.load(B_ptr + b * sB_b + grp[:, None] * sB_g + offs_n[None, :] * sB_n, mask=tmask,
                 other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * sC_b + grp[:, None] * sC_g + offs_n[None, :] * sC_n, mask=tmask,
                 other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * x)[:, None] * Bt
    tl.store(s_ptrs, h, mask=tmask)
    y = tl.sum(h * Ct, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=dmask, other=0.0) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * sz_b + od * sz_d, mask=dmask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * sy_b + od * sy_d, y.to(y_ptr.dtype.element_ty), mask=dmask)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """One step h <- exp(Δ A) h + Δ B x, y = <C, h> + D x (· silu(z)); arguments validated by
    :func:`seqlab.kernels.selective_state_update`. Updates ``state`` (batch, dim, N) float32
    in place; returns y (batch, dim) in x's dtype."""
    if state.dtype != torch.float32:
        raise ValueError(f"selective_state_update_triton: state dtype {state.dtype}, needs "
                         "torch.float32")
    batch, dim, N = state.shape
    if B.dim() == 2:
        B = B.unsqueeze(1)
    if C.dim() == 2:
        C = C.unsqueeze(1)
    G = B.shape[1]
    if C.shape[1] != G:
        raise ValueError(f"selective_state_update_triton: B has {G} groups, C {C.shape[1]}")
    A = A.float()
    y = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    NP = triton.next_power_of_2(N)
    BD = max(1, min(64, 2048 // NP, triton.next_power_of_2(dim)))
    zz = z if z is not None else x
    dummy = A
    grid = (triton.cdiv(dim, BD), batch)
    _step_kernel[grid](
        state, x, dt, A, B, C, D.float() if D is not None else dummy, zz,
        dt_bias.float() if dt_bias is not None else dummy, y, dim, N, dim // G,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *zz.stride(), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), BD=BD, NP=NP, num_warps=4)
    return y
