"""Probes on embeddings: cross-validated scikit-learn classifiers that say how much of a label
the pooled vectors hold, with a report and a confusion matrix in the run directory."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from ..training.rundir import RunDir
from ..utils import atomic_write_json
from .embeddings import Embeddings
from .plots import plot_confusion_matrix


def run_probe(emb: Embeddings, estimator: str = "logistic", folds: int = 5,
              group_split: bool = False, seed: int = 0, C: float = 1.0) -> dict:
    """Cross-validated probe on the labelled rows; returns metrics and pooled predictions.

    estimator: "logistic" (StandardScaler + LogisticRegression) | "knn" | "linear_svm".
    group_split: folds by the ``group`` column (e.g. strain) so no group is in train and test.
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
    splitter = cv.split(X, y, groups) if group_split else cv.split(X, y)
    for _, test in splitter:
        fold_acc.append(accuracy_score(y[test], pred[test]))
    labels = list(range(max(len(emb.classes), int(y.max()) + 1)))
    return {
        "n": int(len(y)), "folds": k, "estimator": estimator, "group_split": group_split,
        "accuracy": float(accuracy_score(y, pred)),
        "accuracy_fold_std": float(np.std(fold_acc)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def probe_and_report(emb: Embeddings, pcfg, run: RunDir, title: str) -> dict:
    """Run the probe ``pcfg`` (a ProbeConfig: estimator, folds, group_split, seed, C) on
    ``emb``; write probe_report.json and plots/confusion_probe.png into ``run``; return the
    summary entries."""
    rep = run_probe(emb, estimator=pcfg.estimator, folds=pcfg.folds,
                    group_split=pcfg.group_split, seed=pcfg.seed, C=pcfg.C)
    atomic_write_json(run.path / "probe_report.json", rep)
    names = emb.classes or [str(i) for i in range(len(rep["confusion_matrix"]))]
    png = plot_confusion_matrix(np.array(rep["confusion_matrix"]), names,
                                run.plots_dir / "confusion_probe.png",
                                title=f"{title}: {pcfg.estimator} probe, {rep['folds']}-fold CV, "
                                      f"accuracy {rep['accuracy']:.3f}")
    return {"probe_accuracy": rep["accuracy"], "probe_macro_f1": rep["macro_f1"],
            "probe_folds": rep["folds"], "probe_plot": str(png)}


__all__ = ["run_probe", "probe_and_report"]
