"""Scores of predicted class indices against encoded labels: macro-F1, accuracy, per-class precision/recall/F1,
confusion matrices. Every number is computed over the rows whose label is not 'None' (IGNORE_INDEX).

Pure numpy/scikit-learn, shared by training (validation macro-F1 each epoch), evaluation and the promotion gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from fashion_tagger.core.errors import FashionTaggerError
from fashion_tagger.core.schema import IGNORE_INDEX
from fashion_tagger.data.labels import LabelSpace


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over all trainable classes on the rows whose label is not 'None' (0 when there are none)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    keep = y_true != IGNORE_INDEX
    if not keep.any():
        return 0.0
    return float(
        f1_score(y_true[keep], y_pred[keep], labels=list(range(num_classes)), average="macro", zero_division=0)
    )


def _majority_class(attribute: str, label_space: LabelSpace, y_true: np.ndarray) -> int:
    """The most frequent trainable class by the label space's counts (the data it was built on), else y_true's."""
    names = label_space.classes[attribute]
    counts = label_space.counts.get(attribute, {})
    if counts and any(name in counts for name in names):
        return int(np.argmax([counts.get(name, 0) for name in names]))
    return int(np.bincount(y_true, minlength=len(names)).argmax()) if len(y_true) else 0


def compute_metrics(
    y_true: Mapping[str, np.ndarray],
    y_pred: Mapping[str, np.ndarray],
    label_space: LabelSpace,
) -> dict[str, Any]:
    """Metrics of predicted class indices against encoded labels (IGNORE_INDEX rows are left out).

    Returns {headline_macro_f1, exact_match, rows, attributes: {name: {accuracy, macro_f1, weighted_f1,
    majority_baseline_accuracy, majority_baseline_macro_f1, per_class, confusion_matrix, ...}}}.
    """
    attributes = [a for a in label_space.attributes if a in y_true]
    if not attributes:
        raise FashionTaggerError(f"no predictions for any attribute of the label space {label_space.attributes}")
    rows = len(np.asarray(y_true[attributes[0]]))
    correct_or_masked = np.ones(rows, dtype=bool)
    any_labelled = np.zeros(rows, dtype=bool)
    per_attribute: dict[str, Any] = {}
    for attribute in attributes:
        names = label_space.classes[attribute]
        labels = list(range(len(names)))
        truth, pred = np.asarray(y_true[attribute]), np.asarray(y_pred[attribute])
        if truth.shape != pred.shape or len(truth) != rows:
            raise FashionTaggerError(f"{attribute}: {len(truth)} labels but {len(pred)} predictions")
        keep = truth != IGNORE_INDEX
        correct_or_masked &= ~keep | (truth == pred)
        any_labelled |= keep
        t, p = truth[keep], pred[keep]
        majority = _majority_class(attribute, label_space, t)
        baseline = np.full_like(t, majority)
        if len(t):
            precision, recall, f1, support = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
            weighted = float(f1_score(t, p, labels=labels, average="weighted", zero_division=0))
        else:
            precision = recall = f1 = np.zeros(len(names))
            support = np.zeros(len(names), dtype=np.int64)
            weighted = 0.0
        confusion = np.zeros((len(names), len(names)), dtype=np.int64)
        np.add.at(confusion, (t, np.clip(p, 0, len(names) - 1)), 1)
        per_attribute[attribute] = {
            "labelled_rows": int(keep.sum()),
            "accuracy": float((t == p).mean()) if len(t) else 0.0,
            "macro_f1": macro_f1(truth, pred, len(names)),
            "weighted_f1": weighted,
            "majority_class": names[majority],
            "majority_baseline_accuracy": float((t == baseline).mean()) if len(t) else 0.0,
            "majority_baseline_macro_f1": macro_f1(t, baseline, len(names)),
            "classes": list(names),
            "per_class": {
                name: {
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, name in enumerate(names)
            },
            "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted class
        }
    exact = correct_or_masked[any_labelled]
    return {
        "headline_macro_f1": float(np.mean([per_attribute[a]["macro_f1"] for a in attributes])),
        "exact_match": float(exact.mean()) if len(exact) else 0.0,
        "rows": rows,
        "rows_with_labels": int(any_labelled.sum()),
        "attributes": per_attribute,
    }


def summary(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The per-attribute headline numbers without the per-class detail."""
    keys = ("accuracy", "macro_f1", "weighted_f1", "majority_baseline_accuracy", "majority_baseline_macro_f1")
    return {a: {k: round(m[k], 6) for k in keys} for a, m in metrics["attributes"].items()}
