"""The catalog to tag: one item (id, image_path) per product photo of a folder, an s3:// prefix or a saved listing,
limited to a manifest's ids when there is one, split into shards, and the bytes of one item's image.
"""

from __future__ import annotations

import io as _io
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.errors import DataError, FashionTaggerError, first_line
from fashion_tagger.core.layout import IMAGES_DIRNAME, STYLES_FILENAME, TaggingWorkDir
from fashion_tagger.data.imaging import IMAGE_SUFFIXES, ImageReadError

log = logging.getLogger(__name__)

REJECT_COLUMNS = ["id", "image_path", "reason"]


class TaggingError(FashionTaggerError):
    """A model URI that does not resolve."""


class NoModelYet(TaggingError):
    """The registry has no such model or alias yet (a fresh install before its first champion)."""


def no_rejects() -> pd.DataFrame:
    return pd.DataFrame(columns=REJECT_COLUMNS)


def _manifest_ids(path: Path | str, read: Any = None) -> set[str]:
    """The `id` column of a styles.csv-like file (lines with stray commas skipped, as validate does)."""
    source = read if read is not None else path
    try:
        frame = pd.read_csv(source, dtype=str, on_bad_lines="skip", usecols=lambda c: c.strip() == "id")
    except ValueError as exc:
        raise DataError(f"manifest {path} cannot be read as CSV: {exc}") from None
    if "id" not in [c.strip() for c in frame.columns]:
        raise DataError(f"manifest {path} has no column 'id': it must list the catalog's ids like styles.csv")
    return {value.strip() for value in frame.iloc[:, 0].dropna()}


def _with_manifest(items: pd.DataFrame, ids: set[str] | None, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first image per id (and only listed ids when there is a manifest); the rest become rejects."""
    rejects = []
    duplicated = items["id"].duplicated(keep="first")
    first_path = items.drop_duplicates("id").set_index("id")["image_path"]
    for row in items[duplicated].itertuples(index=False):
        rejects.append({"id": row.id, "image_path": row.image_path,
                        "reason": f"duplicate id: {first_path[row.id]} has the same file name"})
    items = items[~duplicated]
    if ids is not None:
        unlisted = ~items["id"].isin(ids)
        if unlisted.any():
            log.info("%s: %d images are not in the manifest and are left out", where, int(unlisted.sum()))
        items = items[~unlisted]
        for missing in sorted(ids - set(items["id"])):
            rejects.append({"id": missing, "image_path": None, "reason": "in the manifest but no image has this id"})
    return items.reset_index(drop=True), pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def _list_folder(folder: Path, manifest: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    images_root = folder
    if (folder / IMAGES_DIRNAME).is_dir() and (folder / STYLES_FILENAME).is_file():  # the Kaggle layout
        images_root = folder / IMAGES_DIRNAME
    if manifest is None and (folder / STYLES_FILENAME).is_file():
        manifest = folder / STYLES_FILENAME
    # os.walk reads each folder once (scandir): no stat per file, and strings sort far faster than Paths.
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(images_root) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(root, name)))
    if not files:
        raise DataError(f"catalog {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = pd.DataFrame({"id": [os.path.splitext(os.path.basename(p))[0] for p in files], "image_path": files})
    return _with_manifest(items, _manifest_ids(manifest) if manifest else None, str(folder))


def _list_s3(uri: str, manifest: Path | None, endpoint_url: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from fashion_tagger.data.sources import connect_s3, list_keys, parse_s3_uri, s3_errors

    bucket, prefix = parse_s3_uri(uri)
    s3 = connect_s3(endpoint_url)
    with s3_errors(f"listing {uri}"):
        keys = list_keys(s3, bucket, f"{prefix}/" if prefix else "")
        images = sorted(k for k in keys if Path(k).suffix.lower() in IMAGE_SUFFIXES)
        ids = _manifest_ids(manifest) if manifest else None
        manifest_key = f"{prefix}/{STYLES_FILENAME}" if prefix else STYLES_FILENAME
        if ids is None and manifest_key in keys:
            body = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
            ids = _manifest_ids(f"s3://{bucket}/{manifest_key}", _io.BytesIO(body))
    if not images:
        raise DataError(f"catalog {uri} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = pd.DataFrame({"id": [Path(k).stem for k in images], "image_path": [f"s3://{bucket}/{k}" for k in images]})
    return _with_manifest(items, ids, uri)


def read_listing(path: str | Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    missing = [c for c in ("id", "image_path") if c not in frame.columns]
    if missing:
        raise DataError(f"catalog listing {path} is missing columns: {', '.join(missing)}; write it with "
                        "`list_catalog` (id, image_path)")
    return frame[["id", "image_path"]].astype(str).reset_index(drop=True)


def list_catalog(
    source: str | Path, *, manifest: str | Path | None = None, s3_endpoint_url: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, rejects): one item (id, image_path) per image of SOURCE, id = the file name without suffix.

    SOURCE is a folder (searched recursively; the Kaggle layout styles.csv + images/ too), an s3://bucket/prefix,
    or a listing parquet this function's output was saved as. A manifest (default: styles.csv beside the images)
    limits the catalog to its ids; ids without an image and second files with the same id are rejects.
    """
    manifest = Path(manifest).expanduser() if manifest else None
    if manifest is not None and not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    text = str(source)
    if text.startswith("s3://"):
        return _list_s3(text, manifest, s3_endpoint_url)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        return read_listing(path), no_rejects()
    if not path.is_dir():
        raise DataError(f"catalog {source} is neither a folder, an s3://bucket/prefix nor a listing .parquet")
    return _list_folder(path.resolve(), manifest)


def split_listing(items: pd.DataFrame, shard_size: int, work_dir: str | Path) -> list[Path]:
    """Write ITEMS as listings of at most SHARD_SIZE rows: work_dir/shard-00000/catalog.parquet, ..."""
    work = TaggingWorkDir(Path(work_dir))
    paths = []
    for number, start in enumerate(range(0, max(len(items), 1), shard_size)):
        path = work.shard(number).listing
        io.write_parquet(items.iloc[start : start + shard_size], path)
        paths.append(path)
    return paths


class ImageReader:
    """The bytes of a catalog image, a local file or an s3:// object; a failed read is an `ImageReadError`."""

    def __init__(self, s3_endpoint_url: str | None = None) -> None:
        self.s3_endpoint_url = s3_endpoint_url
        self._s3: Any = None  # one client per worker process, made on first use (clients do not survive a fork)

    def __call__(self, location: str) -> bytes:
        try:
            return self._read(location)
        except OSError as exc:
            raise ImageReadError(f"cannot read {location}: {first_line(exc)}") from None

    def _read(self, location: str) -> bytes:
        if not location.startswith("s3://"):
            return Path(location).read_bytes()
        from botocore.exceptions import BotoCoreError, ClientError

        from fashion_tagger.data.sources import connect_s3, parse_s3_uri

        if self._s3 is None:
            self._s3 = connect_s3(self.s3_endpoint_url)
        bucket, key = parse_s3_uri(location)
        try:
            return self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise OSError(str(exc)) from None
