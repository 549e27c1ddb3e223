"""Review thresholds chosen for a precision target, and what they reach on another part.

A tag is *accepted* (published without a person looking) when its confidence is at or above its attribute's
threshold. For a precision target P, `threshold_for` gives the lowest threshold at which the accepted tags of the
validation part are right at least P of the time: the most tags accepted for that promise. Precision is not
monotone in the threshold, so every distinct confidence is tried, from the top down, and the lowest that meets P
wins. An attribute that meets P at no threshold gets `None`: no tag of it is accepted (coverage 0), and the result
says why.

`reached` reports a threshold on another part (test): the precision the accepted tags reach there, the coverage
(the share of labelled rows accepted) and their bootstrap intervals; `risk_coverage` gives the curve of error rate
against coverage over every threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fashion_tagger.evaluation.bootstrap import interval, resample_chunks


@dataclass(frozen=True)
class Threshold:
    """An attribute's threshold for a precision target, with what it reached on the part it was chosen on."""

    target: float
    threshold: float | None  # None: the target is met at no threshold, so nothing is accepted
    precision: float | None  # of the accepted tags, on the part it was chosen on
    coverage: float  # the share of labelled rows accepted there
    rows: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accepted(confidence: np.ndarray, threshold: float | None) -> np.ndarray:
    """Which tags a THRESHOLD accepts: confidence >= threshold; none when the threshold is None."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if threshold is None:
        return np.zeros(confidence.shape, dtype=bool)
    return confidence >= threshold


def threshold_for(confidence: np.ndarray, correct: np.ndarray, target: float) -> Threshold:
    """The lowest threshold whose accepted tags (confidence >= it) are right at least TARGET of the time."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"a precision target must be in (0, 1], not {target}")
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(confidence)
    if n == 0:
        return Threshold(target, None, None, 0.0, 0, "no labelled rows to choose a threshold on")
    order = np.argsort(-confidence, kind="stable")
    ranked, right = confidence[order], correct[order]
    precision = np.cumsum(right) / np.arange(1, n + 1)
    # A threshold accepts every tag tied with it: only the last row of each run of equal confidences is a choice.
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    meets = ends[precision[ends] >= target - 1e-12]
    if not len(meets):
        best = float(precision[ends].max())
        return Threshold(target, None, None, 0.0, n,
                         f"no threshold reaches precision {target:g} (at best {best:.3f}): every tag goes to review")
    last = int(meets[-1])
    return Threshold(target, float(ranked[last]), float(precision[last]), (last + 1) / n, n)


def thresholds_for(confidences: Mapping[str, np.ndarray], correct: Mapping[str, np.ndarray],
                   target: float | Mapping[str, float]) -> dict[str, Threshold]:
    """`threshold_for` per attribute; TARGET is one number or one per attribute."""
    return {attribute: threshold_for(values, correct[attribute],
                                     target if isinstance(target, float | int) else target[attribute])
            for attribute, values in confidences.items()}


def reached(confidence: np.ndarray, correct: np.ndarray, threshold: float | None, *, resamples: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """What THRESHOLD reaches on a part: accepted rows, precision of the accepted tags and coverage, each with a
    bootstrap interval (RESAMPLES resamples of the part's rows, `bootstrap.interval`)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    taken = accepted(confidence, threshold).astype(np.float64)
    out: dict[str, Any] = {"threshold": threshold, "rows": n, "accepted": int(taken.sum()),
                           "precision": float((taken * correct).sum() / taken.sum()) if taken.sum() else None,
                           "coverage": float(taken.mean()) if n else 0.0}
    if not n or not resamples:
        return out | {"precision_interval": None, "coverage_interval": None}
    precisions, coverages = [], []
    for weights in resample_chunks(n, resamples, seed):
        kept = weights @ taken
        coverages.append(kept / n)
        with np.errstate(invalid="ignore", divide="ignore"):
            precisions.append((weights @ (taken * correct)) / kept)
    coverage = interval(np.concatenate(coverages))
    precision_values = np.concatenate(precisions)
    precision_values = precision_values[np.isfinite(precision_values)]  # resamples that accepted nothing
    precision = interval(precision_values)
    out["coverage_interval"] = [coverage["low"], coverage["high"]]
    out["precision_interval"] = [precision["low"], precision["high"]] if len(precision_values) else None
    return out


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Over every threshold from the top confidence down: the coverage it gives and the error rate (risk) of the
    tags it accepts."""
    confidence = np.asarray(confidence, dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    right = np.asarray(correct, dtype=bool)[order]
    n = np.arange(1, len(right) + 1)
    return {"threshold": confidence[order], "coverage": n / max(1, len(right)), "risk": 1 - np.cumsum(right) / n}
