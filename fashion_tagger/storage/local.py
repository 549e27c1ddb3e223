"""A store that is a local (or mounted) folder: keys are paths below it, every write goes through a temporary
renamed into place, so a reader never sees half an object.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fashion_tagger.core import io
from fashion_tagger.core.errors import SourceError
from fashion_tagger.storage.base import Store, check_key, local_relative_key, nonempty_prefix


def _is_temporary(path: Path) -> bool:
    """An atomic_path temporary (`.<name>.<random>.tmp`): a write in progress, or what a killed writer left."""
    return path.name.startswith(".") and path.name.endswith(io.TMP_SUFFIX)


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def location(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise SourceError(f"{path} does not exist: the store {self.root} has no key {key!r}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return io.read_bytes(self._existing(key), SourceError, "store object")

    def write_bytes(self, key: str, data: bytes) -> None:
        with io.atomic_path(self._path(key)) as tmp:
            tmp.write_bytes(data)

    def download(self, key: str, dest: Path) -> Path:
        src = self._existing(key)
        with io.atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest

    def upload(self, src: Path, key: str) -> None:
        with io.atomic_path(self._path(key)) as tmp:
            shutil.copyfile(src, tmp)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / check_key(prefix, prefix=True)
        if not base.is_dir():
            return []
        return sorted(local_relative_key(p, self.root) for p in base.rglob("*") if p.is_file() and not _is_temporary(p))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        base = self.root / nonempty_prefix(prefix, "delete_prefix")
        if not base.is_dir():
            return 0
        count = sum(1 for p in base.rglob("*") if p.is_file() and not _is_temporary(p))
        shutil.rmtree(base)
        return count

    def url(self, key: str) -> str:
        return str(self._path(key))
