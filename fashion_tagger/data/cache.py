"""The split's record of the prepared-image cache: where `prepare` put the images and at which size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fashion_tagger.core.errors import DataError
from fashion_tagger.core.io import read_json
from fashion_tagger.core.layout import SplitDir, cache_size_dir, cached_image_path, localize_like

__all__ = ["cache_size_dir", "cached_image_path", "read_prepared"]


def read_prepared(split_dir: str | Path) -> dict[str, Any]:
    """split_dir/prepared.json: where the cache is and at which width x height the images were written."""
    path = SplitDir(Path(split_dir)).prepared
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the prepare stage on {split_dir} before training")
    prepared = read_json(path)
    missing = [key for key in ("cache_root", "width", "height") if key not in prepared]
    if missing:
        raise DataError(f"{path} is missing keys: {', '.join(missing)}; rerun the prepare stage")
    # Recorded by prepare on whichever machine ran it: the same cache in this machine's copy of the home.
    prepared["cache_root"] = str(localize_like(prepared["cache_root"], path))
    return prepared
