"""Sampling the next id inside the decoding step: argmax(logits * inv_temp + noise).

With Gumbel noise this samples softmax(logits * inv_temp) (Gumbel-max), greedy without noise;
``seqlab.generation`` draws the noise. :func:`pick_row` is the device function the persistent
step calls at its end; :func:`pick_step` launches it once per row after another step.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pick_row(logits_ptr, noise_ptr, inv_temp, nid_ptr, out_ptr, V, HAS_NOISE: tl.constexpr,
             VP: tl.constexpr, CG: tl.constexpr):
    """argmax(logits * inv_temp + noise) over the first V entries of one row -> *nid_ptr and
    *out_ptr. CG reads past L1 (the logits were written by other programs of this launch)."""
    offs = tl.arange(0, VP)
    m = offs < V
    if CG:
        x = tl.load(logits_ptr + offs, mask=m, other=float("-inf"), cache_modifier=".cg")
    else:
        x = tl.load(logits_ptr + offs, mask=m, other=float("-inf"))
    x = x.to(tl.float32)
    if HAS_NOISE:
        x = x * inv_temp + tl.load(noise_ptr + offs, mask=m, other=0.0)
    best = tl.argmax(x, axis=0)
    tl.store(nid_ptr, best.to(tl.int64))
    tl.store(out_ptr, best.to(tl.int64))


@triton.jit
def _pick_kernel(logits_ptr, s_lb, noise_ptr, s_nb, inv_temp, ids_ptr, out_ptr, s_ob, col, V,
                 HAS_NOISE: tl.constexpr, VP: tl.constexpr):
    """Per row: argmax(logits * inv_temp + noise) over the first V ids -> ids[b], out[b, col]."""
    b = tl.program_id(0).to(tl.int64)
    pick_row(logits_ptr + b * s_lb, noise_ptr + b * s_nb, inv_temp, ids_ptr + b,
             out_ptr + b * s_ob + col, V, HAS_NOISE, VP, False)


def pick_step(logits, noise, inv_temp: float, ids_out, out, col: int, vocab: int):
    """Greedy (noise None) or Gumbel-max pick of the next id of each row, written to
    ``ids_out[b]`` (the next step's input) and ``out[b, col]`` in one launch.

    logits (batch, V') float32; noise (batch, V'') float32 or None; ids_out (batch,) long;
    out (batch, C) long; only the first ``vocab`` ids are candidates.
    """
    batch = logits.shape[0]
    _pick_kernel[(batch,)](
        logits, logits.stride(0), noise if noise is not None else logits,
        noise.stride(0) if noise is not None else 0, float(inv_temp), ids_out, out,
        out.stride(0), int(col), int(vocab), HAS_NOISE=noise is not None,
        VP=triton.next_power_of_2(max(int(vocab), 1)), num_warps=1 if vocab <= 1024 else 4)
