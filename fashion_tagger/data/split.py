"""Encode labels and split the clean table into train, val and test (70/20/10 by default).

Test is stable across retrains: the home records which image (duplicate group) went to test, and a recorded
image keeps its part; new images are assigned by a stratified pick that keeps every class's test share near
the target. Val is drawn afresh each time by iterative multi-label stratification over the non-test rows.
Byte-identical images (one duplicate group) always land in one part: the stratifiers work on one unit per
group and the groups are expanded after.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from fashion_tagger.coordination.membership import MembershipRecord
from fashion_tagger.core.config import Config
from fashion_tagger.core.errors import DataError
from fashion_tagger.core.io import StageResult, read_json, write_json, write_parquet
from fashion_tagger.core.layout import SplitDir, ValidateDir
from fashion_tagger.data.labels import LabelSpace, label_column
from fashion_tagger.data.validate import table_sha256

log = logging.getLogger(__name__)


@dataclass
class SplitResult(StageResult):
    out_dir: Path
    labels_path: Path
    train_path: Path
    val_path: Path
    test_path: Path
    report_path: Path
    train_rows: int
    val_rows: int
    test_rows: int
    max_share_deviation: float
    test_share_deviation: float
    num_classes: dict[str, int] = field(default_factory=dict)
    source_hash: str = ""
    fingerprint: str = ""  # set by the split stage (fingerprint.write_fingerprint)


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


def _indicator(frame: pd.DataFrame, classes: Mapping[str, Sequence[str]]) -> np.ndarray:
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
            max_swaps: int = 2000, candidates: int = 128, fixed_picked: np.ndarray | None = None,
            fixed_total: np.ndarray | None = None) -> np.ndarray:
    """Swap picked/unpicked units until every column's picked share is within `tolerance` of `fraction`.

    Iterative stratification assigns a row when its rarest label is processed, so frequent labels can drift
    by 1-2 points depending on the seed; a few hundred greedy swaps repair that. Swaps keep the number of
    picked units; `counts` holds rows per (unit, column), so duplicate groups weigh as many rows as they hold.
    FIXED_PICKED and FIXED_TOTAL are rows per column of units whose side is already decided (recorded test
    membership): the shares aimed at are over those and the swappable units together.
    """
    counts = counts.astype(np.float64)
    fixed_picked = np.zeros(counts.shape[1]) if fixed_picked is None else np.asarray(fixed_picked, dtype=np.float64)
    fixed_total = np.zeros(counts.shape[1]) if fixed_total is None else np.asarray(fixed_total, dtype=np.float64)
    totals = counts.sum(axis=0) + fixed_total
    used = counts.sum(axis=0) > 0
    counts, totals, fixed_picked = counts[:, used], totals[used], fixed_picked[used]
    picked = picked.copy()
    error = (fixed_picked + counts[picked].sum(axis=0) - fraction * totals) / totals
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


def _unit_keys(clean: pd.DataFrame) -> np.ndarray:
    """One stable key per row's split unit: its image bytes' hash (a duplicate group shares it), else its id.

    Stable across retrains: the same image (or, without images, the same product id) always has the same key,
    which is what the test membership record is keyed by.
    """
    hashes = clean["image_sha256"] if "image_sha256" in clean.columns else pd.Series(pd.NA, index=clean.index)
    return np.array([f"h{h}" if isinstance(h, str) else f"id{i}" for h, i in zip(hashes, clean["id"], strict=True)],
                    dtype=object)


def _key_uniform(keys: Sequence[str] | np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, from a hash of (seed, key): the same key always draws the same one."""
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") / 2**64
                     for k in keys])


def _pick_new_test_units(counts: np.ndarray, keys: np.ndarray, fraction: float, seed: int,
                         fixed_test: np.ndarray, fixed_total: np.ndarray) -> np.ndarray:
    """Test units among units never assigned before: a stratified pick of about FRACTION of them, repaired so
    that every class's share of test over all units (the FIXED ones included) approaches FRACTION.

    Too few new units to stratify: each goes to test when its key's hash draws below FRACTION.
    """
    n = len(counts)
    if n * fraction < 2 or n * (1 - fraction) < 2:
        return _key_uniform(keys, seed) < fraction
    picked = _iterative_pick(counts > 0, fraction, seed)
    return _refine(counts, picked, fraction, seed, fixed_picked=fixed_test, fixed_total=fixed_total)


def assign_test_units(counts: np.ndarray, keys: np.ndarray, fraction: float, seed: int,
                      membership: MembershipRecord | None, *,
                      source_hash: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    """Which units are test: recorded ones keep their part, new ones are picked (stratified) and recorded.

    MEMBERSHIP is the home's append-only record in the coordination database (unit -> test or not), read and
    extended under its lease so two runs stratify against the same record; None splits from scratch
    (deterministic by SEED) and records nothing.
    """
    if membership is None:
        return _pick_new_test_units(counts, keys, fraction, seed, np.zeros(counts.shape[1]),
                                    np.zeros(counts.shape[1])), {"membership": None, "known_units": 0}
    coordinator: Any = membership.coordinator
    with coordinator.lease(f"membership:{membership.name}", wait_s=None, busy=f"the {membership}"):
        recorded = membership.parts([str(k) for k in keys])
        is_known = np.array([k in recorded for k in keys], dtype=bool)
        test = np.array([bool(recorded.get(k, False)) for k in keys], dtype=bool)
        new = ~is_known
        if new.any():
            test[new] = _pick_new_test_units(counts[new], keys[new], fraction, seed,
                                             counts[is_known & test].sum(axis=0), counts[is_known].sum(axis=0))
            stored = membership.add(dict(zip(keys[new].astype(str), test[new].tolist(), strict=True)),
                                    source_hash=source_hash)
            test[new] = [stored[str(k)] for k in keys[new]]
    info = {"membership": membership.name, "known_units": int(is_known.sum()), "known_test_units":
            int((is_known & test).sum()), "new_units": int(new.sum()), "new_test_units": int((new & test).sum())}
    log.info("test membership: %d units already recorded (%d in test), %d new (%d to test)", info["known_units"],
             info["known_test_units"], info["new_units"], info["new_test_units"])
    return test, info


PARTS = ("train", "val", "test")


def _class_shares(
    frame: pd.DataFrame, part_of_row: np.ndarray, labels: LabelSpace, val_fraction: float, test_fraction: float
) -> tuple[dict[str, Any], float, float]:
    """Per class: rows in each part and test's share; the worst test-share and val-share deviations.

    Test's share is over all rows of a class (target: test_fraction); val's over the class's non-test rows
    (target: val_fraction / (1 - test_fraction)), which is what the val stratifier controls.
    """
    shares: dict[str, Any] = {}
    test_deviation = val_deviation = 0.0
    val_target = val_fraction / (1 - test_fraction)
    for attr, names in labels.classes.items():
        encoded = frame[label_column(attr)].to_numpy()
        labelled = encoded >= 0
        counts = {p: np.bincount(encoded[labelled & (part_of_row == i)], minlength=len(names))
                  for i, p in enumerate(PARTS)}
        per_class = {}
        for i, name in enumerate(names):
            n = {p: int(counts[p][i]) for p in PARTS}
            total, rest = sum(n.values()), n["train"] + n["val"]
            test_share = n["test"] / total if total else 0.0
            if total:
                test_deviation = max(test_deviation, abs(test_share - test_fraction))
            if rest:
                val_deviation = max(val_deviation, abs(n["val"] / rest - val_target))
            per_class[name] = {**{f"{p}_count": n[p] for p in PARTS},
                               "train_share": round(n["train"] / total, 6) if total else 0.0,
                               "test_share": round(test_share, 6)}
        shares[attr] = {"classes": per_class,
                        **{f"none_{p}": int((~labelled & (part_of_row == i)).sum()) for i, p in enumerate(PARTS)}}
    return shares, test_deviation, val_deviation


def split_dataset(
    clean_dir: str | Path, out_dir: str | Path, config: Config, *, test_membership: MembershipRecord | None = None
) -> SplitResult:
    """Write labels.json, train/val/test.parquet and split_report.json for the clean table in CLEAN_DIR.

    The labels come from `labels.*`, the shares and seed from `split.*`, a stratified subset from `data.max_rows`.
    TEST_MEMBERSHIP (the home's record, `coordination.membership.MembershipRecord`) keeps test stable across
    retrains: a unit
    recorded there keeps its side; None splits from scratch.
    """
    attributes, min_class_count = list(config.labels.attributes), config.labels.min_class_count
    val_fraction, test_fraction, seed = config.split.val_fraction, config.split.test_fraction, config.split.seed
    max_rows = config.data.max_rows
    clean, source_hash = load_clean(clean_dir)
    rows_available = len(clean)

    if max_rows is not None and max_rows < len(clean):
        # Subset on the full table's trainable classes so the sample keeps the class mix of the whole.
        full_space = LabelSpace.from_frame(clean, attributes, min_class_count, source_hash)
        keep = _stratified_pick(_indicator(clean, full_space.classes), max_rows / len(clean), seed, size=max_rows)
        clean = clean.loc[keep].reset_index(drop=True)

    labels = LabelSpace.from_frame(clean, attributes, min_class_count, source_hash)
    encoded = pd.concat([clean, labels.encode(clean)], axis=1)

    unit_keys, unit_of_row = np.unique(_unit_keys(clean), return_inverse=True)
    n_units = len(unit_keys)
    rest_fraction = 1 - test_fraction
    if n_units * min(val_fraction, test_fraction) < 1 or n_units * (rest_fraction - val_fraction) < 1:
        raise DataError(f"{n_units} split units (rows or duplicate groups) cannot be split with "
                        f"val_fraction={val_fraction}, test_fraction={test_fraction}; use more data")
    # Rows per (unit, class): the stratifier sees each duplicate group as one unit weighing its rows.
    unit_counts = np.zeros((n_units, 1 + sum(labels.num_classes.values())), dtype=np.int64)
    np.add.at(unit_counts, unit_of_row, _indicator(clean, labels.classes))
    test_unit, membership = assign_test_units(
        unit_counts, unit_keys, test_fraction, seed, test_membership, source_hash=source_hash)
    # Validation: stratified over the non-test units, val_fraction of all rows.
    rest = np.flatnonzero(~test_unit)
    val_unit = np.zeros(n_units, dtype=bool)
    val_unit[rest[_stratified_pick(unit_counts[rest], val_fraction / rest_fraction, seed)]] = True
    part_of_unit = np.where(test_unit, 2, np.where(val_unit, 1, 0))
    part_of_row = part_of_unit[unit_of_row]

    shares, test_deviation, val_deviation = _class_shares(encoded, part_of_row, labels, val_fraction, test_fraction)
    parts = {p: encoded.loc[part_of_row == i].reset_index(drop=True) for i, p in enumerate(PARTS)}
    groups = clean["duplicate_group"].dropna() if "duplicate_group" in clean.columns else pd.Series(dtype="Int64")
    seen: set[str] = set()
    for name, part in parts.items():
        images = set(part["image_sha256"].dropna())
        if leaked := seen & images:
            raise AssertionError(f"{len(leaked)} images in {name} and another part, e.g. {sorted(leaked)[0]}")
        seen |= images

    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = SplitDir(out_dir)
    labels_path = labels.save(out.labels)
    for name, part in parts.items():
        write_parquet(part, out.part(name))
    deviation = max(test_deviation, val_deviation)
    report = {
        "clean_dir": str(Path(clean_dir).expanduser().resolve()),
        "source_hash": source_hash,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "min_class_count": min_class_count,
        "max_rows": max_rows,
        "rows_available": rows_available,
        "rows": len(encoded),
        **{f"{p}_rows": len(parts[p]) for p in PARTS},
        "units": n_units,
        **{f"{p}_units": int((part_of_unit == i).sum()) for i, p in enumerate(PARTS)},
        "duplicate_groups": int(groups.nunique()),
        "duplicate_group_rows": int(len(groups)),
        "num_classes": labels.num_classes,
        "max_share_deviation": round(deviation, 6),
        "test_share_deviation": round(test_deviation, 6),
        "val_share_deviation": round(val_deviation, 6),
        "test_membership": membership,
        "shares": shares,
    }
    report_path = write_json(out.report, report)
    log.info("split %d rows: %d train, %d val, %d test; test share deviation %.4f, val %.4f", len(encoded),
             len(parts["train"]), len(parts["val"]), len(parts["test"]), test_deviation, val_deviation)
    return SplitResult(
        out_dir=out_dir,
        labels_path=labels_path,
        train_path=out.train,
        val_path=out.val,
        test_path=out.test,
        report_path=report_path,
        train_rows=len(parts["train"]),
        val_rows=len(parts["val"]),
        test_rows=len(parts["test"]),
        max_share_deviation=round(deviation, 6),
        test_share_deviation=round(test_deviation, 6),
        num_classes=labels.num_classes,
        source_hash=source_hash,
    )
