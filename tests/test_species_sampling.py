"""The training windows of finetune_species and the splits they come from.

Every window the default recipe's trainer would read is read here, without training, so a
window the genome layer cannot read fails in seconds instead of minutes into a run: a BGZF
block start that pyfaidx misplaces in files with 65,536-byte blocks stopped seed 4 at its
172nd step and seed 0 at its 1,275th.
"""
import logging

import numpy as np
import pytest
import torch

from seqlab.cli import compose
from seqlab.data.species import SpeciesManifest, SpeciesWindowDataset, species_eval_windows
from seqlab.errors import DataError
from seqlab.tasks.species import SpeciesTask


def write_fasta(path, records):
    path.write_text("".join(f">{k}\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n"
                            for k, s in records.items()))
    return path


@pytest.mark.parametrize("seed, max_steps", [(s, None) for s in range(10)] + [(0, 1300)],
                         ids=[f"seed{s}" for s in range(10)] + ["seed0-1300steps"])
def test_finetune_species_reads_every_training_window(seed, max_steps):
    overrides = [f"trainer.seed={seed}"] + ([f"trainer.max_steps={max_steps}"] if max_steps else [])
    cfg = compose("finetune_species", overrides)
    task = SpeciesTask(cfg)
    t = cfg.trainer
    for step in range(t.max_steps):
        for micro in range(t.grad_accum):  # the trainer's global indices at world size 1
            base = step * t.grad_accum + micro
            batch = task.train_batch([base * t.micro_batch_size + i
                                      for i in range(t.micro_batch_size)], torch.device("cpu"))
            assert batch.ids.shape == (t.micro_batch_size, cfg.data.window)


# --- manifests without val data --------------------------------------------------------
def make_manifest(tmp_path, body: str):
    rng = np.random.default_rng(5)
    for f in ("a1", "a2", "b1", "b2"):
        seq = "".join(rng.choice(list("ACGT"), size=3000))
        write_fasta(tmp_path / f"{f}.fa", {f"{f}_c1": seq[:2000], f"{f}_c2": seq[2000:]})
    path = tmp_path / "manifest.yaml"
    path.write_text(body)
    return path


NO_VAL = """species:
  Alpha:
    - {path: a1.fa, split: train}
    - {path: a2.fa, split: test}
  Beta:
    - {path: b1.fa, regions: {train: [0.0, 0.8], test: [0.8, 1.0]}}
    - {path: b2.fa, split: train}
"""


def spans(m, split):
    """{(file, contig): (start, end)} of every interval of `split`."""
    return {(f.path.name, iv.chrom): (iv.start, iv.end)
            for parts in m.split_files(split).values() for f, ivs in parts for iv in ivs}


def test_manifest_without_val_carves_it_from_the_end_of_train(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        m = SpeciesManifest.load(make_manifest(tmp_path, NO_VAL))
    assert "no val data; validating on the last 10% of every train file" in caplog.text
    train, val = spans(m, "train"), spans(m, "val")
    assert train[("a1.fa", "a1_c1")] == (0, 1800) and val[("a1.fa", "a1_c1")] == (1800, 2000)
    assert train[("b1.fa", "b1_c2")] == (0, 720) and val[("b1.fa", "b1_c2")] == (720, 800)
    assert spans(m, "test")[("b1.fa", "b1_c2")] == (800, 1000)  # test regions are untouched
    assert set(val) == set(train)  # every train interval gave its tail: no species lacks val
    for key, (start, end) in train.items():
        assert end == val[key][0]  # adjacent, not overlapping
    ev = species_eval_windows(m, "val", window=50)
    assert sorted({label for label, _, _ in ev.items}) == [0, 1]
    for label, f, w in (SpeciesWindowDataset(m, "train", window=50, seed=1, epoch_size=300)
                        .window_at(i) for i in range(300)):
        assert w.end <= val[(f.path.name, w.contig)][0]


def test_species_without_val_is_left_out_when_others_have_some(tmp_path, caplog):
    body = NO_VAL.replace("{path: b2.fa, split: train}", "{path: b2.fa, split: val}")
    with caplog.at_level(logging.WARNING):
        m = SpeciesManifest.load(make_manifest(tmp_path, body))
    assert "species ['Alpha'] have no val data and are left out of validation" in caplog.text
    assert m.files[0].split == "train" and spans(m, "train")[("a1.fa", "a1_c1")] == (0, 2000)
    ev = species_eval_windows(m, "val", window=50)
    assert {label for label, _, _ in ev.items} == {1}


def test_eval_windows_of_a_split_without_data_name_the_fix(tmp_path):
    body = """species:
  Alpha: [{path: a1.fa, split: train}]
  Beta: [{path: b1.fa, split: train}, {path: b2.fa, split: val}]
"""
    m = SpeciesManifest.load(make_manifest(tmp_path, body))
    with pytest.raises(DataError, match=r"manifest.yaml: no file or region is in the test split; "
                                        r"give files 'split: test' or 'test' regions"):
        species_eval_windows(m, "test", window=50)


def test_finetune_species_trains_and_validates_on_a_manifest_without_val(tmp_path):
    from seqlab.cli import run_job
    manifest = make_manifest(tmp_path, NO_VAL)
    summary = run_job(compose("finetune_species", [
        f"data.manifest={manifest}", f"run_dir={tmp_path / 'run'}", "data.window=64",
        "model.d_model=16", "model.n_layer=1", "model.d_state=4", "trainer.micro_batch_size=4",
        "trainer.max_steps=2", "trainer.eval_every=1", "trainer.warmup_steps=1",
        "trainer.progress=false", "post.embed_probe=false"]))
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["step"] == 2


def test_finetune_species_without_test_data_stops_before_training(tmp_path):
    from seqlab.cli import run_job
    body = """species:
  Alpha: [{path: a1.fa, split: train}, {path: a2.fa, split: val}]
  Beta: [{path: b1.fa, split: train}, {path: b2.fa, split: val}]
"""
    manifest = make_manifest(tmp_path, body)
    with pytest.raises(DataError, match="no file or region is in the test split"):
        run_job(compose("finetune_species", [
            f"data.manifest={manifest}", f"run_dir={tmp_path / 'run'}", "data.window=64",
            "trainer.max_steps=2", "trainer.progress=false"]))
    assert not (tmp_path / "run").exists(), "nothing trained, nothing written"
