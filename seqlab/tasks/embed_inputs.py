"""What the embed job reads: lazy items from a species manifest's windows, FASTA tiles or BED
intervals, and the record of the items it leaves out (skipped.tsv)."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.genome import Genome
from ..data.species import SpeciesManifest, species_eval_windows
from ..data.windows import contig_intervals, read_bed, tile_windows
from ..errors import ConfigError
from .common import resolve_path
from .embed import DatasetItem, GenomeSpan, Skip

log = logging.getLogger("seqlab")


@dataclass
class EmbedInputs:
    """Lazy items, class names, the window, and how to screen for N."""

    items: list
    classes: list[str]
    window: int
    what: str            # the input, for messages: a BED, FASTA or manifest path
    unit: str            # "intervals" or "windows"
    max_n_frac: float    # items with more N than this (or all N) are skipped


def embed_inputs(data, window: int | None) -> EmbedInputs:
    """Lazy items from ``data`` (the embed job's data section: manifest + split, or fasta
    (+ bed)); nothing is read here but the indexes (and, for a manifest, the N content of its
    tiles). ``window``: the checkpoint's training window, used when data.window is unset."""
    window = int(data.get("window") or window or 1024)
    stride = data.get("stride") or window
    max_n_frac = float(data.get("max_n_frac", 1.0))
    if data.get("manifest"):
        path = resolve_path(data.manifest, what="species manifest")
        man = SpeciesManifest.load(path, fold_case=bool(data.get("fold_case", True)))
        ds = species_eval_windows(man, data.split, window=window, stride=stride,
                                  max_per_species=data.get("max_per_species"),
                                  max_n_frac=max_n_frac)
        return EmbedInputs(dataset_items(ds, man), list(man.species), window,
                           f"{path} ({data.split} split)", "windows", max_n_frac)
    if not data.get("fasta"):
        raise ConfigError("seqlab embed: set data.manifest (with data.split) or data.fasta "
                          "(optionally with data.bed)")
    fasta = resolve_path(data.fasta, what="FASTA")
    genome = Genome(fasta, fold_case=bool(data.get("fold_case", True)))
    if data.get("bed"):
        # Whole BED intervals, however long: they are read and embedded chunk by chunk.
        bed = resolve_path(data.bed, what="BED file")
        items = []
        for iv in read_bed(bed, genome):
            strand = iv.strand if iv.strand in "+-" else "+"
            items.append(GenomeSpan(genome, iv.chrom, iv.start, iv.end, strand, {
                "contig": iv.chrom, "start": iv.start, "end": iv.end, "strand": strand,
                "label": -1, "group": iv.name or "", "name": iv.name or "",
                "source": str(genome.path)}))
        return EmbedInputs(items, [], window, str(bed), "intervals", 1.0)
    # N screening happens as the tiles are read for embedding (and is reported), not here.
    tiles = tile_windows(contig_intervals(genome), window, stride, genome)
    items = [GenomeSpan(genome, w.contig, w.start, w.end, "+", {
        "contig": w.contig, "start": w.start, "end": w.end, "strand": "+", "label": -1,
        "group": genome.path.name, "source": str(genome.path)}) for w in tiles]
    return EmbedInputs(items, [], window, str(fasta), "windows", max_n_frac)


def dataset_items(ds, manifest: SpeciesManifest) -> list[DatasetItem]:
    """Lazy items of a species window dataset, labelled from the manifest and grouped by file
    (strain)."""
    items = []
    for i in range(len(ds)):
        m = ds.meta(i)
        items.append(DatasetItem(ds, i, m["end"] - m["start"], {
            **m, "label": manifest.label(m["species"]), "group": Path(m["file"]).name}))
    return items


class SkipReport:
    """Items left out of an embedding run: a log line each (up to ``shown``), counts by reason,
    and a TSV (contig, start, end, strand, name, reason, detail)."""

    def __init__(self, shown: int = 20):
        self.shown = shown
        self.rows: list[Skip] = []

    def __call__(self, skip: Skip) -> None:
        self.rows.append(skip)
        if len(self.rows) <= self.shown:
            log.warning("embed: skipped %s: %s", where(skip.item.meta), skip.detail)

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


def where(meta: dict) -> str:
    """An item's place for messages: contig:start-end(strand) (name)."""
    name = f" ({meta['name']})" if meta.get("name") else ""
    return f"{meta['contig']}:{meta['start']}-{meta['end']}({meta['strand']}){name}"


__all__ = ["EmbedInputs", "embed_inputs", "dataset_items", "SkipReport", "where"]
