"""Evaluate a trained run on its test part (the headline) and its validation part: per-attribute and per-class
metrics, confusion matrices, plots.

Images go through `scoring`, the path the promotion gate and serving use; the numbers come from
`metrics.compute_metrics`; the files go where `layout.EvalDir` says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fashion_tagger.core.config import Config
from fashion_tagger.core.io import StageResult, write_json, write_parquet
from fashion_tagger.core.layout import EvalDir, TrainDir
from fashion_tagger.core.plots import saved_figure
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation.metrics import compute_metrics, summary
from fashion_tagger.evaluation.scoring import PredictorModel, ScoringSet, encode_predictions, predict_paths, scoring_set

HEADLINE_PART = "test"

log = logging.getLogger(__name__)


@dataclass
class EvalResult(StageResult):
    run_dir: Path
    eval_dir: Path
    metrics_path: Path
    checkpoint: Path
    split_dir: Path
    rows: int  # test rows
    headline_macro_f1: float  # on test: the headline
    exact_match: float
    val_rows: int = 0
    val_headline_macro_f1: float | None = None  # on val, which chose the checkpoint: optimistic
    split: str = HEADLINE_PART
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


def score_part(model: Any, split_dir: Path, part: str, batch_size: int) -> tuple[ScoringSet, pd.DataFrame,
                                                                                 dict[str, np.ndarray]]:
    """A model's predictions on one split part through the one scoring path (`scoring`), encoded on its classes."""
    data = scoring_set(split_dir, part)
    predictions = predict_paths(model, data.paths, batch_size, desc=f"evaluate {part}")
    return data, predictions, encode_predictions(predictions, data.labels)


def evaluate_run(
    run_dir: str | Path,
    config: Config,
    *,
    checkpoint: str | Path | None = None,
    split_dir: str | Path | None = None,
) -> EvalResult:
    """Score a training run's checkpoint (default: its best) on the test part of a split (default: the split it
    trained on), the headline, and on its validation part, which chose the checkpoint and is reported apart.

    Images are scored as the gate and serving score them (`scoring`: originals, the serving preprocessing),
    `registry.gate_batch_size` at a time; CPU threads come from `config.train`.
    """
    from fashion_tagger.core.parallel import cpu_threads
    from fashion_tagger.serving.predictor import Predictor

    train_dir = TrainDir(Path(run_dir).expanduser().resolve())
    checkpoint = Path(checkpoint).expanduser().resolve() if checkpoint else train_dir.checkpoint()
    split_dir = Path(split_dir).expanduser().resolve() if split_dir else train_dir.recorded_split()
    predictor = Predictor.from_checkpoint(checkpoint)
    model = PredictorModel(predictor)
    threads = config.train.cpu_threads if predictor.device.type == "cpu" else 0
    batch_size = config.registry.gate_batch_size
    with cpu_threads(threads):
        with recorded_logits(predictor) as test_logits:  # the network's raw outputs on the served path
            data, predictions, y_pred = score_part(model, split_dir, HEADLINE_PART, batch_size)
        val_data, _, val_pred = score_part(model, split_dir, "val", batch_size)
    label_space = data.labels
    metrics = compute_metrics(data.y_true, y_pred, label_space)
    val_metrics = compute_metrics(val_data.y_true, val_pred, val_data.labels)
    metrics.update({"checkpoint": str(checkpoint), "split_dir": str(split_dir), "split": HEADLINE_PART,
                    "val": {"split": "val", "role": "early stopping and checkpoint selection (optimistic)",
                            **{k: val_metrics[k] for k in ("headline_macro_f1", "exact_match", "rows")},
                            "attributes": summary(val_metrics)}})

    out = train_dir.eval
    out.dir.mkdir(parents=True, exist_ok=True)
    calibration_plots = _calibration_on_test(metrics, predictor, predictions, test_logits, data.y_true, out, config)
    metrics_path = write_json(out.metrics, metrics)
    for attribute, m in metrics["attributes"].items():
        per_class = pd.DataFrame.from_dict(m["per_class"], orient="index").rename_axis("class").reset_index()
        per_class.to_csv(out.per_class(attribute), index=False)
        pd.DataFrame(m["confusion_matrix"], index=m["classes"], columns=m["classes"]).rename_axis(
            "true \\ predicted"
        ).to_csv(out.confusion(attribute))
    confidence = {a: predictions[f"{a}_confidence"].to_numpy(dtype=np.float32) if f"{a}_confidence" in predictions
                  else np.full(len(predictions), np.nan, dtype=np.float32) for a in label_space.attributes}
    _write_predictions(data.frame, data.y_true, y_pred, confidence, label_space, out.predictions)
    plots = plot_metrics(metrics, out) + calibration_plots
    log.info("evaluated %s: headline macro-F1 %.4f on %d test rows (val %.4f on %d rows, which chose the "
             "checkpoint)", checkpoint, metrics["headline_macro_f1"], metrics["rows"],
             val_metrics["headline_macro_f1"], val_metrics["rows"])
    return EvalResult(
        run_dir=train_dir.dir,
        eval_dir=out.dir,
        metrics_path=metrics_path,
        checkpoint=checkpoint,
        split_dir=split_dir,
        rows=metrics["rows"],
        headline_macro_f1=round(metrics["headline_macro_f1"], 6),
        exact_match=round(metrics["exact_match"], 6),
        val_rows=val_metrics["rows"],
        val_headline_macro_f1=round(val_metrics["headline_macro_f1"], 6),
        attributes=summary(metrics),
        plots=plots,
    )


@contextmanager
def recorded_logits(predictor: Any) -> Iterator[dict[str, list[np.ndarray]]]:
    """Within the block, every forward of PREDICTOR's network appends its logits per attribute (float32, in call
    order) to the yielded dict: scoring a part through the serving path then also gives its raw outputs."""
    recorded: dict[str, list[np.ndarray]] = {}

    def hook(_module: Any, _inputs: Any, outputs: Mapping[str, Any]) -> None:
        for attribute, values in outputs.items():
            recorded.setdefault(attribute, []).append(values.detach().float().cpu().numpy())

    handle = predictor.model.register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def _calibration_on_test(metrics: dict[str, Any], predictor: Any, predictions: pd.DataFrame,
                         logits: Mapping[str, list[np.ndarray]], y_true: Mapping[str, np.ndarray], out: EvalDir,
                         config: Config) -> list[Path]:
    """Add `calibration` (ECE, NLL, Brier before and after the model's temperatures) and `coverage` (what each
    review threshold reaches: precision of the accepted tags, coverage, bootstrap intervals) on the test part to
    METRICS; draw a reliability diagram and a risk-coverage curve per attribute. The plots, returned."""
    from fashion_tagger.evaluation.calibration import calibration_report, reliability_diagram, softmax, top_confidence
    from fashion_tagger.evaluation.thresholds import reached

    # The served path skips rows it cannot decode: the recorded logits are those of the other rows, in order.
    ok = predictions["error"].isna().to_numpy() if "error" in predictions.columns else np.ones(len(predictions), bool)
    test_logits = {a: np.concatenate(v) for a, v in logits.items() if v}
    targets = {a: np.asarray(y_true[a])[ok] for a in test_logits}
    if any(len(v) != int(ok.sum()) for v in test_logits.values()):
        log.warning("calibration on test skipped: %d logits recorded for %d scored rows",
                    len(next(iter(test_logits.values()))), int(ok.sum()))
        return []
    temperatures = {a: predictor.temperatures.get(a, 1.0) for a in test_logits}
    metrics["calibration"] = {"part": HEADLINE_PART, "calibrated": bool(predictor.temperatures),
                              "attributes": calibration_report(test_logits, targets, temperatures)}
    thresholds, coverage, plots = predictor.thresholds, {}, []
    for attribute, values in test_logits.items():
        confidence, correct = top_confidence(softmax(values, temperatures[attribute]), targets[attribute])
        target = config.tagging.target_for(attribute)
        threshold = thresholds.get(attribute)
        coverage[attribute] = {"target_precision": target, "calibrated_threshold": attribute in thresholds,
                               **reached(confidence, correct, threshold, resamples=1000, seed=config.train.seed)}
        plots.append(reliability_diagram(out.reliability_plot(attribute), attribute, values, targets[attribute],
                                         temperatures[attribute]))
        plots.append(_risk_coverage_plot(out.risk_coverage_plot(attribute), attribute, confidence, correct,
                                         coverage[attribute]))
    metrics["coverage"] = coverage
    return plots


def _risk_coverage_plot(path: Path, attribute: str, confidence: np.ndarray, correct: np.ndarray,
                        at: Mapping[str, Any]) -> Path:
    from fashion_tagger.evaluation.thresholds import risk_coverage

    curve = risk_coverage(confidence, correct)
    with saved_figure(path, figsize=(4.6, 4.2)) as (_, ax):
        ax.plot(curve["coverage"], curve["risk"], color="tab:blue", linewidth=1.2, label="every threshold")
        ax.axhline(1 - at["target_precision"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"target: {at['target_precision']:.0%} precision")
        if at["threshold"] is not None and at["precision"] is not None:
            ax.plot([at["coverage"]], [1 - at["precision"]], "ko",
                    label=f"threshold {at['threshold']:.2f}: {at['coverage']:.0%} accepted")
        ax.set(xlim=(0, 1), ylim=(0, max(0.05, float(np.nanmax(curve["risk"])) if len(curve["risk"]) else 0.05)),
               xlabel="coverage (share of tags accepted)", ylabel="risk (share of accepted tags that are wrong)",
               title=f"{attribute}: risk against coverage on test")
        ax.legend(loc="upper left", fontsize=8)
    return path


def _write_predictions(
    frame: pd.DataFrame,
    y_true: Mapping[str, np.ndarray],
    y_pred: Mapping[str, np.ndarray],
    confidence: Mapping[str, np.ndarray],
    label_space: LabelSpace,
    path: Path,
) -> None:
    out = pd.DataFrame({c: frame[c].to_numpy() for c in ("id", "image_sha256") if c in frame.columns})
    for attribute in y_pred:
        out[attribute] = label_space.decode(attribute, y_true[attribute])
        out[f"{attribute}_pred"] = label_space.decode(attribute, y_pred[attribute])
        out[f"{attribute}_confidence"] = confidence[attribute]
    write_parquet(out, path)


def plot_metrics(metrics: Mapping[str, Any], out: EvalDir) -> list[Path]:
    """Per-class F1 bars and a row-normalised confusion heatmap per attribute, as PNGs."""
    paths = []
    for attribute, m in metrics["attributes"].items():
        names = m["classes"]
        f1 = [m["per_class"][n]["f1"] for n in names]
        support = [m["per_class"][n]["support"] for n in names]
        paths.append(out.per_class_plot(attribute))
        with saved_figure(paths[-1], figsize=(7, 0.8 + 0.3 * len(names))) as (_, ax):
            ax.barh(range(len(names)), f1, color="tab:blue")
            ax.set_yticks(range(len(names)), [f"{n} ({s})" for n, s in zip(names, support, strict=True)],
                          fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.axvline(m["macro_f1"], color="tab:red", linestyle="--", label=f"macro-F1 {m['macro_f1']:.3f}")
            ax.set(xlabel="F1 (support in brackets)", title=f"{attribute}: per-class F1")
            ax.legend(loc="lower right", fontsize=8)

        confusion = np.asarray(m["confusion_matrix"], dtype=float)
        normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        side = 2.5 + 0.35 * len(names)
        paths.append(out.confusion_plot(attribute))
        with saved_figure(paths[-1], figsize=(side + 1, side)) as (fig, ax):
            image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            if len(names) <= 12:
                for (i, j), count in np.ndenumerate(confusion.astype(int)):
                    if count:
                        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                                color="white" if normalised[i, j] > 0.5 else "black")
            ax.set(xlabel="predicted", ylabel="true", title=f"{attribute}: confusion (row-normalised, counts)")
            fig.colorbar(image, ax=ax, fraction=0.046)
    return paths
