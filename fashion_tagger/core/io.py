"""Small file helpers every stage shares: JSON results, atomic writes, content hashes, completion markers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
TMP_SUFFIX = ".tmp"  # atomic_path's temporaries: `.<name>.<random>.tmp` beside the file they become


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


@dataclasses.dataclass
class StageResult:
    """Base of every stage's return value: paths out plus a small summary, JSON-able for CLI and XCom."""

    def to_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = _jsonable(dataclasses.asdict(self))
        return summary


def process_umask() -> int:
    """This process's umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # not thread-safe, hence only where /proc is missing
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed onto `path` only when the block succeeds.

    A reader never sees half a file, and concurrent writers of the same file (two runs, pool workers) each
    write their own temp file, so the last complete one wins. The file gets the mode a plain `open` would
    give it (0644 under the usual umask), not mkstemp's private 0600, so other service accounts can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.fchmod(fd, 0o666 & ~process_umask())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on PATH (created as needed) for the block; another process holding it is waited for,
    and the wait is logged. The kernel releases the lock when its holder dies, so a killed process never wedges it."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, mode=0o666 & ~process_umask())
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another process holds %s", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def stale_temporaries(directory: str | Path, *, depth: int = 1) -> list[Path]:
    """atomic_path temporaries under `directory` (to `depth` levels): what a killed writer left behind."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = "/".join(["*"] * (depth - 1) + [f".*{TMP_SUFFIX}"])
    return sorted(p for p in directory.glob(pattern) if p.is_file())


def remove_stale_temporaries(directory: str | Path, *, depth: int = 1) -> int:
    """Delete what killed writers left (atomic_path temporaries); call it only while no writer is active."""
    removed = 0
    for path in stale_temporaries(directory, depth=depth):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def read_bytes(path: Path, error: type[Exception], what: str = "") -> bytes:
    """PATH's bytes; an OSError becomes ERROR naming the file (`WHAT PATH cannot be read: reason`)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"{what}{' ' if what else ''}{path} cannot be read: {exc.strerror or exc}") from None


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


def mark_complete(directory: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Written last, after every file of a directory is in place: its presence means 'complete'."""
    return write_json(Path(directory) / COMPLETE_MARKER, info or {})
