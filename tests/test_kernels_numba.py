"""impl="numba" (kernels/scan/numba_loops.py) against the sequential reference run in float64.

Same cases and tolerances as the torch path (tests/test_kernels_torch.py): fresh random inputs,
outputs, last states and the gradient of every input compared by relative error norm. Lengths
run past the checkpoint interval (CKPT) so the backward's chunked recomputation is exercised.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from numba import njit  # a dependency of seqlab: a missing numba fails here, not skips

from seqlab.kernels import last_impl, selective_scan
from seqlab.kernels.scan import numba_loops as scan_numba
from seqlab.kernels.scan.numba_loops import CKPT, selective_scan_numba
from test_kernels_torch import (BASE, BF16, CASES, F32, F64, NAMES, Case,
                                check_against_reference, make_inputs, rel_err, run)


@njit
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = scan_numba._exp_nonpos(x[i], scan_numba._P2, True)


def check(c: Case, dt_scale=1.0):
    check_against_reference(c, dt_scale, scan=selective_scan_numba)


LONG = [  # several checkpoint chunks, a partial last one, packed sequences across chunks
    replace(BASE, L=2 * CKPT + 13, dim=4),
    replace(BASE, L=2 * CKPT + 13, dim=4, reverse=True, groups=2),
    replace(BASE, L=3 * CKPT, dim=4, dtype=F32),
    replace(BASE, batch=1, dim=4, L=3 * CKPT + 5, cu=(0, 1, CKPT, CKPT, 2 * CKPT + 7,
                                                    3 * CKPT + 5), groups=2),
    replace(BASE, batch=1, dim=4, L=3 * CKPT + 5, cu=(0, CKPT + 1, 3 * CKPT + 5),
            reverse=True, dtype=F32),
    replace(BASE, batch=1, dim=6, L=CKPT + 3, groups=3),  # one sequence: channel blocks
]


@pytest.mark.parametrize("case", CASES + LONG, ids=lambda c: c.id)
def test_matches_reference(case, rng_seed):
    check(case)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_long_sequence_decays_to_zero(dtype, rng_seed):
    """Δ up to ~20 over 1500 steps: Ā underflows (the float32 exp clamps at e^-87), nothing
    turns into NaN, and the state forgets its start."""
    c = Case(batch=1, dim=4, L=1500, N=4, dtype=dtype)
    check(c, dt_scale=4.0)
    x = make_inputs(c, dt_scale=4.0)
    args = [x[k] for k in NAMES[:8]]
    _, last = selective_scan_numba(*args, True, x["initial_state"], True)
    _, last0 = selective_scan_numba(*args, True, torch.zeros_like(x["initial_state"]), True)
    assert torch.isfinite(last).all()
    torch.testing.assert_close(last, last0, rtol=1e-6, atol=1e-6)


def test_fast_exp_accuracy():
    """The float32 exp of the compiled loops over its whole range (x <= 0)."""
    x = -np.concatenate([np.linspace(0, 90, 200_001), np.random.default_rng(0).random(10_000)
                         * 1e-3]).astype(np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    ref = np.exp(x.astype(np.float64))
    kept = x >= -87  # below, the argument is clamped: e^-87 ~ 1.6e-38 stands for ~0
    assert np.all(np.abs(out[kept] - ref[kept]) <= 4e-7 * ref[kept])
    assert np.all(out[~kept] <= 1.7e-38) and np.all(out > 0)


def test_matches_torch_path_at_model_shape(rng_seed):
    """float32 at a model-like shape (d_state 16, default chunking of both): numba and torch
    paths agree with each other to float32 rounding, gradients included."""
    c = Case(batch=3, dim=16, L=300, N=16, groups=1, dtype=F32)
    x = make_inputs(c)
    g_out = torch.randn(c.batch, c.dim, c.L, dtype=F64)
    g_last = torch.randn(c.batch, c.dim, c.N, dtype=F64)
    o1, l1, g1 = run(selective_scan_numba, x, c, g_out, g_last)
    from seqlab.kernels.scan.chunked import selective_scan_torch
    o2, l2, g2 = run(selective_scan_torch, x, c, g_out, g_last)
    assert rel_err(o1, o2.to(F64)) < 3e-6 and rel_err(l1, l2.to(F64)) < 3e-6
    for k in NAMES:
        assert rel_err(g1[k], g2[k].to(F64)) < 1e-5, k


def test_no_grad_saves_nothing_and_matches(rng_seed):
    c = Case(batch=2, dim=8, L=100, N=16, dtype=F32)
    x = make_inputs(c)
    args = [x[k] for k in NAMES[:8]]
    with torch.no_grad():
        out_ng, last_ng = selective_scan_numba(*args, True, x["initial_state"], True)
    assert out_ng.grad_fn is None
    leaves = [a.clone().requires_grad_() for a in args]
    out, last = selective_scan_numba(*leaves, True, x["initial_state"], True)
    torch.testing.assert_close(out_ng, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(last_ng, last.detach(), rtol=0, atol=0)
    full = c.batch * c.dim * c.L * c.N
    core = out.grad_fn
    while core is not None and type(core).__name__ != "_CoreFnBackward":
        core = core.next_functions[0][0]
    assert core is not None
    assert max(t.numel() for t in core.saved_tensors) < full / 4  # no (batch, dim, L, N)


def test_auto_on_cpu_is_numba():
    x = make_inputs(replace(BASE, dtype=F32))
    selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert last_impl() == "numba"


def test_bf16_inputs_compute_in_float32(rng_seed):
    check(replace(BASE, dtype=BF16, L=CKPT + 9))


def test_cuda_tensors_are_refused():
    from seqlab.kernels import resolve_impl
    with pytest.raises(RuntimeError, match="impl='numba' runs on the CPU"):
        resolve_impl("numba", torch.device("cuda"))


def test_cpu_benchmark_quick_runs(capsys, tmp_path):
    """`python benchmarks/scan.py --device cpu --quick`: a row per implementation with
    positive timings in the JSON, and the table printed."""
    import json

    from helpers.benchmarks import load_benchmark
    main = load_benchmark("scan").main
    main(["--device", "cpu", "--quick", "--json", str(tmp_path / "cpu.json")])
    res = json.loads((tmp_path / "cpu.json").read_text())
    assert sorted(r["impl"] for r in res["rows"]) == ["numba", "torch"]
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["fwd_gbps"] > 0 for r in res["rows"])
    out = capsys.readouterr().out
    assert sum(line.startswith("layer_") for line in out.splitlines()) == 2
    assert "reference (Python loop over L)" in out
