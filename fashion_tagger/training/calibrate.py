"""The train stage's last step: calibrate the trained network on the validation part (never test).

The best checkpoint's network scores the validation part once, from the prepared images the validation loader
reads. Per attribute, one temperature is fitted to its logits (`evaluation/calibration.fit_temperature`), and
the review threshold is chosen on the calibrated confidences for the attribute's precision target
(`tagging.target_precision`, `evaluation/thresholds.threshold_for`). Both go into `train/calibration.json`, with
ECE, NLL and Brier before and after on validation; the checkpoint's predictor and every export read the file,
so predict, serving, tagging and evaluation all give calibrated confidences.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion_tagger.core.config import Config
from fashion_tagger.core.io import write_json
from fashion_tagger.core.layout import TrainDir
from fashion_tagger.data.imaging import normalize, pixel_stats
from fashion_tagger.evaluation.calibration import calibration_report, fit_temperatures, softmax, top_confidence
from fashion_tagger.evaluation.thresholds import threshold_for

log = logging.getLogger(__name__)


def validation_logits(checkpoint: Path, split_dir: Path, config: Config,
                      device: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(logits, targets) per attribute of the validation part, from CHECKPOINT's network (uncalibrated)."""
    from fashion_tagger.serving.predictor import Predictor
    from fashion_tagger.training.datamodule import TaggerDataModule

    predictor = Predictor.from_checkpoint(checkpoint, device)
    data = TaggerDataModule(split_dir, batch_size=config.train.batch_size, num_workers=config.train.num_workers,
                            pin_memory=predictor.device.type == "cuda")
    data.setup("validate")
    # The loader gives uint8 batches: normalised on the 0-255 scale, exactly as the training module does.
    mean, std = (t.to(predictor.device) for t in pixel_stats(predictor.mean, predictor.std))
    attributes = data.label_space.attributes
    logits: dict[str, list[np.ndarray]] = {a: [] for a in attributes}
    targets: list[np.ndarray] = []
    with torch.inference_mode():
        for images, labels in data.val_dataloader():
            outputs = predictor.model(normalize(images.to(predictor.device), mean, std))
            for attribute in attributes:
                logits[attribute].append(outputs[attribute].float().cpu().numpy())
            targets.append(labels.numpy())
    labels_all = np.concatenate(targets) if targets else np.zeros((0, len(attributes)), dtype=np.int64)
    return ({a: np.concatenate(v) if v else np.zeros((0, 0)) for a, v in logits.items()},
            {a: labels_all[:, i] for i, a in enumerate(attributes)})


def calibrate(train_dir: TrainDir, split_dir: Path, config: Config, device: str | None = None) -> dict[str, Any]:
    """Fit the temperatures and thresholds of TRAIN_DIR's best checkpoint on SPLIT_DIR's validation part and write
    train/calibration.json; its content, returned."""
    started = time.perf_counter()
    logits, targets = validation_logits(train_dir.checkpoint(), split_dir, config, device)
    temperatures = fit_temperatures(logits, targets)
    thresholds = {}
    for attribute, values in logits.items():
        confidence, correct = top_confidence(softmax(values, temperatures[attribute]), targets[attribute])
        thresholds[attribute] = threshold_for(confidence, correct, config.tagging.target_for(attribute)).to_dict()
    report = calibration_report(logits, targets, temperatures)
    content = {
        "part": "val",
        "rows": int(len(next(iter(targets.values()), []))),
        "target_precision": config.tagging.target_precision,
        "temperatures": temperatures,
        "thresholds": thresholds,
        "validation": report,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(train_dir.calibration, content)
    for attribute in logits:
        figures, chosen = report[attribute], thresholds[attribute]
        threshold = f"{chosen['threshold']:.3f}" if chosen["threshold"] is not None else "none"
        log.info("calibrated %s on %d validation rows: T %.3f, ECE %s -> %s; threshold %s for precision %.2f "
                 "(coverage %.0f%% on validation)%s", attribute, figures["rows"], figures["temperature"],
                 _fmt(figures["ece_before"]), _fmt(figures["ece_after"]), threshold, chosen["target"],
                 100 * chosen["coverage"], f"; {chosen['note']}" if chosen["note"] else "")
    return content


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
