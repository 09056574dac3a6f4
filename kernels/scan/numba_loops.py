"""Selective scan (S6) on the CPU as compiled loops (Numba): ``impl="numba"``.

Same semantics as :mod:`seqlab.kernels.scan.reference` (its docstring has the glossary). The
pure-PyTorch path (:mod:`.chunked`) is bound by memory traffic on a CPU: every step of its
scan reads and writes (batch, dim, N) tensors, several passes per position. Here one work item
owns a channel of one sequence and keeps its N-vector state in registers, so the forward reads
u, Δ, B, C once and writes y; nothing of size batch * dim * L * N is ever stored.

Forward: work item (sequence s, channel d) walks its positions in scan order and saves the
state every ``CKPT`` positions (and the last one). Backward: work item (s, group g, block of
channels) walks the checkpoint chunks from the end; per chunk it recomputes the states and
decays from the checkpoint into a (CKPT + 1, N) scratch, then runs the adjoint
    g_t = λ_t + dy_t C_t,    λ_{t-1} = g_t Ā_t,    Ā_t = exp(Δ_t A)
over the chunk in reverse. ∂B and ∂C are sums over the channels of a group, so each work item
accumulates into its own slice of a (blocks, batch, G, L, N) buffer (positions of different
sequences never overlap, so items never write the same element); ∂A is summed per sequence and
reduced over sequences in torch.

Δ-bias, softplus, the D skip and the SiLU gate are (batch, dim, L) elementwise work and stay in
torch around the compiled core (autograd differentiates them). Inputs in float16/bfloat16 are
computed in float32; float64 in float64. Compiled functions are cached on disk by Numba, so the
compile cost (seconds) is paid once per machine and dtype.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional: the torch path is used when Numba is missing
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

Tensor = torch.Tensor

CKPT = 64  # positions between saved states: the backward recomputes at most this many


# exp(x) for x <= 0 (Δ A is never positive) in float32 as a polynomial LLVM can vectorize
# (the libm call it otherwise makes per element takes 80% of the forward): x = -k ln2 + r with
# |r| <= ln2 / 2 (ln2 split in two for an exact k ln2), e^r by its degree-7 Taylor polynomial,
# 2^-k from a table; x is clamped at -87 (e^-87 ~ 1.6e-38, the smallest normal float32 range).
# Measured over 10^6 points in [-90, 0]: relative error <= 2.9e-7 (about 2.5 ulp).
_P2 = np.array([2.0 ** -k for k in range(127)], dtype=np.float32)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)

if numba is not None:
    @njit(inline="always", fastmath=True, cache=True)
    def _exp_nonpos(x, P2, fast):
        if not fast:
            return math.exp(x)
        x = max(x, np.float32(-87.0))
        k = int(x * np.float32(-1.4426950408889634) + np.float32(0.5))
        kf = np.float32(k)
        r = x + kf * _LN2_HI + kf * _LN2_LO
        p = np.float32(1 / 5040)
        p = p * r + np.float32(1 / 720)
        p = p * r + np.float32(1 / 120)
        p = p * r + np.float32(1 / 24)
        p = p * r + np.float32(1 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        return p * P2[k]

    @njit(parallel=True, fastmath=True, cache=True)
    def _fwd_kernel(u, dt, A, Bt, Ct, h0, seq_row, seq_lo, seq_hi, reverse, K, y, hlast, ckpt,
                    save, P2, fast):
        nseq = seq_row.shape[0]
        dim = u.shape[1]
        N = A.shape[1]
        Dg = dim // Bt.shape[1]
        for w in prange(nseq * dim):
            s = w // dim
            d = w - s * dim
            r = seq_row[s]
            g = d // Dg
            lo = seq_lo[s]
            hi = seq_hi[s]
            h = np.empty(N, dtype=A.dtype)
            for n in range(N):
                h[n] = h0[s, d, n]
            for p in range(hi - lo):
                if save and p % K == 0:
                    for n in range(N):
                        ckpt[s, d, p // K, n] = h[n]
                t = hi - 1 - p if reverse else lo + p
                dtv = dt[r, d, t]
                x = dtv * u[r, d, t]
                acc = A[d, 0] - A[d, 0]  # a zero of the compute dtype
                for n in range(N):
                    h[n] = _exp_nonpos(dtv * A[d, n], P2, fast) * h[n] + x * Bt[r, g, t, n]
                    acc += Ct[r, g, t, n] * h[n]
                y[r, d, t] = acc
            for n in range(N):
                hlast[s, d, n] = h[n]

    @njit(parallel=True, fastmath=True, cache=True)
    def _bwd_kernel(u, dt, A, Bt, Ct, ckpt, dy, dhlast, seq_row, seq_lo, seq_hi, reverse, K,
                    nblk, du, ddt, dA_s, dB_p, dC_p, dh0, P2, fast):
        nseq = seq_row.shape[0]
        dim = u.shape[1]
        N = A.shape[1]
        G = Bt.shape[1]
        Dg = dim // G
        bs = (Dg + nblk - 1) // nblk
        for w in prange(nseq * G * nblk):
            s = w // (G * nblk)
            g = (w // nblk) % G
            blk = w % nblk
            r = seq_row[s]
            lo = seq_lo[s]
            hi = seq_hi[s]
            npos = hi - lo
            H = np.empty((K + 1, N), dtype=A.dtype)  # states: H[i] before chunk step i
            E = np.empty((K, N), dtype=A.dtype)  # decays Ā of the chunk's steps
            lam = np.empty(N, dtype=A.dtype)
            dAacc = np.empty(N, dtype=A.dtype)
            d0 = g * Dg + blk * bs
            d1 = min(g * Dg + Dg, d0 + bs)
            for d in range(d0, d1):
                for n in range(N):
                    lam[n] = dhlast[s, d, n]
                    dAacc[n] = 0
                for c in range((npos + K - 1) // K - 1, -1, -1):
                    p0 = c * K
                    m = min(K, npos - p0)
                    for n in range(N):
                        H[0, n] = ckpt[s, d, c, n]
                    for i in range(m):
                        p = p0 + i
                        t = hi - 1 - p if reverse else lo + p
                        dtv = dt[r, d, t]
                        x = dtv * u[r, d, t]
                        for n in range(N):
                            a = _exp_nonpos(dtv * A[d, n], P2, fast)
                            E[i, n] = a
                            H[i + 1, n] = a * H[i, n] + x * Bt[r, g, t, n]
                    for i in range(m - 1, -1, -1):
                        p = p0 + i
                        t = hi - 1 - p if reverse else lo + p
                        dtv = dt[r, d, t]
                        uv = u[r, d, t]
                        gy = dy[r, d, t]
                        du_acc = dtv - dtv  # zeros of the compute dtype
                        ddt_acc = dtv - dtv
                        for n in range(N):
                            gh = lam[n] + gy * Ct[r, g, t, n]
                            bn = Bt[r, g, t, n]
                            a = E[i, n]
                            dC_p[blk, r, g, t, n] += gy * H[i + 1, n]
                            dB_p[blk, r, g, t, n] += gh * dtv * uv
                            du_acc += gh * bn
                            ha = gh * H[i, n] * a
                            ddt_acc += ha * A[d, n] + gh * bn * uv
                            dAacc[n] += ha * dtv
                            lam[n] = gh * a
                        du[r, d, t] = du_acc * dtv
                        ddt[r, d, t] = ddt_acc
                for n in range(N):
                    dh0[s, d, n] = lam[n]
                    dA_s[s, d, n] = dAacc[n]


def _threads() -> int:
    n = max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))
    numba.set_num_threads(n)
    return n


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _Meta:
    """Per-call bookkeeping: the sequences (row, first, end positions), scan direction."""

    def __init__(self, batch, L, cu_seqlens, reverse):
        if cu_seqlens is None:
            self.row = np.arange(batch, dtype=np.int64)
            self.lo = np.zeros(batch, dtype=np.int64)
            self.hi = np.full(batch, L, dtype=np.int64)
        else:
            cs = cu_seqlens.detach().cpu().to(torch.int64).numpy()
            self.row = np.zeros(cs.size - 1, dtype=np.int64)
            self.lo = np.ascontiguousarray(cs[:-1])
            self.hi = np.ascontiguousarray(cs[1:])
        self.nseq = self.row.size
        self.maxlen = int((self.hi - self.lo).max()) if self.nseq else 0
        self.reverse = bool(reverse)


class _CoreFn(torch.autograd.Function):
    """y, last = scan(u, Δ, A, B, C, h0) with Δ final (bias and softplus applied), B and C as
    (batch, G, L, N), all contiguous in the compute dtype."""

    @staticmethod
    def forward(ctx, u, dt, A, Bt, Ct, h0, meta):
        batch, dim, L = u.shape
        N = A.shape[1]
        nck = max(1, -(-meta.maxlen // CKPT))
        y = torch.empty_like(u)
        last = torch.empty(meta.nseq, dim, N, dtype=u.dtype)
        save = any(ctx.needs_input_grad)
        ckpt = torch.empty(meta.nseq, dim, nck if save else 1, N, dtype=u.dtype)
        _threads()
        _fwd_kernel(_np(u), _np(dt), _np(A), _np(Bt), _np(Ct), _np(h0), meta.row, meta.lo,
                    meta.hi, meta.reverse, CKPT, y.numpy(), last.numpy(), ckpt.numpy(), save,
                    _P2, u.dtype == torch.float32)
        ctx.save_for_backward(u, dt, A, Bt, Ct, ckpt)
        ctx.meta = meta
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, dt, A, Bt, Ct, ckpt = ctx.saved_tensors
        meta = ctx.meta
        batch, dim, L = u.shape
        G, N = Bt.shape[1], A.shape[1]
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype).contiguous()
        dlast = (torch.zeros(meta.nseq, dim, N, dtype=u.dtype) if dlast is None
                 else dlast.to(u.dtype).contiguous())
        threads = _threads()
        # Enough work items for the threads: split each group's channels into blocks (each
        # block costs one (batch, G, L, N) slice of ∂B/∂C partials).
        nblk = max(1, min(dim // G, -(-2 * threads // max(1, meta.nseq * G))))
        du = torch.empty_like(u)
        ddt = torch.empty_like(u)
        dA_s = torch.empty(meta.nseq, dim, N, dtype=u.dtype)
        dB_p = torch.zeros(nblk, batch, G, L, N, dtype=u.dtype)
        dC_p = torch.zeros(nblk, batch, G, L, N, dtype=u.dtype)
        dh0 = torch.empty(meta.nseq, dim, N, dtype=u.dtype)
        _bwd_kernel(_np(u), _np(dt), _np(A), _np(Bt), _np(Ct), _np(ckpt), _np(dy), _np(dlast),
                    meta.row, meta.lo, meta.hi, meta.reverse, CKPT, nblk, du.numpy(),
                    ddt.numpy(), dA_s.numpy(), dB_p.numpy(), dC_p.numpy(), dh0.numpy(), _P2,
                    u.dtype == torch.float32)
        return du, ddt, dA_s.sum(0), dB_p.sum(0), dC_p.sum(0), dh0, None


def selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, initial_state=None, return_last_state=False,
                         reverse=False, cu_seqlens=None):
    """Selective scan with compiled CPU loops (arguments already validated by the API).

    Args and returns as :func:`seqlab.kernels.scan.chunked.selective_scan_torch`: out in u's
    dtype, last state in float32 (float64 for float64 u), gradients for every float input.
    """
    if numba is None:
        raise RuntimeError("selective_scan: impl='numba' needs the numba package "
                           "(pip install numba); impl='torch' runs without it")
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    meta = _Meta(batch, L, cu_seqlens, reverse)
    N = A.shape[1]
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    uc = u.to(cdt).contiguous()
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = (initial_state.to(cdt) if initial_state is not None
          else torch.zeros(meta.nseq, dim, N, dtype=cdt))
    y, last = _CoreFn.apply(uc, dt.contiguous(), A.to(cdt).contiguous(),
                            B4.to(cdt).transpose(-1, -2).contiguous(),
                            C4.to(cdt).transpose(-1, -2).contiguous(), h0.contiguous(), meta)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    return (out, last) if return_last_state else out
