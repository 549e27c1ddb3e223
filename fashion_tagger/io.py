"""Small file helpers every stage shares: JSON results, atomic writes, content hashes, completion markers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "_COMPLETE"


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
        return _jsonable(dataclasses.asdict(self))


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as fh:
        json.dump(_jsonable(data), fh, indent=2, sort_keys=False)
        fh.write("\n")
        tmp = fh.name
    os.replace(tmp, path)
    return path


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
