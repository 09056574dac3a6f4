"""The selective scan (S6) as a plain sequential loop: the spec every fast path is tested against.

Glossary (code name -> Mamba paper symbol):
    u          x      input sequence                    (batch, dim, L)
    delta      Δ      step size before bias/softplus    (batch, dim, L)
    A          A      diagonal state matrix, real < 0   (dim, N)
    B, C       B, C   input/output projections          (batch, N, L) or (batch, G, N, L)
    D          D      skip connection                   (dim,)
    z          z      gate, out = y * silu(z)           (batch, dim, L)
    N = dstate, G = groups (channel d uses group d // (dim // G))

Recurrence for t = 1..L (``reverse=True`` runs t = L..1):
    Δ_t = softplus(δ_t + bias)    Ā_t = exp(Δ_t A)    h_t = Ā_t h_{t-1} + Δ_t B_t u_t
    y_t = <C_t, h_t> + D u_t      out_t = y_t silu(z_t)

Everything is computed in float32, or in float64 when ``u`` is float64, so the reference
doubles as a float64 oracle. Gradients come from autograd through the loop, and they flow
into ``initial_state`` and back from ``last_state``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _expand_groups(M: Tensor, dim: int) -> Tensor:
    """(b, N, L) or (b, G, N, L) -> (b, dim, N, L), channel d reading group d // (dim // G)."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(M.shape[0], dim, M.shape[1], M.shape[2])
    groups = M.shape[1]
    return M.repeat_interleave(dim // groups, dim=1)


def _scan_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse):
    """One contiguous scan over the last axis. Returns (out in u.dtype, last_state)."""
    cdt = _compute_dtype(u)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    uf = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        # torch's softplus passes x through above threshold 20: the semantics we specify.
        dt = F.softplus(dt)
    Bf = _expand_groups(B.to(cdt), dim)  # (b, dim, N, L)
    Cf = _expand_groups(C.to(cdt), dim)
    Af = A.to(cdt)
    if initial_state is not None:
        h = initial_state.to(cdt)
    else:
        h = torch.zeros(batch, dim, dstate, dtype=cdt, device=u.device)
    steps = range(length - 1, -1, -1) if reverse else range(length)
    ys = [None] * length
    for t in steps:
        dA = torch.exp(dt[:, :, t, None] * Af)  # (b, dim, N)
        h = dA * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, :, :, t]
        ys[t] = (h * Cf[:, :, :, t]).sum(-1)  # (b, dim)
    if length:
        y = torch.stack(ys, dim=-1)
    else:
        y = uf.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + uf * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), h


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
):
    """Sequential selective scan. Same arguments and return as :func:`seqlab.kernels.selective_scan`.

    With ``cu_seqlens`` (int, (nseq + 1,), batch 1) each packed sequence is scanned on its own,
    starting from ``initial_state[i]`` (or zeros); ``last_state`` is then (nseq, dim, N).
    """
    if cu_seqlens is None:
        out, last = _scan_one(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              initial_state, reverse)
        return (out, last) if return_last_state else out
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, lasts = [], []
    for i in range(len(bounds) - 1):
        sl = slice(bounds[i], bounds[i + 1])
        h0 = initial_state[i:i + 1] if initial_state is not None else None
        o, h = _scan_one(u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], D,
                         None if z is None else z[..., sl], delta_bias, delta_softplus,
                         h0, reverse)
        outs.append(o)
        lasts.append(h)
    out = torch.cat(outs, dim=-1)
    last = torch.cat(lasts, dim=0)
    return (out, last) if return_last_state else out
