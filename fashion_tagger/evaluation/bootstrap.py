"""Paired bootstrap of macro-F1 over test images: how sure the gate can be that one model is better than another.

Each model's per-image predictions are computed once; a resample is a vector of counts (how often each image
was drawn), and every class's true positives, support and predicted count under all resamples come from one
matrix product, so 1,000 resamples over a few thousand images take well under a second. Resamples are drawn and
scored RESAMPLE_CHUNK at a time, so memory grows with the test part's size times the chunk, not times all
resamples (50,000 images: 1,065 MB at once, see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fashion_tagger.core.schema import IGNORE_INDEX
from fashion_tagger.data.labels import LabelSpace

CONFIDENCE = 0.95
RESAMPLE_CHUNK = 100


def resample_chunks(n: int, resamples: int, seed: int, chunk: int = RESAMPLE_CHUNK):
    """`resample_counts(n, resamples, seed)` in blocks of at most CHUNK rows, drawn from one generator in order."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        if n == 0:
            yield np.zeros((rows, 0), dtype=np.float32)
            continue
        drawn = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        yield np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float32)


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """resamples x n: how many times each of N images is drawn in each resample (each row sums to N)."""
    chunks = list(resample_chunks(n, resamples, seed))
    return np.concatenate(chunks) if chunks else np.zeros((0, n), dtype=np.float32)


def macro_f1_per_resample(weights: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 over NUM_CLASSES classes for every row of WEIGHTS (image counts), as `metrics.macro_f1` defines it:
    rows labelled IGNORE_INDEX left out, a class never true nor predicted scores 0."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    labelled = truth != IGNORE_INDEX
    classes = np.arange(num_classes)
    is_true = ((truth[:, None] == classes) & labelled[:, None]).astype(np.float32)
    is_pred = ((pred[:, None] == classes) & labelled[:, None]).astype(np.float32)
    true_positive = weights @ (is_true * is_pred)
    denominator = weights @ is_true + weights @ is_pred  # 2 TP + FP + FN
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return f1.mean(axis=1) if num_classes else np.zeros(len(weights))


def interval(values: np.ndarray) -> dict[str, float]:
    """The central CONFIDENCE percentile interval of VALUES, with their mean."""
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (0.0, 0.0)
    return {"low": float(low), "high": float(high), "mean": float(np.mean(values)) if len(values) else 0.0}


def paired_bootstrap(y_true: Mapping[str, np.ndarray], challenger: Mapping[str, np.ndarray],
                     champion: Mapping[str, np.ndarray], labels: LabelSpace, *, resamples: int,
                     seed: int) -> dict[str, Any]:
    """Intervals of (challenger - champion) headline macro-F1 and of each attribute's macro-F1 drop
    (champion - challenger), both models scored on the same resampled images."""
    attributes = [a for a in labels.attributes if a in y_true]
    n = len(np.asarray(y_true[attributes[0]])) if attributes else 0
    new: dict[str, list[np.ndarray]] = {a: [] for a in attributes}
    old: dict[str, list[np.ndarray]] = {a: [] for a in attributes}
    for weights in resample_chunks(n, resamples, seed):
        for attribute in attributes:
            k = len(labels.classes[attribute])
            new[attribute].append(macro_f1_per_resample(weights, y_true[attribute], challenger[attribute], k))
            old[attribute].append(macro_f1_per_resample(weights, y_true[attribute], champion[attribute], k))
    gains, drops = [], {}
    for attribute in attributes:
        challenger_f1 = np.concatenate(new[attribute]) if new[attribute] else np.zeros(0)
        champion_f1 = np.concatenate(old[attribute]) if old[attribute] else np.zeros(0)
        gains.append(challenger_f1 - champion_f1)
        drops[attribute] = interval(champion_f1 - challenger_f1)
    headline_gain = np.mean(gains, axis=0) if gains else np.zeros(resamples)
    return {"resamples": resamples, "seed": seed, "images": n, "confidence": CONFIDENCE,
            "headline_gain": interval(headline_gain), "attribute_drops": drops}
