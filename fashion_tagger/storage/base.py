"""What every store offers (`Store`) and what a key may be: a relative POSIX path such as
`runs/<id>/split/train.parquet`, never absolute and never climbing out with `..`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath

from fashion_tagger.core.errors import SourceError

KEY_RULE = "a relative POSIX path without '.', '..' or empty parts (e.g. runs/<id>/split/train.parquet)"


def check_key(key: str, *, prefix: bool = False) -> str:
    """KEY as a store key, or a SourceError naming it; a PREFIX may be empty (the whole store) and end in '/'."""
    text = key.rstrip("/") if prefix else key
    if prefix and text == "":
        return ""
    parts = text.split("/")
    if text.startswith("/") or "\\" in text or any(p in ("", ".", "..") for p in parts):
        raise SourceError(f"store key {key!r} is not {KEY_RULE}: name the object relative to the store's root")
    return text


def join_key(prefix: str, name: str) -> str:
    """NAME (a relative key) under PREFIX (a key or '' for the store's root)."""
    return f"{prefix}/{name}" if prefix else name


def relative_key(key: str, prefix: str) -> str:
    """KEY as seen from under PREFIX ('' for the root): the inverse of join_key."""
    return key[len(prefix) + 1 :] if prefix else key


def local_relative_key(path: Path, root: Path) -> str:
    """PATH below ROOT as a store key (POSIX separators on every platform)."""
    return check_key(PurePosixPath(*path.relative_to(root).parts).as_posix())


class Store(ABC):
    """A flat namespace of objects addressed by key: a local folder or a prefix of an S3 bucket.

    Writes of one object are atomic (a reader sees the old or the new content, never half of it); a set of
    objects becomes visible together only through `storage.publish`.
    """

    # How many transfers publish and stage_in run at once: an object store hides latency behind parallelism.
    transfer_threads: int = 4

    @property
    @abstractmethod
    def location(self) -> str:
        """The store's root as a user would write it (a folder or s3://bucket/prefix)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def download(self, key: str, dest: Path) -> Path:
        """KEY into the local file DEST (its folder is created); DEST appears complete or not at all."""

    @abstractmethod
    def upload(self, src: Path, key: str) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key under the folder PREFIX ('' for all), sorted; `runs/a` does not list `runs/ab/...`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object KEY; a key that is not there is no error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under the folder PREFIX (never the whole store); returns how many."""

    @abstractmethod
    def url(self, key: str) -> str:
        """Where KEY lives, as another tool takes it: an absolute local path or s3://bucket/key."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def nonempty_prefix(prefix: str, what: str) -> str:
    """PREFIX checked as a key and refused when empty: WHAT (an operation) never applies to the whole store."""
    checked = check_key(prefix, prefix=True)
    if not checked:
        raise SourceError(f"{what} needs a prefix such as runs/<id>: it never applies to the whole store")
    return checked
