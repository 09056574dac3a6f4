"""Selective scan (S6) in Triton: fused forward and backward with segmented state passing.

Layout and names follow :mod:`seqlab.kernels.scan.reference`: u, delta, z (batch, dim, L) in
float32/float16/bfloat16 with any strides; A (dim, N) float32; B, C (batch, N, L) or
(batch, G, N, L); D, delta_bias (dim,) float32. Every load is upcast to float32 at once and
all arithmetic is float32.

Structure. A program owns BD channels of one sequence and one segment of T scan steps; its
state (BD, N) lives in registers.  Inputs are read as (BD, 8) and (N, 8) tiles (8 time steps,
coalesced along L for the usual (b, d, l) layout), split into columns in registers, and the
next tile is prefetched while one is computed.

forward (segments of T steps, S of them)
    1. ``_fwd_kernel`` (WRITE_OUT=False): the end state of segments 0..S-2 from h = 0 and
       their sums of Δ (a segment's decay is exp(A ΣΔ)).  Skipped when there is one segment.
    2. ``_combine_kernel``: a short sequential scan over segments giving each segment's start
       state; ``initial_state`` enters here.
    3. ``_fwd_kernel`` (WRITE_OUT=True): rerun each segment from its start state, write out,
       ``last_state``, and the state before every K steps (checkpoints indexed by
       position, N/K float32 per element of u: the only activation the backward keeps besides
       the inputs).  The (batch, dim, L, N) states never reach HBM.
backward (its own segmentation, Tb steps x Sb: it wants more parallelism than the forward,
    whose step 1 costs a pass per extra segment; it restarts from any K-step checkpoint)
    1. ``_bwd_local_kernel``: the adjoint at the start of segments 1..Sb-1 from a zero adjoint
       at their end (needs no h), and their ΣΔ.  Skipped when there is one segment.
    2. ``_combine_kernel`` run backwards over segments: the adjoint entering each segment's end;
       ``∂last_state`` enters here.
    3. ``_bwd_kernel`` (a persistent grid looping over (sequence, segment, channel block)
       work items): per segment, for each K-step sub-chunk from the last:
       recompute h from its checkpoint, storing it every 4 steps into the program's scratch
       slot (and ∂z, which needs the pre-gate y, and ∂C), then run the adjoint backwards over
       it, recomputing each 4-step chunk's states in registers.  ∂B, ∂C are reduced over the
       BD channels in registers and added atomically into one float32 buffer per group
       (``ScanTuning(dbc="partials")``: per-block partials summed afterwards, bitwise
       reproducible).

The settings of this split (K, the segment counts, the backward's grid and register cap, the
∂B/∂C summation) are a :class:`~seqlab.kernels.scan.tuning.ScanTuning`, measured defaults.
:class:`ScanPlan`, :func:`scan_triton_forward` and :func:`scan_triton_backward` are the
autograd-free forward and backward, for callers that build their own autograd function around
the scan (the recomputing mixer of :mod:`seqlab.model.fused_mixer`);
:func:`selective_scan_triton` is the differentiable scan behind ``impl="triton"``.

Layouts: ``out`` and ∂u, ∂δ, ∂z are allocated like u, δ, z: channels-last (a (batch, L, dim)
buffer transposed, stride(1) == 1, as nn.Linear hands them over) when the input is, else
contiguous, so the model does not copy them between layouts.

Scan order: step k = 0..len-1 of a sequence reads position t = bos + k, or t = bos + len-1-k
with ``reverse``: no flipped copies.  Padded steps (k >= len) get Δ = 0, so Ā = 1 and ΔBu = 0,
and the carried state passes through untouched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import ScanTuning

Tensor = torch.Tensor
LOG2E = 1.4426950408889634
# Tests set this to fill every output buffer with NaN before the kernels write it, so an element
# a kernel forgets to write cannot pass as a plausible value.
POISON = False


def _empty(*shape, dtype, device):
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON else t


def _empty_as(x: Tensor, dtype=None) -> Tensor:
    """Uninitialised (batch, dim, L) buffer laid out like x: channels-last (the (batch, L, dim)
    buffer transposed, stride(1) == 1, as nn.Linear produces it) when x is, else contiguous.
    Writing gradients and outputs in their input's layout spares the model a strided copy."""
    batch, dim, L = x.shape
    dtype = dtype or x.dtype
    if x.stride(1) == 1 and dim > 1:
        return _empty(batch, L, dim, dtype=dtype, device=x.device).transpose(1, 2)
    return _empty(batch, dim, L, dtype=dtype, device=x.device)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _delta_of(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Δ from raw delta (float32): + bias, then softplus with passthrough above 20."""
    x = raw
    if HAS_BIAS:
        x = x + bias
    if SOFTPLUS:
        x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    return x


@triton.jit
def _channel_vec(ptr, offs_d, dmask, HAS: tl.constexpr, BD: tl.constexpr):
    """(BD,) float32 per-channel parameter (delta_bias, D), or zeros when it is absent."""
    if HAS:
        return tl.load(ptr + offs_d, mask=dmask, other=0.0)
    return tl.zeros([BD], dtype=tl.float32)


@triton.jit
def _seq_bounds(cu_ptr, i, L, VARLEN: tl.constexpr):
    """(row of the batch axis, first position, length) of sequence i, all int64."""
    if VARLEN:
        bos = tl.load(cu_ptr + i).to(tl.int64)
        seqlen = tl.load(cu_ptr + i + 1).to(tl.int64) - bos
        row = i * 0
    else:
        bos = i * 0
        seqlen = L + i * 0
        row = i
    return row, bos, seqlen


@triton.jit
def _split8(x):
    """(R, 8) -> its 8 columns (R,), through in-register splits (no reductions)."""
    R: tl.constexpr = x.shape[0]
    e, o = tl.split(tl.reshape(x, (R, 4, 2)))
    ee, eo = tl.split(tl.reshape(e, (R, 2, 2)))
    oe, oo = tl.split(tl.reshape(o, (R, 2, 2)))
    c0, c4 = tl.split(ee)
    c2, c6 = tl.split(eo)
    c1, c5 = tl.split(oe)
    c3, c7 = tl.split(oo)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7):
    """Inverse of _split8: 8 columns (R,) -> (R, 8)."""
    R: tl.constexpr = c0.shape[0]
    e = tl.reshape(tl.join(tl.join(c0, c4), tl.join(c2, c6)), (R, 4))
    o = tl.reshape(tl.join(tl.join(c1, c5), tl.join(c3, c7)), (R, 4))
    return tl.reshape(tl.join(e, o), (R, 8))


@triton.jit
def _chunk_pos(k0, c, bos, seqlen, REVERSE: tl.constexpr):
    """Positions (8,) int64 of steps k0 + 8c .. +7 and their validity."""
    k = k0 + c * 8 + tl.arange(0, 8)
    if REVERSE:
        t = bos + seqlen - 1 - k
    else:
        t = bos + k
    return t, k < seqlen


@triton.jit
def _fstep(h, A2, d, x, Bv):
    """h <- exp(Δ A) h + (Δ u) B for one step; d, x (BD,), Bv (NP,)."""
    return tl.exp2(d[:, None] * A2) * h + x[:, None] * Bv[None, :]


@triton.jit
def _fstep_y(h, A2, d, x, Bv, Cv):
    h = tl.exp2(d[:, None] * A2) * h + x[:, None] * Bv[None, :]
    return h, tl.sum(h * Cv[None, :], axis=1)


@triton.jit
def _raw_tiles(u_base, su_l, dt_base, sdt_l, B_base, sB_l, C_base, sC_l, z_base, sz_l, t, m2,
               mn2, LOAD_C: tl.constexpr, LOAD_Z: tl.constexpr):
    """One chunk's tiles in their storage dtypes: u, delta, z (BD, 8); B, C (NP, 8).  Tiles not
    needed are stand-ins (u for z, B for C) so the loop-carried types stay fixed."""
    u = tl.load(u_base[:, None] + t[None, :] * su_l, mask=m2, other=0.0)
    raw = tl.load(dt_base[:, None] + t[None, :] * sdt_l, mask=m2, other=0.0)
    Bt = tl.load(B_base[:, None] + t[None, :] * sB_l, mask=mn2, other=0.0)
    if LOAD_C:
        Ct = tl.load(C_base[:, None] + t[None, :] * sC_l, mask=mn2, other=0.0)
    else:
        Ct = Bt
    if LOAD_Z:
        zt = tl.load(z_base[:, None] + t[None, :] * sz_l, mask=m2, other=0.0)
    else:
        zt = u
    return u, raw, Bt, Ct, zt


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A2_ptr, D_ptr, bias_ptr, cu_ptr,
    out_ptr, start_ptr, hend_ptr, dsum_ptr, last_ptr, ckpt_ptr,
    L, dim, N, dpg, S, NCK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sst_i, sst_s, sst_d, sst_n,
    T: tl.constexpr, K: tl.constexpr, HAS_START: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr, WRITE_OUT: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
    HAS_DSUM: tl.constexpr = False,
):
    """WRITE_OUT=False: end states of segments 0..S-2 from h = 0 into hend, ΣΔ into dsum (the
    last segment's end state feeds nothing, so it is not launched).
    WRITE_OUT=True: out from each segment's start state; last_state; the state before every
    K-step sub-chunk into ckpt (nseq, NCK, dim, N) float32 (entry p/K holds the state before
    position p of the sequence), the backward's restart points."""
    pid_d = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2).to(tl.int64)
    row, bos, seqlen = _seq_bounds(cu_ptr, i, L, VARLEN)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    dmask = offs_d < dim
    nmask = offs_n < N
    tmask = dmask[:, None] & nmask[None, :]
    grp = (pid_d * BD) // dpg
    A2 = tl.load(A2_ptr + offs_d[:, None] * N + offs_n[None, :], mask=tmask, other=0.0)
    bias = _channel_vec(bias_ptr, offs_d, dmask, HAS_BIAS, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=dmask, other=0.0)
    od = offs_d.to(tl.int64)
    u_base = u_ptr + row * su_b + od * su_d
    dt_base = dt_ptr + row * sdt_b + od * sdt_d
    z_base = z_ptr + row * sz_b + od * sz_d
    o_base = out_ptr + row * so_b + od * so_d
    B_base = B_ptr + row * sB_b + grp * sB_g + offs_n * sB_n
    C_base = C_ptr + row * sC_b + grp * sC_g + offs_n * sC_n
    st_offs = offs_d[:, None] * sst_d + offs_n[None, :] * sst_n
    if HAS_START:
        h = tl.load(start_ptr + i * sst_i + s * sst_s + st_offs, mask=tmask, other=0.0)
    else:
        h = tl.zeros([BD, NP], dtype=tl.float32)
    dacc = tl.zeros([BD, 8], dtype=tl.float32)  # ΣΔ per lane, reduced once at the end
    k0 = s * T
    ck_base = ckpt_ptr + (i * NCK + s * (T // K)) * dim * N + offs_d[:, None] * N + offs_n[None, :]
    # Software prefetch: the raw tiles of chunk c+1 are loaded while chunk c is computed, so a
    # program's load latency overlaps its own arithmetic (a plain loop stalls on every chunk).
    t, valid = _chunk_pos(k0, 0, bos, seqlen, REVERSE)
    nu, nraw, nB, nC, nz = _raw_tiles(u_base, su_l, dt_base, sdt_l, B_base, sB_l, C_base, sC_l,
                                      z_base, sz_l, t, dmask[:, None] & valid[None, :],
                                      nmask[:, None] & valid[None, :], WRITE_OUT, HAS_Z)
    for c in range(T // 8):
        if WRITE_OUT:
            if c % (K // 8) == 0:
                tl.store(ck_base + (c // (K // 8)) * dim * N, h, mask=tmask)
        t, valid = _chunk_pos(k0, c, bos, seqlen, REVERSE)
        m2 = dmask[:, None] & valid[None, :]
        ru, rraw, rB, rC, rz = nu, nraw, nB, nC, nz
        tn, valid_n = _chunk_pos(k0, c + 1, bos, seqlen, REVERSE)
        nu, nraw, nB, nC, nz = _raw_tiles(u_base, su_l, dt_base, sdt_l, B_base, sB_l, C_base,
                                          sC_l, z_base, sz_l, tn, dmask[:, None] & valid_n[None, :],
                                          nmask[:, None] & valid_n[None, :], WRITE_OUT, HAS_Z)
        u = ru.to(tl.float32)
        delta = tl.where(m2, _delta_of(rraw.to(tl.float32), bias[:, None], HAS_BIAS, SOFTPLUS),
                         0.0)
        x = delta * u
        d0, d1, d2, d3, d4, d5, d6, d7 = _split8(delta)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x)
        B0, B1, B2, B3, B4, B5, B6, B7 = _split8(rB.to(tl.float32))
        if WRITE_OUT:
            C0, C1, C2, C3, C4, C5, C6, C7 = _split8(rC.to(tl.float32))
            h, y0 = _fstep_y(h, A2, d0, x0, B0, C0)
            h, y1 = _fstep_y(h, A2, d1, x1, B1, C1)
            h, y2 = _fstep_y(h, A2, d2, x2, B2, C2)
            h, y3 = _fstep_y(h, A2, d3, x3, B3, C3)
            h, y4 = _fstep_y(h, A2, d4, x4, B4, C4)
            h, y5 = _fstep_y(h, A2, d5, x5, B5, C5)
            h, y6 = _fstep_y(h, A2, d6, x6, B6, C6)
            h, y7 = _fstep_y(h, A2, d7, x7, B7, C7)
            y = _join8(y0, y1, y2, y3, y4, y5, y6, y7)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zt = rz.to(tl.float32)
                y = y * zt * tl.sigmoid(zt)
            tl.store(o_base[:, None] + t[None, :] * so_l, y.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            h = _fstep(h, A2, d0, x0, B0)
            h = _fstep(h, A2, d1, x1, B1)
            h = _fstep(h, A2, d2, x2, B2)
            h = _fstep(h, A2, d3, x3, B3)
            h = _fstep(h, A2, d4, x4, B4)
            h = _fstep(h, A2, d5, x5, B5)
            h = _fstep(h, A2, d6, x6, B6)
            h = _fstep(h, A2, d7, x7, B7)
        if HAS_DSUM:
            dacc += delta
    # hend / dsum / last are contiguous float32: (nseq, S, dim, N), (nseq, S, dim), (nseq, dim, N)
    if WRITE_OUT:
        if s == S - 1:
            tl.store(last_ptr + i * dim * N + offs_d[:, None] * N + offs_n[None, :], h,
                     mask=tmask)
    else:
        tl.store(hend_ptr + (i * S + s) * dim * N + offs_d[:, None] * N + offs_n[None, :], h,
                 mask=tmask)
        if HAS_DSUM:
            tl.store(dsum_ptr + (i * S + s) * dim + offs_d, tl.sum(dacc, axis=1), mask=dmask)


@triton.jit
def _combine_kernel(loc_ptr, dsum_ptr, A2_ptr, init_ptr, carry_ptr, S, DN, N,
                    HAS_INIT: tl.constexpr, BACKWARD: tl.constexpr, BLK: tl.constexpr):
    """Scan over segments: c <- exp(A ΣΔ_s) c + loc_s, storing c before each segment.

    Forward (BACKWARD=False) c is the state entering segment s; backward it is the adjoint
    entering segment s from its end.  Only S - 1 segments are folded (the last one visited
    feeds nothing: the forward's final state and the backward's ∂h0 come from the main
    kernels), so its loc slot is never read.  loc/carry (nseq, S, dim, N), dsum (nseq, S,
    dim), init (nseq, dim, N); all contiguous float32.
    """
    i = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLK + tl.arange(0, BLK)
    m = offs < DN
    a2 = tl.load(A2_ptr + offs, mask=m, other=0.0)
    if HAS_INIT:
        c = tl.load(init_ptr + i * DN + offs, mask=m, other=0.0)
    else:
        c = tl.zeros([BLK], dtype=tl.float32)
    for j in range(S):
        if BACKWARD:
            s = S - 1 - j
        else:
            s = j
        base = (i * S + s) * DN
        tl.store(carry_ptr + base + offs, c, mask=m)
        if j < S - 1:
            ds = tl.load(dsum_ptr + (i * S + s) * (DN // N) + offs // N, mask=m, other=0.0)
            c = tl.exp2(a2 * ds) * c + tl.load(loc_ptr + base + offs, mask=m, other=0.0)


@triton.jit
def _raw_local(g_base, sg_l, z_base, sz_l, dt_base, sdt_l, C_base, sC_l, t, m2, mn2,
               HAS_Z: tl.constexpr):
    """The tiles of one chunk that the segment-local adjoint reads, in their storage dtypes: g, z
    (a stand-in without z), delta (BD, 8) and C (NP, 8)."""
    gt = tl.load(g_base[:, None] + t[None, :] * sg_l, mask=m2, other=0.0)
    if HAS_Z:
        zt = tl.load(z_base[:, None] + t[None, :] * sz_l, mask=m2, other=0.0)
    else:
        zt = gt
    raw = tl.load(dt_base[:, None] + t[None, :] * sdt_l, mask=m2, other=0.0)
    Ct = tl.load(C_base[:, None] + t[None, :] * sC_l, mask=mn2, other=0.0)
    return gt, zt, raw, Ct


@triton.jit
def _bwd_local_kernel(
    g_ptr, dt_ptr, z_ptr, C_ptr, A2_ptr, bias_ptr, cu_ptr, muloc_ptr, dsum_ptr,
    L, dim, N, dpg, S,
    sg_b, sg_d, sg_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sC_b, sC_g, sC_n, sC_l,
    T: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, VARLEN: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Adjoint at the start of segments 1..S-1 (∂L/∂h just before it) from a zero adjoint at
    its end, and their ΣΔ (dsum (nseq, S, dim)), which the combine needs to carry adjoints across
    them; segment 0's would only feed ∂h0, which the main kernel computes exactly."""
    pid_d = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64) + 1
    i = tl.program_id(2).to(tl.int64)
    row, bos, seqlen = _seq_bounds(cu_ptr, i, L, VARLEN)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    dmask = offs_d < dim
    nmask = offs_n < N
    tmask = dmask[:, None] & nmask[None, :]
    grp = (pid_d * BD) // dpg
    A2 = tl.load(A2_ptr + offs_d[:, None] * N + offs_n[None, :], mask=tmask, other=0.0)
    bias = _channel_vec(bias_ptr, offs_d, dmask, HAS_BIAS, BD)
    g_base = g_ptr + row * sg_b + offs_d.to(tl.int64) * sg_d
    dt_base = dt_ptr + row * sdt_b + offs_d.to(tl.int64) * sdt_d
    z_base = z_ptr + row * sz_b + offs_d.to(tl.int64) * sz_d
    C_base = C_ptr + row * sC_b + grp * sC_g + offs_n * sC_n
    mu = tl.zeros([BD, NP], dtype=tl.float32)
    dacc = tl.zeros([BD, 8], dtype=tl.float32)
    k0 = s * T
    t, valid = _chunk_pos(k0, T // 8 - 1, bos, seqlen, REVERSE)
    ng, nz, nraw, nC = _raw_local(g_base, sg_l, z_base, sz_l, dt_base, sdt_l, C_base, sC_l, t,
                                  dmask[:, None] & valid[None, :],
                                  nmask[:, None] & valid[None, :], HAS_Z)
    for cc in tl.range(T // 8, num_stages=STAGES):
        t, valid = _chunk_pos(k0, T // 8 - 1 - cc, bos, seqlen, REVERSE)
        m2 = dmask[:, None] & valid[None, :]
        # the previous chunk's tiles load while this one is computed (as in the forward)
        rg, rz, rraw, rC = ng, nz, nraw, nC
        tn, vn = _chunk_pos(k0, T // 8 - 2 - cc, bos, seqlen, REVERSE)
        vn = vn & (cc + 1 < T // 8)
        ng, nz, nraw, nC = _raw_local(g_base, sg_l, z_base, sz_l, dt_base, sdt_l, C_base,
                                      sC_l, tn, dmask[:, None] & vn[None, :],
                                      nmask[:, None] & vn[None, :], HAS_Z)
        gy = rg.to(tl.float32)
        if HAS_Z:
            zt = rz.to(tl.float32)
            gy = gy * zt * tl.sigmoid(zt)
        delta = tl.where(m2, _delta_of(rraw.to(tl.float32), bias[:, None], HAS_BIAS, SOFTPLUS),
                         0.0)
        Ct = rC.to(tl.float32)
        dacc += delta
        d0, d1, d2, d3, d4, d5, d6, d7 = _split8(delta)
        g0, g1, g2, g3, g4, g5, g6, g7 = _split8(gy)
        C0, C1, C2, C3, C4, C5, C6, C7 = _split8(Ct)
        mu = tl.exp2(d7[:, None] * A2) * (g7[:, None] * C7[None, :] + mu)
        mu = tl.exp2(d6[:, None] * A2) * (g6[:, None] * C6[None, :] + mu)
        mu = tl.exp2(d5[:, None] * A2) * (g5[:, None] * C5[None, :] + mu)
        mu = tl.exp2(d4[:, None] * A2) * (g4[:, None] * C4[None, :] + mu)
        mu = tl.exp2(d3[:, None] * A2) * (g3[:, None] * C3[None, :] + mu)
        mu = tl.exp2(d2[:, None] * A2) * (g2[:, None] * C2[None, :] + mu)
        mu = tl.exp2(d1[:, None] * A2) * (g1[:, None] * C1[None, :] + mu)
        mu = tl.exp2(d0[:, None] * A2) * (g0[:, None] * C0[None, :] + mu)
    tl.store(muloc_ptr + (i * S + s) * dim * N + offs_d[:, None] * N + offs_n[None, :], mu,
             mask=tmask)
    tl.store(dsum_ptr + (i * S + s) * dim + offs_d, tl.sum(dacc, axis=1), mask=dmask)


# --------------------------------------------------------------------------- backward
@triton.jit
def _split4(x):
    """(R, 4) -> its 4 columns (R,)."""
    R: tl.constexpr = x.shape[0]
    e, o = tl.split(tl.reshape(x, (R, 2, 2)))
    c0, c2 = tl.split(e)
    c1, c3 = tl.split(o)
    return c0, c1, c2, c3


@triton.jit
def _join4(c0, c1, c2, c3):
    """Inverse of _split4."""
    R: tl.constexpr = c0.shape[0]
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (R, 4))


@triton.jit
def _pos(k0, c, CH: tl.constexpr, bos, seqlen, REVERSE: tl.constexpr):
    """Positions (CH,) int64 of steps k0 + CH c .. + CH-1 and their validity."""
    k = k0 + c * CH + tl.arange(0, CH)
    if REVERSE:
        t = bos + seqlen - 1 - k
    else:
        t = bos + k
    return t, (k < seqlen) & (k >= 0)


@triton.jit
def _raw_bwd(u_base, su_l, dt_base, sdt_l, B_base, sB_l, C_base, sC_l, z_base, sz_l, g_base, sg_l,
             t, m2, mn2, HAS_Z: tl.constexpr):
    """One chunk's tiles in their storage dtypes: u, delta, z, g (BD, CH); B, C (NP, CH); z is a
    stand-in (u) without z so the loop-carried types stay fixed."""
    u = tl.load(u_base[:, None] + t[None, :] * su_l, mask=m2, other=0.0)
    raw = tl.load(dt_base[:, None] + t[None, :] * sdt_l, mask=m2, other=0.0)
    Bt = tl.load(B_base[:, None] + t[None, :] * sB_l, mask=mn2, other=0.0)
    Ct = tl.load(C_base[:, None] + t[None, :] * sC_l, mask=mn2, other=0.0)
    gt = tl.load(g_base[:, None] + t[None, :] * sg_l, mask=m2, other=0.0)
    if HAS_Z:
        zt = tl.load(z_base[:, None] + t[None, :] * sz_l, mask=m2, other=0.0)
    else:
        zt = u
    return u, raw, Bt, Ct, zt, gt


@triton.jit
def _gate(rg, rz, HAS_Z: tl.constexpr):
    """(g, gy = g silu(z), sigmoid(z), z) in float32 from raw tiles (z terms are stand-ins
    without z)."""
    g = rg.to(tl.float32)
    if HAS_Z:
        zt = rz.to(tl.float32)
        sz = tl.sigmoid(zt)
        gy = g * zt * sz
    else:
        zt = g
        sz = g
        gy = g
    return g, gy, sz, zt


@triton.jit
def _p1step(h, A2, d, x, Bv, Cv, gy, HAS_Z: tl.constexpr):
    """Recompute step of pass 1: h_t; y_t (pre-gate, without D u) when z needs it; ∂C_t summed
    over the block's channels."""
    h = tl.exp2(d[:, None] * A2) * h + x[:, None] * Bv[None, :]
    dc = tl.sum(gy[:, None] * h, axis=0)
    if HAS_Z:
        y = tl.sum(h * Cv[None, :], axis=1)
    else:
        y = gy
    return h, y, dc


@triton.jit
def _p2step(mu, dA_acc, s, A2, d, x, Bv, Cv, gy):
    """Adjoint step t (from the last): mu = ∂L/∂h_t from later steps (decayed), s = h_{t-1}.
    Returns the decayed adjoint for t-1, dA_acc, Σ_n λ B (∂u / Δ, (BD,)), Σ_n A2 λ Ā h_{t-1}
    ((BD,), ∂Δ's decay term / ln 2) and ∂B_t summed over the block's channels (NP,)."""
    lam = gy[:, None] * Cv[None, :] + mu
    db = tl.sum(lam * x[:, None], axis=0)
    lb = tl.sum(lam * Bv[None, :], axis=1)
    # Ā_t again rather than kept from the recompute: 4 (BD, NP) tiles fewer live registers.
    # (d + 0.0 is not folded, so the compiler cannot reuse the recompute's values.)
    mu = tl.exp2((d + 0.0)[:, None] * A2) * lam
    ge = mu * s  # λ_t Ā_t h_{t-1}: gradient of the exponent Δ A
    dA_acc += d[:, None] * ge
    return mu, dA_acc, lb, tl.sum(A2 * ge, axis=1), db


@triton.jit
def _store_bc4(base, t, valid, N, offs_n, nmask, v0, v1, v2, v3, ATOMIC: tl.constexpr):
    """Store 4 steps' (NP,) ∂B or ∂C partials as one (NP, 4) tile into the (L, N) rows, or add
    them (ATOMIC) into the group's float32 rows that every channel block of the group adds to."""
    ptrs = base + t[None, :] * N + offs_n[:, None]
    m = nmask[:, None] & valid[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, _join4(v0, v1, v2, v3), mask=m, sem="relaxed")
    else:
        tl.store(ptrs, _join4(v0, v1, v2, v3), mask=m)


@triton.jit
def _bwd_kernel(
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A2_ptr, D_ptr, bias_ptr, cu_ptr, g_ptr,
    ckpt_ptr, muend_ptr, scratch_ptr,
    du_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbp_ptr, dinit_ptr,
    L, dim, N, dpg, S, n_work, ndb, NCK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    smu_i, smu_s, smu_d, smu_n,
    sdu_b, sdu_d, sdu_l, sdd_b, sdd_d, sdd_l, sdz_b, sdz_d, sdz_l,
    T: tl.constexpr, K: tl.constexpr, HAS_MU: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, VARLEN: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr,
    STAGES: tl.constexpr, ATOMIC_BC: tl.constexpr = False,
):
    """Gradients: a persistent grid; each program loops over work items (one
    segment of one channel block of one sequence) and owns one scratch slot.

    Per K-step sub-chunk, from the last:
      pass 1 runs h forward from the forward's checkpoint over 4-step tiles, the next tiles
        prefetched as in the forward; it writes ∂z (needs the pre-gate y), ∂C_t (reduced over
        the BD channels) and stores h every CH = 4 steps into scratch (K/4 states per
        sub-chunk: a quarter of the traffic of storing every step, ~4 GB per call at
        (8, 2048, 2048)).
      pass 2 walks the 4-step chunks backwards: it reloads the chunk's start state, recomputes
        the 3 states after it in registers and runs the adjoint over the 4 steps; ∂B_t reduced
        over the channels, ∂u and ∂Δ written per chunk.  The decays are computed again in the
        adjoint instead of being kept (4 tiles fewer live registers).
    Launched with maxnreg (plan.maxnreg) when one is set.

    muend (nseq, S, dim, N): the adjoint entering each segment's end (HAS_MU). ckpt: the
    forward's states before each K-step sub-chunk. dBp, dCp: (batch, dim/BD, L, N) partials
    (rows of N per step: the 4-step tiles are contiguous), or with ATOMIC_BC one zeroed float32
    (batch, G, L, N) buffer every block of a group adds into. du, ddt, dz in their inputs'
    layouts; dAp (nseq, S, dim, N), dDp, dbp (nseq, S, dim) per-segment partials; dinit
    (nseq, dim, N) the gradient of the initial state.
    """
    NSUB: tl.constexpr = T // K
    CH: tl.constexpr = 4
    NCH: tl.constexpr = K // CH
    TS: tl.constexpr = BD * NP
    LN2: tl.constexpr = 0.6931471805599453
    pid = tl.program_id(0)
    offs_bd = tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    nmask = offs_n < N
    tile = offs_bd[:, None] * NP + offs_n[None, :]
    hs_base = scratch_ptr + pid.to(tl.int64) * (NCH * TS)
    nprog = tl.num_programs(0)
    for w in range(pid, n_work, nprog):
        pid_d = w % ndb
        s = ((w // ndb) % S).to(tl.int64)
        i = (w // (ndb * S)).to(tl.int64)
        row, bos, seqlen = _seq_bounds(cu_ptr, i, L, VARLEN)
        offs_d = pid_d * BD + offs_bd
        dmask = offs_d < dim
        tmask = dmask[:, None] & nmask[None, :]
        grp = (pid_d * BD) // dpg
        A2 = tl.load(A2_ptr + offs_d[:, None] * N + offs_n[None, :], mask=tmask, other=0.0)
        bias = _channel_vec(bias_ptr, offs_d, dmask, HAS_BIAS, BD)
        Dv = _channel_vec(D_ptr, offs_d, dmask, HAS_D, BD)
        od = offs_d.to(tl.int64)
        u_base = u_ptr + row * su_b + od * su_d
        dt_base = dt_ptr + row * sdt_b + od * sdt_d
        z_base = z_ptr + row * sz_b + od * sz_d
        g_base = g_ptr + row * sg_b + od * sg_d
        du_base = du_ptr + row * sdu_b + od * sdu_d
        dd_base = ddt_ptr + row * sdd_b + od * sdd_d
        dz_base = dz_ptr + row * sdz_b + od * sdz_d
        B_base = B_ptr + row * sB_b + grp * sB_g + offs_n * sB_n
        C_base = C_ptr + row * sC_b + grp * sC_g + offs_n * sC_n
        if ATOMIC_BC:
            p_off = (row * (dim // dpg) + grp) * L * N  # (batch, G, L, N), shared by the group
        else:
            p_off = (row * ndb + pid_d) * L * N  # (batch, dim / BD, L, N), this block's own
        dB_base = dBp_ptr + p_off
        dC_base = dCp_ptr + p_off
        k0 = s * T
        ck_base = ckpt_ptr + (i * NCK + s * NSUB) * dim * N + offs_d[:, None] * N + offs_n[None, :]
        if HAS_MU:
            mu = tl.load(muend_ptr + i * smu_i + s * smu_s + offs_d[:, None] * smu_d
                         + offs_n[None, :] * smu_n, mask=tmask, other=0.0)
        else:
            mu = tl.zeros([BD, NP], dtype=tl.float32)
        dA_acc = tl.zeros([BD, NP], dtype=tl.float32)
        dD_acc = tl.zeros([BD, CH], dtype=tl.float32)  # summed over time once, at the end
        db_acc = tl.zeros([BD], dtype=tl.float32)
        for jj in range(NSUB):
            j = NSUB - 1 - jj
            # ---- pass 1: h forward over the sub-chunk; ∂z, ∂C; h every CH steps into scratch
            h = tl.load(ck_base + j * dim * N, mask=tmask, other=0.0)
            t, valid = _pos(k0, j * NCH, CH, bos, seqlen, REVERSE)
            nu, nraw, nB, nC, nz, ng = _raw_bwd(u_base, su_l, dt_base, sdt_l, B_base, sB_l, C_base,
                                                sC_l, z_base, sz_l, g_base, sg_l, t,
                                                dmask[:, None] & valid[None, :],
                                                nmask[:, None] & valid[None, :], HAS_Z)
            for cl in range(NCH):
                cq = j * NCH + cl
                t, valid = _pos(k0, cq, CH, bos, seqlen, REVERSE)
                m2 = dmask[:, None] & valid[None, :]
                ru, rraw, rB, rC, rz, rg = nu, nraw, nB, nC, nz, ng
                tn, vn = _pos(k0, cq + 1, CH, bos, seqlen, REVERSE)
                vn = vn & (cl + 1 < NCH)
                nu, nraw, nB, nC, nz, ng = _raw_bwd(u_base, su_l, dt_base, sdt_l, B_base, sB_l,
                                                    C_base, sC_l, z_base, sz_l, g_base, sg_l, tn,
                                                    dmask[:, None] & vn[None, :],
                                                    nmask[:, None] & vn[None, :], HAS_Z)
                tl.store(hs_base + cl * TS + tile, h)
                u = ru.to(tl.float32)
                delta = tl.where(m2, _delta_of(rraw.to(tl.float32), bias[:, None], HAS_BIAS,
                                               SOFTPLUS), 0.0)
                x = delta * u
                g, gy, sz, zt = _gate(rg, rz, HAS_Z)
                dD_acc += gy * u
                d0, d1, d2, d3 = _split4(delta)
                x0, x1, x2, x3 = _split4(x)
                B0, B1, B2, B3 = _split4(rB.to(tl.float32))
                C0, C1, C2, C3 = _split4(rC.to(tl.float32))
                g0, g1, g2, g3 = _split4(gy)
                h, y0, c0 = _p1step(h, A2, d0, x0, B0, C0, g0, HAS_Z)
                h, y1, c1 = _p1step(h, A2, d1, x1, B1, C1, g1, HAS_Z)
                h, y2, c2 = _p1step(h, A2, d2, x2, B2, C2, g2, HAS_Z)
                h, y3, c3 = _p1step(h, A2, d3, x3, B3, C3, g3, HAS_Z)
                _store_bc4(dC_base, t, valid, N, offs_n, nmask, c0, c1, c2, c3, ATOMIC_BC)
                if HAS_Z:
                    y = _join4(y0, y1, y2, y3) + Dv[:, None] * u
                    dz = g * y * sz * (1.0 + zt * (1.0 - sz))
                    tl.store(dz_base[:, None] + t[None, :] * sdz_l, dz.to(dz_ptr.dtype.element_ty),
                             mask=m2)
            tl.debug_barrier()
            # ---- pass 2: adjoint over the CH-step chunks, last first
            for cc in range(NCH):
                cl = NCH - 1 - cc
                cq = j * NCH + cl
                t, valid = _pos(k0, cq, CH, bos, seqlen, REVERSE)
                m2 = dmask[:, None] & valid[None, :]
                # no prefetch here: pass 1 has just brought these lines into L1/L2
                ru, rraw, rB, rC, rz, rg = _raw_bwd(u_base, su_l, dt_base, sdt_l, B_base, sB_l,
                                                    C_base, sC_l, z_base, sz_l, g_base, sg_l, t, m2,
                                                    nmask[:, None] & valid[None, :], HAS_Z)
                s0 = tl.load(hs_base + cl * TS + tile)
                u = ru.to(tl.float32)
                raw = rraw.to(tl.float32)
                delta = tl.where(m2, _delta_of(raw, bias[:, None], HAS_BIAS, SOFTPLUS), 0.0)
                x = delta * u
                g, gy, sz, zt = _gate(rg, rz, HAS_Z)
                d0, d1, d2, d3 = _split4(delta)
                x0, x1, x2, x3 = _split4(x)
                B0, B1, B2, B3 = _split4(rB.to(tl.float32))
                C0, C1, C2, C3 = _split4(rC.to(tl.float32))
                g0, g1, g2, g3 = _split4(gy)
                # the states before steps 1..3 of the chunk, in registers
                s1 = _fstep(s0, A2, d0, x0, B0)
                s2 = _fstep(s1, A2, d1, x1, B1)
                s3 = _fstep(s2, A2, d2, x2, B2)
                mu, dA_acc, l3, e3, b3 = _p2step(mu, dA_acc, s3, A2, d3, x3, B3, C3, g3)
                mu, dA_acc, l2, e2, b2 = _p2step(mu, dA_acc, s2, A2, d2, x2, B2, C2, g2)
                mu, dA_acc, l1, e1, b1 = _p2step(mu, dA_acc, s1, A2, d1, x1, B1, C1, g1)
                mu, dA_acc, l0, e0, b0 = _p2step(mu, dA_acc, s0, A2, d0, x0, B0, C0, g0)
                _store_bc4(dB_base, t, valid, N, offs_n, nmask, b0, b1, b2, b3, ATOMIC_BC)
                lb = _join4(l0, l1, l2, l3)
                ddelta = lb * u + LN2 * _join4(e0, e1, e2, e3)
                if SOFTPLUS:
                    pre = raw
                    if HAS_BIAS:
                        pre = raw + bias[:, None]
                    ddelta = ddelta * tl.where(pre > 20.0, 1.0, tl.sigmoid(pre))
                ddelta = tl.where(m2, ddelta, 0.0)
                db_acc += tl.sum(ddelta, axis=1)
                du = lb * delta + gy * Dv[:, None]
                tl.store(du_base[:, None] + t[None, :] * sdu_l, du.to(du_ptr.dtype.element_ty),
                         mask=m2)
                tl.store(dd_base[:, None] + t[None, :] * sdd_l,
                         ddelta.to(ddt_ptr.dtype.element_ty), mask=m2)
            tl.debug_barrier()
        pofs = (i * S + s) * dim
        tl.store(dAp_ptr + pofs * N + offs_d[:, None] * N + offs_n[None, :], dA_acc, mask=tmask)
        tl.store(dDp_ptr + pofs + offs_d, tl.sum(dD_acc, axis=1), mask=dmask)
        tl.store(dbp_ptr + pofs + offs_d, db_acc, mask=dmask)
        if s == 0:
            tl.store(dinit_ptr + i * dim * N + offs_d[:, None] * N + offs_n[None, :], mu, mask=tmask)


# --------------------------------------------------------------------------- launchers
def _pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two dividing x, at most cap."""
    p = 1
    while p < cap and x % (2 * p) == 0:
        p *= 2
    return p


def _partial_dtype(M: Tensor) -> torch.dtype:
    return torch.bfloat16 if M.dtype == torch.bfloat16 else torch.float32


def _bc_strides(M: Tensor):
    """Strides (b, g, n, l) of B or C, with a group stride of 0 for the ungrouped (b, N, L)."""
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), M.stride(2)
    return M.stride(0), M.stride(1), M.stride(2), M.stride(3)


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def resolve_dbc(tuning: ScanTuning) -> str:
    """``tuning.dbc`` made concrete: "auto" is "partials" (bitwise reproducible) when
    ``torch.are_deterministic_algorithms_enabled()``, else "atomic"."""
    if tuning.dbc == "auto":
        return "partials" if torch.are_deterministic_algorithms_enabled() else "atomic"
    return tuning.dbc


class ScanPlan:
    """Launch geometry of one scan call, shared by its forward and backward.

    Args:
        u: (batch, dim, L), the scan's input (only its shape and device are read).
        A: (dim, N).
        B: (batch, N, L) or (batch, G, N, L) (only the group count is read).
        cu_seqlens: (nseq + 1,) int cumulative lengths (batch 1), or None. Read on the host
            once here (the longest sequence sets the segmentation).
        tuning: the split's settings; None for the measured defaults of :class:`ScanTuning`.
    """

    def __init__(self, u: Tensor, A: Tensor, B: Tensor, cu_seqlens: Tensor | None = None,
                 tuning: ScanTuning | None = None):
        tuning = tuning or ScanTuning()
        batch, dim, L = u.shape
        self.dim, self.L, self.N = dim, L, A.shape[1]
        self.NP = triton.next_power_of_2(self.N)
        self.groups = 1 if B.dim() == 3 else B.shape[1]
        self.dpg = dim // self.groups
        # a block of channels must sit in one group (it shares one B_t, C_t)
        self.BD = _pow2_divisor(self.dpg, 16)
        self.ndb = dim // self.BD
        if cu_seqlens is None:
            self.nseq, self.maxlen = batch, L
        else:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1])
            self.nseq, self.maxlen = lens.numel(), max(int(lens.max()), 1)
        # Forward and backward split the length into segments independently: (T, S) and
        # (Tb, Sb). The checkpoints are indexed by position (entry p / K holds the state before
        # step p), so the backward can restart anywhere on a K-step boundary.
        self.K = tuning.ckpt_every
        n_sm = _n_sm(u.device)
        self.bwd_programs = tuning.bwd_grid_per_sm * n_sm
        self.T, self.S = self._segments(tuning.fwd_programs_per_sm, n_sm)
        self.Tb, self.Sb = self._segments(tuning.bwd_programs_per_sm, n_sm)
        self.NCK = triton.cdiv(max(self.S * self.T, self.Sb * self.Tb), self.K)
        self.stages = 1  # tl.range pipelining of the backward's loops: 2 measured ~4% faster once
        self.num_warps = 1  # 1 warp per program measured faster than 2 or 4
        self.maxnreg = tuning.bwd_maxnreg
        self.dbc = resolve_dbc(tuning)

    def _segments(self, ppsm: int, n_sm: int) -> tuple[int, int]:
        """(segment length T, count S): enough segments to give every SM about ``ppsm``
        programs, each at least 64 steps long (segments cost a second pass over them) and at
        most 1024 (bounds the checkpoint count per segment); T a multiple of K."""
        rows = self.nseq * self.ndb
        seg = triton.cdiv(self.maxlen, max(1, triton.cdiv(ppsm * n_sm, rows)))
        seg = min(max(seg, 64), 1024)
        if self.maxlen <= 64:
            seg = self.maxlen
        T = triton.cdiv(seg, self.K) * self.K
        return T, triton.cdiv(self.maxlen, T)


def _forward(plan: ScanPlan, u, delta, A2, B, C, D, z, delta_bias, softplus, h0, reverse, cu):
    """Returns out (batch, dim, L) in u's dtype and layout, last (nseq, dim, N) fp32 and the
    sub-chunk checkpoints (nseq, NCK, dim, N) fp32 (entries past the forward's S·T steps, which
    only a backward segment overhanging the length reads, are zero)."""
    batch, dim, L = u.shape
    N, S, nseq = plan.N, plan.S, plan.nseq
    dev = u.device
    out = _empty_as(u)
    last = _empty(nseq, dim, N, dtype=torch.float32, device=dev)
    zz = z if z is not None else u
    dummy = A2
    common = dict(T=plan.T, K=plan.K, HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, REVERSE=reverse,
                  VARLEN=cu is not None, BD=plan.BD, NP=plan.NP, num_warps=plan.num_warps)
    grid = (plan.ndb, S, nseq)
    sB, sC = _bc_strides(B), _bc_strides(C)
    args_in = (u, delta, zz, B, C, A2, D if D is not None else dummy,
               delta_bias if delta_bias is not None else dummy,
               cu if cu is not None else dummy)
    strides = (*u.stride(), *delta.stride(), *zz.stride(), *out.stride(), *sB, *sC)
    ckpt = _empty(nseq, plan.NCK, dim, N, dtype=torch.float32, device=dev)
    if plan.NCK > S * plan.T // plan.K:
        ckpt[:, S * plan.T // plan.K:].zero_()
    if S == 1:
        dsum = None
        st = h0 if h0 is not None else dummy
        sst = (dim * N, 0, N, 1)
        has_start = h0 is not None
    else:
        hend = _empty(nseq, S, dim, N, dtype=torch.float32, device=dev)
        dsum = _empty(nseq, S, dim, dtype=torch.float32, device=dev)
        # segments 0..S-2 only: the last one's end state is what the WRITE_OUT pass computes
        _fwd_kernel[(plan.ndb, S - 1, nseq)](
            *args_in, out, dummy, hend, dsum, last, dummy, L, dim, N, plan.dpg, S, plan.NCK,
            *strides, 0, 0, 0, 0, HAS_START=False, WRITE_OUT=False, HAS_DSUM=True, **common)
        start = _empty(nseq, S, dim, N, dtype=torch.float32, device=dev)
        BLK = 256
        _combine_kernel[(triton.cdiv(dim * N, BLK), nseq)](
            hend, dsum, A2, h0 if h0 is not None else dummy, start, S, dim * N, N,
            HAS_INIT=h0 is not None, BACKWARD=False, BLK=BLK)
        st, sst, has_start = start, start.stride(), True
    _fwd_kernel[grid](*args_in, out, st, dummy, dummy, last, ckpt, L, dim, N, plan.dpg, S,
                      plan.NCK, *strides, *sst, HAS_START=has_start, WRITE_OUT=True, **common)
    return out, last, ckpt


def _backward(plan: ScanPlan, g, dlast, u, delta, A2, B, C, D, z, delta_bias, softplus, h0,
              ckpt, reverse, cu, dz_out=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, dbias, dinit); ``dz_out`` (z's shape and
    dtype, any strides) receives dz instead of a new buffer (the fused mixer passes half of
    the in_proj gradient buffer, which saves concatenating later)."""
    batch, dim, L = u.shape
    N, S, T, nseq, BD, NP = plan.N, plan.Sb, plan.Tb, plan.nseq, plan.BD, plan.NP
    dev = u.device
    dummy = A2
    zz = z if z is not None else u
    cuv = cu if cu is not None else dummy
    sB, sC = _bc_strides(B), _bc_strides(C)
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                 REVERSE=reverse, VARLEN=cu is not None, BD=BD, NP=NP,
                 num_warps=plan.num_warps, STAGES=plan.stages)
    biasv = delta_bias if delta_bias is not None else dummy
    if S == 1:
        muend, smu, has_mu = (dlast if dlast is not None else dummy), (dim * N, 0, N, 1), \
            dlast is not None
    else:
        muloc = _empty(nseq, S, dim, N, dtype=torch.float32, device=dev)
        dsum = _empty(nseq, S, dim, dtype=torch.float32, device=dev)
        _bwd_local_kernel[(plan.ndb, S - 1, nseq)](
            g, delta, zz, C, A2, biasv, cuv, muloc, dsum, L, dim, N, plan.dpg, S,
            *g.stride(), *delta.stride(), *zz.stride(), *sC, T=T, **flags)
        muend = _empty(nseq, S, dim, N, dtype=torch.float32, device=dev)
        BLK = 256
        _combine_kernel[(triton.cdiv(dim * N, BLK), nseq)](
            muloc, dsum, A2, dlast if dlast is not None else dummy, muend, S,
            dim * N, N, HAS_INIT=dlast is not None, BACKWARD=True, BLK=BLK)
        del muloc, dsum  # not needed past the combine: off the main kernel's peak
        smu, has_mu = muend.stride(), True
    du, ddelta = _empty_as(u), _empty_as(delta)
    dz = None if z is None else (dz_out if dz_out is not None else _empty_as(z))
    atomic = plan.dbc == "atomic"
    # ∂B/∂C partials per channel block (batch, blocks, L, N); with dbc "atomic" one zeroed
    # float32 (batch, G, L, N) buffer instead.
    pshape = (batch, plan.ndb, L, N)
    # bf16 B / C get bf16 partials (each a float32 sum over BD channels, rounded once; torch
    # sums them in float32): half the backward's largest scratch, 2 x 134 MB -> 2 x 67 MB at
    # (8, 2048, 2048). The gradient comes back in bf16 anyway. Other dtypes: float32.
    if atomic:
        dBp = torch.zeros(batch, plan.groups, L, N, dtype=torch.float32, device=dev)
        dCp = torch.zeros(batch, plan.groups, L, N, dtype=torch.float32, device=dev)
    else:
        dBp = _empty(*pshape, dtype=_partial_dtype(B), device=dev)
        dCp = _empty(*pshape, dtype=_partial_dtype(C), device=dev)
    dAp = _empty(nseq, S, dim, N, dtype=torch.float32, device=dev)
    dDp = _empty(nseq, S, dim, dtype=torch.float32, device=dev)
    dbp = _empty(nseq, S, dim, dtype=torch.float32, device=dev)
    dinit = _empty(nseq, dim, N, dtype=torch.float32, device=dev)
    n_work = nseq * S * plan.ndb
    # a persistent grid: each program loops over work items and keeps one scratch slot (h every
    # 4 steps of the current sub-chunk); bwd_grid_per_sm 0: one program per item
    nprog = min(n_work, plan.bwd_programs) if plan.bwd_programs > 0 else n_work
    if plan.maxnreg:
        flags["maxnreg"] = plan.maxnreg
    scratch = _empty(nprog, plan.K // 4, BD, NP, dtype=torch.float32, device=dev)
    _bwd_kernel[(nprog,)](
        u, delta, zz, B, C, A2, D if D is not None else dummy, biasv, cuv, g,
        ckpt, muend, scratch, du, ddelta, dz if dz is not None else du, dBp, dCp, dAp, dDp, dbp,
        dinit, L, dim, N, plan.dpg, S, n_work, plan.ndb, plan.NCK,
        *u.stride(), *delta.stride(), *zz.stride(), *g.stride(), *sB, *sC, *smu,
        *du.stride(), *ddelta.stride(), *(dz if dz is not None else du).stride(),
        T=T, K=plan.K, HAS_MU=has_mu, HAS_D=D is not None, ATOMIC_BC=atomic, **flags)
    G = plan.groups
    if atomic:
        dB, dC = dBp.transpose(-1, -2), dCp.transpose(-1, -2)
    else:
        dB = dBp.view(batch, G, plan.ndb // G, L, N).sum(2).transpose(-1, -2)
        dC = dCp.view(batch, G, plan.ndb // G, L, N).sum(2).transpose(-1, -2)
    if B.dim() == 3:
        dB = dB[:, 0]
    if C.dim() == 3:
        dC = dC[:, 0]
    dA = dAp.sum((0, 1))
    dD = dDp.sum((0, 1)) if D is not None else None
    dbias = dbp.sum((0, 1)) if delta_bias is not None else None
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, dinit


def _scan_constants(A, D, delta_bias, initial_state):
    """The kernels' forms of the small operands: A * log2(e) (dim, N), D, delta_bias,
    initial_state in contiguous float32 (no copies when they already are)."""
    A2 = (A.float() * LOG2E).contiguous()
    D = D.float().contiguous() if D is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return A2, D, bias, h0


def scan_triton_forward(plan: ScanPlan, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False, initial_state=None, reverse=False,
                        cu_seqlens=None):
    """The scan's forward without autograd, keeping what :func:`scan_triton_backward` needs.

    Arguments are those of :func:`seqlab.kernels.selective_scan` (not checked again here):
    u, delta, z (batch, dim, L) fp32/fp16/bf16, any strides; A (dim, N); B, C (batch, N, L) or
    (batch, G, N, L), any strides; D, delta_bias (dim,); initial_state (nseq, dim, N) or None;
    cu_seqlens (nseq + 1,) or None. ``plan`` comes from ``ScanPlan(u, A, B, cu_seqlens)``.

    Returns:
        out (batch, dim, L) in u's dtype and layout; last_state (nseq, dim, N) float32;
        checkpoints (nseq, NCK, dim, N) float32, the state before every K-th position, which
        the backward restarts from (with the inputs, the only thing it needs).
    """
    A2, D, bias, h0 = _scan_constants(A, D, delta_bias, initial_state)
    return _forward(plan, u, delta, A2, B, C, D, z, bias, bool(delta_softplus), h0,
                    bool(reverse), cu_seqlens)


def scan_triton_backward(plan: ScanPlan, checkpoints, dout, dlast, u, delta, A, B, C, D=None,
                         z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                         reverse=False, cu_seqlens=None, dz_out=None):
    """The scan's backward from the forward's checkpoints, without autograd.

    Args:
        plan, checkpoints: the forward's plan and checkpoints (:func:`scan_triton_forward`).
        dout: (batch, dim, L) gradient of out, any strides and float dtype.
        dlast: (nseq, dim, N) gradient of last_state, or None.
        u .. cu_seqlens: the forward's inputs, the same values (they may be recomputed).
        dz_out: a (batch, dim, L) tensor in z's dtype, any strides, that receives ∂z instead
            of a new buffer (the recomputing mixer passes half of in_proj's gradient buffer).

    Returns:
        (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state): du, ddelta, dz in their
        inputs' dtypes and layouts (dz is ``dz_out`` when given; None without z); dA (dim, N)
        float32; dB, dC in B's, C's shape and dtype; dD, ddelta_bias (dim,) float32 (None
        without D, delta_bias); dinitial_state (nseq, dim, N) float32, the gradient of the
        state entering each sequence (zeros' gradient when initial_state is None).
    """
    A2, D, bias, h0 = _scan_constants(A, D, delta_bias, initial_state)
    dlast = dlast.float().contiguous() if dlast is not None else None
    return _backward(plan, dout, dlast, u, delta, A2, B, C, D, z, bias, bool(delta_softplus),
                     h0, checkpoints, bool(reverse), cu_seqlens, dz_out=dz_out)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, h0, reverse, cu, tuning):
        plan = ScanPlan(u, A, B, cu, tuning)
        out, last, ckpt = scan_triton_forward(plan, u, delta, A, B, C, D, z, delta_bias,
                                              softplus, h0, reverse, cu)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, ckpt, cu)
        ctx.plan, ctx.softplus, ctx.reverse = plan, softplus, reverse
        return out, last

    @staticmethod
    def backward(ctx, g, dlast):
        u, delta, A, B, C, D, z, bias, h0, ckpt, cu = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = scan_triton_backward(
            ctx.plan, ckpt, g, dlast, u, delta, A, B, C, D, z, bias, ctx.softplus, h0,
            ctx.reverse, cu)
        dh0 = dinit.to(h0.dtype) if h0 is not None else None
        dD = dD.to(D.dtype) if dD is not None else None
        dbias = dbias.to(bias.dtype) if dbias is not None else None
        return (du, ddelta, dA.to(A.dtype), dB, dC, dD, dz, dbias, None, dh0, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, return_last_state=False,
                          reverse=False, cu_seqlens=None, tuning: ScanTuning | None = None):
    """Triton selective scan; arguments as :func:`seqlab.kernels.selective_scan` (validated).

    u, delta, z: (batch, dim, L) fp32/fp16/bf16, any strides; B, C: (batch, [G,] N, L) any
    strides; A (dim, N), D, delta_bias (dim,) float32; initial_state (nseq, dim, N).
    ``tuning``: the launch settings (None: the measured defaults of :class:`ScanTuning`).
    Returns out (batch, dim, L) in u's dtype, and last_state (nseq, dim, N) float32 when
    ``return_last_state``; gradients flow to every tensor input and back from last_state.
    """
    if u.shape[-1] == 0:
        raise ValueError("selective_scan_triton: length 0 is not supported")
    out, last = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                       initial_state, bool(reverse), cu_seqlens, tuning)
    return (out, last) if return_last_state else out
