"""Encode labels and split the clean table 80/20 by iterative multi-label stratification over all attributes.

Byte-identical images (one duplicate group) always land on the same side, so validation never sees a
training image again: the stratifier works on one representative per group and the groups are expanded after.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from fashion_tagger.errors import DataError
from fashion_tagger.io import StageResult, read_json, write_json, write_parquet
from fashion_tagger.labels import LabelSpace, label_column
from fashion_tagger.layout import SplitDir, ValidateDir
from fashion_tagger.schema import ATTRIBUTES
from fashion_tagger.validate import table_sha256

log = logging.getLogger(__name__)



@dataclass
class SplitResult(StageResult):
    out_dir: Path
    labels_path: Path
    train_path: Path
    val_path: Path
    report_path: Path
    train_rows: int
    val_rows: int
    max_share_deviation: float
    num_classes: dict[str, int] = field(default_factory=dict)
    source_hash: str = ""


def load_clean(clean_dir: str | Path) -> tuple[pd.DataFrame, str]:
    """The clean table sorted by id, and its content hash (from report.json, else computed)."""
    clean_dir = Path(clean_dir).expanduser().resolve()
    clean_path = ValidateDir(clean_dir).clean
    if not clean_path.is_file():
        raise DataError(f"{clean_path} does not exist: run the validate stage first")
    clean = pd.read_parquet(clean_path).sort_values("id", kind="stable").reset_index(drop=True)
    report_path = ValidateDir(clean_dir).report
    source_hash = read_json(report_path).get("clean_sha256", "") if report_path.is_file() else ""
    return clean, source_hash or table_sha256(clean)


def _indicator(frame: pd.DataFrame, classes: dict[str, Sequence[str]]) -> np.ndarray:
    """Rows x (one column of ones + one per (attribute, class)); a 'None' label sets no column of its attribute.

    The ones column keeps the row share itself on target and gives iterstrat the two columns it requires.
    """
    blocks = [np.ones((len(frame), 1), dtype=np.int64)] + [
        np.stack([(frame[attr] == name).fillna(False).to_numpy(dtype=bool) for name in names], axis=1)
        for attr, names in classes.items()
    ]
    return np.concatenate(blocks, axis=1).astype(np.int64)


def _iterative_pick(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about `fraction` of the rows, chosen by iterative stratification (iterstrat)."""
    n = len(labels)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, picked = next(splitter.split(np.zeros(n), labels))
    mask = np.zeros(n, dtype=bool)
    mask[picked] = True
    return mask


def _refine(counts: np.ndarray, picked: np.ndarray, fraction: float, seed: int, *, tolerance: float = 0.002,
            max_swaps: int = 2000, candidates: int = 128) -> np.ndarray:
    """Swap picked/unpicked units until every column's picked share is within `tolerance` of `fraction`.

    Iterative stratification assigns a row when its rarest label is processed, so frequent labels can drift
    by 1-2 points depending on the seed; a few hundred greedy swaps repair that. Swaps keep the number of
    picked units; `counts` holds rows per (unit, column), so duplicate groups weigh as many rows as they hold.
    """
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=0)
    used = totals > 0
    counts, totals = counts[:, used], totals[used]
    picked = picked.copy()
    error = (counts[picked].sum(axis=0) - fraction * totals) / totals
    rng = np.random.default_rng(seed)
    for _ in range(max_swaps):
        worst = int(np.argmax(np.abs(error)))
        if abs(error[worst]) <= tolerance:
            break
        has = counts[:, worst] > 0
        # Too few of the worst column picked: pick a unit that has it, unpick one that has not (or the reverse).
        want_in, want_out = (has, ~has) if error[worst] < 0 else (~has, has)
        ins = np.flatnonzero(~picked & want_in)
        outs = np.flatnonzero(picked & want_out)
        if not len(ins) or not len(outs):
            break
        ins = rng.choice(ins, min(candidates, len(ins)), replace=False)
        outs = rng.choice(outs, min(candidates, len(outs)), replace=False)
        moved = (counts[ins][:, None, :] - counts[outs][None, :, :]) / totals
        loss = ((error + moved) ** 2).sum(axis=2)
        i, o = np.unravel_index(int(np.argmin(loss)), loss.shape)
        if loss[i, o] >= (error**2).sum():
            break
        picked[ins[i]], picked[outs[o]] = True, False
        error = error + moved[i, o]
    return picked


def _stratified_pick(counts: np.ndarray, fraction: float, seed: int, size: int | None = None) -> np.ndarray:
    """Stratified boolean mask over units: iterative stratification, exact `size` if given, then refinement."""
    picked = _iterative_pick(counts > 0, fraction, seed)
    if size is not None:
        rng = np.random.default_rng(seed)
        gap = int(picked.sum()) - size
        if gap > 0:
            picked[rng.choice(np.flatnonzero(picked), gap, replace=False)] = False
        elif gap < 0:
            picked[rng.choice(np.flatnonzero(~picked), -gap, replace=False)] = True
    return _refine(counts, picked, fraction, seed)


def _group_keys(clean: pd.DataFrame) -> np.ndarray:
    """One key per split unit: the image bytes' hash, else the row itself (always so in metadata-only tables)."""
    hashes = clean["image_sha256"] if "image_sha256" in clean.columns else pd.Series(pd.NA, index=clean.index)
    return np.array([f"h{h}" if isinstance(h, str) else f"r{i}" for i, h in enumerate(hashes)], dtype=object)


def _class_shares(
    frame: pd.DataFrame, is_val: np.ndarray, labels: LabelSpace, val_fraction: float
) -> tuple[dict[str, Any], float]:
    shares: dict[str, Any] = {}
    deviation = 0.0
    for attr, names in labels.classes.items():
        encoded = frame[label_column(attr)].to_numpy()
        train_counts = np.bincount(encoded[~is_val & (encoded >= 0)], minlength=len(names))
        val_counts = np.bincount(encoded[is_val & (encoded >= 0)], minlength=len(names))
        per_class = {}
        for i, name in enumerate(names):
            total = int(train_counts[i] + val_counts[i])
            share = float(train_counts[i] / total) if total else 0.0
            deviation = max(deviation, abs(share - (1 - val_fraction))) if total else deviation
            per_class[name] = {"train_count": int(train_counts[i]), "val_count": int(val_counts[i]),
                               "train_share": round(share, 6)}
        shares[attr] = {
            "classes": per_class,
            "none_train": int(((encoded < 0) & ~is_val).sum()),
            "none_val": int(((encoded < 0) & is_val).sum()),
        }
    return shares, deviation


def split_dataset(
    clean_dir: str | Path,
    out_dir: str | Path,
    *,
    attributes: Sequence[str] = ATTRIBUTES,
    min_class_count: int = 500,
    val_fraction: float = 0.2,
    seed: int = 42,
    max_rows: int | None = None,
) -> SplitResult:
    """Write labels.json, train.parquet, val.parquet and split_report.json for the clean table in CLEAN_DIR."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    attributes = list(attributes)
    clean, source_hash = load_clean(clean_dir)
    rows_available = len(clean)

    if max_rows is not None and max_rows < len(clean):
        # Subset on the full table's trainable classes so the sample keeps the class mix of the whole.
        full_space = LabelSpace.from_frame(clean, attributes, min_class_count, source_hash)
        keep = _stratified_pick(_indicator(clean, full_space.classes), max_rows / len(clean), seed, size=max_rows)
        clean = clean.loc[keep].reset_index(drop=True)

    labels = LabelSpace.from_frame(clean, attributes, min_class_count, source_hash)
    encoded = pd.concat([clean, labels.encode(clean)], axis=1)

    _, unit_of_row = np.unique(_group_keys(clean), return_inverse=True)
    n_units = int(unit_of_row.max()) + 1 if len(unit_of_row) else 0
    if n_units * val_fraction < 1 or n_units * (1 - val_fraction) < 1:
        raise DataError(f"{n_units} split units (rows or duplicate groups) cannot be split with "
                        f"val_fraction={val_fraction}; use more data")
    # Rows per (unit, class): the stratifier sees each duplicate group as one unit weighing its rows.
    unit_counts = np.zeros((n_units, 1 + sum(labels.num_classes.values())), dtype=np.int64)
    np.add.at(unit_counts, unit_of_row, _indicator(clean, labels.classes))
    val_unit = _stratified_pick(unit_counts, val_fraction, seed)
    is_val = val_unit[unit_of_row]

    shares, deviation = _class_shares(encoded, is_val, labels, val_fraction)
    train, val = encoded.loc[~is_val].reset_index(drop=True), encoded.loc[is_val].reset_index(drop=True)
    groups = clean["duplicate_group"].dropna() if "duplicate_group" in clean.columns else pd.Series(dtype="Int64")
    leaked = set(train["image_sha256"].dropna()) & set(val["image_sha256"].dropna())
    if leaked:
        raise AssertionError(f"{len(leaked)} images on both sides of the split, e.g. {sorted(leaked)[0]}")

    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = SplitDir(out_dir)
    labels_path = labels.save(out.labels)
    train_path, val_path = out.train, out.val
    write_parquet(train, train_path)
    write_parquet(val, val_path)
    report = {
        "clean_dir": str(Path(clean_dir).expanduser().resolve()),
        "source_hash": source_hash,
        "seed": seed,
        "val_fraction": val_fraction,
        "min_class_count": min_class_count,
        "max_rows": max_rows,
        "rows_available": rows_available,
        "rows": len(encoded),
        "train_rows": len(train),
        "val_rows": len(val),
        "units": n_units,
        "train_units": int((~val_unit).sum()),
        "val_units": int(val_unit.sum()),
        "duplicate_groups": int(groups.nunique()),
        "duplicate_group_rows": int(len(groups)),
        "num_classes": labels.num_classes,
        "max_share_deviation": round(deviation, 6),
        "shares": shares,
    }
    report_path = write_json(out.report, report)
    log.info("split %d rows: %d train, %d val, max share deviation %.4f", len(encoded), len(train), len(val),
             deviation)
    return SplitResult(
        out_dir=out_dir,
        labels_path=labels_path,
        train_path=train_path,
        val_path=val_path,
        report_path=report_path,
        train_rows=len(train),
        val_rows=len(val),
        max_share_deviation=round(deviation, 6),
        num_classes=labels.num_classes,
        source_hash=source_hash,
    )

