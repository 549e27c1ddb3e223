"""Temperature scaling, its figures, and thresholds for a precision target (evaluation/calibration.py,
evaluation/thresholds.py), on logits whose calibration is known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fashion_tagger.core.schema import IGNORE_INDEX
from fashion_tagger.evaluation.calibration import (
    brier,
    calibration_report,
    ece,
    fit_temperature,
    fit_temperatures,
    nll,
    reliability_diagram,
    softmax,
)
from fashion_tagger.evaluation.thresholds import accepted, reached, risk_coverage, threshold_for, thresholds_for


def calibrated_logits(rows: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets drawn from softmax(logits): a perfectly calibrated model, in expectation."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(rows, classes))
    probabilities = softmax(logits)
    targets = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, targets


def test_an_over_confident_model_gets_a_temperature_above_one_and_a_lower_ece():
    logits, targets = calibrated_logits(6000, 6, seed=0)
    over = logits * 5  # the same argmax, five times too sure
    t = fit_temperature(over, targets)
    assert 4.0 < t < 6.0, t  # it undoes the factor
    before, after = ece(softmax(over), targets), ece(softmax(over, t), targets)
    assert after < before / 3, (before, after)
    assert nll(softmax(over, t), targets) < nll(softmax(over), targets)
    assert brier(softmax(over, t), targets) < brier(softmax(over), targets)
    # Temperature scaling changes no tag.
    assert (softmax(over, t).argmax(axis=1) == over.argmax(axis=1)).all()


def test_an_under_confident_model_gets_a_temperature_below_one():
    logits, targets = calibrated_logits(6000, 4, seed=1)
    t = fit_temperature(logits / 3, targets)
    assert 0.25 < t < 0.45, t


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, targets = calibrated_logits(20000, 5, seed=2)
    assert fit_temperature(logits, targets) == pytest.approx(1.0, abs=0.05)


def test_rows_without_a_label_are_never_used():
    logits, targets = calibrated_logits(3000, 5, seed=3)
    masked = targets.copy()
    masked[::2] = IGNORE_INDEX
    # Whatever the logits of the masked rows say, the temperature is that of the labelled rows alone.
    noisy = logits.copy()
    noisy[::2] *= 40
    assert fit_temperature(noisy, masked) == pytest.approx(fit_temperature(logits[1::2], targets[1::2]), rel=1e-6)
    assert ece(softmax(noisy), masked) == pytest.approx(ece(softmax(logits[1::2]), targets[1::2]))
    assert fit_temperature(logits, np.full(len(targets), IGNORE_INDEX)) == 1.0
    assert ece(softmax(logits), np.full(len(targets), IGNORE_INDEX)) is None


def test_the_report_gives_every_figure_before_and_after_per_attribute(tmp_path):
    logits, targets = calibrated_logits(2000, 4, seed=4)
    over = {"gender": logits * 4, "season": logits}
    ys = {"gender": targets, "season": targets}
    temperatures = fit_temperatures(over, ys)
    report = calibration_report(over, ys, temperatures)
    assert set(report) == {"gender", "season"}
    assert report["gender"]["temperature"] > 3
    assert report["gender"]["ece_after"] < report["gender"]["ece_before"]
    assert report["gender"]["rows"] == 2000
    assert {"nll_before", "nll_after", "brier_before", "brier_after"} <= set(report["season"])
    png = reliability_diagram(tmp_path / "reliability_gender.png", "gender", over["gender"], targets,
                              temperatures["gender"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ece_of_a_known_case():
    # Two rows at confidence 0.9, one right: |0.5 - 0.9| over all rows; one row at 0.6, right: |1 - 0.6|.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    targets = np.array([0, 1, 1])
    assert ece(probabilities, targets) == pytest.approx((2 * 0.4 + 1 * 0.4) / 3)


def test_the_threshold_is_the_lowest_that_meets_the_target():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, False, True, False])
    chosen = threshold_for(confidence, correct, 0.75)
    # At 0.7: 4 right of 5 (0.8); at 0.6: 4 of 6 (0.67), below the target.
    assert chosen.threshold == 0.7 and chosen.precision == pytest.approx(0.8)
    assert chosen.coverage == pytest.approx(5 / 6)
    assert threshold_for(confidence, correct, 1.0).threshold == 0.9


def test_tied_confidences_are_accepted_or_refused_together():
    confidence = np.array([0.9, 0.8, 0.8, 0.8])
    correct = np.array([True, True, False, False])
    chosen = threshold_for(confidence, correct, 0.6)
    # Taking one 0.8 row would give 2/2, but a threshold of 0.8 takes all three: 2/4 = 0.5 < 0.6.
    assert chosen.threshold == 0.9 and chosen.coverage == 0.25


def test_a_target_that_no_threshold_meets_accepts_nothing_and_says_why():
    chosen = threshold_for(np.array([0.9, 0.5]), np.array([False, True]), 0.95)
    assert chosen.threshold is None and chosen.coverage == 0.0 and "at best 0.500" in chosen.note
    assert not accepted(np.array([0.99, 1.0]), None).any()
    with pytest.raises(ValueError, match="precision target"):
        threshold_for(np.array([0.9]), np.array([True]), 1.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60),
       st.floats(0.05, 1.0))
def test_thresholds_meet_the_target_on_the_part_they_are_chosen_on(rows, target):
    confidence = np.array([c for c, _ in rows])
    correct = np.array([r for _, r in rows])
    chosen = threshold_for(confidence, correct, target)
    taken = accepted(confidence, chosen.threshold)
    if chosen.threshold is None:
        # No threshold at all meets it: not even the top confidence's group.
        for t in set(confidence.tolist()):
            assert correct[confidence >= t].mean() < target - 1e-12
        return
    assert correct[taken].mean() >= target - 1e-12
    assert chosen.coverage == pytest.approx(taken.mean())
    # And it is the lowest: every lower confidence used as a threshold misses the target.
    for t in set(confidence[confidence < chosen.threshold].tolist()):
        assert correct[confidence >= t].mean() < target - 1e-12


def test_reached_on_another_part_gives_precision_and_coverage_with_intervals():
    rng = np.random.default_rng(5)
    confidence = rng.random(4000)
    correct = rng.random(4000) < confidence  # calibrated: right as often as it claims
    chosen = thresholds_for({"usage": confidence[:2000]}, {"usage": correct[:2000]}, 0.9)["usage"]
    on_test = reached(confidence[2000:], correct[2000:], chosen.threshold, resamples=300, seed=1)
    assert on_test["accepted"] == int((confidence[2000:] >= chosen.threshold).sum())
    assert 0.85 < on_test["precision"] < 0.97
    low, high = on_test["precision_interval"]
    assert low <= on_test["precision"] <= high
    low, high = on_test["coverage_interval"]
    assert low <= on_test["coverage"] <= high
    curve = risk_coverage(confidence, correct)
    assert curve["coverage"][-1] == 1.0 and np.all(np.diff(curve["threshold"]) <= 0)
    assert reached(np.array([0.5]), np.array([True]), None)["precision"] is None
