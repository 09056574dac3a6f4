"""Typed configuration of the Mamba backbone (a Hydra structured config).

Symbols: d_model = D (residual width), d_inner = expand * d_model = E*D, d_state = N,
dt_rank = R (rank of the Δ projection), d_conv = K (causal conv width).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

DECODE_STEPS = ("auto", "fused", "persistent", "per_op")


@dataclass
class MambaConfig:
    # Width and depth. Defaults are a small CPU-friendly model; mamba-130m is
    # d_model=768, n_layer=24.
    d_model: int = 128
    n_layer: int = 4
    # 256 byte ids + specials (pad 256, mask 257, cls/bos 258, eos 259): see seqlab.data.alphabet.
    vocab_size: int = 260
    # Rounded up so the embedding/LM-head matmuls hit tensor-core friendly sizes (mamba_ssm: 8).
    pad_vocab_size_multiple: int = 8

    # Mixer (mamba_ssm's Mamba-1 parameterisation).
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" = ceil(d_model / 16)
    dt_min: float = 0.001  # Δ initialised log-uniformly in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init: str = "random"  # "random" | "constant"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    # False turns selection off: Δ, B, C become learned input-independent parameters
    # (an LTI, S4D-style layer) for the paper's Table-1 ablation.
    selective: bool = True

    # Blocks.
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True  # keep the residual stream in float32 under autocast
    tie_embeddings: bool = True

    # Direction. Causal (decoder) by default; bidirectional runs a second, reverse scan
    # per layer (Caduceus' BiMamba) and cannot decode step by step.
    bidirectional: bool = False
    bidirectional_strategy: str = "add"  # "add" | "mul": how the two directions combine
    tie_bidirectional_projections: bool = True  # share in_proj/out_proj between directions
    # Reverse-complement equivariance for DNA (Caduceus-PS style parameter sharing).
    rc_equivariant: bool = False

    # Which selective-scan implementation the mixers call ("auto" | "triton" | "numba" | "torch" |
    # "reference"); "auto": triton on CUDA, numba on the CPU (torch without numba).
    scan_impl: str = "auto"
    # Training: run each mixer as one autograd function that keeps only its input, x_proj's
    # output and the scan output, recomputing in_proj, the conv and Δ in the backward
    # (seqlab.model.fused_mixer). Applies where the scan resolves to Triton.
    fused_mixer: bool = True
    # The residual add and RMSNorm of each block (and the final norm) as one Triton kernel
    # (seqlab.kernels.norm), where the scan resolves to Triton.
    fused_add_norm: bool = True
    # Decoding (MambaLM.step, generate()): "auto" picks the fastest step that applies (measured
    # rules in seqlab.model.decode); "fused" (two Triton kernels per layer), "persistent" (the
    # whole step in one Triton launch) or "per_op" (one module call per operation) force one;
    # a forced Triton step that cannot run raises. Results agree to float32 rounding.
    decode_step: str = "auto"

    # Multi-scale audio variant (SaShiMi-style pooling stages, seqlab.model.multiscale); empty =
    # flat stack. With [p1, ..., pk]: n_layer blocks per stage, a down stage per level, a center
    # stage and an up stage per level; level i runs at d_model * pool_expand**i channels and
    # 1 / (p1 * ... * pi) of the rate. Causal only.
    pool_factors: list[int] = field(default_factory=list)
    pool_expand: int = 2  # width multiplier per pooling level

    def __post_init__(self):
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"MambaConfig.decode_step={self.decode_step!r}: needs one of "
                             f"{', '.join(DECODE_STEPS)}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"MambaConfig.norm={self.norm!r}: needs 'rms' or 'layer'")
        if self.bidirectional_strategy not in ("add", "mul"):
            raise ValueError(f"MambaConfig.bidirectional_strategy={self.bidirectional_strategy!r}: "
                             "needs 'add' or 'mul'")
        if self.rc_equivariant and self.d_model % 2:
            raise ValueError(f"MambaConfig.rc_equivariant needs an even d_model, got {self.d_model}")
        if self.pool_factors:
            if any(int(p) < 1 for p in self.pool_factors) or int(self.pool_expand) < 1:
                raise ValueError(f"MambaConfig.pool_factors={list(self.pool_factors)} / pool_expand="
                                 f"{self.pool_expand}: need integers >= 1")
            if self.bidirectional or self.rc_equivariant:
                raise ValueError("MambaConfig.pool_factors: the multi-scale backbone is causal only; "
                                 "bidirectional / rc_equivariant are not supported with pooling")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else ((self.vocab_size + m - 1) // m) * m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        """Build from a dict (e.g. config.json), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MambaConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
