"""`seqlab prepare species|speech`: named errors, all-or-nothing output, --overwrite, and a
manifest that records what was written."""
import gzip

import numpy as np
import pytest
import yaml

from seqlab.data.genome import Genome
from seqlab.data.prepare import prepare_species
from seqlab.errors import ConfigError, DataError
from seqlab.jobs.prepare import main as prepare_main


def strain(tmp_path, name, seq, header=None):
    p = tmp_path / "src" / f"{name}.fasta.gz"
    p.parent.mkdir(exist_ok=True)
    with gzip.open(p, "wt") as fh:
        fh.write(f">{header or name}\n" + "".join(seq[i:i + 70] + "\n" for i in range(0, len(seq), 70)))
    return p


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(0)
    seqs = {k: "".join(rng.choice(list("ACGT"), size=60_000)) for k in ("a1", "a2", "b1", "b2")}
    paths = {k: strain(tmp_path, k, s) for k, s in seqs.items()}
    return {"Alpha": [paths["a1"], paths["a2"]], "Beta": [paths["b1"], paths["b2"]]}, seqs


def leftovers(folder):
    """Hidden temporary folders left beside the output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_manifest_records_the_bases_actually_written(tmp_path, sources):
    src, seqs = sources
    path = prepare_species(src, tmp_path / "out", 450_000)
    doc = yaml.safe_load(path.read_text())
    assert doc["bases_per_strain_requested"] == 450_000 and "bytes_per_strain" not in doc
    entries = {e["strain"]: e for sp in doc["species"].values() for e in sp}
    assert {k: e["bases"] for k, e in entries.items()} == {k: 60_000 for k in seqs}
    g = Genome(path.parent / entries["a2"]["path"])
    assert g.fetch(next(iter(g)), 0, 60_000) == seqs["a2"]


@pytest.mark.parametrize("text, message", [
    ("ACGT\n>a\nACGT\n", r"bad.fasta.gz: line 1: 'ACGT' comes before the first '>' header line"),
    (">a\nACGT\n>b desc\nAC GT\n", r"bad.fasta.gz: line 4, record 2 \('b'\): ' ' in 'AC GT' is not a base"),
    (">a\nACGT\n>\nACGT\n", r"bad.fasta.gz: line 3: record 2 has an empty header line"),
], ids=["text-before-header", "space-in-sequence", "empty-header"])
def test_malformed_fasta_names_file_line_and_record_and_writes_nothing(tmp_path, sources, text,
                                                                      message):
    src, _ = sources
    bad = tmp_path / "src" / "bad.fasta.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write(text)
    src["Beta"].append(bad)  # the last strain, after the others were written
    with pytest.raises(DataError, match=message):
        prepare_species(src, tmp_path / "out", 20_000)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_truncated_gzip_is_named(tmp_path, sources):
    src, _ = sources
    whole = src["Alpha"][0].read_bytes()
    cut = tmp_path / "src" / "cut.fasta.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    src["Alpha"].insert(0, cut)
    with pytest.raises(DataError, match=r"cut.fasta.gz: after line \d+, record 1 \('a1'\): corrupt "
                                        "or truncated compressed file"):
        prepare_species(src, tmp_path / "out", 20_000)


def test_existing_output_is_refused_unless_overwrite(tmp_path, sources):
    src, _ = sources
    out = tmp_path / "out"
    prepare_species(src, out, 20_000)
    (out / "stale.txt").write_text("from an earlier run")
    with pytest.raises(ConfigError, match=r"out: output folder already holds a data set "
                                          r"\(manifest.yaml\).*--overwrite"):
        prepare_species(src, out, 10_000)
    assert (out / "stale.txt").exists()
    prepare_species(src, out, 10_000, overwrite=True)
    assert not (out / "stale.txt").exists() and leftovers(tmp_path) == []
    assert yaml.safe_load((out / "manifest.yaml").read_text())["bases_per_strain_requested"] == 10_000


def test_output_that_is_not_a_data_set_is_never_replaced(tmp_path, sources):
    src, _ = sources
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"home: output path exists and is not a data set folder"):
        prepare_species(src, home, 10_000, overwrite=True)
    assert (home / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_species(src, empty, 10_000) == empty / "manifest.yaml"


def test_cli_prepare_species_overwrite_flag(tmp_path, sources, capsys):
    src, _ = sources
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--bases-per-strain", "5000",
            "--species", "Alpha", *map(str, src["Alpha"]), "--species", "Beta", *map(str, src["Beta"])]
    prepare_main("species", argv)
    assert f"wrote {out / 'manifest.yaml'}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_main("species", argv)
    prepare_main("species", argv + ["--overwrite"])
    with pytest.raises(ConfigError, match="give either --debian or one or more --species"):
        prepare_main("species", ["--out", str(out)])


def test_cli_prepare_speech_writes_all_or_nothing(tmp_path, monkeypatch):
    from seqlab.data import audio

    def fake_prepare_speech(out_dir, **kwargs):
        (out_dir / "zero").mkdir()
        (out_dir / "zero" / "clip.wav").write_bytes(b"RIFF")
        if kwargs["seed"] == 13:
            raise RuntimeError("espeak-ng crashed")
        (out_dir / "manifest.csv").write_text("path\nzero/clip.wav\n")
        return out_dir / "manifest.csv"

    monkeypatch.setattr(audio, "prepare_speech", fake_prepare_speech)
    out = tmp_path / "speech"
    prepare_main("speech", ["--out", str(out)])
    assert (out / "manifest.csv").is_file() and (out / "zero" / "clip.wav").is_file()
    with pytest.raises(ConfigError, match=r"speech: output folder already holds a data set "
                                          r"\(manifest.csv\)"):
        prepare_main("speech", ["--out", str(out)])
    (out / "old.wav").write_bytes(b"")
    with pytest.raises(RuntimeError, match="espeak-ng crashed"):
        prepare_main("speech", ["--out", str(out), "--overwrite", "--seed", "13"])
    assert (out / "old.wav").exists() and leftovers(tmp_path) == []  # the failed run changed nothing
    prepare_main("speech", ["--out", str(out), "--overwrite"])
    assert not (out / "old.wav").exists() and (out / "manifest.csv").is_file()
