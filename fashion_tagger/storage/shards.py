"""Many small files as few tar shards in the WebDataset layout (`shard-000000.tar`, members such as `<sha>.jpg`),
so moving tens of thousands of prepared images is tens of round trips; unpacking refuses unsafe members.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fashion_tagger.core import io
from fashion_tagger.core.errors import DataError, SourceError
from fashion_tagger.storage.base import check_key

SHARD_BYTES = 64 << 20  # WebDataset's usual shard size: big enough to amortise a request, small enough to stream
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_NAME = "shards.json"  # shard -> its members, in order
INDEX_FORMAT = 1


def pack(
    files: dict[str, Path], out_dir: Path, *, max_bytes: int = SHARD_BYTES, max_files: int | None = None
) -> list[Path]:
    """FILES (member name -> local file) as shards in OUT_DIR, members sorted by name, plus the index.

    A shard closes before it would pass MAX_BYTES of content or hold MAX_FILES members. The tar headers carry
    no time or owner, so the same files always make byte-identical shards (and the scratch cache reuses them).
    Shards an earlier pack left in OUT_DIR are removed first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(SHARD_PATTERN.replace("{:06d}", "*")):
        old.unlink()
    groups: list[list[tuple[str, Path, int]]] = [[]]
    size = 0
    for name in sorted(files):
        member = (check_key(name), Path(files[name]), Path(files[name]).stat().st_size)
        full = max_files is not None and len(groups[-1]) >= max_files
        if groups[-1] and (full or size + member[2] > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(member)
        size += member[2]
    groups = [group for group in groups if group]
    shards = [_write_shard(out_dir / SHARD_PATTERN.format(i), group) for i, group in enumerate(groups)]
    index = {"format": INDEX_FORMAT,
             "shards": [{"name": p.name, "members": [m[0] for m in g]} for p, g in zip(shards, groups, strict=True)]}
    io.write_json(out_dir / INDEX_NAME, index)
    return shards


def _write_shard(path: Path, members: list[tuple[str, Path, int]]) -> Path:
    with io.atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, src, size in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, 0
            with src.open("rb") as fh:
                tar.addfile(info, fh)
    return path


def read_index(shard_dir: Path) -> list[dict[str, Any]]:
    """The shards of SHARD_DIR in order, each {"name": ..., "members": [...]}, as pack wrote them."""
    path = Path(shard_dir) / INDEX_NAME
    try:
        index = json.loads(io.read_bytes(path, DataError, "shard index"))
        if index["format"] != INDEX_FORMAT:
            raise ValueError(f"format {index['format']!r} is not {INDEX_FORMAT}")
        return [{"name": str(s["name"]), "members": [str(m) for m in s["members"]]} for s in index["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a shard index pack() wrote ({exc}): pack the files again") from None


def _refusal(member: tarfile.TarInfo) -> str | None:
    """Why MEMBER may not be unpacked, or None for a regular file (or a folder) with a safe relative name."""
    try:
        check_key(member.name.rstrip("/") if member.isdir() else member.name)
    except SourceError:
        return "has an absolute name or a '..' part"
    if member.issym() or member.islnk():
        return f"is a link (to {member.linkname!r})"
    if not (member.isreg() or member.isdir()):
        return "is a device, fifo or other special file"
    return None


def unpack(shard: Path, into: Path) -> list[Path]:
    """The regular files of SHARD into the folder INTO; every member is checked before anything is written."""
    shard, into = Path(shard), Path(into)
    try:
        with tarfile.open(shard, "r:") as tar:
            members = tar.getmembers()
            for member in members:
                if (reason := _refusal(member)) is not None:
                    raise DataError(f"shard {shard} member {member.name!r} {reason}: shards hold plain files "
                                    "only; refusing to unpack it (repack with fashion_tagger.storage.shards.pack)")
            return [_extract(tar, member, into / member.name) for member in members if member.isreg()]
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"shard {shard} is not a readable tar file ({exc}): fetch or pack it again") from None


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> Path:
    # Written in place, not through a temporary: creating files is what unpacking costs, and a second one per
    # member doubles it. A killed unpack is repaired by unpacking again, which rewrites every member.
    source = tar.extractfile(member)
    assert source is not None  # a regular member always has content
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return dest


def unpack_all(shard_dir: Path, into: Path, *, threads: int = 4) -> list[Path]:
    """Every shard the index of SHARD_DIR lists into INTO, THREADS shards at a time (file creation waits on the
    filesystem, not on the interpreter); the paths come back in the index's order."""
    names = [Path(shard_dir) / entry["name"] for entry in read_index(shard_dir)]
    with ThreadPoolExecutor(threads) as pool:
        return [path for paths in pool.map(lambda shard: unpack(shard, into), names) for path in paths]
