"""BiMixer: a forward and a reverse Mamba mixer over the same input (Caduceus' BiMamba idea).

The reverse direction is not computed on flipped copies of the activations: its conv runs
anti-causally (padded on the right) and its scan runs with ``reverse=True``. Right-padded
batches (``lengths``) and packed batches (``cu_seqlens``) keep each sequence on its own in
both directions; see :meth:`seqlab.model.mixer.Mixer.forward` for how padding is handled.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import MambaConfig
from .fused_mixer import fused_mixer, fused_mixer_applies
from .mixer import Mixer

Tensor = torch.Tensor


class BiMixer(nn.Module):
    """(batch, L, d_model) -> (batch, L, d_model): combine(mamba_fwd(x), mamba_rev(x)).

    ``config.bidirectional_strategy`` picks the combination ("add" or "mul");
    ``config.tie_bidirectional_projections`` shares in_proj/out_proj between directions
    (the reverse mixer's parameters are then the same Parameter objects, so the state dict
    still lists ``mamba_rev.in_proj.weight`` etc. as aliases).
    """

    def __init__(self, config: MambaConfig, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.strategy = config.bidirectional_strategy
        self.mamba_fwd = Mixer(config, layer_idx, device=device, dtype=dtype)
        self.mamba_rev = Mixer(config, layer_idx, device=device, dtype=dtype)
        self.tied = config.tie_bidirectional_projections
        if self.tied:
            self.mamba_rev.in_proj.weight = self.mamba_fwd.in_proj.weight
            self.mamba_rev.out_proj.weight = self.mamba_fwd.out_proj.weight
            if config.bias:
                self.mamba_rev.in_proj.bias = self.mamba_fwd.in_proj.bias
                self.mamba_rev.out_proj.bias = self.mamba_fwd.out_proj.bias

    def forward(self, x: Tensor, lengths: Tensor | None = None,
                cu_seqlens: Tensor | None = None, cache=None) -> Tensor:
        """x (batch, L, d_model); lengths (batch,) or cu_seqlens (nseq + 1,) with batch 1."""
        if cache is not None:
            raise ValueError("BiMixer: a bidirectional layer has no step-by-step inference; "
                             "the reverse direction needs the whole sequence")
        if fused_mixer_applies(self.mamba_fwd, x, cache, cu_seqlens):
            # Each direction recomputes its in_proj in its own backward; with tied projections
            # that is one extra (cheap) GEMM per direction instead of keeping xz alive.
            out_f = fused_mixer(self.mamba_fwd, x, lengths=lengths)
            out_r = fused_mixer(self.mamba_rev, x, reverse=True, lengths=lengths)
            return out_f + out_r if self.strategy == "add" else out_f * out_r
        xz_f = self.mamba_fwd.in_proj(x)
        # Tied projections: one in_proj matmul serves both directions.
        xz_r = xz_f if self.tied else self.mamba_rev.in_proj(x)
        out_f = self.mamba_fwd.mix(xz_f, lengths=lengths, cu_seqlens=cu_seqlens)
        out_r = self.mamba_rev.mix(xz_r, lengths=lengths, cu_seqlens=cu_seqlens, reverse=True)
        return out_f + out_r if self.strategy == "add" else out_f * out_r
