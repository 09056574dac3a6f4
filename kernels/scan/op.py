"""The public selective scan: argument checks and the explicit choice of implementation."""
from __future__ import annotations

import torch

from ..api import FLOAT_IO, bad_argument, check_tensor, resolve_impl
from .reference import selective_scan_reference
from .tuning import ScanTuning

Tensor = torch.Tensor


def _check_bc(op, name, M, batch, dim, dstate, length, device):
    check_tensor(op, name, M, ndim=(3, 4), dtypes=FLOAT_IO, device=device)
    if M.dim() == 3:
        want = (batch, dstate, length)
    else:
        groups = M.shape[1]
        if groups < 1 or dim % groups:
            bad_argument(op, name, f"{groups} groups", f"a group count dividing dim={dim}")
        want = (batch, groups, dstate, length)
    if tuple(M.shape) != want:
        bad_argument(op, name, f"shape {tuple(M.shape)}",
                     f"shape {want} (batch, [groups,] dstate, length)")


def selective_scan(
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
    impl: str = "auto",
    tuning: ScanTuning | None = None,
):
    """Selective scan (Mamba's S6), semantics of mamba_ssm's ``selective_scan_fn`` for real A.

    Args:
        u, delta: (batch, dim, L) float32/float16/bfloat16 (float64 for the numba, torch
            and reference paths). Any strides.
        A: (dim, N) float32, negative real parts.
        B, C: (batch, N, L) or grouped (batch, G, N, L), channel d uses group d // (dim // G).
        D, delta_bias: (dim,) float32 or None.
        z: (batch, dim, L) gate or None; out = (y + D u) * silu(z).
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: (batch, dim, N) float32 state before the first step, or None for zeros;
            with cu_seqlens (nseq, dim, N). Receives a gradient.
        return_last_state: also return the state after the last step, (batch, dim, N) float32
            ((nseq, dim, N) with cu_seqlens); gradients flow back through it.
        reverse: scan from the last position to the first (each packed sequence within its
            own bounds with cu_seqlens).
        cu_seqlens: (nseq + 1,) int32/int64 cumulative lengths, starting at 0 and ending at L,
            for sequences packed along L with batch 1; the state restarts at each boundary.
        impl: "auto" | "triton" | "numba" | "torch" | "reference".
        tuning: launch settings of the Triton path (:class:`ScanTuning`; None: its measured
            defaults). The other paths have none and ignore it.

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) if return_last_state.
    """
    op = "selective_scan"
    check_tensor(op, "u", u, ndim=3, dtypes=FLOAT_IO)
    batch, dim, length = u.shape
    dev = u.device
    check_tensor(op, "delta", delta, shape=(batch, dim, length), dtypes=FLOAT_IO, device=dev)
    check_tensor(op, "A", A, ndim=2, dtypes=(torch.float32, torch.float64), device=dev)
    if A.shape[0] != dim:
        bad_argument(op, "A", f"shape {tuple(A.shape)}", f"shape ({dim}, dstate)")
    dstate = A.shape[1]
    if dstate < 1:
        bad_argument(op, "A", f"shape {tuple(A.shape)}", "dstate >= 1")
    _check_bc(op, "B", B, batch, dim, dstate, length, dev)
    _check_bc(op, "C", C, batch, dim, dstate, length, dev)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(op, name, t, shape=(dim,), dtypes=(torch.float32, torch.float64),
                         device=dev)
    if z is not None:
        check_tensor(op, "z", z, shape=(batch, dim, length), dtypes=FLOAT_IO, device=dev)
    nseq = batch
    if cu_seqlens is not None:
        check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64),
                     device=dev)
        if batch != 1:
            bad_argument(op, "u", f"batch {batch} with cu_seqlens",
                         "batch 1 (sequences packed along L)")
        if cu_seqlens.numel() < 2:
            bad_argument(op, "cu_seqlens", f"{cu_seqlens.numel()} entries", "at least 2 (0 and L)")
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != length or any(b < a for a, b in zip(cs, cs[1:])):
            bad_argument(op, "cu_seqlens", f"{cs if len(cs) <= 8 else cs[:4] + ['...'] + cs[-2:]}",
                         f"non-decreasing values from 0 to L={length}")
        nseq = len(cs) - 1
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, shape=(nseq, dim, dstate),
                     dtypes=(torch.float32, torch.float64), device=dev)
    if tuning is not None and not isinstance(tuning, ScanTuning):
        bad_argument(op, "tuning", type(tuning).__name__, "a ScanTuning or None")
    which = resolve_impl(impl, dev, op)
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state,
            bool(return_last_state), bool(reverse), cu_seqlens)
    if which == "reference":
        return selective_scan_reference(*args)
    if which == "torch":
        from .chunked import selective_scan_torch
        return selective_scan_torch(*args)
    if which == "numba":
        from .numba_loops import selective_scan_numba
        return selective_scan_numba(*args)
    from .triton_kernels import selective_scan_triton
    return selective_scan_triton(*args, tuning=tuning)
