"""The LTI ablation's FFT convolution (``Mixer._lti_conv``) against the scan it replaces.

A ``selective=False`` mixer runs its SSM on whole sequences as one FFT convolution; the scan
(still used for prefill, packed input and decoding) is the oracle here. Same weights, same
inputs: outputs and the gradients of the input and of every parameter agree to ~1e-9 in
float64 and ~1e-4 in float32, causal, reverse, right-padded, bidirectional, for L = 1 and L
not a power of two, with Δ up to 1 and A from the S4D-real init.
"""
import math

import pytest
import torch

import seqlab.model.mixer as mixer_mod
from seqlab.kernels import last_impl
from seqlab.model import BiMixer, MambaConfig, MambaLM, Mixer
from seqlab.model.mixer import fft_size, inverse_softplus


def lti(**kw):
    base = dict(d_model=16, n_layer=2, d_state=4, d_conv=4, scan_impl="torch", selective=False,
                fused_mixer=False)
    base.update(kw)
    return MambaConfig(**base)


def close(a, b, rtol, what=""):
    """Max abs error relative to the scale of the reference: fails on any real mismatch."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-300
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def randomise(module: torch.nn.Module, dt_max: float = 1.0, jitter_A: bool = False):
    """Non-trivial weights for every LTI mixer: Δ log-uniform in [1e-3, dt_max] (dt_max itself
    on channel 0), random B, C, D and a conv that is not small. A keeps the S4D-real init
    (A_n = -(n + 1)) unless ``jitter_A``."""
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, Mixer):
                continue
            E, N = m.d_inner, m.d_state
            dt = torch.exp(torch.empty(E, dtype=torch.float64).uniform_(math.log(1e-3),
                                                                       math.log(dt_max)))
            dt[0] = dt_max
            m.dt_bias.copy_(inverse_softplus(dt))
            m.B_lti.copy_(1 + 0.5 * torch.randn(E, N))
            m.C_lti.copy_(torch.randn(E, N) * N ** -0.5)
            m.D.copy_(torch.randn(E))
            m.conv1d.weight.mul_(3)
            if jitter_A:
                m.A_log.add_(0.3 * torch.randn(E, N))


@pytest.fixture
def scan_calls(monkeypatch):
    """Counts the mixer's selective_scan calls: the FFT path must not scan, the oracle must."""
    calls = []
    real = mixer_mod.selective_scan

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mixer_mod, "selective_scan", counting)
    return calls


def set_fft(module: torch.nn.Module, on: bool):
    for m in module.modules():
        if isinstance(m, Mixer):
            m._lti_fft = on


def outputs_and_grads(module, x, fft: bool, scan_calls, **kw):
    """module(x, **kw) with the FFT path on or off; (out, {name: grad}) for x and every
    parameter, from a readout that weighs every position differently."""
    set_fft(module, fft)
    xx = x.clone().requires_grad_(True)
    n_before = len(scan_calls)
    out = module(xx, **kw)
    assert last_impl("lti_ssm") == ("fft" if fft else "scan")
    assert (len(scan_calls) == n_before) == fft  # which path ran, seen from the scan's side
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    params = dict(module.named_parameters())
    names = ["input"] + list(params)
    grads = torch.autograd.grad((out * w).sum(), [xx] + list(params.values()), allow_unused=True)
    set_fft(module, True)
    return out.detach(), dict(zip(names, grads))


def assert_paths_agree(module, x, scan_calls, rtol, **kw):
    out_f, g_f = outputs_and_grads(module, x, True, scan_calls, **kw)
    out_s, g_s = outputs_and_grads(module, x, False, scan_calls, **kw)
    close(out_f, out_s, rtol, "output")
    assert g_f.keys() == g_s.keys()
    lti_params = ("A_log", "dt_bias", "B_lti", "C_lti", "D")
    assert sum(n.endswith(lti_params) for n in g_s) >= len(lti_params)
    for n in g_s:
        if g_s[n] is None:  # not used by this call (a tied alias, an unused direction)
            assert g_f[n] is None, n
            continue
        if x.shape[1] > 1 or not n.endswith("A_log"):  # A does not act when L = 1
            assert g_s[n].abs().max() > 0, n  # else the comparison would be vacuous
        close(g_f[n], g_s[n], rtol, n)


# ----------------------------------------------------------------------- float64 vs the scan
@pytest.mark.parametrize("L", [1, 2, 13, 64, 100])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_fft_equals_scan_float64(rng_seed, scan_calls, L, reverse):
    mix = Mixer(lti()).double()
    randomise(mix, dt_max=1.0, jitter_A=L == 13)
    x = torch.randn(2, L, 16, dtype=torch.float64)
    assert_paths_agree(mix, x, scan_calls, 1e-9, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_fft_equals_scan_float64_long_memory(rng_seed, scan_calls, reverse):
    """Small Δ (slow decay: the kernel is far from 0 at lag L - 1) and a longer L."""
    mix = Mixer(lti(d_state=8)).double()
    randomise(mix, dt_max=0.01)
    x = torch.randn(2, 300, 16, dtype=torch.float64)
    assert_paths_agree(mix, x, scan_calls, 1e-9, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_fft_equals_scan_float64_padded_batch(rng_seed, scan_calls, reverse):
    mix = Mixer(lti()).double()
    randomise(mix)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    x[1, 4:] = 100 * torch.randn(7, 16, dtype=torch.float64)  # garbage in the padding
    lengths = torch.tensor([11, 4, 7])
    assert_paths_agree(mix, x, scan_calls, 1e-9, lengths=lengths, reverse=reverse)
    # And padding does not leak: each sequence alone gives its rows of the padded batch.
    set_fft(mix, True)
    with torch.no_grad():
        out = mix(x, lengths=lengths, reverse=reverse)
        for b, n in enumerate(lengths.tolist()):
            close(out[b, :n], mix(x[b:b + 1, :n], reverse=reverse)[0], 1e-9, f"row {b}")


@pytest.mark.parametrize("strategy,tied", [("add", True), ("mul", False)])
def test_fft_equals_scan_float64_bidirectional(rng_seed, scan_calls, strategy, tied):
    """BiMixer (both directions through Mixer.mix) with a right-padded batch."""
    bi = BiMixer(lti(bidirectional=True, bidirectional_strategy=strategy,
                     tie_bidirectional_projections=tied)).double()
    randomise(bi)
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    assert_paths_agree(bi, x, scan_calls, 1e-9, lengths=torch.tensor([10, 3, 6]))


def test_fft_equals_scan_float64_whole_model(rng_seed, scan_calls):
    """A whole LTI MambaLM: logits and the gradients of every parameter (embedding, norms,
    heads included) agree; the input here is the token ids, so no input gradient."""
    m = MambaLM(lti(n_layer=3)).double()
    randomise(m)
    ids = torch.randint(0, 256, (2, 19))
    results = []
    for fft in (True, False):
        set_fft(m, fft)
        n_before = len(scan_calls)
        logits = m(ids)
        assert last_impl("lti_ssm") == ("fft" if fft else "scan")
        assert len(scan_calls) == (n_before if fft else n_before + 3)
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
        names, params = zip(*m.named_parameters())
        results.append((logits.detach(), torch.autograd.grad((logits * w).sum(), params)))
    (lf, gf), (ls, gs) = results
    close(lf, ls, 1e-9, "logits")
    for n, a, b in zip(names, gf, gs):
        close(a, b, 1e-9, n)


# ----------------------------------------------------------------------- float32, autocast
@pytest.mark.parametrize("L,reverse,padded", [(37, False, False), (37, True, True),
                                              (128, False, True), (1, True, False)])
def test_fft_equals_scan_float32(rng_seed, scan_calls, L, reverse, padded):
    mix = Mixer(lti())
    randomise(mix)
    x = torch.randn(3, L, 16)
    lengths = torch.tensor([L, max(1, L // 3), max(1, L - 5)]) if padded else None
    assert_paths_agree(mix, x, scan_calls, 1e-4, lengths=lengths, reverse=reverse)


def test_fft_under_cpu_autocast(rng_seed, scan_calls):
    """bf16 autocast: the FFT path computes in float32 inside and returns u's dtype, like the
    scan; the two agree to bf16 rounding."""
    mix = Mixer(lti())
    randomise(mix, dt_max=0.1)
    x = torch.randn(2, 24, 16)
    outs = []
    for fft in (True, False):
        set_fft(mix, fft)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(mix(x).float())
    close(outs[0], outs[1], 3e-2, "bf16 output")


# ----------------------------------------------------------------------- which path runs where
def test_fft_only_for_whole_sequences(rng_seed, scan_calls):
    """Forward (causal, reverse, padded) takes the FFT path; a cache (prefill), packed input
    (cu_seqlens) and step keep the scan; a selective mixer never takes it. The FFT forward of a
    whole LTI MambaLM equals chunked prefill + step-by-step decoding through the scan."""
    m = MambaLM(lti(n_layer=3)).eval()
    randomise(m, dt_max=0.3)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        full = m(ids)
        assert last_impl("lti_ssm") == "fft" and not scan_calls
        cache = m.allocate_cache(2)
        a = m(ids[:, :3], cache=cache)  # shorter than d_conv
        assert last_impl("lti_ssm") == "scan" and len(scan_calls) == 3
        b = m(ids[:, 3:9], cache=cache)  # continued prefill
        c = torch.stack([m.step(ids[:, t], cache) for t in range(9, 17)], 1)
        assert len(scan_calls) == 6  # step uses selective_state_update, not the scan
    close(torch.cat([a, b, c], 1), full, 1e-4, "prefill + step vs forward")

    bb = m.backbone
    lens = [5, 1, 7]
    cu = torch.tensor([0] + lens).cumsum(0)
    packed_ids = torch.randint(0, 256, (1, sum(lens)))
    with torch.no_grad():
        packed = bb(packed_ids, cu_seqlens=cu)
        assert last_impl("lti_ssm") == "scan" and scan_calls[-1] is not None
        for i in range(len(lens)):
            s, e = cu[i].item(), cu[i + 1].item()
            close(packed[0, s:e], bb(packed_ids[:, s:e])[0], 1e-4, f"packed sequence {i}")
            assert last_impl("lti_ssm") == "fft"

    n_before = len(scan_calls)
    sel = Mixer(lti(selective=True))
    with torch.no_grad():
        sel(torch.randn(1, 5, 16))
    assert len(scan_calls) == n_before + 1 and last_impl("lti_ssm") == "fft"  # not an LTI call


def test_fft_size_is_the_smallest_5_smooth_size():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 3000):
        s = fft_size(n)
        assert s >= n and smooth(s) and not any(smooth(k) for k in range(n, s)), n
