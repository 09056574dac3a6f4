"""One recurrent step of the selective scan (decoding), in plain torch: the spec of the decode
kernels. Symbols as in :mod:`seqlab.kernels.scan.reference`; one step of its recurrence is

    Δ = softplus(dt + bias)    h <- exp(Δ A) h + Δ B x    y = <C, h> + D x    y <- y silu(z)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                     dt_softplus=False):
    """One step of the recurrence; updates ``state`` (batch, dim, N) in place, returns y (batch, dim).

    x, dt, z: (batch, dim); B, C: (batch, N) or (batch, G, N). Output in x's dtype.
    """
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32
    dim = x.shape[1]
    d = dt.to(cdt)
    if dt_bias is not None:
        d = d + dt_bias.to(cdt)
    if dt_softplus:
        d = F.softplus(d)
    Bf = B.to(cdt)
    Cf = C.to(cdt)
    if Bf.dim() == 3:
        Bf = Bf.repeat_interleave(dim // Bf.shape[1], dim=1)  # (b, dim, N)
        Cf = Cf.repeat_interleave(dim // Cf.shape[1], dim=1)
    else:
        Bf = Bf[:, None, :]
        Cf = Cf[:, None, :]
    xf = x.to(cdt)
    dA = torch.exp(d[..., None] * A.to(cdt))
    new = dA * state.to(cdt) + (d * xf)[..., None] * Bf
    state.copy_(new.to(state.dtype))
    y = (new * Cf).sum(-1)
    if D is not None:
        y = y + xf * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)
