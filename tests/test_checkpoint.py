"""seqlab.checkpoint: own-format round trips, atomic writes, key checks, safe unpickling, and
conversion of transformers / mamba_ssm / Caduceus checkpoints (built here, never downloaded).

Every foreign model's parameters are perturbed with noise before saving, so a mapping that
swaps, transposes or drops a tensor (dt bias, A_log, D, norms...) changes the logits.
"""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqlab import checkpoint as ckpt
from seqlab.checkpoint import load_model, load_pretrained, save_model
from seqlab.model.config import MambaConfig

from seqlab.model import Backbone, MaskedLM, MambaLM, SequenceClassifier

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


def test_caduceus_rcps_is_refused_naming_keys(tmp_path):
    state = {"caduceus.backbone.embeddings.word_embeddings.embedding.weight": torch.zeros(64, 32),
             "caduceus.backbone.layers.0.mixer.submodule.mamba_fwd.A_log": torch.zeros(64, 8)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(caduceus_config(rcps=True)))
    with pytest.raises(NotImplementedError, match=r"mixer\.submodule\.mamba_fwd\.A_log"):
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
