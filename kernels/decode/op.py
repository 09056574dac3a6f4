"""The public one-token state update: argument checks and the explicit choice of
implementation."""
from __future__ import annotations

import torch

from ..api import FLOAT_IO, bad_argument, check_tensor, resolve_impl
from .reference import selective_state_update_reference


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, impl="auto"):
    """One recurrent step (decoding): updates ``state`` in place and returns y.

    Args:
        state: (batch, dim, N) float32, updated in place to h_t.
        x, dt: (batch, dim); z: (batch, dim) or None.
        A: (dim, N) float32; B, C: (batch, N) or (batch, G, N); D, dt_bias: (dim,) or None.
        impl: "auto" | "triton" | "numba" | "torch" | "reference" (all but "triton" run the
            reference math: one step is (batch, dim, N) elementwise work).

    Returns:
        y (batch, dim) in x's dtype: equal to one position of :func:`selective_scan`.
    """
    op = "selective_state_update"
    check_tensor(op, "state", state, ndim=3, dtypes=(torch.float32, torch.float64))
    batch, dim, dstate = state.shape
    dev = state.device
    check_tensor(op, "x", x, shape=(batch, dim), dtypes=FLOAT_IO, device=dev)
    check_tensor(op, "dt", dt, shape=(batch, dim), dtypes=FLOAT_IO, device=dev)
    check_tensor(op, "A", A, shape=(dim, dstate), dtypes=(torch.float32, torch.float64),
                 device=dev)
    for name, M in (("B", B), ("C", C)):
        check_tensor(op, name, M, ndim=(2, 3), dtypes=FLOAT_IO, device=dev)
        if M.dim() == 2 and tuple(M.shape) != (batch, dstate):
            bad_argument(op, name, f"shape {tuple(M.shape)}", f"shape ({batch}, {dstate})")
        if M.dim() == 3 and (M.shape[0] != batch or M.shape[2] != dstate or dim % M.shape[1]):
            bad_argument(op, name, f"shape {tuple(M.shape)}",
                         f"shape ({batch}, groups dividing {dim}, {dstate})")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(op, name, t, shape=(dim,), dtypes=(torch.float32, torch.float64),
                         device=dev)
    if z is not None:
        check_tensor(op, "z", z, shape=(batch, dim), dtypes=FLOAT_IO, device=dev)
    which = resolve_impl(impl, dev, op)
    if which in ("reference", "torch", "numba"):
        return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias,
                                                dt_softplus)
    from .state_update import selective_state_update_triton
    return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
