"""The public causal conv1d + SiLU and its decoding update: argument checks and the explicit
choice of implementation ("triton", or the torch reference for every other impl)."""
from __future__ import annotations

import torch

from ..api import resolve_impl
from .reference import causal_conv1d_silu_reference, causal_conv1d_update_reference

Tensor = torch.Tensor
MAX_K = 4  # widest conv of the Triton kernels (training and prefill)
MAX_K_UPDATE = 64  # widest conv of the Triton decoding update


def _taps(op: str, weight: Tensor, E: int) -> Tensor:
    """weight (E, K) or (E, 1, K) -> (E, K), else a ValueError naming the shapes."""
    w = weight.reshape(E, -1) if weight.dim() == 3 else weight
    if w.dim() != 2 or w.shape[0] != E or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(f"{op}: weight needs shape ({E}, K) or ({E}, 1, K), "
                         f"got {tuple(weight.shape)}")
    return w


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                       reverse: bool = False, impl: str = "auto") -> Tensor:
    """silu(depthwise causal conv1d(x) + bias), or anti-causal with ``reverse``.

    Args:
        x: (batch, E, L) float32/float16/bfloat16/float64, any strides (best: stride 1 on E).
        weight: (E, K) or (E, 1, K) (an ``nn.Conv1d(E, E, K, groups=E)`` weight); the Triton
            kernels take 1 <= K <= 4.
        bias: (E,) or None.
        reverse: anti-causal: output t sees t..t+K-1, tap weight[:, K-1] on t itself.
        impl: "auto" | "triton" | "numba" | "torch" | "reference"; all but "triton" run the
            torch reference (``F.conv1d``); "auto" is triton for CUDA tensors.

    Returns:
        u (batch, E, L) in x's dtype; from Triton the transposed view of a contiguous
        (batch, L, E) buffer. Differentiable in x, weight and bias.
    """
    op = "causal_conv1d_silu"
    if x.dim() != 3:
        raise ValueError(f"{op}: x needs shape (batch, E, L), got {tuple(x.shape)}")
    batch, E, L = x.shape
    w = _taps(op, weight, E)
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"{op}: bias needs shape ({E},), got {tuple(bias.shape)}")
    if resolve_impl(impl, x.device, "causal_conv1d") != "triton":
        return causal_conv1d_silu_reference(x, w, bias, reverse)
    K = w.shape[1]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"{op}: kernel width K={K} is not in 1..{MAX_K}")
    if x.numel() == 0:
        raise ValueError(f"{op}: length 0 is not supported (x {tuple(x.shape)})")
    from .triton_kernels import causal_conv1d_silu_triton
    return causal_conv1d_silu_triton(x, w, bias, reverse)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor,
                         bias: Tensor | None = None, silu: bool = True,
                         impl: str = "auto") -> Tensor:
    """One decoding step of the causal conv: ``conv_state`` (batch, E, K) is shifted left by
    one position with x (batch, E) appended, in place, and the output at the new position,
    silu(bias + sum_k state[:, :, k] * weight[:, k]) (batch, E), is returned in x's dtype.

    weight (E, K) or (E, 1, K), bias (E,) or None. ``impl`` as for
    :func:`causal_conv1d_silu`: "triton" is one launch (K up to 64, the parameters rounded to
    x's dtype first, float32 sums); every other impl the torch reference (roll, write,
    multiply, sum, bias, SiLU).
    """
    op = "causal_conv1d_update"
    if x.dim() != 2:
        raise ValueError(f"{op}: x needs shape (batch, E), got {tuple(x.shape)}")
    batch, E = x.shape
    if conv_state.dim() != 3 or tuple(conv_state.shape[:2]) != (batch, E):
        raise ValueError(f"{op}: conv_state needs shape ({batch}, {E}, K), "
                         f"got {tuple(conv_state.shape)}")
    K = conv_state.shape[2]
    w = weight.reshape(E, -1) if weight.dim() == 3 else weight
    triton_path = resolve_impl(impl, x.device, op) == "triton"
    if tuple(w.shape) != (E, K) or (triton_path and K > MAX_K_UPDATE):
        raise ValueError(f"{op}: weight needs shape ({E}, {K}) (K <= {MAX_K_UPDATE}), got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"{op}: bias needs shape ({E},), got {tuple(bias.shape)}")
    if not triton_path:
        return causal_conv1d_update_reference(x, conv_state, w, bias, silu)
    from .triton_kernels import causal_conv1d_update_triton
    return causal_conv1d_update_triton(x, conv_state, w, bias, silu)
