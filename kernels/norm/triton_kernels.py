"""Fused residual add + RMSNorm in Triton, forward and backward (pre-norm blocks, for training).

    residual_out = x + residual                                (float32, stored in residual_dtype)
    rstd         = 1 / sqrt(mean_d(residual_out^2) + eps)      (float32, one per row)
    normed       = residual_out * rstd * weight                (float32, rounded once to out_dtype)

Without a residual, residual_out is x converted to residual_dtype. normed is computed from
residual_out *as stored* (rounded to residual_dtype, then read back as float32), so that
``normed == rms_norm(residual_out)`` holds exactly for the returned tensor and the backward,
which only has the stored residual_out, differentiates the function the forward computed. With
the default residual_dtype float32 that rounding is a no-op.

Backward (g = ∂normed, h = ∂residual_out, either may be absent; xhat = residual_out * rstd
recomputed from the saved residual_out and rstd, nothing else saved but the weight):

    gw       = g * weight
    d_resid  = rstd * (gw - xhat * mean_d(gw * xhat)) + h
    ∂x       = d_resid (in x's dtype),  ∂residual = d_resid (in residual's dtype, own buffer)
    ∂weight  = sum over rows of g * xhat (float32, returned in weight's dtype)

Layout: x (..., d) is read as M = numel / d rows of d (a stride per row, stride 1 along d; a
tensor whose rows cannot be described that way is copied first). All outputs are contiguous.
A forward program owns ROWS consecutive rows as one (ROWS, BLOCK_D) tile, BLOCK_D =
next_power_of_2(d) <= 8192, ROWS = clamp(FWD_ELEMS // BLOCK_D, 1, MAX_ROWS). A backward program
walks a contiguous run of row blocks, accumulating g * xhat in a (ROWS, BLOCK_D) float32 tile,
and writes one partial ∂weight row; torch sums the (programs, d) partials: deterministic, no
atomics. Columns past d and rows past M are masked (loaded as 0, never stored).

Numerics: float32 throughout (loads converted, sums of squares and the mean(gw * xhat) row
reduction in float32); each output is rounded once to its dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor

# Tile sizes (tunable): elements per (ROWS, BLOCK_D) tile, ROWS capped at MAX_ROWS.
FWD_ELEMS = 4096
BWD_ELEMS = 4096
MAX_ROWS = 16
# Backward programs: BWD_PROGRAMS_PER_SM per SM on CUDA (the ∂weight partials are
# programs x d float32), BWD_PROGRAMS_CPU under the interpreter.
BWD_PROGRAMS_PER_SM = 2
BWD_PROGRAMS_CPU = 4
# Tests set this to fill every output buffer with NaN before the kernels write it.
POISON = False


# --------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, rstd_ptr, M, D, eps,
                s_x, s_r, s_o, s_res,
                HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    m = rmask[:, None] & cmask[None, :]
    a = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        a += tl.load(r_ptr + rows[:, None] * s_r + cols[None, :], mask=m,
                     other=0.0).to(tl.float32)
    # residual_out as stored (a no-op round trip for float32 residual_dtype)
    a_st = a.to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + rows[:, None] * s_res + cols[None, :], a_st, mask=m)
    a = a_st.to(tl.float32)
    var = tl.sum(a * a, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = a * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * s_o + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _bwd_kernel(res_ptr, rstd_ptr, w_ptr, gy_ptr, gr_ptr, dx_ptr, dr_ptr, dwp_ptr,
                M, D, BLOCKS, s_res, s_gy, s_gr, s_dx, s_dr,
                HAS_GY: tl.constexpr, HAS_GR: tl.constexpr, HAS_DR: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for it in range(0, BLOCKS):
        rows = (pid.to(tl.int64) * BLOCKS + it) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        m = rmask[:, None] & cmask[None, :]
        d = tl.zeros((ROWS, BLOCK_D), tl.float32)
        if HAS_GY:
            a = tl.load(res_ptr + rows[:, None] * s_res + cols[None, :], mask=m,
                        other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xhat = a * rstd[:, None]
            gy = tl.load(gy_ptr + rows[:, None] * s_gy + cols[None, :], mask=m,
                         other=0.0).to(tl.float32)
            gw = gy * w[None, :]
            c = tl.sum(gw * xhat, axis=1) / D
            d += rstd[:, None] * (gw - xhat * c[:, None])
            dw += gy * xhat
        if HAS_GR:
            d += tl.load(gr_ptr + rows[:, None] * s_gr + cols[None, :], mask=m,
                         other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * s_dx + cols[None, :], d.to(dx_ptr.dtype.element_ty),
                 mask=m)
        if HAS_DR:
            tl.store(dr_ptr + rows[:, None] * s_dr + cols[None, :],
                     d.to(dr_ptr.dtype.element_ty), mask=m)
    tl.store(dwp_ptr + pid.to(tl.int64) * D + cols, tl.sum(dw, axis=0), mask=cmask)


# --------------------------------------------------------------------------- launchers
def _empty(*shape, dtype, device):
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON else t


def _rows(t: Tensor, d: int) -> Tensor:
    """t as (M, d) rows with stride 1 along d (a view when possible, else a copy)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(1) == 1 or t2.shape[1] == 1 else t2.contiguous()


def _tiles(d: int, elems: int):
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(MAX_ROWS, elems // block_d))
    return block_d, rows, 4 if block_d <= 1024 else 8


def _forward(x2: Tensor, r2: Tensor | None, weight: Tensor, eps: float, out_dtype, residual_dtype):
    M, d = x2.shape
    dev = x2.device
    out = _empty(M, d, dtype=out_dtype, device=dev)
    res = _empty(M, d, dtype=residual_dtype, device=dev)
    rstd = _empty(M, dtype=torch.float32, device=dev)
    if M == 0:
        return out, res, rstd
    block_d, rows, warps = _tiles(d, FWD_ELEMS)
    _fwd_kernel[(triton.cdiv(M, rows),)](
        x2, r2 if r2 is not None else x2, weight, out, res, rstd, M, d, float(eps),
        x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0), res.stride(0),
        HAS_RES=r2 is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return out, res, rstd


def _bwd_programs(nblocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        cap = BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = BWD_PROGRAMS_CPU
    return max(1, min(nblocks, cap))


def _backward(gy: Tensor | None, gr: Tensor | None, res: Tensor, rstd: Tensor, weight: Tensor,
              x_dtype, r_dtype):
    """∂x (x_dtype), ∂residual (r_dtype, or None when r_dtype is None), ∂weight (float32)."""
    M, d = res.shape
    dev = res.device
    dx = _empty(M, d, dtype=x_dtype, device=dev)
    dr = _empty(M, d, dtype=r_dtype, device=dev) if r_dtype is not None else None
    if M == 0:
        return dx, dr, torch.zeros(d, dtype=torch.float32, device=dev)
    block_d, rows, warps = _tiles(d, BWD_ELEMS)
    nblocks = triton.cdiv(M, rows)
    per_prog = triton.cdiv(nblocks, _bwd_programs(nblocks, dev))
    programs = triton.cdiv(nblocks, per_prog)
    dwp = _empty(programs, d, dtype=torch.float32, device=dev)
    _bwd_kernel[(programs,)](
        res, rstd, weight, gy if gy is not None else res, gr if gr is not None else res,
        dx, dr if dr is not None else dx, dwp, M, d, per_prog,
        res.stride(0), gy.stride(0) if gy is not None else 0,
        gr.stride(0) if gr is not None else 0, dx.stride(0),
        dr.stride(0) if dr is not None else 0,
        HAS_GY=gy is not None, HAS_GR=gr is not None, HAS_DR=dr is not None,
        ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return dx, dr, dwp.sum(0)


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype, residual_dtype):
        d = x.shape[-1]
        x2 = _rows(x, d)
        r2 = _rows(residual, d) if residual is not None else None
        weight = weight.contiguous()
        out, res, rstd = _forward(x2, r2, weight, eps, out_dtype, residual_dtype)
        ctx.save_for_backward(res, rstd, weight)
        ctx.meta = (x.shape, x.dtype, None if residual is None else residual.dtype, weight.dtype)
        ctx.set_materialize_grads(False)  # absent upstream gradients arrive as None
        return out.view(x.shape), res.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_normed, g_residual_out):
        res, rstd, weight = ctx.saved_tensors
        shape, x_dtype, r_dtype, w_dtype = ctx.meta
        d = shape[-1]
        need_x, need_r, need_w = ctx.needs_input_grad[:3]
        if g_normed is None and g_residual_out is None:
            return None, None, None, None, None, None
        gy = _rows(g_normed, d) if g_normed is not None else None
        gr = _rows(g_residual_out, d) if g_residual_out is not None else None
        dx, dr, dw = _backward(gy, gr, res, rstd, weight, x_dtype,
                               r_dtype if need_r else None)
        return (dx.view(shape) if need_x else None,
                dr.view(shape) if dr is not None else None,
                dw.to(w_dtype) if need_w else None, None, None, None)


def add_rms_norm_triton(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                        out_dtype: torch.dtype, residual_dtype: torch.dtype):
    """The fused Triton add + RMSNorm (arguments checked by
    :func:`seqlab.kernels.add_rms_norm`); returns (normed, residual_out), differentiable."""
    return _AddRMSNormFn.apply(x, residual, weight, float(eps), out_dtype, residual_dtype)
