"""Jobs `embed` (FASTA / BED / manifest windows -> embeddings file) and `probe` (scikit-learn)."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from .. import __version__
from ..data.genome import Genome
from ..data.species import SpeciesManifest, species_eval_windows
from ..data.windows import contig_intervals, read_bed, tile_windows
from ..embed import (DatasetItem, Embeddings, GenomeSpan, Skip, embed_items, load_embeddings,
                     run_probe, save_embeddings)
from ..errors import ConfigError, DataError
from ..model.config import MambaConfig
from ..model.heads import pool
from ..model.rc import reverse_complement
from ..plots import plot_confusion_matrix
from ..train import RunDir, load_weights
from ..utils import atomic_write_json, resolve_device
from .common import print_summary, resolve_path, tracked_run
from .species import _checkpoint_dir

log = logging.getLogger("seqlab")


class PooledBackbone(torch.nn.Module):
    """Pooled final hidden states of a seqlab model, in the chunk protocol of
    :func:`seqlab.embed.embed_items` (so pooling stays exact across chunks).

    SequenceClassifier: its head's pooling (mean / max / first / last); with ``conjoin_rc`` a
    second branch pools the reverse complement of each chunk, and that branch reads the chunks
    backwards (the reverse complement of a whole interval starts with its last chunk's); with
    ``rc_equivariant`` the channel-flip symmetrisation is applied after the chunks are combined,
    as ``SequenceClassifier.embed`` applies it after pooling. Language models (MambaLM,
    MaskedLM): mean over positions.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        head = getattr(model, "head", None)
        self.pooling = head.pooling if head is not None else "mean"
        self.conjoin = bool(getattr(model, "conjoin", False))
        self.symmetrise = head is not None and bool(model.config.rc_equivariant)
        self.branch_orders = (1, -1) if self.conjoin else (1,)

    def pool_chunks(self, ids, lengths):
        """ids (B, L) long, lengths (B,) -> float32 (B, S, d_model), S = len(branch_orders)."""
        branches = [ids] + ([reverse_complement(ids, lengths)] if self.conjoin else [])
        return torch.stack([pool(self.model.backbone(x, lengths=lengths).float(), lengths,
                                 self.pooling) for x in branches], 1)

    def finish(self, pooled: np.ndarray) -> np.ndarray:
        """(n, S, d_model) combined per-branch vectors -> (n, d_model)."""
        if self.symmetrise:
            pooled = (pooled + pooled[..., ::-1]) / 2
        return pooled.mean(1)


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


@dataclass
class _Source:
    """What `embed` reads: lazy items, class names, the window, and how to screen for N."""

    items: list
    classes: list[str]
    window: int
    what: str            # the input, for messages: a BED, FASTA or manifest path
    unit: str            # "intervals" or "windows"
    max_n_frac: float    # items with more N than this (or all N) are skipped


def _windows_from_cfg(cfg, spec) -> _Source:
    """Lazy items from data.manifest / data.fasta (+ data.bed); nothing is read here but the
    indexes (and, for a manifest, the N content of its tiles)."""
    d = cfg.data
    window = int(d.get("window") or spec.get("window") or 1024)
    stride = d.get("stride") or window
    max_n_frac = float(d.get("max_n_frac", 1.0))
    if d.get("manifest"):
        path = resolve_path(d.manifest, what="species manifest")
        man = SpeciesManifest.load(path, fold_case=bool(d.get("fold_case", True)))
        ds = species_eval_windows(man, d.split, window=window, stride=stride,
                                  max_per_species=d.get("max_per_species"), max_n_frac=max_n_frac)
        items = []
        for i in range(len(ds)):
            m = ds.meta(i)
            items.append(DatasetItem(ds, i, m["end"] - m["start"], {
                **m, "label": man.label(m["species"]), "group": Path(m["file"]).name}))
        return _Source(items, list(man.species), window, f"{path} ({d.split} split)", "windows",
                       max_n_frac)
    if not d.get("fasta"):
        raise ConfigError("seqlab embed: set data.manifest (with data.split) or data.fasta "
                          "(optionally with data.bed)")
    fasta = resolve_path(d.fasta, what="FASTA")
    genome = Genome(fasta, fold_case=bool(d.get("fold_case", True)))
    if d.get("bed"):
        # Whole BED intervals, however long: they are read and embedded chunk by chunk.
        bed = resolve_path(d.bed, what="BED file")
        items = []
        for iv in read_bed(bed, genome):
            strand = iv.strand if iv.strand in "+-" else "+"
            items.append(GenomeSpan(genome, iv.chrom, iv.start, iv.end, strand, {
                "contig": iv.chrom, "start": iv.start, "end": iv.end, "strand": strand,
                "label": -1, "group": iv.name or "", "name": iv.name or ""}))
        return _Source(items, [], window, str(bed), "intervals", 1.0)
    # N screening happens as the tiles are read for embedding (and is reported), not here.
    tiles = tile_windows(contig_intervals(genome), window, stride, genome)
    items = [GenomeSpan(genome, w.contig, w.start, w.end, "+", {
        "contig": w.contig, "start": w.start, "end": w.end, "strand": "+", "label": -1,
        "group": genome.path.name}) for w in tiles]
    return _Source(items, [], window, str(fasta), "windows", max_n_frac)


class _SkipReport:
    """Items left out of an embedding run: a log line each (up to ``shown``), counts by reason,
    and a TSV (contig, start, end, strand, name, reason, detail)."""

    def __init__(self, shown: int = 20):
        self.shown = shown
        self.rows: list[Skip] = []

    def __call__(self, skip: Skip) -> None:
        self.rows.append(skip)
        if len(self.rows) <= self.shown:
            log.warning("embed: skipped %s: %s", _where(skip.item.meta), skip.detail)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.rows:
            out[s.reason] = out.get(s.reason, 0) + 1
        return out

    def write(self, path: Path) -> None:
        if len(self.rows) > self.shown:
            log.warning("embed: skipped %d more (%d in all); all are listed in %s",
                        len(self.rows) - self.shown, len(self.rows), path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            wr = csv.writer(f, delimiter="\t", lineterminator="\n")
            wr.writerow(["contig", "start", "end", "strand", "name", "reason", "detail"])
            for s in self.rows:
                m = s.item.meta
                wr.writerow([m["contig"], m["start"], m["end"], m["strand"], m.get("name", ""),
                             s.reason, s.detail])
        tmp.replace(path)


def _where(meta: dict) -> str:
    name = f" ({meta['name']})" if meta.get("name") else ""
    return f"{meta['contig']}:{meta['start']}-{meta['end']}({meta['strand']}){name}"


def _to_embeddings(vecs: np.ndarray, metas: list[dict], classes, info) -> Embeddings:
    return Embeddings(vecs, np.array([m["contig"] for m in metas], dtype=str),
                      np.array([m["start"] for m in metas], np.int64),
                      np.array([m["end"] for m in metas], np.int64),
                      np.array([m["strand"] for m in metas], dtype=str),
                      np.array([m.get("label", -1) for m in metas], np.int64),
                      np.array([m.get("group", "") for m in metas], dtype=str), classes, info)


def _positive(cfg, key: str, optional: bool) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"seqlab embed: {key}={value!r} must be a positive integer"
                          + (" or null" if optional else ""))
    return value


def embed(cfg: DictConfig) -> dict:
    with tracked_run(cfg) as (run, summary):
        batch_size = _positive(cfg, "batch_size", optional=False)
        chunk = _positive(cfg, "chunk", optional=True)
        max_tokens = _positive(cfg, "max_tokens", optional=True)
        out = Path(cfg.get("output") or run.path / "embeddings.npz")
        if out.exists():
            # Removed up front so that a run that fails leaves no complete-looking output.
            log.info("embed: removing the previous %s", out)
            out.unlink()
        device = resolve_device(cfg.get("device", "auto"))
        model, spec, ckpt = load_run_model(cfg.checkpoint, device)
        src = _windows_from_cfg(cfg, spec)
        if not src.items:
            raise DataError(f"{src.what}: no {src.unit} to embed")
        classes = src.classes or list(spec.get("classes") or [])
        pooled = PooledBackbone(model)
        skips = _SkipReport()
        vecs, metas = [], []
        for item, vec in embed_items(pooled, src.items, device, batch_size, chunk,
                                     max_tokens=max_tokens, max_n_frac=src.max_n_frac,
                                     progress=cfg.get("progress", True), on_skip=skips):
            vecs.append(vec)
            metas.append(item.meta)
        skipped_tsv = run.path / "skipped.tsv"
        skips.write(skipped_tsv)
        counts = skips.counts()
        summary.update({"n": len(vecs), "skipped": len(skips.rows),
                        **{f"skipped_{k}": v for k, v in counts.items()}})
        if not vecs:
            first = skips.rows[0]
            raise DataError(f"{src.what}: nothing embedded: all {len(src.items)} {src.unit} were "
                            f"skipped ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                            f"e.g. {_where(first.item.meta)}: {first.detail}. "
                            f"The list is in {skipped_tsv}")
        info = {"checkpoint": str(ckpt), "window": src.window, "seqlab_version": __version__,
                "architecture": spec.get("architecture"), "pooling": pooled.pooling,
                "input": src.what, "chunk": chunk, "skipped": len(skips.rows)}
        save_embeddings(out, _to_embeddings(np.stack(vecs), metas, classes, info))
        summary.update({"embeddings": str(out), "dim": int(vecs[0].shape[0]),
                        "skipped_list": str(skipped_tsv)})
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
        m = test_ds.meta(i)
        items.append(DatasetItem(test_ds, i, m["end"] - m["start"], {
            **m, "label": manifest.label(m["species"]), "group": Path(m["file"]).name}))
    pooled = PooledBackbone(model)
    rows = list(embed_items(pooled, items, device, cfg.eval_batch_size,
                            progress=cfg.trainer.get("progress", True)))
    info = {"checkpoint": str(run.ckpt_dir), "window": int(cfg.data.window),
            "seqlab_version": __version__, "pooling": pooled.pooling, "split": "test"}
    out = save_embeddings(run.path / "embeddings_test.npz", _to_embeddings(
        np.stack([v for _, v in rows]), [it.meta for it, _ in rows], list(manifest.species), info))
    res = _probe_and_report(load_embeddings(out), cfg.probe, run, "held-out windows")
    return {"embeddings": str(out), **res}
