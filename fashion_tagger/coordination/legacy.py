"""A home written before the coordination database opens: its runs' state.json files and its test-membership
parquet tables are imported, once. Each file imported is remembered by its path in the home, so a second call
imports nothing; what the database holds already (a stage, an image's part) is never overwritten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from fashion_tagger.coordination.db import Coordinator
from fashion_tagger.coordination.membership import TEST_PART, TRAIN_VAL_PART
from fashion_tagger.coordination.schema import legacy_imports
from fashion_tagger.coordination.sql import utc_now
from fashion_tagger.coordination.state import ENTRY_KEYS, STAGE_STATUSES
from fashion_tagger.core.io import read_json
from fashion_tagger.core.layout import Home

log = logging.getLogger(__name__)

STATE_KIND, MEMBERSHIP_KIND = "run_state", "test_membership"


@dataclass
class ImportSummary:
    """What one `import_legacy` call found and stored."""

    home: str
    runs: int = 0
    stages: int = 0
    membership_records: int = 0
    membership_images: int = 0
    already_imported: int = 0  # files imported by an earlier call
    unreadable: list[str] = field(default_factory=list)  # files that are not valid JSON or parquet: left as they are
    dropped_fields: list[str] = field(default_factory=list)  # state.json keys the database has no column for

    @property
    def imported_files(self) -> int:
        return self.runs + self.membership_records

    @property
    def message(self) -> str:
        if not self.imported_files:
            found = f"its {self.already_imported} file(s) were imported before" if self.already_imported else (
                "it has no state.json or test-membership files")
            return f"nothing to import from {self.home}: {found}"
        return (f"imported {self.runs} run(s) ({self.stages} stage entries) and {self.membership_records} "
                f"test-membership record(s) ({self.membership_images} images) from {self.home}")


def _membership_rows(path: Path) -> list[tuple[str, str, str, str]]:
    """(image_sha256, part, source_hash, added) from split's table: key `h<sha>` or `id<product id>`, test."""
    import pandas as pd

    table = pd.read_parquet(path)
    blank = pd.Series("", index=table.index)
    return [(key[1:] if key.startswith("h") else key, TEST_PART if bool(test) else TRAIN_VAL_PART,
             str(source or ""), str(added or ""))
            for key, test, source, added in zip(table["key"].astype(str), table["test"],
                                                table.get("source_hash", blank), table.get("added", blank),
                                                strict=True)]


def _run_state(path: Path) -> dict[str, Any]:
    """A state.json as written by `runs.run`: {"run_id", "created", "stages": {name: entry}}, checked."""
    state: dict[str, Any] = read_json(path)
    stages = state.get("stages", {})
    if not isinstance(stages, dict) or not all(
            isinstance(entry, dict) and entry.get("status") in STAGE_STATUSES for entry in stages.values()):
        raise ValueError(f"its stages are not entries with a status of {STAGE_STATUSES}")
    return state


def _sources(layout: Home) -> list[tuple[str, Path, str | None]]:
    """(kind, file, run id) of every legacy file of the home: state.json per run, then the membership tables."""
    found: list[tuple[str, Path, str | None]] = [
        (STATE_KIND, run.state, run.run_id) for run in layout.run_layouts() if run.state.is_file()]
    if layout.test_memberships.is_dir():
        found += [(MEMBERSHIP_KIND, path, None) for path in sorted(layout.test_memberships.glob("*.parquet"))]
    return found


def import_legacy(home: Path, coordinator: Coordinator) -> ImportSummary:
    """Import HOME's `runs/*/state.json` and `test_membership/*.parquet` into COORDINATOR's database, each file
    once; the files stay where they are. A membership table's record is named by its file's stem
    (`test-0.1-seed42`, `layout.Home.test_membership`), an image by its content hash (split's key without `h`)."""
    layout = Home(Path(home))
    summary = ImportSummary(home=str(layout.root))
    for kind, path, run_id in _sources(layout):
        source = path.relative_to(layout.root).as_posix()
        with coordinator.engine.connect() as conn:
            if conn.execute(sa.select(legacy_imports.c.source).where(legacy_imports.c.source == source)).first():
                summary.already_imported += 1
                continue
        try:  # read before the transaction, which stays short; the JSON and parquet readers raise these
            content: Any = _run_state(path) if run_id is not None else _membership_rows(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("legacy import: skipping %s, which cannot be read (%s)", path, exc)
            summary.unreadable.append(source)
            continue
        with coordinator.engine.begin() as conn:
            if run_id is not None:
                coordinator.insert_run(conn, run_id, content.get("created"))
                for name, entry in content["stages"].items():
                    summary.dropped_fields += [f"{run_id}/{name}.{key}" for key in sorted(set(entry) - set(ENTRY_KEYS))]
                    summary.stages += coordinator.insert_stage(conn, run_id, name, entry)
                summary.runs += 1
            else:
                summary.membership_images += coordinator.insert_membership(conn, path.stem, content)
                summary.membership_records += 1
            # A concurrent importer of the same file stored the same rows (both insert without overwriting).
            conn.execute(coordinator.insert(legacy_imports).on_conflict_do_nothing(index_elements=["source"]).values(
                source=source, kind=kind, rows=len(content["stages"] if run_id is not None else content),
                imported=utc_now()))
    log.info("legacy import: %s", summary.message)
    return summary
