"""The content-addressed cache of prepared (resized) images shared by all runs, and the split's record of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fashion_tagger.errors import DataError
from fashion_tagger.io import read_json

PREPARED_FILENAME = "prepared.json"  # written into a split dir by `prepare`: cache root and image size


def size_dir(cache_root: str | Path, width: int, height: int) -> Path:
    return Path(cache_root) / "images" / f"{width}x{height}"


def cached_image_path(cache_root: str | Path, image_sha256: str, width: int, height: int) -> Path:
    """`<cache>/images/<W>x<H>/<sha[:2]>/<sha>.jpg`: one file per distinct image content and size."""
    return size_dir(cache_root, width, height) / image_sha256[:2] / f"{image_sha256}.jpg"


def read_prepared(split_dir: str | Path) -> dict[str, Any]:
    """split_dir/prepared.json: where the cache is and at which width x height the images were written."""
    path = Path(split_dir) / PREPARED_FILENAME
    if not path.is_file():
        raise DataError(f"{path} does not exist: run `fashion-tagger prepare {split_dir}` before training")
    prepared = read_json(path)
    missing = [key for key in ("cache_root", "width", "height") if key not in prepared]
    if missing:
        raise DataError(f"{path} is missing keys: {', '.join(missing)}; rerun `fashion-tagger prepare {split_dir}`")
    return prepared
