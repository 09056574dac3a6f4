"""Selective scan (S6) in pure PyTorch: the CPU implementation behind ``impl="torch"``.

Same semantics as :mod:`seqlab.kernels.scan.reference` (read its docstring for the glossary),
computed chunk by chunk so memory stays O(batch * dim * N * chunk) whatever L is.

Layout. Time is walked in *scan order* (position p is t = p, or t = L-1-p when reversing);
each chunk of ``chunk`` positions is cut into S segments of Q steps and held as
(batch, G, dim/G, Q, S, N) with local time p = s*Q + q. A step over q then advances all S
segments at once with one fused op on a (batch, G, dim/G, S, N) slice, so a chunk costs
Q + S Python steps instead of Q*S:

1. local pass (q = 0..Q-1): each segment's states from a zero start, h_loc, and its
   running decay P_q = a_0 * ... * a_q (products of Ā <= 1, never exp(-cumsum) ratios);
2. carry pass (s = 0..S-1, tiny tensors): each segment's true start state;
3. fix-up: h = h_loc + P * h_start, one fused op.
The backward runs the same three passes in reverse on the adjoint λ, from the chunk-start
states saved by the forward, recomputing h inside each chunk.

``cu_seqlens`` keeps everything vectorised: at each packed sequence's first position the
decay is set to 0 (the carried state is forgotten) and ``Ā * initial_state[i]`` is added to
the input term; the adjoint picks up ``∂L/∂last_state[i]`` at each sequence's last position.
The gradients of Δ and A use Ā_t h_{t-1} from the recomputed states shifted by one step
(with Ā h0 at sequence starts), not the cancelling identity Ā_t h_{t-1} = h_t - Δ_t B_t u_t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Chosen by measurement with torch.set_num_threads(2) on the 2-core dev box at (batch 2, dim
# 256, L 1024, N 16, float32, softplus, D, z, bias): forward+backward took 0.16 s at 128/4,
# 0.19 s at 128/8 and 0.18 s at 256/4 (forward alone 0.045-0.05 s) on a lightly loaded
# machine; the reference loop takes 58-90 s. Smaller tiles stay in cache; Q = 4 keeps the
# strided step loop short. CHUNK is rounded down to a multiple of SEG.
DEFAULT_CHUNK = 128
DEFAULT_SEG = 4


# --------------------------------------------------------------------------- layout helpers
class _Problem:
    """Shapes, dtypes and the scan-order / chunk bookkeeping shared by forward and backward."""

    def __init__(self, u, A, B, delta_softplus, reverse, cu_seqlens, nseq, chunk, seg):
        self.batch, self.dim, self.L = u.shape
        self.N = A.shape[1]
        self.G = B.shape[1] if B.dim() == 4 else 1
        self.Dg = self.dim // self.G
        self.cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.softplus = delta_softplus
        self.reverse = reverse
        self.Q = max(1, min(seg, chunk))
        self.chunk = max(self.Q, chunk // self.Q * self.Q)
        self.nseq = nseq
        self.varlen = cu_seqlens is not None
        self.chunks = [(p0, min(p0 + self.chunk, self.L)) for p0 in range(0, self.L, self.chunk)]
        # Per chunk: (seq ids, local positions) of packed-sequence starts and ends, scan order.
        self.starts = [None] * len(self.chunks)
        self.ends = [None] * len(self.chunks)
        self.empty = []
        if self.varlen:
            cs = [int(x) for x in cu_seqlens.tolist()]
            st = [[[], []] for _ in self.chunks]
            en = [[[], []] for _ in self.chunks]
            for i in range(nseq):
                lo, hi = cs[i], cs[i + 1]
                if hi == lo:
                    self.empty.append(i)
                    continue
                first, last = (self.L - hi, self.L - 1 - lo) if reverse else (lo, hi - 1)
                for pos, table in ((first, st), (last, en)):
                    k = pos // self.chunk
                    table[k][0].append(i)
                    table[k][1].append(pos - k * self.chunk)
            dev = u.device
            for k in range(len(self.chunks)):
                for src, dst in ((st, self.starts), (en, self.ends)):
                    if src[k][0]:
                        ids = torch.tensor(src[k][0], device=dev)
                        loc = torch.tensor(src[k][1], device=dev)
                        dst[k] = (ids, loc % self.Q, loc // self.Q)

    def take(self, x, p0, p1):
        """x[..., scan positions p0:p1] in scan order, upcast, zero-padded to a multiple of Q."""
        if self.reverse:
            x = x[..., self.L - p1:self.L - p0].flip(-1)
        else:
            x = x[..., p0:p1]
        x = x.to(self.cdt)
        pad = -(p1 - p0) % self.Q
        return F.pad(x, (0, pad)) if pad else x

    def put(self, dst, p0, p1, val):
        """dst[..., scan positions p0:p1] = val (val in scan order, maybe padded)."""
        val = val[..., :p1 - p0]
        if self.reverse:
            dst[..., self.L - p1:self.L - p0] = val.flip(-1)
        else:
            dst[..., p0:p1] = val

    def to_layout(self, x):
        """(batch, dim, T) -> (batch, G, Dg, Q, S): time p = s*Q + q."""
        b, _, T = x.shape
        return x.reshape(b, self.G, self.Dg, T // self.Q, self.Q).transpose(-1, -2).contiguous()

    def from_layout(self, x):
        """(batch, G, Dg, Q, S) -> (batch, dim, T)."""
        b = x.shape[0]
        return x.transpose(-1, -2).reshape(b, self.dim, -1)

    def bc_layout(self, M):
        """(batch, G, N, T) -> (batch, G, 1, Q, S, N), contiguous (it is 1/Dg of a full tile)."""
        b, G, N, T = M.shape
        return M.reshape(b, G, N, T // self.Q, self.Q).permute(0, 1, 4, 3, 2).contiguous()[:, :, None]

    def bc_unlayout(self, M):
        """(batch, G, Q, S, N) -> (batch, G, N, T)."""
        b, G, Q, S, N = M.shape
        return M.permute(0, 1, 4, 3, 2).reshape(b, G, N, S * Q)


def _pick(t, idx):
    """t[:, :, :, q, s, :] at index pairs idx=(ids, q, s) -> (batch, G, Dg, k, N)."""
    return t[:, :, :, idx[1], idx[2], :]


def _per_seq(x, pb):
    """(1, G, Dg, k, N) -> (k, dim, N)."""
    return x.reshape(pb.dim, x.shape[3], pb.N).transpose(0, 1)


def _from_seq(x, pb):
    """(k, dim, N) -> (1, G, Dg, k, N)."""
    return x.transpose(0, 1).reshape(1, pb.G, pb.Dg, x.shape[0], pb.N)


# --------------------------------------------------------------------------- the scans
def _scan_chunk(a, h, carry, keep_a):
    """Forward recurrence h_p = a_p h_{p-1} + h_p over one chunk, in place on ``h``.

    a, h: (batch, G, Dg, Q, S, N) decays and inputs (h holds Δ B u on entry, states on exit);
    carry: (batch, G, Dg, N) state before the chunk. ``a`` is overwritten with running products
    unless keep_a. Returns the state after the chunk's last position (incl. padding, whose
    decay is 1 and input 0).
    """
    Q, S = a.shape[3], a.shape[4]
    P = a if not keep_a else torch.empty_like(a)
    if keep_a:
        P[:, :, :, 0] = a[:, :, :, 0]
    for q in range(1, Q):
        h[:, :, :, q].addcmul_(a[:, :, :, q], h[:, :, :, q - 1])
        torch.mul(a[:, :, :, q], P[:, :, :, q - 1], out=P[:, :, :, q])
    start = torch.empty(a.shape[:3] + (S, a.shape[5]), dtype=a.dtype, device=a.device)
    for s in range(S):
        start[:, :, :, s] = carry
        carry = torch.addcmul(h[:, :, :, Q - 1, s], P[:, :, :, Q - 1, s], carry)
    h.addcmul_(P, start[:, :, :, None])
    return carry


def _scan_chunk_rev(a, lam, rho):
    """Adjoint recurrence λ_p = c_p + a_{p+1} λ_{p+1} over one chunk, in place on ``lam``.

    a: (batch, G, Dg, Q, S, N) decays of the forward; lam holds c = gy C (+ ∂last_state) on
    entry and λ on exit; rho: (batch, G, Dg, N) = ∂L/∂h at the chunk's last position coming
    from later positions. Returns a_0 λ_0 = ∂L/∂(state before the chunk).
    """
    Q, S = a.shape[3], a.shape[4]
    P = torch.empty_like(a)  # P_q = a_{q+1} ... a_{Q-1} within a segment
    P[:, :, :, Q - 1] = 1
    for q in range(Q - 2, -1, -1):
        lam[:, :, :, q].addcmul_(a[:, :, :, q + 1], lam[:, :, :, q + 1])
        torch.mul(a[:, :, :, q + 1], P[:, :, :, q + 1], out=P[:, :, :, q])
    end = torch.empty(a.shape[:3] + (S, a.shape[5]), dtype=a.dtype, device=a.device)
    for s in range(S - 1, -1, -1):
        end[:, :, :, s] = rho
        rho = a[:, :, :, 0, s] * torch.addcmul(lam[:, :, :, 0, s], P[:, :, :, 0, s], rho)
    lam.addcmul_(P, end[:, :, :, None])
    return rho


def _shift(h, first):
    """h_{p-1} for every p of a (batch, G, Dg, Q, S, N) chunk; ``first`` is the state before it."""
    Q = h.shape[3]
    hp = torch.empty_like(h)
    hp[:, :, :, 1:] = h[:, :, :, :Q - 1]
    hp[:, :, :, 0, 1:] = h[:, :, :, Q - 1, :-1]
    hp[:, :, :, 0, 0] = first
    return hp


# --------------------------------------------------------------------------- chunk pieces
def _inputs(pb, p0, p1, u, delta, B4, C4, delta_bias):
    """Loads one chunk: Δ, u in layout (b, G, Dg, Q, S); B, C (b, G, 1, Q, S, N); and the
    pre-softplus argument (for σ in the backward) or None."""
    x = pb.take(delta, p0, p1)
    if delta_bias is not None:
        x = x + delta_bias[:, None]
    dt = F.softplus(x) if pb.softplus else x
    if p1 - p0 < x.shape[-1]:
        dt[..., p1 - p0:] = 0  # padded steps: Ā = 1 and Δ B u = 0 keep the carry intact
    return (pb.to_layout(dt), pb.to_layout(pb.take(u, p0, p1)), pb.bc_layout(pb.take(B4, p0, p1)),
            pb.bc_layout(pb.take(C4, p0, p1)), x if pb.softplus else None)


def _decay_and_input(pb, dt, uu, Bc, A3):
    """Ā = exp(Δ A) and Δ B u as (b, G, Dg, Q, S, N) tiles."""
    a = torch.exp(dt[..., None] * A3)
    bu = (dt * uu)[..., None] * Bc
    return a, bu


def _reset_starts(pb, k, a, bu, h0):
    """Packed-sequence starts in chunk k: forget the carry, inject Ā h0. Returns Ā at the starts."""
    idx = pb.starts[k]
    if idx is None:
        return None
    a_st = _pick(a, idx)
    if h0 is not None:
        bu[:, :, :, idx[1], idx[2], :] += a_st * _from_seq(h0[idx[0]], pb)
    a[:, :, :, idx[1], idx[2], :] = 0
    return a_st


def _forward(u, delta, A, B4, C4, D, z, delta_bias, h0, pb, save):
    """Runs the scan. Returns out (u.dtype), last (nseq, dim, N), chunk-start states
    (nchunks, batch, dim, N) or None, y before the gate (batch, dim, L) or None."""
    cdt = pb.cdt
    b, dim, L, N = pb.batch, pb.dim, pb.L, pb.N
    A3 = A.to(cdt).reshape(pb.G, pb.Dg, 1, 1, N)
    Dc = None if D is None else D.to(cdt)[:, None]
    out = torch.empty(b, dim, L, dtype=u.dtype, device=u.device)
    y_save = torch.empty(b, dim, L, dtype=cdt, device=u.device) if save and z is not None else None
    starts = torch.empty(len(pb.chunks), b, dim, N, dtype=cdt, device=u.device) if save else None
    h0c = None if h0 is None else h0.to(cdt)
    last = torch.zeros(pb.nseq, dim, N, dtype=cdt, device=u.device)
    if pb.varlen:
        carry = torch.zeros(b, pb.G, pb.Dg, N, dtype=cdt, device=u.device)
        if h0c is not None and pb.empty:
            last[pb.empty] = h0c[pb.empty]
    else:
        carry = (h0c.reshape(b, pb.G, pb.Dg, N).clone() if h0c is not None
                 else torch.zeros(b, pb.G, pb.Dg, N, dtype=cdt, device=u.device))
    for k, (p0, p1) in enumerate(pb.chunks):
        if save:
            starts[k] = carry.reshape(b, dim, N)
        dt, uu, Bc, Cc, _ = _inputs(pb, p0, p1, u, delta, B4, C4, delta_bias)
        a, h = _decay_and_input(pb, dt, uu, Bc, A3)
        if pb.varlen:
            _reset_starts(pb, k, a, h, h0c)
        carry = _scan_chunk(a, h, carry, keep_a=False)
        if pb.varlen and pb.ends[k] is not None:
            last[pb.ends[k][0]] = _per_seq(_pick(h, pb.ends[k]), pb)
        y = pb.from_layout((h * Cc).sum(-1))
        if Dc is not None:
            y = y + pb.from_layout(uu) * Dc
        if z is not None:
            if y_save is not None:
                pb.put(y_save, p0, p1, y)
            y = y * F.silu(pb.take(z, p0, p1))
        pb.put(out, p0, p1, y)
    if not pb.varlen:
        last = carry.reshape(b, dim, N)
    return out, last, starts, y_save


def _backward(g_out, g_last, saved, pb):
    """Gradients of every input from ∂L/∂out and ∂L/∂last_state (see KERNEL_BRIEF "Gradients")."""
    u, delta, A, B4, C4, D, z, delta_bias, h0, starts, y_save = saved
    cdt = pb.cdt
    b, dim, L, N, G, Dg = pb.batch, pb.dim, pb.L, pb.N, pb.G, pb.Dg
    dev = u.device
    A3 = A.to(cdt).reshape(G, Dg, 1, 1, N)
    Dc = None if D is None else D.to(cdt)[:, None]
    h0c = None if h0 is None else h0.to(cdt)
    du = torch.empty(b, dim, L, dtype=cdt, device=dev)
    ddelta = torch.empty(b, dim, L, dtype=cdt, device=dev)
    dz = torch.empty(b, dim, L, dtype=cdt, device=dev) if z is not None else None
    dB = torch.empty(B4.shape, dtype=cdt, device=dev)
    dC = torch.empty(C4.shape, dtype=cdt, device=dev)
    dA = torch.zeros(G, Dg, N, dtype=cdt, device=dev)
    dD = torch.zeros(dim, dtype=cdt, device=dev) if D is not None else None
    dbias = torch.zeros(dim, dtype=cdt, device=dev) if delta_bias is not None else None
    dh0 = torch.zeros(pb.nseq, dim, N, dtype=cdt, device=dev)
    g_last = None if g_last is None else g_last.to(cdt)
    if pb.varlen:
        rho = torch.zeros(b, G, Dg, N, dtype=cdt, device=dev)
        if g_last is not None and pb.empty:
            dh0[pb.empty] = g_last[pb.empty]
    else:
        rho = (g_last.reshape(b, G, Dg, N).clone() if g_last is not None
               else torch.zeros(b, G, Dg, N, dtype=cdt, device=dev))
    for k in range(len(pb.chunks) - 1, -1, -1):
        p0, p1 = pb.chunks[k]
        dt, uu, Bc, Cc, x = _inputs(pb, p0, p1, u, delta, B4, C4, delta_bias)
        a, h = _decay_and_input(pb, dt, uu, Bc, A3)
        a_st = _reset_starts(pb, k, a, h, h0c) if pb.varlen else None
        _scan_chunk(a, h, starts[k].reshape(b, G, Dg, N), keep_a=True)
        g = pb.to_layout(pb.take(g_out, p0, p1))
        if z is not None:
            zz = pb.to_layout(pb.take(z, p0, p1))
            y = pb.to_layout(pb.take(y_save, p0, p1))
            sz = torch.sigmoid(zz)
            gy = g * zz * sz
            pb.put(dz, p0, p1, pb.from_layout(g * y * sz * (1 + zz * (1 - sz))))
        else:
            gy = g
        lam = gy[..., None] * Cc
        if pb.varlen and pb.ends[k] is not None and g_last is not None:
            idx = pb.ends[k]
            lam[:, :, :, idx[1], idx[2], :] += _from_seq(g_last[idx[0]], pb)
        rho = _scan_chunk_rev(a, lam, rho)
        if a_st is not None:
            # Ā at a sequence start links λ there to that sequence's initial state.
            dh0[pb.starts[k][0]] = _per_seq(a_st * _pick(lam, pb.starts[k]), pb)
        pb.put(dC, p0, p1, pb.bc_unlayout((h * gy[..., None]).sum(2)))
        dtu = dt * uu
        w = lam * dtu[..., None]
        pb.put(dB, p0, p1, pb.bc_unlayout(w.sum(2)))
        lb = (lam * Bc).sum(-1)  # Σ_n λ B
        # λ_t Ā_t h_{t-1}, from h shifted one step in scan order. (The identity
        # Ā_t h_{t-1} = h_t - Δ_t B_t u_t would avoid the shift but cancels when Ā is small.)
        hp = _shift(h, starts[k].reshape(b, G, Dg, N)).mul_(a)
        if a_st is not None and h0c is not None:
            idx = pb.starts[k]
            hp[:, :, :, idx[1], idx[2], :] = a_st * _from_seq(h0c[idx[0]], pb)
        hp.mul_(lam)
        ddt = lb * uu + (hp * A3).sum(-1)
        dA += (hp * dt[..., None]).sum((0, 3, 4))
        duu = lb * dt
        if Dc is not None:
            dD += (pb.from_layout(gy * uu)).sum((0, 2))
            duu = duu + gy * Dc.reshape(G, Dg, 1, 1)
        pb.put(du, p0, p1, pb.from_layout(duu))
        # Padded steps see λ (∂last_state flows through them) but are not real positions.
        ddt = pb.from_layout(ddt)[..., :p1 - p0]
        if x is not None:
            # torch's softplus is the identity above 20, so its derivative there is exactly 1.
            x = x[..., :p1 - p0]
            ddt = ddt * torch.where(x > 20, 1.0, torch.sigmoid(x))
        if dbias is not None:
            dbias += ddt.sum((0, 2))
        pb.put(ddelta, p0, p1, ddt)
    if not pb.varlen:
        dh0 = rho.reshape(b, dim, N)
    return du, ddelta, dA.reshape(dim, N), dB, dC, dD, dz, dbias, dh0


class _SelectiveScanFn(torch.autograd.Function):
    """Saves the inputs, one state per chunk start and the pre-gate y (when z is given);
    the backward recomputes h chunk by chunk, latest chunk first."""

    @staticmethod
    def forward(ctx, u, delta, A, B4, C4, D, z, delta_bias, h0, pb):
        out, last, starts, y_save = _forward(u, delta, A, B4, C4, D, z, delta_bias, h0, pb,
                                             save=True)
        ctx.pb = pb
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, h0, starts, y_save)
        return out, last

    @staticmethod
    def backward(ctx, g_out, g_last):
        pb = ctx.pb
        saved = ctx.saved_tensors
        # g_out, g_last are never None: autograd materialises zeros for unused outputs.
        grads = _backward(g_out, g_last, saved, pb)
        # Each gradient in its input's dtype (computed in float32, or float64).
        return tuple(None if ref is None else g.to(ref.dtype)
                     for g, ref in zip(grads, saved[:9])) + (None,)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, initial_state=None, return_last_state=False,
                         reverse=False, cu_seqlens=None, chunk=DEFAULT_CHUNK, seg=DEFAULT_SEG):
    """Chunked selective scan with a hand-written backward (arguments already validated).

    Args:
        u, delta, z: (batch, dim, L) float32/float16/bfloat16/float64, any strides.
        A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,) or None.
        initial_state: (batch, dim, N), or (nseq, dim, N) with cu_seqlens, or None.
        cu_seqlens: (nseq + 1,) int cumulative lengths with batch 1, or None.
        chunk, seg: positions held per chunk and steps per segment (tuning knobs).

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) with last_state (batch, dim, N)
        ((nseq, dim, N) with cu_seqlens) in float32, float64 for float64 u. Computation is in
        float32 (float64 for float64 u). Memory is O(batch * dim * N * chunk); with autograd
        only the state at each chunk start (and y before the gate when z is given) is saved.
    """
    nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    pb = _Problem(u, A, B4, delta_softplus, reverse, cu_seqlens, nseq, chunk, seg)
    tensors = (u, delta, A, B4, C4, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last = _SelectiveScanFn.apply(*tensors, pb)
    else:
        out, last, _, _ = _forward(*tensors, pb, save=False)
    return (out, last) if return_last_state else out
