"""Model layer: inference protocol, padding/packing, bidirectionality, RC equivariance, heads."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqlab.model import (Backbone, BiMixer, MambaConfig, MambaLM, MaskedLM, Mixer,
                          SequenceClassifier, complement_table, conjoin_rc, mask_tokens,
                          param_groups, reverse_complement)
from seqlab.model.rc import rc_hidden, reverse_positions

IMPL = "torch"


def tiny(**kw):
    base = dict(d_model=16, n_layer=2, d_state=4, d_conv=4, scan_impl=IMPL)
    base.update(kw)
    return MambaConfig(**base)


def close(a, b, rtol=1e-4):
    """Max abs error relative to the scale of the reference: fails on any real mismatch."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------- names and shapes
def test_parameter_names_match_mamba_ssm(rng_seed):
    m = MambaLM(tiny(norm="layer"))
    keys = set(m.state_dict())
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
             "dt_proj.bias", "A_log", "D", "out_proj.weight"]
    want = {"backbone.embedding.weight", "backbone.norm_f.weight", "backbone.norm_f.bias", "lm_head.weight"}
    for i in range(2):
        want |= {f"backbone.layers.{i}.norm.weight", f"backbone.layers.{i}.norm.bias"}
        want |= {f"backbone.layers.{i}.mixer.{k}" for k in mixer}
    assert keys == want
    assert m.backbone.embedding.weight.shape == (264, 16)
    assert m.lm_head.weight is m.backbone.embedding.weight
    ids = torch.randint(0, 260, (2, 7))
    assert m(ids).shape == (2, 7, 264)

    bi = Backbone(tiny(bidirectional=True, n_layer=1))
    keys = set(bi.state_dict())
    for d in ("mamba_fwd", "mamba_rev"):
        assert {f"layers.0.mixer.{d}.{k}" for k in mixer} <= keys
    mix = bi.layers[0].mixer
    assert mix.mamba_rev.in_proj.weight is mix.mamba_fwd.in_proj.weight
    assert mix.mamba_rev.out_proj.weight is mix.mamba_fwd.out_proj.weight
    assert mix.mamba_rev.x_proj.weight is not mix.mamba_fwd.x_proj.weight
    untied = BiMixer(tiny(tie_bidirectional_projections=False))
    assert untied.mamba_rev.in_proj.weight is not untied.mamba_fwd.in_proj.weight


def test_initialisation_follows_mamba_ssm(rng_seed):
    cfg = tiny(n_layer=4, d_model=32)
    m = MambaLM(cfg)
    mix = m.backbone.layers[0].mixer
    dt = F.softplus(mix.dt_proj.bias)
    assert dt.min() >= cfg.dt_init_floor * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert torch.allclose(torch.exp(mix.A_log), torch.arange(1, 5.0).repeat(64, 1))
    assert torch.equal(mix.D, torch.ones(64))
    assert mix.A_log._no_weight_decay and mix.D._no_weight_decay
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in), then / sqrt(n_layer)
    bound = 1 / math.sqrt(64) / math.sqrt(4)
    assert mix.out_proj.weight.abs().max() <= bound
    assert mix.out_proj.weight.abs().max() > 0.8 * bound
    assert abs(m.backbone.embedding.weight.std().item() - 0.02) < 0.003


# ----------------------------------------------------------------------- inference protocol
@pytest.mark.parametrize("selective", [True, False])
def test_step_by_step_equals_full_forward(rng_seed, selective):
    m = MambaLM(tiny(n_layer=3, selective=selective))
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(2)
        steps = torch.stack([m.step(ids[:, t], cache) for t in range(11)], 1)
    close(steps, full)


def test_prefill_then_step_equals_full_forward(rng_seed):
    m = MambaLM(tiny(n_layer=3))
    ids = torch.randint(0, 256, (3, 13))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_cache(3)
        a = m(ids[:, :2], cache=cache)  # shorter than d_conv: state keeps the zero history
        b = m(ids[:, 2:7], cache=cache)  # a continued prefill
        c = torch.stack([m.step(ids[:, t], cache) for t in range(7, 13)], 1)
    close(torch.cat([a, b, c], 1), full)


# ----------------------------------------------------------------------- directions, padding, packing
def test_reverse_mixer_is_the_mirror_of_the_forward_one(rng_seed):
    mix = Mixer(tiny())
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        close(mix(x, reverse=True), mix(x.flip(1)).flip(1))


@pytest.mark.parametrize("strategy", ["add", "mul"])
def test_bidirectional_padded_batch_equals_each_sequence_alone(rng_seed, strategy):
    cfg = tiny(bidirectional=True, bidirectional_strategy=strategy)
    lengths = torch.tensor([9, 4, 6])
    # Mixer in each direction, then the whole backbone.
    mix = Mixer(cfg)
    x = torch.randn(3, 9, 16)
    bb = Backbone(cfg)
    ids = torch.randint(0, 256, (3, 9))
    ids[1, 4:] = 256
    ids[2, 6:] = 256
    with torch.no_grad():
        for reverse in (False, True):
            out = mix(x, lengths=lengths, reverse=reverse)
            for b, n in enumerate(lengths.tolist()):
                close(out[b, :n], mix(x[b:b + 1, :n], reverse=reverse)[0])
        # Garbage in the padding must not matter either.
        x2 = x.clone()
        x2[1, 4:] = 100 * torch.randn(5, 16)
        close(mix(x2, lengths=lengths, reverse=True)[1, :4], mix(x, lengths=lengths, reverse=True)[1, :4])
        hid = bb(ids, lengths=lengths)
        for b, n in enumerate(lengths.tolist()):
            close(hid[b, :n], bb(ids[b:b + 1, :n])[0])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_cu_seqlens_equals_separate_sequences(rng_seed, bidirectional):
    bb = Backbone(tiny(bidirectional=bidirectional))
    lens = [5, 2, 7, 1]
    ids = torch.randint(0, 256, (1, sum(lens)))
    cu = torch.tensor([0] + lens).cumsum(0)
    with torch.no_grad():
        packed = bb(ids, cu_seqlens=cu)
        for i in range(len(lens)):
            s, e = cu[i].item(), cu[i + 1].item()
            close(packed[0, s:e], bb(ids[:, s:e])[0])


# ----------------------------------------------------------------------- RC equivariance
def test_complement_table():
    t = complement_table()
    assert t.shape == (260,) and t.dtype == torch.long
    assert torch.equal(t[t], torch.arange(260))  # an involution
    pairs = {"A": "T", "C": "G", "R": "Y", "K": "M", "B": "V", "D": "H", "S": "S", "W": "W", "N": "N"}
    for a, b in pairs.items():
        assert t[ord(a)] == ord(b) and t[ord(b)] == ord(a)
        assert t[ord(a.lower())] == ord(b.lower())
    assert torch.equal(t[256:], torch.arange(256, 260))
    ids = torch.tensor([[ord(c) for c in "ACGTN"] + [256, 256]])
    rc = reverse_complement(ids, lengths=torch.tensor([5]))
    assert bytes(rc[0, :5].tolist()).decode() == "NACGT" and rc[0, 5:].tolist() == [256, 256]


def dna(batch, L):
    return torch.tensor([ord(c) for c in "ACGTacgtNRYKM"])[torch.randint(0, 13, (batch, L))]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rc_equivariant_backbone_and_lm_head(rng_seed, bidirectional):
    cfg = tiny(rc_equivariant=True, bidirectional=bidirectional, d_model=16)
    m = MaskedLM(cfg) if bidirectional else MambaLM(cfg)
    ids = dna(3, 10)
    lengths = torch.tensor([10, 7, 3])
    ids[1, 7:] = 256
    ids[2, 3:] = 256
    table = complement_table(264)
    with torch.no_grad():
        for lens in (None, lengths):
            h = m.backbone(ids, lengths=lens)
            h_rc = m.backbone(reverse_complement(ids, lens), lengths=lens)
            mask = torch.ones(3, 10, 1) if lens is None else (torch.arange(10) < lens[:, None])[..., None]
            close(h_rc * mask, rc_hidden(h, lens) * mask)
            logits = m(ids, lengths=lens)
            logits_rc = m(reverse_complement(ids, lens), lengths=lens)
            close(logits_rc * mask, reverse_positions(logits, lens)[..., table] * mask)
    # A plain model is not equivariant: the property above is not vacuous.
    plain = Backbone(tiny(bidirectional=bidirectional))
    with torch.no_grad():
        diff = plain(reverse_complement(ids)) - rc_hidden(plain(ids))
    assert diff.abs().max() > 1e-2


def test_rc_modules_put_their_complement_table_on_the_model_device():
    """The index buffers follow the device passed to the constructors (a CPU table indexed by
    CUDA ids fails), checked here with the meta device."""
    m = MambaLM(tiny(rc_equivariant=True, d_model=16), device="meta")
    tables = [b for n, b in m.named_buffers() if n.endswith("complement")]
    assert len(tables) == 2 and all(t.device.type == "meta" for t in tables)


def test_conjoin_rc_makes_any_model_strand_invariant(rng_seed):
    clf = SequenceClassifier(tiny(), num_classes=3, conjoin_rc=True)
    plain = SequenceClassifier(tiny(), num_classes=3)
    plain.load_state_dict(clf.state_dict())
    ids = dna(2, 8)
    lengths = torch.tensor([8, 5])
    ids[1, 5:] = 256
    with torch.no_grad():
        close(clf(ids, lengths), clf(reverse_complement(ids, lengths), lengths))
        close(clf.embed(ids, lengths), clf.embed(reverse_complement(ids, lengths), lengths))
        expect = (plain(ids, lengths) + plain(reverse_complement(ids, lengths), lengths)) / 2
        close(clf(ids, lengths), expect)
        # Per-position outputs line up position by position after flipping back.
        lm = MambaLM(tiny())
        conj = conjoin_rc(lm, ids, lengths, per_position=True, complement_vocab=True)
        conj_rc = conjoin_rc(lm, reverse_complement(ids, lengths), lengths, per_position=True,
                             complement_vocab=True)
        back = reverse_positions(conj_rc, lengths)[..., complement_table(264)]
        close(conj[0], back[0])
        close(conj[1, :5], back[1, :5])
    # An RC-equivariant backbone gives strand-invariant pooled features without conjoining.
    eq = SequenceClassifier(tiny(rc_equivariant=True, bidirectional=True), num_classes=2)
    with torch.no_grad():
        close(eq(ids, lengths), eq(reverse_complement(ids, lengths), lengths))


# ----------------------------------------------------------------------- LTI ablation
def test_lti_parameters_do_not_depend_on_the_input(rng_seed):
    mix = Mixer(tiny(selective=False))
    assert not hasattr(mix, "x_proj") and not hasattr(mix, "dt_proj")
    u1, u2 = torch.randn(2, 32, 6), torch.randn(2, 32, 6)
    for a, b in zip(mix._ssm_inputs(u1), mix._ssm_inputs(u2)):
        assert torch.equal(a, b)
    sel = Mixer(tiny())
    d1, d2 = sel._ssm_inputs(u1)[0], sel._ssm_inputs(u2)[0]
    assert not torch.allclose(d1, d2)
    m = MambaLM(tiny(selective=False))
    loss = m(torch.randint(0, 256, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    lti = m.backbone.layers[0].mixer
    for p in (lti.B_lti, lti.C_lti, lti.dt_bias, lti.A_log):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------- optimiser groups
def test_param_groups_flags():
    m = MambaLM(tiny(norm="layer", bias=True))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert not dn & nn_
    assert dn | nn_ == set(names.values())
    for n in nn_:
        assert n.endswith(("bias", "A_log", "D", "norm.weight", "norm_f.weight")), n
    for n in dn:
        assert n.endswith(("proj.weight", "conv1d.weight", "embedding.weight")), n
    assert "backbone.layers.0.mixer.A_log" in nn_ and "backbone.layers.0.mixer.in_proj.weight" in dn
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ----------------------------------------------------------------------- MLM masking
def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    ids = torch.randint(0, 256, (64, 512), generator=g)
    lengths = torch.randint(100, 513, (64,), generator=g)
    pad = torch.arange(512)[None] >= lengths[:, None]
    ids[pad] = 256
    ids[:, 0] = 258  # a CLS token is never masked either
    inputs, labels = mask_tokens(ids, lengths, generator=g)
    sel = labels != -100
    real = (~pad).sum() - 64
    assert not sel[pad].any() and not sel[:, 0].any()
    assert torch.equal(labels[sel], ids[sel])
    assert torch.equal(inputs[~sel], ids[~sel])
    n = sel.sum().item()

    def tol(p, count):  # 5 binomial standard errors: a fresh seed fails ~1 run in 10^6
        return 5 * (p * (1 - p) / count) ** 0.5

    assert abs(n / real - 0.15) < tol(0.15, real.item())
    masked = (inputs[sel] == 257).float().mean().item()
    kept = (inputs[sel] == ids[sel]).float().mean().item()
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) < tol(0.8, n)
    # a random replacement equals the original 1/256 of the time
    assert abs(kept - (0.1 + 0.1 / 256)) < tol(0.1, n)
    assert abs(randomised - 0.1 * 255 / 256) < tol(0.1, n)
    assert inputs[sel].max() <= 257 and (inputs[sel] != 257).logical_and(inputs[sel] >= 256).sum() == 0


def test_masked_lm_trains_one_step(rng_seed):
    m = MaskedLM(tiny(bidirectional=True))
    ids = torch.randint(0, 256, (2, 12))
    inputs, labels = mask_tokens(ids, prob=0.5)
    logits = m(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert m.backbone.layers[0].mixer.mamba_rev.x_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bidirectional"):
        MaskedLM(tiny())


def test_pool_factors_build_a_multiscale_backbone_and_refuse_bidirectional():
    """Details (causality, step == forward, cache) are in tests/test_multiscale.py."""
    assert hasattr(Backbone(tiny(pool_factors=[4])), "pools")
    with pytest.raises(ValueError, match="pool_factors"):
        tiny(pool_factors=[4], bidirectional=True)


@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last"])
def test_classifier_pooling_ignores_padding(rng_seed, pooling):
    clf = SequenceClassifier(tiny(bidirectional=True), num_classes=4, pooling=pooling)
    ids = torch.randint(0, 256, (3, 9))
    lengths = torch.tensor([9, 3, 6])
    ids[1, 3:] = 256
    ids[2, 6:] = 256
    with torch.no_grad():
        logits = clf(ids, lengths)
        emb = clf.embed(ids, lengths)
        assert logits.shape == (3, 4) and emb.shape == (3, 16)
        for b, n in enumerate(lengths.tolist()):
            close(logits[b], clf(ids[b:b + 1, :n])[0])
            close(emb[b], clf.embed(ids[b:b + 1, :n])[0])


def test_padded_batch_gradients_equal_per_sequence_gradients(rng_seed):
    bb = Backbone(tiny(bidirectional=True, n_layer=1))
    ids = torch.randint(0, 256, (2, 8))
    lengths = torch.tensor([8, 5])
    ids[1, 5:] = 256
    w = torch.randn(8, 16)  # a fixed readout so the loss weighs positions differently

    def grads(loss):
        bb.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in bb.named_parameters()}

    mask = (torch.arange(8) < lengths[:, None])[..., None]
    batched = grads((bb(ids, lengths=lengths) * w * mask).sum())
    alone = grads(sum((bb(ids[b:b + 1, :n]) * w[:n]).sum() for b, n in enumerate(lengths.tolist())))
    for n in batched:
        close(batched[n], alone[n], rtol=1e-3)


# ----------------------------------------------------------------------- Triton conv path
def _triton_runs_here():
    import os

    from seqlab.kernels import triton_available
    return triton_available() and (torch.cuda.is_available()
                                   or os.environ.get("TRITON_INTERPRET", "0") == "1")


@pytest.mark.skipif(not _triton_runs_here(), reason="needs triton and CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional-lengths"])
def test_triton_conv_path_equals_torch_path(rng_seed, monkeypatch, bidirectional):
    """scan_impl="triton" (Triton conv + SiLU and scan, channels-last) equals scan_impl="torch"
    on the same weights: outputs and the gradients of the input and every parameter.
    On the CPU through the Triton interpreter; on CUDA where there is a GPU."""
    from seqlab.kernels import last_impl
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the torch path's F.conv1d
    # the module path (the fused mixer, tested in test_fused_mixer.py, bypasses these modules)
    kw = dict(d_conv=4, bidirectional=bidirectional, fused_mixer=False)
    cls = BiMixer if bidirectional else Mixer
    ref, tri = cls(tiny(**kw)), cls(tiny(**kw, scan_impl="triton"))
    with torch.no_grad():  # a non-trivial conv: the default init is small
        for m in ref.modules():
            if isinstance(m, Mixer):
                m.conv1d.weight.mul_(3)
    tri.load_state_dict(ref.state_dict())
    ref, tri = ref.to(dev), tri.to(dev)
    x = torch.randn(3, 11, 16, device=dev)
    lengths = torch.tensor([11, 4, 7], device=dev) if bidirectional else None
    w = torch.randn(3, 11, 16, device=dev)
    x_proj_inputs = []
    for m in tri.modules():
        if isinstance(m, Mixer):
            m.x_proj.register_forward_pre_hook(lambda mod, args: x_proj_inputs.append(args[0]))
    results = []
    for m in (tri, ref):
        xx = x.clone().requires_grad_(True)
        out = m(xx, lengths=lengths)
        (out * w).sum().backward()
        results.append((out.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters()}))
        if m is tri:
            assert last_impl("causal_conv1d") == "triton"
    # u is channels-last: x_proj reads u.transpose(1, 2) without a copy
    assert x_proj_inputs and all(t.is_contiguous() for t in x_proj_inputs)
    (out_t, gx_t, gp_t), (out_r, gx_r, gp_r) = results
    close(out_t, out_r)
    close(gx_t, gx_r)
    assert gp_t.keys() == gp_r.keys()
    for n in gp_r:
        close(gp_t[n], gp_r[n], rtol=2e-4)


def test_rmsnorm_function_matches_plain_ops_and_gradcheck():
    """The memory-saving RMSNorm (saves x and 1/rms only) against the composed formula."""
    from seqlab.model.norm import RMSNorm, RMSNormFn
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFn.apply(a, b, 1e-5), (x, w))
    norm = RMSNorm(7)
    with torch.no_grad():
        norm.weight.copy_(w.float())
    xf = x.detach().float().requires_grad_(True)
    y = norm(xf)
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (xf, norm.weight), g)
    rdx, rdw = torch.autograd.grad(ref, (xf, norm.weight), g)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)


def test_step_constants_follow_parameter_updates():
    """Mixer.step caches -exp(A_log), D and the Δ bias; an in-place update of any of them (an
    optimizer step, load_state_dict) must be seen by the next step."""
    torch.manual_seed(0)
    m = Mixer(tiny())
    with torch.no_grad():
        cache = m.allocate_cache(2)
        x = torch.randn(2, m.d_model)
        m.step(x, cache)
        A0, D0, b0 = m._step_constants()
        assert A0 is m._step_constants()[0]  # cached between steps
        m.A_log.add_(0.5)
        m.D.mul_(2.0)
        m.dt_proj.bias.sub_(1.0)
        A1, D1, b1 = m._step_constants()
        torch.testing.assert_close(A1, -torch.exp(m.A_log.float()))
        torch.testing.assert_close(D1, m.D.float())
        torch.testing.assert_close(b1, m.dt_proj.bias.float())
        assert not torch.equal(A0, A1)
        # the step itself uses the updated values: equal to an uncached module's step
        fresh = Mixer(tiny())
        fresh.load_state_dict(m.state_dict())
        c1, c2 = m.allocate_cache(2), fresh.allocate_cache(2)
        torch.testing.assert_close(m.step(x, c1), fresh.step(x, c2))
