"""What a registration leaves for people: the model card, a grid of sample predictions, the data reports it cites.

Markdown and PNG only; the registry decides where they go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fashion_tagger.core.config import Config
from fashion_tagger.core.io import read_json
from fashion_tagger.core.layout import SplitDir, ValidateDir
from fashion_tagger.core.plots import image_grid
from fashion_tagger.data.imaging import read_fitted

if TYPE_CHECKING:
    from fashion_tagger.data.labels import LabelSpace
    from fashion_tagger.evaluation.gate import GateData


def split_report(split_dir: Path) -> dict[str, Any]:
    path = SplitDir(split_dir).report
    return read_json(path) if path.is_file() else {}


def validation_report(split_dir: Path) -> dict[str, Any]:
    """report.json of the validation the split was made from (split_report.json names its folder)."""
    clean_dir = split_report(split_dir).get("clean_dir")
    report = ValidateDir(Path(clean_dir)).report if clean_dir else None
    return read_json(report) if report and report.is_file() else {}


def sample_grid(paths: Sequence[str], predictions: pd.DataFrame, gate: GateData, out_path: Path,
                count: int = 12) -> Path:
    """COUNT test images spread over the split, with predicted tags (red where the tag is wrong)."""
    count = min(count, len(paths))
    picks: list[int] = np.unique(np.linspace(0, len(paths) - 1, count).round().astype(int)).tolist() if count else []
    with image_grid(out_path, count, dpi=90) as (fig, cells):
        for ax, i in zip(cells, picks, strict=False):
            ax.imshow(read_fitted(paths[i], 240, 320))  # the one decode; full-size JPEGs at a reduced DCT scale
            for j, attribute in enumerate(gate.labels.attributes):
                predicted = str(predictions.at[i, attribute]) if attribute in predictions.columns else "?"
                truth_index = int(gate.y_true[attribute][i])
                truth = gate.labels.classes[attribute][truth_index] if truth_index >= 0 else None
                colour = "black" if truth is None else ("green" if truth == predicted else "red")
                confidence = predictions.get(f"{attribute}_confidence")
                suffix = f" {float(confidence.iloc[i]):.2f}" if confidence is not None else ""
                ax.text(0.0, -0.04 - 0.075 * j, f"{attribute}: {predicted}{suffix}", transform=ax.transAxes,
                        fontsize=7, color=colour, va="top")
        fig.suptitle("test samples: predicted tags (green right, red wrong, black unlabelled)", fontsize=9)
    return out_path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metrics_lines(metrics: Mapping[str, Any]) -> list[str]:
    lines = [f"Headline (mean macro-F1 over attributes): **{_fmt(metrics.get('headline_macro_f1'))}**; "
             f"exact match over all attributes: {_fmt(metrics.get('exact_match'))}; {_fmt(metrics.get('rows'))} rows.",
             "", "| attribute | accuracy | macro-F1 | weighted-F1 |", "| --- | ---: | ---: | ---: |"]
    for attribute, row in (metrics.get("attributes") or {}).items():
        lines.append(f"| {attribute} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('macro_f1'))} | "
                     f"{_fmt(row.get('weighted_f1'))} |")
    return lines


def _calibration_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The card's calibration and review-threshold section, from evaluation's `calibration` and `coverage`."""
    calibration, coverage = metrics.get("calibration") or {}, metrics.get("coverage") or {}
    if not calibration.get("attributes"):
        return []
    lines = ["## Confidence and review", ""]
    if calibration.get("calibrated"):
        lines.append("Confidences are calibrated: each attribute's logits are divided by a temperature fitted on the "
                     "validation part. Figures on the test part, which chose neither the temperatures nor the "
                     "thresholds; ECE with 15 equal-width bins. A tag whose confidence reaches its threshold is "
                     "accepted (no review); the threshold is the lowest whose validation precision meets the "
                     "target.")
    else:
        lines.append("This model has no calibration: its confidences are the raw softmax (T = 1).")
    lines += ["", "| attribute | T | ECE before -> after | NLL before -> after | threshold | precision of accepted "
              "(95% interval) | coverage (95% interval) |", "| --- | ---: | --- | --- | ---: | --- | --- |"]
    for attribute, row in calibration["attributes"].items():
        at = coverage.get(attribute, {})
        precision = _fmt(at.get("precision"), 3)
        if interval := at.get("precision_interval"):
            precision += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
        covered = f"{at['coverage']:.1%}" if at.get("coverage") is not None else "–"
        if interval := at.get("coverage_interval"):
            covered += f" [{interval[0]:.1%}, {interval[1]:.1%}]"
        threshold = _fmt(at.get("threshold"), 3) if at.get("threshold") is not None else "none: all reviewed"
        lines.append(f"| {attribute} | {_fmt(row.get('temperature'), 2)} | {_fmt(row.get('ece_before'))} -> "
                     f"{_fmt(row.get('ece_after'))} | {_fmt(row.get('nll_before'))} -> {_fmt(row.get('nll_after'))} "
                     f"| {threshold} | {precision} | {covered} |")
    target = next((at.get("target_precision") for at in coverage.values()), None)
    if target is not None:
        lines += ["", f"Target precision: {target:.0%} (`tagging.target_precision`)."]
    return [*lines, ""]


def model_card(
    *,
    config: Config,
    labels: LabelSpace,
    metrics: Mapping[str, Any] | None = None,
    validation_report: Mapping[str, Any] | None = None,
    split_report: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    version: str | None = None,
) -> str:
    """Markdown model card: data source and hash, row counts, classes per attribute, metrics, config, limits."""
    validation_report = validation_report or {}
    split_report = split_report or {}
    metrics = metrics or {}
    title = f"{model_name or config.registry.model_name}" + (f" version {version}" if version else "")
    lines = [f"# Model card: {title}", "", "Tags a product photo with one value per attribute and a confidence.", ""]

    lines += ["## Data", ""]
    lines.append(f"- source: `{config.data.source}`")
    lines.append(f"- clean table hash (sha256): `{labels.source_hash or 'unknown'}`")
    if validation_report:
        lines.append(
            f"- validation: {_fmt(validation_report.get('lines_read'))} lines read, "
            f"{_fmt(validation_report.get('rows_clean'))} clean rows, "
            f"{_fmt(validation_report.get('rows_rejected'))} rejected"
        )
    if split_report:
        test_rows = split_report.get("test_rows")
        lines.append(
            f"- split: {_fmt(split_report.get('train_rows'))} train rows, {_fmt(split_report.get('val_rows'))} "
            f"validation rows (val_fraction {split_report.get('val_fraction')}), {_fmt(test_rows)} test rows "
            f"(test_fraction {split_report.get('test_fraction')}), seed {split_report.get('seed')}; duplicate "
            "images kept in one part"
        )
        if split_report.get("test_share_deviation") is not None:
            lines.append(f"- test membership is stable across retrains (an image once in test stays there); worst "
                         f"per-class test share deviation {_fmt(split_report['test_share_deviation'])}")
    lines.append(f"- classes rarer than {labels.min_class_count} rows are labelled 'None' and never trained on")
    lines.append("")

    lines += ["## Classes per attribute", "", "| attribute | classes | trained classes | mapped to 'None' |",
              "| --- | ---: | --- | ---: |"]
    for attribute, names in labels.classes.items():
        shown = ", ".join(names[:12]) + (f", … (+{len(names) - 12})" if len(names) > 12 else "")
        lines.append(f"| {attribute} | {len(names)} | {shown} | {len(labels.mapped_to_none(attribute))} |")
    lines.append("")

    part = metrics.get("split") or "validation"
    heading = "Test metrics (the headline)" if part == "test" else f"Metrics on {part}"
    lines += [f"## {heading}", ""]
    if metrics:
        if part == "test":
            lines.append("On the test part, which training never saw: neither for learning, early stopping nor "
                         "checkpoint selection.")
        lines += _metrics_lines(metrics)
    else:
        lines.append("No evaluation was recorded for this run.")
    lines.append("")
    if val := metrics.get("val"):
        lines += ["## Validation metrics", "",
                  "On the validation part, which chose the checkpoint and stopped training: optimistic, shown for "
                  "comparison only.", *_metrics_lines(val), ""]

    lines += _calibration_lines(metrics)

    if gate:
        lines += ["## Promotion gate", ""]
        lines.append(f"- decision: **{gate.get('decision')}** ({gate.get('reason')})")
        lines.append(f"- challenger headline on the {gate.get('split', 'test')} part ({gate.get('rows')} images): "
                     f"{_fmt(gate.get('challenger_headline'))}")
        if gate.get("champion_version"):
            lines.append(f"- champion version {gate['champion_version']} re-scored on the same images: "
                         f"{_fmt(gate.get('champion_headline'))}")
        if interval := gate.get("headline_gain_interval"):
            boot = gate.get("bootstrap") or {}
            lines.append(f"- 95% interval of the headline gain (challenger - champion), paired bootstrap of "
                         f"{boot.get('resamples')} resamples: [{interval[0]:+.4f}, {interval[1]:+.4f}]; promotion "
                         f"needs its lower end above min_delta {gate.get('min_delta')}")
        for warning in gate.get("warnings") or []:
            lines.append(f"- **warning**: {warning}")
        lines.append("")

    model, train, images = config.model, config.train, config.images
    lines += ["## Training configuration", "", "| setting | value |", "| --- | --- |"]
    for key, value in (
        ("backbone", f"{model.backbone} (pretrained: {model.pretrained})"),
        ("heads", f"hidden {model.hidden_dim or 'none'}, dropout {model.dropout}"),
        ("input", f"{images.width}x{images.height} RGB, padded white to 3:4"),
        ("loss", f"{train.loss}, label smoothing {train.label_smoothing}, 'None' masked"),
        ("optimiser", f"AdamW lr {train.lr} (backbone x{train.backbone_lr_scale}), weight decay {train.weight_decay}"),
        ("schedule", f"{train.schedule}, warmup {train.warmup_epochs} epochs"),
        ("epochs / batch", f"{train.epochs} / {train.batch_size}"),
        ("seed", str(train.seed)),
    ):
        lines.append(f"| {key} | {value} |")
    lines += ["", "Full configuration: `config.yaml` among the run's artifacts and the run's params.", ""]

    lines += ["## Known limits", ""]
    lines.append("- Trained on catalogue photos (one product, plain background); other photos are out of distribution.")
    lines.append("- It always answers with one of the trained classes: 'None' and rare classes are never predicted, "
                 "so check the confidence.")
    lines.append("- baseColour, season and usage come from catalogue metadata and are partly subjective; expect "
                 "lower scores there than on category attributes.")
    if config.data.source.startswith("synthetic"):
        lines.append("- **Trained on generated data**: for demonstrating the workflow only, not for real photos.")
    if not model.pretrained:
        lines.append("- The backbone was trained from scratch (no pretrained weights).")
    lines.append("")
    return "\n".join(lines)
