"""DNA jobs end to end on tiny settings: finetune_species (+ embed/probe), pretrain_dna -> init_from,
embed on FASTA tiles, probe on clearly separable embeddings, and bad input."""
import json

import numpy as np
import pytest

from seqlab.cli import compose, run_job
from seqlab.tasks.embeddings import Embeddings, load_embeddings, save_embeddings
from seqlab.errors import MissingInput

TINY = ["model.d_model=16", "model.n_layer=1", "model.d_state=4", "trainer.micro_batch_size=4",
        "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.progress=false"]


def _run(recipe, overrides):
    return run_job(compose(recipe, overrides))


def test_finetune_species_end_to_end_with_embed_and_probe(tmp_path):
    run = tmp_path / "ft"
    summary = _run("finetune_species", TINY + [
        f"run_dir={run}", "data.window=256", "trainer.max_steps=3", "trainer.eval_every=2",
        "trainer.ckpt_every=2", "data.eval_max_per_species=4", "data.test_max_per_species=5"])
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    report = json.loads((run / "test_report.json").read_text())
    assert report["n"] == 20 and 0.0 <= report["accuracy"] <= 1.0
    assert np.array(report["confusion_matrix"]).sum() == 20
    for png in ("training.png", "confusion_test.png", "confusion_probe.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    emb = load_embeddings(run / "embeddings_test.npz")
    assert emb.embeddings.shape == (20, 16) and np.isfinite(emb.embeddings).all()
    assert set(emb.strand) <= {"+", "-"} and (emb.end - emb.start == 256).all()
    assert len(emb.classes) == 4 and sorted(set(emb.label.tolist())) == [0, 1, 2, 3]
    assert summary["test_windows"] == 20 and "probe_accuracy" in summary
    # The k-mer baseline on the same split, beside the model (summary, report, plot records).
    base = report["baseline"]
    assert base["k"] in (3, 4, 5, 6) and base["train_windows"] == 3 * 4
    assert summary["baseline_kmer_test_accuracy"] == base["test_accuracy"]
    assert summary["beats_baseline"] in ("yes", "no")
    assert np.array(base["confusion_matrix"]).sum() == 20
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"baseline", "test"} <= {r["split"] for r in records}
    probe = json.loads((run / "probe_report.json").read_text())
    assert 0.0 <= probe["baseline"]["accuracy"] <= 1.0, "probe's k-mer baseline, same folds"
    assert summary["probe_baseline_kmer_accuracy"] == probe["baseline"]["accuracy"]
    # Same run_dir again: resumes from the final checkpoint, no extra steps.
    again = _run("finetune_species", TINY + [
        f"run_dir={run}", "data.window=256", "trainer.max_steps=3",
        "data.eval_max_per_species=4", "data.test_max_per_species=5", "post.embed_probe=false"])
    assert again["step"] == 3
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert steps == [1, 2, 3]


def test_pretrain_then_finetune_from_it_then_embed_fasta(tmp_path):
    pre = tmp_path / "pre"
    s = _run("pretrain_dna", TINY + [f"run_dir={pre}", "data.window=128", "trainer.max_steps=2",
                                     "data.eval_windows=4", "eval_batch_size=4"])
    assert np.isfinite(s["val_loss"]) and s["val_loss"] > 0
    ft = tmp_path / "ft"
    _run("finetune_species", TINY + [
        f"run_dir={ft}", f"init_from={pre}", "model.bidirectional=false", "data.window=128",
        "trainer.max_steps=1", "data.eval_max_per_species=2", "data.test_max_per_species=3",
        "post.embed_probe=false"])
    assert (ft / "test_report.json").exists()
    fasta = "datasets/bacteria/Escherichia_coli/DH1.fa.gz"
    emb_run = tmp_path / "emb"
    _run("embed", [f"run_dir={emb_run}", f"checkpoint={ft}", "data.manifest=null",
                   f"data.fasta={fasta}", "data.window=4096", "chunk=1000", "progress=false"])
    emb = load_embeddings(emb_run / "embeddings.npz")
    assert len(emb) == 450_000 // 4096 and (np.diff(emb.start) == 4096).all()
    assert emb.info["window"] == 4096 and np.isfinite(emb.embeddings).all()
    # The run directory opened through the one loader: its newest checkpoint, and the species
    # names the finetune task stored in it.
    assert emb.info["checkpoint"] == str(ft / "checkpoints" / "step_0000001")
    assert emb.info["architecture"] == "SequenceClassifier" and len(emb.classes) == 4


def test_probe_separates_clearly_separable_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    X = np.concatenate([rng.normal(-2, 1, (n, 8)), rng.normal(2, 1, (n, 8))]).astype(np.float32)
    y = np.repeat([0, 1], n)
    path = save_embeddings(tmp_path / "e.npz", Embeddings(
        X, np.array(["c"] * 2 * n), np.arange(2 * n), np.arange(2 * n) + 10,
        np.array(["+"] * 2 * n), y, np.array(["g"] * 2 * n), ["a", "b"], {"note": "test"}))
    back = load_embeddings(path)
    np.testing.assert_array_equal(back.embeddings, X)
    assert back.info == {"note": "test"} and back.classes == ["a", "b"]
    s = _run("probe", [f"run_dir={tmp_path / 'p'}", f"embeddings={path}"])
    assert s["probe_accuracy"] > 0.97
    # Random labels: the probe must not find structure that is not there.
    path2 = save_embeddings(tmp_path / "r.npz", Embeddings(
        X, back.contig, back.start, back.end, back.strand, rng.permutation(y), back.group,
        ["a", "b"], {}))
    s2 = _run("probe", [f"run_dir={tmp_path / 'p2'}", f"embeddings={path2}"])
    assert s2["probe_accuracy"] < 0.75


def test_missing_manifest_is_named_and_run_not_complete(tmp_path):
    run = tmp_path / "bad"
    with pytest.raises(MissingInput, match="nope.yaml"):
        _run("finetune_species", TINY + [f"run_dir={run}", "data.manifest=nope.yaml"])
    assert not (run / "summary.json").exists()
