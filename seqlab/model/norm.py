"""The norms of the pre-norm blocks: a memory-saving RMSNorm, the norm a config asks for, and the
residual add + RMSNorm through the fused kernel where it applies."""
from __future__ import annotations

import torch
import torch.nn as nn

from seqlab.kernels import add_rms_norm, resolve_impl

from .config import MambaConfig

Tensor = torch.Tensor
MAX_FUSED_D = 8192  # widest row of the fused add + RMSNorm kernel


class RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves only its input and the (..., 1) reciprocal RMS for the backward.

    Composed of plain ops, autograd would keep two float32 copies of the activations per norm
    (the input cast and the normalised product); at the 130m size that is 50 MB per layer.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        ct = torch.promote_types(x.dtype, torch.float32)  # at least float32
        xf = x.to(ct)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight.to(ct)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        ct = rstd.dtype
        xhat = x.to(ct) * rstd
        gf = g.to(ct)
        gw = gf * weight.to(ct)
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = (gf * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class RMSNorm(nn.Module):
    """x (..., d) -> x / rms(x) * weight, computed in float32 and returned in x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return RMSNormFn.apply(x, self.weight, self.eps)


def make_norm(config: MambaConfig, d: int, device=None, dtype=None) -> nn.Module:
    """The norm ``config.norm`` names ("rms" or "layer") over d channels."""
    if config.norm == "rms":
        return RMSNorm(d, config.norm_eps, device=device, dtype=dtype)
    return nn.LayerNorm(d, eps=config.norm_eps, device=device, dtype=dtype)


def fused_add_norm(norm: nn.Module, config: MambaConfig, hidden: Tensor, residual: Tensor | None,
                   out_dtype: torch.dtype, residual_dtype: torch.dtype):
    """(normed, residual_out) through the Triton add + RMSNorm kernel, or None where it does
    not apply (LayerNorm, RC-wrapped norms, float64, a non-Triton scan_impl, d > 8192).

    hidden, residual (..., d); normed in ``out_dtype``, residual_out in ``residual_dtype``."""
    float_io = (torch.float32, torch.float16, torch.bfloat16)
    if not (config.fused_add_norm and isinstance(norm, RMSNorm)
            and hidden.dtype in float_io
            and (residual is None or residual.dtype in float_io)
            and residual_dtype != torch.float64 and hidden.shape[-1] <= MAX_FUSED_D
            and resolve_impl(config.scan_impl, hidden.device, op="add_rms_norm") == "triton"):
        return None
    return add_rms_norm(hidden, residual, norm.weight, norm.eps, out_dtype=out_dtype,
                        residual_dtype=residual_dtype, impl="triton")
