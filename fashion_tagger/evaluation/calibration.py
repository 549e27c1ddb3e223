"""Calibration of the tagger's confidences: one temperature per attribute, and the figures that judge it.

A network's softmax is usually over-confident (Guo et al., "On Calibration of Modern Neural Networks", 2017).
Temperature scaling divides an attribute's logits by one scalar T > 0 fitted on the validation part: it changes no
argmax, so no tag and no accuracy, only how sure each tag claims to be. T > 1 softens an over-confident model.

- `fit_temperature(logits, targets)`: the T that minimises the negative log-likelihood of the labelled rows. The NLL
  is convex in 1/T, so a bounded golden-section search on 1/T finds its minimum to 1e-6 without a gradient.
- `ece`, `nll`, `brier`: expected calibration error (equal-width bins of the top confidence), mean negative
  log-likelihood and the multi-class Brier score, over labelled rows; `calibration_report` gives all three before
  and after the temperatures, per attribute.
- `reliability_diagram`: accuracy against confidence per bin, before and after, as a PNG.

Rows whose target is IGNORE_INDEX (a 'None' label) are never used: they have no class to be right about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fashion_tagger.core.schema import IGNORE_INDEX

ECE_BINS = 15
INVERSE_T_BOUNDS = (0.02, 50.0)  # T between 0.02 and 50: beyond either end the logits carry no usable scale
_GOLDEN = (math.sqrt(5) - 1) / 2


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of LOGITS / TEMPERATURE, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _labelled(values: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets)
    keep = targets != IGNORE_INDEX
    return np.asarray(values)[keep], targets[keep].astype(np.int64)


def _nll_at(logits: np.ndarray, targets: np.ndarray, inverse_t: float) -> float:
    z = logits * inverse_t
    peak = z.max(axis=1)
    log_norm = peak + np.log(np.exp(z - peak[:, None]).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), targets]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, *, tolerance: float = 1e-6) -> float:
    """The temperature T minimising the NLL of softmax(LOGITS / T) on the labelled rows of TARGETS; 1.0 when no row
    is labelled or every logit is equal (nothing to scale)."""
    logits, targets = _labelled(logits, targets)
    if not len(targets) or logits.shape[1] < 2:
        return 1.0
    logits = logits.astype(np.float64)
    if np.ptp(logits, axis=1).max() == 0:
        return 1.0
    low, high = INVERSE_T_BOUNDS
    a, b = low, high
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _nll_at(logits, targets, c), _nll_at(logits, targets, d)
    while b - a > tolerance * max(1.0, abs(c)):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll_at(logits, targets, c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll_at(logits, targets, d)
    return float(1.0 / ((a + b) / 2))


def fit_temperatures(logits: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`fit_temperature` per attribute of LOGITS (the validation part's, never test)."""
    return {attribute: round(fit_temperature(values, targets[attribute]), 6) for attribute, values in logits.items()}


def top_confidence(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence of the top class, whether it is the target) of every labelled row."""
    probabilities, targets = _labelled(probabilities, targets)
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == targets


def ece(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: over BINS equal-width bins of the top confidence, the gap between accuracy and
    mean confidence, weighted by the bin's share of the labelled rows. None without labelled rows."""
    confidence, correct = top_confidence(probabilities, targets)
    if not len(confidence):
        return None
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, weights=correct, minlength=bins) - np.bincount(which, weights=confidence,
                                                                                   minlength=bins))
    return float(gap.sum() / count.sum())


def nll(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """Mean negative log-likelihood of the target class over labelled rows (probabilities clipped at 1e-12)."""
    probabilities, targets = _labelled(probabilities, targets)
    if not len(targets):
        return None
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(targets)), targets], 1e-12, 1.0))))


def brier(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """Multi-class Brier score: the mean over labelled rows of the squared distance to the one-hot target."""
    probabilities, targets = _labelled(probabilities, targets)
    if not len(targets):
        return None
    one_hot = np.zeros_like(probabilities, dtype=np.float64)
    one_hot[np.arange(len(targets)), targets] = 1.0
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def calibration_report(logits: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                       temperatures: Mapping[str, float], bins: int = ECE_BINS) -> dict[str, dict[str, Any]]:
    """Per attribute: its temperature, the labelled rows, and ECE, NLL and Brier before (T = 1) and after."""
    report: dict[str, dict[str, Any]] = {}
    for attribute, values in logits.items():
        t = float(temperatures.get(attribute, 1.0))
        before, after = softmax(values), softmax(values, t)
        y = targets[attribute]
        report[attribute] = {
            "temperature": t,
            "rows": int((np.asarray(y) != IGNORE_INDEX).sum()),
            "ece_before": ece(before, y, bins), "ece_after": ece(after, y, bins),
            "nll_before": nll(before, y), "nll_after": nll(after, y),
            "brier_before": brier(before, y), "brier_after": brier(after, y),
        }
    return report


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: its centre, rows, mean confidence and accuracy (NaN where empty)."""
    which = np.minimum((np.asarray(confidence) * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
        mean = np.bincount(which, weights=confidence, minlength=bins) / count
    return {"centre": (np.arange(bins) + 0.5) / bins, "rows": count, "confidence": mean, "accuracy": accuracy}


def reliability_diagram(path: str | Path, attribute: str, logits: np.ndarray, targets: np.ndarray,
                        temperature: float, bins: int = ECE_BINS) -> Path:
    """PATH: accuracy against confidence per bin for ATTRIBUTE, before (T = 1) and after TEMPERATURE, with the
    diagonal of perfect calibration and each curve's ECE in its legend."""
    from fashion_tagger.core.plots import saved_figure

    with saved_figure(path, figsize=(4.6, 4.2)) as (_, ax):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfectly calibrated")
        for t, label, style in ((1.0, "raw softmax", "o-"), (temperature, f"T = {temperature:.2f}", "s-")):
            probabilities = softmax(logits, t)
            confidence, correct = top_confidence(probabilities, targets)
            figures = reliability_bins(confidence, correct, bins)
            shown = figures["rows"] > 0
            value = ece(probabilities, targets, bins)
            ax.plot(figures["confidence"][shown], figures["accuracy"][shown], style, markersize=3,
                    label=f"{label}: ECE {value:.3f}" if value is not None else label)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence of the tag", ylabel="share of tags that are right",
               title=f"{attribute}: reliability ({int((np.asarray(targets) != IGNORE_INDEX).sum())} labelled)")
        ax.legend(loc="upper left", fontsize=8)
    return Path(path)
