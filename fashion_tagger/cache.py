"""Where a prepared (resized) image lives in the content-addressed cache shared by all runs."""

from __future__ import annotations

from pathlib import Path

PREPARED_FILENAME = "prepared.json"  # written into a split dir by `prepare`: cache root and image size


def size_dir(cache_root: str | Path, width: int, height: int) -> Path:
    return Path(cache_root) / "images" / f"{width}x{height}"


def cached_image_path(cache_root: str | Path, image_sha256: str, width: int, height: int) -> Path:
    """`<cache>/images/<W>x<H>/<sha[:2]>/<sha>.jpg`: one file per distinct image content and size."""
    return size_dir(cache_root, width, height) / image_sha256[:2] / f"{image_sha256}.jpg"
