"""Evaluate a trained run on its validation split: per-attribute and per-class metrics, confusion matrices, plots.

Every number is computed over the rows whose label is not 'None'. `compute_metrics` is the pure part
(arrays in, dict out) that the MLflow promotion gate reuses to score champion and challenger on one split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support

from fashion_tagger.errors import FashionTaggerError
from fashion_tagger.io import StageResult, write_json, write_parquet
from fashion_tagger.labels import LabelSpace, label_column
from fashion_tagger.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

EVAL_DIRNAME = "eval"


@dataclass
class EvalResult(StageResult):
    run_dir: Path
    eval_dir: Path
    metrics_path: Path
    checkpoint: Path
    split_dir: Path
    rows: int
    headline_macro_f1: float
    exact_match: float
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


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


def default_checkpoint(run_dir: Path) -> Path:
    from fashion_tagger.train import BEST_NAME, CHECKPOINT_DIR, LAST_NAME

    for name in (BEST_NAME, LAST_NAME):
        path = run_dir / CHECKPOINT_DIR / f"{name}.ckpt"
        if path.is_file():
            return path
    raise FashionTaggerError(f"{run_dir / CHECKPOINT_DIR} holds no best.ckpt or last.ckpt: train the run first")


def predict_split(
    predictor: Any, split_dir: Path, filename: str, *, batch_size: int = 64, num_workers: int = 0
) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predicted class indices and confidences for a split table's cached images.

    Labels are encoded with the predictor's own label space (from the raw attribute columns), so a model
    can be scored on a split whose vocabulary differs from the one it was trained with.
    """
    import torch
    from torch.utils.data import DataLoader

    from fashion_tagger.cache import read_prepared
    from fashion_tagger.data import TaggerDataset, read_split
    from fashion_tagger.progress import log_progress

    attributes = predictor.label_space.attributes
    prepared = read_prepared(split_dir)
    frame = read_split(split_dir, filename, [])
    encoded = predictor.label_space.encode(frame)
    frame = pd.concat([frame.drop(columns=[c for c in encoded.columns if c in frame.columns]), encoded], axis=1)
    dataset = TaggerDataset(
        frame, attributes, prepared["cache_root"], int(prepared["width"]), int(prepared["height"]),
        predictor.transform,
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    preds: dict[str, list[np.ndarray]] = {a: [] for a in attributes}
    confidences: dict[str, list[np.ndarray]] = {a: [] for a in attributes}
    with torch.inference_mode():
        for images, _ in log_progress(loader, total=len(loader), what="evaluate", unit="batches"):
            for attribute, probs in predictor.predict_probabilities(images).items():
                confidence, index = probs.max(1)
                preds[attribute].append(index.cpu().numpy())
                confidences[attribute].append(confidence.float().cpu().numpy())
    y_true = {a: frame[label_column(a)].to_numpy(dtype=np.int64) for a in attributes}
    y_pred = {a: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for a, v in preds.items()}
    conf = {a: np.concatenate(v) if v else np.zeros(0, dtype=np.float32) for a, v in confidences.items()}
    return frame, y_true, y_pred, conf


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    split_dir: str | Path | None = None,
) -> EvalResult:
    """Score a run's checkpoint (default best) on the validation split (default the one it trained on)."""
    from fashion_tagger.data import VAL_FILENAME, resolve_workers
    from fashion_tagger.predict import Predictor
    from fashion_tagger.train import cpu_threads, recorded_split_dir

    run_dir = Path(run_dir).expanduser().resolve()
    checkpoint = Path(checkpoint).expanduser().resolve() if checkpoint else default_checkpoint(run_dir)
    split_dir = Path(split_dir).expanduser().resolve() if split_dir else recorded_split_dir(run_dir)
    predictor = Predictor.from_checkpoint(checkpoint)
    train = predictor.config.get("train", {})
    threads = int(train.get("cpu_threads", 0)) if predictor.device.type == "cpu" else 0
    with cpu_threads(threads):
        frame, y_true, y_pred, confidence = predict_split(
            predictor,
            split_dir,
            VAL_FILENAME,
            batch_size=int(train.get("batch_size", 64)),
            num_workers=resolve_workers(int(train.get("num_workers", 0))),
        )
    label_space = predictor.label_space
    metrics = compute_metrics(y_true, y_pred, label_space)
    metrics.update({"checkpoint": str(checkpoint), "split_dir": str(split_dir), "split": VAL_FILENAME})

    eval_dir = run_dir / EVAL_DIRNAME
    eval_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = write_json(eval_dir / "metrics.json", metrics)
    for attribute, m in metrics["attributes"].items():
        per_class = pd.DataFrame.from_dict(m["per_class"], orient="index").rename_axis("class").reset_index()
        per_class.to_csv(eval_dir / f"per_class_{attribute}.csv", index=False)
        pd.DataFrame(m["confusion_matrix"], index=m["classes"], columns=m["classes"]).rename_axis(
            "true \\ predicted"
        ).to_csv(eval_dir / f"confusion_{attribute}.csv")
    _write_predictions(frame, y_true, y_pred, confidence, label_space, eval_dir / "predictions.parquet")
    plots = plot_metrics(metrics, eval_dir)
    log.info("evaluated %s on %d rows: headline macro-F1 %.4f", checkpoint, metrics["rows"],
             metrics["headline_macro_f1"])
    return EvalResult(
        run_dir=run_dir,
        eval_dir=eval_dir,
        metrics_path=metrics_path,
        checkpoint=checkpoint,
        split_dir=split_dir,
        rows=metrics["rows"],
        headline_macro_f1=round(metrics["headline_macro_f1"], 6),
        exact_match=round(metrics["exact_match"], 6),
        attributes=summary(metrics),
        plots=plots,
    )


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


def plot_metrics(metrics: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Per-class F1 bars and a row-normalised confusion heatmap per attribute, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for attribute, m in metrics["attributes"].items():
        names = m["classes"]
        f1 = [m["per_class"][n]["f1"] for n in names]
        support = [m["per_class"][n]["support"] for n in names]
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(names)))
        ax.barh(range(len(names)), f1, color="tab:blue")
        ax.set_yticks(range(len(names)), [f"{n} ({s})" for n, s in zip(names, support, strict=True)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.axvline(m["macro_f1"], color="tab:red", linestyle="--", label=f"macro-F1 {m['macro_f1']:.3f}")
        ax.set_xlabel("F1 (support in brackets)")
        ax.set_title(f"{attribute}: per-class F1")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / f"per_class_f1_{attribute}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

        confusion = np.asarray(m["confusion_matrix"], dtype=float)
        normalised = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        side = 2.5 + 0.35 * len(names)
        fig, ax = plt.subplots(figsize=(side + 1, side))
        image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        if len(names) <= 12:
            for (i, j), count in np.ndenumerate(confusion.astype(int)):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{attribute}: confusion (row-normalised, counts)")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        paths.append(out_dir / f"confusion_{attribute}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
