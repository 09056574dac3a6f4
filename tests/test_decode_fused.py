"""The fused Triton decoding step (two kernels per layer + head) against the per-op step.

Runs under TRITON_INTERPRET=1 on the CPU (conftest) and natively on a GPU. Every case starts
from random (non-zero) caches and random non-initial weights, takes several steps, and
compares logits and both cache tensors of every layer.
"""
import os

import pytest
import torch

from seqlab.generation import generate
from seqlab.kernels import last_impl
from seqlab.model import MambaConfig, MambaLM
from seqlab.model.decode import fused_step_reason

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(dtype=torch.float32, **kw):
    """decode_step="fused": the fused kernels at every batch size here (auto hands large
    batches and wide models to the per-op step)."""
    base = dict(d_model=32, n_layer=2, vocab_size=256, scan_impl="triton", decode_step="fused")
    base.update(kw)
    cfg = MambaConfig(**base)
    m = MambaLM(cfg, device=DEV, dtype=dtype).eval()
    with torch.no_grad():
        for p in m.parameters():  # move every parameter off its initial value (D = 1, biases 0)
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _random_cache(m, batch, dtype):
    cache = m.allocate_cache(batch, dtype)
    for conv, ssm in cache:
        conv.normal_()
        ssm.normal_()
    return cache, [(a.clone(), b.clone()) for a, b in cache]


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("kw", [
    {},
    {"norm": "layer"},
    {"d_model": 40, "d_state": 4, "dt_rank": 3, "d_conv": 3, "bias": True, "conv_bias": False},
    {"d_model": 24, "d_state": 16, "d_conv": 2, "pad_vocab_size_multiple": 1, "vocab_size": 261,
     "tie_embeddings": False},
], ids=["rms", "layernorm", "odd-sizes-bias", "untied-k2"])
def test_fused_step_equals_per_op_step(batch, kw, monkeypatch):
    if kw.get("norm") == "layer":
        # Also cover rows wider than one block (two passes over the partials).
        import seqlab.kernels.decode.mixer_step as mst
        monkeypatch.setattr(mst, "MAX_ROW_BLOCK", 16)
    if kw.get("bias"):
        # Also cover the last-program reductions at batch < 16 (wide models use them).
        import seqlab.kernels.decode.mixer_step as mst
        monkeypatch.setattr(mst, "LAST_MIN_D_MODEL", 0)
    torch.manual_seed(batch)
    m = _model(**kw)
    assert fused_step_reason(m, DEV) is None
    fused, ref = _random_cache(m, batch, torch.float32)
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(0, m.config.vocab_size, (batch,), device=DEV)
            lf = m.step(ids, fused)
            assert last_impl("lm_step") == "fused_triton"
            lr = m.step_per_op(ids, ref)
            assert lf.dtype == torch.float32 and lf.shape == lr.shape
            assert torch.isfinite(lf).all()
            torch.testing.assert_close(lf, lr.float(), atol=2e-5, rtol=1e-4)
            for (cf, sf), (cr, sr) in zip(fused, ref):
                torch.testing.assert_close(cf, cr, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(sf, sr, atol=2e-5, rtol=1e-4)
    # The state actually moved (a kernel that skipped the update would fail above only
    # if the per-op path moved it: check that it did).
    assert not torch.equal(ref[0][1], _random_cache(m, batch, torch.float32)[0][0][1])


@pytest.mark.parametrize("batch", [2, 16])
def test_fused_step_bf16_weights_close_to_per_op(batch):
    torch.manual_seed(3)
    m = _model(dtype=torch.bfloat16)
    fused, ref = _random_cache(m, batch, torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            ids = torch.randint(0, 256, (batch,), device=DEV)
            lf = m.step(ids, fused)
            lr = m.step_per_op(ids, ref).float()
            # bf16 rounding of the per-op path's intermediates: compare at that scale.
            assert (lf - lr).abs().max().item() < 0.05 * lr.abs().max().item() + 1e-2
            for (cf, sf), (cr, sr) in zip(fused, ref):
                assert (sf - sr).abs().max().item() < 0.05 * sr.abs().max().item() + 1e-2


def test_fused_step_is_chosen_only_where_it_applies(monkeypatch):
    import seqlab.model.decode as dec
    m = _model(decode_step="auto")
    big = dec.FUSED_MAX_BATCH + 1
    # On a GPU a narrow model at a small batch takes the persistent form of the fused step.
    small = ("persistent_triton" if DEV.type == "cuda"
             and os.environ.get("TRITON_INTERPRET", "0") != "1" else "fused_triton")
    with torch.no_grad():  # a narrow model: fused at small batches, per-op above
        m.step(torch.zeros(1, dtype=torch.long, device=DEV), m.allocate_cache(1))
        assert last_impl("lm_step") == small
        m.step(torch.zeros(big, dtype=torch.long, device=DEV), m.allocate_cache(big))
        assert last_impl("lm_step") == "per_op"
    monkeypatch.setattr(dec, "PER_OP_MIN_D_MODEL", 32)
    monkeypatch.setattr(dec, "PERSIST_MAX_D_MODEL", 16)  # the two-kernel form from here on
    with torch.no_grad():  # a wide model: fused at small batches, unless graph-captured
        m.step(torch.zeros(1, dtype=torch.long, device=DEV), m.allocate_cache(1))
        assert last_impl("lm_step") == "fused_triton"
        m.step(torch.zeros(1, dtype=torch.long, device=DEV), m.allocate_cache(1),
               for_graph=True)
        assert last_impl("lm_step") == "per_op"
        m.step(torch.zeros(1, dtype=torch.long, device=DEV), m.allocate_cache(1))
        assert last_impl("lm_step") == "fused_triton"
        m.config.decode_step = "per_op"
        m.step(torch.zeros(1, dtype=torch.long, device=DEV), m.allocate_cache(1))
        assert last_impl("lm_step") == "per_op"
        with pytest.raises(ValueError, match="does not apply"):
            _model(selective=False).step(torch.zeros(1, dtype=torch.long, device=DEV),
                                         _model(selective=False).allocate_cache(1))
        m.config.decode_step = "fastest"
        with pytest.raises(ValueError, match="decode_step"):
            m.step(torch.zeros(1, dtype=torch.long, device=DEV), m.allocate_cache(1))
        with pytest.raises(ValueError, match="decode_step"):
            MambaConfig(decode_step="fastest")
    m.config.decode_step = "auto"
    assert fused_step_reason(m, DEV) is None
    assert "LTI" in fused_step_reason(_model(selective=False), DEV)
    torch_impl = _model(scan_impl="torch", decode_step="auto")
    assert fused_step_reason(torch_impl, DEV) is not None
    cache = torch_impl.allocate_cache(1)
    torch_impl.step(torch.zeros(1, dtype=torch.long, device=DEV), cache)
    assert last_impl("lm_step") == "per_op"


def greedy_generation_equals_full_forward(m, new: int, cuda_graph: bool, impl: str):
    """Greedy generate() from a 5-id prompt took step ``impl`` and picked, at every position,
    the argmax of the full (parallel-scan) forward over the generated sequence."""
    prompt = torch.randint(0, 256, (2, 5), device=DEV)
    out = generate(m, prompt, new, temperature=0, cuda_graph=cuda_graph)
    assert last_impl("lm_step") == impl
    with torch.no_grad():
        logits = m(out)
    torch.testing.assert_close(logits[:, 4:-1, :256].argmax(-1), out[:, 5:])
    return prompt


def test_greedy_generation_with_fused_steps_equals_full_forward():
    torch.manual_seed(0)
    greedy_generation_equals_full_forward(_model(), 6, False, "fused_triton")
