"""Public entry points of seqlab.kernels: argument checks and explicit choice of implementation.

``impl`` is one of "auto", "triton", "numba", "torch", "reference". "auto" means triton for
CUDA tensors; on the CPU the scan takes numba (compiled loops) when the numba package imports
and torch (pure PyTorch) otherwise, and the other ops take their torch forms. The choice is never silent: every resolution is logged at DEBUG level on
the ``seqlab.kernels`` logger and :func:`last_impl` returns the implementation that ran last.
"""
from __future__ import annotations

import logging
import os

import torch

from .reference import selective_scan_reference, selective_state_update_reference

Tensor = torch.Tensor
log = logging.getLogger("seqlab.kernels")

IMPLS = ("auto", "triton", "numba", "torch", "reference")
_FLOAT_IO = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_last_impl: dict[str, str] = {}


def last_impl(op: str = "selective_scan") -> str | None:
    """The implementation that ran for the last call of ``op`` ("selective_scan" or
    "selective_state_update"), or None before the first call."""
    return _last_impl.get(op)


def record_impl(op: str, impl: str, device: torch.device | str | None = None) -> None:
    """Note that ``impl`` ran for ``op`` (what :func:`last_impl` answers); a DEBUG log line
    when it changes."""
    if _last_impl.get(op) != impl:
        log.debug("%s: using impl=%s on %s", op, impl, device)
    _last_impl[op] = impl


def triton_available() -> bool:
    """True when the triton package imports (it may still need a GPU or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def numba_available() -> bool:
    """True when the numba package imports (the compiled CPU scan, impl="numba")."""
    from .scan_numba import numba_available as ok
    return ok()


def resolve_impl(impl: str, device: torch.device, op: str = "selective_scan") -> str:
    """Map ``impl`` (possibly "auto") to a concrete implementation for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        if device.type == "cuda":
            impl = "triton"
        else:
            impl = "numba" if op == "selective_scan" and numba_available() else "torch"
    if impl == "numba":
        if device.type != "cpu":
            raise RuntimeError(f"{op}: impl='numba' runs on the CPU, got tensors on {device}; "
                               "use impl='triton' (or 'auto') for CUDA tensors")
        if not numba_available():
            raise RuntimeError(f"{op}: impl='numba' needs the numba package (pip install "
                               "numba); impl='torch' runs without it")
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op}: impl='triton' needs the triton package (pip install triton); "
                "use impl='torch' to run the pure-PyTorch path")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"{op}: impl='triton' got tensors on {device}; Triton kernels need a CUDA device "
                "(or TRITON_INTERPRET=1 to run them slowly on the CPU)")
    record_impl(op, impl, device)
    return impl


# --------------------------------------------------------------------------- checks
def _fail(op: str, name: str, got, need: str):
    raise ValueError(f"{op}: argument '{name}' got {got}, needs {need}")


def _check_tensor(op, name, t, ndim=None, shape=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        _fail(op, name, type(t).__name__, "a torch.Tensor")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        _fail(op, name, f"shape {tuple(t.shape)}", f"{ndim} dimensions")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(op, name, f"shape {tuple(t.shape)}", f"shape {tuple(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, name, f"dtype {t.dtype}", "one of " + ", ".join(str(d) for d in dtypes))
    if device is not None and t.device != device:
        _fail(op, name, f"device {t.device}", f"device {device} (the device of 'u')")


def _check_bc(op, name, M, batch, dim, dstate, length, device):
    _check_tensor(op, name, M, ndim=(3, 4), dtypes=_FLOAT_IO, device=device)
    if M.dim() == 3:
        want = (batch, dstate, length)
    else:
        groups = M.shape[1]
        if groups < 1 or dim % groups:
            _fail(op, name, f"{groups} groups", f"a group count dividing dim={dim}")
        want = (batch, groups, dstate, length)
    if tuple(M.shape) != want:
        _fail(op, name, f"shape {tuple(M.shape)}",
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

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) if return_last_state.
    """
    op = "selective_scan"
    _check_tensor(op, "u", u, ndim=3, dtypes=_FLOAT_IO)
    batch, dim, length = u.shape
    dev = u.device
    _check_tensor(op, "delta", delta, shape=(batch, dim, length), dtypes=_FLOAT_IO, device=dev)
    _check_tensor(op, "A", A, ndim=2, dtypes=(torch.float32, torch.float64), device=dev)
    if A.shape[0] != dim:
        _fail(op, "A", f"shape {tuple(A.shape)}", f"shape ({dim}, dstate)")
    dstate = A.shape[1]
    if dstate < 1:
        _fail(op, "A", f"shape {tuple(A.shape)}", "dstate >= 1")
    _check_bc(op, "B", B, batch, dim, dstate, length, dev)
    _check_bc(op, "C", C, batch, dim, dstate, length, dev)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check_tensor(op, name, t, shape=(dim,), dtypes=(torch.float32, torch.float64),
                          device=dev)
    if z is not None:
        _check_tensor(op, "z", z, shape=(batch, dim, length), dtypes=_FLOAT_IO, device=dev)
    nseq = batch
    if cu_seqlens is not None:
        _check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64),
                      device=dev)
        if batch != 1:
            _fail(op, "u", f"batch {batch} with cu_seqlens", "batch 1 (sequences packed along L)")
        if cu_seqlens.numel() < 2:
            _fail(op, "cu_seqlens", f"{cu_seqlens.numel()} entries", "at least 2 (0 and L)")
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != length or any(b < a for a, b in zip(cs, cs[1:])):
            _fail(op, "cu_seqlens", f"{cs if len(cs) <= 8 else cs[:4] + ['...'] + cs[-2:]}",
                  f"non-decreasing values from 0 to L={length}")
        nseq = len(cs) - 1
    if initial_state is not None:
        _check_tensor(op, "initial_state", initial_state, shape=(nseq, dim, dstate),
                      dtypes=(torch.float32, torch.float64), device=dev)
    which = resolve_impl(impl, dev, op)
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state,
            bool(return_last_state), bool(reverse), cu_seqlens)
    if which == "reference":
        return selective_scan_reference(*args)
    if which == "torch":
        from .scan_torch import selective_scan_torch
        return selective_scan_torch(*args)
    if which == "numba":
        from .scan_numba import selective_scan_numba
        return selective_scan_numba(*args)
    from .scan_triton import selective_scan_triton
    return selective_scan_triton(*args)


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
    _check_tensor(op, "state", state, ndim=3, dtypes=(torch.float32, torch.float64))
    batch, dim, dstate = state.shape
    dev = state.device
    _check_tensor(op, "x", x, shape=(batch, dim), dtypes=_FLOAT_IO, device=dev)
    _check_tensor(op, "dt", dt, shape=(batch, dim), dtypes=_FLOAT_IO, device=dev)
    _check_tensor(op, "A", A, shape=(dim, dstate), dtypes=(torch.float32, torch.float64),
                  device=dev)
    for name, M in (("B", B), ("C", C)):
        _check_tensor(op, name, M, ndim=(2, 3), dtypes=_FLOAT_IO, device=dev)
        if M.dim() == 2 and tuple(M.shape) != (batch, dstate):
            _fail(op, name, f"shape {tuple(M.shape)}", f"shape ({batch}, {dstate})")
        if M.dim() == 3 and (M.shape[0] != batch or M.shape[2] != dstate or dim % M.shape[1]):
            _fail(op, name, f"shape {tuple(M.shape)}",
                  f"shape ({batch}, groups dividing {dim}, {dstate})")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _check_tensor(op, name, t, shape=(dim,), dtypes=(torch.float32, torch.float64),
                          device=dev)
    if z is not None:
        _check_tensor(op, "z", z, shape=(batch, dim), dtypes=_FLOAT_IO, device=dev)
    which = resolve_impl(impl, dev, op)
    if which in ("reference", "torch", "numba"):
        return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias,
                                                dt_softplus)
    from .step_triton import selective_state_update_triton
    return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
