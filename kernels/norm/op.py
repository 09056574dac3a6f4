"""The public residual add + RMSNorm: argument checks and the explicit choice of implementation
("triton", or the torch reference for every other impl)."""
from __future__ import annotations

import torch

from ..api import resolve_impl
from .reference import add_rms_norm_reference

Tensor = torch.Tensor
MAX_D = 8192  # widest row a Triton program holds
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: Tensor, residual: Tensor | None, weight: Tensor, out_dtype, residual_dtype,
           triton: bool):
    name = "add_rms_norm"
    dtypes = IO_DTYPES if triton else IO_DTYPES + (torch.float64,)
    if x.dim() < 1:
        raise ValueError(f"{name}: x needs shape (..., d), got a 0-d tensor")
    if x.dtype not in dtypes:
        raise ValueError(f"{name}: x has dtype {x.dtype}, expected one of {dtypes}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}, the last dim d must be >= 1")
    if triton and d > MAX_D:
        raise ValueError(f"{name}: d={d} (last dim of x) is over the {MAX_D} supported")
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}, "
                             f"x has {tuple(x.shape)}")
        if residual.dtype not in dtypes:
            raise ValueError(f"{name}: residual has dtype {residual.dtype}, "
                             f"expected one of {dtypes}")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device}, x on {x.device}")
    if tuple(weight.shape) != (d,):
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({d},) "
                         f"for x of shape {tuple(x.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name}: weight has dtype {weight.dtype}, expected a float dtype")
    if weight.device != x.device:
        raise ValueError(f"{name}: weight is on {weight.device}, x on {x.device}")
    if out_dtype not in dtypes:
        raise ValueError(f"{name}: out_dtype {out_dtype} is not one of {dtypes}")
    if residual_dtype not in dtypes:
        raise ValueError(f"{name}: residual_dtype {residual_dtype} is not one of {dtypes}")


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-5,
                 out_dtype: torch.dtype | None = None,
                 residual_dtype: torch.dtype = torch.float32, impl: str = "auto"):
    """``residual_out = x + residual``; ``normed = rms_norm(residual_out) * weight``, fused.

    Args:
        x: (..., d) float32/float16/bfloat16, d <= 8192 for Triton (best: rows with stride 1
            along d).
        residual: same shape as x (any of those dtypes), or None (residual_out = x).
        weight: (d,) any float dtype; used in float32.
        eps: added to mean(residual_out^2) under the square root.
        out_dtype: dtype of normed (default: x's).
        residual_dtype: dtype residual_out is stored in (default float32).
        impl: "auto" | "triton" | "numba" | "torch" | "reference"; all but "triton" run the
            torch reference (which also takes float64); "auto" is triton for CUDA tensors.

    Returns:
        (normed, residual_out), contiguous, x's shape. Differentiable in x, residual and weight
        through both outputs; gradients come back in each input's dtype.
    """
    out_dtype = out_dtype or x.dtype
    triton = resolve_impl(impl, x.device, "add_rms_norm") == "triton"
    _check(x, residual, weight, out_dtype, residual_dtype, triton)
    if not triton:
        return add_rms_norm_reference(x, residual, weight, eps, out_dtype, residual_dtype)
    from .triton_kernels import add_rms_norm_triton
    return add_rms_norm_triton(x, residual, weight, float(eps), out_dtype, residual_dtype)
