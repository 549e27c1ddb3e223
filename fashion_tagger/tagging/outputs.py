"""What a tagging run leaves in its tags folder: the catalog's tag table, the files it could not read, the review
queue, the tags that changed since the previous table and summary.json; and the merge of a DAG run's shards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.layout import TagsDir
from fashion_tagger.core.schema import ATTRIBUTES
from fashion_tagger.serving.rows import CONFIDENCE_SUFFIX, confidence_column
from fashion_tagger.tagging.catalog import TaggingError, no_rejects
from fashion_tagger.tagging.tagger import TABLE_COLUMNS, PinnedModel, TagCounts, empty_table

log = logging.getLogger(__name__)


def read_table(path: str | Path) -> pd.DataFrame | None:
    """A tag table written by this module, or None when there is none yet."""
    path = Path(path)
    return pd.read_parquet(path) if path.is_file() else None


ACCEPTED_SUFFIX = "_accepted"


def accepted_column(attribute: str) -> str:
    return f"{attribute}{ACCEPTED_SUFFIX}"


# tags.parquet's columns: the tag table's, each confidence followed by its accepted flag.
TAGS_COLUMNS = [name for column in TABLE_COLUMNS for name in (
    (column, accepted_column(column.removesuffix(CONFIDENCE_SUFFIX))) if column.endswith(CONFIDENCE_SUFFIX)
    else (column,))]


def reviewed_attributes(table: pd.DataFrame, thresholds: Mapping[str, float | None]) -> list[str]:
    """The attributes whose tags are judged against a threshold: those in THRESHOLDS that have tags in TABLE (an
    attribute left out of THRESHOLDS is never reviewed)."""
    return [a for a in thresholds if a in table.columns and table[confidence_column(a)].notna().any()]


def acceptance(table: pd.DataFrame, thresholds: Mapping[str, float | None]) -> pd.DataFrame:
    """Per reviewed attribute, whether each row's tag is accepted: its confidence reaches the threshold (a threshold
    of None accepts nothing). The one rule: `<attribute>_accepted` and the review queue both come from it."""
    flags = {}
    for attribute in reviewed_attributes(table, thresholds):
        threshold = thresholds[attribute]
        confidence = table[confidence_column(attribute)]
        flags[attribute] = confidence >= threshold if threshold is not None else pd.Series(False, index=table.index)
    return pd.DataFrame(flags, index=table.index, dtype=bool)


def with_accepted(table: pd.DataFrame, thresholds: Mapping[str, float | None]) -> pd.DataFrame:
    """TABLE with `<attribute>_accepted` after each reviewed attribute's confidence column (other attributes' are
    true where there is a tag: nothing reviews them)."""
    table = table.drop(columns=[c for c in table.columns if c.endswith(ACCEPTED_SUFFIX)])
    flags = acceptance(table, thresholds)
    for attribute in [a for a in ATTRIBUTES if confidence_column(a) in table.columns]:
        values = flags[attribute] if attribute in flags else table[confidence_column(attribute)].notna()
        table.insert(table.columns.get_loc(confidence_column(attribute)) + 1, accepted_column(attribute),
                     values.astype(bool))
    return table


def review_queue(table: pd.DataFrame, thresholds: Mapping[str, float | None]) -> pd.DataFrame:
    """Items with any tag not accepted (under its attribute's threshold), least confident first:
    `lowest_confidence` (over its reviewed tags) and `low_attributes` (the ones not accepted) lead, then the
    table's columns. Exactly the rows with a false `<attribute>_accepted`."""
    attributes = reviewed_attributes(table, thresholds)
    confidences = table[[confidence_column(a) for a in attributes]]
    low = ~acceptance(table, thresholds) & confidences.notna().set_axis(attributes, axis=1)
    queue = table[low.any(axis=1)].copy() if attributes else table.iloc[:0].copy()
    queue.insert(2, "lowest_confidence", confidences.min(axis=1).loc[queue.index] if attributes else [])
    flags = low.loc[queue.index].to_numpy().tolist()  # plain lists: a cell lookup per flag takes a second per 10k
    queue.insert(3, "low_attributes", [",".join(a for a, is_low in zip(attributes, row, strict=True) if is_low)
                                       for row in flags])
    return queue.sort_values(["lowest_confidence", "id"], kind="stable").reset_index(drop=True)


def changed_tags(previous: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """One row per (item, attribute) whose tag differs from the previous table's, with both confidences."""
    columns = ["id", "image_path", "attribute", "previous_tag", "previous_confidence", "tag", "confidence",
               "previous_model_version", "model_version", "previous_image_sha256", "image_sha256"]
    if previous is None or not len(previous) or not len(table):
        return pd.DataFrame(columns=columns)
    both = previous.merge(table, on="id", suffixes=("_previous", ""))
    parts = []
    for attribute in ATTRIBUTES:
        before, after = both[f"{attribute}_previous"], both[attribute]
        differs = (before != after) & ~(before.isna() & after.isna())
        if differs.any():
            rows = both[differs]
            parts.append(pd.DataFrame({
                "id": rows["id"], "image_path": rows["image_path"], "attribute": attribute,
                "previous_tag": rows[f"{attribute}_previous"],
                "previous_confidence": rows[f"{confidence_column(attribute)}_previous"],
                "tag": rows[attribute], "confidence": rows[confidence_column(attribute)],
                "previous_model_version": rows["model_version_previous"], "model_version": rows["model_version"],
                "previous_image_sha256": rows["image_sha256_previous"], "image_sha256": rows["image_sha256"],
            }))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True).sort_values(["id", "attribute"], kind="stable").reset_index(drop=True)


@dataclass
class TaggingResult(io.StageResult):
    out_dir: Path
    table: Path
    model_name: str
    model_version: str
    model_uri: str
    listed: int  # images in the catalog
    tagged: int  # run through the network in this run
    reused: int  # kept from an earlier run of the same model version (same content hash)
    rejected: int
    review: int
    changed_items: int
    changed_tags: int
    removed: int  # in the previous table, no longer in the catalog
    seconds: float  # tagging time (summed over shards)
    images_per_second: float
    shards: int = 1
    files: dict[str, str] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)  # per reviewed attribute: tags accepted (no review)
    coverage: dict[str, float] = field(default_factory=dict)  # accepted / tags of the attribute


def write_outputs(
    out_dir: str | Path,
    table: pd.DataFrame,
    rejects: pd.DataFrame,
    *,
    model: PinnedModel,
    counts: TagCounts,
    previous: pd.DataFrame | None,
    thresholds: Mapping[str, float | None],
    threshold_details: Mapping[str, Mapping[str, Any]] | None = None,
    shards: int = 1,
) -> TaggingResult:
    """Write the table, rejects, review queue, changes and summary.json into OUT_DIR; the table last but one and
    the summary last, each atomically, so a reader never meets a half-written folder's table. THRESHOLD_DETAILS
    (`tagger.review_thresholds`) say where each threshold comes from and what it promises."""
    tags = TagsDir(Path(out_dir))
    tags.dir.mkdir(parents=True, exist_ok=True)
    table = with_accepted(table.sort_values("id", kind="stable").reset_index(drop=True), thresholds)
    queue = review_queue(table, thresholds)
    accepted = {a: int(table[accepted_column(a)].sum()) for a in reviewed_attributes(table, thresholds)}
    with_tag = {a: int(table[confidence_column(a)].notna().sum()) for a in accepted}
    changes = changed_tags(previous, table)
    for frame, csv_path, parquet_path in ((queue, tags.review_csv, tags.review_parquet),
                                          (changes, tags.changes_csv, tags.changes_parquet)):
        io.write_parquet(frame, parquet_path)
        with io.atomic_path(csv_path) as tmp:
            frame.to_csv(tmp, index=False)
    with io.atomic_path(tags.rejects) as tmp:
        rejects.to_csv(tmp, index=False)
    io.write_parquet(table, tags.tags)
    removed = 0 if previous is None else int((~previous["id"].isin(table["id"])).sum())
    files = (tags.tags, tags.rejects, tags.review_csv, tags.review_parquet, tags.changes_csv, tags.changes_parquet)
    result = TaggingResult(
        out_dir=tags.dir, table=tags.tags, model_name=model.name, model_version=model.version,
        model_uri=model.uri, listed=len(table) + len(rejects), tagged=counts.tagged, reused=counts.reused,
        rejected=len(rejects), review=len(queue), changed_items=int(changes["id"].nunique()),
        changed_tags=len(changes), removed=removed, seconds=round(counts.seconds, 3),
        images_per_second=round(counts.tagged / counts.seconds, 1) if counts.tagged and counts.seconds else 0.0,
        shards=shards, files={path.name: str(path) for path in files}, accepted=accepted,
        coverage={a: round(accepted[a] / with_tag[a], 6) if with_tag[a] else 0.0 for a in accepted},
    )
    io.write_json(tags.summary, {**result.to_dict(), "requested_model": model.requested,
                                 "thresholds": dict(thresholds),
                                 "threshold_details": {a: dict(d) for a, d in (threshold_details or {}).items()}})
    for attribute in accepted:
        details = (threshold_details or {}).get(attribute, {})
        threshold = thresholds[attribute]
        promise = ""
        if details.get("source") == "model" and details.get("target_precision") is not None:
            measured = details.get("validation_precision")
            promise = (f", chosen for {float(details['target_precision']):.0%} precision"
                       + (f" ({float(measured):.1%} on validation)" if measured is not None else
                          ": no threshold reached it, so every tag is reviewed"))
        elif details.get("source"):
            promise = f" ({details['source']})"
        log.info("%s: %d of %d tags accepted (%.1f%%) at threshold %s%s", attribute, accepted[attribute],
                 with_tag[attribute], 100 * result.coverage[attribute],
                 f"{threshold:.3f}" if threshold is not None else "none", promise)
    log.info("tagged %d, reused %d, rejected %d of %d images; %d to review, %d items changed -> %s",
             result.tagged, result.reused, result.rejected, result.listed, result.review, result.changed_items,
             tags.dir)
    return result


def merge_shards(
    shard_dirs: Sequence[str | Path],
    out_dir: str | Path,
    model: PinnedModel,
    *,
    thresholds: Mapping[str, float | None] | None = None,
    extra_rejects: pd.DataFrame | None = None,
) -> TaggingResult:
    """Merge shard folders (each written by `tag_catalog`) into OUT_DIR against OUT_DIR's previous table, with
    the thresholds the shards used (one pinned model and configuration: the same in each) unless THRESHOLDS."""
    tables, rejects, counts = [], [extra_rejects] if extra_rejects is not None else [], TagCounts()
    details: dict[str, dict[str, Any]] = {}
    for shard in (TagsDir(Path(d)) for d in shard_dirs):
        summary = io.read_json(shard.summary)
        if thresholds is None:
            thresholds = summary.get("thresholds", {})
            details = summary.get("threshold_details", {})
        if (summary["model_name"], summary["model_version"]) != (model.name, model.version):
            raise TaggingError(f"shard {shard.dir} was tagged with {summary['model_name']} version "
                               f"{summary['model_version']}, not the run's pinned version {model.version}")
        tables.append(pd.read_parquet(shard.tags))
        rejects.append(pd.read_csv(shard.rejects, dtype=str))
        counts.tagged += summary["tagged"]
        counts.reused += summary["reused"]
        counts.seconds += summary["seconds"]
    table = pd.concat([t for t in tables if len(t)] or [empty_table()], ignore_index=True)
    rejected = pd.concat([r for r in rejects if len(r)] or [no_rejects()], ignore_index=True)
    return write_outputs(out_dir, table, rejected, model=model, counts=counts,
                         previous=read_table(TagsDir(Path(out_dir)).tags), thresholds=thresholds or {},
                         threshold_details=details, shards=len(shard_dirs))
