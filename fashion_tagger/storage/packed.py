"""A folder of many files published as a few tar shards: `<prefix>/_packed/shard-*.tar` and their `shards.json`
(`storage.shards`) under one manifest, so a raw dataset's thousands of images cost a few requests each way instead
of one each. `publish_packed` packs and publishes; a worker stages the prefix in as usual (`scratch.stage_in`, the
shards by content through the scratch cache) and `unpack_staged` turns the staged shards back into the files.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from fashion_tagger.core import io
from fashion_tagger.storage.base import Store, local_relative_key
from fashion_tagger.storage.publish import PublishResult, publish
from fashion_tagger.storage.shards import INDEX_NAME, pack, unpack_all

PACKED_DIRNAME = "_packed"
_DONE_PREFIX = ".packed-"  # <folder>/.packed-<sha of the index>.done: these shards are unpacked here already


def is_packed(folder: Path) -> bool:
    """Whether FOLDER, as staged in, holds a packed publication still to unpack."""
    return (Path(folder) / PACKED_DIRNAME / INDEX_NAME).is_file()


def publish_packed(store: Store, local_dir: Path, prefix: str, *, work: Path) -> PublishResult:
    """Every file of LOCAL_DIR as shards published under PREFIX (their manifest last); WORK holds the shards
    meanwhile. The result counts LOCAL_DIR's files, and the shards' bytes uploaded."""
    started = time.perf_counter()
    local_dir = Path(local_dir)
    files = {local_relative_key(path, local_dir): path for path in sorted(local_dir.rglob("*"))
             if path.is_file() and not path.name.endswith(io.TMP_SUFFIX)
             and path.relative_to(local_dir).parts[0] != PACKED_DIRNAME}
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pack-", dir=work) as tmp:
        pack(files, Path(tmp) / PACKED_DIRNAME)
        result = publish(store, Path(tmp), prefix)
    result.files = len(files)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def unpack_staged(folder: Path) -> int:
    """The files of the packed publication staged into FOLDER, unpacked beside its `_packed/` (which goes); 0 when
    these shards were unpacked here before (their index's hash marks it). How many files were unpacked."""
    folder = Path(folder)
    shard_dir = folder / PACKED_DIRNAME
    done = folder / f"{_DONE_PREFIX}{io.sha256_file(shard_dir / INDEX_NAME)[:16]}.done"
    unpacked = 0
    if not done.is_file():
        for old in folder.glob(f"{_DONE_PREFIX}*.done"):
            old.unlink()
        unpacked = len(unpack_all(shard_dir, folder))
        done.touch()  # last: a killed unpack is redone
    shutil.rmtree(shard_dir)  # links into the scratch cache, which keeps the shards
    return unpacked
