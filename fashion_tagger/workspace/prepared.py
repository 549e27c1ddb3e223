"""The prepared-image cache of an object-store home: batches of tar shards, so a worker stages in a run's tens of
thousands of small images as a few large objects.

Each `prepare` that resized new images publishes them as one batch, `cache/images/<W>x<H>/batches/<id>/`
(WebDataset shards and their `shards.json` index, `storage.shards`); the split's `prepared.json` lists the batches
that hold its images. A worker unpacks a batch into its working copy of the cache once, marked done only when
complete, so a killed unpack is redone rather than read half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from fashion_tagger.core.errors import DataError
from fashion_tagger.storage.base import join_key
from fashion_tagger.storage.publish import MANIFEST_NAME
from fashion_tagger.storage.shards import INDEX_NAME, pack, unpack_all
from fashion_tagger.workspace.workspace import Workspace

log = logging.getLogger(__name__)

BATCHES_DIRNAME = "batches"


def member_name(sha: str) -> str:
    """An image's name inside a shard, as `layout.cached_image_path` places it below the size folder."""
    return f"{sha[:2]}/{sha}.jpg"


def _sha(member: str) -> str:
    return member.rsplit("/", 1)[-1].removesuffix(".jpg")


def _batches_key(workspace: Workspace, size_dir: Path) -> str:
    return join_key(workspace.key(size_dir), BATCHES_DIRNAME)


def published_images(workspace: Workspace, size_dir: Path) -> dict[str, str]:
    """Every image the store's cache holds at SIZE_DIR's size: sha256 -> the batch holding it."""
    assert workspace.store is not None
    store, prefix = workspace.store, _batches_key(workspace, size_dir)
    found: dict[str, str] = {}
    for key in store.list(prefix):
        if not key.endswith(f"/{MANIFEST_NAME}"):
            continue
        batch = key[len(prefix) + 1:].split("/", 1)[0]
        for member in _index_members(json.loads(store.read_bytes(join_key(join_key(prefix, batch), INDEX_NAME)))):
            found.setdefault(_sha(member), batch)
    return found


def _index_members(index: dict) -> list[str]:
    return [member for shard in index.get("shards", []) for member in shard.get("members", [])]


def publish_batch(workspace: Workspace, size_dir: Path, shas: Iterable[str]) -> str | None:
    """The prepared images SHAS (files of this machine's SIZE_DIR) as a new published batch; its id (None: none)."""
    names = {member_name(sha): size_dir / member_name(sha) for sha in sorted(set(shas))}
    if not names:
        return None
    missing = [str(path) for path in names.values() if not path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} prepared images are missing from {size_dir}, e.g. {missing[0]}: rerun prepare")
    batch = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    folder = size_dir / BATCHES_DIRNAME / batch
    started = time.perf_counter()
    shards = pack(names, folder)
    workspace.push(folder)
    shutil.rmtree(folder)  # the images stay in the cache folder; the shards are in the store now
    (size_dir / f".batch-{batch}.done").touch()
    log.info("published %d prepared images as batch %s (%d shards) in %.1f s", len(names), batch, len(shards),
             time.perf_counter() - started)
    return batch


def stage_in_batches(workspace: Workspace, size_dir: Path, batches: Iterable[str]) -> int:
    """Unpack each of BATCHES into this machine's SIZE_DIR unless done before; how many images were unpacked."""
    unpacked = 0
    for batch in sorted(set(batches)):
        done = size_dir / f".batch-{batch}.done"
        if done.is_file():
            continue
        folder = size_dir / BATCHES_DIRNAME / batch
        started = time.perf_counter()
        workspace.require(folder, f"batch {batch} of the prepared-image cache")
        paths = unpack_all(folder, size_dir)
        shutil.rmtree(folder)  # links into the scratch cache: the shards themselves stay cached there
        done.touch()
        unpacked += len(paths)
        log.info("unpacked %d prepared images of batch %s in %.1f s", len(paths), batch, time.perf_counter() - started)
    return unpacked
