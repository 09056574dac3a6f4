"""The one-launch (persistent) decoding step against the per-op step and the two-kernel step.

On the CPU (TRITON_INTERPRET=1) the kernel runs phase by phase, one launch each: the same
code without the grid barriers, which the interpreter cannot run (its programs execute one
after another). On a GPU the persistent launch itself is compared with both references.
Every case starts from random caches and perturbed weights and takes several steps.
"""
import os

import pytest
import torch

from seqlab.generation import generate
from seqlab.kernels.decode import PersistentStep
from seqlab.model import MambaConfig, MambaLM
from seqlab.model.decode import lm_weights, step_path

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
gpu = pytest.mark.skipif(DEV.type != "cuda" or INTERP, reason="the persistent launch needs a GPU")


def _model(dtype=torch.float32, **kw):
    base = dict(d_model=32, n_layer=2, vocab_size=256, scan_impl="triton")
    base.update(kw)
    m = MambaLM(MambaConfig(**base), device=DEV, dtype=dtype).eval()
    with torch.no_grad():
        for p in m.parameters():  # off the initial values (D = 1, zero biases)
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _caches(m, batch, n, dtype=torch.float32):
    first = m.allocate_cache(batch, dtype)
    for conv, ssm in first:
        conv.normal_()
        ssm.normal_()
    return [first] + [[(a.clone(), b.clone()) for a, b in first] for _ in range(n - 1)]


def _close_caches(got, ref, tol=2e-5):
    for (cg, sg), (cr, sr) in zip(got, ref):
        torch.testing.assert_close(cg, cr, atol=tol, rtol=tol)
        torch.testing.assert_close(sg, sr, atol=tol, rtol=5 * tol)


CONFIGS = [
    {},
    {"norm": "layer", "n_layer": 3},
    {"d_model": 40, "d_state": 4, "dt_rank": 3, "d_conv": 3, "bias": True, "conv_bias": False},
    {"d_model": 24, "d_state": 16, "d_conv": 2, "pad_vocab_size_multiple": 1, "vocab_size": 261,
     "tie_embeddings": False},
]
IDS = ["rms", "layernorm-3-layers", "odd-sizes-bias", "untied-k2"]


@pytest.mark.parametrize("batch,kw", [(1, CONFIGS[0]), (3, CONFIGS[1]), (3, CONFIGS[2]),
                                      (1, CONFIGS[3])], ids=IDS)
def test_phased_step_equals_per_op_step(batch, kw):
    torch.manual_seed(batch)
    m = _model(**kw)
    got, ref = _caches(m, batch, 2)
    st = PersistentStep(lm_weights(m), got, batch, block_e=16, persist=False)
    assert st.P > 1  # several programs share the channels
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(0, m.config.vocab_size, (batch,), device=DEV)
            lg = st(ids)
            lr = m.step_per_op(ids, ref)
            assert lg.shape == lr.shape and torch.isfinite(lg).all()
            torch.testing.assert_close(lg, lr.float(), atol=2e-5, rtol=1e-4)
            _close_caches(got, ref)
    assert not torch.equal(ref[0][1], _caches(m, batch, 1)[0][0][1])  # the state moved


@pytest.mark.parametrize("noise", [False, True])
def test_phased_step_with_pick(noise):
    torch.manual_seed(4)
    m = _model()
    batch = 2
    plain, picked = _caches(m, batch, 2)
    ids = torch.randint(0, 256, (batch,), device=DEV)
    out = torch.full((batch, 5), -1, dtype=torch.long, device=DEV)
    nz = torch.randn(batch, 256, device=DEV) if noise else None
    inv = 0.5 if noise else 1.0
    with torch.no_grad():
        lg = PersistentStep(lm_weights(m), plain, batch, block_e=8, persist=False)(ids).clone()
        nxt = ids.clone()  # the step reads the ids, the pick overwrites them
        PersistentStep(lm_weights(m), picked, batch, block_e=8, persist=False)(
            nxt, (nz, inv, nxt, out, 3, 200))
    want = (lg[:, :200] * inv + (nz[:, :200] if noise else 0)).argmax(-1)
    torch.testing.assert_close(nxt, want)
    torch.testing.assert_close(out[:, 3], want)
    assert (out[:, [0, 1, 2, 4]] == -1).all()
    _close_caches(picked, plain, tol=0)


def test_persistent_launch_refused_by_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = _model()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        PersistentStep(lm_weights(m), m.allocate_cache(1), 1, persist=True)
    m.config.decode_step = "persistent"
    with pytest.raises(ValueError, match="do not fit|interpreted"):
        step_path(m, torch.zeros(1, dtype=torch.long, device=DEV))
    m.config.decode_step = "auto"
    assert step_path(m, torch.zeros(1, dtype=torch.long, device=DEV)) != "persistent"


def test_kept_steps_do_not_keep_models_alive():
    import gc
    import weakref

    from seqlab.model.decode import _PERSISTENT, persistent_step
    m = _model()
    st = persistent_step(m, m.allocate_cache(1), 1)
    assert persistent_step(m, st.cache, 1) is st  # same model, cache and batch: reused
    ref, n = weakref.ref(m), len(_PERSISTENT)
    del m, st
    gc.collect()
    assert ref() is None and len(_PERSISTENT) == n - 1


def test_layers_that_differ_are_refused():
    m = _model(n_layer=2)
    cache = m.allocate_cache(1)
    cache[1] = (cache[1][0].to(torch.float64), cache[1][1])  # one layer's conv state differs
    with pytest.raises(ValueError, match="layer 1 entry 13"):
        PersistentStep(lm_weights(m), cache, 1, persist=False)


# ----------------------------------------------------------------------------- GPU only
@gpu
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_persistent_step_equals_phased_and_per_op(batch, kw):
    torch.manual_seed(batch + 10)
    m = _model(**kw)
    pers, phased, ref = _caches(m, batch, 3)
    a = PersistentStep(lm_weights(m), pers, batch, block_e=8, persist=True)
    b = PersistentStep(lm_weights(m), phased, batch, block_e=8, persist=False)
    with torch.no_grad():
        for _ in range(20):  # many launches: the barrier counters must reset every time
            ids = torch.randint(0, m.config.vocab_size, (batch,), device=DEV)
            la, lb = a(ids).clone(), b(ids).clone()
            lr = m.step_per_op(ids, ref).float()
            torch.testing.assert_close(la, lb, atol=0, rtol=0)  # same arithmetic, same order
            torch.testing.assert_close(la, lr, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(a.bar, torch.zeros_like(a.bar))
    _close_caches(pers, phased, tol=0)
    _close_caches(pers, ref, tol=2e-4)


@gpu
def test_persistent_step_bf16_and_pick():
    torch.manual_seed(5)
    m = _model(dtype=torch.bfloat16, d_model=64, n_layer=3)
    batch = 2
    pers, fused = _caches(m, batch, 2, torch.bfloat16)
    a = PersistentStep(lm_weights(m), pers, batch, persist=True)
    b = PersistentStep(lm_weights(m), fused, batch, persist=False)
    out = torch.zeros(batch, 4, dtype=torch.long, device=DEV)
    ids_a = torch.randint(0, 256, (batch,), device=DEV)
    ids_b = ids_a.clone()
    with torch.no_grad():
        for s in range(4):
            nz = torch.randn(batch, 256, device=DEV)
            a(ids_a, (nz, 1.0, ids_a, out, s, 256))
            lb = b(ids_b).clone()
            ids_b = (lb[:, :256] + nz).argmax(-1)
            torch.testing.assert_close(ids_a, ids_b)
            torch.testing.assert_close(out[:, s], ids_b)


@gpu
def test_generation_takes_the_persistent_step():
    from test_decode_fused import greedy_generation_equals_full_forward
    torch.manual_seed(0)
    m = _model()
    prompt = greedy_generation_equals_full_forward(m, 40, True, "persistent_triton")
    a = generate(m, prompt, 40, temperature=0.8, seed=3, cuda_graph=True)
    b = generate(m, prompt, 40, temperature=0.8, seed=3, cuda_graph=False)
    torch.testing.assert_close(a, b)  # graphed and eager persistent steps sample alike
