"""The pre-norm residual block every backbone stacks: residual += hidden; hidden =
mixer(norm(residual)). The flat backbone and each stage of the multi-scale one are lists of
these."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .bidirectional import BiMixer
from .config import MambaConfig
from .mixer import Mixer
from .norm import fused_add_norm, make_norm
from .rc import RCWrapper

Tensor = torch.Tensor


def _block_dtypes(hidden: Tensor, residual: Tensor | None, fp32_residual: bool,
                  norm_dtype: torch.dtype):
    """(normed dtype, residual dtype) of the unfused path: the residual in float32 by option
    (else the promoted dtype of the sum); the normed activations in the autocast dtype when
    autocast is on (what the next matmul would cast them to), else the norm's dtype. (The
    unfused path rounds the residual to the norm's dtype before normalising; the kernel
    normalises the residual as stored.)"""
    res = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    if fp32_residual:
        res = torch.float32
    dev = hidden.device.type
    out = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else norm_dtype
    return out, res


class Block(nn.Module):
    """Pre-norm residual block: residual = residual + hidden; hidden = mixer(norm(residual)).

    Carrying (hidden, residual) separately, as mamba_ssm does, lets the residual stream stay
    in float32 (``config.residual_in_fp32``) while the mixer runs in a lower precision.
    """

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.config = config
        mixer_cls = BiMixer if config.bidirectional else Mixer
        if config.rc_equivariant:
            half = dataclasses.replace(config, d_model=config.d_model // 2)
            self.norm = RCWrapper(make_norm(config, half.d_model, device, dtype))
            self.mixer = RCWrapper(mixer_cls(half, layer_idx, device=device, dtype=dtype))
        else:
            self.norm = make_norm(config, config.d_model, device, dtype)
            self.mixer = mixer_cls(config, layer_idx, device=device, dtype=dtype)

    def forward(self, hidden: Tensor, residual: Tensor | None = None, cache=None,
                lengths: Tensor | None = None, cu_seqlens: Tensor | None = None):
        """hidden, residual (batch, L, d_model) -> (mixer output, new residual)."""
        hidden, residual = self._add_norm(hidden, residual)
        kw = {}
        if lengths is not None:
            kw["lengths"] = lengths
        if cu_seqlens is not None:
            kw["cu_seqlens"] = cu_seqlens
        if cache is not None:
            kw["cache"] = cache
        return self.mixer(hidden, **kw), residual

    def _norm_dtype(self) -> torch.dtype:
        return next(self.norm.parameters()).dtype

    def _add_norm(self, hidden: Tensor, residual: Tensor | None):
        """(normed, new residual): one Triton kernel where it applies, else the add, the cast
        and the norm module."""
        fused = fused_add_norm(self.norm, self.config, hidden, residual,
                               *_block_dtypes(hidden, residual, self.residual_in_fp32,
                                              self._norm_dtype()))
        if fused is not None:
            return fused
        residual = hidden if residual is None else residual + hidden
        hidden = self.norm(residual.to(self._norm_dtype()))
        if self.residual_in_fp32:
            residual = residual.float()
        return hidden, residual

    def step(self, hidden: Tensor, residual: Tensor | None, cache):
        """One token: hidden, residual (batch, d_model) -> (mixer output, new residual)."""
        if not isinstance(self.mixer, Mixer):
            raise ValueError("Block.step: only causal, non-RC models decode step by step "
                             "(config.bidirectional and config.rc_equivariant must be False)")
        hidden, residual = self._add_norm(hidden, residual)
        return self.mixer.step(hidden, cache), residual
