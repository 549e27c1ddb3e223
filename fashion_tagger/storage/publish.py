"""Atomic publication of a stage's outputs: every file goes up first, the manifest (relative path -> sha256, size)
last, and a prefix counts as published only while its manifest exists, so a killed stage publishes nothing.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_tagger.core import io
from fashion_tagger.core.errors import SourceError
from fashion_tagger.storage.base import Store, check_key, join_key, local_relative_key, nonempty_prefix, relative_key

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ManifestEntry:
    sha256: str
    size: int


@dataclass
class PublishResult(io.StageResult):
    url: str  # where the prefix lives
    files: int
    uploaded: int  # files whose content changed since the manifest published before (all of them the first time)
    bytes_uploaded: int
    seconds: float


def manifest_key(prefix: str) -> str:
    return join_key(nonempty_prefix(prefix, "publishing"), MANIFEST_NAME)


def is_published(store: Store, prefix: str) -> bool:
    """Whether PREFIX holds a complete publication (its manifest, written last)."""
    return store.exists(manifest_key(prefix))


def read_manifest(store: Store, prefix: str) -> dict[str, ManifestEntry]:
    """The files published under PREFIX by relative path; a SourceError when PREFIX is not (or not fully) published."""
    key = manifest_key(prefix)
    if not store.exists(key):
        raise SourceError(f"{store.url(prefix)} is not published (no {MANIFEST_NAME}): the stage that writes it "
                          "has not finished; run that stage (again)")
    return _parse_manifest(store.read_bytes(key), store.url(key))


def _parse_manifest(data: bytes, where: str) -> dict[str, ManifestEntry]:
    try:
        document = json.loads(data)
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {document.get('format')!r} is not {MANIFEST_FORMAT}")
        entries = {check_key(name): ManifestEntry(str(e["sha256"]), int(e["size"]))
                   for name, e in document["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, SourceError) as exc:
        raise SourceError(f"{where} is not a manifest publish() wrote ({exc}): publish the prefix again") from None
    bad = sorted(name for name, e in entries.items() if not _SHA256.match(e.sha256) or e.size < 0)
    if bad:
        raise SourceError(f"{where} lists {bad[0]} without a sha256 and size: publish the prefix again")
    return entries


def _local_files(local_dir: Path) -> dict[str, Path]:
    if not local_dir.is_dir():
        raise SourceError(f"cannot publish {local_dir}: it is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(local_dir.rglob("*")):
        if not path.is_file():  # a link to a file publishes the file's content
            continue
        if path.name.startswith(".") and path.name.endswith(io.TMP_SUFFIX):  # a write still in progress
            continue
        files[local_relative_key(path, local_dir)] = path
    if MANIFEST_NAME in files:
        raise SourceError(f"{local_dir / MANIFEST_NAME} is in the way: publish() writes that name itself")
    return files


def publish(store: Store, local_dir: Path, prefix: str) -> PublishResult:
    """Upload every file of LOCAL_DIR under PREFIX, then its manifest.

    Republishing first removes the old manifest, so a republication killed halfway leaves the prefix unpublished
    rather than published with mixed contents; files unchanged since the old manifest are not uploaded again, and
    files the new publication lacks are deleted before the new manifest appears.
    """
    started = time.perf_counter()
    prefix = nonempty_prefix(prefix, "publishing")
    files = _local_files(Path(local_dir))
    entries = {name: ManifestEntry(io.sha256_file(path), path.stat().st_size) for name, path in files.items()}
    previous = read_manifest(store, prefix) if is_published(store, prefix) else {}
    if previous:
        store.delete(manifest_key(prefix))  # unpublished from here on; see the docstring
    changed = [name for name, entry in entries.items() if previous.get(name) != entry]
    with ThreadPoolExecutor(store.transfer_threads) as pool:
        list(pool.map(lambda name: store.upload(files[name], join_key(prefix, name)), changed))
    for key in store.list(prefix):
        if relative_key(key, prefix) not in entries:
            store.delete(key)
    store.write_bytes(manifest_key(prefix), _manifest_bytes(entries))
    return PublishResult(url=store.url(prefix), files=len(entries), uploaded=len(changed),
                         bytes_uploaded=sum(entries[name].size for name in changed),
                         seconds=round(time.perf_counter() - started, 3))


def _manifest_bytes(entries: dict[str, ManifestEntry]) -> bytes:
    document: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "files": {name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(entries.items())},
    }
    return (json.dumps(document, indent=1) + "\n").encode()
