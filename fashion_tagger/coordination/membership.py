"""Test-part membership across retrains: which part each image is in, per record (a test fraction and seed).

The pair (record, image) is unique, so two runs can never place one image in two parts: every writer inserts
with ON CONFLICT DO NOTHING and reads back what is stored, and the first writer's part is the one both get.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from fashion_tagger.coordination.schema import test_membership as membership_table
from fashion_tagger.coordination.sql import Database, utc_now

TEST_PART, TRAIN_VAL_PART = "test", "train_val"  # train_val: not test; the split picks train or val per run
MEMBERSHIP_PARTS = (TEST_PART, TRAIN_VAL_PART)
_BATCH = 500  # rows per statement: within every database's limit on bound parameters


def _batches(items: Sequence[str]) -> Iterable[Sequence[str]]:
    return (items[i:i + _BATCH] for i in range(0, len(items), _BATCH))


class Membership(Database):
    """`assign_test_membership`, `test_membership` (mixed into `Coordinator`)."""

    def assign_test_membership(self, record: str, rows: Iterable[tuple[str, str]], *,
                               source_hash: str = "") -> dict[str, str]:
        """Record each (image_sha256, part) of ROWS in RECORD unless the image is there already; return the part
        stored for every image of ROWS, which is the earlier writer's wherever two disagree.

        An image is keyed by its content hash; a product without one by `id<product id>`, as the split keys it.
        """
        wanted: dict[str, str] = {}
        for sha, part in rows:
            if part not in MEMBERSHIP_PARTS:
                raise ValueError(f"unknown membership part {part!r} for image {sha}; expected one of "
                                 f"{MEMBERSHIP_PARTS}")
            wanted.setdefault(sha, part)
        if not wanted:
            return {}
        added = utc_now()
        with self.engine.begin() as conn:
            self.insert_membership(conn, record, [(sha, part, source_hash, added) for sha, part in wanted.items()])
            return self._parts(conn, record, list(wanted))

    def insert_membership(self, conn: sa.Connection, record: str, rows: Sequence[tuple[str, str, str, str]]) -> int:
        """Insert (image_sha256, part, source_hash, added) ROWS into RECORD, keeping any image stored already;
        how many were new."""
        count = sa.select(sa.func.count()).select_from(membership_table).where(membership_table.c.record == record)
        before = conn.execute(count).scalar_one()
        # One order for every writer, so two that overlap never deadlock on PostgreSQL's unique index.
        ordered = sorted(rows)
        for start in range(0, len(ordered), _BATCH):
            conn.execute(self.insert(membership_table).on_conflict_do_nothing(
                index_elements=["record", "image_sha256"]), [
                {"record": record, "image_sha256": sha, "part": part, "source_hash": source_hash, "added": added}
                for sha, part, source_hash, added in ordered[start:start + _BATCH]])
        return int(conn.execute(count).scalar_one() - before)

    def test_membership(self, record: str, images: Iterable[str] | None = None) -> dict[str, str]:
        """The stored part of each of IMAGES in RECORD (those recorded), or of every image of RECORD."""
        with self.engine.connect() as conn:
            return self._parts(conn, record, None if images is None else list(images))

    def _parts(self, conn: sa.Connection, record: str, shas: Sequence[str] | None) -> dict[str, str]:
        query = sa.select(membership_table.c.image_sha256, membership_table.c.part).where(
            membership_table.c.record == record)
        if shas is None:
            return {sha: part for sha, part in conn.execute(query).tuples()}
        found: dict[str, str] = {}
        for batch in _batches(shas):
            found.update(conn.execute(query.where(membership_table.c.image_sha256.in_(batch))).tuples().all())
        return found


class MembershipRecord:
    """One record (a test fraction and seed) of the membership table, as the split reads and extends it: keyed by
    the split's unit keys (`h<sha256>` for an image, `id<product id>` for a product without one)."""

    def __init__(self, coordinator: Membership, name: str) -> None:
        self.coordinator, self.name = coordinator, name

    def __str__(self) -> str:
        return f"test membership record {self.name}"

    @staticmethod
    def _image(key: str) -> str:
        return key[1:] if key.startswith("h") else key

    def parts(self, keys: Sequence[str]) -> dict[str, bool]:
        """Whether each recorded unit of KEYS is in test (units never recorded are left out)."""
        stored = self.coordinator.test_membership(self.name, [self._image(k) for k in keys])
        return {key: stored[self._image(key)] == TEST_PART for key in keys if self._image(key) in stored}

    def add(self, test_of_key: dict[str, bool], *, source_hash: str = "") -> dict[str, bool]:
        """Record each unit's side unless recorded already; the side stored for each (the first writer's)."""
        stored = self.coordinator.assign_test_membership(
            self.name, [(self._image(k), TEST_PART if test else TRAIN_VAL_PART) for k, test in test_of_key.items()],
            source_hash=source_hash)
        return {key: stored[self._image(key)] == TEST_PART for key in test_of_key}
