"""Triton selective scan and decode step against the float64 sequential reference.

On a machine without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py) on tiny
shapes; the GPU tier (larger shapes) runs only where CUDA is available.  Every case draws fresh
random inputs, rounds them to the tested dtype, and gives the reference the same rounded values
upcast to float64, so the tolerance only covers the kernel's float32 arithmetic and the rounding
of its outputs.  Output buffers are filled with NaN before the kernels run (scan_triton.POISON).
Launch settings are passed as a ScanTuning (``selective_scan(..., tuning=...)``).
"""
from __future__ import annotations

import pytest
import torch

from seqlab.kernels import ScanTuning, selective_scan, selective_state_update
from seqlab.kernels.scan import triton_kernels as scan_triton
from seqlab.kernels.scan.reference import selective_scan_reference
from seqlab.kernels.scan.tuning import CKPT_CHOICES

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error allowed per dtype: float32 arithmetic; bf16/fp16 outputs rounded once
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(scan_triton, "POISON", True)


def rel_err(a, b):
    """||a - b|| / ||b||; the floor 1e-6 keeps an exactly-zero reference (dA at L=1 without an
    initial state) from turning float32 rounding into an infinite relative error."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or NaN) in the kernel's output"
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def make_case(batch, dim, length, N, dtype, groups=None, D=True, z=True, bias=True, h0=True,
              cu=None, channels_last=False, seed=None):
    """Random inputs on DEV: a dict of tensors in the tested dtypes (fp32 for A, D, bias, h0)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    def io(x):
        return x.to(DEV, dtype)

    nseq = batch if cu is None else len(cu) - 1
    bc_shape = (batch, N, length) if groups is None else (batch, groups, N, length)
    B, C = io(rnd(*bc_shape)), io(rnd(*bc_shape))
    if channels_last == "mixed":
        # u channels-last, delta contiguous, z the second half of a (batch, L, 2 dim) buffer
        u = io(rnd(batch, length, dim)).transpose(1, 2)
        delta = io(rnd(batch, dim, length, scale=0.5))
        zz = io(rnd(batch, length, 2 * dim)).transpose(1, 2)[:, dim:]
    elif channels_last == "model":
        # as the Mamba mixer passes them: u, delta channels-last; z half of in_proj's output;
        # B, C column slices of x_proj's (batch, L, R + 2N) output, transposed
        u, delta = (io(rnd(batch, length, dim, scale=s)).transpose(1, 2) for s in (1.0, 0.5))
        zz = io(rnd(batch, length, 2 * dim)).transpose(1, 2)[:, dim:]
        if groups is None:
            x_dbl = io(rnd(batch, length, 3 + 2 * N)).transpose(1, 2)
            B, C = x_dbl[:, 3:3 + N], x_dbl[:, 3 + N:]
    elif channels_last:
        # views of (batch, L, dim) tensors, as a Linear layer produces them: stride 1 on dim
        u, delta, zz = (io(rnd(batch, length, dim, scale=s)).transpose(1, 2)
                        for s in (1.0, 0.5, 1.0))
    else:
        u, delta, zz = io(rnd(batch, dim, length)), io(rnd(batch, dim, length, scale=0.5)), \
            io(rnd(batch, dim, length))
    case = dict(
        u=u, delta=delta,
        A=(-torch.rand(dim, N, generator=g) * 2 - 0.05).to(DEV),
        B=B, C=C,
        D=rnd(dim).to(DEV) if D else None,
        z=zz if z else None,
        delta_bias=rnd(dim, scale=0.3).to(DEV) if bias else None,
        initial_state=rnd(nseq, dim, N).to(DEV) if h0 else None,
    )
    return case, nseq


def same_strides(x):
    """A copy of x with x's exact strides (also a view's gaps), as a fresh leaf."""
    y = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    return y.copy_(x.detach()).requires_grad_(True)


def assert_layout_like(x, like, name):
    """x (batch, dim, L) is stored like its input: a dense channels-last (batch, L, dim) buffer
    transposed when the input has stride 1 on dim, else contiguous."""
    if like.stride(1) == 1 and like.shape[1] > 1:
        assert x.stride(1) == 1 and x.stride(2) == x.shape[1] \
            and x.stride(0) == x.shape[1] * x.shape[2], f"{name}: strides {x.stride()}"
    else:
        assert x.is_contiguous(), f"{name}: strides {x.stride()}, expected contiguous"


def check(case, nseq, dtype, softplus=True, reverse=False, cu=None, tuning=None):
    """Triton vs reference: out, last_state and the gradient of every tensor input; out and the
    gradients of u, delta, z laid out like u, delta, z. ``tuning``: the Triton launch settings."""
    cut = None if cu is None else torch.tensor(cu, device=DEV)
    names = [k for k in NAMES if case[k] is not None]
    tri = {k: same_strides(case[k]) for k in names}
    ref = {k: case[k].detach().double().requires_grad_(True) for k in names}
    kw = dict(delta_softplus=softplus, return_last_state=True, reverse=reverse, cu_seqlens=cut)
    out, last = selective_scan(**{**case, **tri}, **kw, impl="triton", tuning=tuning)
    assert out.dtype == case["u"].dtype and out.shape == case["u"].shape
    assert_layout_like(out, case["u"], "out")
    assert last.dtype == torch.float32 and last.shape == (nseq, *case["A"].shape)
    rout, rlast = selective_scan_reference(**{**case, **ref}, **kw)
    gout = torch.randn(out.shape, device=DEV).to(out.dtype)
    glast = torch.randn(last.shape, device=DEV)
    grads = torch.autograd.grad((out.double() * gout.double()).sum()
                                + (last.double() * glast.double()).sum(), list(tri.values()))
    rgrads = torch.autograd.grad((rout * gout.double()).sum() + (rlast * glast.double()).sum(),
                                 list(ref.values()))
    tol = TOL[dtype]
    errs = {"out": rel_err(out, rout), "last_state": rel_err(last, rlast)}
    for k, gt, gr in zip(names, grads, rgrads):
        assert gt.dtype == case[k].dtype, k
        if k in ("u", "delta", "z"):
            assert_layout_like(gt, case[k], "d" + k)
        errs["d" + k] = rel_err(gt, gr)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors over {tol}: {bad} (all: {errs})"


# Each case is chosen to cover several options at once: the interpreter is slow.
# Lengths: 40 fits one segment; 150 gives 3 segments (64, 64, 22) and ragged backward sub-chunks.
CASES = [
    pytest.param(dict(batch=2, dim=8, length=40, N=4, dtype=torch.float32), {},
                 id="B2-D8-L40-N4-fp32-all-options"),
    pytest.param(dict(batch=1, dim=8, length=150, N=16, dtype=torch.float32, groups=2),
                 dict(reverse=True), id="B1-D8-L150-N16-fp32-groups-reverse-segments"),
    pytest.param(dict(batch=1, dim=4, length=100, N=3, dtype=torch.float32,
                      cu=[0, 1, 80, 80, 100]), {},
                 id="varlen-len1-len0-N3-fp32-segments"),
    pytest.param(dict(batch=1, dim=4, length=50, N=4, dtype=torch.float32, h0=False,
                      cu=[0, 20, 21, 50]), dict(reverse=True),
                 id="varlen-reverse-no-h0-fp32"),
    pytest.param(dict(batch=1, dim=8, length=70, N=16, dtype=torch.bfloat16,
                      channels_last=True, groups=2), {},
                 id="B1-D8-L70-N16-bf16-channels-last-groups"),
    pytest.param(dict(batch=2, dim=6, length=1, N=1, dtype=torch.float16, D=False, z=False,
                      bias=False), dict(softplus=False),
                 id="B2-D6-L1-N1-fp16-no-D-z-bias-softplus"),
    # output/gradient layouts: channels-last inputs give channels-last out, du, ddelta, dz
    pytest.param(dict(batch=1, dim=4, length=130, N=4, dtype=torch.float32,
                      channels_last="model"), dict(reverse=True),
                 id="B1-D4-L130-N4-fp32-model-layout-reverse-segments"),
    pytest.param(dict(batch=1, dim=4, length=90, N=4, dtype=torch.bfloat16, h0=False,
                      cu=[0, 37, 90], channels_last="mixed"), {},
                 id="varlen-mixed-layout-bf16"),
]


@pytest.mark.parametrize("spec,opts", CASES)
def test_scan_matches_reference(spec, opts):
    spec = dict(spec)
    dtype = spec["dtype"]
    case, nseq = make_case(**spec)
    check(case, nseq, dtype, cu=spec.get("cu"), **opts)


@pytest.mark.parametrize("ppsm_fwd,ppsm_bwd,cu", [
    (1, 64, None),        # forward: 3 segments of 128 steps; backward: 5 of 64
    (64, 1, None),        # forward: 5 of 64; backward: 3 of 128, the last past the forward's end
    (64, 1, [0, 300, 310, 471]),  # packed, with a 10-step sequence
], ids=["fwd-coarse", "bwd-coarse", "bwd-coarse-varlen"])
def test_forward_and_backward_segment_independently(ppsm_fwd, ppsm_bwd, cu, monkeypatch):
    """The backward restarts from position-indexed checkpoints, so its segmentation may differ
    from the forward's (each is chosen for its own kernels); gradients stay exact either way."""
    monkeypatch.setattr(scan_triton, "_n_sm", lambda device: 4)  # same plans on every card
    tuning = ScanTuning(fwd_programs_per_sm=ppsm_fwd, bwd_programs_per_sm=ppsm_bwd)
    L = 300 if cu is None else cu[-1]
    case, nseq = make_case(1, 8, L, 4, torch.float32, cu=cu)
    plan = scan_triton.ScanPlan(case["u"], case["A"], case["B"],
                                None if cu is None else torch.tensor(cu), tuning)
    assert (plan.T, plan.S) != (plan.Tb, plan.Sb) and min(plan.S, plan.Sb) > 1, vars(plan)
    check(case, nseq, torch.float32, reverse=cu is not None, cu=cu, tuning=tuning)


DBC_CASES = [c for c in CASES if c.id in (
    "B2-D8-L40-N4-fp32-all-options", "B1-D8-L150-N16-fp32-groups-reverse-segments",
    "varlen-len1-len0-N3-fp32-segments", "B1-D8-L70-N16-bf16-channels-last-groups")]


@pytest.mark.parametrize("mode", ["atomic", "partials"])
@pytest.mark.parametrize("spec,opts", DBC_CASES)
def test_scan_dbc_modes_match_reference(spec, opts, mode):
    """Both ways of summing ∂B/∂C over channel blocks: atomic adds into one float32 buffer per
    group (the default), partials per block summed in a fixed order."""
    spec = dict(spec)
    case, nseq = make_case(**spec)
    check(case, nseq, spec["dtype"], cu=spec.get("cu"), tuning=ScanTuning(dbc=mode), **opts)


def test_dbc_mode_selection(monkeypatch):
    assert scan_triton.resolve_dbc(ScanTuning()) == "atomic"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert scan_triton.resolve_dbc(ScanTuning()) == "partials"  # reproducible sums when asked for
    assert scan_triton.resolve_dbc(ScanTuning(dbc="atomic")) == "atomic"  # an explicit choice wins
    with pytest.raises(ValueError, match="dbc='fast'"):
        ScanTuning(dbc="fast")


@pytest.mark.parametrize("ckpt,ppsm", [(k, 1) for k in CKPT_CHOICES] + [(64, 0)])
def test_checkpoint_spacing_and_persistent_backward_grid(ckpt, ppsm, monkeypatch):
    """Every checkpoint spacing K gives the reference's gradients, with a persistent grid of
    fewer programs than work items (ppsm 1: 4 programs loop over 16 items, each reusing its one
    scratch slot) and with one program per item (ppsm 0), over segments and packed sequences."""
    monkeypatch.setattr(scan_triton, "_n_sm", lambda device: 4)
    tuning = ScanTuning(ckpt_every=ckpt, bwd_grid_per_sm=ppsm, bwd_programs_per_sm=8)
    cu = [0, 70, 77, 300]
    case, nseq = make_case(1, 16, 300, 4, torch.float32, cu=cu)
    plan = scan_triton.ScanPlan(case["u"], case["A"], case["B"], torch.tensor(cu), tuning)
    assert plan.K == ckpt and plan.Tb % ckpt == 0 and plan.T % ckpt == 0
    n_work = plan.nseq * plan.Sb * plan.ndb
    assert n_work > 4 * max(ppsm, 1), vars(plan)  # the persistent programs take several items
    check(case, nseq, torch.float32, reverse=True, cu=cu, tuning=tuning)


@pytest.mark.parametrize("name,value", [("ckpt_every", 48), ("bwd_grid_per_sm", "many")])
def test_checkpoint_spacing_default_and_bad_settings(name, value):
    case, _ = make_case(1, 4, 8, 2, torch.float32)
    assert scan_triton.ScanPlan(case["u"], case["A"], case["B"], None).K == ScanTuning().ckpt_every
    with pytest.raises(ValueError, match=f"{name}=.?{value}"):
        selective_scan(**case, impl="triton", tuning=ScanTuning(**{name: value}))


def test_padded_segment_tail_keeps_state():
    """Output of a 3-segment scan equals the reference's when L is not a segment multiple, also
    through the forward-only path (no gradients) with return_last_state off."""
    case, _ = make_case(1, 4, 130, 4, torch.float32, h0=False)
    out = selective_scan(**case, delta_softplus=True, impl="triton")
    ref = selective_scan_reference(**{k: v.double() if v is not None else None
                                      for k, v in case.items()}, delta_softplus=True)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype,groups", [(torch.float32, None), (torch.bfloat16, 2)])
def test_decode_step_equals_one_scan_position(dtype, groups):
    """selective_state_update from state h equals scan position 0 started from h."""
    batch, dim, N = 2, 8, 4
    case, _ = make_case(batch, dim, 1, N, dtype, groups=groups)
    state = case["initial_state"].clone()
    y = selective_state_update(state, case["u"][..., 0], case["delta"][..., 0], case["A"],
                               case["B"][..., 0], case["C"][..., 0], case["D"],
                               case["z"][..., 0], case["delta_bias"], True, impl="triton")
    dcase = {k: v.double() for k, v in case.items()}
    ref_out, ref_last = selective_scan_reference(**dcase, delta_softplus=True,
                                                 return_last_state=True)
    assert y.dtype == dtype and y.shape == (batch, dim)
    assert rel_err(y, ref_out[..., 0]) < TOL[dtype]
    assert rel_err(state, ref_last) < TOL[torch.float32]


# --------------------------------------------------------------------------- GPU tier
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_long_sequences(dtype):
    case, nseq = make_case(2, 256, 4096, 16, dtype)
    check(case, nseq, dtype)


@gpu
@pytest.mark.gpu
def test_gpu_varlen_reverse_groups_channels_last():
    cu = [0, 1, 1000, 3001, 4096]
    case, nseq = make_case(1, 256, 4096, 16, torch.bfloat16, groups=4, cu=cu,
                           channels_last=True)
    check(case, nseq, torch.bfloat16, reverse=True, cu=cu)


@gpu
@pytest.mark.gpu
def test_gpu_model_layout():
    case, nseq = make_case(2, 512, 2048, 16, torch.bfloat16, channels_last="model")
    check(case, nseq, torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_gpu_decode_step_batch64():
    batch, dim, N = 64, 2048, 16
    case, _ = make_case(batch, dim, 1, N, torch.bfloat16)
    state = case["initial_state"].clone()
    y = selective_state_update(state, case["u"][..., 0], case["delta"][..., 0], case["A"],
                               case["B"][..., 0], case["C"][..., 0], case["D"],
                               case["z"][..., 0], case["delta_bias"], True, impl="triton")
    ref_out, ref_last = selective_scan_reference(**{k: v.double() for k, v in case.items()},
                                                 delta_softplus=True, return_last_state=True)
    assert rel_err(y, ref_out[..., 0]) < TOL[torch.bfloat16]
    assert rel_err(state, ref_last) < TOL[torch.float32]
