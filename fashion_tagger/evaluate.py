"""Evaluate a trained run on its validation split: per-attribute and per-class metrics, confusion matrices, plots.

The numbers come from `metrics.compute_metrics` (the code the promotion gate scores with too); the files go
where `layout.EvalDir` says.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fashion_tagger.config import Config
from fashion_tagger.io import StageResult, write_json, write_parquet
from fashion_tagger.labels import LabelSpace, label_column
from fashion_tagger.layout import EvalDir, TrainDir
from fashion_tagger.metrics import compute_metrics, summary

log = logging.getLogger(__name__)


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


def predict_split(
    predictor: Any, split_dir: Path, part: str, *, batch_size: int = 64, num_workers: int = 0
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
    frame = read_split(split_dir, part, [])
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
    config: Config,
    *,
    checkpoint: str | Path | None = None,
    split_dir: str | Path | None = None,
) -> EvalResult:
    """Score a training run's checkpoint (default: its best) on the validation part of a split (default: the
    split it trained on); batch size, loader workers and CPU threads come from `config.train`."""
    from fashion_tagger.data import resolve_workers
    from fashion_tagger.parallel import cpu_threads
    from fashion_tagger.predict import Predictor

    train_dir = TrainDir(Path(run_dir).expanduser().resolve())
    checkpoint = Path(checkpoint).expanduser().resolve() if checkpoint else train_dir.checkpoint()
    split_dir = Path(split_dir).expanduser().resolve() if split_dir else train_dir.recorded_split()
    predictor = Predictor.from_checkpoint(checkpoint)
    threads = config.train.cpu_threads if predictor.device.type == "cpu" else 0
    part = "val"
    with cpu_threads(threads):
        frame, y_true, y_pred, confidence = predict_split(
            predictor,
            split_dir,
            part,
            batch_size=config.train.batch_size,
            num_workers=resolve_workers(config.train.num_workers),
        )
    label_space = predictor.label_space
    metrics = compute_metrics(y_true, y_pred, label_space)
    metrics.update({"checkpoint": str(checkpoint), "split_dir": str(split_dir), "split": part})

    out = train_dir.eval
    out.dir.mkdir(parents=True, exist_ok=True)
    metrics_path = write_json(out.metrics, metrics)
    for attribute, m in metrics["attributes"].items():
        per_class = pd.DataFrame.from_dict(m["per_class"], orient="index").rename_axis("class").reset_index()
        per_class.to_csv(out.per_class(attribute), index=False)
        pd.DataFrame(m["confusion_matrix"], index=m["classes"], columns=m["classes"]).rename_axis(
            "true \\ predicted"
        ).to_csv(out.confusion(attribute))
    _write_predictions(frame, y_true, y_pred, confidence, label_space, out.predictions)
    plots = plot_metrics(metrics, out)
    log.info("evaluated %s on %d rows: headline macro-F1 %.4f", checkpoint, metrics["rows"],
             metrics["headline_macro_f1"])
    return EvalResult(
        run_dir=train_dir.dir,
        eval_dir=out.dir,
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


def plot_metrics(metrics: Mapping[str, Any], out: EvalDir) -> list[Path]:
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
        paths.append(out.per_class_plot(attribute))
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
        paths.append(out.confusion_plot(attribute))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
