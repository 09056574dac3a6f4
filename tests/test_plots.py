"""The training plot: one unit per axis, for the records each kind of job writes."""
import math

import matplotlib.figure
import pytest

from seqlab.training.curves import plot_training_curves, training_panels

LN2 = math.log(2)


def audio_records():
    """train_audio: train loss (nats) and bits_per_sample, eval val_bits_per_sample."""
    train = [{"step": s, "split": "train", "lr": 1e-3, "loss": 5.0 - s / 10, "bits_per_sample": (5.0 - s / 10) / LN2,
              "grad_norm": 0.5, "tokens_per_s": 900.0} for s in (5, 10, 15, 20)]
    evals = [{"step": s, "split": "eval", "val_bits_per_sample": 6.5 - s / 20} for s in (10, 20)]
    return train + evals


def dna_records():
    """DNA pretraining: loss + bits_per_base, eval val_loss + val_bits_per_base."""
    train = [{"step": s, "split": "train", "loss": 1.3, "bits_per_base": 1.3 / LN2} for s in (10, 20)]
    evals = [{"step": 20, "split": "eval", "val_loss": 1.35, "val_bits_per_base": 1.35 / LN2}]
    return train + evals


def species_records():
    """The species classifier: train loss (nats) and acc, eval accuracy and macro F1."""
    train = [{"step": s, "split": "train", "loss": 0.9, "acc": 0.6} for s in (10, 20)]
    evals = [{"step": 20, "split": "eval", "val_accuracy": 0.7, "val_macro_f1": 0.65}]
    return train + evals


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib Figure saved during the test, whatever the plotting code."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def _axes_curves(fig):
    """{ylabel: {line label: y values}} for the axes of a figure."""
    return {ax.get_ylabel(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
            for ax in fig.axes}


def test_audio_plot_has_one_unit_per_axis(tmp_path, figures):
    assert plot_training_curves(audio_records(), tmp_path / "training.png").stat().st_size > 1000
    (fig,) = figures
    axes = _axes_curves(fig)
    ((ylabel, curves),) = axes.items()
    assert "bits" in ylabel
    # Train cross-entropy in bits on the axis of the eval bits, not the nats of "loss".
    assert curves["train bits_per_sample"] == pytest.approx([(5.0 - s / 10) / LN2 for s in (5, 10, 15, 20)])
    assert curves["eval val_bits_per_sample"] == pytest.approx([6.0, 5.5])
    assert len(curves) == 2  # train loss / ln 2 repeats bits_per_sample: drawn once


def test_dna_plot_keeps_working_in_bits(tmp_path, figures):
    assert plot_training_curves(dna_records(), tmp_path / "training.png").is_file()
    ((ylabel, curves),) = _axes_curves(figures[0]).items()
    assert "bits" in ylabel and set(curves) == {"train bits_per_base", "eval val_bits_per_base"}


def test_classifier_plot_separates_nats_from_fractions(tmp_path, figures):
    assert plot_training_curves(species_records(), tmp_path / "training.png").is_file()
    axes = _axes_curves(figures[0])
    assert axes["cross-entropy (nats)"] == {"train loss": [0.9, 0.9]}
    assert set(axes["fraction"]) == {"eval val_accuracy", "eval val_macro_f1"}


def test_nats_are_converted_when_bits_are_on_the_axis():
    """A nats metric with no bits twin joins the bits axis divided by ln 2, and says so."""
    records = [{"step": 10, "split": "train", "loss": 2.0},
               {"step": 10, "split": "eval", "val_bits_per_sample": 3.1}]
    (panel,) = training_panels(records)
    assert panel.ylabel == "cross-entropy (bits)"
    assert {c.label: c.values for c in panel.curves} == {
        "train loss / ln 2": pytest.approx([2.0 / LN2]), "eval val_bits_per_sample": [3.1]}
    assert training_panels([]) == [] and plot_training_curves([], "unused.png") is None


def test_test_and_baseline_records_become_reference_lines(tmp_path):
    from seqlab.training.curves import plot_training_curves, training_panels
    records = [{"step": 10, "split": "train", "loss": 1.0, "bits_per_sample": 1.0 / math.log(2)},
               {"step": 20, "split": "eval", "val_bits_per_sample": 5.0, "val_accuracy": 0.5},
               {"step": 20, "split": "baseline", "xz_bits_per_sample": 5.5,
                "kmer_test_accuracy": 0.98},
               {"step": 20, "split": "test", "test_accuracy": 0.99}]
    ce, other = training_panels(records)
    assert ce.refs == [("baseline xz_bits_per_sample", 5.5)]
    assert sorted(other.refs) == [("baseline kmer_test_accuracy", 0.98),
                                  ("test test_accuracy", 0.99)]
    assert plot_training_curves(records, tmp_path / "t.png").stat().st_size > 1000
