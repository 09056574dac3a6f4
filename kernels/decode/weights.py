"""The tensors a whole-model decoding step reads, as plain containers (no modules).

A causal Mamba LM, as the fused and persistent decoding steps see it: ids -> embedding ->
n_layer pre-norm layers (norm -> mixer, residual in float32) -> final norm -> head. The model
layer (:func:`seqlab.model.decode.lm_weights`) fills these from its modules; the kernels only
read the tensors. Symbols: d_model = D, d_inner = E, dt_rank = R, d_state = N, d_conv = K,
V = rows of the head (the padded vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
NORM_KINDS = ("rms", "layer")


@dataclass(frozen=True)
class NormParams:
    """RMSNorm (kind "rms": x / rms(x) * weight) or LayerNorm (kind "layer": (x - mean) /
    std(x) * weight + bias) over d_model; statistics in float32 with ``eps`` added to the
    variance."""

    kind: str
    weight: Tensor  # (D,)
    bias: Tensor | None  # (D,) for LayerNorm, None for RMSNorm
    eps: float

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"NormParams.kind={self.kind!r}: expected one of {NORM_KINDS}")


@dataclass(frozen=True)
class LayerWeights:
    """One pre-norm Mamba-1 layer (mamba_ssm's parameter names, A = -exp(A_log))."""

    norm: NormParams
    in_proj_weight: Tensor  # (2E, D): rows [0, E) give x, rows [E, 2E) give the gate z
    in_proj_bias: Tensor | None  # (2E,)
    conv_weight: Tensor  # (E, K): the depthwise conv's taps (a view of Conv1d's (E, 1, K))
    conv_bias: Tensor | None  # (E,)
    x_proj_weight: Tensor  # (R + 2N, E): rows give dt_low (R), B (N), C (N)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,): Δ = softplus(dt_proj_weight @ dt_low + dt_proj_bias)
    A_log: Tensor  # (E, N)
    D: Tensor  # (E,)
    out_proj_weight: Tensor  # (D, E)
    out_proj_bias: Tensor | None  # (D,)


@dataclass(frozen=True)
class LMWeights:
    """A causal LM: embedding, layers, final norm and head (the head may be the embedding)."""

    embedding: Tensor  # (V', D)
    layers: tuple[LayerWeights, ...]
    final_norm: NormParams
    head_weight: Tensor  # (V, D), bias-free

    @property
    def d_model(self) -> int:
        return self.embedding.shape[1]
