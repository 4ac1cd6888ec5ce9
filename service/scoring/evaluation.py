"""Accuracy, ROC AUC and the confusion matrix, in numpy (no scikit-learn in the serving image)."""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "confusion_matrix", "summary"]


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half); None when
    only one class is present."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """``[k, k]``: rows are true labels, columns predicted ones."""
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (truth, predicted), 1)
    return m


def summary(truth: np.ndarray, probs: np.ndarray, labels: tuple[str, ...]) -> dict:
    """Accuracy, ROC AUC (binary: of the last label; more classes: one-vs-rest per label and their
    mean) and the confusion matrix."""
    k = len(labels)
    predicted = probs.argmax(1)
    out: dict = {"count": int(len(truth)), "accuracy": float((predicted == truth).mean()) if len(truth) else None}
    if k == 2:
        out["roc_auc"] = roc_auc(truth == 1, probs[:, 1])
        out["roc_auc_positive_label"] = labels[1]
    else:
        per = {name: roc_auc(truth == i, probs[:, i]) for i, name in enumerate(labels)}
        valid = [v for v in per.values() if v is not None]
        out["roc_auc"] = float(np.mean(valid)) if valid else None
        out["roc_auc_per_label"] = per
    out["confusion_matrix"] = {"labels": list(labels), "rows": "true label", "columns": "predicted label",
                               "matrix": confusion_matrix(truth, predicted, k).tolist()}
    return out
