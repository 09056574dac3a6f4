"""Streaming embeddings: chunked pooling equals pooling the concatenated chunk states, batches
and reads stay bounded whatever the interval length, all-N intervals are skipped and reported,
and evaluation over tiled windows streams too."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers.old_checkpoints import write_v0_checkpoint
from seqlab.cli import compose, run_job
from seqlab.data.genome import Genome
from seqlab.data.windows import contig_intervals, tile_windows
from seqlab.errors import DataError
from seqlab.model import SequenceClassifier
from seqlab.model.config import MambaConfig
from seqlab.model.heads import pool
from seqlab.model.rc import reverse_complement
from seqlab.tasks.embed import GenomeSpan, PooledBackbone, embed_items, embed_windows
from seqlab.tasks.embeddings import load_embeddings
from seqlab.tasks.species import predict
from seqlab.training.checkpoint import save_model

CPU = torch.device("cpu")
ACGT = np.frombuffer(b"ACGT", np.uint8)


def _tiny(bidirectional=True, rc_equivariant=False, pooling="mean", conjoin_rc=False):
    cfg = MambaConfig(d_model=8, n_layer=1, d_state=4, bidirectional=bidirectional,
                      rc_equivariant=rc_equivariant)
    return SequenceClassifier(cfg, num_classes=2, pooling=pooling, conjoin_rc=conjoin_rc).eval()


def _dna(rng, n):
    return ACGT[rng.integers(0, 4, n)]


class Recorder(torch.nn.Module):
    """A position-free 'model': mean (or max) of a per-byte vector; records every batch shape."""

    def __init__(self, d=4):
        super().__init__()
        self.table = torch.randn(260, d, dtype=torch.float64)  # bytes and special ids
        self.shapes = []

    def embed(self, ids, lengths):
        self.shapes.append(tuple(ids.shape))
        h = self.table[ids]  # (B, L, d)
        return pool(h, lengths, "mean").float()


# ----------------------------------------------------------------------------- pooling
def _reference(model, x, chunk):
    """Pool the concatenated per-chunk hidden states (each chunk run alone), as embed_items
    promises: forward branch over chunks in order, RC branch over RC chunks in reverse order."""
    t = torch.as_tensor(x, dtype=torch.long)
    pieces = [t[i:i + chunk] for i in range(0, len(t), chunk)]
    with torch.no_grad():
        fwd = torch.cat([model.backbone(p[None])[0] for p in pieces])
        branches = [pool(fwd[None].float(), None, model.head.pooling)]
        if model.conjoin:
            rc = torch.cat([model.backbone(reverse_complement(p[None]))[0] for p in pieces[::-1]])
            branches.append(pool(rc[None].float(), None, model.head.pooling))
    out = torch.stack(branches, 1)  # (1, S, d)
    if model.config.rc_equivariant:
        out = (out + out.flip(-1)) / 2
    return out.mean(1)[0].numpy()


@pytest.mark.parametrize("pooling", ["mean", "max", "first", "last"])
@pytest.mark.parametrize("conjoin_rc,rc_equivariant", [(False, False), (True, False), (False, True),
                                                       (True, True)])
def test_chunked_pooling_equals_pooling_the_concatenated_chunk_states(pooling, conjoin_rc,
                                                                      rc_equivariant, rng_seed):
    rng = np.random.default_rng(rng_seed)
    torch.manual_seed(rng_seed)
    model = _tiny(pooling=pooling, conjoin_rc=conjoin_rc, rc_equivariant=rc_equivariant)
    x = _dna(rng, 250)
    got = embed_windows(PooledBackbone(model), [(x, {})], CPU, batch_size=2, chunk=64,
                        progress=False)
    np.testing.assert_allclose(got[0], _reference(model, x, 64), rtol=1e-5, atol=1e-6)
    # One chunk: exactly the model's own pooled features.
    whole = embed_windows(PooledBackbone(model), [(x, {})], CPU, chunk=None, progress=False)
    with torch.no_grad():
        own = model.embed(torch.as_tensor(x, dtype=torch.long)[None]).numpy()
    np.testing.assert_allclose(whole, own, rtol=1e-5, atol=1e-6)


def test_chunks_of_many_items_share_batches_and_each_item_gets_its_own_result(rng_seed):
    rng = np.random.default_rng(rng_seed)
    model = Recorder()
    seqs = [_dna(rng, n) for n in (2500, 700, 3000, 1)]
    rows = embed_windows(model, [(s, {}) for s in seqs], CPU, batch_size=4, chunk=1000,
                         progress=False)
    # Chunks 1000,1000,500 | 700 | 1000,1000,1000 | 1 -> batches of 4 and 4 chunks.
    assert model.shapes == [(4, 1000), (4, 1000)]
    alone = np.stack([model.embed(torch.as_tensor(s, dtype=torch.long)[None],
                                  torch.tensor([len(s)]))[0].numpy() for s in seqs])
    np.testing.assert_allclose(rows, alone, rtol=1e-6)


def test_max_tokens_caps_padded_positions_per_batch(rng_seed):
    rng = np.random.default_rng(rng_seed)
    model = Recorder()
    embed_windows(model, [(_dna(rng, 10_000), {})], CPU, batch_size=8, chunk=1000,
                  max_tokens=2500, progress=False)
    assert model.shapes == [(2, 1000)] * 5


# ----------------------------------------------------------------------------- bounded memory
class CountingGenome:
    """Genome stand-in: one contig; records the size of every read and the bases in flight."""

    def __init__(self, seq, model):
        self.seq, self.model = seq, model
        self.reads, self.read_bases, self.in_flight = [], 0, []

    def ids(self, contig, start, end, strand="+"):
        self.reads.append(end - start)
        self.read_bases += end - start
        embedded = sum(b * l for b, l in self.model.shapes)
        self.in_flight.append(self.read_bases - embedded)
        return self.seq[start:end]


@pytest.mark.parametrize("length", [20_000, 400_000])
def test_batch_and_reads_are_bounded_by_batch_times_chunk_not_by_length(length, rng_seed):
    rng = np.random.default_rng(rng_seed)
    model = Recorder()
    genome = CountingGenome(_dna(rng, length), model)
    item = GenomeSpan(genome, "c", 0, length, "+", {})
    (got,) = [v for _, v in embed_items(model, [item], CPU, batch_size=4, chunk=1000,
                                        progress=False)]
    assert max(b for b, _ in model.shapes) <= 4 and max(l for _, l in model.shapes) <= 1000
    assert len(model.shapes) == -(-length // 4000)
    assert max(genome.reads) <= 1000
    # Sequence read but not yet through the model: one batch plus the chunk that did not fit.
    assert max(genome.in_flight) <= 5 * 1000
    want = model.embed(torch.as_tensor(genome.seq, dtype=torch.long)[None],
                       torch.tensor([length]))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_minus_strand_chunks_read_the_reverse_complement_in_order(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    seq = _dna(rng, 2345).tobytes().decode()
    (tmp_path / "g.fa").write_text(">c\n" + "\n".join(seq[i:i + 60] for i in range(0, 2345, 60))
                                   + "\n")
    genome = Genome(tmp_path / "g.fa")
    span = GenomeSpan(genome, "c", 17, 2301, "-")
    np.testing.assert_array_equal(np.concatenate(list(span.chunks(500))),
                                  genome.ids("c", 17, 2301, "-"))


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    from seqlab.tasks.embed import GenomeSpan, PooledBackbone, embed_items
    from seqlab.model import SequenceClassifier
    from seqlab.model.config import MambaConfig
    torch.set_num_threads(1)

    class Contig:
        # Random ACGT made on demand: the contig itself is never held in memory.
        def ids(self, contig, start, end, strand="+"):
            return np.random.default_rng(start).integers(0, 4, end - start).astype(np.uint8)

    n = int(sys.argv[1])
    model = SequenceClassifier(MambaConfig(d_model=16, n_layer=1, d_state=4), num_classes=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in embed_items(PooledBackbone(model), [GenomeSpan(Contig(), "c", 0, n)],
                         torch.device("cpu"), batch_size=4, chunk=2048, progress=False):
        pass
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_interval_length(tmp_path):
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    growth = {}
    for n in (50_000, 500_000):
        out = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        before, after = map(int, out.stdout.split())
        growth[n] = (after - before) / 1024  # ru_maxrss is in KiB on Linux: MiB
    # Ten times the length, the same batches, the same peak: the old code, all chunks of an
    # interval in one batch, grew by 208 MiB at 50 kb and 832 MiB at 500 kb here.
    assert growth[500_000] < growth[50_000] + 64, growth


# ----------------------------------------------------------------------------- the job
@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = _tiny(bidirectional=True)
    return save_model(model, tmp_path / "ckpt", model.config,
                      extra={"classes": ["a", "b"], "window": 64})


def _fasta(path, records):
    with open(path, "w") as f:
        for name, seq in records.items():
            f.write(f">{name}\n" + "\n".join(seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n")
    return path


def _embed(tmp_path, checkpoint, run, *extra):
    return run_job(compose("embed", [f"run_dir={tmp_path / run}", f"checkpoint={checkpoint}",
                                     "data.manifest=null", "progress=false", *extra]))


def test_all_n_bed_intervals_are_skipped_and_reported(tmp_path, checkpoint, caplog, rng_seed):
    rng = np.random.default_rng(rng_seed)
    seq = _dna(rng, 3000).tobytes().decode()
    fa = _fasta(tmp_path / "g.fa", {"chr1": seq[:1000] + "N" * 1200 + seq[1000:], "gap": "N" * 500})
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t0\t3000\tmixed\nchr1\t1000\t2200\tholeA\t0\t-\ngap\t0\t500\tholeB\n"
                   "chr1\t2200\t4200\tseq\t0\t-\n")
    with caplog.at_level("WARNING", logger="seqlab"):
        s = _embed(tmp_path, checkpoint, "run", f"data.fasta={fa}", f"data.bed={bed}", "chunk=256")
    assert s["n"] == 2 and s["skipped"] == 2 and s["skipped_all_n"] == 2
    emb = load_embeddings(tmp_path / "run" / "embeddings.npz")
    assert emb.group.tolist() == ["mixed", "seq"] and emb.strand.tolist() == ["+", "-"]
    rows = (tmp_path / "run" / "skipped.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:6] == ["contig", "start", "end", "strand", "name", "reason"]
    assert [r.split("\t")[:6] for r in rows[1:]] == [
        ["chr1", "1000", "2200", "-", "holeA", "all_n"], ["gap", "0", "500", "+", "holeB", "all_n"]]
    assert "chr1:1000-2200(-) (holeA): all 1200 bp are N" in caplog.text


def test_nothing_embedded_fails_with_the_input_named_and_no_output(tmp_path, checkpoint):
    fa = _fasta(tmp_path / "g.fa", {"gap": "N" * 900})
    bed = tmp_path / "r.bed"
    bed.write_text("gap\t0\t900\n")
    out = tmp_path / "e.npz"
    out.write_bytes(b"stale output of an earlier run")
    with pytest.raises(DataError, match=r"r\.bed: nothing embedded: all 1 intervals were skipped "
                                        r"\(1 all_n\); e\.g\. gap:0-900"):
        _embed(tmp_path, checkpoint, "run", f"data.fasta={fa}", f"data.bed={bed}", f"output={out}")
    assert not out.exists()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "summary.json").exists()
    assert "all_n" in (tmp_path / "run" / "skipped.tsv").read_text()


def test_tiles_over_max_n_frac_are_reported_and_the_rest_embedded(tmp_path, checkpoint, caplog,
                                                                   rng_seed):
    rng = np.random.default_rng(rng_seed)
    seq = _dna(rng, 256).tobytes().decode()
    # Tiles of 64: two of sequence, one 25% N, then 22 all N.
    fa = _fasta(tmp_path / "g.fa", {"c": seq[:176] + "N" * 16 + "N" * 64 * 22})
    with caplog.at_level("WARNING", logger="seqlab"):
        s = _embed(tmp_path, checkpoint, "run", f"data.fasta={fa}", "data.max_n_frac=0.1")
    assert (s["n"], s["skipped_n_frac"], s["skipped_all_n"]) == (2, 1, 22)
    emb = load_embeddings(tmp_path / "run" / "embeddings.npz")
    assert emb.start.tolist() == [0, 64] and emb.info["skipped"] == 23
    assert "c:128-192(+): 25.0% of 64 bp are N, more than max_n_frac=0.1" in caplog.text
    # One log line per skip up to 20, then a count; the TSV lists every one.
    assert caplog.text.count("embed: skipped c:") == 20
    assert "embed: skipped 3 more (23 in all)" in caplog.text
    assert len((tmp_path / "run" / "skipped.tsv").read_text().splitlines()) == 1 + 23
    # The old rule (tile_windows' N filter) keeps the same tiles.
    g = Genome(fa)
    assert [w.start for w in tile_windows(contig_intervals(g), 64, 64, g, 0.1)] == [0, 64]


def test_manifest_windows_are_read_lazily_and_labelled_from_the_manifest(tmp_path, checkpoint):
    s = run_job(compose("embed", [f"run_dir={tmp_path / 'run'}", f"checkpoint={checkpoint}",
                                  "data.window=1024", "data.max_per_species=2", "progress=false"]))
    emb = load_embeddings(tmp_path / "run" / "embeddings.npz")
    assert len(emb) == s["n"] == 2 * len(emb.classes) and s["skipped"] == 0
    assert sorted(set(emb.label.tolist())) == list(range(len(emb.classes)))
    assert (emb.end - emb.start == 1024).all() and all(g.endswith(".fa.gz") for g in emb.group)


def test_embed_reads_a_format_0_trainer_checkpoint_in_a_run_directory(tmp_path, checkpoint,
                                                                      rng_seed):
    """A finetune_species run checkpointed in the trainer layout of format_version 0 (users
    have such runs) opens through the one loader from its run directory and embeds exactly
    as the same weights saved in the current format; its classes and window come along."""
    torch.manual_seed(0)
    model = _tiny(bidirectional=True)  # the fixture's weights
    run = tmp_path / "old_run"
    write_v0_checkpoint(model, run / "checkpoints" / "step_0000003", {
        "architecture": "SequenceClassifier", "model": model.config.to_dict(), "num_classes": 2,
        "pooling": "mean", "conjoin_rc": False, "classes": ["a", "b"], "window": 64},
        optimizer=True)
    rng = np.random.default_rng(rng_seed)
    fa = _fasta(tmp_path / "g.fa", {"c": _dna(rng, 300).tobytes().decode()})
    _embed(tmp_path, checkpoint, "new", f"data.fasta={fa}")
    _embed(tmp_path, run, "old", f"data.fasta={fa}")
    new = load_embeddings(tmp_path / "new" / "embeddings.npz")
    old = load_embeddings(tmp_path / "old" / "embeddings.npz")
    np.testing.assert_array_equal(old.embeddings, new.embeddings)
    assert old.classes == ["a", "b"] and old.info["window"] == 64 and len(old) == 300 // 64
    assert old.info["checkpoint"] == str(run / "checkpoints" / "step_0000003")


# ----------------------------------------------------------------------------- evaluation
def test_predict_reads_windows_batch_by_batch():
    """predict over a lazy dataset: no window is read before the batches ahead of it ran."""
    events = []

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            events.append(("read", i))
            return torch.full((32,), 65, dtype=torch.long), i % 2

    class Model(torch.nn.Module):
        def forward(self, ids, lengths):
            events.append(("model", ids.shape[0]))
            return torch.zeros(ids.shape[0], 2)

    y, _, probs = predict(Model(), Windows(), CPU, batch_size=4)
    assert y.tolist() == [0, 1] * 5 and probs.shape == (10, 2)
    assert events == ([("read", i) for i in range(4)] + [("model", 4)]
                      + [("read", i) for i in range(4, 8)] + [("model", 4)]
                      + [("read", 8), ("read", 9), ("model", 2)])
