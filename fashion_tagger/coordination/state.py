"""Run and stage state in the database: what `<run>/state.json` held, one row per (run, stage).

A stage is `started` (with its attempt number, pid and host), then `complete` (with its JSON result and seconds),
`failed` (with the error) or `skipped` (with the reason). `stage_states` returns the entries in state.json's shape.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import sqlalchemy as sa

from fashion_tagger.coordination.schema import runs
from fashion_tagger.coordination.schema import stage_states as stages_table
from fashion_tagger.coordination.sql import Database, utc_now

STAGE_STARTED, STAGE_COMPLETE, STAGE_FAILED, STAGE_SKIPPED = "started", "complete", "failed", "skipped"
STAGE_STATUSES = (STAGE_STARTED, STAGE_COMPLETE, STAGE_FAILED, STAGE_SKIPPED)
# What a finished stage may record beside its status (state.json's keys).
ENTRY_FIELDS = ("seconds", "result", "error", "reason")
ENTRY_KEYS = ("status", "attempts", "pid", "host", "started", "finished", *ENTRY_FIELDS)


class StageEntry(TypedDict, total=False):
    """One stage of a run, as state.json wrote it; keys without a value are left out."""

    status: str
    attempts: int
    pid: int
    host: str
    started: str
    finished: str
    seconds: float
    result: dict[str, Any]
    error: str
    reason: str


@dataclass(frozen=True)
class RunRecord:
    """A run the database knows: its id, when it was created and its stages' entries by name."""

    run_id: str
    created: str | None
    stages: dict[str, StageEntry] = field(default_factory=dict)


def _entry(row: sa.RowMapping) -> StageEntry:
    return StageEntry(**{k: row[k] for k in ENTRY_KEYS if row[k] is not None})  # type: ignore[typeddict-item]


class RunStates(Database):
    """`record_run`, `record_stage`, `stage_states`, `list_runs` (mixed into `Coordinator`)."""

    def record_run(self, run_id: str, created: str | None = None) -> None:
        """Make RUN_ID known (created now unless CREATED is given); a run already known keeps its entry."""
        with self.engine.begin() as conn:
            self.insert_run(conn, run_id, created)

    def insert_run(self, conn: sa.Connection, run_id: str, created: str | None = None) -> None:
        conn.execute(self.insert(runs).values(run_id=run_id, created=created or utc_now())
                     .on_conflict_do_nothing(index_elements=["run_id"]))

    def record_stage(self, run_id: str, stage: str, status: str, *, seconds: float | None = None,
                     result: Mapping[str, Any] | None = None, error: str | None = None,
                     reason: str | None = None) -> StageEntry:
        """Record STAGE of RUN_ID as STATUS and return its entry.

        `started` begins a new attempt: the attempt count goes up, pid and host are this process's, and what the
        attempt before recorded (finished, result, error) is cleared. Any other status stamps `finished` and sets
        the fields given, keeping the attempt's start. One upsert, so two writers never lose an attempt.
        """
        if status not in STAGE_STATUSES:
            raise ValueError(f"unknown stage status {status!r}; expected one of {STAGE_STATUSES}")
        fields = {"seconds": seconds, "result": dict(result) if result is not None else None, "error": error,
                  "reason": reason}
        if status == STAGE_STARTED:
            # A new attempt: what the one before recorded is cleared.
            update: dict[str, Any] = {**dict.fromkeys(ENTRY_FIELDS), "finished": None, "started": utc_now(),
                                      "pid": os.getpid(), "host": socket.gethostname(),
                                      "attempts": stages_table.c.attempts + 1}
            first = {**update, "attempts": 1}
        else:
            update = {"finished": utc_now(), **{k: v for k, v in fields.items() if v is not None}}
            first = {**update, "attempts": 0}
        update["status"] = first["status"] = status
        key = (stages_table.c.run_id == run_id) & (stages_table.c.stage == stage)
        with self.engine.begin() as conn:
            self.insert_run(conn, run_id)
            conn.execute(self.insert(stages_table).values(run_id=run_id, stage=stage, **first)
                         .on_conflict_do_update(index_elements=["run_id", "stage"], set_=update))
            return _entry(conn.execute(sa.select(stages_table).where(key)).mappings().one())

    def insert_stage(self, conn: sa.Connection, run_id: str, stage: str, entry: Mapping[str, Any]) -> bool:
        """Store ENTRY (state.json's shape) as STAGE of RUN_ID unless the database has that stage already."""
        values = {k: entry.get(k) for k in ENTRY_KEYS}
        values["attempts"] = int(values["attempts"] or 0)
        inserted = conn.execute(self.insert(stages_table).values(run_id=run_id, stage=stage, **values)
                                .on_conflict_do_nothing(index_elements=["run_id", "stage"]))
        return bool(inserted.rowcount)

    def stage_states(self, run_id: str) -> dict[str, StageEntry]:
        """RUN_ID's stages by name ({} for a run with none recorded, or none known)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(stages_table).where(stages_table.c.run_id == run_id)).mappings()
            return {row["stage"]: _entry(row) for row in rows}

    def list_runs(self) -> list[RunRecord]:
        """Every run the database knows, oldest first (by creation time, then id), with its stages."""
        with self.engine.connect() as conn:
            known = conn.execute(sa.select(runs).order_by(runs.c.created, runs.c.run_id)).mappings().all()
            stages: dict[str, dict[str, StageEntry]] = {}
            for row in conn.execute(sa.select(stages_table)).mappings():
                stages.setdefault(row["run_id"], {})[row["stage"]] = _entry(row)
        return [RunRecord(row["run_id"], row["created"], stages.get(row["run_id"], {})) for row in known]
