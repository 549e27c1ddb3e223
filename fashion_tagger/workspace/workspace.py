"""The home as every stage sees it: a local folder, with an object-store home staged in and out around the stage,
and the coordination database beside it for run state, leases and test membership.

A local home is its own working copy: pulling and pushing do nothing, and the database is `<home>/coordination.db`.
An object-store home (`s3://bucket/prefix`) is worked on in this machine's copy under the scratch folder
(`Home.mirror`): `pull` stages a published folder in through the content-addressed scratch cache, `push` publishes
one (its manifest last), and the database is `FASHION_TAGGER_DATABASE_URL`. No stage assumes an earlier one ran on
this machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fashion_tagger.coordination.db import Coordinator, connect
from fashion_tagger.coordination.leases import HeldLease
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.layout import Home, scratch_root
from fashion_tagger.storage.base import Store, local_relative_key
from fashion_tagger.storage.packed import is_packed, publish_packed, unpack_staged
from fashion_tagger.storage.publish import PublishResult, is_published, publish
from fashion_tagger.storage.scratch import StageInResult, stage_in
from fashion_tagger.storage.store import open_store

log = logging.getLogger(__name__)

_open: dict[tuple[Path, str | None, str | None], Workspace] = {}  # one per home (and database) per process
_lock = threading.Lock()


@dataclass
class Workspace:
    """HOME's working copy on this machine, its STORE (None for a local home) and its coordination database."""

    home: Home
    store: Store | None = None
    database_url: str | None = None
    _coordinator: Coordinator | None = field(default=None, repr=False)

    @property
    def is_remote(self) -> bool:
        return self.store is not None

    @property
    def coordinator(self) -> Coordinator:
        """The coordination database, connected (and migrated) on first use; a local home written before the
        database existed has its state.json files and test-membership tables imported then, once."""
        if self._coordinator is None:
            coordinator = connect(self.database_url, self.home.location)
            if not self.is_remote:
                from fashion_tagger.coordination.legacy import import_legacy

                import_legacy(self.home.root, coordinator)
            self._coordinator = coordinator
        return self._coordinator

    def key(self, path: str | Path) -> str:
        """PATH (inside the home's working copy) as a key of the store."""
        path = Path(path)
        if not path.is_relative_to(self.home.root):
            raise RunError(f"{path} is not inside the home {self.home.location} ({self.home.root} on this machine)")
        return local_relative_key(path, self.home.root)

    def url(self, path: str | Path) -> str:
        return self.store.url(self.key(path)) if self.store is not None else str(path)

    # --- folders -----------------------------------------------------------------------------------------------

    def is_published(self, folder: str | Path) -> bool:
        """Whether FOLDER is complete in the home: published in the store, or (a local home) present."""
        if self.store is None:
            return Path(folder).is_dir()
        return is_published(self.store, self.key(folder))

    def pull(self, folder: str | Path, *, writable: bool = False) -> StageInResult | None:
        """The published FOLDER into this machine's copy (None: a local home, or nothing published there yet).

        Files come as hard links into the scratch cache; WRITABLE makes them copies of their own, for a stage that
        writes into the folder it read (training resuming into its checkpoints)."""
        if self.store is None or not is_published(self.store, key := self.key(folder)):
            return None
        result = stage_in(self.store, key, Path(folder), scratch=scratch_root())
        packed = ""
        if is_packed(Path(folder)):  # published by push(packed=True): a few shards to unpack
            packed = f", {unpack_staged(Path(folder))} unpacked from shards"
        if writable:
            _own_copies(Path(folder))
        log.info("staged in %s: %d files (%d downloaded, %.1f MB, %d from this machine's cache%s) in %.1f s",
                 result.url, result.files, result.downloads, result.bytes_downloaded / 1e6, result.cache_hits,
                 packed, result.seconds)
        return result

    def require(self, folder: str | Path, what: str, *, writable: bool = False) -> Path:
        """FOLDER, staged in when the home is remote; an error naming WHAT and the stage to run when it is not
        there (for a remote home: not published, because the stage writing it never finished)."""
        folder = Path(folder)
        if self.store is None:
            return folder
        if self.pull(folder, writable=writable) is None:
            raise RunError(f"{what} is not in the home: {self.url(folder)} is not published; run the stage that "
                           "writes it (again)")
        return folder

    def push(self, folder: str | Path, *, packed: bool = False) -> PublishResult | None:
        """Publish FOLDER of the working copy to the store: every file, then its manifest (None: a local home).
        PACKED publishes its files as a few tar shards instead (`storage.packed`: a raw dataset's thousands of
        images), which `pull` unpacks."""
        if self.store is None or not Path(folder).is_dir():
            return None
        return self.publish_folder(Path(folder), self.key(folder), packed=packed)

    def publish_folder(self, local_dir: Path, key: str, *, packed: bool = False) -> PublishResult:
        """LOCAL_DIR (anywhere on this machine) published at KEY of the store, as `push` does."""
        assert self.store is not None
        if packed:
            result = publish_packed(self.store, local_dir, key, work=scratch_root() / "packing")
            how = f"{result.uploaded} shard objects"
        else:
            result = publish(self.store, local_dir, key)
            how = f"{result.uploaded} uploaded"
        log.info("published %s: %d files (%s, %.1f MB) in %.1f s", result.url, result.files, how,
                 result.bytes_uploaded / 1e6, result.seconds)
        return result

    # --- single files (a run's config.yaml) --------------------------------------------------------------------

    def push_file(self, path: str | Path) -> None:
        if self.store is not None:
            self.store.upload(Path(path), self.key(path))

    def pull_file(self, path: str | Path) -> bool:
        """PATH from the store when it is there (a local home: whether it exists)."""
        path = Path(path)
        if self.store is None:
            return path.is_file()
        key = self.key(path)
        if not self.store.exists(key):
            return False
        self.store.download(key, path)
        return True

    def owns(self, path: str | Path) -> bool:
        """Whether PATH is in this machine's copy of an object-store home (so it travels through the store)."""
        return self.store is not None and Path(path).is_relative_to(self.home.root)

    def pull_files(self, paths: Iterable[str | Path]) -> None:
        """Each of PATHS that is in an object-store home, from the store when it is there (a file no stage
        published yet, such as the first run's previous tag table, is simply not there)."""
        for path in paths:
            if self.owns(path):
                self.pull_file(path)

    def push_files(self, paths: Iterable[str | Path]) -> None:
        """Each of PATHS that exists and is in an object-store home, to the store, in the order given."""
        for path in paths:
            if self.owns(path) and Path(path).is_file():
                self.push_file(path)

    # --- leases ------------------------------------------------------------------------------------------------

    @contextmanager
    def lease(self, name: str, what: str, *, wait: bool = True) -> Iterator[HeldLease]:
        """Hold lease NAME for the block, on every machine that shares the database. WAIT: wait as long as its
        holder works (logged), else fail at once naming WHAT. A holder that died frees it (`coordination.leases`)."""
        with self.coordinator.lease(name, wait_s=None if wait else 0.0, busy=f"{what} is busy") as held:
            yield held

    def localize(self, path: str | Path) -> Path:
        return self.home.localize(path)


def _own_copies(folder: Path) -> None:
    """Replace every hard-linked file of FOLDER by a copy of its own, so writing into it never changes the
    scratch cache's object (or another folder linked to it)."""
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_nlink > 1:
            tmp = path.with_name(f".{path.name}.own.tmp")
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)


def open_workspace(home: Home) -> Workspace:
    """The workspace of HOME in this process (one per home and database URL): its store opened for an
    object-store home, whose database URL must then be set (`coordination.require_database_url`)."""
    from fashion_tagger.coordination.db import require_database_url

    database_url = require_database_url(home.is_remote)
    key = (home.root, home.url, database_url)
    with _lock:
        if key not in _open:
            store = open_store(home.url) if home.url else None
            _open[key] = Workspace(home, store, database_url)
        return _open[key]


def workspace_of(root: Path) -> Workspace:
    """The workspace whose working copy holds ROOT (a run's folder): one this process opened, else the local
    home two levels up (`<home>/runs/<run>`)."""
    root = Path(root)
    for (home_root, _url, _db), workspace in list(_open.items()):
        if root.is_relative_to(home_root):
            return workspace
    return open_workspace(Home(root.parent.parent))


def close_workspaces() -> None:
    """Forget every open workspace and close its database connections (tests that change the environment)."""
    with _lock:
        for workspace in _open.values():
            if workspace._coordinator is not None:
                workspace._coordinator.close()
        _open.clear()
