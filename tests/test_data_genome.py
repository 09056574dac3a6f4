"""Alphabet, Genome (plain and bgzipped FASTA) and dataset preparation, on tiny files."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from Bio import bgzf

from seqlab.data import genome as genome_mod
from seqlab.data import prepare as prepare_mod
from seqlab.data.alphabet import (CLS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE, complement_table,
                                  decode_ids, encode_bytes, reverse_complement_ids)
from seqlab.data.genome import Genome, Region, reverse_complement
from seqlab.data.prepare import accession_of, debian_sources, prepare_species
from seqlab.data.species import SpeciesManifest
from seqlab.errors import DataError

BUNDLE = Path(__file__).resolve().parents[1] / "datasets" / "bacteria"

TINY = ">chr1 first contig\nACGTAC\nGTTTGA\nNNa\n>chr2\nggccAATT\nCG\n"
CHR1 = "ACGTACGTTTGANNa"
CHR2 = "ggccAATTCG"


def write_bio_bgzf(path, text: bytes):
    """BGZF as Bio.bgzf.BgzfWriter writes it: 65,536-byte blocks, unlike bgzip's 65,280."""
    with bgzf.BgzfWriter(str(path), "wb") as fh:
        fh.write(text)
    return path


def random_text(rng, n: int) -> str:
    return "".join(rng.choice(list("ACGT"), size=n))


def wrap(seq: str, width: int) -> str:
    return "".join(seq[i: i + width] + "\n" for i in range(0, len(seq), width))


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.fa"
    p.write_text(TINY)
    return p


# --- alphabet -------------------------------------------------------------------------
def test_special_ids_match_model_config():
    from seqlab.model.config import MambaConfig
    assert (PAD_ID, MASK_ID, CLS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258, 259, 260)
    assert MambaConfig().vocab_size == VOCAB_SIZE


def test_encode_decode_round_trip():
    ids = encode_bytes("ACgt")
    assert ids.dtype == np.uint8 and ids.tolist() == [65, 67, 103, 116]
    assert encode_bytes("ACgt", fold_case=True).tolist() == [65, 67, 71, 84]
    assert decode_ids(np.array([65, PAD_ID, 84, EOS_ID])) == "AT"
    with pytest.raises(ValueError, match="special id 256 at position 1"):
        decode_ids([65, 256], skip_specials=False)
    with pytest.raises(ValueError, match="non-ASCII"):
        encode_bytes("ACGé")


def test_reverse_complement_iupac_case_and_specials():
    seq = "ACGTRYKMBVDHSWNacgtrykmbvdhswnX"
    expected = "XnwsdhbvkmryacgtNWSDHBVKMRYACGT"
    assert decode_ids(reverse_complement_ids(encode_bytes(seq))) == expected
    assert reverse_complement(seq) == expected
    table = complement_table()
    assert table[PAD_ID] == PAD_ID and table[CLS_ID] == CLS_ID and table[ord("U")] == ord("A")
    assert torch.equal(complement_table("torch"), torch.tensor(table))
    # an involution on every id but RNA's U/u (which map to DNA's A/a)
    ids = np.array([i for i in range(VOCAB_SIZE) if i not in (ord("U"), ord("u"))])
    assert np.array_equal(table[table[ids]], ids)


def test_reverse_complement_padded_batch_numpy_and_torch():
    rows = ["AACG", "TG"]
    batch = np.full((2, 5), PAD_ID, dtype=np.int64)
    for b, s in enumerate(rows):
        batch[b, : len(s)] = encode_bytes(s)
    lengths = np.array([4, 2])
    out = reverse_complement_ids(batch, lengths)
    assert out[0].tolist() == [ord(c) for c in "CGTT"] + [PAD_ID]
    assert out[1].tolist() == [ord(c) for c in "CA"] + [PAD_ID] * 3
    tout = reverse_complement_ids(torch.from_numpy(batch), torch.from_numpy(lengths))
    assert isinstance(tout, torch.Tensor) and tout.tolist() == out.tolist()


# --- Genome ---------------------------------------------------------------------------
def test_genome_coordinates_against_known_strings(tiny):
    g = Genome(tiny)
    assert list(g) == ["chr1", "chr2"] and len(g) == 2
    assert len(g["chr1"]) == 15 and g.lengths == {"chr1": 15, "chr2": 10}
    c = g["chr1"]
    r = c[4:9]
    assert isinstance(r, Region) and r == CHR1[4:9] == "ACGTT"
    assert (r.name, r.start, r.end, r.strand) == ("chr1", 4, 9, "+")
    assert c[:] == CHR1 and c[-3:] == "NNa" and c[5] == "C" and c[-1] == "a"
    assert c[5:12] == CHR1[5:12]  # crosses a line break in the file
    assert g.fetch("chr2", 2, 7) == "ccAAT"
    assert g.fetch("chr2", 2, 7, strand="-") == "ATTgg"
    assert g.ids("chr2", 0, 4).tolist() == [103, 103, 99, 99]
    assert g.ids("chr2", 0, 4, "-").tolist() == [ord(x) for x in "ggcc"]
    assert g.fetch("chr1", 3, 3) == ""
    assert Genome(tiny, fold_case=True).fetch("chr2", 0, 4) == "GGCC"


def test_genome_out_of_range_and_unknown_contig(tiny):
    g = Genome(tiny)
    with pytest.raises(IndexError, match=r"tiny.fa: contig 'chr2': interval \[5, 11\) .*length 10"):
        g.fetch("chr2", 5, 11)
    with pytest.raises(IndexError, match=r"interval \[-1, 3\)"):
        g.ids("chr1", -1, 3)
    with pytest.raises(IndexError, match="out of range"):
        g["chr1"][10:20]
    with pytest.raises(KeyError, match="no contig named 'chrX'"):
        g["chrX"]
    with pytest.raises(ValueError, match="strand '\\*'"):
        g.fetch("chr1", 0, 2, strand="*")


def test_bgzip_round_trip_across_blocks(tmp_path):
    rng = np.random.default_rng(0)
    seqs = {f"ctg{i}": "".join(rng.choice(list("ACGTN"), size=n)) for i, n in enumerate([150_000, 70_001])}
    text = "".join(f">{k}\n" + "\n".join(s[j:j + 60] for j in range(0, len(s), 60)) + "\n" for k, s in seqs.items())
    path = write_bio_bgzf(tmp_path / "big.fa.gz", text.encode())
    g = Genome(path)
    assert (tmp_path / "big.fa.gz.fai").is_file() and (tmp_path / "big.fa.gz.gzi").is_file()
    assert g.lengths == {k: len(s) for k, s in seqs.items()}
    for name, s in seqs.items():
        for start in (0, 65_530, len(s) - 77):  # 65,536 is the BGZF block size: straddle one
            assert g.fetch(name, start, start + 77) == s[start:start + 77]
    assert g.fetch("ctg1", 0, len(seqs["ctg1"])) == seqs["ctg1"]


def block_starts(path) -> list[tuple[int, int]]:
    """(uncompressed start, uncompressed length) of every BGZF block of `path`, EOF block included."""
    with open(path, "rb") as fh:
        return [(ustart, ulen) for _, _, ustart, ulen in bgzf.BgzfBlocks(fh)]


def check_reads_at_block_starts(path) -> int:
    """Read 1 kb from every base that is the first byte of a BGZF block of `path` and compare
    with the decompressed text; returns how many block starts were such a base."""
    text = gzip.decompress(Path(path).read_bytes()).decode()
    g = Genome(path)
    blocks = block_starts(path)
    hits = 0
    for row in Path(str(path) + ".fai").read_text().splitlines():
        name, *nums = row.split("\t")
        rlen, offset, lenc, lenb = map(int, nums)
        last = offset + (rlen - 1) // lenc * lenb + (rlen - 1) % lenc  # byte of the last base
        seq = text[offset: last + 1].replace("\n", "")
        assert len(seq) == rlen
        for ustart, ulen in blocks:
            line, col = divmod(ustart - offset, lenb)
            if ulen and offset <= ustart <= last and col < lenc:  # a base, not a newline
                pos = line * lenc + col
                assert g.fetch(name, pos, min(pos + 1000, rlen)) == seq[pos: pos + 1000], (name, pos)
                hits += 1
    return hits


def test_reads_exact_at_every_block_start_of_the_bundled_files():
    files = sorted(BUNDLE.rglob("*.fa.gz"))
    assert len(files) == 16
    hits = 0
    for path in files:
        sizes = [ulen for _, ulen in block_starts(path)]
        # bgzip's layout: full 65,280-byte blocks, a shorter last one, then the empty EOF block
        assert set(sizes[:-2]) == {prepare_mod.BGZIP_BLOCK_SIZE} and sizes[-1] == 0, path
        hits += check_reads_at_block_starts(path)
    assert hits == 16 * 6  # 7 data blocks per file; each block but the first starts on a base


def test_reads_exact_at_every_block_start_of_65536_byte_blocks(tmp_path):
    rng = np.random.default_rng(3)
    seqs = [random_text(rng, 128_000), random_text(rng, 400_000)]
    first = ">c0\n" + wrap(seqs[0], 60)
    # pad c1's header so that c1's sequence starts exactly at the third block (2 * 65,536),
    # where reading one byte early to dodge the block edge would not work
    header = ">c1 " + "x" * (2 * 65_536 - len(first) - 5) + "\n"
    path = write_bio_bgzf(tmp_path / "bio.fa.gz", (first + header + wrap(seqs[1], 60)).encode())
    assert [u for u, _ in block_starts(path)][:4] == [0, 65_536, 2 * 65_536, 3 * 65_536]
    g = Genome(path)
    assert g.fetch("c1", 0, 1000) == seqs[1][:1000]
    assert check_reads_at_block_starts(path) == 8  # every block but the first starts on a base


def test_write_bgzf_layout_and_rewrite_bgzf(tmp_path):
    rng = np.random.default_rng(4)
    text = (">a\n" + wrap(random_text(rng, 200_000), 70)).encode()
    path = prepare_mod.write_bgzf(tmp_path / "w.fa.gz", [text[:1000], text[1000:]])
    b = prepare_mod.BGZIP_BLOCK_SIZE
    assert block_starts(path) == [(0, b), (b, b), (2 * b, b), (3 * b, len(text) - 3 * b),
                                  (len(text), 0)]
    assert gzip.decompress(path.read_bytes()) == text
    old = write_bio_bgzf(tmp_path / "old.fa.gz", text)
    fai = Path(str(old) + ".fai")
    Genome(old).close()
    before = fai.read_text()
    assert prepare_mod.rewrite_bgzf(old) == old
    assert block_starts(old) == block_starts(path) and gzip.decompress(old.read_bytes()) == text
    assert fai.read_text() == before and Path(str(old) + ".gzi").is_file()
    assert check_reads_at_block_starts(old) == 3
    cut = tmp_path / "cut.fa.gz"
    half = old.read_bytes()[: old.stat().st_size // 2]
    cut.write_bytes(half)
    with pytest.raises(DataError, match=r"cut.fa.gz: cannot decompress \(EOFError"):
        prepare_mod.rewrite_bgzf(cut)
    assert cut.read_bytes() == half  # left as it was


def test_genome_reopens_after_fork_and_pickles(tiny):
    import pickle
    g = Genome(tiny)
    handle = g._faidx
    g._pid = -1  # as seen from a forked DataLoader worker: the inherited handle must not be shared
    assert g.fetch("chr1", 2, 6) == "GTAC" and g._faidx is not handle
    clone = pickle.loads(pickle.dumps(g))
    assert clone.fetch("chr2", 4, 8) == "AATT" and clone.lengths == g.lengths
    r = pickle.loads(pickle.dumps(g["chr1"][1:4]))
    assert r == "CGT" and (r.name, r.start, r.end, r.strand) == ("chr1", 1, 4, "+")


def test_read_only_folder_builds_index_in_cache(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(genome_mod.os, "access", lambda path, mode: False)
    g = Genome(tiny, cache_dir=cache)
    assert g.fetch("chr1", 0, 4) == "ACGT"
    assert not (tmp_path / "tiny.fa.fai").exists()
    assert len(list(cache.glob("tiny.fa.*.fai"))) == 1
    monkeypatch.setenv("SEQLAB_CACHE", str(tmp_path / "env"))
    assert genome_mod.default_cache_dir() == tmp_path / "env" / "fai"


def test_read_only_folder_uses_shipped_index(tmp_path, monkeypatch):
    path = write_bio_bgzf(tmp_path / "ship.fa.gz", TINY.encode())
    Genome(path)  # writes .fai/.gzi beside it, as prepare_species does
    monkeypatch.setattr(genome_mod.os, "access", lambda path, mode: False)
    g = Genome(path, cache_dir=tmp_path / "cache")
    assert g.fetch("chr2", 0, 10) == CHR2 and not (tmp_path / "cache").exists()


def test_error_empty_fasta(tmp_path):
    p = tmp_path / "empty.fa"
    p.write_text("")
    with pytest.raises(ValueError, match="empty.fa: FASTA file is empty"):
        Genome(p)


def test_error_not_fasta(tmp_path):
    p = tmp_path / "reads.fq"
    p.write_text("@read1\nACGT\n+\nIIII\n")
    with pytest.raises(ValueError, match=r"reads.fq: not a FASTA file: first byte is b'@'"):
        Genome(p)


def test_error_duplicate_contig(tmp_path):
    p = tmp_path / "dup.fa"
    p.write_text(">chrA\nACGT\n>chrB\nGG\n>chrA\nTT\n")
    with pytest.raises(ValueError, match="dup.fa: duplicate contig name 'chrA'"):
        Genome(p)


def test_error_ragged_lines(tmp_path):
    p = tmp_path / "ragged.fa"
    p.write_text(">c1\nACGT\nAC\nACGT\n")
    with pytest.raises(ValueError, match="ragged.fa: cannot index FASTA.*>c1"):
        Genome(p)


def test_error_empty_record(tmp_path):
    p = tmp_path / "hole.fa"
    p.write_text(">c1\nACGT\n>c2\n>c3\nAA\n")
    with pytest.raises(ValueError, match="hole.fa: record 'c2' has no sequence"):
        Genome(p)


def test_error_plain_gzip_rejected(tmp_path):
    p = tmp_path / "plain.fa.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(TINY.encode())
    with pytest.raises(ValueError, match="plain.fa.gz: not a readable BGZF.*bgzip"):
        Genome(p)


def test_error_truncated_bgzip(tmp_path):
    rng = np.random.default_rng(1)
    seq = "".join(rng.choice(list("ACGT"), size=200_000))
    text = ">c1\n" + "\n".join(seq[j:j + 80] for j in range(0, len(seq), 80)) + "\n"
    good = write_bio_bgzf(tmp_path / "good.fa.gz", text.encode()).read_bytes()
    bad = tmp_path / "cut.fa.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.fa.gz: corrupt or truncated"):
        Genome(bad)


# --- preparation ----------------------------------------------------------------------
def _strain(tmp_path, name, header, seq):
    p = tmp_path / "src" / f"{name}.fasta.gz"
    p.parent.mkdir(exist_ok=True)
    with gzip.open(p, "wt") as fh:  # plain gzip, as Debian ships them
        fh.write(f">{header}\n" + "\n".join(seq[i:i + 70] for i in range(0, len(seq), 70)) + "\n")
    return p


def test_prepare_species_slices_splits_and_provenance(tmp_path):
    rng = np.random.default_rng(2)
    seqs = {k: "".join(rng.choice(list("ACGT"), size=30_000)) for k in ("a1", "a2", "a3", "b1", "b2")}
    hdr = {k: f"gi|1|ref|NC_00000{i}.1| strain {k}" for i, k in enumerate(seqs)}
    src = {k: _strain(tmp_path, k, hdr[k], s) for k, s in seqs.items()}
    path = prepare_species({"Alpha": [src["a1"], src["a2"], src["a3"]], "Beta": [src["b1"], src["b2"]]},
                           tmp_path / "out", bases_per_strain=12_000)
    doc = yaml.safe_load(path.read_text())
    assert doc["bases_per_strain_requested"] == 12_000
    a = {e["strain"]: e for e in doc["species"]["Alpha"]}
    b = {e["strain"]: e for e in doc["species"]["Beta"]}
    assert [a[s]["split"] for s in ("a1", "a2", "a3")] == ["train", "val", "test"]
    assert [a[s]["bases"] for s in ("a1", "a2", "a3")] == [12_000] * 3
    assert b["b1"]["regions"] == {"train": [0.0, 0.9], "val": [0.9, 1.0]} and b["b2"]["split"] == "test"
    # strain k of n starts k/n of the way along: a2 is strain 1 of 3 -> start (30000-12000)/3
    assert a["a2"]["slices"] == ["NC_000001.1:6000-18000"]
    g = Genome(tmp_path / "out" / a["a2"]["path"])
    (name,) = g
    assert name == "NC_000001.1_6000_18000" and g.fetch(name, 0, 12_000) == seqs["a2"][6000:18000]
    assert (tmp_path / "out" / (a["a2"]["path"] + ".gzi")).is_file()
    prov = (tmp_path / "out" / "PROVENANCE.md").read_text()
    assert "| Alpha | a2 | val | a2.fasta.gz |" in prov and "NC_000004.1" in prov
    m = SpeciesManifest.load(path)
    assert m.species == ["Alpha", "Beta"]
    assert [f.meta["strain"] for f in m.files if "test" in f.splits()] == ["a3", "b2"]


def test_prepare_species_needs_a_train_strain(tmp_path):
    p = _strain(tmp_path, "solo", "solo", "ACGT" * 5000)
    with pytest.raises(ValueError, match="species 'Solo' has 1 strain.*none to train on"):
        prepare_species({"Solo": [p]}, tmp_path / "out", 1000)


def test_accession_and_debian_sources(tmp_path):
    assert accession_of("gi|386593590|ref|NC_017625.1| Escherichia coli DH1") == "NC_017625.1"
    assert accession_of("gi|12057212|gb|AE003852.1| Vibrio") == "AE003852.1"
    assert accession_of("K-12-MG1655") == "K-12-MG1655"
    refs = tmp_path / "E.Coli" / "references"
    refs.mkdir(parents=True)
    for s in ("DH1", "MG1655-K12"):
        (refs / f"{s}.fasta.gz").write_bytes(b"")
    assert {k: [p.name for p in v] for k, v in debian_sources(tmp_path).items()} == \
        {"Escherichia coli": ["MG1655-K12.fasta.gz", "DH1.fasta.gz"]}
    assert debian_sources(tmp_path / "absent") == {}
