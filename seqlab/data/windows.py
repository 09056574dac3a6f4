"""Fixed-length windows over contigs or BED intervals, and region splits.

All coordinates are 0-based half-open. A window never crosses the boundary of the
interval it was drawn from, so windows drawn from disjoint intervals (the train/val/test
regions of `split_contig`) can never share a base.

Randomness always comes from a numpy Generator passed in (or built from a seed), so
the same seed gives the same windows on every machine.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from seqlab.data.genome import Genome

_N_BYTES = (ord("N"), ord("n"))


@dataclass(frozen=True)
class Window:
    """[start, end) on `contig`; strand "-" means read as the reverse complement."""

    contig: str
    start: int
    end: int
    strand: str = "+"

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Interval:
    """A BED-style interval: chrom, [start, end), optional name, score and strand ("." = none)."""

    chrom: str
    start: int
    end: int
    name: str | None = None
    score: float | None = None
    strand: str = "."

    def __len__(self) -> int:
        return self.end - self.start


def contig_intervals(genome: Genome | Mapping[str, int]) -> list[Interval]:
    """One Interval per contig covering it entirely, in file order."""
    lengths = genome.lengths if isinstance(genome, Genome) else genome
    return [Interval(name, 0, int(n)) for name, n in lengths.items()]


def read_bed(path: str | os.PathLike, genome: Genome | None = None) -> list[Interval]:
    """Read a BED file (3 to 6 tab-separated columns: chrom start end [name score strand]).

    Blank, '#', 'track' and 'browser' lines are skipped. With `genome`, every interval is
    checked against its contig. Errors name the file, the line number and the value.
    """
    out = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            cols = line.rstrip("\n\r").split("\t")
            if len(cols) < 3:
                raise ValueError(f"{path}:{lineno}: BED line {line.strip()!r} has {len(cols)} "
                                 "tab-separated columns; need at least chrom, start, end")
            chrom = cols[0]
            try:
                start, end = int(cols[1]), int(cols[2])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: start/end {cols[1]!r}, {cols[2]!r} are not "
                                 "integers (BED is 0-based half-open)") from None
            if not 0 <= start < end:
                raise ValueError(f"{path}:{lineno}: interval {chrom}:{start}-{end} needs "
                                 "0 <= start < end (BED is 0-based half-open)")
            name = cols[3] if len(cols) > 3 and cols[3] not in ("", ".") else None
            score = None
            if len(cols) > 4 and cols[4] not in ("", "."):
                try:
                    score = float(cols[4])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: score {cols[4]!r} is not a number") from None
            strand = cols[5] if len(cols) > 5 and cols[5] else "."
            if strand not in ("+", "-", "."):
                raise ValueError(f"{path}:{lineno}: strand {strand!r} must be '+', '-' or '.'")
            if genome is not None:
                if chrom not in genome.lengths:
                    raise ValueError(f"{path}:{lineno}: contig {chrom!r} is not in {genome.path}")
                if end > genome.lengths[chrom]:
                    raise ValueError(f"{path}:{lineno}: end {end} is past the end of {chrom!r} "
                                     f"(length {genome.lengths[chrom]}) in {genome.path}")
            out.append(Interval(chrom, start, end, name, score, strand))
    return out


def n_fraction(seq: str | bytes | np.ndarray) -> float:
    """Fraction of N/n in a sequence (str, bytes or byte-id array); 0.0 when empty."""
    arr = seq if isinstance(seq, np.ndarray) else np.frombuffer(
        seq.encode("latin-1") if isinstance(seq, str) else bytes(seq), dtype=np.uint8)
    if arr.size == 0:
        return 0.0
    return float(np.isin(arr, _N_BYTES).mean())


def split_contig(name: str, length: int, fractions: Mapping[str, float] | Sequence[tuple[str, float]],
                 ) -> dict[str, Interval]:
    """Cut one contig into consecutive, non-overlapping regions by fraction.

    `split_contig("chr1", 1000, {"train": 0.8, "val": 0.1, "test": 0.1})` gives
    train [0, 800), val [800, 900), test [900, 1000): regions follow the given order and
    tile the contig exactly (the last one absorbs rounding). For species with a single
    strain: windows drawn within each region cannot leak across splits.
    """
    items = list(fractions.items()) if isinstance(fractions, Mapping) else list(fractions)
    total = sum(f for _, f in items)
    if any(f < 0 for _, f in items) or not np.isclose(total, 1.0):
        raise ValueError(f"split_contig({name!r}): fractions {dict(items)} must be >= 0 and sum to 1")
    out, start, acc = {}, 0, 0.0
    for i, (split, f) in enumerate(items):
        acc += f
        end = length if i == len(items) - 1 else int(round(acc * length))
        out[split] = Interval(name, start, end, name=split)
        start = end
    return out


def _usable(regions: Iterable[Interval], length: int, genome: Genome | None = None,
            ) -> tuple[list[Interval], np.ndarray]:
    regions = list(regions)
    if length <= 0:
        raise ValueError(f"window length must be positive, got {length}")
    usable = [r for r in regions if len(r) >= length]
    if not usable:
        longest = max(regions, key=len, default=None)
        where = f"the longest is {longest.chrom}:{longest.start}-{longest.end} ({len(longest)} bp)" \
            if longest is not None else "no regions were given"
        src = f"{genome.path}: " if genome is not None else ""
        raise ValueError(f"{src}window length {length} is longer than every region; {where}. "
                         "Use a shorter window or longer regions")
    starts = np.array([len(r) - length + 1 for r in usable], dtype=np.float64)
    return usable, starts


def tile_windows(regions: Iterable[Interval], length: int, stride: int | None = None,
                 genome: Genome | None = None, max_n_frac: float = 1.0) -> list[Window]:
    """Windows at start, start+stride, ... inside each region (stride defaults to length).

    The last partial window of a region is dropped. With `genome` and max_n_frac < 1,
    windows with a larger fraction of N are skipped. Strand is "+".
    """
    stride = length if stride is None else stride
    if stride <= 0:
        raise ValueError(f"tile_windows: stride must be positive, got {stride}")
    usable, _ = _usable(regions, length, genome)
    out = []
    for r in usable:
        for s in range(r.start, r.end - length + 1, stride):
            w = Window(r.chrom, s, s + length)
            if genome is not None and max_n_frac < 1.0 and \
                    n_fraction(genome.ids(w.contig, w.start, w.end)) > max_n_frac:
                continue
            out.append(w)
    return out


def sample_window(regions: Sequence[Interval], length: int, rng: np.random.Generator,
                  genome: Genome | None = None, max_n_frac: float = 1.0, rc_prob: float = 0.0,
                  max_tries: int = 64) -> Window:
    """One random window: a region chosen with weight = its number of start positions,
    a uniform start within it, strand "-" with probability rc_prob.

    Windows with more than max_n_frac N (needs `genome`) are redrawn; after max_tries
    failures the error names the genome and regions (e.g. an all-N contig).
    """
    usable, weights = _usable(regions, length, genome)
    p = weights / weights.sum()
    for _ in range(max_tries):
        r = usable[rng.choice(len(usable), p=p)] if len(usable) > 1 else usable[0]
        s = r.start + int(rng.integers(0, len(r) - length + 1))
        strand = "-" if rc_prob > 0 and rng.random() < rc_prob else "+"
        w = Window(r.chrom, s, s + length, strand)
        if genome is None or max_n_frac >= 1.0:
            return w
        frac = n_fraction(genome.ids(w.contig, w.start, w.end))
        if frac <= max_n_frac:
            return w
    names = ", ".join(f"{r.chrom}:{r.start}-{r.end}" for r in usable[:5])
    raise ValueError(f"{genome.path if genome is not None else '<regions>'}: no window of {length} bp with "
                     f"at most {max_n_frac:.0%} N in {max_tries} draws from {names} (last had {frac:.0%} N); "
                     "the regions are (almost) all N: drop them or raise max_n_frac")


def random_windows(regions: Sequence[Interval], length: int, n: int, seed: int,
                   genome: Genome | None = None, max_n_frac: float = 1.0,
                   rc_prob: float = 0.0) -> list[Window]:
    """`n` windows drawn by `sample_window` from one Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return [sample_window(regions, length, rng, genome, max_n_frac, rc_prob) for _ in range(n)]
