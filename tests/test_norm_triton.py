"""Triton fused residual add + RMSNorm (forward and backward) against the float64 reference.

Without CUDA these run under TRITON_INTERPRET=1 (conftest.py). Inputs are fresh random values
each run (the rng_seed fixture; the seed is in the failure message). Output buffers are filled
with NaN before the kernels write them (norm_triton.POISON), so an unwritten element shows up as
a non-finite value. The small_tiles fixture shrinks the tiles so that 21 rows span 11 row
blocks of 2 (the last one ragged) and 4 backward programs of 3 blocks each (the last block of
the last program entirely past the rows).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seqlab.kernels.norm import add_rms_norm, add_rms_norm_reference  # noqa: E402
from seqlab.kernels.norm import triton_kernels as norm_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error allowed, by the dtype of the tensor compared: float32 arithmetic, and for
# fp16/bf16 the single rounding of the output
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# Triton's interpreter casts float32 -> bfloat16 by truncation (CUDA rounds to nearest even, as
# torch does), so a bf16 residual_out stored by the kernel can be one ulp off the reference's,
# and normed and dweight, computed from it, inherit a bf16-sized difference there.
INTERPRETED = DEV == "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(norm_triton, "POISON", True)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(norm_triton, "MAX_ROWS", 2)
    monkeypatch.setattr(norm_triton, "BWD_PROGRAMS_CPU", 4)


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or NaN) in the kernel's output"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check(seed, shape, x_dtype, res_in=None, out_dtype=None, residual_dtype=FP32,
          w_dtype=FP32, uses=("normed", "residual_out"), strided=False, eps=1e-5):
    """Forward outputs and the gradients of x, residual and weight vs the float64 reference on
    the same (rounded) values. res_in: the residual's dtype, or None for no residual. uses: which
    outputs the loss reads (sum of output * random weights of the output's dtype)."""
    d = shape[-1]
    if strided:  # rows of x with a stride of 2d (the first half of a wider buffer)
        x = torch.randn(*shape[:-1], 2 * d).to(DEV, x_dtype)[..., :d]
    else:
        x = torch.randn(shape).to(DEV, x_dtype)
    r = torch.randn(shape).to(DEV, res_in) if res_in is not None else None
    w = (1 + 0.5 * torch.randn(d)).to(DEV, w_dtype)
    leaves = [t for t in (x, r, w) if t is not None]

    tri = [t.detach().clone().requires_grad_(True) for t in leaves]
    tx, tr, tw = tri[0], (tri[1] if r is not None else None), tri[-1]
    normed, res_out = add_rms_norm(tx, tr, tw, eps, out_dtype=out_dtype,
                                   residual_dtype=residual_dtype, impl="triton")
    assert normed.shape == x.shape and normed.dtype == (out_dtype or x_dtype)
    assert res_out.shape == x.shape and res_out.dtype == residual_dtype
    g = {"normed": torch.randn(shape).to(DEV, normed.dtype),
         "residual_out": torch.randn(shape).to(DEV, res_out.dtype)}
    outs = {"normed": normed, "residual_out": res_out}
    loss = sum((outs[k].float() * g[k].float()).sum() for k in uses)
    grads = torch.autograd.grad(loss, tri)

    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    rx, rr, rw = ref[0], (ref[1] if r is not None else None), ref[-1]
    # float32 residual_out is compared with an unrounded float64 one; a lower-precision one is
    # rounded by the reference too (the kernel normalizes the stored value)
    rn, rres = add_rms_norm_reference(rx, rr, rw, eps, out_dtype=torch.float64,
                                      residual_dtype=torch.float64 if residual_dtype == FP32
                                      else residual_dtype)
    routs = {"normed": rn, "residual_out": rres.double()}
    rloss = sum((routs[k] * g[k].double()).sum() for k in uses)
    # (the weight is unused when only residual_out is: its gradient is zero)
    rgrads = [torch.zeros_like(t) if gr is None else gr
              for t, gr in zip(ref, torch.autograd.grad(rloss, ref, allow_unused=True))]

    errs, tols = {}, {}
    for name, t, rt in (("normed", normed, rn), ("residual_out", res_out, rres)):
        errs[name], tols[name] = rel_err(t, rt), TOL[t.dtype]
    # the part of the error due to a different rounding of a bf16 residual_out (interpreter)
    rtol = TOL[BF16] if INTERPRETED and residual_dtype == BF16 else 0.0
    tols["normed"] = max(tols["normed"], rtol)
    names = ["dx"] + (["dresidual"] if r is not None else []) + ["dweight"]
    for name, gt, gr, leaf in zip(names, grads, rgrads, leaves):
        assert gt.dtype == leaf.dtype and gt.shape == leaf.shape, name
        errs[name] = rel_err(gt, gr)
        # ∂weight: a float32 sum over the rows of float32 products, rounded to weight's dtype
        tols[name] = (max(TOL[FP32] * 10, TOL[gt.dtype], rtol) if name == "dweight"
                      else TOL[gt.dtype])
    bad = {k: v for k, v in errs.items() if not v <= tols[k]}
    assert not bad, f"seed {seed}: errors over tolerance: {bad} (all: {errs}, tol: {tols})"
    return grads


BOTH = ("normed", "residual_out")
USES = {"both": BOTH, "normed": ("normed",), "residual": ("residual_out",)}


@pytest.mark.parametrize("uses", ["both", "normed", "residual"])
@pytest.mark.parametrize("x_dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_ragged_rows_d96(small_tiles, rng_seed, x_dtype, uses):
    """(3, 7, 96): d not a power of two, 21 rows not a multiple of the row block."""
    check(rng_seed, (3, 7, 96), x_dtype, res_in=x_dtype, uses=USES[uses])
    check(rng_seed, (3, 7, 96), x_dtype, res_in=None, uses=USES[uses])


@pytest.mark.parametrize("uses", ["both", "normed"])
@pytest.mark.parametrize("x_dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_d64_default_tiles(rng_seed, x_dtype, uses):
    check(rng_seed, (2, 5, 64), x_dtype, res_in=x_dtype, uses=USES[uses])
    check(rng_seed, (40, 64), x_dtype, res_in=None, uses=USES[uses])


def test_bf16_out_from_fp32_x(small_tiles, rng_seed):
    check(rng_seed, (3, 7, 96), FP32, res_in=FP32, out_dtype=BF16)
    check(rng_seed, (3, 7, 96), FP32, res_in=None, out_dtype=BF16, uses=("normed",))


def test_mixed_dtypes(small_tiles, rng_seed):
    """Pre-norm block: bf16 x (a mixer's output) onto a float32 residual stream; a bf16
    residual stream (residual_dtype bf16, normalized as stored); fp16; a bf16 weight."""
    check(rng_seed, (3, 7, 96), BF16, res_in=FP32)
    check(rng_seed, (3, 7, 96), BF16, res_in=BF16, residual_dtype=BF16)
    check(rng_seed, (3, 7, 96), FP16, res_in=FP16, out_dtype=FP32, residual_dtype=FP16)
    check(rng_seed, (3, 7, 96), FP32, res_in=FP32, w_dtype=BF16)


def test_strided_rows_and_wide_d(rng_seed):
    check(rng_seed, (3, 7, 96), FP32, res_in=FP32, strided=True, eps=0.5)  # eps matters
    check(rng_seed, (3, 5000), BF16, res_in=BF16)  # BLOCK_D 8192, 8 warps, one row a program


def test_deterministic_backward(small_tiles, rng_seed):
    """The same inputs (same draws from the global generator) give bitwise equal gradients."""
    runs = []
    for _ in range(2):
        torch.manual_seed(rng_seed)
        runs.append(check(rng_seed, (3, 7, 96), FP32, res_in=FP32))
    for ga, gb in zip(*runs):
        assert torch.equal(ga, gb)


def test_rejects_bad_arguments():
    x = torch.randn(2, 5, 7, device=DEV)
    w = torch.ones(7, device=DEV)
    with pytest.raises(ValueError, match=r"residual has shape \(2, 5, 8\), x has \(2, 5, 7\)"):
        add_rms_norm(x, torch.randn(2, 5, 8, device=DEV), w, impl="triton")
    with pytest.raises(ValueError, match=r"weight has shape \(8,\), expected \(7,\)"):
        add_rms_norm(x, None, torch.ones(8, device=DEV), impl="triton")
    with pytest.raises(ValueError, match="d=8200"):
        add_rms_norm(torch.randn(1, 8200, device=DEV), None, torch.ones(8200, device=DEV),
                     impl="triton")
    with pytest.raises(ValueError, match="x has dtype torch.int32"):
        add_rms_norm(x.int(), None, w, impl="triton")
    with pytest.raises(ValueError, match="residual_dtype"):
        add_rms_norm(x, None, w, residual_dtype=torch.int64, impl="triton")
