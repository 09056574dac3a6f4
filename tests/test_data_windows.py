"""Windows, BED, region splits, species manifests/datasets, collation and the bundled data."""
from pathlib import Path

import numpy as np
import pytest
import torch

from seqlab.data.alphabet import PAD_ID
from seqlab.data.collate import Batch, pack_collate, pad_collate
from seqlab.data.genome import Genome
from seqlab.data.species import SpeciesManifest, SpeciesWindowDataset, species_eval_windows
from seqlab.data.windows import (Interval, contig_intervals, n_fraction, random_windows,
                                 read_bed, sample_window, split_contig, tile_windows)

BUNDLE = Path(__file__).resolve().parents[1] / "datasets" / "bacteria" / "manifest.yaml"


def random_dna(rng, n):
    return "".join(rng.choice(list("ACGT"), size=n))


def write_fasta(path, records):
    path.write_text("".join(f">{k}\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n"
                            for k, s in records.items()))
    return path


@pytest.fixture
def genome(tmp_path):
    rng = np.random.default_rng(0)
    # chrN: 300 bp of sequence, then 200 N, then 300 bp: windows over the middle are N-rich
    recs = {"chrA": random_dna(rng, 1000), "chrN": random_dna(rng, 300) + "N" * 200 + random_dna(rng, 300),
            "tiny": "ACGTACGTAC"}
    return Genome(write_fasta(tmp_path / "g.fa", recs)), recs


# --- windows --------------------------------------------------------------------------
def test_tile_windows_positions_and_sequence(genome):
    g, recs = genome
    ws = tile_windows([Interval("chrA", 100, 420)], 100, stride=50)
    assert [(w.start, w.end) for w in ws] == [(100, 200), (150, 250), (200, 300), (250, 350), (300, 400)]
    assert g.fetch("chrA", ws[1].start, ws[1].end) == recs["chrA"][150:250]
    # whole contigs; "tiny" (10 bp) is too short for a 100 bp window and yields none
    assert len(tile_windows(contig_intervals(g), 100)) == 10 + 8


def test_random_windows_deterministic_and_in_bounds(genome):
    g, _ = genome
    regions = contig_intervals(g)
    a = random_windows(regions, 64, 200, seed=7, rc_prob=0.5)
    assert a == random_windows(regions, 64, 200, seed=7, rc_prob=0.5)
    assert a != random_windows(regions, 64, 200, seed=8, rc_prob=0.5)
    for w in a:
        assert len(w) == 64 and 0 <= w.start and w.end <= g.lengths[w.contig] and w.contig != "tiny"
    strands = {w.strand for w in a}
    assert strands == {"+", "-"}
    # weighted by number of start positions: chrA has 937 of 937 + 737
    frac_a = np.mean([w.contig == "chrA" for w in random_windows(regions, 64, 2000, seed=1)])
    assert abs(frac_a - 937 / (937 + 737)) < 0.04


def test_n_fraction_filter(genome):
    g, _ = genome
    assert n_fraction("ANNa") == 0.5 and n_fraction(np.array([78, 110, 65, 67], np.uint8)) == 0.5
    region = [Interval("chrN", 0, 800)]
    ws = random_windows(region, 100, 300, seed=3, genome=g, max_n_frac=0.1)
    for w in ws:
        assert n_fraction(g.fetch(w.contig, w.start, w.end)) <= 0.1
    unfiltered = random_windows(region, 100, 300, seed=3)
    assert any(n_fraction(g.fetch(w.contig, w.start, w.end)) > 0.1 for w in unfiltered)
    tiled = tile_windows(region, 100, genome=g, max_n_frac=0.1)
    assert [w.start for w in tiled] == [0, 100, 200, 500, 600, 700]


def test_all_n_region_error_names_file_and_region(tmp_path):
    g = Genome(write_fasta(tmp_path / "gap.fa", {"gap": "N" * 500}))
    with pytest.raises(ValueError, match=r"gap.fa: no window of 100 bp with at most 10% N .*gap:0-500"):
        sample_window(contig_intervals(g), 100, np.random.default_rng(0), g, max_n_frac=0.1)


def test_window_longer_than_every_contig(genome):
    g, _ = genome
    with pytest.raises(ValueError, match=r"window length 5000 is longer than every region; the longest is "
                                         r"chrA:0-1000 \(1000 bp\)"):
        random_windows(contig_intervals(g), 5000, 1, seed=0)
    with pytest.raises(ValueError, match=r"g.fa: window length 2000 is longer than every region"):
        tile_windows(contig_intervals(g), 2000, genome=g)


def test_split_contig_tiles_without_overlap():
    parts = split_contig("chr1", 1001, {"train": 0.8, "val": 0.1, "test": 0.1})
    assert [(p.start, p.end) for p in parts.values()] == [(0, 801), (801, 901), (901, 1001)]
    ws = {k: tile_windows([iv], 50, stride=7) for k, iv in parts.items()}
    covered = {k: set().union(*(range(w.start, w.end) for w in v)) for k, v in ws.items()}
    assert not (covered["train"] & covered["val"]) and not (covered["val"] & covered["test"])
    with pytest.raises(ValueError, match="must be >= 0 and sum to 1"):
        split_contig("chr1", 10, {"train": 0.8, "val": 0.3})


def test_read_bed(tmp_path, genome):
    g, _ = genome
    bed = tmp_path / "r.bed"
    bed.write_text("track name=x\n# comment\nchrA\t10\t50\tpeak1\t3.5\t-\nchrN\t0\t20\n")
    assert read_bed(bed, g) == [Interval("chrA", 10, 50, "peak1", 3.5, "-"), Interval("chrN", 0, 20)]
    bed.write_text("chrA\t10\tfifty\n")
    with pytest.raises(ValueError, match=r"r.bed:1: start/end '10', 'fifty' are not integers"):
        read_bed(bed)
    bed.write_text("chrA\t0\t10\nchrA\t900\t1200\n")
    with pytest.raises(ValueError, match=r"r.bed:2: end 1200 is past the end of 'chrA' \(length 1000\)"):
        read_bed(bed, g)
    bed.write_text("chrZ\t0\t10\n")
    with pytest.raises(ValueError, match=r"r.bed:1: contig 'chrZ' is not in .*g.fa"):
        read_bed(bed, g)


# --- species manifests ----------------------------------------------------------------
def make_manifest(tmp_path, body: str, files=("a1", "a2", "b1", "b2")):
    rng = np.random.default_rng(5)
    gc = {"a": "AT", "b": "GC"}  # species differ in composition, to recognise their windows
    for f in files:
        seq = "".join(rng.choice(list(gc[f[0]] * 3 + "ACGT"), size=3000))
        write_fasta(tmp_path / f"{f}.fa", {f"{f}_c1": seq[:2000], f"{f}_c2": seq[2000:]})
    path = tmp_path / "manifest.yaml"
    path.write_text(body)
    return path


GOOD = """dataset: toy
species:
  Alpha:
    - {path: a1.fa, split: train, strain: a1}
    - {path: a2.fa, split: test}
  Beta:
    - {path: b1.fa, regions: {train: [0.0, 0.8], val: [0.8, 1.0]}}
    - {path: b2.fa, split: test}
"""


def test_manifest_loads_and_splits(tmp_path):
    m = SpeciesManifest.load(make_manifest(tmp_path, GOOD))
    assert m.species == ["Alpha", "Beta"] and m.label("Beta") == 1 and m.meta["dataset"] == "toy"
    val = m.split_files("val")
    assert val["Alpha"] == []
    ((f, ivs),) = val["Beta"]
    assert f.path.name == "b1.fa" and [(i.chrom, i.start, i.end) for i in ivs] == [("b1_c1", 1600, 2000),
                                                                                   ("b1_c2", 800, 1000)]
    assert m.files[0].meta == {"strain": "a1"}


@pytest.mark.parametrize("body, message", [
    (GOOD.replace("a2.fa", "missing.fa"), r"manifest.yaml: species 'Alpha', file 'missing.fa': file not found"),
    (GOOD.replace("split: test}", "split: holdout}", 1), r"species 'Alpha', file 'a2.fa': unknown split 'holdout'"),
    (GOOD.replace("split: train, strain: a1", "split: val"), r"manifest.yaml: species 'Alpha' has no train data"),
    (GOOD.replace("[0.8, 1.0]", "[0.7, 1.0]"), r"species 'Beta', file 'b1.fa': regions train .* and val .* overlap"),
    (GOOD.replace("[0.8, 1.0]", "[0.8, 1.5]"), r"file 'b1.fa': region val: \[0.8, 1.5\] must be"),
    ("species: {}\n", r"manifest.yaml: a manifest needs a non-empty 'species:'"),
    (GOOD.replace("{path: a2.fa, split: test}", "{path: a2.fa}"), r"file 'a2.fa': give exactly one of"),
])
def test_manifest_validation_errors(tmp_path, body, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        SpeciesManifest.load(make_manifest(tmp_path, body))


def test_species_dataset_deterministic_balanced_and_no_leakage(tmp_path):
    m = SpeciesManifest.load(make_manifest(tmp_path, GOOD))
    ds = SpeciesWindowDataset(m, "train", window=200, seed=11, epoch_size=400)
    first = [ds.window_at(i) for i in range(400)]
    # random access in any order gives the same items: resumable at any step
    assert ds.window_at(123) == first[123] and torch.equal(ds[5][0], ds[5][0])
    ids, label = ds[5]
    assert ids.dtype == torch.int64 and ids.shape == (200,) and label == first[5][0]
    assert abs(np.mean([lb for lb, _, _ in first]) - 0.5) < 0.1
    ds.set_epoch(1)
    assert [ds.window_at(i) for i in range(20)] != first[:20]
    for label, f, w in first:  # train windows only from train files / the train region of b1
        assert f.path.name in ("a1.fa", "b1.fa")
        if f.path.name == "b1.fa":
            n = 2000 if w.contig == "b1_c1" else 1000
            assert w.end <= round(0.8 * n)
    assert {w.strand for _, _, w in first} == {"+", "-"}
    val = SpeciesWindowDataset(m, "val", window=150, seed=0, epoch_size=50)
    assert val.labels == [1]  # Alpha has no val data: left out, Beta keeps label 1
    for i in range(50):
        label, f, w = val.window_at(i)
        assert label == 1 and w.start >= round(0.8 * (2000 if w.contig == "b1_c1" else 1000))


def test_species_eval_windows_tiled_from_test_files_only(tmp_path):
    m = SpeciesManifest.load(make_manifest(tmp_path, GOOD))
    ev = species_eval_windows(m, "test", window=500, max_per_species=4)
    assert len(ev) == 8
    assert [ev.meta(i)["file"].endswith(("a2.fa", "b2.fa")) for i in range(8)] == [True] * 8
    assert ev.meta(0) == {"species": "Alpha", "file": str(tmp_path / "a2.fa"), "contig": "a2_c1",
                          "start": 0, "end": 500, "strand": "+"}
    ids, label = ev[7]
    assert label == 1 and ids.shape == (500,)
    again = species_eval_windows(m, "test", window=500, max_per_species=4)
    assert again.items == ev.items  # deterministic: the same evaluation set every time
    # 4 of the 6 tiles of a2 (2000 + 1000 bp), evenly spaced: tiles 0, 2, 3, 5
    assert [(ev.meta(i)["contig"], ev.meta(i)["start"]) for i in range(4)] == \
        [("a2_c1", 0), ("a2_c1", 1000), ("a2_c1", 1500), ("a2_c2", 500)]
    with pytest.raises(ValueError, match="species 'Alpha' has no test window of 5000 bp"):
        species_eval_windows(m, "test", window=5000)


# --- collation ------------------------------------------------------------------------
def test_pad_and_pack_collate():
    samples = [(torch.tensor([65, 67, 71]), 0), (np.array([84], np.uint8), 2)]
    b = pad_collate(samples)
    assert b.ids.tolist() == [[65, 67, 71], [84, PAD_ID, PAD_ID]] and b.lengths.tolist() == [3, 1]
    assert b.labels.tolist() == [0, 2] and b.cu_seqlens is None
    assert b.mask.tolist() == [[True, True, True], [True, False, False]]
    p = pack_collate(samples + [([65, 65], 1)])
    assert p.ids.tolist() == [[65, 67, 71, 84, 65, 65]] and p.lengths.tolist() == [6]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 4, 6]
    moved = p.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.cu_seqlens, p.cu_seqlens)
    d = pad_collate([{"ids": [1, 2], "meta": {"k": 1}}, {"ids": [3], "meta": {"k": 2}}])
    assert d.labels is None and d.meta == [{"k": 1}, {"k": 2}]
    with pytest.raises(ValueError, match="sample 1 has no label while others do"):
        pad_collate([([1], 0), ([2],)])


# --- the bundled data -----------------------------------------------------------------
def test_bundled_manifest_yields_windows_of_each_species():
    m = SpeciesManifest.load(BUNDLE)
    assert m.species == ["Escherichia coli", "Vibrio cholerae", "Staphylococcus aureus", "Helicobacter pylori"]
    strains = {sp: sorted(f.meta["strain"] for f in m.files if f.species == sp) for sp in m.species}
    assert [len(v) for v in strains.values()] == [2, 4, 5, 5]
    test_strains = sorted(f.meta["strain"] for f in m.files if f.split == "test")
    assert test_strains == ["DH1", "O1_Inaba", "SJM180", "USA300_FPR3757"]
    size = sum(p.stat().st_size for p in BUNDLE.parent.rglob("*") if p.is_file())
    assert size < 2.5e6
    ds = SpeciesWindowDataset(m, "train", window=1024, seed=0, epoch_size=64)
    labels = [ds[i][1] for i in range(64)]
    assert set(labels) == {0, 1, 2, 3}
    ev = species_eval_windows(m, "test", window=1024)
    counts = np.bincount([lb for lb, _, _ in ev.items])
    assert counts.tolist() == [439, 439, 439, 439]
    test_files = {f.path for f in m.files if f.split == "test"}
    assert {f.path for _, f, _ in ev.items} == test_files
    # GC content of a held-out S. aureus window is far below an E. coli one (0.33 vs 0.51)
    gc = [np.isin(ev[i][0].numpy(), [67, 71]).mean() for i in (0, 2 * 439)]
    assert gc[0] > gc[1] + 0.05
