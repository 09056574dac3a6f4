"""What every op of seqlab.kernels shares: the choice of implementation, its reporting, and the
argument checks of the public entry points.

``impl`` is one of "auto", "triton", "numba", "torch", "reference". "auto" means triton for
CUDA tensors; on the CPU the scan takes numba (compiled loops) when the numba package imports
and torch (pure PyTorch) otherwise, and the other ops take their torch forms. The choice is
never silent: every resolution is logged at DEBUG level on the ``seqlab.kernels`` logger and
:func:`last_impl` returns the implementation that ran last for each op.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("seqlab.kernels")

IMPLS = ("auto", "triton", "numba", "torch", "reference")
FLOAT_IO = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_last_impl: dict[str, str] = {}


def last_impl(op: str = "selective_scan") -> str | None:
    """The implementation that ran for the last call of ``op`` ("selective_scan",
    "selective_state_update", "causal_conv1d", "causal_conv1d_update", "add_rms_norm"; the
    model layer also reports "mixer", "lm_step" and "lti_ssm"), or None before the first call."""
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
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton runs its kernels through its CPU interpreter (Triton's own variable
    TRITON_INTERPRET=1; it must be set before the first kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, op: str = "selective_scan") -> str:
    """Map ``impl`` (possibly "auto") to a concrete implementation for tensors on ``device``
    and record it as the last one of ``op``."""
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
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: impl='triton' got tensors on {device}; Triton kernels need a CUDA device "
                "(or TRITON_INTERPRET=1 to run them slowly on the CPU)")
    record_impl(op, impl, device)
    return impl


# --------------------------------------------------------------------------- checks
def bad_argument(op: str, name: str, got, need: str):
    """Raise the ValueError of a public entry point: which argument, what it got, what it needs."""
    raise ValueError(f"{op}: argument '{name}' got {got}, needs {need}")


def check_tensor(op: str, name: str, t, ndim=None, shape=None, dtypes=None, device=None):
    """``t`` is a tensor with ``ndim`` dimensions (an int or a tuple of allowed counts), the
    exact ``shape``, one of ``dtypes`` and on ``device`` (each check only when given)."""
    if not isinstance(t, torch.Tensor):
        bad_argument(op, name, type(t).__name__, "a torch.Tensor")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        bad_argument(op, name, f"shape {tuple(t.shape)}", f"{ndim} dimensions")
    if shape is not None and tuple(t.shape) != tuple(shape):
        bad_argument(op, name, f"shape {tuple(t.shape)}", f"shape {tuple(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        bad_argument(op, name, f"dtype {t.dtype}", "one of " + ", ".join(str(d) for d in dtypes))
    if device is not None and t.device != device:
        bad_argument(op, name, f"device {t.device}", f"device {device} (the device of the "
                     "first tensor argument)")
