"""Build a species dataset (bgzipped FASTA slices + manifest + provenance) from FASTA files.

`prepare_species` reads each strain's FASTA (plain, gzip or bgzip), copies a contiguous
slice of every record, writes it as bgzipped FASTA (Bio.bgzf) with its .fai/.gzi index,
and writes manifest.yaml (format: seqlab.data.species) and PROVENANCE.md beside them.

Whole strains are held out: the last `test_strains_per_species` strains listed for a
species go to test, the one before them to val when the species has at least three
strains; otherwise val is the tail `val_fraction` of each train strain's slices.

Strain k of n takes its slice starting at fraction k/n along each record, so strains of
one species contribute different parts of the genome: a held-out strain then tests
species-level signal rather than recall of a near-identical training region.
"""
from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import yaml
from Bio import SeqIO, bgzf

from seqlab.data.genome import Genome

RAGOUT_EXAMPLES = Path("/usr/share/doc/ragout/examples")
_RAGOUT_SPECIES = {"E.Coli": "Escherichia coli", "V.Cholerae": "Vibrio cholerae",
                   "S.Aureus": "Staphylococcus aureus", "H.Pylori": "Helicobacter pylori"}
# Strain order per species: the held-out strains come last (test last, val before it).
# The reference strain of each species (MG1655, N16961, N315, G27) stays in train.
_RAGOUT_ORDER = {
    "E.Coli": ["MG1655-K12", "DH1"],
    "V.Cholerae": ["O1_biovar", "O395", "H1", "O1_Inaba"],
    "S.Aureus": ["N315", "COL", "RF122", "JKD6008", "USA300_FPR3757"],
    "H.Pylori": ["G27", "ELS37", "Gambia94_24", "Puno120", "SJM180"],
}


def debian_sources(root: str | os.PathLike = RAGOUT_EXAMPLES) -> dict[str, list[Path]]:
    """species name -> strain FASTA paths from Debian's ragout-examples package, if installed.

    Paths are /usr/share/doc/ragout/examples/{E.Coli,V.Cholerae,S.Aureus,H.Pylori}/references/
    *.fasta.gz, ordered so that the held-out strains come last. Species whose folder is
    missing are left out; an empty dict means the package is not installed
    (`apt-get install ragout-examples`).
    """
    root = Path(root)
    out = {}
    for folder, species in _RAGOUT_SPECIES.items():
        refs = root / folder / "references"
        if not refs.is_dir():
            continue
        found = {p.name[: -len(".fasta.gz")]: p for p in refs.glob("*.fasta.gz")}
        order = [s for s in _RAGOUT_ORDER[folder] if s in found]
        order += sorted(s for s in found if s not in order)
        if order:
            out[species] = [found[s] for s in order]
    return out


RAGOUT_LICENCE = ("Sequences: NCBI GenBank/RefSeq records (NCBI places no restrictions on their use "
                  "or distribution); packaged in Debian's ragout-examples 2.3-4 (BSD-3-clause, "
                  "the Ragout authors)")
RAGOUT_NOTE = """Complete bacterial chromosomes from Debian's `ragout-examples` package (version 2.3-4,
BSD-3-clause, (c) 2013-2018 the Ragout authors; files under
/usr/share/doc/ragout/examples/<species>/references/). The sequences themselves are NCBI
GenBank/RefSeq records; the accession of each is in its original header (below). The
MG1655 file's header ('>K-12-MG1655') carries no accession; its length, 4,639,675 bp,
matches RefSeq NC_000913.2 (E. coli K-12 MG1655)."""


def prepare_bacteria_bundle(out_dir: str | os.PathLike = "datasets/bacteria",
                            bytes_per_strain: int = 450_000,
                            root: str | os.PathLike = RAGOUT_EXAMPLES) -> Path:
    """Rebuild the bundled 4-species dataset (datasets/bacteria) from ragout-examples.

    Needs `apt-get install ragout-examples`. Returns the manifest path.
    """
    sources = debian_sources(root)
    missing = sorted(set(_RAGOUT_SPECIES.values()) - set(sources))
    if missing:
        raise FileNotFoundError(f"{root}: ragout-examples species {missing} not found; "
                                "install them with `apt-get install ragout-examples`")
    return prepare_species(sources, out_dir, bytes_per_strain, dataset="bacteria",
                           licence=RAGOUT_LICENCE, source_note=RAGOUT_NOTE)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _strain_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bgz", ".fasta", ".fa", ".fna"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def accession_of(header: str) -> str:
    """NCBI accession from a FASTA header: 'gi|1|ref|NC_017625.1| ...' -> 'NC_017625.1';
    a header without an NCBI-style id gives its first word."""
    m = re.search(r"\|(?:ref|gb|emb|dbj)\|([A-Za-z0-9_.]+)\|", header)
    return m.group(1) if m else header.split()[0]


def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rt") if magic == b"\x1f\x8b" else open(path)


def _write_bgzf_fasta(path: Path, records: list[tuple[str, str]], width: int = 80) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with bgzf.BgzfWriter(str(tmp), "wb") as out:
        for header, seq in records:
            out.write(f">{header}\n".encode())
            for i in range(0, len(seq), width):
                out.write(seq[i: i + width].encode() + b"\n")
    os.replace(tmp, path)  # never leave a half-written FASTA under the final name
    for side in (".fai", ".gzi"):
        Path(str(path) + side).unlink(missing_ok=True)


def slice_strain(src: Path, bases: int, offset_frac: float, min_record: int = 10_000) -> list[dict]:
    """Take `bases` bases from one strain FASTA, split over its records in proportion to
    their length (records shorter than min_record are skipped), each slice starting at
    `offset_frac` of the way along its record. Returns one dict per slice with
    header, accession, start, end (0-based half-open in the original record) and seq."""
    with _open_text(src) as fh:
        recs = [(r.description, str(r.seq)) for r in SeqIO.parse(fh, "fasta")]
    if not recs:
        raise ValueError(f"{src}: no FASTA records found; expected lines starting with '>'")
    recs = [r for r in recs if len(r[1]) >= min_record]
    if not recs:
        raise ValueError(f"{src}: every record is shorter than min_record={min_record} bp")
    total = sum(len(s) for _, s in recs)
    out = []
    for header, seq in recs:
        take = min(len(seq), max(1, round(bases * len(seq) / total)))
        start = int(offset_frac * (len(seq) - take))
        out.append({"header": header, "accession": accession_of(header), "start": start,
                    "end": start + take, "seq": seq[start: start + take]})
    return out


def prepare_species(sources: dict[str, list[str | os.PathLike]], out_dir: str | os.PathLike,
                    bytes_per_strain: int, test_strains_per_species: int = 1,
                    val_strains_per_species: int = 1, val_fraction: float = 0.1,
                    dataset: str = "species", licence: str = "see PROVENANCE.md",
                    source_note: str = "") -> Path:
    """Write a species dataset under out_dir and return the path of its manifest.yaml.

    Args:
        sources: species name -> strain FASTA paths (one strain per file); order matters:
            the last ones are held out (test, then val).
        bytes_per_strain: bases copied from each strain (spread over its records).
        test_strains_per_species: whole strains held out for test (species need more
            strains than that, so that one remains for train).
        val_strains_per_species: whole strains held out for val where a species has at
            least test + val + 1 strains; otherwise val is the last val_fraction of each
            train strain (a region split, no overlap with train).
        dataset, licence, source_note: written into the manifest / PROVENANCE.md.
    Layout: out_dir/<species_slug>/<strain>.fa.gz (+ .fai, .gzi), manifest.yaml, PROVENANCE.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"dataset": dataset, "licence": licence, "provenance": "PROVENANCE.md",
                "prepared_by": "seqlab.data.prepare.prepare_species",
                "bytes_per_strain": int(bytes_per_strain), "species": {}}
    rows = []
    for species, paths in sources.items():
        paths = [Path(p) for p in paths]
        n = len(paths)
        if n <= test_strains_per_species:
            raise ValueError(f"prepare_species: species {species!r} has {n} strain file(s) {paths}; "
                             f"holding out {test_strains_per_species} for test leaves none to train on")
        n_val = val_strains_per_species if n >= test_strains_per_species + val_strains_per_species + 1 else 0
        entries = []
        for k, src in enumerate(paths):
            if not src.is_file():
                raise FileNotFoundError(f"prepare_species: species {species!r}: {src} not found")
            role = "test" if k >= n - test_strains_per_species else \
                "val" if k >= n - test_strains_per_species - n_val else "train"
            strain = _strain_name(src)
            slices = slice_strain(src, bytes_per_strain, k / n)
            rel = Path(_slug(species)) / f"{_slug(strain)}.fa.gz"
            (out_dir / rel.parent).mkdir(parents=True, exist_ok=True)
            records = [(f"{s['accession']}_{s['start']}_{s['end']} strain={strain} "
                        f"original={s['header'].split()[0]} start={s['start']} end={s['end']}", s["seq"])
                       for s in slices]
            _write_bgzf_fasta(out_dir / rel, records)
            Genome(out_dir / rel)  # builds .fai and .gzi so read-only installs need no writes
            entry = {"path": rel.as_posix(), "strain": strain,
                     "accessions": [s["accession"] for s in slices],
                     "source": str(src), "slices": [f"{s['accession']}:{s['start']}-{s['end']}" for s in slices]}
            if role == "train" and n_val == 0:
                entry["regions"] = {"train": [0.0, round(1 - val_fraction, 6)],
                                    "val": [round(1 - val_fraction, 6), 1.0]}
            else:
                entry["split"] = role
            entries.append(entry)
            for s in slices:
                rows.append((species, strain, role if "split" in entry else "train+val (regions)",
                             src.name, s["header"], s["accession"], s["start"], s["end"]))
        manifest["species"][species] = entries
    path = out_dir / "manifest.yaml"
    with open(path, "w") as fh:
        fh.write(f"# {dataset}: written by seqlab.data.prepare.prepare_species; "
                 "format described in datasets/README.md\n")
        yaml.safe_dump(manifest, fh, sort_keys=False, width=120, default_flow_style=None)
    _write_provenance(out_dir / "PROVENANCE.md", dataset, licence, source_note, rows)
    return path


def _write_provenance(path: Path, dataset: str, licence: str, note: str, rows: list[tuple]) -> None:
    lines = [f"# Provenance of `{dataset}`", ""]
    if note:
        lines += [note.strip(), ""]
    lines += [f"Licence: {licence}", "",
              "Each bundled file holds, per original record, the slice [start, end) (0-based, "
              "half-open) of the original sequence named below.", "",
              "| species | strain | split | original file | original record | accession | start | end |",
              "|---|---|---|---|---|---|---|---|"]
    for sp, strain, role, fname, header, acc, s, e in rows:
        header = header.replace("|", "\\|")  # keep the markdown table intact
        lines.append(f"| {sp} | {strain} | {role} | {fname} | `{header}` | {acc} | {s} | {e} |")
    path.write_text("\n".join(lines) + "\n")
