"""The worker-local scratch cache: published files by content (`objects/<sha[:2]>/<sha>`), each downloaded once,
checked by its hash on every use, and hard-linked into the folder a stage reads.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fashion_tagger.core import io
from fashion_tagger.core.errors import ScratchFullError, SourceUnavailableError
from fashion_tagger.core.layout import SCRATCH_ENV, scratch_root
from fashion_tagger.storage.base import Store, join_key
from fashion_tagger.storage.publish import ManifestEntry, read_manifest

__all__ = ["SCRATCH_ENV", "StageInResult", "object_path", "scratch_root", "stage_in"]

OBJECTS_DIRNAME = "objects"


@dataclass
class StageInResult(io.StageResult):
    into: Path  # the folder that now holds every published file
    url: str  # where they came from
    files: int
    downloads: int  # objects fetched from the store (a corrupted cached copy counts: it is fetched again)
    cache_hits: int  # files served from the scratch cache
    bytes_downloaded: int
    seconds: float


def object_path(scratch: Path, sha256: str) -> Path:
    return scratch / OBJECTS_DIRNAME / sha256[:2] / sha256


def stage_in(store: Store, prefix: str, into: Path, *, scratch: Path | None = None) -> StageInResult:
    """Every file published under PREFIX into the folder INTO, through the scratch cache (see the module doc).

    A cached object whose hash no longer matches (a stage wrote into its hard link, a disk fault) is fetched again;
    files already in INTO that the manifest does not list are left as they are.
    """
    started = time.perf_counter()
    scratch = Path(scratch) if scratch is not None else scratch_root()
    into = Path(into)
    manifest = read_manifest(store, prefix)
    _check_space(scratch, sum(entry.size for entry in manifest.values()
                              if not object_path(scratch, entry.sha256).is_file()), store.url(prefix))

    def fetch(item: tuple[str, ManifestEntry]) -> bool:
        name, entry = item
        cached = object_path(scratch, entry.sha256)
        downloaded = not _is_intact(cached, entry)
        if downloaded:
            _download_object(store, join_key(prefix, name), cached, entry)
        _materialise(cached, into / name)
        return downloaded

    items = sorted(manifest.items())
    try:
        with ThreadPoolExecutor(store.transfer_threads) as pool:
            fetched = list(pool.map(fetch, items))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        total = sum(entry.size for entry in manifest.values()) / 1e6
        raise ScratchFullError(f"the scratch folder {scratch} ran out of space while staging in {store.url(prefix)} "
                               f"({total:,.1f} MB in all): {SPACE_HINT}") from None
    downloaded = [entry.size for (_, entry), was in zip(items, fetched, strict=True) if was]
    return StageInResult(
        into=into, url=store.url(prefix), files=len(items), downloads=len(downloaded),
        cache_hits=len(items) - len(downloaded), bytes_downloaded=sum(downloaded),
        seconds=round(time.perf_counter() - started, 3),
    )


SPACE_HINT = (f"free space there (it is a cache: anything in it may be deleted between tasks) or point "
              f"{SCRATCH_ENV} at a larger disk; the task's retry continues once there is room")
SPACE_MARGIN = 64 << 20  # left free beside what is staged in: the stage writes its own outputs there too


def _check_space(scratch: Path, needed: int, what: str) -> None:
    """A ScratchFullError naming SCRATCH and the space NEEDED for WHAT when its filesystem has less free."""
    if needed <= 0:
        return
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    if free < needed + SPACE_MARGIN:
        raise ScratchFullError(f"the scratch folder {scratch} has {free / 1e6:,.1f} MB free, and staging in {what} "
                               f"needs {(needed + SPACE_MARGIN) / 1e6:,.1f} MB (its {needed / 1e6:,.1f} MB not yet "
                               f"cached, and {SPACE_MARGIN >> 20} MB for the stage's outputs): {SPACE_HINT}")


def _is_intact(cached: Path, entry: ManifestEntry) -> bool:
    try:
        return cached.stat().st_size == entry.size and io.sha256_file(cached) == entry.sha256
    except FileNotFoundError:
        return False


def _download_object(store: Store, key: str, cached: Path, entry: ManifestEntry) -> None:
    store.download(key, cached)  # appears complete or not at all, so workers sharing a scratch folder never clash
    if io.sha256_file(cached) != entry.sha256:
        cached.unlink(missing_ok=True)
        # The manifest is written last, so a mismatch means the prefix is being republished right now.
        raise SourceUnavailableError(f"{store.url(key)} does not match its manifest's sha256: the prefix changed "
                                     "while it was read (republished?); retry")
    # Read-only: a stage that opens its input for writing fails instead of corrupting the cache through the link.
    cached.chmod(0o444)


def _materialise(cached: Path, dest: Path) -> None:
    """DEST as a hard link to CACHED (a copy where links cannot be made: another filesystem, link limits),
    replacing what DEST was in one rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{io.TMP_SUFFIX}")
    try:
        try:
            os.link(cached, tmp)
        except OSError:
            shutil.copyfile(cached, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
