"""The public API of seqlab.kernels on the CPU: argument checks, impl dispatch and its
observability, and the decode step against the scan."""
from __future__ import annotations

import logging

import pytest
import torch

import seqlab.kernels as K
from seqlab.kernels import last_impl, selective_scan, selective_state_update


def inputs(batch=2, dim=8, L=12, N=4, groups=0, dtype=torch.float32):
    bc = (batch, groups, N, L) if groups else (batch, N, L)
    return dict(
        u=torch.randn(batch, dim, L, dtype=dtype),
        delta=torch.randn(batch, dim, L, dtype=dtype),
        A=-torch.exp(torch.randn(dim, N)),
        B=torch.randn(bc, dtype=dtype),
        C=torch.randn(bc, dtype=dtype),
        D=torch.randn(dim),
        z=torch.randn(batch, dim, L, dtype=dtype),
        delta_bias=torch.randn(dim),
        delta_softplus=True,
        initial_state=torch.randn(batch, dim, N),
        return_last_state=True,
    )


# --------------------------------------------------------------------------- argument checks
BAD = [
    ("u", lambda x: x["u"][0], "u"),  # 2-D
    ("u-int", lambda x: x["u"].to(torch.int32), "u"),
    ("delta-shape", lambda x: x["delta"][..., :-1], "delta"),
    ("delta-dtype", lambda x: x["delta"].to(torch.int64), "delta"),
    ("delta-device", lambda x: x["delta"].to("meta"), "delta"),
    ("A-dim", lambda x: x["A"][:-1], "A"),
    ("A-fp16", lambda x: x["A"].half(), "A"),
    ("A-3d", lambda x: x["A"][None], "A"),
    ("B-L", lambda x: x["B"][..., :-1], "B"),
    ("B-groups", lambda x: x["B"][:, None].expand(2, 3, 4, 12), "B"),
    ("C-N", lambda x: x["C"][:, :-1], "C"),
    ("C-device", lambda x: x["C"].to("meta"), "C"),
    ("D-shape", lambda x: x["D"][:-1], "D"),
    ("D-dtype", lambda x: x["D"].half(), "D"),
    ("z-shape", lambda x: x["z"][:1], "z"),
    ("delta_bias-shape", lambda x: x["delta_bias"][None], "delta_bias"),
    ("initial_state-shape", lambda x: x["initial_state"][..., :-1], "initial_state"),
    ("initial_state-dtype", lambda x: x["initial_state"].half(), "initial_state"),
]


@pytest.mark.parametrize("name,mutate,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_argument_raises_value_error_naming_it(name, mutate, arg):
    x = inputs()
    x[arg] = mutate(x)
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        selective_scan(**x, impl="torch")


@pytest.mark.parametrize("cu,why", [
    (torch.tensor([0, 5, 12]), "batch"),           # batch 2 with cu_seqlens
    (torch.tensor([0, 5, 11]), "cu_seqlens"),      # does not end at L
    (torch.tensor([1, 5, 12]), "cu_seqlens"),      # does not start at 0
    (torch.tensor([0, 7, 5, 12]), "cu_seqlens"),   # decreasing
    (torch.tensor([12]), "cu_seqlens"),            # too short
    (torch.tensor([0.0, 12.0]), "cu_seqlens"),     # float
    (torch.tensor([[0, 12]]), "cu_seqlens"),       # 2-D
], ids=["batch2", "end", "start", "decreasing", "short", "float", "2d"])
def test_bad_cu_seqlens(cu, why):
    x = inputs(batch=2 if why == "batch" else 1)
    x["initial_state"] = None
    with pytest.raises(ValueError, match="argument '(u|cu_seqlens)'") as e:
        selective_scan(**x, cu_seqlens=cu, impl="torch")
    assert ("'u'" in str(e.value)) == (why == "batch")


def test_initial_state_with_cu_seqlens_is_per_sequence():
    x = inputs(batch=1)  # initial_state (1, dim, N) but 3 sequences
    with pytest.raises(ValueError, match="argument 'initial_state'"):
        selective_scan(**x, cu_seqlens=torch.tensor([0, 2, 7, 12]), impl="torch")


def test_state_update_bad_arguments():
    state = torch.zeros(2, 8, 4)
    ok = dict(x=torch.randn(2, 8), dt=torch.randn(2, 8), A=-torch.ones(8, 4),
              B=torch.randn(2, 4), C=torch.randn(2, 4))
    for arg, bad in (("x", torch.randn(2, 7)), ("dt", torch.randn(2, 8).to(torch.int32)),
                     ("A", -torch.ones(8, 3)), ("B", torch.randn(2, 3, 4)),
                     ("C", torch.randn(2, 5))):
        with pytest.raises(ValueError, match=f"argument '{arg}'"):
            selective_state_update(state, **{**ok, arg: bad}, impl="torch")
    with pytest.raises(ValueError, match="argument 'state'"):
        selective_state_update(torch.zeros(2, 8), **ok, impl="torch")


# --------------------------------------------------------------------------- dispatch
def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl='cuda'"):
        selective_scan(**inputs(), impl="cuda")


@pytest.mark.parametrize("with_numba", [True, False], ids=["numba-installed", "no-numba"])
def test_auto_on_cpu_is_logged(caplog, monkeypatch, with_numba):
    """auto on the CPU: the compiled scan when numba imports (a dependency of seqlab), the
    pure-PyTorch one otherwise."""
    import seqlab.kernels.api as api
    monkeypatch.setattr(api, "numba_available", lambda: with_numba)
    x = inputs()
    selective_scan(**x, impl="reference")
    assert last_impl() == "reference"
    with caplog.at_level(logging.DEBUG, logger="seqlab.kernels"):
        out, last = selective_scan(**x)  # auto
    want = "numba" if with_numba else "torch"
    assert last_impl() == want
    lines = [r.getMessage() for r in caplog.records if r.name == "seqlab.kernels"]
    assert f"selective_scan: using impl={want} on cpu" in lines
    ref_out, ref_last = selective_scan(**x, impl="reference")
    assert last_impl() == "reference"
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)


def test_torch_impl_calls_scan_torch(monkeypatch):
    """impl="torch" reaches kernels/scan/chunked.py with the validated arguments, positionally."""
    import seqlab.kernels.scan.chunked as st
    seen = {}

    def spy(*args):
        seen["args"] = args
        return "sentinel"

    monkeypatch.setattr(st, "selective_scan_torch", spy)
    x = inputs()
    assert selective_scan(**x, reverse=True, impl="torch") == "sentinel"
    args = seen["args"]
    assert len(args) == 13 and args[0] is x["u"] and args[9] is x["initial_state"]
    assert args[8] is True and args[10] is True and args[11] is True and args[12] is None


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan(**inputs(), impl="triton")


def test_last_impl_per_op():
    selective_scan(**inputs(), impl="torch")
    state = torch.zeros(2, 8, 4)
    selective_state_update(state, torch.randn(2, 8), torch.randn(2, 8), -torch.ones(8, 4),
                           torch.randn(2, 4), torch.randn(2, 4), impl="reference")
    assert last_impl("selective_scan") == "torch"
    assert last_impl("selective_state_update") == "reference"
    assert set(K.IMPLS) == {"auto", "triton", "numba", "torch", "reference"}


def test_scan_tuning_must_be_a_scan_tuning():
    with pytest.raises(ValueError, match="argument 'tuning'"):
        selective_scan(**inputs(), impl="torch", tuning={"ckpt_every": 32})
    with pytest.raises(ValueError, match="ckpt_every=48"):
        K.ScanTuning(ckpt_every=48)


def test_conv_and_norm_ops_dispatch_to_their_references_on_cpu():
    """impl="auto" on the CPU runs the torch references of the conv, its decoding update and
    the add + RMSNorm, and says so through last_impl."""
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    w, b = torch.randn(6, 1, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for reverse in (False, True):
        torch.testing.assert_close(K.causal_conv1d_silu(x, w, b, reverse),
                                   K.causal_conv1d_silu_reference(x, w, b, reverse))
        assert last_impl("causal_conv1d") == "torch"
    state = torch.randn(2, 6, 3, dtype=torch.float64)
    ref_state = state.clone()
    full = K.causal_conv1d_silu_reference(torch.cat([state[..., 1:], x], -1), w, b)
    for t in range(x.shape[-1]):
        u = K.causal_conv1d_update(x[..., t], state, w, b, impl="reference")
        ref_state = torch.cat([ref_state[..., 1:], x[..., t:t + 1]], -1)
        assert torch.equal(state, ref_state)
        torch.testing.assert_close(u, full[..., 2 + t])
    assert last_impl("causal_conv1d_update") == "reference"
    r = torch.randn(2, 9, 6)
    normed, res = K.add_rms_norm(x.transpose(1, 2).float(), r, b.float(), 1e-5)
    assert last_impl("add_rms_norm") == "torch"
    rn, rres = K.add_rms_norm_reference(x.transpose(1, 2).float(), r, b.float(), 1e-5)
    assert torch.equal(normed, rn) and torch.equal(res, rres)
    with pytest.raises(ValueError, match="impl='cuda'"):
        K.add_rms_norm(r, None, b.float(), impl="cuda")


# --------------------------------------------------------------------------- decode step
@pytest.mark.parametrize("groups", [0, 1, 2], ids=["nogroup", "G1", "G2"])
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-sp", "plain"])
def test_state_update_equals_scan_positions(groups, full, rng_seed):
    """Stepping selective_state_update(impl="torch") through L positions, updating one state
    tensor in place, reproduces every position of the scan and its last state."""
    b, dim, L, N = 2, 8, 9, 4
    x = inputs(b, dim, L, N, groups)
    if not full:
        x.update(D=None, z=None, delta_bias=None, delta_softplus=False,
                 delta=torch.rand(b, dim, L))
    out, last = selective_scan(**x, impl="torch")
    state = x["initial_state"].clone()
    ptr = state.data_ptr()
    for t in range(L):
        y = selective_state_update(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t],
            D=x["D"], z=None if x["z"] is None else x["z"][..., t], dt_bias=x["delta_bias"],
            dt_softplus=x["delta_softplus"], impl="torch")
        assert y.shape == (b, dim) and y.dtype == x["u"].dtype
        torch.testing.assert_close(y, out[..., t], rtol=1e-5, atol=1e-5)
    assert state.data_ptr() == ptr  # in place
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)
    assert last_impl("selective_state_update") == "torch"


def test_peer_memory_count_lists_the_peers_tensors():
    """The bench's count of mamba_ssm's forward+backward allocations (the anchors carry no peer
    memory) equals the tensors its selective_scan_fn allocates with z and variable B/C: out,
    out_z, du, ddelta, dz in u's dtype; float32 chunk states x (b, d, ceil(L/2048), 2N); float32
    dB, dC; dA, dD, ddelta_bias."""
    from helpers.benchmarks import load_benchmark
    peer_peak_extra_bytes = load_benchmark("scan").peer_peak_extra_bytes

    b, d, L, N = 2, 8, 4100, 4
    meta = dict(device="meta")
    tensors = [torch.empty(b, d, L, dtype=torch.bfloat16, **meta) for _ in range(5)]
    tensors += [torch.empty(b, d, 3, 2 * N, **meta),  # 4100 steps: 3 chunks of 2048
                torch.empty(b, N, L, **meta), torch.empty(b, N, L, **meta),
                torch.empty(d, N, **meta), torch.empty(d, **meta), torch.empty(d, **meta)]
    assert peer_peak_extra_bytes(b, d, L, N) == sum(t.numel() * t.element_size() for t in tensors)
