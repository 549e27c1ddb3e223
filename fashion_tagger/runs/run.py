"""A run as the unit of work: its folder, its configuration (read one way), its state and who is running it.

`create_run` makes a run folder with a unique id and writes its `config.yaml`; `open_run` finds it again by id
or path and reads that config back (from the store first, for an object-store home). Every stage records itself
in the coordination database (started, complete or failed, with its result), and the process executing a stage
holds the run's lease, so `run_status` can tell a running run from one whose process died (interrupted).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_tagger.core.config import Config, load_config, save_config
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.layout import Home, RunLayout, new_run_id
from fashion_tagger.runs.stage_registry import stage_names
from fashion_tagger.workspace.workspace import Workspace, open_workspace, workspace_of

log = logging.getLogger(__name__)

COMPLETE, FAILED, INTERRUPTED, RUNNING = "complete", "failed", "interrupted", "running"
STAGE_STARTED, STAGE_COMPLETE, STAGE_FAILED = "started", "complete", "failed"
STAGE_SKIPPED = "skipped"  # train, evaluate and register when nothing changed since the champion (stages.py)
DONE = (STAGE_COMPLETE, STAGE_SKIPPED)


@dataclass(frozen=True)
class Run:
    """One run: where its files are and the configuration it was created with."""

    layout: RunLayout
    config: Config

    @property
    def id(self) -> str:
        return self.layout.run_id

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def workspace(self) -> Workspace:
        return workspace_of(self.layout.root)

    @property
    def location(self) -> str:
        """Where any machine finds this run: its URL in an object-store home (`s3://.../runs/<id>`), else its
        folder. What one task hands the next, which may run on another machine with its own copy of the home."""
        return self.workspace.url(self.layout.root)


def create_run(config: Config, run_id: str | None = None, *, prefix: str = "cli") -> Run:
    """A new run folder under `<home>/runs/` with CONFIG saved in it.

    Without RUN_ID the id is generated and unique, also for runs started in the same millisecond (the folder is
    created exclusively). An orchestrator's RUN_ID (an Airflow run id) names its folder; creating it again, as a
    retried first task does, reuses the folder when the configuration is the same and refuses a different one.
    """
    home = config.layout
    workspace = open_workspace(home)
    home.runs.mkdir(parents=True, exist_ok=True)
    if run_id is None:
        while True:
            layout = home.run(new_run_id(prefix))
            try:
                layout.root.mkdir()
                break
            except FileExistsError:
                continue
    else:
        layout = home.run(run_id)
        if workspace.pull_file(layout.config):
            existing = load_config(layout.config, check_environment=False)
            if existing != config:
                raise RunError(f"run {layout.run_id} already exists with another configuration ({layout.config}); "
                               "start a new run instead")
            return Run(layout, existing)
        layout.root.mkdir(parents=True, exist_ok=True)
    save_config(config, layout.root)
    workspace.push_file(layout.config)
    workspace.coordinator.record_run(layout.run_id)
    log.info("run %s in %s", layout.run_id, workspace.url(layout.root))
    return Run(layout, config)


def open_run(ref: str | Path, home: Home | None = None) -> Run:
    """The run with id REF in HOME (default: the configured home) or at the folder REF, and its saved config."""
    if home is None:
        from fashion_tagger.core.config import project_home

        home = project_home()
    workspace = open_workspace(home)
    if workspace.is_remote and str(ref).strip():
        ref = remote_run_id(home, ref)
        workspace.pull_file(home.run(ref).config)
    layout = home.find_run(ref)
    return Run(layout, load_config(layout.config, check_environment=False))


def remote_run_id(home: Home, ref: str | Path) -> str:
    """REF, a run of the object-store HOME, as its id: an id, the run's URL (`Run.location`), or its folder in
    any machine's copy of the home (what a task on another machine recorded); an error naming REF otherwise."""
    text = str(ref).strip()
    prefix = f"{str(home.url).rstrip('/')}/runs/"
    if text.startswith(prefix):
        rest = text.removeprefix(prefix).strip("/")
    elif "/" in text or text.startswith("."):
        local = home.localize(Path(text).expanduser())
        rest = str(local.relative_to(home.runs)) if local.is_relative_to(home.runs) else ""
    else:
        return text
    if not rest or "/" in rest:
        raise RunError(f"{text!r} is not a run of the home {home.url}: pass a run id (see `fashion-tagger runs`) "
                       f"or a run's URL, {prefix}<run id>")
    return rest


# --- state ------------------------------------------------------------------------------------------------------


def read_state(layout: RunLayout) -> dict[str, Any]:
    """The run's state as `{"run_id", "stages": {name: entry}}`, from the coordination database."""
    return {"run_id": layout.run_id, "stages": dict(workspace_of(layout.root).coordinator.stage_states(layout.run_id))}


def stage_state(layout: RunLayout, stage: str) -> dict[str, Any]:
    return read_state(layout)["stages"].get(stage, {})


def stage_result(layout: RunLayout, stage: str) -> dict[str, Any]:
    """The recorded result of a completed stage; an error naming the stage to run when it has not completed."""
    entry = stage_state(layout, stage)
    if entry.get("status") != STAGE_COMPLETE:
        raise RunError(f"run {layout.run_id} has no completed {stage} stage: run `fashion-tagger {stage} "
                       f"{layout.run_id}` or `fashion-tagger run --resume {layout.run_id}`")
    return entry.get("result", {})


def record_stage(layout: RunLayout, stage: str, status: str, **fields: Any) -> None:
    """Record one stage's status (started: a new attempt) with FIELDS (seconds, result, error, reason)."""
    workspace_of(layout.root).coordinator.record_stage(layout.run_id, stage, status, **fields)


def completed_stages(state: Mapping[str, Any]) -> list[str]:
    """The stages that are done: complete, or skipped because there was nothing to retrain."""
    return [s for s in stage_names() if state["stages"].get(s, {}).get("status") in DONE]


def last_completed_stage(state: Mapping[str, Any]) -> str | None:
    done = completed_stages(state)
    return done[-1] if done else None


# --- who is running it -------------------------------------------------------------------------------------------

def is_rank_zero() -> bool:
    """False in the extra processes of a torchrun/DDP launch, which share the run with rank 0."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def run_lock(layout: RunLayout) -> Iterator[None]:
    """Hold the run's lease for the block, or fail at once naming the run and its holder when another process holds
    it. Held by this process alone, renewed by its heartbeat: a forked DataLoader worker never holds it, and a
    holder killed with `kill -9` frees it (at once on its own host, after the lease's ttl elsewhere)."""
    with workspace_of(layout.root).coordinator.run_lease(layout.run_id):
        yield


def is_locked_elsewhere(layout: RunLayout) -> bool:
    holder = workspace_of(layout.root).coordinator.run_holder(layout.run_id)
    return holder is not None and not holder.is_this_process


def run_status(layout: RunLayout, state: Mapping[str, Any] | None = None) -> str:
    """running (a process holds the lock), complete (every stage done), failed (the last attempt of a stage raised),
    or interrupted (stopped part-way: killed, or between two tasks of an orchestrator)."""
    if is_locked_elsewhere(layout):
        return RUNNING
    state = state or read_state(layout)
    if len(completed_stages(state)) == len(stage_names()):
        return COMPLETE
    if any(entry.get("status") == STAGE_FAILED for entry in state["stages"].values()):
        return FAILED
    return INTERRUPTED


def list_runs(home: Home) -> list[dict[str, Any]]:
    """Every run of HOME the database knows, oldest first: id, status, last completed stage, created, and the stage
    in the way. Works from any machine that reaches the database: no run folder is read."""
    workspace = open_workspace(home)
    rows = []
    for record in workspace.coordinator.list_runs():
        layout = home.run(record.run_id)
        state: dict[str, Any] = {"run_id": record.run_id, "stages": dict(record.stages)}
        status = run_status(layout, state)
        pending = next((s for s in stage_names() if state["stages"].get(s, {}).get("status") not in DONE), None)
        register = state["stages"].get("register", {}).get("result", {})
        rows.append({
            "run_id": record.run_id,
            "status": status,
            "last_completed_stage": last_completed_stage(state),
            "next_stage": pending,
            "error": state["stages"].get(pending, {}).get("error") if pending and status == FAILED else None,
            "created": record.created,
            "model_version": register.get("version"),
            "root": workspace.url(layout.root),
        })
    return rows


def interrupted_runs_like(config: Config) -> list[str]:
    """Ids of this home's interrupted runs with exactly CONFIG: what a user restarting by hand may mean to resume."""
    matches = []
    workspace = open_workspace(config.layout)
    for row in list_runs(config.layout):
        layout = config.layout.run(row["run_id"])
        if row["status"] == INTERRUPTED and workspace.pull_file(layout.config) \
                and load_config(layout.config, check_environment=False) == config:
            matches.append(layout.run_id)
    return matches


def format_runs(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain table for `fashion-tagger runs`."""
    if not rows:
        return "no runs yet: start one with `fashion-tagger run --config demo`"
    from fashion_tagger.core.text import text_table

    headers = ("run", "status", "last stage done", "created", "model version")
    return text_table(headers, [
        (row["run_id"], row["status"], row["last_completed_stage"] or "-", str(row.get("created") or "-")[:19],
         str(row.get("model_version") or "-"))
        for row in rows
    ])
