"""Published checkpoints of other projects, converted into seqlab models through explicit key
tables (regex -> seqlab name).

Every key of the file must match a row, and every tensor the seqlab model expects must be
given, or the load fails naming the keys. Pickle files are only ever read with
``weights_only=True``. :func:`seqlab.training.pretrained.load_model` calls
:func:`load_foreign` for any folder whose config.json is not seqlab's.

    format      detected by (config.json)                  returns
    hf          model_type == "mamba" (transformers)       MambaLM
    caduceus    model_type == "caduceus" / "bidirectional" MaskedLM (or Backbone without a head);
                                                           RCPS ("caduceus-ps") as rc_equivariant
    mamba_ssm   "d_model" and "n_layer" (state-spaces)     MambaLM
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.config import MambaConfig
from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, build_model, confined_path, key_list,
                         load_state, rc_modules, read_safetensors)

# The Mamba-1 mixer's tensors, named as in mamba_ssm (and in seqlab and transformers).
_MIXER_TENSORS = (r"in_proj\.weight|in_proj\.bias|conv1d\.weight|conv1d\.bias|x_proj\.weight|"
                  r"dt_proj\.weight|dt_proj\.bias|A_log|D|out_proj\.weight|out_proj\.bias")
_NORM_TENSORS = r"weight|bias"


def load_foreign(directory: Path, meta: dict) -> tuple[torch.nn.Module, str]:
    """(model in float32 on the CPU, format name) from a published checkpoint folder whose
    config.json holds ``meta``; ValueError naming the folder when no format fits."""
    if meta.get("model_type") == "mamba":
        return _load_hf(directory, meta), "hf"
    if meta.get("model_type") == "caduceus" or "bidirectional" in meta or "rcps" in meta:
        return _load_caduceus(directory, meta), "caduceus"
    if "d_model" in meta and "n_layer" in meta:
        return _load_mamba_ssm(directory, meta), "mamba_ssm"
    raise ValueError(
        f"{directory / CONFIG_NAME}: no known checkpoint format. Expected one of: seqlab "
        "('seqlab_version', or 'architecture' and 'model' of a seqlab trainer), transformers "
        "Mamba (model_type 'mamba'), Caduceus (model_type 'caduceus'), mamba_ssm ('d_model' "
        f"and 'n_layer'); found keys {sorted(meta)}")


# -- mamba_ssm (state-spaces/mamba-130m ... 2.8b) --------------------------------------------
# Top-level config keys of mamba_ssm's MambaConfig that have no effect on the math.
_MAMBA_SSM_IGNORED = {"fused_add_norm", "architectures", "torch_dtype", "transformers_version"}
_SSM_CFG_MAP = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "dt_rank": "dt_rank",
                "dt_min": "dt_min", "dt_max": "dt_max", "dt_init": "dt_init", "dt_scale": "dt_scale",
                "dt_init_floor": "dt_init_floor", "conv_bias": "conv_bias", "bias": "bias"}
# ssm_cfg keys that select kernels, not math.
_SSM_CFG_IGNORED = {"layer", "use_fast_path"}

_MAMBA_SSM_KEYS = [
    (r"backbone\.embedding\.weight", "backbone.embedding.weight"),
    (rf"backbone\.layers\.(\d+)\.norm\.({_NORM_TENSORS})", r"backbone.layers.\1.norm.\2"),
    (rf"backbone\.layers\.(\d+)\.mixer\.({_MIXER_TENSORS})", r"backbone.layers.\1.mixer.\2"),
    (rf"backbone\.norm_f\.({_NORM_TENSORS})", r"backbone.norm_f.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def _ssm_cfg_to_kwargs(ssm_cfg: dict, where: str) -> dict:
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer != "Mamba1":
        raise NotImplementedError(f"{where}: ssm_cfg.layer={layer!r}; seqlab implements only "
                                  "Mamba1 mixers (no Mamba2 / SSD)")
    unknown = sorted(set(ssm_cfg) - set(_SSM_CFG_MAP) - _SSM_CFG_IGNORED)
    if unknown:
        raise ValueError(f"{where}: ssm_cfg keys {unknown} are not understood; known keys are "
                         f"{sorted(set(_SSM_CFG_MAP) | _SSM_CFG_IGNORED)}")
    return {_SSM_CFG_MAP[k]: v for k, v in ssm_cfg.items() if k in _SSM_CFG_MAP}


def _load_mamba_ssm(directory: Path, meta: dict) -> torch.nn.Module:
    where = str(directory / CONFIG_NAME)
    known = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32",
             "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate", "attn_layer_idx",
             "attn_cfg", "norm_epsilon"}
    unknown = sorted(set(meta) - known - _MAMBA_SSM_IGNORED)
    if unknown:
        raise ValueError(f"{where}: mamba_ssm config keys {unknown} are not understood")
    if meta.get("d_intermediate", 0):
        raise NotImplementedError(f"{where}: d_intermediate={meta['d_intermediate']} (an MLP after "
                                  "each mixer) is not supported by seqlab; only 0 is")
    if meta.get("attn_layer_idx"):
        raise NotImplementedError(f"{where}: attn_layer_idx={meta['attn_layer_idx']} (hybrid "
                                  "attention layers) is not supported by seqlab")
    config = MambaConfig(**_mixer_seq_kwargs(meta, where, "tie_embeddings"))
    source = _read_weights(directory)
    state = _convert(source, _MAMBA_SSM_KEYS, directory)
    return _finish_lm(state, config, directory, head_key="lm_head.weight")


# -- transformers (MambaForCausalLM) ----------------------------------------------------------
_HF_KEYS = [
    (r"backbone\.embeddings\.weight", "backbone.embedding.weight"),
    (r"backbone\.layers\.(\d+)\.norm\.weight", r"backbone.layers.\1.norm.weight"),
    (rf"backbone\.layers\.(\d+)\.mixer\.({_MIXER_TENSORS})", r"backbone.layers.\1.mixer.\2"),
    (r"backbone\.norm_f\.weight", "backbone.norm_f.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
# transformers config keys that do not change the forward pass (ids, init, caching, kernels).
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "rescale_prenorm_residual", "use_mambapy", "use_associative_scan", "intermediate_size",
    "output_hidden_states", "output_attentions", "return_dict", "layer_types", "hidden_act",
}


def _load_hf(directory: Path, meta: dict) -> torch.nn.Module:
    where = str(directory / CONFIG_NAME)
    if meta.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{where}: hidden_act={meta['hidden_act']!r}; seqlab's mixer "
                                  "uses silu only")
    known = {"hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel",
             "expand", "time_step_rank", "time_step_min", "time_step_max", "time_step_scale",
             "time_step_init_scheme", "time_step_floor", "use_bias", "use_conv_bias",
             "layer_norm_epsilon", "residual_in_fp32", "tie_word_embeddings"}
    unknown = sorted(set(meta) - known - _HF_IGNORED)
    if unknown:  # transformers adds bookkeeping keys over versions; none of ours changes the math
        warnings.warn(f"{where}: ignoring transformers config keys {unknown}", stacklevel=3)
    hidden = meta["hidden_size"]
    config = MambaConfig(
        d_model=hidden, n_layer=meta["num_hidden_layers"], vocab_size=meta["vocab_size"],
        # transformers stores the embedding's row count as vocab_size: no further padding.
        pad_vocab_size_multiple=1,
        d_state=meta.get("state_size", 16), d_conv=meta.get("conv_kernel", 4),
        expand=meta.get("expand", 2), dt_rank=meta.get("time_step_rank", "auto"),
        dt_min=meta.get("time_step_min", 0.001), dt_max=meta.get("time_step_max", 0.1),
        dt_init=meta.get("time_step_init_scheme", "random"),
        dt_scale=meta.get("time_step_scale", 1.0), dt_init_floor=meta.get("time_step_floor", 1e-4),
        conv_bias=meta.get("use_conv_bias", True), bias=meta.get("use_bias", False),
        norm="rms", norm_eps=meta.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=meta.get("residual_in_fp32", True),
        tie_embeddings=meta.get("tie_word_embeddings", True))
    state = _convert(_read_weights(directory), _HF_KEYS, directory)
    return _finish_lm(state, config, directory, head_key="lm_head.weight")


# -- Caduceus (kuleshov-group) -----------------------------------------------------------------
_CADUCEUS_MIXER = rf"mixer\.(mamba_fwd|mamba_rev)\.({_MIXER_TENSORS})"
_CADUCEUS_KEYS = [
    (r"caduceus\.backbone\.embeddings\.word_embeddings\.weight", "backbone.embedding.weight"),
    (rf"caduceus\.backbone\.layers\.(\d+)\.norm\.({_NORM_TENSORS})", r"backbone.layers.\1.norm.\2"),
    (rf"caduceus\.backbone\.layers\.(\d+)\.{_CADUCEUS_MIXER}", r"backbone.layers.\1.mixer.\2.\3"),
    (rf"caduceus\.backbone\.norm_f\.({_NORM_TENSORS})", r"backbone.norm_f.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
]
# Tensors that only RCPS (reverse-complement parameter sharing) checkpoints hold.
_RCPS_MARKERS = re.compile(r"\.submodule\.|word_embeddings\.embedding\.weight|"
                           r"lm_head\.lm_head\.weight|complement_map")
_CADUCEUS_IGNORED = _HF_IGNORED | {"model_type", "fused_add_norm", "initializer_cfg",
                                   "gradient_checkpointing_stride", "complement_map",
                                   "auto_map", "num_labels", "problem_type", "id2label",
                                   "label2id"}
_CADUCEUS_KNOWN = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32",
                   "pad_vocab_size_multiple", "norm_epsilon", "bidirectional",
                   "bidirectional_strategy", "bidirectional_weight_tie", "rcps",
                   "tie_word_embeddings"}


def _load_caduceus(directory: Path, meta: dict) -> torch.nn.Module:
    """Caduceus' masked LM or bare backbone, bidirectional ('caduceus-ph') or RCPS ('caduceus-ps').

    The vocabulary is the checkpoint's own, not seqlab's byte ids: feed the loaded model
    Caduceus token ids (the published checkpoints' character tokenizer: [CLS] 0, [SEP] 1,
    [BOS] 2, [MASK] 3, [PAD] 4, [RESERVED] 5, [UNK] 6, A 7, C 8, G 9, T 10, N 11, then
    padding rows).
    """
    where = str(directory / CONFIG_NAME)
    source = _read_weights(directory)
    rcps_keys = sorted(k for k in source if _RCPS_MARKERS.search(k))
    if "score.weight" in source:
        raise NotImplementedError(f"{directory}: a CaduceusForSequenceClassification checkpoint "
                                  "('score.weight'); only the masked LM and bare backbone convert")
    if meta.get("rcps") is False and rcps_keys:
        raise ValueError(f"{where}: rcps=false, but the weights hold RCPS (reverse-complement "
                         f"parameter sharing) tensors {key_list(rcps_keys, 6)}; the config and the "
                         "weights disagree")
    unknown = sorted(set(meta) - _CADUCEUS_KNOWN - _CADUCEUS_IGNORED)
    if unknown:
        warnings.warn(f"{where}: ignoring Caduceus config keys {unknown}", stacklevel=3)
    # CaduceusForMaskedLM's keys start with "caduceus."; the bare Caduceus model's with
    # "backbone." (and it has no head).
    masked_lm = any(k.startswith("caduceus.") for k in source)
    if not masked_lm:
        source = {f"caduceus.{k}": v for k, v in source.items()}
    if meta.get("rcps") or rcps_keys:
        return _load_caduceus_rcps(directory, meta, source, masked_lm)
    config = _caduceus_config(meta, where)
    bidirectional = config.bidirectional
    state = _convert(source, _CADUCEUS_KEYS, directory)
    if not bidirectional:  # a one-direction Caduceus is a plain Mamba stack
        state = {k.replace(".mixer.mamba_fwd.", ".mixer."): v for k, v in state.items()}
    if masked_lm:
        if not bidirectional:
            raise NotImplementedError(f"{where}: bidirectional=false; seqlab's MaskedLM is "
                                      "bidirectional only, so this Caduceus masked LM has no "
                                      "seqlab counterpart")
        return _finish_lm(state, config, directory, head_key="lm_head.weight",
                          architecture="MaskedLM")
    backbone_state = {k[len("backbone."):]: v for k, v in state.items()}
    _fit_vocab(backbone_state, ["embedding.weight"], config, directory)
    model = build_model("Backbone", config, {})
    _fill_tied_bidirectional(backbone_state, model)
    load_state(model, backbone_state, directory, strict=True)
    return model


def _mixer_seq_kwargs(meta: dict, where: str, tie_key: str) -> dict:
    """MambaConfig keywords from a mamba_ssm-style config (mamba_ssm's MambaConfig and
    Caduceus' share these keys; the tying flag is ``tie_key``)."""
    return dict(
        d_model=meta["d_model"], n_layer=meta["n_layer"], vocab_size=meta["vocab_size"],
        pad_vocab_size_multiple=meta.get("pad_vocab_size_multiple", 8),
        norm="rms" if meta.get("rms_norm", True) else "layer",
        norm_eps=meta.get("norm_epsilon", 1e-5),
        residual_in_fp32=meta.get("residual_in_fp32", True),
        tie_embeddings=meta.get(tie_key, True),
        **_ssm_cfg_to_kwargs(meta.get("ssm_cfg") or {}, where))


def _caduceus_config(meta: dict, where: str, **overrides) -> MambaConfig:
    strategy = meta.get("bidirectional_strategy") or "add"
    strategies = {"add": "add", "ew_multiply": "mul"}
    if strategy not in strategies:
        raise ValueError(f"{where}: bidirectional_strategy={strategy!r}; known: {sorted(strategies)}")
    kwargs = _mixer_seq_kwargs(meta, where, "tie_word_embeddings")
    kwargs.update(
        bidirectional=meta.get("bidirectional", True), bidirectional_strategy=strategies[strategy],
        tie_bidirectional_projections=meta.get("bidirectional_weight_tie", True))
    kwargs.update(overrides)
    return MambaConfig(**kwargs)


# -- Caduceus RCPS ('caduceus-ps') -------------------------------------------------------------
# Caduceus' RCPS modules compute what seqlab's rc.py modules compute, on the same layout:
# hidden (batch, L, 2 * d) = [forward strand, R(reverse strand)] with R = flip(length, channels),
# RCPSEmbedding = RCEmbedding, RCPSWrapper = RCWrapper, RCPSAddNormWrapper = Block's add +
# RCWrapper(norm), RCPSLMHead = RCLMHead. Config "d_model" is the width of ONE strand (the
# submodules' width); seqlab's d_model is the full width 2 * d_model.
#
# One difference: with fused_add_norm (the published checkpoints' setting, and the only one
# their GPU code ran) RCPSMambaBlock feeds the SECOND half to the norm+mixer as the forward
# strand and the R-flipped FIRST half as the reverse strand, i.e. it is the unfused block applied
# after S, the exchange of the two halves (both hidden and residual). S passes through an RCPS
# layer by conjugating it: W_F(S h) = S W_F'(h) with F' = R F R, which for an RMS/LayerNorm is
# the norm with its weight (and bias) reversed, and for a BiMamba layer is the BiMamba whose
# forward and reverse mixers exchange roles, each with in_proj's input columns and out_proj's
# output rows reversed. Pairs of S cancel, so the n fused blocks become n unfused blocks with
# every layer i for which n - 1 - i is odd conjugated; an odd n leaves one S, which the
# embedding absorbs: S E_W = E_W'' with W'' = W[complement] reversed along channels. The final
# norm_f has no swap in either layout.
_CADUCEUS_RCPS_KEYS = [
    (r"caduceus\.backbone\.embeddings\.word_embeddings\.embedding\.weight",
     "backbone.embedding.weight"),
    (r"caduceus\.backbone\.embeddings\.word_embeddings\.complement_map", "complement_map.embedding"),
    (rf"caduceus\.backbone\.layers\.(\d+)\.norm\.(?:submodule\.)?({_NORM_TENSORS})",
     r"backbone.layers.\1.norm.submodule.\2"),
    (rf"caduceus\.backbone\.layers\.(\d+)\.mixer\.submodule\.(mamba_fwd|mamba_rev)\.({_MIXER_TENSORS})",
     r"backbone.layers.\1.mixer.submodule.\2.\3"),
    (rf"caduceus\.backbone\.norm_f\.(?:submodule\.)?({_NORM_TENSORS})",
     r"backbone.norm_f.submodule.\1"),
    (r"lm_head\.lm_head\.weight", "lm_head.weight"),
    (r"lm_head\.complement_map", "complement_map.lm_head"),
]
_RCPS_FUSED_NORM = re.compile(r"(?:\.layers\.\d+\.norm|\.norm_f)\.(?:weight|bias)")
_RCPS_WRAPPED_NORM = re.compile(r"(?:\.layers\.\d+\.norm|\.norm_f)\.submodule\.(?:weight|bias)")


def _load_caduceus_rcps(directory: Path, meta: dict, source: dict[str, torch.Tensor],
                        masked_lm: bool) -> torch.nn.Module:
    where = str(directory / CONFIG_NAME)
    fused = _rcps_fused_layout(source, meta, where)
    state = _convert(source, _CADUCEUS_RCPS_KEYS, directory)
    buffers = {k: state.pop(k) for k in list(state) if k.startswith("complement_map.")}
    emb_key, head_key = "backbone.embedding.weight", "lm_head.weight"
    if emb_key not in state:
        raise KeyError(f"{directory}: no embedding tensor ('caduceus.backbone.embeddings."
                       "word_embeddings.embedding.weight') in the weights")
    n_layer = meta["n_layer"]
    # Layers that the fused layout's half exchange conjugates, and whether one exchange is
    # left over for the embedding (see the comment above _CADUCEUS_RCPS_KEYS).
    conjugated = [i for i in range(n_layer) if fused and (n_layer - 1 - i) % 2 == 1]
    swap_embedding = fused and n_layer % 2 == 1
    if masked_lm:
        # CaduceusForMaskedLM.tie_weights always ties the RCPS head to the embedding.
        if head_key in state and not torch.equal(state[head_key], state[emb_key]):
            raise ValueError(f"{directory}: 'lm_head.lm_head.weight' differs from the embedding, "
                             "but Caduceus ties the RCPS LM head to the embedding")
        state[head_key] = state[emb_key]
    elif head_key in state:
        raise KeyError(f"{directory}: unexpected key 'lm_head.lm_head.weight' in a bare Caduceus "
                       "backbone (its other keys start with 'backbone.')")
    # A leftover exchange makes the embedding W'' while the head stays W: untie them.
    config = _caduceus_config(meta, where, d_model=2 * meta["d_model"], rc_equivariant=True,
                              tie_embeddings=not swap_embedding)
    if not config.bidirectional:
        if conjugated:
            raise NotImplementedError(
                f"{where}: bidirectional=false with fused_add_norm: the fused RCPS layout "
                f"exchanges the strands before layers {conjugated}, which would need "
                "anti-causal one-direction mixers; seqlab has none")
        state = {k.replace(".mixer.submodule.mamba_fwd.", ".mixer.submodule."): v
                 for k, v in state.items()}
        if masked_lm:
            raise NotImplementedError(f"{where}: bidirectional=false; seqlab's MaskedLM is "
                                      "bidirectional only, so this Caduceus masked LM has no "
                                      "seqlab counterpart")
    _fit_vocab(state, [emb_key, head_key] if masked_lm else [emb_key], config, directory)
    complement = _rcps_complement(meta, buffers, config, where)
    if swap_embedding:
        state[emb_key] = state[emb_key][complement].flip(-1).contiguous()

    model = build_model("MaskedLM" if masked_lm else "Backbone", config, {})
    if not masked_lm:
        state = {k[len("backbone."):]: v for k, v in state.items()}
    prefix = "backbone." if masked_lm else ""
    _fill_tied_bidirectional(state, model)
    if config.bidirectional and config.tie_bidirectional_projections:
        _check_tied_projections(state, directory)
    for i in conjugated:
        _conjugate_rcps_layer(state, f"{prefix}layers.{i}.")
    load_state(model, state, directory, strict=True)
    _set_complement(model, complement)
    return model


def _rcps_fused_layout(source: dict[str, torch.Tensor], meta: dict, where: str) -> bool:
    """Whether the file holds the fused_add_norm layout (bare norms) or the unfused one
    (RCPSAddNormWrapper: norm.submodule.*); the config must agree when it says."""
    fused_keys = sorted(k for k in source if _RCPS_FUSED_NORM.search(k)
                        and not _RCPS_WRAPPED_NORM.search(k))
    wrapped_keys = sorted(k for k in source if _RCPS_WRAPPED_NORM.search(k))
    if fused_keys and wrapped_keys:
        raise ValueError(f"{where}: the weights mix fused_add_norm norms {key_list(fused_keys, 3)} "
                         f"and wrapped (RCPSAddNormWrapper) norms {key_list(wrapped_keys, 3)}")
    # CaduceusConfig's default is fused_add_norm=True.
    fused = bool(fused_keys) if (fused_keys or wrapped_keys) else bool(meta.get("fused_add_norm", True))
    if "fused_add_norm" in meta and bool(meta["fused_add_norm"]) != fused:
        raise ValueError(f"{where}: fused_add_norm={meta['fused_add_norm']} but the weights hold "
                         f"the {'fused' if fused else 'unfused'} layout's norms "
                         f"{key_list(fused_keys or wrapped_keys, 3)}")
    return fused


def _rcps_complement(meta: dict, buffers: dict[str, torch.Tensor], config: MambaConfig,
                     where: str) -> torch.Tensor:
    """The id -> complement-id table, (padded_vocab_size,) long, from the weights' buffers and
    config.json's complement_map (as CaduceusConfig builds it: values in key order, padded with
    identity up to the vocabulary size). They must agree; the result must be an involution."""
    tables = {name: t.to(torch.long).reshape(-1) for name, t in buffers.items()}
    cmap = meta.get("complement_map")
    if cmap is not None:
        keys = [int(k) for k in cmap]
        if keys != list(range(len(keys))):
            raise ValueError(f"{where}: complement_map keys must be 0..{len(keys) - 1} in order "
                             f"(Caduceus reads the values in order), got {list(cmap)[:20]}")
        tables["config.json complement_map"] = torch.tensor([int(v) for v in cmap.values()],
                                                            dtype=torch.long)
    if not tables:
        raise ValueError(f"{where}: an RCPS checkpoint needs a complement map (config.json "
                         "'complement_map' or the weights' '...complement_map' buffers); found none")
    target = config.padded_vocab_size
    fitted = {}
    for name, t in tables.items():
        if t.numel() < target:
            t = torch.cat([t, torch.arange(t.numel(), target, dtype=torch.long)])
        fitted[name] = t
    n = max(t.numel() for t in fitted.values())
    fitted = {name: torch.cat([t, torch.arange(t.numel(), n, dtype=torch.long)])
              for name, t in fitted.items()}
    (first, table), *rest = fitted.items()
    for name, other in rest:
        if not torch.equal(table, other):
            raise ValueError(f"{where}: complement maps disagree: {first} {table.tolist()} vs "
                             f"{name} {other.tolist()}")
    if (table < 0).any() or (table >= n).any() or not torch.equal(table[table], torch.arange(n)):
        raise ValueError(f"{where}: the complement map {table.tolist()} is not an involution of "
                         f"0..{n - 1}; reverse-complement equivariance needs one")
    if n > target:  # only padding rows may go, and no kept id may map onto them
        if (table[:target] >= target).any():
            raise ValueError(f"{where}: the complement map sends ids below the vocabulary size "
                             f"{target} to padding ids: {table.tolist()}")
        table = table[:target]
    return table


def _check_tied_projections(state: dict[str, torch.Tensor], directory: Path) -> None:
    for key in state:
        if ".mamba_rev." in key and re.search(r"\.(in_proj|out_proj)\.(weight|bias)$", key):
            fwd = key.replace(".mamba_rev.", ".mamba_fwd.")
            if fwd in state and not torch.equal(state[key], state[fwd]):
                raise ValueError(f"{directory}: bidirectional_weight_tie is set but {key!r} "
                                 f"differs from {fwd!r}")


def _conjugate_rcps_layer(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Rewrite layer ``prefix`` (seqlab names) in place into F' = R F R, R = flip(length, channels).

    Norm: weight and bias reversed. BiMamba: R (fwd + T rev T) R = C rev C + T (C fwd C) T with
    T the length flip and C the channel flip, so the two directions exchange their tensors and
    each is conjugated by C: in_proj's input columns and out_proj's output rows (and bias)
    reversed. Element-wise combinations ("add", "mul") commute with both flips.
    """
    for t in ("weight", "bias"):
        key = f"{prefix}norm.submodule.{t}"
        if key in state:
            state[key] = state[key].flip(0).contiguous()
    fwd, rev = f"{prefix}mixer.submodule.mamba_fwd.", f"{prefix}mixer.submodule.mamba_rev."
    moved = {}
    for key in [k for k in state if k.startswith((fwd, rev))]:
        value = state.pop(key)
        name = key[len(fwd):]  # both prefixes have the same length
        if name == "in_proj.weight":
            value = value.flip(1)
        elif name in ("out_proj.weight", "out_proj.bias"):
            value = value.flip(0)
        moved[(rev if key.startswith(fwd) else fwd) + name] = value.contiguous()
    state.update(moved)


def _set_complement(model: torch.nn.Module, table: torch.Tensor) -> None:
    """Give every RC embedding / LM head of ``model`` the vocabulary's complement table."""
    for _, module in rc_modules(model):
        module.complement = table.to(module.complement.device).clone()


# -- helpers -----------------------------------------------------------------------------------
def _convert(source: dict[str, torch.Tensor], table: list[tuple[str, str]],
             directory: Path) -> dict[str, torch.Tensor]:
    """Rename every key of ``source`` through ``table``; raise naming the keys no row matches."""
    compiled = [(re.compile(pattern), target) for pattern, target in table]
    out, unknown = {}, []
    for key, tensor in source.items():
        for pattern, target in compiled:
            m = pattern.fullmatch(key)
            if m:
                out[m.expand(target)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{directory}: keys with no seqlab counterpart: {key_list(unknown)}; known "
                       f"patterns are {[p for p, _ in table]}")
    return out


def _finish_lm(state: dict[str, torch.Tensor], config: MambaConfig, directory: Path,
               head_key: str, architecture: str = "MambaLM") -> torch.nn.Module:
    """Fill tied tensors, fit the vocabulary rows, build the model and load strictly."""
    emb_key = "backbone.embedding.weight"
    if emb_key not in state:
        raise KeyError(f"{directory}: no embedding tensor (seqlab name {emb_key!r}) in the weights")
    if config.tie_embeddings:
        if head_key in state and not torch.equal(state[head_key], state[emb_key]):
            raise ValueError(f"{directory}: config ties the embeddings but {head_key!r} differs from "
                             "the embedding; set tie_embeddings / tie_word_embeddings to false")
        state[head_key] = state[emb_key]
    elif head_key not in state:
        raise KeyError(f"{directory}: config unties the embeddings but the weights hold no "
                       f"{head_key!r}")
    _fit_vocab(state, [emb_key, head_key], config, directory)
    model = build_model(architecture, config, {})
    _fill_tied_bidirectional(state, model)
    load_state(model, state, directory, strict=True)
    return model


def _fit_vocab(state: dict[str, torch.Tensor], keys: list[str], config: MambaConfig,
               directory: Path) -> None:
    """Pad (with zeros) or crop vocabulary rows to config.padded_vocab_size.

    Only padding rows (ids >= vocab_size) may be cropped; a file with fewer rows than
    vocab_size is an error.
    """
    target = config.padded_vocab_size
    for key in keys:
        t = state[key]
        rows = t.shape[0]
        if rows == target:
            continue
        if rows < config.vocab_size:
            raise ValueError(f"{directory}: {key!r} has {rows} rows but the config's vocab_size is "
                             f"{config.vocab_size}; the checkpoint and its config.json disagree")
        if rows > target:
            state[key] = t[:target]
        else:
            state[key] = torch.cat([t, t.new_zeros(target - rows, *t.shape[1:])])


def _fill_tied_bidirectional(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Reverse-direction projections tied to the forward ones may be stored under one name only."""
    expected = model.state_dict()
    for key in expected:
        if ".mamba_rev." in key and key not in state:
            fwd = key.replace(".mamba_rev.", ".mamba_fwd.")
            if fwd in state and expected[key].data_ptr() == expected[fwd].data_ptr():
                state[key] = state[fwd]


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a foreign checkpoint: safetensors first, then pytorch_model.bin,
    single file or sharded (*.index.json with a weight_map)."""
    for name, reader in ((WEIGHTS_NAME, read_safetensors), ("pytorch_model.bin", _read_pickle)):
        if (directory / name).is_file():
            return reader(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a weight index ({err})") from None
            paths = [confined_path(directory, shard, index.name) for shard in shards]
            state: dict[str, torch.Tensor] = {}
            for path in paths:
                state.update(reader(path))
            return state
    raise FileNotFoundError(f"{directory}: no weights found; expected {WEIGHTS_NAME} or "
                            "pytorch_model.bin (or a sharded *.index.json of either)")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"{path}: refused to unpickle: the file holds objects other than tensors, and seqlab "
            "loads pickles only with weights_only=True (arbitrary objects can run code). Convert "
            f"it to safetensors in a trusted environment. Detail: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of name -> tensor (a state_dict), got "
                         f"{type(state).__name__}")
    return state
