"""Launch settings of the Triton selective scan, with the defaults chosen by measurement.

Pass a :class:`ScanTuning` as ``selective_scan(..., tuning=...)`` (or to
:class:`~seqlab.kernels.scan.triton_kernels.ScanPlan`) to time or pin a variant; ``None`` means
the defaults below. The other implementations have no such settings and ignore it. The figures
quoted are measurements on one H200 at the shapes of ``benchmarks/scan.py`` (which takes
``--tuning KEY=VALUE`` to time a variant).
"""
from __future__ import annotations

from dataclasses import dataclass

CKPT_CHOICES = (16, 32, 64, 128)
DBC_CHOICES = ("auto", "atomic", "partials")


@dataclass(frozen=True)
class ScanTuning:
    """How the Triton scan splits its work (results are the same to float32 rounding).

    Attributes:
        ckpt_every: K, the spacing of the forward's state checkpoints, one of 16, 32, 64, 128.
            The backward recomputes K-step sub-chunks from them and keeps h every 4 steps of
            one sub-chunk in a per-program scratch slot of K/4 states, so K trades checkpoints
            (batch·dim·L·N/K float32) against scratch (programs·K/4·BD·N float32): at
            (8, 2048, 2048) K = 32 costs 67 + 25 MB, K = 64 with the persistent backward grid
            34 + 17 MB.
        bwd_grid_per_sm: programs per SM of the backward's persistent grid (each loops over
            work items and owns one scratch slot); 8 is what fits without a register cap.
            0: one program per work item.
        fwd_programs_per_sm, bwd_programs_per_sm: segments are added until the forward's
            (backward's) grid has about this many programs per SM. The forward's extra pass
            over segments 0..S-2 makes fewer segments pay there; the backward wants the
            parallelism. (8, 2048, 2048): forward 0.585 ms at 8 vs 0.639 at 16; fwd+bwd with
            one segmentation for both 3.41 ms at 8 vs 2.96 at 16.
        bwd_maxnreg: register cap per thread of the backward's main kernel (0: none; ptxas then
            takes 255, which allows 8 one-warp programs per SM; 144 allows 14, with a few
            spills). Fwd+bwd ms at the four anchor shapes: no cap 2.726 / 10.845 / 5.498 /
            10.378, cap 144 2.904 / 12.109 / 6.222 / 11.636.
        dbc: how the backward sums ∂B/∂C over channel blocks. "atomic": every block adds its
            rows into one zeroed float32 (batch, G, L, N) buffer; fastest and smallest (lm
            shape: peak extra 0.378 GB, fwd+bwd 2.618 ms) but the summation order, so the last
            bits, vary from run to run. "partials": per-block partial rows summed in a fixed
            order afterwards; bitwise reproducible (0.510 GB, 2.708 ms). "auto": partials when
            ``torch.are_deterministic_algorithms_enabled()``, atomic otherwise.
    """

    ckpt_every: int = 64
    bwd_grid_per_sm: int = 8
    fwd_programs_per_sm: int = 8
    bwd_programs_per_sm: int = 16
    bwd_maxnreg: int = 0
    dbc: str = "auto"

    def __post_init__(self):
        if self.ckpt_every not in CKPT_CHOICES:
            raise ValueError(f"ScanTuning.ckpt_every={self.ckpt_every!r}: expected one of "
                             f"{CKPT_CHOICES}")
        for name, low in (("bwd_grid_per_sm", 0), ("fwd_programs_per_sm", 1),
                          ("bwd_programs_per_sm", 1), ("bwd_maxnreg", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"ScanTuning.{name}={v!r}: expected an integer >= {low}")
        if self.dbc not in DBC_CHOICES:
            raise ValueError(f"ScanTuning.dbc={self.dbc!r}: expected one of {DBC_CHOICES}")
