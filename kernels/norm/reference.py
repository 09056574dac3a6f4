"""The residual add + RMSNorm of a pre-norm block in plain torch: the spec of the Triton kernels.

    residual_out = x + residual          (stored in residual_dtype)
    normed       = residual_out / sqrt(mean_d(residual_out^2) + eps) * weight

normed is computed from residual_out as stored (rounded to residual_dtype, then read back).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def add_rms_norm_reference(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-5,
                           out_dtype: torch.dtype | None = None,
                           residual_dtype: torch.dtype = torch.float32):
    """Plain torch, same contract as :func:`seqlab.kernels.add_rms_norm`; computes in float32,
    or float64 when x is float64 (the tests pass float64 everything, residual_dtype included)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    a = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    residual_out = a.to(residual_dtype)
    a = residual_out.to(acc)
    rstd = torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    normed = (a * rstd * weight.to(acc)).to(out_dtype or x.dtype)
    return normed, residual_out
