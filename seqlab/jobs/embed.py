"""Jobs `embed` (FASTA / BED / manifest windows -> embeddings file) and `probe` (scikit-learn)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from .. import __version__
from ..data.genome import Genome
from ..data.species import SpeciesManifest, species_eval_windows
from ..data.windows import contig_intervals, read_bed, tile_windows
from ..embed import Embeddings, embed_windows, load_embeddings, run_probe, save_embeddings
from ..model.config import MambaConfig
from ..plots import plot_confusion_matrix
from ..train import RunDir, load_weights
from ..utils import atomic_write_json, resolve_device
from .common import print_summary, resolve_path, tracked_run
from .species import _checkpoint_dir

log = logging.getLogger("seqlab")


class PooledBackbone(torch.nn.Module):
    """Mean-pooled final hidden states of any seqlab model with a ``backbone``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def embed(self, ids, lengths):
        if hasattr(self.model, "embed"):
            return self.model.embed(ids, lengths)
        h = self.model.backbone(ids, lengths=lengths).float()  # (B, L, d)
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).float()
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def load_run_model(path: str | Path, device: torch.device):
    """Rebuild a model from a seqlab checkpoint (run dir, checkpoints/ or a step folder)."""
    from ..model import MambaLM, MaskedLM, SequenceClassifier
    ckpt = _checkpoint_dir(path)
    spec = json.loads((ckpt / "config.json").read_text())
    mcfg = MambaConfig.from_dict(spec["model"])
    arch = spec.get("architecture")
    if arch == "SequenceClassifier":
        model = SequenceClassifier(mcfg, num_classes=spec["num_classes"], pooling=spec["pooling"],
                                   conjoin_rc=spec.get("conjoin_rc", False), device=device)
    elif arch == "MambaLM":
        model = MambaLM(mcfg, device=device)
    elif arch == "MaskedLM":
        model = MaskedLM(mcfg, device=device)
    else:
        raise SystemExit(f"seqlab: {ckpt / 'config.json'} has architecture={arch!r}; embed "
                         "supports SequenceClassifier, MambaLM and MaskedLM checkpoints")
    load_weights(model, ckpt / "model.safetensors")
    model.eval()
    return model, spec, ckpt


def _windows_from_cfg(cfg, spec):
    """(ids, meta) items and class names from data.manifest / data.fasta (+ data.bed)."""
    d = cfg.data
    window = int(d.get("window") or spec.get("window") or 1024)
    stride = d.get("stride") or window
    items, classes = [], []
    if d.get("manifest"):
        man = SpeciesManifest.load(resolve_path(d.manifest, what="species manifest"))
        classes = list(man.species)
        ds = species_eval_windows(man, d.split, window=window, stride=stride,
                                  max_per_species=d.get("max_per_species"))
        for i in range(len(ds)):
            ids, label = ds[i]
            m = ds.meta(i)
            items.append((ids.numpy(), {**m, "label": label, "group": Path(m["file"]).name}))
        return items, classes, window
    if not d.get("fasta"):
        raise SystemExit("seqlab embed: set data.manifest (with data.split) or data.fasta "
                         "(optionally with data.bed)")
    genome = Genome(resolve_path(d.fasta, what="FASTA"), fold_case=bool(d.get("fold_case", True)))
    if d.get("bed"):
        # Whole BED intervals; long ones are embedded in chunks (bounded memory).
        for iv in read_bed(resolve_path(d.bed, what="BED file"), genome):
            strand = iv.strand if iv.strand in "+-" else "+"
            items.append((genome.ids(iv.chrom, iv.start, iv.end, strand),
                          {"contig": iv.chrom, "start": iv.start, "end": iv.end,
                           "strand": strand, "label": -1, "group": iv.name or ""}))
    else:
        for w in tile_windows(contig_intervals(genome), window, stride, genome,
                              d.get("max_n_frac", 1.0)):
            items.append((genome.ids(w.contig, w.start, w.end), {
                "contig": w.contig, "start": w.start, "end": w.end, "strand": "+",
                "label": -1, "group": genome.path.name}))
    return items, classes, window


def _to_embeddings(vecs, items, classes, info) -> Embeddings:
    meta = [m for _, m in items]
    return Embeddings(vecs, np.array([m["contig"] for m in meta], dtype=str),
                      np.array([m["start"] for m in meta], np.int64),
                      np.array([m["end"] for m in meta], np.int64),
                      np.array([m["strand"] for m in meta], dtype=str),
                      np.array([m.get("label", -1) for m in meta], np.int64),
                      np.array([m.get("group", "") for m in meta], dtype=str), classes, info)


def embed(cfg: DictConfig) -> dict:
    with tracked_run(cfg) as (run, summary):
        device = resolve_device(cfg.get("device", "auto"))
        model, spec, ckpt = load_run_model(cfg.checkpoint, device)
        items, classes, window = _windows_from_cfg(cfg, spec)
        if not classes and spec.get("classes"):
            classes = list(spec["classes"])
        vecs = embed_windows(PooledBackbone(model), items, device, cfg.batch_size,
                             chunk=cfg.get("chunk"), progress=cfg.get("progress", True))
        info = {"checkpoint": str(ckpt), "window": window, "seqlab_version": __version__,
                "architecture": spec.get("architecture"), "pooling": spec.get("pooling", "mean")}
        out = Path(cfg.get("output") or run.path / "embeddings.npz")
        save_embeddings(out, _to_embeddings(vecs, items, classes, info))
        summary.update({"embeddings": str(out), "n": len(items), "dim": int(vecs.shape[1])})
    print_summary("embed", summary, run)
    return summary


def _probe_and_report(emb: Embeddings, pcfg, run: RunDir, title: str) -> dict:
    rep = run_probe(emb, estimator=pcfg.estimator, folds=pcfg.folds,
                    group_split=pcfg.group_split, seed=pcfg.seed, C=pcfg.C)
    atomic_write_json(run.path / "probe_report.json", rep)
    names = emb.classes or [str(i) for i in range(len(rep["confusion_matrix"]))]
    png = plot_confusion_matrix(np.array(rep["confusion_matrix"]), names,
                                run.plots_dir / "confusion_probe.png",
                                title=f"{title}: {pcfg.estimator} probe, {rep['folds']}-fold CV, "
                                      f"accuracy {rep['accuracy']:.3f}")
    return {"probe_accuracy": rep["accuracy"], "probe_macro_f1": rep["macro_f1"],
            "probe_folds": rep["folds"], "probe_plot": str(png)}


def probe(cfg: DictConfig) -> dict:
    with tracked_run(cfg) as (run, summary):
        emb = load_embeddings(resolve_path(cfg.embeddings, what="embeddings file"))
        summary.update(_probe_and_report(emb, cfg.probe, run, Path(cfg.embeddings).name))
    print_summary("probe", summary, run)
    return summary


def embed_and_probe_species(cfg, model, manifest, test_ds, run: RunDir, device) -> dict:
    """After fine-tuning: embed the held-out windows and cross-validate a probe on them."""
    items = []
    for i in range(len(test_ds)):
        ids, label = test_ds[i]
        m = test_ds.meta(i)
        items.append((ids.numpy(), {**m, "label": label, "group": Path(m["file"]).name}))
    vecs = embed_windows(PooledBackbone(model), items, device, cfg.eval_batch_size,
                         progress=cfg.trainer.get("progress", True))
    info = {"checkpoint": str(run.ckpt_dir), "window": int(cfg.data.window),
            "seqlab_version": __version__, "pooling": cfg.head.pooling, "split": "test"}
    out = save_embeddings(run.path / "embeddings_test.npz",
                          _to_embeddings(vecs, items, list(manifest.species), info))
    res = _probe_and_report(load_embeddings(out), cfg.probe, run, "held-out windows")
    return {"embeddings": str(out), **res}
