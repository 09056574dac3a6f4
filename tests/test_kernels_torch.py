"""impl="torch" (kernels/scan/chunked.py) against the sequential reference run in float64.

Every case draws fresh random inputs, runs the reference in float64 on the same (rounded)
values, and compares outputs, last states and the gradients of every input (with an upstream
gradient on last_state too) by relative error norm. Small ``chunk``/``seg`` values put chunk
and segment boundaries inside short sequences; a few cases use the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from seqlab.kernels import selective_scan
from seqlab.kernels.scan.chunked import DEFAULT_CHUNK, DEFAULT_SEG, selective_scan_torch
from seqlab.kernels.scan.reference import selective_scan_reference

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# Relative-error-norm bounds per input dtype: inputs and outputs are rounded to the dtype, so
# the bound follows its precision; a wrong formula gives errors of order 1.
TOL = {F64: 1e-12, F32: 3e-6, F16: 4e-3, BF16: 3e-2}
DT_NAME = {F64: "fp64", F32: "fp32", F16: "fp16", BF16: "bf16"}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclass(frozen=True)
class Case:
    batch: int = 2
    dim: int = 8
    L: int = 37
    N: int = 4
    groups: int = 0  # 0: B, C are (batch, N, L); g >= 1: (batch, g, N, L)
    D: bool = True
    z: bool = True
    bias: bool = True
    softplus: bool = True
    h0: bool = True
    last: bool = True
    reverse: bool = False
    cu: tuple | None = None
    dtype: torch.dtype = F64
    chunk: int = 16
    seg: int = 4

    @property
    def id(self):
        opts = [n for n, on in (("D", self.D), ("z", self.z), ("bias", self.bias),
                                ("sp", self.softplus), ("h0", self.h0), ("last", self.last),
                                ("rev", self.reverse)) if on]
        g = f"-G{self.groups}" if self.groups else ""
        cu = "-cu" + "_".join(str(b - a) for a, b in zip(self.cu, self.cu[1:])) if self.cu else ""
        return (f"B{self.batch}-D{self.dim}-L{self.L}-N{self.N}{g}-{'+'.join(opts) or 'plain'}"
                f"{cu}-{DT_NAME[self.dtype]}-c{self.chunk}s{self.seg}")


def make_inputs(c: Case, dt_scale=1.0):
    """Realistic magnitudes: A_dn = -(n+1) (Mamba's S4D-real init) jittered per channel,
    Δ = softplus(δ + bias) spread from ~0.01 to ~10, B, C, u, z of unit scale."""
    b, d, L, N = c.batch, c.dim, c.L, c.N
    nseq = b if c.cu is None else len(c.cu) - 1
    A = -torch.exp(torch.log(torch.arange(1, N + 1, dtype=F64)).repeat(d, 1)
                   + 0.1 * torch.randn(d, N, dtype=F64))
    if c.softplus:
        delta = 2.0 * torch.randn(b, d, L, dtype=F64) * dt_scale
    else:
        delta = torch.rand(b, d, L, dtype=F64) * 2.0 * dt_scale  # already a step size >= 0
    bc = (b, c.groups, N, L) if c.groups else (b, N, L)
    io = c.dtype
    par = F64 if io == F64 else F32
    x = {
        "u": torch.randn(b, d, L, dtype=F64).to(io),
        "delta": delta.to(io),
        "A": A.to(par),
        "B": torch.randn(bc, dtype=F64).to(io),
        "C": torch.randn(bc, dtype=F64).to(io),
        "D": torch.randn(d, dtype=F64).to(par) if c.D else None,
        "z": torch.randn(b, d, L, dtype=F64).to(io) if c.z else None,
        "delta_bias": (torch.rand(d, dtype=F64) * 4 - 3).to(par) if c.bias else None,
        "initial_state": torch.randn(nseq, d, N, dtype=F64).to(par) if c.h0 else None,
    }
    return x


def run(fn, x, c: Case, g_out, g_last, **kw):
    """Runs fn on leaf copies of x; returns (out, last, {name: grad})."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in x.items()}
    cu = None if c.cu is None else torch.tensor(c.cu)
    res = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
             leaves["z"], leaves["delta_bias"], c.softplus, leaves["initial_state"], c.last,
             c.reverse, cu, **kw)
    out, last = res if c.last else (res, None)
    loss = (out.to(F64) * g_out).sum()
    if c.last:
        loss = loss + (last.to(F64) * g_last).sum()
    loss.backward()
    # An input that nothing depends on (L = 0) gets no gradient from autograd: that is zero.
    return out, last, {k: None if v is None else v.grad if v.grad is not None
                       else torch.zeros_like(v) for k, v in leaves.items()}


def rel_err(x, ref):
    x = x.to(F64)
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_reference(c: Case, dt_scale=1.0, scan=None):
    """``scan`` (default: selective_scan_torch at the case's chunk/seg) against the float64
    reference: outputs, last states and every input's gradient within TOL[c.dtype]."""
    x = make_inputs(c, dt_scale)
    nseq = c.batch if c.cu is None else len(c.cu) - 1
    g_out = torch.randn(c.batch, c.dim, c.L, dtype=F64)
    g_last = torch.randn(nseq, c.dim, c.N, dtype=F64)
    x64 = {k: None if v is None else v.to(F64) for k, v in x.items()}
    ref_out, ref_last, ref_g = run(selective_scan_reference, x64, c, g_out, g_last)
    if scan is None:
        out, last, g = run(selective_scan_torch, x, c, g_out, g_last, chunk=c.chunk, seg=c.seg)
    else:
        out, last, g = run(scan, x, c, g_out, g_last)
    tol = TOL[c.dtype]
    assert out.dtype == c.dtype and out.shape == ref_out.shape
    errs = {"out": rel_err(out, ref_out)}
    if c.last:
        assert last.dtype == (F64 if c.dtype == F64 else F32)
        assert last.shape == (nseq, c.dim, c.N)
        errs["last_state"] = rel_err(last, ref_last)
    for k in NAMES:
        if x[k] is None:
            continue
        assert g[k] is not None and g[k].dtype == x[k].dtype and g[k].shape == x[k].shape, k
        errs["d" + k] = rel_err(g[k], ref_g[k])
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


BASE = Case()
CASES = [
    BASE,
    replace(BASE, D=False),
    replace(BASE, z=False),
    replace(BASE, bias=False),
    replace(BASE, softplus=False),
    replace(BASE, h0=False),
    replace(BASE, last=False),
    replace(BASE, D=False, z=False, bias=False, softplus=False, h0=False, last=False),
    replace(BASE, groups=1),
    replace(BASE, groups=2),
    replace(BASE, reverse=True),
    replace(BASE, reverse=True, groups=2, h0=False),
    replace(BASE, L=1),
    replace(BASE, L=1, reverse=True),
    replace(BASE, L=48),  # a multiple of the chunk
    replace(BASE, N=1),
    replace(BASE, N=16, dim=4),
    replace(BASE, batch=1, dim=4, L=301, chunk=DEFAULT_CHUNK, seg=DEFAULT_SEG),
    replace(BASE, batch=1, dim=4, L=301, reverse=True, groups=2, chunk=DEFAULT_CHUNK,
            seg=DEFAULT_SEG),
    replace(BASE, chunk=12, seg=5),  # chunk rounded down to a multiple of seg
    replace(BASE, chunk=1, seg=1),
    # cu_seqlens: uneven lengths incl. 1 and 0, starts and ends on and off chunk boundaries.
    replace(BASE, batch=1, cu=(0, 1, 1, 9, 16, 33, 37)),
    replace(BASE, batch=1, cu=(0, 1, 1, 9, 16, 33, 37), reverse=True),
    replace(BASE, batch=1, cu=(0, 16, 17, 37, 37), h0=False),
    replace(BASE, batch=1, cu=(0, 5, 37), groups=2, reverse=True, last=False),
    replace(BASE, batch=1, cu=(0, 0), L=0),
    replace(BASE, batch=1, L=1, cu=(0, 1)),
]
for dt in (F32, F16, BF16):
    CASES += [replace(BASE, dtype=dt), replace(BASE, dtype=dt, reverse=True, groups=2),
              replace(BASE, dtype=dt, batch=1, cu=(0, 1, 9, 30, 37))]
CASES.append(replace(BASE, dtype=F32, batch=2, dim=16, L=200, N=16, chunk=DEFAULT_CHUNK,
                     seg=DEFAULT_SEG))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, rng_seed):
    check_against_reference(case)


@pytest.mark.parametrize("dtype", [F64, F32], ids=DT_NAME.get)
def test_long_sequence_decays_to_zero(dtype, rng_seed):
    """Large Δ (up to ~20 after softplus) over 1500 steps: the state forgets its start, Ā
    underflows to 0 in float32, and nothing may turn into NaN or drift."""
    c = Case(batch=1, dim=4, L=1500, N=4, dtype=dtype, chunk=DEFAULT_CHUNK, seg=DEFAULT_SEG)
    check_against_reference(c, dt_scale=4.0)
    x = make_inputs(c, dt_scale=4.0)
    _, last = _scan(x, c)
    _, last0 = _scan({**x, "initial_state": torch.zeros_like(x["initial_state"])}, c)
    assert torch.isfinite(last).all()
    torch.testing.assert_close(last, last0, rtol=1e-6, atol=1e-6)  # the start is forgotten


def _scan(x, c, **kw):
    return selective_scan_torch(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                x["delta_bias"], c.softplus, x["initial_state"], True,
                                c.reverse, None, chunk=c.chunk, seg=c.seg, **kw)


def _slice(x, sl):
    return {k: v[..., sl] if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("k", [1, 13, 16])
def test_chaining(reverse, k, rng_seed):
    """Scanning [0:k] then [k:L] from the state reached at k equals one scan over [0:L]."""
    c = Case(batch=2, dim=8, L=40, N=4, groups=2, dtype=F32, reverse=reverse)
    x = make_inputs(c)
    out, last = _scan(x, c)
    first, second = (slice(k, None), slice(0, k)) if reverse else (slice(0, k), slice(k, None))
    o1, s1 = _scan(_slice(x, first), c)
    o2, s2 = _scan({**_slice(x, second), "initial_state": s1}, c)
    joined = torch.cat([o2, o1] if reverse else [o1, o2], dim=-1)
    torch.testing.assert_close(joined, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, last, rtol=1e-5, atol=1e-5)


def test_reverse_equals_flip(rng_seed):
    """reverse=True == flip every length-indexed input, scan forward, flip the output."""
    c = Case(dtype=F32, groups=2, L=45)
    x = make_inputs(c)
    out, last = _scan(x, replace(c, reverse=True))
    flipped = {k: v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    fout, flast = _scan(flipped, c)
    torch.testing.assert_close(out, fout.flip(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, flast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_cu_seqlens_equals_separate_calls(reverse, rng_seed):
    """Packed sequences (incl. lengths 0 and 1) give the outputs, states and gradients of
    separate batch-1 calls."""
    cu = (0, 3, 3, 4, 20, 41, 50)
    c = Case(batch=1, L=50, cu=cu, dtype=F32, reverse=reverse, groups=2)
    x = make_inputs(c)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    out, last = selective_scan_torch(*(leaves[k] for k in NAMES[:8]), True,
                                     leaves["initial_state"], True, reverse, torch.tensor(cu),
                                     chunk=c.chunk, seg=c.seg)
    (out.sum() + (last * 0.5).sum()).backward()
    sep = {k: v.clone().requires_grad_() for k, v in x.items()}
    outs, lasts = [], []
    for i, (lo, hi) in enumerate(zip(cu, cu[1:])):
        xi = {**_slice(sep, slice(lo, hi)), "initial_state": sep["initial_state"][i:i + 1]}
        o, s = _scan(xi, replace(c, cu=None))
        outs.append(o)
        lasts.append(s)
    sep_out, sep_last = torch.cat(outs, -1), torch.cat(lasts, 0)
    (sep_out.sum() + (sep_last * 0.5).sum()).backward()
    torch.testing.assert_close(out, sep_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, sep_last, rtol=1e-5, atol=1e-5)
    for k in NAMES:
        torch.testing.assert_close(leaves[k].grad, sep[k].grad, rtol=1e-4, atol=1e-4, msg=k)


def test_any_strides(rng_seed):
    """Inputs laid out (batch, L, dim) by the model and transposed give the same result."""
    c = Case(dtype=F32, groups=2)
    x = make_inputs(c)
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2)
               if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    assert not strided["u"].is_contiguous()
    out, last = _scan(x, c)
    sout, slast = _scan(strided, c)
    # Same algorithm; only the vectorised loops' summation order may differ.
    torch.testing.assert_close(sout, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slast, last, rtol=1e-6, atol=1e-6)


def test_no_grad_path_and_saved_memory(rng_seed):
    """Inference builds no graph; training saves only chunk-start states (+ inputs and
    the pre-gate y), never a (batch, dim, L, N) tensor."""
    c = Case(batch=2, dim=8, L=100, N=16, dtype=F32, chunk=32, seg=8)
    x = make_inputs(c)
    with torch.no_grad():
        out_ng, last_ng = _scan({k: v.requires_grad_() for k, v in x.items()}, c)
    assert out_ng.grad_fn is None
    out, last = _scan(x, c)
    torch.testing.assert_close(out_ng, out, rtol=0, atol=0)
    torch.testing.assert_close(last_ng, last, rtol=0, atol=0)
    full = c.batch * c.dim * c.L * c.N
    saved = out.grad_fn.saved_tensors
    assert saved and max(t.numel() for t in saved if t is not None) < full / 4


def test_api_torch_matches_reference(rng_seed):
    """The public entry point with impl="torch" at its default chunking."""
    c = Case(dtype=F32, L=150, groups=2)
    x = make_inputs(c)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True,
              initial_state=x["initial_state"], return_last_state=True)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    out, last = selective_scan(*args, impl="torch", **kw)
    rout, rlast = selective_scan(*args, impl="reference", **kw)
    assert rel_err(out, rout.to(F64)) < 1e-5 and rel_err(last, rlast.to(F64)) < 1e-5


def test_softplus_threshold_and_derivative():
    """Δ passes through above 20 with gradient exactly 1, σ(x) below, as torch's softplus."""
    x = torch.tensor([-30.0, -1.0, 0.0, 19.5, 20.0, 20.5, 40.0], dtype=F64)
    c = Case(batch=1, dim=1, L=x.numel(), N=2, D=False, z=False, bias=False, h0=False,
             last=False)
    A = -torch.ones(1, 2, dtype=F64)
    u = torch.ones(1, 1, x.numel(), dtype=F64)
    B = torch.ones(1, 2, x.numel(), dtype=F64) * 1e-3
    delta = x[None, None].clone().requires_grad_()
    out = selective_scan_torch(u, delta, A, B, B.clone(), None, None, None, True, None, False,
                               False, None, chunk=c.chunk, seg=c.seg)
    out.sum().backward()
    d2 = x[None, None].clone().requires_grad_()
    ref = selective_scan_reference(u, d2, A, B, B.clone(), None, None, None, True)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(delta.grad, d2.grad, rtol=1e-12, atol=1e-15)
    assert F.softplus(x)[-1] == x[-1]
