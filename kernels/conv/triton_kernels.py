"""Depthwise causal conv1d + SiLU in Triton, on channels-last activations (Mamba's conv).

    u[b, e, t] = silu(bias[e] + sum_{i<K} weight[e, K-1-i] * x[b, e, t - i])    (causal)
    u[b, e, t] = silu(bias[e] + sum_{i<K} weight[e, K-1-i] * x[b, e, t + i])    (reverse=True)

Positions outside [0, L) read as zero, which is ``F.conv1d`` on ``F.pad(x, (K-1, 0))`` (causal)
or on ``F.pad(x, (0, K-1))`` with the taps flipped (reverse), as the reference
(:mod:`seqlab.kernels.conv.reference`) computes it. "Lag" i below is the distance from the
output position, in the direction the conv looks (backwards in time when causal), and tap
``c_i = weight[:, K-1-i]`` multiplies the input at lag i in both directions. K <= 4 for the
forward and backward kernels, any K up to 64 for the one-step update.

Layout: x is (batch, E, L) with any strides; the intended input is the transposed view of a
(batch, L, 2E) in_proj output (stride 1 along E), read as (BL, BE) tiles with the channels as
the fast axis (coalesced). u and ∂x are allocated channels-last ((batch, L, E) buffers) and
returned as their (batch, E, L) transposes, so ``u.transpose(1, 2)`` is a contiguous
(batch, L, E) tensor that a Linear reads without a copy.

Numerics: the weight and bias are rounded to x's dtype by torch before the launch (what
autocast does to ``F.conv1d``'s operands; no-ops when the dtypes agree), then everything is
float32 (float64 for float64 x) and u is rounded once to x's dtype (the torch path rounds the
conv output and then the SiLU output). ∂x is rounded once to x's dtype; ∂weight/∂bias come
back in the parameters' own dtypes (float32 under autocast, where autocast's conv gives a bf16
∂weight), summed in float32 (float64) from per-program partials by torch: deterministic, no
atomics.

Backward: nothing but x (and the parameters) is saved; the pre-activation is recomputed. A
program owns BE channels and a run of L; it loads the 2K-1 lagged tiles of x once per tile
and computes the pre-activation at the K positions whose gradient reaches each x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Tile sizes (tunable; the backward keeps 2K-1 x tiles, K ∂w tiles and the rest in registers;
# ``python benchmarks/conv.py --sweep`` times the alternatives).
FWD_BL, FWD_BE, FWD_WARPS = 32, 128, 4  # H200 sweep: 0.062 ms vs 0.117 at BE 64 (bf16, 8x1536x2048)
# H200 sweep (bf16, 8 x 1536 x 2048, backward alone): BL 8 / 2 warps 0.355 ms, BL 16 / 4 warps
# 0.687, BL 32 / BE 128 / 8 warps 0.436.
BWD_BL, BWD_BE, BWD_WARPS = 8, 64, 2
BWD_TILES = 16  # L tiles per backward program: one ∂w/∂b partial per BWD_BL * BWD_TILES steps
# Tests set this to fill every output buffer with NaN before the kernels write it.
POISON = False


# --------------------------------------------------------------------------- kernels
@triton.jit
def _load_lag(base, t, offs_e, emask, L, s_e, s_l, LAG: tl.constexpr, REVERSE: tl.constexpr,
              ENABLED: tl.constexpr, ACC: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr):
    """(BL, BE) tile of the tensor at ``base`` at positions t - LAG (t + LAG if REVERSE), zero
    outside [0, L) (and everywhere when not ENABLED), in ACC."""
    if ENABLED:
        if REVERSE:
            s = t + LAG
        else:
            s = t - LAG
        m = (s >= 0) & (s < L)
        v = tl.load(base + s[:, None] * s_l + offs_e[None, :] * s_e,
                    mask=m[:, None] & emask[None, :], other=0.0).to(ACC)
    else:
        v = tl.zeros((BL, BE), ACC)
    return v


@triton.jit
def _tap(w_ptr, offs_e, emask, s_we, s_wk, I: tl.constexpr, K: tl.constexpr,
         ACC: tl.constexpr):
    """c_I = weight[:, K-1-I], (BE,) in ACC; zero for I >= K."""
    if I < K:
        c = tl.load(w_ptr + offs_e * s_we + (K - 1 - I) * s_wk, mask=emask, other=0.0).to(ACC)
    else:
        c = (offs_e * 0).to(ACC)
    return c


@triton.jit
def _pre(bias, c0, c1, c2, c3, x0, x1, x2, x3, K: tl.constexpr):
    """bias + sum_i c_i * x_i over the K taps (x_i: the input at lag i of the output)."""
    acc = bias[None, :] + c0[None, :] * x0
    if K > 1:
        acc += c1[None, :] * x1
    if K > 2:
        acc += c2[None, :] * x2
    if K > 3:
        acc += c3[None, :] * x3
    return acc


@triton.jit
def _silu_grad(g, a):
    """g * d silu(a) / da = g * s (1 + a (1 - s)), s = sigmoid(a)."""
    s = 1.0 / (1.0 + tl.exp(-a))
    return g * (s * (1.0 + a * (1.0 - s)))


@triton.jit
def _params(w_ptr, b_ptr, offs_e, emask, s_we, s_wk, K: tl.constexpr, HAS_BIAS: tl.constexpr,
            ACC: tl.constexpr, BE: tl.constexpr):
    """The block's bias (zeros without one) and its K <= 4 taps c_0..c_3 (zeros past K)."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_e, mask=emask, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BE,), ACC)
    return (bias, _tap(w_ptr, offs_e, emask, s_we, s_wk, 0, K, ACC),
            _tap(w_ptr, offs_e, emask, s_we, s_wk, 1, K, ACC),
            _tap(w_ptr, offs_e, emask, s_we, s_wk, 2, K, ACC),
            _tap(w_ptr, offs_e, emask, s_we, s_wk, 3, K, ACC))


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, E, L,
                     s_xb, s_xe, s_xl, s_we, s_wk, s_ob, s_oe, s_ol,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
                     ACC: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_e = pid_e * BE + tl.arange(0, BE)
    emask = offs_e < E
    t = pid_l.to(tl.int64) * BL + tl.arange(0, BL)
    xb = x_ptr + pid_b * s_xb
    bias, c0, c1, c2, c3 = _params(w_ptr, b_ptr, offs_e, emask, s_we, s_wk, K, HAS_BIAS, ACC, BE)
    x0 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 0, REVERSE, True, ACC, BL, BE)
    x1 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 1, REVERSE, K > 1, ACC, BL, BE)
    x2 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 2, REVERSE, K > 2, ACC, BL, BE)
    x3 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 3, REVERSE, K > 3, ACC, BL, BE)
    a = _pre(bias, c0, c1, c2, c3, x0, x1, x2, x3, K)
    u = a / (1.0 + tl.exp(-a))
    optr = out_ptr + pid_b * s_ob + t[:, None] * s_ol + offs_e[None, :] * s_oe
    tl.store(optr, u.to(out_ptr.dtype.element_ty), mask=(t < L)[:, None] & emask[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, g_ptr, dx_ptr, dwp_ptr, dbp_ptr, E, L, TILES,
                     s_xb, s_xe, s_xl, s_we, s_wk, s_gb, s_ge, s_gl, s_db, s_de, s_dl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr,
                     ACC: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    nchunks = tl.num_programs(1)
    offs_e = pid_e * BE + tl.arange(0, BE)
    emask = offs_e < E
    pb = pid_b.to(tl.int64)
    xb = x_ptr + pb * s_xb
    gb = g_ptr + pb * s_gb
    bias, c0, c1, c2, c3 = _params(w_ptr, b_ptr, offs_e, emask, s_we, s_wk, K, HAS_BIAS, ACC, BE)
    dw0 = tl.zeros((BL, BE), ACC)
    dw1 = tl.zeros((BL, BE), ACC)
    dw2 = tl.zeros((BL, BE), ACC)
    dw3 = tl.zeros((BL, BE), ACC)
    db = tl.zeros((BL, BE), ACC)
    for it in range(0, TILES):
        t = (pid_c.to(tl.int64) * TILES + it) * BL + tl.arange(0, BL)
        # x at lags -(K-1) .. K-1 of the tile's positions (negative: ahead in conv direction)
        xm3 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, -3, REVERSE, K > 3, ACC, BL, BE)
        xm2 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, -2, REVERSE, K > 2, ACC, BL, BE)
        xm1 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, -1, REVERSE, K > 1, ACC, BL, BE)
        x0 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 0, REVERSE, True, ACC, BL, BE)
        x1 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 1, REVERSE, K > 1, ACC, BL, BE)
        x2 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 2, REVERSE, K > 2, ACC, BL, BE)
        x3 = _load_lag(xb, t, offs_e, emask, L, s_xe, s_xl, 3, REVERSE, K > 3, ACC, BL, BE)
        # gradient of the pre-activation at the tile's own positions: feeds ∂w, ∂b and ∂x
        g = _load_lag(gb, t, offs_e, emask, L, s_ge, s_gl, 0, REVERSE, True, ACC, BL, BE)
        gp0 = _silu_grad(g, _pre(bias, c0, c1, c2, c3, x0, x1, x2, x3, K))
        db += gp0
        dw0 += gp0 * x0
        dx = c0[None, :] * gp0
        # positions j = 1..K-1 lags ahead, whose outputs read this tile's x through tap c_j
        if K > 1:
            dw1 += gp0 * x1
            g = _load_lag(gb, t, offs_e, emask, L, s_ge, s_gl, -1, REVERSE, True, ACC, BL, BE)
            dx += c1[None, :] * _silu_grad(g, _pre(bias, c0, c1, c2, c3, xm1, x0, x1, x2, K))
        if K > 2:
            dw2 += gp0 * x2
            g = _load_lag(gb, t, offs_e, emask, L, s_ge, s_gl, -2, REVERSE, True, ACC, BL, BE)
            dx += c2[None, :] * _silu_grad(g, _pre(bias, c0, c1, c2, c3, xm2, xm1, x0, x1, K))
        if K > 3:
            dw3 += gp0 * x3
            g = _load_lag(gb, t, offs_e, emask, L, s_ge, s_gl, -3, REVERSE, True, ACC, BL, BE)
            dx += c3[None, :] * _silu_grad(g, _pre(bias, c0, c1, c2, c3, xm3, xm2, xm1, x0, K))
        dptr = dx_ptr + pb * s_db + t[:, None] * s_dl + offs_e[None, :] * s_de
        tl.store(dptr, dx.to(dx_ptr.dtype.element_ty), mask=(t < L)[:, None] & emask[None, :])
    row = pb * nchunks + pid_c  # partial rows (batch, nchunks), flattened
    tl.store(dbp_ptr + row * E + offs_e, tl.sum(db, 0), mask=emask)
    wrow = dwp_ptr + row * K * E + offs_e
    tl.store(wrow, tl.sum(dw0, 0), mask=emask)
    if K > 1:
        tl.store(wrow + E, tl.sum(dw1, 0), mask=emask)
    if K > 2:
        tl.store(wrow + 2 * E, tl.sum(dw2, 0), mask=emask)
    if K > 3:
        tl.store(wrow + 3 * E, tl.sum(dw3, 0), mask=emask)


# --------------------------------------------------------------------------- launchers
def _acc_dtype(x: Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def _empty(*shape, dtype, device):
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON else t


def _channels_last(batch: int, E: int, L: int, like: Tensor) -> Tensor:
    """An empty (batch, E, L) tensor backed by a contiguous (batch, L, E) buffer."""
    return _empty(batch, L, E, dtype=like.dtype, device=like.device).transpose(1, 2)


def conv_triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                        reverse: bool = False) -> Tensor:
    """silu(conv(x) + bias) without autograd (nothing is saved: the backward recomputes).

    x (batch, E, L) fp32/fp16/bf16/fp64, any strides; weight (E, K) and bias (E,) or None in
    x's dtype, 1 <= K <= 4 (not checked here). Returns u (batch, E, L) in x's dtype, the
    transposed view of a contiguous (batch, L, E) buffer.
    """
    w = weight
    batch, E, L = x.shape
    K = w.shape[1]
    out = _channels_last(batch, E, L, x)
    acc, _ = _acc_dtype(x)
    grid = (triton.cdiv(E, FWD_BE), triton.cdiv(L, FWD_BL), batch)
    _conv_fwd_kernel[grid](
        x, w, bias if bias is not None else w, out, E, L,
        *x.stride(), *w.stride(), *out.stride(),
        K=K, HAS_BIAS=bias is not None, REVERSE=reverse, ACC=acc, BL=FWD_BL, BE=FWD_BE,
        num_warps=FWD_WARPS)
    return out


def conv_triton_backward(g: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                         reverse: bool = False, dx_out: Tensor | None = None):
    """The gradients of :func:`conv_triton_forward` from the forward's inputs.

    g (batch, E, L) the gradient of u, any strides; x, weight, bias as the forward got them.
    Returns (dx (batch, E, L) in x's dtype, channels-last unless ``dx_out`` (x's shape and
    dtype, any strides) is given and receives it; dweight (E, K) and dbias (E,) or None, summed
    in float32 (float64 for float64 x) from per-program partials).
    """
    w = weight
    batch, E, L = x.shape
    K = w.shape[1]
    acc, acc_t = _acc_dtype(x)
    dx = dx_out if dx_out is not None else _channels_last(batch, E, L, x)
    tiles = min(BWD_TILES, triton.cdiv(L, BWD_BL))
    nchunks = triton.cdiv(L, BWD_BL * tiles)
    dwp = _empty(batch, nchunks, K, E, dtype=acc_t, device=x.device)
    dbp = _empty(batch, nchunks, E, dtype=acc_t, device=x.device)
    grid = (triton.cdiv(E, BWD_BE), nchunks, batch)
    _conv_bwd_kernel[grid](
        x, w, bias if bias is not None else w, g, dx, dwp, dbp, E, L, tiles,
        *x.stride(), *w.stride(), *g.stride(), *dx.stride(),
        K=K, HAS_BIAS=bias is not None, REVERSE=reverse, ACC=acc, BL=BWD_BL, BE=BWD_BE,
        num_warps=BWD_WARPS)
    # dwp[..., i, :] is the gradient of tap c_i = weight[:, K-1-i]
    dw = dwp.sum((0, 1)).flip(0).t()
    db = dbp.sum((0, 1)) if bias is not None else None
    return dx, dw, db


class _CausalConv1dSiluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, reverse):
        # Parameters rounded to x's dtype (by torch, round-to-nearest-even: no-ops when the
        # dtypes agree); their gradients still come back in their own dtypes.
        wr = w.to(x.dtype)
        br = bias.to(x.dtype) if bias is not None else None
        out = conv_triton_forward(x, wr, br, reverse)
        ctx.save_for_backward(x, wr, br)
        ctx.reverse = reverse
        ctx.dtypes = (w.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        x, wr, br = ctx.saved_tensors
        dx, dw, db = conv_triton_backward(g, x, wr, br, ctx.reverse)
        return dx, dw.to(ctx.dtypes[0]), None if db is None else db.to(ctx.dtypes[1]), None


def causal_conv1d_silu_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                              reverse: bool = False) -> Tensor:
    """The differentiable Triton conv + SiLU; arguments checked by
    :func:`seqlab.kernels.causal_conv1d_silu`: x (batch, E, L), weight (E, K) with K <= 4,
    bias (E,) or None. Returns u (batch, E, L) in x's dtype, the transposed view of a
    contiguous (batch, L, E) buffer; gradients flow to x, weight and bias."""
    return _CausalConv1dSiluFn.apply(x, weight, bias, bool(reverse))


# --------------------------------------------------------------------------- decoding
@triton.jit
def _conv_update_kernel(x_ptr, s_ptr, w_ptr, b_ptr, out_ptr, E,
                        s_xb, s_xe, s_sb, s_se, s_sk, s_we, s_wk, s_ob, s_oe,
                        K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SILU: tl.constexpr, BE: tl.constexpr):
    """One decoding step for BE channels of one row: state <- [state[1:], x] (in place) and
    out = silu(bias + <state, w>) (the conv output at the new position)."""
    pid_e = tl.program_id(0)
    pb = tl.program_id(1).to(tl.int64)
    offs_e = pid_e * BE + tl.arange(0, BE)
    emask = offs_e < E
    offs_k = tl.arange(0, KP)
    kmask = offs_k < K
    m = emask[:, None] & kmask[None, :]
    sp = s_ptr + pb * s_sb + offs_e[:, None] * s_se
    # new state: column k is the old column k + 1, the last column is x
    old = tl.load(sp + (offs_k[None, :] + 1) * s_sk, mask=m & (offs_k[None, :] + 1 < K),
                  other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pb * s_xb + offs_e * s_xe, mask=emask, other=0.0).to(tl.float32)
    new = tl.where(offs_k[None, :] == K - 1, x[:, None], old)
    w = tl.load(w_ptr + offs_e[:, None] * s_we + offs_k[None, :] * s_wk, mask=m,
                other=0.0).to(tl.float32)
    acc = tl.sum(new * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_e, mask=emask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.debug_barrier()  # every thread has read the old state before any overwrites it
    tl.store(sp + offs_k[None, :] * s_sk, new.to(s_ptr.dtype.element_ty), mask=m)
    tl.store(out_ptr + pb * s_ob + offs_e * s_oe, acc.to(out_ptr.dtype.element_ty), mask=emask)


UPDATE_BE = 128


def causal_conv1d_update_triton(x: Tensor, conv_state: Tensor, weight: Tensor,
                                bias: Tensor | None = None, silu: bool = True) -> Tensor:
    """One decoding step in one launch (arguments checked by
    :func:`seqlab.kernels.causal_conv1d_update`): x (batch, E), conv_state (batch, E, K) shifted
    in place, weight (E, K), K <= 64, bias (E,) or None; the parameters are rounded to x's dtype
    first and the sums are float32. Returns the output at the new position, (batch, E) in x's
    dtype."""
    batch, E = x.shape
    K = conv_state.shape[2]
    w = weight.to(x.dtype)
    b = bias.to(x.dtype) if bias is not None else None
    out = _empty(batch, E, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(E, UPDATE_BE), batch)
    _conv_update_kernel[grid](
        x, conv_state, w, b if b is not None else w, out, E,
        *x.stride(), *conv_state.stride(), *w.stride(), *out.stride(),
        K=K, KP=triton.next_power_of_2(K), HAS_BIAS=b is not None, SILU=bool(silu),
        BE=UPDATE_BE, num_warps=4)
    return out
