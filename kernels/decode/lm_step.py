"""A whole decoding step of a causal MambaLM in one persistent Triton launch.

Small-batch decoding of a small model is bound by latency, not by bytes: the audio model
(d_model 256, 14 layers) reads ~12 MB of weights per step, 4 us of HBM time, yet the two
fused kernels per layer of :mod:`.mixer_step` cost ~190 us per step replayed from a
CUDA graph, because every dependent launch pays a few microseconds of scheduling and tail.
Here a grid of ``P x batch`` programs stays resident for the whole step and the programs of a
batch row meet at grid-wide barriers (an arrival counter in global memory) instead of at
kernel boundaries. Program ``p`` owns the d_inner channels ``[p*BE, (p+1)*BE)`` of every
layer, so x, z and the SSM state of those channels never leave it. Per layer:

phase A  r = r_prev + sum_q opart[q]       (or the embedding row at layer 0; every program
                                            sums the shares itself, in a fixed order)
         xn = norm(r);  x_in, z = in_proj(xn)[own channels];  conv state roll + conv + SiLU
         xpart[p] = x_proj restricted to own channels                       -> barrier
phase B  dt_low, B, C = sum_q xpart[q];  dt = softplus(dt_proj(dt_low) + bias)
         h <- exp(dt A) h + dt B x;  y = (<C, h> + D x) silu(z)
         opart[p] = out_proj restricted to own channels                     -> barrier

then the head (final norm, logits rows ``[p*VB, (p+1)*VB)``) and, by the last program to
finish, the pick of the next id (argmax of logits / temperature + Gumbel noise), so that a
decoding step with sampling is one launch. Two barriers per layer is the minimum for this
layout: x_proj and out_proj each reduce over all channels. The operands a phase needs that no
other program writes (weights, this program's conv and SSM state) are loaded right after the
previous phase's arrival, so their latency hides behind the wait.

Measured on an H200 (audio model, bf16, CUDA-graph generate): 114-115 us per step at batch 1
against 196 us for the two-kernel step (8,958 vs 5,098 samples/s through
``python benchmarks/audio.py``), ~119 us at batch 4. That is ~4 us per phase, nearly
independent of the programs' work (16 or 128 programs: 115 vs 124 us), so the barrier round
trips set the pace; 16 kHz real time (62.5 us) would need fewer than 29 of them. At the 130m size (d_model 768) every program re-reading P x 768 shares per layer makes
it slower than the per-op step (2.2 ms vs 0.67 ms): ``seqlab.model.decode`` takes this path
only for models up to d_model 256 and batches whose programs fit.

Every program of a row must be resident at once (they wait for each other): the host side
launches this only when ``P * batch`` programs fit one per SM. The Triton interpreter runs
programs one after another, so there a barrier would never open: ``PERSIST=False`` runs the
same phases one launch each (the CPU tests check that form; GPU tests compare the two).

The arithmetic and the roundings (inputs of each matrix product cast to the weights' dtype,
float32 accumulation, the residual stream in float32) are those of the two-kernel step, which
is tested against the per-op step. Weights and caches of all layers are reached through a
table of addresses (int64, one row per layer), built once per (weights, cache): the step takes
an :class:`~seqlab.kernels.decode.weights.LMWeights` and the cache tensors, never a model.

Launch settings: ``block_e`` channels per program (DEFAULT_BLOCK) and ``num_warps`` warps per
program (DEFAULT_WARPS), arguments of :class:`PersistentStep`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..api import triton_interpreted
from .pick import pick_row, pick_step
from .weights import LMWeights

# Columns of the per-layer address table.
T_WIN, T_BIN, T_CW, T_CB, T_WX, T_WDT, T_DTB, T_ALOG, T_D, T_WOUT, T_BOUT, T_NW, T_NB, T_CS, \
    T_SS = range(15)
NT = 15
MAX_D_MODEL = 1024  # a program holds whole rows of d_model in registers
DEFAULT_BLOCK = 16  # channels per program: the audio model's 512 channels on 32 programs
# 8 warps measured best (4 / 8 / 16: 159 / 115.5 / 152 us per audio step).
DEFAULT_WARPS = 8


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


@triton.jit
def barrier_arrive(bar_ptr):
    """Arrive at a grid barrier of one batch row (release: this program's stores first)."""
    tl.debug_barrier()  # every thread's stores of this program precede the release
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def barrier_wait(bar_ptr, target):
    """Spin (plain volatile reads, no read-modify-write traffic on the counter) until
    ``target`` programs have arrived, then acquire (one atomic: measured free, 114 vs 115 us
    per audio step without it). Counters only grow within a launch; the last program out
    resets them."""
    cur = tl.load(bar_ptr, volatile=True)
    while cur < target:
        cur = tl.load(bar_ptr, volatile=True)
    tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _ptr(tab_ptr, l, col: tl.constexpr, ref):
    """Address of column ``col`` of layer ``l``, typed like the pointer ``ref``."""
    return tl.load(tab_ptr + l * 15 + col).to(ref.dtype)


@triton.jit
def _stream(l, b, offs_k, kmask, ids_ptr, emb_ptr, s_eb, res_ptr, s_rl, opart_ptr, s_op, s_ob,
            Dm, P: tl.constexpr, PP: tl.constexpr, DP: tl.constexpr):
    """Float32 residual stream entering layer ``l`` (l == n_layer: the head) for row b: the
    embedding row at layer 0, else r_{l-1} + the out_proj shares of layer l-1 summed in program
    order (read past L1: other programs wrote them). The share loads are unrolled so that they
    are all in flight at once."""
    if l == 0:
        tok = tl.load(ids_ptr + b).to(tl.int64)
        r = tl.load(emb_ptr + tok * s_eb + offs_k, mask=kmask, other=0.0).to(tl.float32)
    else:
        r = tl.load(res_ptr + ((l - 1) % 2) * s_rl + b * Dm + offs_k, mask=kmask, other=0.0,
                    cache_modifier=".cg")
        offs_p = tl.arange(0, PP)
        acc = tl.zeros([PP, DP], dtype=tl.float32)
        for p0 in tl.static_range(0, P, PP):
            pp = p0 + offs_p
            acc += tl.load(opart_ptr + pp[:, None].to(tl.int64) * s_op + b * s_ob + offs_k[None, :],
                           mask=(pp < P)[:, None] & kmask[None, :], other=0.0,
                           cache_modifier=".cg")
        r += tl.sum(acc, axis=0)
    return r


@triton.jit
def _normed(r, kmask, Dm, nw, nb, eps, IS_RMS: tl.constexpr, HAS_NB: tl.constexpr, wdt):
    """norm(r) * weight (+ bias), rounded to the weights' dtype, as float32 (1, DP)."""
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / Dm + eps)
        xn = r * rstd * nw
    else:
        mean = tl.sum(r, axis=0) / Dm
        d = tl.where(kmask, r - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / Dm + eps)
        xn = d * rstd * nw
    if HAS_NB:
        xn += nb
    return xn.to(wdt).to(tl.float32)[None, :]


@triton.jit
def _load_a(tab_ptr, l, b, oe, emask, offs_k, kmask, E, K, r_win, r_cw, r_wx, r_nw, r_cs,
            s_win, s_cwe, s_cwk, s_wx, s_cb, s_ce, s_ck, XW,
            HAS_NB: tl.constexpr, HAS_WB: tl.constexpr, HAS_CB: tl.constexpr,
            KP: tl.constexpr, XP: tl.constexpr):
    """Phase A's operands of layer l that no other program writes: the norm, this program's
    rows of in_proj (both halves), its conv weights and state and its columns of x_proj.
    Loaded before the barrier wait so that their latency hides behind it."""
    wm = emask[:, None] & kmask[None, :]
    w_in = _ptr(tab_ptr, l, 0, r_win)
    w1 = tl.load(w_in + oe[:, None] * s_win + offs_k[None, :], mask=wm, other=0.0)
    w2 = tl.load(w_in + (oe + E)[:, None] * s_win + offs_k[None, :], mask=wm, other=0.0)
    nw = tl.load(_ptr(tab_ptr, l, 11, r_nw) + offs_k, mask=kmask, other=0.0).to(tl.float32)
    nb = tl.zeros_like(nw)
    if HAS_NB:
        nb = tl.load(_ptr(tab_ptr, l, 12, r_nw) + offs_k, mask=kmask, other=0.0).to(tl.float32)
    bx = tl.zeros([oe.shape[0]], dtype=tl.float32)
    bz = tl.zeros([oe.shape[0]], dtype=tl.float32)
    if HAS_WB:
        b_in = _ptr(tab_ptr, l, 1, r_win)
        bx = tl.load(b_in + oe, mask=emask, other=0.0).to(tl.float32)
        bz = tl.load(b_in + E + oe, mask=emask, other=0.0).to(tl.float32)
    kk = tl.arange(0, KP)[None, :]
    cm = emask[:, None] & (kk < K)
    cbase = _ptr(tab_ptr, l, 13, r_cs) + b * s_cb + oe[:, None] * s_ce
    old = tl.load(cbase + (kk + 1) * s_ck, mask=emask[:, None] & (kk + 1 < K),
                  other=0.0).to(tl.float32)
    cw = tl.load(_ptr(tab_ptr, l, 2, r_cw) + oe[:, None] * s_cwe + kk * s_cwk, mask=cm,
                 other=0.0).to(tl.float32)
    cb = tl.zeros([oe.shape[0]], dtype=tl.float32)
    if HAS_CB:
        cb = tl.load(_ptr(tab_ptr, l, 3, r_cw) + oe, mask=emask, other=0.0).to(tl.float32)
    offs_x = tl.arange(0, XP)
    wx = tl.load(_ptr(tab_ptr, l, 4, r_wx) + offs_x[:, None] * s_wx + oe[None, :],
                 mask=(offs_x < XW)[:, None] & emask[None, :], other=0.0).to(tl.float32)
    return w1, w2, nw, nb, bx, bz, old, cw, cb, wx


@triton.jit
def _load_b(tab_ptr, l, b, oe, emask, offs_r, rmask, offs_n, nmask, offs_k, kmask, pid,
            r_wdt, r_dtb, r_alog, r_d, r_wout, r_ss, s_wdt, s_al, s_wo, s_sb, s_se, s_sn,
            HAS_OB: tl.constexpr):
    """Phase B's operands of layer l that no other program writes (see _load_a)."""
    wd = tl.load(_ptr(tab_ptr, l, 5, r_wdt) + oe[:, None] * s_wdt + offs_r[None, :],
                 mask=emask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
    dtb = tl.load(_ptr(tab_ptr, l, 6, r_dtb) + oe, mask=emask, other=0.0).to(tl.float32)
    en = emask[:, None] & nmask[None, :]
    A = -tl.exp(tl.load(_ptr(tab_ptr, l, 7, r_alog) + oe[:, None] * s_al + offs_n[None, :],
                        mask=en, other=0.0).to(tl.float32))
    Dv = tl.load(_ptr(tab_ptr, l, 8, r_d) + oe, mask=emask, other=0.0).to(tl.float32)
    h = tl.load(_ptr(tab_ptr, l, 14, r_ss) + b * s_sb + oe[:, None] * s_se
                + offs_n[None, :] * s_sn, mask=en, other=0.0)
    wo = tl.load(_ptr(tab_ptr, l, 9, r_wout) + offs_k[None, :].to(tl.int64) * s_wo + oe[:, None],
                 mask=emask[:, None] & kmask[None, :], other=0.0)
    bo = tl.zeros([offs_k.shape[0]], dtype=tl.float32)
    if HAS_OB:
        bo = tl.load(_ptr(tab_ptr, l, 10, r_wout) + offs_k, mask=kmask & (pid == 0),
                     other=0.0).to(tl.float32)
    return wd, dtb, A, Dv, h, wo, bo


@triton.jit
def _lm_step_kernel(
    ids_ptr, emb_ptr, s_eb, tab_ptr,
    r_win, r_cw, r_wx, r_wdt, r_dtb, r_alog, r_d, r_wout, r_nw, r_cs, r_ss,
    s_win, s_cwe, s_cwk, s_wx, s_wdt, s_al, s_wo, s_cb, s_ce, s_ck, s_sb, s_se, s_sn, eps,
    fnw_ptr, fnb_ptr, feps, head_ptr, s_hv,
    xpart_ptr, s_xp, s_xb, opart_ptr, s_op, s_ob, res_ptr, s_rl, uz_ptr, logits_ptr, s_lb,
    bar_ptr, noise_ptr, s_nb, inv_temp, nid_ptr, out_ptr, s_outb, col,
    n_layer, Dm, E, R, N, K, V, VS, VB, ph0, ph1,
    P: tl.constexpr, PERSIST: tl.constexpr, PICK: tl.constexpr, HAS_NOISE: tl.constexpr,
    IS_RMS: tl.constexpr, HAS_NB: tl.constexpr, HAS_WB: tl.constexpr, HAS_CB: tl.constexpr,
    HAS_OB: tl.constexpr, F_RMS: tl.constexpr, F_NB: tl.constexpr,
    BE: tl.constexpr, DP: tl.constexpr, PP: tl.constexpr, PX: tl.constexpr,
    XP: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, VBP: tl.constexpr,
    VP: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_e = pid * BE + tl.arange(0, BE)
    emask = offs_e < E
    oe = offs_e.to(tl.int64)
    offs_r = tl.arange(0, RP)
    rmask = offs_r < R
    offs_n = tl.arange(0, NP)
    nmask = offs_n < N
    offs_k = tl.arange(0, DP)
    kmask = offs_k < Dm
    offs_x = tl.arange(0, XP)
    xmask = offs_x < R + 2 * N
    XW = R + 2 * N
    bar = bar_ptr + b * 2
    wdt = r_win.dtype.element_ty
    # Operands of the first phase; later ones are loaded one phase ahead, before each wait.
    la = tl.minimum(ph0 // 2, n_layer - 1)  # the head launch (phased form) loads layer L-1's
    w1, w2, nw, nb, bx, bz, old, cw, cb, wx = _load_a(
        tab_ptr, la, b, oe, emask, offs_k, kmask, E, K, r_win, r_cw, r_wx, r_nw, r_cs, s_win,
        s_cwe, s_cwk, s_wx, s_cb, s_ce, s_ck, XW, HAS_NB, HAS_WB, HAS_CB, KP, XP)
    wd, dtb, A, Dv, h, wo, bo = _load_b(
        tab_ptr, la, b, oe, emask, offs_r, rmask, offs_n, nmask, offs_k, kmask, pid, r_wdt,
        r_dtb, r_alog, r_d, r_wout, r_ss, s_wdt, s_al, s_wo, s_sb, s_se, s_sn, HAS_OB)
    for ph in range(ph0, ph1):
        l = ph // 2
        if ph == 2 * n_layer:
            # Head: final norm of the stream after the last layer, this program's logit rows.
            r = _stream(l, b, offs_k, kmask, ids_ptr, emb_ptr, s_eb, res_ptr, s_rl, opart_ptr,
                        s_op, s_ob, Dm, P, PP, DP)
            fw = tl.load(fnw_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
            fb = tl.zeros_like(fw)
            if F_NB:
                fb = tl.load(fnb_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
            xn = _normed(r, kmask, Dm, fw, fb, feps, F_RMS, F_NB, head_ptr.dtype.element_ty)
            offs_v = pid * VB + tl.arange(0, VBP)
            vmask = (tl.arange(0, VBP) < VB) & (offs_v < V)
            wh = tl.load(head_ptr + offs_v[:, None].to(tl.int64) * s_hv + offs_k[None, :],
                         mask=vmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            tl.store(logits_ptr + b * s_lb + offs_v, tl.sum(wh * xn, axis=1), mask=vmask)
        elif ph % 2 == 0:
            # Phase A of layer l: norm, in_proj rows, conv, x_proj share.
            r = _stream(l, b, offs_k, kmask, ids_ptr, emb_ptr, s_eb, res_ptr, s_rl, opart_ptr,
                        s_op, s_ob, Dm, P, PP, DP)
            if pid == 0:
                tl.store(res_ptr + (l % 2) * s_rl + b * Dm + offs_k, r, mask=kmask)
            xn = _normed(r, kmask, Dm, nw, nb, eps, IS_RMS, HAS_NB, wdt)
            xin = tl.sum(w1.to(tl.float32) * xn, axis=1) + bx
            z = tl.sum(w2.to(tl.float32) * xn, axis=1) + bz
            # Conv state: shift left by one, append x_in (kept in the cache's dtype).
            kk = tl.arange(0, KP)[None, :]
            xq = xin.to(r_cs.dtype.element_ty).to(tl.float32)
            new = tl.where(kk == K - 1, xq[:, None], old)
            cbase = _ptr(tab_ptr, l, 13, r_cs) + b * s_cb + oe[:, None] * s_ce
            tl.store(cbase + kk * s_ck, new.to(r_cs.dtype.element_ty),
                     mask=emask[:, None] & (kk < K))
            u = tl.sum(new * cw, axis=1) + cb
            u = u * tl.sigmoid(u)
            u = tl.where(emask, u, 0.0)
            tl.store(uz_ptr + b * 2 * E + oe, u, mask=emask)
            tl.store(uz_ptr + b * 2 * E + E + oe, z, mask=emask)
            uq = u.to(r_wx.dtype.element_ty).to(tl.float32)
            share = tl.sum(wx * uq[None, :], axis=1)
            tl.store(xpart_ptr + pid * s_xp + b * s_xb + offs_x, share, mask=xmask)
            if PERSIST:
                barrier_arrive(bar)
                wd, dtb, A, Dv, h, wo, bo = _load_b(
                    tab_ptr, l, b, oe, emask, offs_r, rmask, offs_n, nmask, offs_k, kmask, pid,
                    r_wdt, r_dtb, r_alog, r_d, r_wout, r_ss, s_wdt, s_al, s_wo, s_sb, s_se,
                    s_sn, HAS_OB)
                barrier_wait(bar, (ph - ph0 + 1) * P)
        else:
            # Phase B of layer l: x_proj = the shares summed in program order; dt, state
            # update, gate; out_proj share.
            offs_q = tl.arange(0, PX)
            xs = tl.load(xpart_ptr + offs_q[:, None].to(tl.int64) * s_xp + b * s_xb
                         + offs_x[None, :], mask=(offs_q < P)[:, None] & xmask[None, :],
                         other=0.0, cache_modifier=".cg")
            xd = tl.sum(xs, axis=0)  # (XP,): dt_low | B | C
            wt = r_wdt.dtype.element_ty
            xd = xd.to(wt).to(tl.float32)
            # Split into dt_low, B, C (zero past R and N: no state lane beyond d_state moves).
            dtl = tl.sum(tl.where((offs_x[None, :] == offs_r[:, None]) & rmask[:, None],
                                  xd[None, :], 0.0), axis=1)
            Bv = tl.sum(tl.where((offs_x[None, :] == R + offs_n[:, None]) & nmask[:, None],
                                 xd[None, :], 0.0), axis=1)
            Cv = tl.sum(tl.where((offs_x[None, :] == R + N + offs_n[:, None]) & nmask[:, None],
                                 xd[None, :], 0.0), axis=1)
            dt = tl.sum(wd * dtl[None, :], axis=1) + dtb
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
            x = tl.load(uz_ptr + b * 2 * E + oe, mask=emask, other=0.0)
            z = tl.load(uz_ptr + b * 2 * E + E + oe, mask=emask, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
            en = emask[:, None] & nmask[None, :]
            tl.store(_ptr(tab_ptr, l, 14, r_ss) + b * s_sb + oe[:, None] * s_se
                     + offs_n[None, :] * s_sn, h, mask=en)
            y = tl.sum(h * Cv[None, :], axis=1) + Dv * x
            y = y * z * tl.sigmoid(z)
            y = tl.where(emask, y, 0.0).to(r_wout.dtype.element_ty).to(tl.float32)
            part = tl.sum(wo.to(tl.float32) * y[:, None], axis=0) + bo
            tl.store(opart_ptr + pid * s_op + b * s_ob + offs_k, part, mask=kmask)
            if PERSIST:
                barrier_arrive(bar)
                if l + 1 < n_layer:
                    w1, w2, nw, nb, bx, bz, old, cw, cb, wx = _load_a(
                        tab_ptr, l + 1, b, oe, emask, offs_k, kmask, E, K, r_win, r_cw, r_wx,
                        r_nw, r_cs, s_win, s_cwe, s_cwk, s_wx, s_cb, s_ce, s_ck, XW, HAS_NB,
                        HAS_WB, HAS_CB, KP, XP)
                barrier_wait(bar, (ph - ph0 + 1) * P)
    if PERSIST:
        # The last program out of the step picks the next id (it sees every program's logits)
        # and resets the row's counters for the next launch (everyone has left the barriers).
        tl.debug_barrier()
        done = tl.atomic_add(bar + 1, 1, sem="acq_rel", scope="gpu")
        if done == P - 1:
            tl.debug_barrier()
            if PICK:
                pick_row(logits_ptr + b * s_lb, noise_ptr + b * s_nb, inv_temp, nid_ptr + b,
                          out_ptr + b * s_outb + col, VS, HAS_NOISE, VP, True)
            tl.store(bar, 0)
            tl.store(bar + 1, 0)


# --------------------------------------------------------------------------- host side


class PersistentStep:
    """The address table, scratch buffers and launch sizes of one (weights, cache, batch).

    Args:
        weights: the model's tensors; every layer alike in presence, shapes, strides, dtypes.
        cache: one (conv_state (batch, E, K), ssm_state (batch, E, N) float32) per layer,
            advanced in place by every call.
        batch: rows per step.
        block_e: channels per program (a power of two, at most d_inner's; None:
            DEFAULT_BLOCK).
        persist: one persistent launch per step (None: unless Triton is interpreted), or one
            launch per phase.
        num_warps: warps per program (None: DEFAULT_WARPS).

    Build once and reuse (CUDA-graph capture included): the table holds the addresses of the
    weights and of the cache tensors, so it is only valid while they live at the same
    addresses (:func:`seqlab.model.decode.persistent_step` keys it by those addresses). It
    keeps the tensors themselves alive, not the model they belong to.
    """

    def __init__(self, weights: LMWeights, cache: list, batch: int, block_e: int | None = None,
                 persist: bool | None = None, num_warps: int | None = None):
        layers = weights.layers
        l0 = layers[0]
        dev = weights.embedding.device
        self.weights = weights
        self.batch, self.n_layer = batch, len(layers)
        self.Dm = weights.d_model
        self.E, self.R = l0.dt_proj_weight.shape
        self.N = l0.A_log.shape[1]
        self.K = l0.conv_weight.shape[-1]
        self.V = weights.head_weight.shape[0]
        self.BE = block_size(self.E, block_e)
        self.P = triton.cdiv(self.E, self.BE)
        self.VB = triton.cdiv(self.V, self.P)
        interp = triton_interpreted()
        self.persist = (not interp) if persist is None else persist
        if self.persist and interp:
            raise ValueError("the persistent step cannot run under TRITON_INTERPRET=1 (its "
                             "programs run one after another, so a grid barrier never opens)")
        if self.Dm > MAX_D_MODEL:
            raise ValueError(f"persistent step: d_model {self.Dm} > {MAX_D_MODEL} (a program "
                             "holds whole rows)")
        self.DP = _p2(self.Dm)
        self.PP = max(1, min(_p2(self.P), 4096 // self.DP))  # out_proj shares per load
        self.warps = num_warps or DEFAULT_WARPS

        def rows(i):
            lw = layers[i]
            return [lw.in_proj_weight, lw.in_proj_bias, lw.conv_weight, lw.conv_bias,
                    lw.x_proj_weight, lw.dt_proj_weight, lw.dt_proj_bias, lw.A_log, lw.D,
                    lw.out_proj_weight, lw.out_proj_bias, lw.norm.weight, lw.norm.bias,
                    cache[i][0], cache[i][1]]

        table = [rows(i) for i in range(self.n_layer)]
        ref = table[0]
        for i, row in enumerate(table):  # one set of strides/dtypes serves every layer
            for j, (t, t0) in enumerate(zip(row, ref)):
                if (t is None) != (t0 is None) or (t is not None and (
                        t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype
                        or t.device != t0.device)):
                    raise ValueError(f"persistent step: layer {i} entry {j} differs from layer 0 "
                                     "in presence, shape, strides, dtype or device")
        self.refs = ref
        addresses = [[0 if t is None else t.data_ptr() for t in row] for row in table]
        self.table = torch.tensor(addresses, dtype=torch.int64).to(dev)
        self.is_rms = l0.norm.kind == "rms"
        self.eps = float(l0.norm.eps)
        self.f_rms = weights.final_norm.kind == "rms"
        f32 = dict(dtype=torch.float32, device=dev)
        XW = self.R + 2 * self.N
        self.xpart = torch.empty(self.P, batch, XW, **f32)
        self.opart = torch.empty(self.P, batch, self.Dm, **f32)
        self.res = torch.empty(2, batch, self.Dm, **f32)
        self.uz = torch.empty(batch, 2, self.E, **f32)
        self.logits = torch.empty(batch, self.V, **f32)
        self.bar = torch.zeros(batch, 2, dtype=torch.int32, device=dev)
        # The table points into the weights (held through self.weights) and the cache (held
        # here, so its memory cannot be reused under the table).
        self.cache = cache

    def __call__(self, ids: torch.Tensor, pick=None) -> torch.Tensor:
        """One step from ids (batch,) long; returns the logits buffer (batch, V) float32.

        pick: None, or (noise (batch, V') float32 or None, inv_temp, next_ids (batch,) long,
        out (batch, C) long, col, vocab): also write argmax(logits * inv_temp + noise) over
        the first ``vocab`` ids to next_ids[b] and out[b, col] (in the same launch when
        persistent).
        """
        w = self.weights
        r = self.refs
        n_ph = 2 * self.n_layer + 1
        fn, fnb = w.final_norm.weight, w.final_norm.bias
        emb, head = w.embedding, w.head_weight
        lg = self.logits
        fused_pick = pick is not None and self.persist
        if fused_pick:
            noise, inv, nid, out, col, vocab = pick
        else:
            noise, inv, nid, out, col, vocab = None, 1.0, ids, lg, 0, self.V

        def launch(ph0, ph1):
            _lm_step_kernel[(self.P, self.batch)](
                ids, emb, emb.stride(0), self.table,
                r[T_WIN], r[T_CW], r[T_WX], r[T_WDT], r[T_DTB], r[T_ALOG], r[T_D], r[T_WOUT],
                r[T_NW], r[T_CS], r[T_SS],
                r[T_WIN].stride(0), r[T_CW].stride(0), r[T_CW].stride(1), r[T_WX].stride(0),
                r[T_WDT].stride(0), r[T_ALOG].stride(0), r[T_WOUT].stride(0),
                *r[T_CS].stride(), *r[T_SS].stride(), self.eps,
                fn, fnb if fnb is not None else fn, float(w.final_norm.eps), head,
                head.stride(0),
                self.xpart, self.xpart.stride(0), self.xpart.stride(1), self.opart,
                self.opart.stride(0), self.opart.stride(1), self.res, self.res.stride(0),
                self.uz, lg, lg.stride(0), self.bar,
                noise if noise is not None else lg, noise.stride(0) if noise is not None else 0,
                float(inv), nid, out, out.stride(0), int(col),
                self.n_layer, self.Dm, self.E, self.R, self.N, self.K, self.V, int(vocab),
                self.VB, ph0, ph1,
                P=self.P, PERSIST=self.persist, PICK=fused_pick, HAS_NOISE=noise is not None,
                IS_RMS=self.is_rms, HAS_NB=r[T_NB] is not None, HAS_WB=r[T_BIN] is not None,
                HAS_CB=r[T_CB] is not None, HAS_OB=r[T_BOUT] is not None, F_RMS=self.f_rms,
                F_NB=fnb is not None, BE=self.BE, DP=self.DP, PP=self.PP, PX=_p2(self.P),
                XP=_p2(self.R + 2 * self.N), RP=_p2(self.R), NP=_p2(self.N),
                KP=_p2(self.K), VBP=_p2(self.VB), VP=_p2(vocab), num_warps=self.warps)

        if self.persist:
            launch(0, n_ph)
        else:
            for ph in range(n_ph):
                launch(ph, ph + 1)
        if pick is not None and not fused_pick:
            noise, inv, nid, out, col, vocab = pick
            pick_step(lg, noise, inv, nid, out, col, vocab)
        return lg


def block_size(d_inner: int, block_e: int | None = None) -> int:
    """Channels per program: ``block_e``, else DEFAULT_BLOCK (a power of two, at most
    d_inner's)."""
    be = block_e or DEFAULT_BLOCK
    return min(_p2(be), _p2(d_inner))


def persistent_fits(batch: int, d_inner: int, device: torch.device, block_e: int | None = None) -> bool:
    """Whether ``P * batch`` programs can all be resident (one per SM suffices)."""
    if device.type != "cuda":
        return False
    P = triton.cdiv(d_inner, block_size(d_inner, block_e))
    return P * batch <= torch.cuda.get_device_properties(device).multi_processor_count
