"""seqlab.training.checkpoint and the one loader (seqlab.training.pretrained): own-format round
trips, atomic writes, key checks, safe unpickling; run directories, step folders and the
format_version 0 trainer layout opened by load_pretrained; and conversion of transformers /
mamba_ssm / Caduceus checkpoints (built here, never downloaded).

Every foreign model's parameters are perturbed with noise before saving, so a mapping that
swaps, transposes or drops a tensor (dt bias, A_log, D, norms...) changes the logits.
"""
import json
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import seqlab
from helpers.old_checkpoints import write_v0_checkpoint
from seqlab.model.config import MambaConfig
from seqlab.training import checkpoint as ckpt
from seqlab.training.checkpoint import save_model, write_checksums
from seqlab.training.pretrained import load_model, load_pretrained
from seqlab.training.trainer import Task, Trainer, TrainerConfig

from seqlab.model import Backbone, MaskedLM, MambaLM, SequenceClassifier
from seqlab.model.mixer import Mixer

HF_VOCAB = 64


def tiny(**overrides) -> MambaConfig:
    kw = dict(d_model=32, n_layer=2, vocab_size=60, d_state=8)
    kw.update(overrides)
    return MambaConfig(**kw)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # tied parameters appear once
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def ids(batch=2, length=12, vocab=60, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def saved_keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ============================================================================ own format
def test_mamba_lm_round_trip_identical_logits(tmp_path, rng_seed):
    config = tiny()
    model = perturb(MambaLM(config), rng_seed)
    x = ids()
    save_model(model, tmp_path / "ck", config, extra={"step": 7, "tokenizer": "bytes"})

    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    assert "lm_head.weight" not in saved_keys(tmp_path / "ck")  # tied: stored once
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["architecture"] == "MambaLM" and meta["ties"] == {"lm_head.weight":
                                                                  "backbone.embedding.weight"}

    loaded, info = load_model(tmp_path / "ck")
    assert info["model"] == config and info["extra"] == {"step": 7, "tokenizer": "bytes"}
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # load_pretrained recognises seqlab's own format too.
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "ck")(x), model(x))


@pytest.mark.parametrize("rc", [False, True], ids=["bi", "bi-rc-conjoin"])
def test_bidirectional_classifier_round_trip(tmp_path, rng_seed, rc):
    # RC needs the byte vocabulary: the complement table indexes ord("t") = 116.
    config = tiny(bidirectional=True, rc_equivariant=rc, vocab_size=260 if rc else 60)
    model = perturb(SequenceClassifier(config, num_classes=3, pooling="max", conjoin_rc=rc),
                    rng_seed)
    x = ids()
    save_model(model, tmp_path / "cls", config)
    keys = saved_keys(tmp_path / "cls")
    rev_in = [k for k in keys if "mamba_rev.in_proj" in k]
    assert not rev_in, f"tied reverse projections stored twice: {rev_in}"

    loaded, info = load_model(tmp_path / "cls")
    assert type(loaded) is SequenceClassifier
    assert info["head"] == {"num_classes": 3, "pooling": "max", "conjoin_rc": rc, "dropout": 0.0}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_failed_write_leaves_no_complete_looking_directory(tmp_path, monkeypatch):
    config = tiny()
    model = MambaLM(config)

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a truncated file, as a crash would leave
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "ck", config)
    assert os.listdir(tmp_path) == []

    # With a previous checkpoint in place, a failed overwrite keeps the old one loadable.
    monkeypatch.undo()
    save_model(model, tmp_path / "ck", config, extra={"step": 1})
    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "ck", config, extra={"step": 2})
    assert os.listdir(tmp_path) == ["ck"]
    assert load_model(tmp_path / "ck")[1]["extra"] == {"step": 1}


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "genome.fa").write_text(">chr1\nACGT\n")
    with pytest.raises(FileExistsError, match="not a seqlab checkpoint"):
        save_model(MambaLM(tiny()), tmp_path / "data", tiny())
    assert (tmp_path / "data" / "genome.fa").exists()


def test_missing_and_unexpected_keys_are_named(tmp_path):
    config = tiny()
    save_model(MambaLM(config), tmp_path / "ck", config)
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    del state["backbone.layers.1.mixer.A_log"]
    state["backbone.layers.1.mixer.A_log_typo"] = torch.zeros(3)
    save_file(state, str(path), metadata={"ties": json.dumps({"lm_head.weight":
                                                              "backbone.embedding.weight"})})
    write_checksums(tmp_path / "ck")  # an intact file whose keys do not fit the model
    with pytest.raises(KeyError) as err:
        load_model(tmp_path / "ck")
    assert "backbone.layers.1.mixer.A_log'" in str(err.value)
    assert "A_log_typo" in str(err.value)


# ============================================================================ safety
class _Exploit:
    marker = None

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2,
                                                      "vocab_size": 60}))
    torch.save({"backbone.embedding.weight": torch.zeros(64, 32), "evil": _Exploit()},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_pretrained(tmp_path)
    assert not marker.exists()


def test_unknown_format_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_dim": 8}))
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


# ============================================================================ transformers
@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=HF_VOCAB,
                                      state_size=8, time_step_rank=2, expand=2, conv_kernel=4)
    return perturb(transformers.MambaForCausalLM(config), seed=1234)


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def test_transformers_checkpoint_matches(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert type(model) is MambaLM
    x = ids(vocab=HF_VOCAB, seed=3)
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == (2, 12, HF_VOCAB)
    torch.testing.assert_close(ours, hf_logits(hf_model, x), rtol=1e-4, atol=1e-4)


def test_transformers_greedy_decoding_matches(hf_model, tmp_path):
    from seqlab.generation import generate
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    prompt = ids(batch=1, length=5, vocab=HF_VOCAB, seed=4)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=8, do_sample=False)
    ours = generate(model, prompt, max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    assert torch.equal(ours[:, -8:], theirs[:, -8:])


# ============================================================================ mamba_ssm
def write_mamba_ssm(hf_model, directory, vocab_size=60, extra_keys=None, **config_overrides):
    """hf_model's weights under mamba_ssm's names, as state-spaces/mamba-* are published."""
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v
             for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # torch.save keeps the tie
    state.update(extra_keys or {})
    directory.mkdir(exist_ok=True)
    torch.save(state, directory / "pytorch_model.bin")
    config = {"d_model": 32, "n_layer": 2, "vocab_size": vocab_size,
              "ssm_cfg": {"d_state": 8, "d_conv": 4, "expand": 2, "dt_rank": 2},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    config.update(config_overrides)
    (directory / "config.json").write_text(json.dumps(config))


def test_mamba_ssm_checkpoint_matches(hf_model, tmp_path):
    # vocab 60 padded to a multiple of 8 gives the file's 64 rows, like mamba-130m's 50277 -> 50280.
    write_mamba_ssm(hf_model, tmp_path)
    model = load_pretrained(tmp_path)
    x = ids(vocab=60, seed=5)
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(ours, hf_logits(hf_model, x), rtol=1e-4, atol=1e-4)


def test_mamba_ssm_vocab_rows_cropped_or_rejected(hf_model, tmp_path):
    # No padding asked for: only the padding rows 60..63 are dropped.
    write_mamba_ssm(hf_model, tmp_path / "crop", pad_vocab_size_multiple=1)
    model = load_pretrained(tmp_path / "crop")
    x = ids(vocab=60, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_logits(hf_model, x)[..., :60],
                                   rtol=1e-4, atol=1e-4)
    # A vocabulary larger than the file's rows cannot be right.
    write_mamba_ssm(hf_model, tmp_path / "short", vocab_size=70, pad_vocab_size_multiple=1)
    with pytest.raises(ValueError, match="64 rows but the config's vocab_size is 70"):
        load_pretrained(tmp_path / "short")


def test_mamba_ssm_unknown_key_is_named(hf_model, tmp_path):
    write_mamba_ssm(hf_model, tmp_path, extra_keys={"backbone.layers.0.mlp.fc1.weight":
                                                    torch.zeros(4, 32)})
    with pytest.raises(KeyError, match=r"backbone\.layers\.0\.mlp\.fc1\.weight"):
        load_pretrained(tmp_path)


# ============================================================================ Caduceus
def to_caduceus(state: dict) -> dict:
    """seqlab MaskedLM names -> CaduceusForMaskedLM names (the inverse of the key table)."""
    out = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            k = "caduceus." + k.replace("backbone.embedding.", "backbone.embeddings.word_embeddings.")
        out[k] = v.clone()
    return out


def caduceus_config(**overrides):
    config = {"model_type": "caduceus", "d_model": 32, "n_layer": 2, "vocab_size": 60,
              "ssm_cfg": {"d_state": 8, "d_conv": 4, "expand": 2}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
              "bidirectional": True, "bidirectional_strategy": "add",
              "bidirectional_weight_tie": True, "rcps": False}
    config.update(overrides)
    return config


def test_caduceus_bidirectional_masked_lm(tmp_path, rng_seed):
    config = tiny(bidirectional=True)
    reference = perturb(MaskedLM(config), rng_seed)
    state = to_caduceus(reference.state_dict())
    # Caduceus' tied reverse projections: drop the aliases as a safetensors save does.
    state = {k: v for k, v in state.items()
             if not ("mamba_rev" in k and ("in_proj" in k or "out_proj" in k))}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(caduceus_config()))
    model = load_pretrained(tmp_path)
    assert type(model) is MaskedLM
    x = ids(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_caduceus_bare_backbone(tmp_path, rng_seed):
    config = tiny(bidirectional=True, tie_bidirectional_projections=False,
                  bidirectional_strategy="mul")
    reference = perturb(Backbone(config), rng_seed)
    state = {k.replace("embedding.", "embeddings.word_embeddings."): v.clone()
             for k, v in reference.state_dict().items()}
    save_file({f"backbone.{k}": v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(caduceus_config(
        bidirectional_weight_tie=False, bidirectional_strategy="ew_multiply")))
    model = load_pretrained(tmp_path)
    assert type(model) is Backbone
    x = ids(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


# -- Caduceus RCPS ('caduceus-ps') -------------------------------------------------------------
# Caduceus' character tokenizer: [CLS] 0, [SEP] 1, [BOS] 2, [MASK] 3, [PAD] 4, [RESERVED] 5,
# [UNK] 6, A 7, C 8, G 9, T 10, N 11; rows 12..15 pad the vocabulary to a multiple of 8. The
# complement map is the published checkpoints' config.json one.
CADUCEUS_VOCAB = 16
CADUCEUS_COMPLEMENT = {**{i: i for i in range(CADUCEUS_VOCAB)}, 7: 10, 8: 9, 9: 8, 10: 7}


class CaduceusPSReference(torch.nn.Module):
    """Plain-torch re-implementation of CaduceusForMaskedLM with rcps=True, written from
    Caduceus' modeling_rcps.py / modeling_caduceus.py (RCPSEmbedding, RCPSMambaBlock with and
    without fused_add_norm, RCPSAddNormWrapper, RCPSWrapper(BiMambaWrapper), RCPSLMHead tied
    to the embedding). The Mamba mixers are seqlab ``Mixer`` modules of width d (one strand);
    BiMambaWrapper's reverse direction is run the Caduceus way, on flipped copies."""

    def __init__(self, d: int, n_layer: int, fused: bool, seed: int):
        super().__init__()
        half = MambaConfig(d_model=d, d_state=8, scan_impl="torch")
        self.d, self.n_layer, self.fused = d, n_layer, fused
        self.register_buffer("comp", torch.tensor(list(CADUCEUS_COMPLEMENT.values())))
        self.embedding = torch.nn.Parameter(torch.randn(CADUCEUS_VOCAB, d) * 0.5)
        self.norms = torch.nn.ParameterList(torch.nn.Parameter(torch.ones(d)) for _ in range(n_layer))
        self.norm_f = torch.nn.Parameter(torch.ones(d))
        self.fwd = torch.nn.ModuleList(Mixer(half) for _ in range(n_layer))
        self.rev = torch.nn.ModuleList(Mixer(half) for _ in range(n_layer))
        for f, r in zip(self.fwd, self.rev):  # bidirectional_weight_tie
            r.in_proj.weight, r.out_proj.weight = f.in_proj.weight, f.out_proj.weight
        perturb(self, seed, scale=0.2)

    @staticmethod
    def rc(x):  # RCPSWrapper.rc: flip length and channels
        return x.flip(-2, -1)

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def bimamba(self, i, x):  # BiMambaWrapper, strategy "add"
        return self.fwd[i](x) + self.rev[i](x.flip(1)).flip(1)

    def forward(self, ids, head=True):
        d, rc = self.d, self.rc
        W = self.embedding
        # RCPSEmbedding: gather the complement at the flipped ids, embed, flip length + channels.
        h = torch.cat([W[ids], rc(W[self.comp[ids.flip(-1)]])], dim=-1)
        r = None
        for i in range(self.n_layer):
            if self.fused:  # RCPSMambaBlock's fused_add_norm branch (second half first)
                a_f = h[..., d:] + (0 if r is None else r[..., d:])
                a_r = rc(h[..., :d]) + (0 if r is None else rc(r[..., :d]))
            else:  # RCPSAddNormWrapper
                a_f = h[..., :d] + (0 if r is None else r[..., :d])
                a_r = rc(h[..., d:]) + (0 if r is None else rc(r[..., d:]))
            r = torch.cat([a_f, rc(a_r)], dim=-1)
            h = torch.cat([self.rms(a_f, self.norms[i]), rc(self.rms(a_r, self.norms[i]))], dim=-1)
            # RCPSWrapper(BiMambaWrapper)
            h = torch.cat([self.bimamba(i, h[..., :d]), rc(self.bimamba(i, rc(h[..., d:])))], dim=-1)
        # norm_f: first half forward in both layouts
        a_f, a_r = h[..., :d] + r[..., :d], rc(h[..., d:] + r[..., d:])
        h = torch.cat([self.rms(a_f, self.norm_f), rc(self.rms(a_r, self.norm_f))], dim=-1)
        if not head:
            return h
        # RCPSLMHead, weight tied to the embedding
        return F.linear(h[..., :d], W) + F.linear(h[..., d:].flip(-1), W[self.comp])

    def caduceus_state(self, masked_lm: bool = True, head_weight: bool = False) -> dict:
        """State dict under Caduceus' names (tied tensors once, as a safetensors save keeps)."""
        p = "caduceus.backbone." if masked_lm else "backbone."
        norm = "norm" if self.fused else "norm.submodule"
        st = {f"{p}embeddings.word_embeddings.embedding.weight": self.embedding,
              f"{p}embeddings.word_embeddings.complement_map": self.comp,
              f"{p}norm_f.weight" if self.fused else f"{p}norm_f.submodule.weight": self.norm_f}
        for i in range(self.n_layer):
            st[f"{p}layers.{i}.{norm}.weight"] = self.norms[i]
            for direction, mixers in (("mamba_fwd", self.fwd), ("mamba_rev", self.rev)):
                for name, t in mixers[i].state_dict().items():
                    if direction == "mamba_rev" and name.startswith(("in_proj", "out_proj")):
                        continue
                    st[f"{p}layers.{i}.mixer.submodule.{direction}.{name}"] = t
        if masked_lm:
            st["lm_head.complement_map"] = self.comp
            if head_weight:
                st["lm_head.lm_head.weight"] = self.embedding
        return {k: v.detach().clone().contiguous() for k, v in st.items()}


def caduceus_ps_config(d: int, n_layer: int, fused: bool, **overrides) -> dict:
    return caduceus_config(d_model=d, n_layer=n_layer, vocab_size=CADUCEUS_VOCAB, rcps=True,
                           fused_add_norm=fused, residual_in_fp32=False,
                           complement_map={str(k): v for k, v in CADUCEUS_COMPLEMENT.items()},
                           **overrides)


def caduceus_ids(batch=2, length=12, seed=0):
    return torch.randint(0, 12, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused,n_layer,pickled", [(True, 2, False), (False, 2, False),
                                                   (True, 3, True)])
def test_caduceus_rcps_masked_lm_matches_reference(tmp_path, rng_seed, fused, n_layer, pickled):
    from seqlab.model.rc import reverse_complement
    reference = CaduceusPSReference(d=16, n_layer=n_layer, fused=fused, seed=rng_seed).eval()
    state = reference.caduceus_state(head_weight=not pickled)
    if pickled:
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(caduceus_ps_config(16, n_layer, fused)))
    model = load_pretrained(tmp_path)
    assert type(model) is MaskedLM and model.config.rc_equivariant and model.config.d_model == 32
    x = caduceus_ids(seed=rng_seed % 1000)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(logits, reference(x), rtol=1e-5, atol=1e-5)
        # RC equivariance on Caduceus' ids: logits(RC x) = position-reversed, complement-permuted.
        comp = reference.comp
        logits_rc = model(reverse_complement(x, table=comp))
        torch.testing.assert_close(logits_rc.flip(1)[..., comp], logits, rtol=1e-5, atol=1e-5)
    if fused and n_layer == 2:  # seqlab's own format keeps the complement table
        save_model(model, tmp_path / "seqlab", model.config)
        again, _ = load_model(tmp_path / "seqlab")
        assert torch.equal(again.lm_head.complement, comp)
        with torch.no_grad():
            torch.testing.assert_close(again(x), logits, rtol=0, atol=0)


def test_caduceus_rcps_bare_backbone_matches_reference(tmp_path, rng_seed):
    reference = CaduceusPSReference(d=16, n_layer=3, fused=True, seed=rng_seed).eval()
    save_file(reference.caduceus_state(masked_lm=False), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(caduceus_ps_config(16, 3, True)))
    model = load_pretrained(tmp_path)
    assert type(model) is Backbone
    x = caduceus_ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x, head=False), rtol=1e-5, atol=1e-5)


def test_caduceus_rcps_bad_keys_are_named(tmp_path):
    reference = CaduceusPSReference(d=8, n_layer=2, fused=True, seed=0)
    state = reference.caduceus_state()
    (tmp_path / "config.json").write_text(json.dumps(caduceus_ps_config(8, 2, True)))
    extra = dict(state, **{"caduceus.backbone.layers.0.mixer.submodule.bogus": torch.zeros(1)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.0\.mixer\.submodule\.bogus"):
        load_pretrained(tmp_path)
    missing = {k: v for k, v in state.items() if not k.endswith("layers.1.mixer.submodule.mamba_fwd.D")}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.\d\.mixer\.submodule\.mamba_(fwd|rev)\.D"):
        load_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(caduceus_ps_config(8, 2, False)))
    with pytest.raises(ValueError, match="fused_add_norm"):
        load_pretrained(tmp_path)


def test_transformers_untied_sharded_bfloat16(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=HF_VOCAB,
                                      state_size=8, use_conv_bias=False, use_bias=True,
                                      tie_word_embeddings=False)
    hf = perturb(transformers.MambaForCausalLM(config), seed=99)
    assert not torch.equal(hf.lm_head.weight, hf.backbone.embeddings.weight)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_pretrained(tmp_path)
    assert model.lm_head.weight.data_ptr() != model.backbone.embedding.weight.data_ptr()
    x = ids(vocab=HF_VOCAB, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_logits(hf, x), rtol=1e-4, atol=1e-4)
    half = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/../../outside.safetensors"])
def test_sharded_index_cannot_reach_outside_its_folder(tmp_path, shard):
    """A downloaded checkpoint's weight index names files; none outside the folder is read."""
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 1,
                                                    "vocab_size": 260}))
    outside = tmp_path / "outside.safetensors"
    save_file({"backbone.embedding.weight": torch.zeros(260, 16)}, str(outside))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"backbone.embedding.weight": shard}}))
    with pytest.raises(ckpt.CheckpointError, match="refusing to read it") as err:
        load_pretrained(folder)
    assert shard in str(err.value)


def test_saved_model_is_verified_before_loading(tmp_path):
    config = tiny()
    save_model(MambaLM(config), tmp_path / "ck", config)
    assert (tmp_path / "ck" / "checksums.json").exists()
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: parses, but is not what was saved
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        load_model(tmp_path / "ck")


# ============================================================================ the one loader
class _LMTask(Task):
    """A tiny causal LM task for the Trainer: sample i is random ids seeded by i."""

    def __init__(self, config):
        self.config = config

    def build_model(self, device):
        return MambaLM(self.config, device=device)

    def checkpoint_extra(self):
        return {"window": 16}

    def train_batch(self, indices, device):
        ids = torch.stack([torch.randint(0, 60, (16,), generator=torch.Generator().manual_seed(i))
                           for i in indices])
        return SimpleNamespace(ids=ids.to(device))

    def loss(self, model, batch):
        logits = model(batch.ids).float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.ids[:, 1:].flatten())
        return loss, {"loss": loss.item()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm") / "run"
    cfg = TrainerConfig(max_steps=4, micro_batch_size=2, lr=1e-2, warmup_steps=1, log_every=2,
                        eval_every=0, ckpt_every=2, keep_checkpoints=2, device="cpu",
                        progress=False, seed=0)
    Trainer(cfg, run).fit(_LMTask(tiny()))
    return run


def test_trainer_checkpoints_are_the_one_format(trained_run):
    step = trained_run / "checkpoints" / "step_0000004"
    assert sorted(os.listdir(step)) == ["checksums.json", "config.json", "model.safetensors",
                                        "optimizer.pt", "trainer_state.json"]
    meta = json.loads((step / "config.json").read_text())
    assert meta["seqlab_version"] == seqlab.__version__ and meta["format_version"] == 1
    assert meta["architecture"] == "MambaLM" and MambaConfig.from_dict(meta["model"]) == tiny()
    assert meta["extra"] == {"window": 16} and meta["head"] == {}
    assert meta["ties"] == {"lm_head.weight": "backbone.embedding.weight"}
    assert "lm_head.weight" not in saved_keys(step)
    assert json.loads((step / "trainer_state.json").read_text())["step"] == 4


@pytest.mark.parametrize("where", ["run", "checkpoints", "step"])
def test_load_pretrained_opens_a_run_its_checkpoints_and_a_step_folder(trained_run, where):
    path = {"run": trained_run, "checkpoints": trained_run / "checkpoints",
            "step": trained_run / "checkpoints" / "step_0000004"}[where]
    model, info = load_model(path)
    assert type(model) is MambaLM and not model.training
    assert info["path"] == str(trained_run / "checkpoints" / "step_0000004")
    assert info["format"] == "seqlab" and info["extra"] == {"window": 16}
    assert model.lm_head.weight.data_ptr() == model.backbone.embedding.weight.data_ptr()
    x = ids()
    with torch.no_grad():
        assert torch.equal(load_pretrained(path)(x), model(x))
        older = load_pretrained(trained_run / "checkpoints" / "step_0000002")
        assert not torch.equal(older(x), model(x))
    assert seqlab.load_pretrained is load_pretrained


def test_run_whose_newest_checkpoint_is_corrupt_or_which_failed_says_what_it_loads(
        trained_run, tmp_path, caplog):
    import shutil

    from seqlab.training.rundir import RunDir
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    RunDir(run).set_status("failed", step=4, error="RuntimeError: simulated")
    with caplog.at_level("WARNING", logger="seqlab"):
        _, info = load_model(run)
    assert info["path"] == str(run / "checkpoints" / "step_0000002")
    assert "step_0000004" in caplog.text and "model.safetensors" in caplog.text
    line = [r.getMessage() for r in caplog.records if "loading its checkpoint" in r.getMessage()]
    assert len(line) == 1 and "failed at step 4" in line[0] and "step_0000002" in line[0]
    weights = run / "checkpoints" / "step_0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        load_model(run)


def test_format_0_trainer_checkpoints_still_load(tmp_path, rng_seed):
    """Checkpoints of the trainer layout of format_version 0 (config.json = the task's spec,
    no seqlab_version, no checksums) open through the same loader, their head kwargs and
    task info mapped onto the current layout."""
    config = tiny(bidirectional=True)
    cls = perturb(SequenceClassifier(config, num_classes=3, pooling="max"), rng_seed)
    run = tmp_path / "species_run"
    write_v0_checkpoint(cls, run / "checkpoints" / "step_0000003", {
        "architecture": "SequenceClassifier", "model": config.to_dict(), "num_classes": 3,
        "pooling": "max", "conjoin_rc": False, "classes": ["a", "b", "c"], "window": 64},
        optimizer=True)
    loaded, info = load_model(run)
    assert type(loaded) is SequenceClassifier and info["format_version"] == 0
    assert info["head"] == {"num_classes": 3, "pooling": "max", "conjoin_rc": False}
    assert info["extra"] == {"classes": ["a", "b", "c"], "window": 64}
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), cls(x))

    lm_config = tiny()
    lm = perturb(MambaLM(lm_config), rng_seed + 1)
    audio = {"rate": 16000, "encoding": "mulaw", "normalize": True, "clip_seconds": 0.25,
             "start_code": 128}
    folder = write_v0_checkpoint(lm, tmp_path / "step_0000010", {
        "architecture": "MambaLM", "model": lm_config.to_dict(), "audio": audio})
    loaded, info = load_model(folder)
    assert info["extra"] == {"audio": audio} and info["head"] == {}
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(x), lm(x))
