"""Build a species dataset (bgzipped FASTA slices + manifest + provenance) from FASTA files.

`prepare_species` reads each strain's FASTA (plain, gzip or bgzip), copies a contiguous
slice of every record, writes it as bgzipped FASTA in `bgzip`'s block layout with its
.fai/.gzi index, and writes manifest.yaml (format: seqlab.data.species) and PROVENANCE.md
beside them. Everything is written into a temporary folder beside the output folder and
renamed at the end, so a failed run leaves nothing under the output name.

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
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml
from Bio import bgzf

from seqlab.data.genome import Genome
from seqlab.errors import ConfigError, DataError, MissingInput
from seqlab.utils import atomic_directory

# Uncompressed bytes per BGZF block as `bgzip` (htslib's BGZF_BLOCK_SIZE, 0xff00) writes
# them; Bio.bgzf.BgzfWriter alone fills blocks to 65,536 bytes.
BGZIP_BLOCK_SIZE = 0xFF00

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
                            bases_per_strain: int = 450_000,
                            root: str | os.PathLike = RAGOUT_EXAMPLES,
                            overwrite: bool = False) -> Path:
    """Rebuild the bundled 4-species dataset (datasets/bacteria) from ragout-examples.

    Needs `apt-get install ragout-examples`. Returns the manifest path.
    """
    sources = debian_sources(root)
    missing = sorted(set(_RAGOUT_SPECIES.values()) - set(sources))
    if missing:
        raise MissingInput(f"{root}: ragout-examples species {missing} not found; "
                           "install them with `apt-get install ragout-examples`")
    return prepare_species(sources, out_dir, bases_per_strain, dataset="bacteria",
                           licence=RAGOUT_LICENCE, source_note=RAGOUT_NOTE, overwrite=overwrite)


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


def _open_binary(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def parse_fasta(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(header, sequence) of each record of a plain or gzip/bgzip FASTA file, in file order.

    The header is the '>' line without the '>'; sequence lines are joined. Blank lines and
    CRLF line ends are accepted. Stricter than Bio.SeqIO, whose messages name no file:
    text before the first header, an empty header, a sequence line holding anything but
    ASCII letters, and a corrupt gzip stream raise DataError naming the file, the line,
    the record and the value.
    """
    path = Path(path)
    header, parts, k, lineno = None, [], 0, 0

    def where(at: str = "line") -> str:
        rec = f", record {k} ({header.split()[0]!r})" if header else ""
        return f"{path}: {at} {lineno}{rec}"

    try:
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                line = raw.strip()
                if line.startswith(b">"):
                    if header is not None:
                        yield header, "".join(parts)
                    header, parts, k = line[1:].decode("latin-1").strip(), [], k + 1
                    if not header:
                        raise DataError(f"{where()}: record {k} has an empty header line; give it "
                                        "a name ('>name description')")
                elif not line:
                    continue
                elif header is None:
                    raise DataError(f"{where()}: {line[:40].decode('latin-1')!r} comes before the "
                                    "first '>' header line; a FASTA file starts with a header like "
                                    "'>chr1' (is this FASTQ, GenBank or a text file?)")
                elif not line.isalpha():
                    bad = next(bytes([b]) for b in line if not bytes([b]).isalpha())
                    raise DataError(f"{where()}: {bad.decode('latin-1')!r} in "
                                    f"{line[:60].decode('latin-1')!r} is not a base; sequence lines "
                                    "hold letters only (IUPAC codes such as A, C, G, T, N)")
                else:
                    parts.append(line.decode("ascii"))
    except (EOFError, OSError, zlib.error, struct.error) as err:
        raise DataError(f"{where('after line')}: corrupt or truncated compressed file "
                        f"({type(err).__name__}: {err}); download or decompress it again") from None
    if header is not None:
        yield header, "".join(parts)


def write_bgzf(path: str | os.PathLike, pieces: Iterable[bytes]) -> Path:
    """Write the concatenation of `pieces` to `path` as BGZF in `bgzip`'s layout; returns path.

    Every block but the last holds BGZIP_BLOCK_SIZE uncompressed bytes, then comes the
    empty EOF block. The file appears under `path` only when complete; a stale .fai/.gzi
    beside it is removed (Genome rebuilds them).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with bgzf.BgzfWriter(str(tmp), "wb") as out:
            pending = bytearray()
            for piece in pieces:
                pending += piece
                while len(pending) >= BGZIP_BLOCK_SIZE:
                    _write_block(out, bytes(pending[:BGZIP_BLOCK_SIZE]))
                    del pending[:BGZIP_BLOCK_SIZE]
            if pending:
                _write_block(out, bytes(pending))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for side in (".fai", ".gzi"):
        Path(str(path) + side).unlink(missing_ok=True)
    return path


def _write_block(out: bgzf.BgzfWriter, block: bytes) -> None:
    # BgzfWriter keeps writes shorter than 65,536 bytes in its buffer, and flush() writes
    # the whole buffer as one block: one block of exactly `block`.
    out.write(block)
    out.flush()


def rewrite_bgzf(path: str | os.PathLike) -> Path:
    """Recompress a BGZF (or gzip) file in place in `bgzip`'s block layout and rebuild its
    .fai/.gzi; the decompressed content is unchanged. Returns `path`."""
    path = Path(path)

    def chunks() -> Iterator[bytes]:
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(f"{path}: cannot decompress ({type(err).__name__}: {err}); the file "
                            "is corrupt or not gzip/BGZF") from None

    write_bgzf(path, chunks())
    Genome(path).close()  # writes the .fai and .gzi
    return path


def _write_bgzf_fasta(path: Path, records: list[tuple[str, str]], width: int = 80) -> None:
    def lines() -> Iterator[bytes]:
        for header, seq in records:
            yield f">{header}\n".encode()
            for i in range(0, len(seq), width):
                yield seq[i: i + width].encode() + b"\n"

    write_bgzf(path, lines())


def slice_strain(src: Path, bases: int, offset_frac: float, min_record: int = 10_000) -> list[dict]:
    """Take `bases` bases from one strain FASTA, split over its records in proportion to
    their length (records shorter than min_record are skipped), each slice starting at
    `offset_frac` of the way along its record; a strain with fewer usable bases gives all
    of them. Returns one dict per slice with header, accession, start, end (0-based
    half-open in the original record) and seq."""
    recs = list(parse_fasta(src))
    if not recs:
        raise DataError(f"{src}: no FASTA records found; expected lines starting with '>'")
    recs = [r for r in recs if len(r[1]) >= min_record]
    if not recs:
        raise DataError(f"{src}: every record is shorter than min_record={min_record} bp")
    total = sum(len(s) for _, s in recs)
    out = []
    for header, seq in recs:
        take = min(len(seq), max(1, round(bases * len(seq) / total)))
        start = int(offset_frac * (len(seq) - take))
        out.append({"header": header, "accession": accession_of(header), "start": start,
                    "end": start + take, "seq": seq[start: start + take]})
    return out


def check_output_folder(out_dir: str | os.PathLike, marker: str, overwrite: bool) -> Path:
    """The absolute output folder of a `prepare` run, after checking it may be (re)written.

    A missing or empty folder is fine. An existing data set (a folder holding `marker`,
    e.g. manifest.yaml) is replaced only with overwrite=True (`--overwrite`); any other
    existing file or folder is refused either way, so a mistyped --out never deletes
    unrelated files.
    """
    out = Path(out_dir).resolve()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if out.is_dir() and (out / marker).is_file():
        if overwrite:
            return out
        raise ConfigError(f"{out}: output folder already holds a data set ({marker}); choose "
                          "another --out, or pass --overwrite (overwrite=True) to replace it")
    raise ConfigError(f"{out}: output path exists and is not a data set folder (no {marker}); "
                      "choose another --out (--overwrite only replaces an earlier data set)")


def prepare_species(sources: dict[str, list[str | os.PathLike]], out_dir: str | os.PathLike,
                    bases_per_strain: int, test_strains_per_species: int = 1,
                    val_strains_per_species: int = 1, val_fraction: float = 0.1,
                    dataset: str = "species", licence: str = "see PROVENANCE.md",
                    source_note: str = "", overwrite: bool = False) -> Path:
    """Write a species dataset under out_dir and return the path of its manifest.yaml.

    Args:
        sources: species name -> strain FASTA paths (one strain per file); order matters:
            the last ones are held out (test, then val).
        bases_per_strain: bases copied from each strain (spread over its records); a
            shorter strain gives all its bases. The manifest records the request as
            `bases_per_strain_requested` and each file's written total as `bases`.
        test_strains_per_species: whole strains held out for test (species need more
            strains than that, so that one remains for train).
        val_strains_per_species: whole strains held out for val where a species has at
            least test + val + 1 strains; otherwise val is the last val_fraction of each
            train strain (a region split, no overlap with train).
        dataset, licence, source_note: written into the manifest / PROVENANCE.md.
        overwrite: replace an earlier data set in out_dir (a folder with a manifest.yaml);
            without it an existing non-empty out_dir is refused.
    Layout: out_dir/<species_slug>/<strain>.fa.gz (+ .fai, .gzi), manifest.yaml, PROVENANCE.md.
    Raises ConfigError for the arguments, MissingInput for a missing source and DataError
    (file, line, record) for a malformed one; out_dir is then left as it was.
    """
    out_dir = check_output_folder(out_dir, "manifest.yaml", overwrite)
    plan = []
    for species, paths in sources.items():
        paths = [Path(p) for p in paths]
        n = len(paths)
        if n <= test_strains_per_species:
            raise ConfigError(f"prepare_species: species {species!r} has {n} strain file(s) "
                              f"{[str(p) for p in paths]}; holding out {test_strains_per_species} "
                              "for test leaves none to train on")
        for src in paths:
            if not src.is_file():
                raise MissingInput(f"prepare_species: species {species!r}: {src} not found")
        plan.append((species, paths))
    manifest = {"dataset": dataset, "licence": licence, "provenance": "PROVENANCE.md",
                "prepared_by": "seqlab.data.prepare.prepare_species",
                "bases_per_strain_requested": int(bases_per_strain), "species": {}}
    rows = []
    with atomic_directory(out_dir) as tmp:
        for species, paths in plan:
            n = len(paths)
            n_val = val_strains_per_species \
                if n >= test_strains_per_species + val_strains_per_species + 1 else 0
            entries = []
            for k, src in enumerate(paths):
                role = "test" if k >= n - test_strains_per_species else \
                    "val" if k >= n - test_strains_per_species - n_val else "train"
                strain = _strain_name(src)
                slices = slice_strain(src, bases_per_strain, k / n)
                rel = Path(_slug(species)) / f"{_slug(strain)}.fa.gz"
                (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
                records = [(f"{s['accession']}_{s['start']}_{s['end']} strain={strain} "
                            f"original={s['header'].split()[0]} start={s['start']} end={s['end']}",
                            s["seq"]) for s in slices]
                _write_bgzf_fasta(tmp / rel, records)
                Genome(tmp / rel).close()  # builds .fai and .gzi so read-only installs need no writes
                entry = {"path": rel.as_posix(), "strain": strain,
                         "bases": sum(s["end"] - s["start"] for s in slices),
                         "accessions": [s["accession"] for s in slices], "source": str(src),
                         "slices": [f"{s['accession']}:{s['start']}-{s['end']}" for s in slices]}
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
        with open(tmp / "manifest.yaml", "w") as fh:
            fh.write(f"# {dataset}: written by seqlab.data.prepare.prepare_species; "
                     "format described in datasets/README.md\n")
            yaml.safe_dump(manifest, fh, sort_keys=False, width=120, default_flow_style=None)
        _write_provenance(tmp / "PROVENANCE.md", dataset, licence, source_note, rows)
    return out_dir / "manifest.yaml"


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
