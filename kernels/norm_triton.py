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

MAX_D = 8192
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

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- reference
def add_rms_norm_reference(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-5,
                           out_dtype: torch.dtype | None = None,
                           residual_dtype: torch.dtype = torch.float32):
    """Plain torch, same contract as :func:`add_rms_norm`; computes in float32, or float64 when
    x is float64 (the tests pass float64 everything, residual_dtype included)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    a = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    residual_out = a.to(residual_dtype)
    a = residual_out.to(acc)
    rstd = torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    normed = (a * rstd * weight.to(acc)).to(out_dtype or x.dtype)
    return normed, residual_out


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


def _check(x: Tensor, residual: Tensor | None, weight: Tensor, out_dtype, residual_dtype):
    name = "add_rms_norm"
    if x.dim() < 1:
        raise ValueError(f"{name}: x needs shape (..., d), got a 0-d tensor")
    if x.dtype not in _IO_DTYPES:
        raise ValueError(f"{name}: x has dtype {x.dtype}, expected one of {_IO_DTYPES}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}, the last dim d must be >= 1")
    if d > MAX_D:
        raise ValueError(f"{name}: d={d} (last dim of x) is over the {MAX_D} supported")
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}, "
                             f"x has {tuple(x.shape)}")
        if residual.dtype not in _IO_DTYPES:
            raise ValueError(f"{name}: residual has dtype {residual.dtype}, "
                             f"expected one of {_IO_DTYPES}")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device}, x on {x.device}")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({d},) "
                         f"for x of shape {tuple(x.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name}: weight has dtype {weight.dtype}, expected a float dtype")
    if weight.device != x.device:
        raise ValueError(f"{name}: weight is on {weight.device}, x on {x.device}")
    if out_dtype not in _IO_DTYPES:
        raise ValueError(f"{name}: out_dtype {out_dtype} is not one of {_IO_DTYPES}")
    if residual_dtype not in _IO_DTYPES:
        raise ValueError(f"{name}: residual_dtype {residual_dtype} is not one of {_IO_DTYPES}")


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-5,
                 out_dtype: torch.dtype | None = None,
                 residual_dtype: torch.dtype = torch.float32):
    """``residual_out = x + residual``; ``normed = rms_norm(residual_out) * weight``, fused.

    Args:
        x: (..., d) float32/float16/bfloat16, d <= 8192 (best: rows with stride 1 along d).
        residual: same shape as x (any of those dtypes), or None (residual_out = x).
        weight: (d,) any float dtype; used in float32.
        eps: added to mean(residual_out^2) under the square root.
        out_dtype: dtype of normed (default: x's).
        residual_dtype: dtype residual_out is stored in (default float32).

    Returns:
        (normed, residual_out), contiguous, x's shape. Differentiable in x, residual and weight
        through both outputs; gradients come back in each input's dtype.
    """
    out_dtype = out_dtype or x.dtype
    _check(x, residual, weight, out_dtype, residual_dtype)
    return _AddRMSNormFn.apply(x, residual, weight, float(eps), out_dtype, residual_dtype)


# --------------------------------------------------------------------------- benchmark
def _bench(M=16384, d=1024):  # pragma: no cover - GPU only
    """Forward and forward+backward ms vs the unfused torch path (bf16 x, float32 residual)."""
    from triton.testing import do_bench
    dev = "cuda"
    x = torch.randn(M, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(M, d, device=dev, requires_grad=True)
    w = torch.randn(d, device=dev, requires_grad=True)
    g1 = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
    g2 = torch.randn(M, d, device=dev)
    for name, f in (("torch", add_rms_norm_reference), ("triton", add_rms_norm)):
        def fwd(f=f):
            return f(x, r, w, 1e-5)

        def fb(f=f):
            return torch.autograd.grad(f(x, r, w, 1e-5), (x, r, w), (g1, g2))

        print(f"{name:7s} fwd {do_bench(fwd):.4f} ms  fwd+bwd {do_bench(fb):.4f} ms")


if __name__ == "__main__":  # pragma: no cover
    _bench()
