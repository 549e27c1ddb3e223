"""The data stages called with their settings taken from one `Config`.

The one place that maps configuration fields to stage arguments, shared by the CLI, `fashion-tagger run`
and the DAG, so the three cannot drift apart. Heavy modules are imported inside each function.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fashion_tagger.config import Config

if TYPE_CHECKING:
    from fashion_tagger.prepare import PrepareResult
    from fashion_tagger.sources import FetchResult
    from fashion_tagger.split import SplitResult
    from fashion_tagger.validate import ValidationResult


def fetch(config: Config, source: str | None = None) -> FetchResult:
    from fashion_tagger.sources import fetch_dataset

    return fetch_dataset(
        config.data.source if source is None else source,  # "" is a mistake to report, not "use the default"
        config.raw_root,
        s3_endpoint_url=config.data.s3_endpoint_url,
        synthetic_size=config.data.synthetic_size,
        synthetic_seed=config.data.synthetic_seed,
    )


def validate(
    config: Config, raw_dir: str | Path, out_dir: str | Path, *, metadata_only: bool = False
) -> ValidationResult:
    from fashion_tagger.validate import validate_dataset

    return validate_dataset(
        raw_dir,
        out_dir,
        metadata_only=metadata_only or config.data.metadata_only,
        max_reject_fraction=config.data.max_reject_fraction,
        min_rows=config.data.min_rows,
        workers=config.images.workers,
        min_image_side=config.data.min_image_side,
        max_aspect_ratio=config.data.max_aspect_ratio,
    )


def split(config: Config, clean_dir: str | Path, out_dir: str | Path) -> SplitResult:
    from fashion_tagger.split import split_dataset

    return split_dataset(
        clean_dir,
        out_dir,
        attributes=config.labels.attributes,
        min_class_count=config.labels.min_class_count,
        val_fraction=config.split.val_fraction,
        seed=config.split.seed,
        max_rows=config.data.max_rows,
    )


def prepare(config: Config, split_dir: str | Path, cache_root: str | Path | None = None) -> PrepareResult:
    from fashion_tagger.prepare import prepare_images

    return prepare_images(
        split_dir,
        cache_root or config.cache_root,
        width=config.images.width,
        height=config.images.height,
        jpeg_quality=config.images.jpeg_quality,
        workers=config.images.workers,
    )
