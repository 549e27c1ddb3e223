"""Validate and clean a raw dataset (styles.csv + images/<id>.jpg) into clean.parquet, rejects.csv and report.json.

Every data line of styles.csv ends up either in the clean table or in rejects.csv with a reason and its line
number, so `lines_read == rows_clean + rows_rejected` always holds; a quality gate then decides if the data is usable.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from fashion_tagger.core.config import Config, DataConfig
from fashion_tagger.core.errors import DataError, QualityGateError
from fashion_tagger.core.io import StageResult, atomic_path, sha256_bytes, write_json, write_parquet
from fashion_tagger.core.layout import IMAGES_DIRNAME, STYLES_FILENAME, ValidateDir
from fashion_tagger.core.parallel import WorkerCount, pool_workers
from fashion_tagger.core.schema import ATTRIBUTES, STYLE_COLUMNS
from fashion_tagger.data.labels import fold_case_variants
from fashion_tagger.data.styles_csv import ParsedStyles, Reject, StyleRecord, read_styles

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".jpg"

# The real file writes missing values both as empty fields and as the literal `NA` (pandas' reading of both).
# Pandas' full default list would also swallow real words such as "None" or "null", so only these two count.
MISSING_TOKENS = {"": "empty", "NA": "literal_NA"}
IMAGE_COLUMNS = ("image_path", "image_sha256", "width", "height", "mode", "format", "duplicate_group")
CLEAN_COLUMNS = (*STYLE_COLUMNS, *IMAGE_COLUMNS)
REJECT_COLUMNS = ("line_number", "id", "reason", "detail", "raw_line")
# The image file and its location are not content: clean_sha256 stays the same wherever the raw data lives.
HASHED_COLUMNS = tuple(c for c in CLEAN_COLUMNS if c != "image_path")

_INTEGER = re.compile(r"[+-]?[0-9]+")
_YEAR = re.compile(r"[+-]?[0-9]+(?:\.0*)?")  # 2012, or 2012.0 as a spreadsheet may write it
MAX_ID = 2**63 - 1  # ids are stored as int64
# Below this many images a process pool costs more than it saves.
_POOL_MIN_IMAGES = 64


@dataclass
class ValidationResult(StageResult):
    out_dir: Path
    clean_path: Path
    rejects_path: Path
    report_path: Path
    lines_read: int
    rows_clean: int
    rows_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    duplicate_groups: int = 0
    clean_sha256: str = ""
    metadata_only: bool = False


def _check_image(path: str, min_side: int = 1, max_aspect_ratio: float = float("inf")) -> dict[str, Any]:
    """Hash and fully decode one image; a reason instead of metadata when it cannot be used.

    JPEG draft mode decodes at reduced DCT scale, which keeps 1800x2400 files fast while still running
    the decoder over every byte, so truncation is still detected. A decoded image is then held to the size
    rules: no side below `min_side`, the long side at most `max_aspect_ratio` times the short one.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {"reason": "unreadable_image", "detail": f"{type(exc).__name__}: {exc}"}
    if not data:
        return {"reason": "empty_image", "detail": "zero-byte file"}
    result: dict[str, Any] = {"image_sha256": sha256_bytes(data)}
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            mode, fmt = img.mode, img.format
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except UnidentifiedImageError:
        return {"reason": "not_an_image", "detail": "Pillow cannot identify the file as an image"}
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...
        message = str(exc)
        reason = "truncated_image" if "truncated" in message.lower() else "corrupt_image"
        return {"reason": reason, "detail": f"{type(exc).__name__}: {message}"}
    if min(width, height) < min_side:
        return {"reason": "too_small", "detail": f"{width}x{height} px, a side below data.min_image_side={min_side}"}
    if max(width, height) > max_aspect_ratio * min(width, height):
        return {"reason": "bad_aspect", "detail": f"{width}x{height} px, an aspect ratio of "
                f"{max(width, height) / min(width, height):.2f}, above data.max_aspect_ratio={max_aspect_ratio:g}"}
    result.update(width=width, height=height, mode=mode, format=fmt)
    return result


def _check_images(
    paths: list[str], workers: WorkerCount, min_side: int, max_aspect_ratio: float
) -> list[dict[str, Any]]:
    check = functools.partial(_check_image, min_side=min_side, max_aspect_ratio=max_aspect_ratio)
    workers = pool_workers(workers, len(paths))
    progress = {"total": len(paths), "desc": "validate images", "unit": "img", "disable": None}
    if workers == 1 or len(paths) < _POOL_MIN_IMAGES:
        return [check(p) for p in tqdm(paths, **progress)]
    chunksize = max(1, min(256, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(check, paths, chunksize=chunksize), **progress))


def _images_by_stem(images_dir: Path) -> dict[str, list[str]]:
    by_stem: dict[str, list[str]] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            stem, _, _ = entry.name.partition(".")
            by_stem.setdefault(stem, []).append(entry.name)
    return by_stem


def table_sha256(clean: pd.DataFrame) -> str:
    """Content hash of a clean table: its rows sorted by id, without the location-dependent image_path."""
    frame = clean.loc[:, [c for c in HASHED_COLUMNS if c in clean.columns]].sort_values("id", kind="stable")
    text = frame.to_csv(index=False, lineterminator="\n", na_rep="<NA>")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _missing_counts(records: list[StyleRecord]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for column in STYLE_COLUMNS:
        kinds = Counter(MISSING_TOKENS[r.values[column].strip()] for r in records
                        if r.values[column].strip() in MISSING_TOKENS)
        counts[column] = {"total": sum(kinds.values()), **{k: kinds.get(k, 0) for k in MISSING_TOKENS.values()}}
    return counts


def _clean_frame(records: list[StyleRecord], images: list[dict[str, Any]], paths: list[str]) -> pd.DataFrame:
    columns: dict[str, Any] = {"id": pd.array([int(r.values["id"]) for r in records], dtype="int64")}
    for column in STYLE_COLUMNS[1:]:
        values = [r.values[column].strip() for r in records]
        columns[column] = pd.array([None if v in MISSING_TOKENS else v for v in values], dtype="string")
    # year is lineage only: a value that is not a number is kept as null (and counted) instead of rejecting the row.
    columns["year"] = pd.array([_parse_year(r.values["year"].strip()) for r in records], dtype="Int64")
    columns["image_path"] = pd.array(paths, dtype="string")
    columns["image_sha256"] = pd.array([i.get("image_sha256") for i in images], dtype="string")
    for column in ("width", "height"):
        columns[column] = pd.array([i.get(column) for i in images], dtype="Int64")
    for column in ("mode", "format"):
        columns[column] = pd.array([i.get(column) for i in images], dtype="string")
    frame = pd.DataFrame(columns)
    frame["duplicate_group"] = _duplicate_groups(frame["image_sha256"])
    return frame.loc[:, list(CLEAN_COLUMNS)].reset_index(drop=True)


def _parse_year(text: str) -> int | None:
    if not _YEAR.fullmatch(text):
        return None
    year = int(text.split(".", 1)[0])
    return year if -MAX_ID <= year <= MAX_ID else None


def _fold_labels(records: list[StyleRecord]) -> dict[str, list[dict[str, Any]]]:
    """Give labels that differ only in case one spelling, the most frequent; say what changed and how often."""
    folded: dict[str, list[dict[str, Any]]] = {}
    for attribute in ATTRIBUTES:
        values = [r.values[attribute].strip() for r in records]
        spelling = fold_case_variants(v for v in values if v not in MISSING_TOKENS)
        if not spelling:
            continue
        rows = Counter(v for v in values if v in spelling)
        for record, value in zip(records, values, strict=True):
            if value in spelling:
                record.values[attribute] = spelling[value]
        folded[attribute] = [{"variant": v, "canonical": spelling[v], "rows": rows[v]} for v in sorted(spelling)]
        log.warning("%s: folded case variants into one spelling: %s", attribute,
                    ", ".join(f"{v!r} -> {spelling[v]!r}" for v in sorted(spelling)))
    return folded


def _duplicate_groups(hashes: pd.Series) -> pd.Series:
    """Group id per byte-identical image (numbered in order of first appearance); null for singletons."""
    sizes = hashes.map(hashes.value_counts(dropna=True))
    shared = hashes.where(sizes >= 2)
    order = {h: i for i, h in enumerate(dict.fromkeys(shared.dropna()))}
    return pd.array([order.get(h) if isinstance(h, str) else None for h in shared], dtype="Int64")


def _write_rejects(rejects: list[Reject], path: Path) -> None:
    rows = [{name: getattr(r, name) for name in REJECT_COLUMNS} for r in rejects]
    frame = pd.DataFrame(rows, columns=list(REJECT_COLUMNS))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def _unique_ids(records: list[StyleRecord], rejects: list[Reject]) -> list[StyleRecord]:
    """The records whose id is an integer in 1..MAX_ID seen for the first time; the others go to REJECTS."""
    candidates: list[StyleRecord] = []
    first_line_of: dict[int, int] = {}
    for record in records:
        raw_id = record.values["id"].strip()
        if not _INTEGER.fullmatch(raw_id):
            rejects.append(Reject(record.line_number, raw_id, "non_integer_id", f"id {raw_id!r} is not an "
                                  "integer", record.raw_line))
            continue
        style_id = int(raw_id)
        if not 1 <= style_id <= MAX_ID:
            shown = raw_id if len(raw_id) <= 40 else f"{raw_id[:20]}...({len(raw_id)} digits)"
            rejects.append(Reject(record.line_number, raw_id, "bad_id", f"id {shown} is outside 1..{MAX_ID} "
                                  "(2^63-1, the largest id the clean table can store)", record.raw_line))
            continue
        record.values["id"] = raw_id
        if style_id in first_line_of:
            rejects.append(Reject(record.line_number, raw_id, "duplicate_id",
                                  f"id {style_id} first seen on line {first_line_of[style_id]}", record.raw_line))
            continue
        first_line_of[style_id] = record.line_number
        candidates.append(record)
    return candidates


def _usable_images(
    candidates: list[StyleRecord], images_dir: Path, data: DataConfig, workers: WorkerCount, rejects: list[Reject]
) -> tuple[list[StyleRecord], list[dict[str, Any]], list[str]]:
    """The records whose image exists as <id>.jpg and passes `_check_image`, with its metadata and path; the others
    go to REJECTS."""
    by_stem = _images_by_stem(images_dir)
    present: list[tuple[StyleRecord, str]] = []
    for record in candidates:
        style_id = record.values["id"]
        path = str(images_dir / f"{style_id}{IMAGE_SUFFIX}")
        names = by_stem.get(style_id, [])
        if f"{style_id}{IMAGE_SUFFIX}" in names:
            present.append((record, path))
        elif names:
            rejects.append(Reject(record.line_number, style_id, "wrong_extension",
                                  f"found {', '.join(sorted(names))} in {images_dir}, expected "
                                  f"{style_id}{IMAGE_SUFFIX}", record.raw_line))
        else:
            rejects.append(Reject(record.line_number, style_id, "missing_image",
                                  f"{path} does not exist", record.raw_line))
    checks = _check_images([p for _, p in present], workers, data.min_image_side, data.max_aspect_ratio)
    records, images, paths = [], [], []
    for (record, path), check in zip(present, checks, strict=True):
        if "reason" in check:
            rejects.append(Reject(record.line_number, record.values["id"], check["reason"],
                                  f"{path}: {check['detail']}", record.raw_line))
        else:
            records.append(record)
            images.append(check)
            paths.append(path)
    return records, images, paths


def validate_dataset(raw_dir: str | Path, out_dir: str | Path, config: Config) -> ValidationResult:
    """Check styles.csv and every image of RAW_DIR; write clean.parquet, rejects.csv and report.json to OUT_DIR.

    Rejected, each with a reason: malformed or blank lines, text damaged before it arrived (U+FFFD),
    non-integer ids, ids outside 1..2^63-1, repeated ids (the first one is kept), missing images, images
    present only under another extension (the Kaggle layout is <id>.jpg), files Pillow cannot decode
    (zero-byte, truncated, not an image, decompression bombs) and images with a side below `data.min_image_side`
    or an aspect ratio above `data.max_aspect_ratio`. Any format Pillow decodes is accepted whatever its name says
    (`format` column), and so is any colour mode (`mode`): prepare converts to RGB. Labels that differ only in
    case are folded to their most frequent spelling (`labels_folded` in the report). Lines that are not UTF-8
    are read as cp1252 (`encoding`, `cp1252_lines`). Images are checked by `images.workers` processes;
    `data.metadata_only` opens and hashes no image at all.

    Raises DataError for a dataset that cannot be read at all (no styles.csv, missing or repeated columns, no
    images/), and QualityGateError, after writing rejects.csv and report.json, when too much is rejected.
    No cell's content raises: every data line ends up clean or rejected.
    """
    data = config.data
    raw_dir = Path(raw_dir).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    parsed = read_styles(raw_dir / STYLES_FILENAME)
    images_dir = raw_dir / IMAGES_DIRNAME
    if not data.metadata_only and not images_dir.is_dir():
        raise DataError(f"{images_dir} does not exist: put the images there as <id>.jpg, or pass --metadata-only")

    rejects = list(parsed.rejects)
    candidates = _unique_ids(parsed.records, rejects)
    if data.metadata_only:
        clean_records, clean_images = candidates, [{} for _ in candidates]  # type: list[StyleRecord], list[dict[str, Any]]
        clean_paths = [str(images_dir / f"{r.values['id']}{IMAGE_SUFFIX}") for r in candidates]
    else:
        clean_records, clean_images, clean_paths = _usable_images(candidates, images_dir, data,
                                                                  config.images.workers, rejects)

    labels_folded = _fold_labels(clean_records)
    clean = _clean_frame(clean_records, clean_images, clean_paths)
    rejects.sort(key=lambda r: r.line_number)
    if parsed.lines_read != len(clean) + len(rejects):
        raise AssertionError(f"lines_read {parsed.lines_read} != clean {len(clean)} + rejected {len(rejects)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    out = ValidateDir(out_dir)
    clean_path, rejects_path, report_path = out.clean, out.rejects, out.report
    report = _report(raw_dir, parsed, clean, rejects, clean_records, data)
    report["labels_folded"] = labels_folded
    report["image_rules"] = {"min_image_side": data.min_image_side, "max_aspect_ratio": data.max_aspect_ratio}
    _write_rejects(rejects, rejects_path)
    gate = report["quality_gate"]
    if gate["passed"]:
        write_parquet(clean, clean_path)
    else:
        # A clean table from an earlier, passing run must not be mistaken for this run's output.
        clean_path.unlink(missing_ok=True)
    write_json(report_path, report)
    if not gate["passed"]:
        raise QualityGateError(
            f"{raw_dir} fails the quality gate: {'; '.join(gate['failures'])}. "
            f"See {rejects_path} and {report_path}; fix the data or relax data.max_reject_fraction / data.min_rows"
        )
    log.info("validated %s: %d clean, %d rejected", raw_dir, len(clean), len(rejects))
    return ValidationResult(
        out_dir=out_dir,
        clean_path=clean_path,
        rejects_path=rejects_path,
        report_path=report_path,
        lines_read=parsed.lines_read,
        rows_clean=len(clean),
        rows_rejected=len(rejects),
        rejected_by_reason=report["rejected_by_reason"],
        duplicate_groups=report["duplicate_groups"],
        clean_sha256=report["clean_sha256"],
        metadata_only=data.metadata_only,
    )


def _report(
    raw_dir: Path,
    parsed: ParsedStyles,
    clean: pd.DataFrame,
    rejects: list[Reject],
    clean_records: list[StyleRecord],
    data: DataConfig,
) -> dict[str, Any]:
    max_reject_fraction, min_rows = data.max_reject_fraction, data.min_rows
    reject_fraction = len(rejects) / parsed.lines_read if parsed.lines_read else 0.0
    failures = []
    if reject_fraction > max_reject_fraction:
        failures.append(f"{len(rejects)} of {parsed.lines_read} lines rejected ({reject_fraction:.2%}), "
                        f"more than max_reject_fraction={max_reject_fraction:.2%}")
    if len(clean) < min_rows:
        failures.append(f"only {len(clean)} clean rows, fewer than min_rows={min_rows}")
    groups = clean["duplicate_group"].dropna()
    year_invalid = sum(1 for r in clean_records if r.values["year"].strip() not in MISSING_TOKENS) - int(
        clean["year"].notna().sum())
    modes = clean["mode"].dropna().value_counts().sort_index()
    return {
        "source": str(raw_dir),
        "metadata_only": data.metadata_only,
        "encoding": parsed.encoding,
        "cp1252_lines": parsed.cp1252_lines,
        "lines_read": parsed.lines_read,
        "rows_clean": len(clean),
        "rows_rejected": len(rejects),
        "reject_fraction": round(reject_fraction, 6),
        "rejected_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "duplicate_groups": int(groups.nunique()),
        "duplicate_group_files": int(len(groups)),
        "missing_values": _missing_counts(clean_records),
        "invalid_year": year_invalid,
        "modes": {str(k): int(v) for k, v in modes.items()},
        # Not rejected: prepare and the loader convert these to RGB.
        "converted_modes": {str(k): int(v) for k, v in modes.items() if k != "RGB"},
        "formats": {str(k): int(v) for k, v in clean["format"].dropna().value_counts().sort_index().items()},
        "clean_sha256": table_sha256(clean),
        "quality_gate": {
            "passed": not failures,
            "failures": failures,
            "max_reject_fraction": max_reject_fraction,
            "min_rows": min_rows,
        },
    }
