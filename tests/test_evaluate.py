"""Evaluation: metrics equal scikit-learn's on fixed predictions; a run's eval directory has every output, the
test part's (the headline) and the validation part's apart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from tagger_helpers import make_split, tiny_config

from fashion_tagger.core.io import read_json
from fashion_tagger.core.schema import IGNORE_INDEX
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation.evaluate import evaluate_run
from fashion_tagger.evaluation.metrics import compute_metrics, macro_f1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _label_space() -> LabelSpace:
    return LabelSpace(
        classes={"colour": ("Black", "Blue", "Red", "White"), "kind": ("Bag", "Shoe")},
        min_class_count=1,
        counts={"colour": {"Black": 50, "Blue": 20, "Red": 10, "White": 5, "Teal": 2}, "kind": {"Bag": 3, "Shoe": 9}},
    )


def _fixed_predictions() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    n = 200
    colour_true = rng.integers(0, 3, n)  # class 3 (White) never occurs in truth
    colour_true[rng.random(n) < 0.2] = IGNORE_INDEX
    colour_pred = np.where(rng.random(n) < 0.6, np.clip(colour_true, 0, None), rng.integers(0, 4, n))
    kind_true = rng.integers(0, 2, n)
    kind_true[:7] = IGNORE_INDEX
    kind_pred = np.where(rng.random(n) < 0.8, np.clip(kind_true, 0, None), 1 - np.clip(kind_true, 0, None))
    return {"colour": colour_true, "kind": kind_true}, {"colour": colour_pred, "kind": kind_pred}


def test_metrics_equal_sklearn_on_fixed_predictions():
    labels = _label_space()
    y_true, y_pred = _fixed_predictions()
    metrics = compute_metrics(y_true, y_pred, labels)

    for attribute, names in labels.classes.items():
        keep = y_true[attribute] != IGNORE_INDEX
        t, p = y_true[attribute][keep], y_pred[attribute][keep]
        classes = list(range(len(names)))
        m = metrics["attributes"][attribute]
        assert m["labelled_rows"] == keep.sum()
        assert m["accuracy"] == pytest.approx(accuracy_score(t, p))
        assert m["macro_f1"] == pytest.approx(f1_score(t, p, labels=classes, average="macro", zero_division=0))
        assert m["weighted_f1"] == pytest.approx(f1_score(t, p, labels=classes, average="weighted", zero_division=0))
        precision, recall, f1, support = precision_recall_fscore_support(t, p, labels=classes, zero_division=0)
        for i, name in enumerate(names):
            assert m["per_class"][name] == pytest.approx(
                {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
            )
        assert m["confusion_matrix"] == confusion_matrix(t, p, labels=classes).tolist()

    expected_headline = np.mean([metrics["attributes"][a]["macro_f1"] for a in labels.classes])
    assert metrics["headline_macro_f1"] == pytest.approx(expected_headline)

    labelled = (y_true["colour"] != IGNORE_INDEX) | (y_true["kind"] != IGNORE_INDEX)
    right = [(y_true[a] == IGNORE_INDEX) | (y_true[a] == y_pred[a]) for a in labels.classes]
    assert metrics["exact_match"] == pytest.approx((right[0] & right[1])[labelled].mean())


def test_majority_baseline_uses_the_most_frequent_trainable_class():
    labels = _label_space()
    y_true, y_pred = _fixed_predictions()
    metrics = compute_metrics(y_true, y_pred, labels)
    colour = metrics["attributes"]["colour"]
    keep = y_true["colour"] != IGNORE_INDEX
    assert colour["majority_class"] == "Black"  # 'Teal' is not trainable, whatever its count
    assert colour["majority_baseline_accuracy"] == pytest.approx((y_true["colour"][keep] == 0).mean())
    assert metrics["attributes"]["kind"]["majority_class"] == "Shoe"


def test_masked_rows_never_count():
    labels = _label_space()
    y_true = {"colour": np.array([0, IGNORE_INDEX, 2]), "kind": np.array([IGNORE_INDEX] * 3)}
    y_pred = {"colour": np.array([0, 3, 2]), "kind": np.array([0, 1, 0])}
    metrics = compute_metrics(y_true, y_pred, labels)
    assert metrics["attributes"]["colour"]["accuracy"] == 1.0
    assert metrics["attributes"]["kind"]["labelled_rows"] == 0
    assert metrics["attributes"]["kind"]["macro_f1"] == 0.0
    assert metrics["exact_match"] == 1.0
    assert macro_f1(np.array([IGNORE_INDEX]), np.array([1]), 2) == 0.0


def test_evaluate_run_writes_metrics_tables_and_plots(tmp_path):
    from fashion_tagger.training.train import train_model

    split_dir = make_split(tmp_path)
    run_dir = tmp_path / "run"
    config = tiny_config(epochs=1)
    train_model(config, split_dir=split_dir, run_dir=run_dir)
    result = evaluate_run(run_dir, config)

    eval_dir = run_dir / "eval"
    metrics = pd.read_json(eval_dir / "metrics.json", typ="series")
    assert {"headline_macro_f1", "exact_match", "attributes"} <= set(metrics.index)
    for attribute in ("masterCategory", "baseColour"):
        m = metrics["attributes"][attribute]
        assert {"accuracy", "macro_f1", "weighted_f1", "majority_baseline_accuracy"} <= set(m)
        per_class = pd.read_csv(eval_dir / f"per_class_{attribute}.csv")
        assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
        assert per_class["support"].sum() == m["labelled_rows"]
        assert (eval_dir / f"per_class_f1_{attribute}.png").stat().st_size > 1000
        assert (eval_dir / f"confusion_{attribute}.png").stat().st_size > 1000

    # The numbers in the files are those of the predictions written beside them.
    predictions = pd.read_parquet(eval_dir / "predictions.parquet")
    test = pd.read_parquet(split_dir / "test.parquet")
    assert predictions["id"].tolist() == test["id"].tolist()  # the headline is the test part's
    assert metrics["split"] == "test" and metrics["rows"] == result.rows == len(test)
    assert metrics["val"]["rows"] == result.val_rows == len(pd.read_parquet(split_dir / "val.parquet"))
    assert result.val_headline_macro_f1 == pytest.approx(metrics["val"]["headline_macro_f1"], abs=1e-6)
    labelled = predictions["baseColour"] != "None"
    accuracy = (predictions.loc[labelled, "baseColour"] == predictions.loc[labelled, "baseColour_pred"]).mean()
    assert metrics["attributes"]["baseColour"]["accuracy"] == pytest.approx(accuracy)
    assert result.headline_macro_f1 == pytest.approx(metrics["headline_macro_f1"], abs=1e-6)
    assert result.checkpoint.name == "best.ckpt"

    # Calibration on test: the temperatures fitted on validation, judged on test, before and after; the review
    # thresholds chosen on validation, with what they reach on test.
    calibration = read_json(run_dir / "calibration.json")
    on_test = metrics["calibration"]
    assert on_test["part"] == "test" and on_test["calibrated"] is True
    for attribute, report in on_test["attributes"].items():
        assert report["temperature"] == pytest.approx(calibration["temperatures"][attribute])
        assert report["rows"] == int((predictions[attribute] != "None").sum())
        assert {"ece_before", "ece_after", "nll_before", "nll_after", "brier_before", "brier_after"} <= set(report)
        reached = metrics["coverage"][attribute]
        chosen = calibration["thresholds"][attribute]["threshold"]
        assert reached["threshold"] == (pytest.approx(chosen) if chosen is not None else None)
        assert reached["target_precision"] == pytest.approx(0.95) and reached["rows"] == report["rows"]
        # The confidences in predictions.parquet are the calibrated ones the threshold is applied to.
        rows = predictions[predictions[attribute] != "None"]
        if reached["threshold"] is not None:
            taken = rows[f"{attribute}_confidence"] >= reached["threshold"] - 1e-6
            assert abs(int(taken.sum()) - reached["accepted"]) <= 1, (attribute, reached)
        assert (eval_dir / f"reliability_{attribute}.png").stat().st_size > 1000
        assert (eval_dir / f"risk_coverage_{attribute}.png").stat().st_size > 1000


def test_training_and_its_checkpoint_selection_never_see_a_test_image(tmp_path):
    """Train and val feed the optimiser, early stopping and checkpoint selection; test images are in neither."""
    from fashion_tagger.core.layout import cached_image_path
    from fashion_tagger.training.datamodule import TaggerDataModule

    split_dir = make_split(tmp_path)
    module = TaggerDataModule(split_dir, batch_size=8, num_workers=0)
    module.setup("fit")
    parts = {p: pd.read_parquet(split_dir / f"{p}.parquet") for p in ("train", "val", "test")}
    prepared = pd.read_json(split_dir / "prepared.json", typ="series")

    def images(*names):
        return {str(cached_image_path(prepared["cache_root"], sha, prepared["width"], prepared["height"]))
                for name in names for sha in parts[name]["image_sha256"]}

    # This hand-made split draws some identical pictures into several parts; the ones only test holds:
    test_only = images("test") - images("train", "val")
    assert len(module.train_set) + len(module.val_set) == 48 - len(parts["test"]) == 36 and test_only
    assert not (set(module.train_set.paths) | set(module.val_set.paths)) & test_only
