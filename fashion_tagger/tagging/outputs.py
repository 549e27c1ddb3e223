"""What a tagging run leaves in its tags folder: the catalog's tag table, the files it could not read, the review
queue, the tags that changed since the previous table and summary.json; and the merge of a DAG run's shards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.layout import TagsDir
from fashion_tagger.core.schema import ATTRIBUTES
from fashion_tagger.serving.rows import confidence_column
from fashion_tagger.tagging.catalog import TaggingError, no_rejects
from fashion_tagger.tagging.tagger import PinnedModel, TagCounts, empty_table

log = logging.getLogger(__name__)


def read_table(path: str | Path) -> pd.DataFrame | None:
    """A tag table written by this module, or None when there is none yet."""
    path = Path(path)
    return pd.read_parquet(path) if path.is_file() else None


def review_queue(table: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """Items with any tag below its attribute's threshold, least confident first: `lowest_confidence` (over all
    its tags) and `low_attributes` (the ones under threshold) lead, then the table's columns."""
    attributes = [a for a in thresholds if a in table.columns and table[confidence_column(a)].notna().any()]
    confidences = table[[confidence_column(a) for a in attributes]]
    low = pd.DataFrame({a: table[confidence_column(a)] < thresholds[a] for a in attributes}, index=table.index)
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


def write_outputs(
    out_dir: str | Path,
    table: pd.DataFrame,
    rejects: pd.DataFrame,
    *,
    model: PinnedModel,
    counts: TagCounts,
    previous: pd.DataFrame | None,
    thresholds: Mapping[str, float],
    shards: int = 1,
) -> TaggingResult:
    """Write the table, rejects, review queue, changes and summary.json into OUT_DIR; the table last but one and
    the summary last, each atomically, so a reader never meets a half-written folder's table."""
    tags = TagsDir(Path(out_dir))
    tags.dir.mkdir(parents=True, exist_ok=True)
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    queue = review_queue(table, thresholds)
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
        shards=shards, files={path.name: str(path) for path in files},
    )
    io.write_json(tags.summary, {**result.to_dict(), "requested_model": model.requested,
                                 "thresholds": dict(thresholds)})
    log.info("tagged %d, reused %d, rejected %d of %d images; %d to review, %d items changed -> %s",
             result.tagged, result.reused, result.rejected, result.listed, result.review, result.changed_items,
             tags.dir)
    return result


def merge_shards(
    shard_dirs: Sequence[str | Path],
    out_dir: str | Path,
    model: PinnedModel,
    *,
    thresholds: Mapping[str, float],
    extra_rejects: pd.DataFrame | None = None,
) -> TaggingResult:
    """Merge shard folders (each written by `tag_catalog`) into OUT_DIR against OUT_DIR's previous table."""
    tables, rejects, counts = [], [extra_rejects] if extra_rejects is not None else [], TagCounts()
    for shard in (TagsDir(Path(d)) for d in shard_dirs):
        summary = io.read_json(shard.summary)
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
                         previous=read_table(TagsDir(Path(out_dir)).tags), thresholds=thresholds,
                         shards=len(shard_dirs))
