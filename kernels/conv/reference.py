"""The depthwise causal conv1d (+ SiLU) of the Mamba mixer and its one-step decoding form, in
plain torch: the spec the Triton kernels are tested against.

    u[b, e, t] = silu(bias[e] + sum_{i<K} weight[e, K-1-i] * x[b, e, t - i])    (causal)
    u[b, e, t] = silu(bias[e] + sum_{i<K} weight[e, K-1-i] * x[b, e, t + i])    (reverse=True)

Positions outside [0, L) read as zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def causal_conv1d_silu_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                                 reverse: bool = False, silu: bool = True) -> Tensor:
    """Plain torch: x (batch, E, L), weight (E, K) or (E, 1, K), bias (E,) or None.

    Computes in x's dtype with the parameters cast to it (float64 in the tests)."""
    E = x.shape[1]
    w = weight.reshape(E, 1, -1).to(x.dtype)
    K = w.shape[-1]
    b = bias.to(x.dtype) if bias is not None else None
    if reverse:
        out = F.conv1d(F.pad(x, (0, K - 1)), w.flip(-1), b, groups=E)
    else:
        out = F.conv1d(F.pad(x, (K - 1, 0)), w, b, groups=E)
    return F.silu(out) if silu else out


def causal_conv1d_update_reference(x: Tensor, conv_state: Tensor, weight: Tensor,
                                   bias: Tensor | None = None, silu: bool = True) -> Tensor:
    """One decoding step: ``conv_state`` (batch, E, K) shifted left by one with x (batch, E)
    appended, in place (a CUDA graph can capture it); returns silu(bias + sum_k state[:, :, k] *
    weight[:, k]) (batch, E) in the promoted dtype of x and the parameters (x's dtype when they
    agree), the sum taken there."""
    E = x.shape[1]
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    u = (conv_state.to(x.dtype) * weight.reshape(E, -1)).sum(-1)
    if bias is not None:
        u = u + bias
    return F.silu(u) if silu else u
