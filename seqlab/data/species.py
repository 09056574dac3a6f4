"""Species manifests (YAML) and the labelled window datasets built from them.

Manifest format (also in datasets/README.md)::

    dataset: bacteria                 # free-form metadata: dataset, description,
    licence: "..."                    # licence, provenance, ... (kept in .meta)
    species:                          # label = position in this mapping (0, 1, ...)
      Escherichia coli:
        - path: E_coli/MG1655.fa.gz   # FASTA (plain or bgzip), relative to the manifest
          strain: MG1655              # optional metadata: strain, accession, source, ...
          split: train                # whole file in one split: train | val | test
        - path: E_coli/DH1.fa.gz
          split: test
      Vibrio cholerae:
        - path: V_cholerae/O395.fa.gz
          regions:                    # or: a region split of every contig, by fraction
            train: [0.0, 0.9]         # [from, to) as fractions of each contig's length
            val: [0.9, 1.0]

Strains of one species are near-identical, so evaluation splits should hold out whole
strains; a region split is for species with a single strain.

A manifest without any val data gets one carved from its training data: the last
CARVED_VAL_FRACTION of every train file or train region becomes val (a region split, so
no base is in both). A species without val data in a manifest where other species have
some is left out of validation, as for test.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from seqlab.data.genome import Genome
from seqlab.data.windows import Interval, Window, sample_window, tile_windows
from seqlab.errors import DataError, MissingInput

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Share of each training interval used as val when a manifest gives no val data (the same
# share prepare_species holds out for a species with too few strains for a val strain).
CARVED_VAL_FRACTION = 0.1


@dataclass
class FileEntry:
    """One FASTA of a species: either a whole-file `split` or fractional `regions`."""

    species: str
    path: Path  # absolute
    split: str | None = None
    regions: dict[str, tuple[float, float]] | None = None
    meta: dict = field(default_factory=dict)  # strain, accession, source, ... as written

    def splits(self) -> set[str]:
        return {self.split} if self.split is not None else set(self.regions)

    def carve_val(self, fraction: float) -> None:
        """Turn the last `fraction` of this file's train data (whole file or train region)
        into a val region; the train part shrinks by as much."""
        lo, hi = (0.0, 1.0) if self.split == "train" else self.regions["train"]
        cut = lo + (1.0 - fraction) * (hi - lo)
        self.regions = {**(self.regions or {}), "train": (lo, cut), "val": (cut, hi)}
        self.split = None


@dataclass
class SpeciesManifest:
    """A validated manifest: species (label order), their files and free metadata."""

    path: Path
    species: list[str]
    files: list[FileEntry]
    meta: dict = field(default_factory=dict)
    fold_case: bool = True
    _genomes: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike, fold_case: bool = True) -> "SpeciesManifest":
        """Read and validate a manifest. Errors name the manifest, species, file and value.

        A manifest without any val data gets the last CARVED_VAL_FRACTION of every train
        file or train region as val (the train part shrinks to match; logged).

        fold_case: read sequence upper-cased (soft-masking differs between assemblies and
        would otherwise tell a classifier which file a window came from).
        """
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"{path}: species manifest not found")
        with open(path) as fh:
            try:
                doc = yaml.safe_load(fh)
            except yaml.YAMLError as err:
                raise DataError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("species"), dict) or not doc["species"]:
            raise DataError(f"{path}: a manifest needs a non-empty 'species:' mapping of "
                            "species name -> list of files (see datasets/README.md)")
        root = path.parent
        files: list[FileEntry] = []
        for sp, entries in doc["species"].items():
            sp = str(sp)
            if not isinstance(entries, list) or not entries:
                raise DataError(f"{path}: species {sp!r}: expected a list of files, got {entries!r}")
            for k, e in enumerate(entries):
                if not isinstance(e, dict) or "path" not in e:
                    raise DataError(f"{path}: species {sp!r}: entry {k} {e!r} needs a 'path:'")
                fp = (root / e["path"]).resolve()
                where = f"{path}: species {sp!r}, file {e['path']!r}"
                if not fp.is_file():
                    raise MissingInput(f"{where}: file not found at {fp} (paths are relative "
                                       "to the manifest's folder)")
                has_split, has_regions = "split" in e, "regions" in e
                if has_split == has_regions:
                    raise DataError(f"{where}: give exactly one of 'split: train|val|test' or 'regions:'")
                meta = {key: v for key, v in e.items() if key not in ("path", "split", "regions")}
                if has_split:
                    if e["split"] not in SPLITS:
                        raise DataError(f"{where}: unknown split {e['split']!r}; use one of {list(SPLITS)}")
                    files.append(FileEntry(sp, fp, split=e["split"], meta=meta))
                    continue
                regions = _check_regions(where, e["regions"])
                files.append(FileEntry(sp, fp, regions=regions, meta=meta))
        species = list(dict.fromkeys(str(s) for s in doc["species"]))
        for sp in species:
            if not any("train" in f.splits() for f in files if f.species == sp):
                raise DataError(f"{path}: species {sp!r} has no train data; give at least one of its "
                                "files 'split: train' or a 'train' region")
        without_val = [sp for sp in species
                       if not any("val" in f.splits() for f in files if f.species == sp)]
        if len(without_val) == len(species):
            for f in files:
                if "train" in f.splits():
                    f.carve_val(CARVED_VAL_FRACTION)
            log.warning("%s: no val data; validating on the last %d%% of every train file or "
                        "region (give files 'split: val' or 'val' regions to choose)", path,
                        round(100 * CARVED_VAL_FRACTION))
        elif without_val:
            log.warning("%s: species %s have no val data and are left out of validation",
                        path, without_val)
        meta = {k: v for k, v in doc.items() if k != "species"}
        return cls(path, species, files, meta, fold_case)

    def label(self, species: str) -> int:
        return self.species.index(species)

    def genome(self, entry: FileEntry) -> Genome:
        """The (cached) Genome of a file entry."""
        key = str(entry.path)
        if key not in self._genomes:
            self._genomes[key] = Genome(entry.path, fold_case=self.fold_case)
        return self._genomes[key]

    def intervals(self, entry: FileEntry, split: str) -> list[Interval]:
        """The parts of `entry` that belong to `split`: whole contigs or fractional regions."""
        g = self.genome(entry)
        if entry.split is not None:
            return [Interval(c, 0, n) for c, n in g.lengths.items()] if entry.split == split else []
        if split not in entry.regions:
            return []
        lo, hi = entry.regions[split]
        # Region bounds are rounded the same way for every split, so neighbours share an edge.
        return [Interval(c, int(round(lo * n)), int(round(hi * n)), name=split)
                for c, n in g.lengths.items() if int(round(hi * n)) > int(round(lo * n))]

    def split_files(self, split: str) -> dict[str, list[tuple[FileEntry, list[Interval]]]]:
        """species -> [(file, intervals)] for every file contributing to `split`."""
        if split not in SPLITS:
            raise ValueError(f"{self.path}: unknown split {split!r}; use one of {list(SPLITS)}")
        out = {}
        for sp in self.species:
            parts = [(f, self.intervals(f, split)) for f in self.files if f.species == sp]
            out[sp] = [(f, iv) for f, iv in parts if iv]
        return out


def _check_regions(where: str, regions) -> dict[str, tuple[float, float]]:
    if not isinstance(regions, dict) or not regions:
        raise DataError(f"{where}: 'regions:' must map split -> [from, to], got {regions!r}")
    out = {}
    for split, bounds in regions.items():
        if split not in SPLITS:
            raise DataError(f"{where}: unknown split {split!r} in regions; use one of {list(SPLITS)}")
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                and all(isinstance(b, (int, float)) for b in bounds) and 0 <= bounds[0] < bounds[1] <= 1):
            raise DataError(f"{where}: region {split}: {bounds!r} must be [from, to] fractions "
                            "with 0 <= from < to <= 1")
        out[split] = (float(bounds[0]), float(bounds[1]))
    spans = sorted(out.items(), key=lambda kv: kv[1])
    for (a, (_, a_hi)), (b, (b_lo, _)) in zip(spans, spans[1:]):
        if b_lo < a_hi:
            raise DataError(f"{where}: regions {a} {out[a]} and {b} {out[b]} overlap; "
                            "splits must not share bases")
    return out


class SpeciesWindowDataset(torch.utils.data.Dataset):
    """Random labelled windows of one split, balanced across species.

    Item i of epoch e is drawn from np.random.default_rng([seed, e, i]): a species
    uniformly (among those with data in `split`; only train requires every species), then a file and contig weighted by usable length, then a start, then the
    strand (reverse complement with probability 1/2 when rc_augment). The order is a pure
    function of (seed, epoch, index), so training resumes at any step with the same data.

    Returns (ids, label): ids LongTensor (window,) of byte ids (0..255), label int.
    """

    def __init__(self, manifest: SpeciesManifest, split: str, window: int = 1024, seed: int = 0,
                 rc_augment: bool = True, max_n_frac: float = 0.1, epoch_size: int = 10_000):
        self.manifest, self.split, self.window, self.seed = manifest, split, window, seed
        self.rc_augment, self.max_n_frac, self.epoch_size = rc_augment, max_n_frac, epoch_size
        self.epoch = 0
        # Species without any file in a val/test split are left out (labels keep their
        # manifest numbering); a species whose files are all shorter than the window is an error.
        self.labels: list[int] = []
        self.sources = []  # parallel to self.labels: list of (file, intervals, weight)
        for sp, parts in manifest.split_files(split).items():
            if not parts and split != "train":
                continue
            usable = [(f, [iv for iv in ivs if len(iv) >= window]) for f, ivs in parts]
            usable = [(f, ivs, sum(len(iv) - window + 1 for iv in ivs)) for f, ivs in usable if ivs]
            if not usable:
                raise DataError(f"{manifest.path}: species {sp!r} has no {split} region of at least "
                                f"{window} bp; use a shorter window or add {split} data")
            self.labels.append(manifest.label(sp))
            self.sources.append(usable)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_size

    def window_at(self, index: int, epoch: int | None = None) -> tuple[int, FileEntry, Window]:
        """(label, file, Window) of item `index` of `epoch` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        k = int(rng.integers(len(self.sources)))
        label, files = self.labels[k], self.sources[k]
        w = np.array([n for _, _, n in files], dtype=np.float64)
        f, ivs, _ = files[int(rng.choice(len(files), p=w / w.sum()))] if len(files) > 1 else files[0]
        win = sample_window(ivs, self.window, rng, self.manifest.genome(f), self.max_n_frac,
                            rc_prob=0.5 if self.rc_augment else 0.0)
        return label, f, win

    def __getitem__(self, index: int):
        if not 0 <= index < self.epoch_size:
            raise IndexError(f"SpeciesWindowDataset: index {index} outside 0..{self.epoch_size - 1}")
        label, f, w = self.window_at(index)
        ids = self.manifest.genome(f).ids(w.contig, w.start, w.end, w.strand)
        return torch.from_numpy(ids.astype(np.int64)), label


class SpeciesEvalWindows(torch.utils.data.Dataset):
    """A fixed list of tiled (label, file, Window); item -> (ids LongTensor (L,), label int)."""

    def __init__(self, manifest: SpeciesManifest, items: list[tuple[int, FileEntry, Window]]):
        self.manifest, self.items = manifest, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        label, f, w = self.items[index]
        ids = self.manifest.genome(f).ids(w.contig, w.start, w.end, w.strand)
        return torch.from_numpy(ids.astype(np.int64)), label

    def meta(self, index: int) -> dict:
        """Where item `index` came from: species, file, contig, start, end, strand."""
        label, f, w = self.items[index]
        return {"species": self.manifest.species[label], "file": str(f.path), "contig": w.contig,
                "start": w.start, "end": w.end, "strand": w.strand}


def species_eval_windows(manifest: SpeciesManifest, split: str, window: int = 1024,
                         stride: int | None = None, max_per_species: int | None = None,
                         max_n_frac: float = 0.1) -> SpeciesEvalWindows:
    """Tiled, deterministic evaluation windows of `split` (+ strand).

    Windows start every `stride` bp (default: window, i.e. non-overlapping) within each
    file's split intervals; windows with more than max_n_frac N are skipped. When a
    species has more than max_per_species, an evenly spaced subset is kept so that the
    whole genome slice stays represented. Species without data in `split` are left out;
    a split without any data raises DataError.
    """
    items = []
    for sp, parts in manifest.split_files(split).items():
        if not parts:
            continue  # this species has no file in `split` (only train is required)
        label = manifest.label(sp)
        tiles = []
        for f, ivs in parts:
            ivs = [iv for iv in ivs if len(iv) >= window]
            if ivs:
                g = manifest.genome(f)
                tiles += [(label, f, w) for w in tile_windows(ivs, window, stride, g, max_n_frac)]
        if not tiles:
            raise DataError(f"{manifest.path}: species {sp!r} has no {split} window of {window} bp "
                            f"with at most {max_n_frac:.0%} N; use a shorter window or add {split} data")
        if max_per_species is not None and len(tiles) > max_per_species:
            keep = np.linspace(0, len(tiles) - 1, max_per_species).round().astype(int)
            tiles = [tiles[i] for i in keep]
        items += tiles
    if not items:
        raise DataError(f"{manifest.path}: no file or region is in the {split} split; give files "
                        f"'split: {split}' or '{split}' regions (see datasets/README.md)")
    return SpeciesEvalWindows(manifest, items)


__all__ = ["SPLITS", "FileEntry", "SpeciesManifest", "SpeciesWindowDataset", "SpeciesEvalWindows",
           "species_eval_windows"]
