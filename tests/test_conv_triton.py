"""Triton depthwise (anti-)causal conv1d + SiLU against the plain torch reference.

Without CUDA these run under TRITON_INTERPRET=1 (conftest.py) with tiles shrunk so that small
shapes still span several channel blocks (with a ragged last one), several L tiles per backward
program and several backward programs along L. Output buffers are filled with NaN before the
kernels write them (conv_triton.POISON). Every call asks for impl="triton" (on the CPU "auto"
would take the torch reference).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seqlab.kernels.conv import (causal_conv1d_silu, causal_conv1d_silu_reference,  # noqa: E402
                                 causal_conv1d_update)
from seqlab.kernels.conv import triton_kernels as conv_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error allowed: float32 arithmetic, and for fp16/bf16 the rounding of the outputs
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(conv_triton, "POISON", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """E = 24 -> 2 channel blocks (the second half empty); L = 37 -> 5 L tiles, 3 backward
    programs along L (2 tiles each, the last one ragged)."""
    for name, v in dict(FWD_BL=8, FWD_BE=16, BWD_BL=8, BWD_BE=16, BWD_TILES=2).items():
        monkeypatch.setattr(conv_triton, name, v)


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or NaN) in the kernel's output"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def make_x(batch, E, L, dtype, layout, g):
    """x (batch, E, L): 'cl' the E-half of a (batch, L, 2E) buffer, transposed (in_proj's
    output, as the mixer gives it); 'contig' a contiguous (batch, E, L) tensor."""
    if layout == "cl":
        return torch.randn(batch, L, 2 * E, generator=g)[..., :E].transpose(1, 2).to(DEV, dtype)
    return torch.randn(batch, E, L, generator=g).to(DEV, dtype)


def check(batch, E, L, K, dtype, reverse, layout, has_bias, param_dtype=None, seed=0):
    """Forward and gradients (x, weight, bias) vs the float64 reference on the same values."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    x = make_x(batch, E, L, dtype, layout, g)
    w = (torch.randn(E, 1, K, generator=g) * 0.5).to(DEV, param_dtype)
    b = (torch.randn(E, generator=g) * 0.3).to(DEV, param_dtype) if has_bias else None
    # an upstream gradient in the other layout than x
    gout = make_x(batch, E, L, dtype, "contig" if layout == "cl" else "cl", g)

    leaves = [x, w] + ([b] if has_bias else [])
    tri = [t.detach().clone().requires_grad_(True) for t in leaves]
    u = causal_conv1d_silu(tri[0], tri[1], tri[2] if has_bias else None, reverse=reverse,
                           impl="triton")
    assert u.shape == (batch, E, L) and u.dtype == dtype
    assert u.stride(1) == 1 and u.transpose(1, 2).is_contiguous(), u.stride()
    grads = torch.autograd.grad(u, tri, gout)

    # The reference sees the parameters rounded to x's dtype, as the kernel (and autocast) use them.
    ref = [t.detach().to(dtype).double().requires_grad_(True) for t in leaves]
    ru = causal_conv1d_silu_reference(ref[0], ref[1], ref[2] if has_bias else None, reverse)
    rgrads = torch.autograd.grad(ru, ref, gout.double())

    tol = TOL[dtype]
    errs = {"u": rel_err(u, ru)}
    for name, gt, gr, leaf in zip(["x", "weight", "bias"], grads, rgrads, leaves):
        assert gt.dtype == leaf.dtype and gt.shape == leaf.shape, name
        errs["d" + name] = rel_err(gt, gr)
    # ∂weight, ∂bias are float32 sums of float32 products even for fp16/bf16 x
    ptol = {n: (tol if n in ("u", "dx") else TOL[torch.float64 if dtype == torch.float64
                                               else torch.float32] * 10) for n in errs}
    bad = {k: v for k, v in errs.items() if not v <= ptol[k]}
    assert not bad, f"errors over tolerance: {bad} (all: {errs})"
    return grads


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_conv_matches_reference(small_tiles, dtype, K, reverse):
    # L 37: ragged tiles and backward programs; L < K; L 1. Both input layouts, bias or none.
    shapes = [(2, 37, "cl", True), (1, K - 1, "contig", False), (2, 1, "cl", True)]
    for i, (batch, L, layout, has_bias) in enumerate(shapes):
        check(batch, 24, L, K, dtype, reverse, layout, has_bias, seed=i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_with_fp32_parameters(small_tiles, dtype):
    """Autocast's case: bf16/fp16 activations, float32 weight and bias (rounded to x's dtype in
    the forward, as autocast rounds F.conv1d's operands); gradients in each input's dtype."""
    for reverse in (False, True):
        check(2, 24, 37, 4, dtype, reverse, "cl", True, param_dtype=torch.float32)


def test_width_one_and_deterministic_backward(small_tiles):
    check(1, 24, 10, 1, torch.float32, False, "cl", True)
    a = check(2, 24, 37, 4, torch.float32, True, "cl", True, seed=5)
    b = check(2, 24, 37, 4, torch.float32, True, "cl", True, seed=5)
    for ga, gb in zip(a, b):
        assert torch.equal(ga, gb)
    assert a[0].stride(1) == 1  # ∂x comes back channels-last too


def test_rejects_bad_arguments():
    x = torch.randn(1, 4, 6, device=DEV)
    with pytest.raises(ValueError, match="K=5"):
        causal_conv1d_silu(x, torch.randn(4, 5, device=DEV), impl="triton")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_silu(x, torch.randn(3, 4, device=DEV), impl="triton")
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d_silu(x, torch.randn(4, 4, device=DEV), torch.randn(3, device=DEV),
                           impl="triton")
    with pytest.raises(ValueError, match="length 0"):
        causal_conv1d_silu(x[..., :0], torch.randn(4, 4, device=DEV), impl="triton")


# --------------------------------------------------------------------------- GPU tier
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_gpu_lm_shape_bf16(reverse):
    """Default tiles at a mamba-130m-like shape (d_inner 1536), L not a tile multiple."""
    check(2, 1536, 2000, 4, torch.bfloat16, reverse, "cl", True, param_dtype=torch.float32)
    check(2, 1536, 1000, 4, torch.float32, reverse, "cl", True)
    check(1, 200, 3, 4, torch.float32, reverse, "contig", False)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_gpu_mixer_under_bf16_autocast(reverse):
    """The mixer's Triton path (conv + scan) against its torch path under bf16 autocast, as in
    training: both round at different places, so this is a loose check (relative L2)."""
    from seqlab.model import MambaConfig, Mixer
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layer=1, d_state=16, d_conv=4)
    ref = Mixer(MambaConfig(**cfg, scan_impl="torch")).cuda()
    tri = Mixer(MambaConfig(**cfg, scan_impl="triton")).cuda()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 300, 64, device="cuda")
    gout = torch.randn(2, 300, 64, device="cuda")
    res = []
    for m in (tri, ref):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(xx, reverse=reverse)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float(), [xx] + list(m.parameters()), gout)
        res.append([out] + list(grads))
    names = ["out", "dx"] + [n for n, _ in tri.named_parameters()]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, *res)}
    bad = {n: e for n, e in errs.items() if not e <= 3e-2}
    assert not bad, f"errors over 3e-2: {bad} (all: {errs})"


@pytest.mark.parametrize("dtype,K,bias", [(torch.float32, 4, True), (torch.bfloat16, 4, True),
                                          (torch.float32, 3, False), (torch.float32, 1, True)])
def test_conv_update_equals_torch_step(dtype, K, bias):
    """causal_conv1d_update: the in-place state shift and the SiLU output equal the torch
    step (roll, write, multiply-sum, bias, SiLU), over several steps, and stepping through a
    sequence reproduces the full causal conv."""
    batch, E, L = 3, 150, 6  # E spans two channel blocks of 128, the last one ragged
    x = torch.randn(batch, E, L, device=DEV).to(dtype)
    w = torch.randn(E, 1, K, device=DEV)
    b = torch.randn(E, device=DEV) if bias else None
    state = torch.randn(batch, E, K, device=DEV).to(dtype)
    ref_state = state.clone()
    full = causal_conv1d_silu_reference(torch.cat([state[..., 1:], x], -1).double(),
                                        w.double(), None if b is None else b.double())
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    for t in range(L):
        u = causal_conv1d_update(x[..., t], state, w, b, impl="triton")
        ref_state = torch.cat([ref_state[..., 1:], x[..., t:t + 1]], -1)
        assert torch.equal(state, ref_state)
        want = full[..., K - 1 + t]
        assert u.dtype == dtype and u.shape == (batch, E)
        err = ((u.double() - want).norm() / want.norm()).item()
        assert err < tol, (t, err)


def test_conv_update_rejects_bad_shapes():
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(torch.zeros(2, 8), torch.zeros(2, 7, 4), torch.zeros(8, 4),
                             impl="triton")
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_update(torch.zeros(2, 8), torch.zeros(2, 8, 4), torch.zeros(8, 3),
                             impl="triton")
