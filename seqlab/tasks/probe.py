"""Probes on embeddings: cross-validated scikit-learn classifiers that say how much of a label
the pooled vectors hold, with a report and a confusion matrix in the run directory."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from ..training.rundir import RunDir
from ..utils import atomic_write_json
from .embeddings import Embeddings
from .plots import plot_confusion_matrix


def row_sequences(emb: Embeddings, rows: np.ndarray) -> list[np.ndarray] | None:
    """Byte ids of the given rows, read again from their FASTA files (the ``source`` column);
    None when the file lacks that column or a source file is gone."""
    if emb.source is None or any(not str(emb.source[i]) for i in rows):
        return None
    from ..data.genome import Genome
    genomes: dict[str, Genome] = {}
    out = []
    for i in rows:
        src = str(emb.source[i])
        if src not in genomes:
            try:
                genomes[src] = Genome(src, fold_case=True)
            except (FileNotFoundError, ValueError):
                return None
        out.append(genomes[src].ids(str(emb.contig[i]), int(emb.start[i]), int(emb.end[i]),
                                    str(emb.strand[i])))
    return out


def run_probe(emb: Embeddings, estimator: str = "logistic", folds: int = 5,
              group_split: bool = False, seed: int = 0, C: float = 1.0,
              kmer_baseline: bool = True) -> dict:
    """Cross-validated probe on the labelled rows; returns metrics and pooled predictions.

    estimator: "logistic" (StandardScaler + LogisticRegression) | "knn" | "linear_svm".
    group_split: folds by the ``group`` column (e.g. strain) so no group is in train and test.
    kmer_baseline: also cross-validate a k-mer logistic regression on the rows' sequences in
    the same folds (:func:`seqlab.tasks.baselines.kmer_cv_baseline`), under "baseline"; left
    out, with the reason, when the file does not say where its rows came from.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    keep = emb.label >= 0
    X, y, groups = emb.embeddings[keep], emb.label[keep], emb.group[keep]
    if len(np.unique(y)) < 2:
        raise DataError(f"probe: needs at least two classes among the labelled rows, got "
                        f"{np.unique(y).tolist()}")
    estimators = {
        "logistic": lambda: LogisticRegression(C=C, max_iter=2000),
        "knn": lambda: KNeighborsClassifier(n_neighbors=5),
        "linear_svm": lambda: LinearSVC(C=C, max_iter=5000),
    }
    if estimator not in estimators:
        raise ConfigError(f"probe.estimator={estimator!r}: choose one of {sorted(estimators)}")
    clf = make_pipeline(StandardScaler(), estimators[estimator]())
    min_count = int(np.bincount(y).min())
    if group_split:
        n_groups = len(np.unique(groups))
        k = min(folds, n_groups)
        if k < 2:
            raise DataError(f"probe: group_split needs at least 2 groups, got {n_groups}")
        cv = GroupKFold(n_splits=k)
        pred = cross_val_predict(clf, X, y, cv=cv, groups=groups)
    else:
        k = max(2, min(folds, min_count))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        pred = cross_val_predict(clf, X, y, cv=cv)
    fold_acc = []
    splits = list(cv.split(X, y, groups) if group_split else cv.split(X, y))
    for _, test in splits:
        fold_acc.append(accuracy_score(y[test], pred[test]))
    labels = list(range(max(len(emb.classes), int(y.max()) + 1)))
    baseline = None
    if kmer_baseline:
        seqs = row_sequences(emb, np.flatnonzero(keep))
        if seqs is None:
            baseline = {"unavailable": "the embeddings file does not name the FASTA of its rows "
                                       "(source column) or a file is gone: rerun `seqlab run "
                                       "embed` to get the k-mer baseline"}
        else:
            from .baselines import kmer_cv_baseline
            baseline = kmer_cv_baseline(seqs, y, splits)
    return {
        "n": int(len(y)), "folds": k, "estimator": estimator, "group_split": group_split,
        "accuracy": float(accuracy_score(y, pred)),
        "accuracy_fold_std": float(np.std(fold_acc)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        **({"baseline": baseline} if baseline is not None else {}),
    }


def probe_and_report(emb: Embeddings, pcfg, run: RunDir, title: str) -> dict:
    """Run the probe ``pcfg`` (a ProbeConfig: estimator, folds, group_split, seed, C) on
    ``emb``; write probe_report.json and plots/confusion_probe.png into ``run``; return the
    summary entries."""
    rep = run_probe(emb, estimator=pcfg.estimator, folds=pcfg.folds,
                    group_split=pcfg.group_split, seed=pcfg.seed, C=pcfg.C,
                    kmer_baseline=bool(getattr(pcfg, "kmer_baseline", True)))
    atomic_write_json(run.path / "probe_report.json", rep)
    names = emb.classes or [str(i) for i in range(len(rep["confusion_matrix"]))]
    base = rep.get("baseline") or {}
    plot_title = (f"{title}: {pcfg.estimator} probe, {rep['folds']}-fold CV, "
                  f"accuracy {rep['accuracy']:.3f}")
    if "accuracy" in base:
        plot_title += f" (k-mer baseline {base['accuracy']:.3f})"
    png = plot_confusion_matrix(np.array(rep["confusion_matrix"]), names,
                                run.plots_dir / "confusion_probe.png", title=plot_title)
    out = {"probe_accuracy": rep["accuracy"], "probe_macro_f1": rep["macro_f1"],
           "probe_folds": rep["folds"], "probe_plot": str(png)}
    if "accuracy" in base:
        out.update({"probe_baseline_kmer_accuracy": base["accuracy"],
                    "probe_baseline_kmer_k": base["k"]})
    elif base:
        out["probe_baseline_kmer"] = base["unavailable"]
    return out


__all__ = ["run_probe", "probe_and_report"]
