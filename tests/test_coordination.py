"""The coordination database, on SQLite and on a PostgreSQL 15 the test starts natively: migrations, run and
stage state, leases raced by processes and freed after a SIGKILL, unique test-part membership, legacy import."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from native_stack import POSTGRES_USER, free_port, log_tail, postgres_bin_dir

from fashion_tagger.coordination import (
    DATABASE_URL_ENV,
    CoordinationUnavailableError,
    LeaseBusyError,
    connect,
    import_legacy,
    require_database_url,
)
from fashion_tagger.coordination.schema import VERSION_TABLE, metadata
from fashion_tagger.core.errors import ConfigError, RunError
from fashion_tagger.core.layout import Home

SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter, as another worker's process would be
TIMEOUT_S = 60


# --- the databases ---------------------------------------------------------------------------------------------------


def _postgres_absent() -> str | None:
    import pwd

    if postgres_bin_dir() is None:
        return "PostgreSQL binaries are absent (no /usr/lib/postgresql/*/bin, no $PG_BIN): scripts/ensure_services.sh"
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        return f"no unix user {POSTGRES_USER} to run PostgreSQL as"
    if os.geteuid() != 0:
        return f"initdb must run as {POSTGRES_USER}, which needs root"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port (trust auth, no fsync); its URL without a database."""
    if (reason := _postgres_absent()) is not None:
        pytest.skip(reason)
    pg_bin = postgres_bin_dir()
    assert pg_bin is not None
    root = Path(tempfile.mkdtemp(prefix="fashion-tagger-coordination-pg-"))  # the postgres user must reach it
    root.chmod(0o755)
    data, log = root / "data", root / "postgres.log"
    data.mkdir()
    shutil.chown(data, POSTGRES_USER, POSTGRES_USER)
    subprocess.run([str(pg_bin / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "-E", "UTF8", "--no-locale",
                    "--auth=trust"], user=POSTGRES_USER, check=True, capture_output=True, timeout=TIMEOUT_S)
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen([
            str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={data}", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off"], user=POSTGRES_USER, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        isready = [str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        while subprocess.run(isready, check=False).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, log_tail(log)
            time.sleep(0.2)
        yield f"postgresql://{POSTGRES_USER}@127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        server.wait(timeout=TIMEOUT_S)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def database_url(request, monkeypatch) -> Iterator[str | None]:
    """None (the SQLite file in the test's home), or a fresh database on the PostgreSQL server."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    if request.param == "sqlite":
        yield None
        return
    server = request.getfixturevalue("postgres_server")
    name = f"coordination_{os.getpid()}_{time.monotonic_ns()}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield f"{server}/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def coordinator(database_url, isolated_home):
    coordinator = connect(database_url, isolated_home)
    yield coordinator
    coordinator.close()


# --- what spawned processes do (module level, so spawn can import them) ----------------------------------------------


def _connect_when_told(url: str | None, home: str, ready, start, results) -> None:
    ready.put(os.getpid())
    start.wait(TIMEOUT_S)
    results.put(connect(url, Path(home)).applied_migrations)


def _race_for_run(url: str | None, home: str, run_id: str, ready, start, results) -> None:
    coordinator = connect(url, Path(home))
    ready.put(os.getpid())
    start.wait(TIMEOUT_S)
    try:
        with coordinator.run_lease(run_id, ttl_s=5):
            results.put(("held", os.getpid(), ""))
            time.sleep(2)
    except LeaseBusyError as exc:
        results.put(("busy", os.getpid(), str(exc)))


def _hold_and_fork(url: str | None, home: str, name: str, ttl_s: float, results) -> None:
    with connect(url, Path(home)).lease(name, ttl_s=ttl_s):
        worker = os.fork()
        if worker == 0:  # a forked worker (a DataLoader's) that outlives the holder
            time.sleep(TIMEOUT_S)
            os._exit(0)
        results.put((os.getpid(), worker))
        time.sleep(TIMEOUT_S)


def _start(target, *args) -> multiprocessing.Process:
    process = SPAWN.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _race_two(target, *args) -> tuple[list, list[multiprocessing.Process]]:
    """Start two processes running TARGET(*ARGS, ready, start, results), let them go at once when both are ready,
    and return their two results, sorted."""
    ready, start, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    processes = [_start(target, *args, ready, start, results) for _ in range(2)]
    for _ in processes:
        ready.get(timeout=TIMEOUT_S)
    start.set()
    return sorted(results.get(timeout=TIMEOUT_S) for _ in processes), processes


# --- migrations and the database URL --------------------------------------------------------------------------------


def test_migrations_create_the_schema_once_even_for_processes_connecting_at_once(database_url, isolated_home):
    applied, processes = _race_two(_connect_when_told, database_url, str(isolated_home))
    assert applied == [[], ["0001"]]  # one process migrated, the other found the schema at head
    for process in processes:
        process.join(TIMEOUT_S)

    coordinator = connect(database_url, isolated_home)  # a second connect is a no-op
    assert coordinator.applied_migrations == []
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with coordinator.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"ft_runs", "ft_stage_states", "ft_leases", "ft_test_membership", "ft_legacy_imports",
                "ft_schema_version"} <= tables
        # What the migrations built is what schema.py, the tables the code queries, describes.
        assert compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), metadata) == []
    if database_url is None:
        assert Home(isolated_home).coordination_db.is_file()
    coordinator.close()


def test_a_remote_home_without_a_database_url_is_an_error_naming_the_variable(monkeypatch, isolated_home):
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    with pytest.raises(ConfigError, match=DATABASE_URL_ENV) as caught:
        require_database_url(home_is_remote=True)
    assert not caught.value.retryable
    with pytest.raises(ConfigError, match=DATABASE_URL_ENV):
        connect(None, "s3://ft/home")
    assert not Path("s3:").exists()  # never a local folder named after the URL
    assert require_database_url(home_is_remote=False) is None
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://ft@db:5432/ft")
    assert require_database_url(home_is_remote=True) == "postgresql://ft@db:5432/ft"

    with pytest.raises(ConfigError, match="not a database URL"):
        connect("not a url", isolated_home)
    with pytest.raises(ConfigError, match="mysql database; coordination runs on postgresql or sqlite"):
        connect("mysql://ft@db/ft", isolated_home)
    with pytest.raises(CoordinationUnavailableError, match=f"did not answer.*{DATABASE_URL_ENV}") as down:
        connect(f"postgresql://ft:secret@127.0.0.1:{free_port()}/ft", isolated_home)
    assert down.value.retryable and "secret" not in str(down.value)


# --- run and stage state --------------------------------------------------------------------------------------------


def test_stage_state_records_attempts_results_and_errors_as_state_json_did(coordinator):
    assert coordinator.stage_states("nope") == {} and coordinator.list_runs() == []
    first = coordinator.record_stage("run-a", "validate", "started")
    assert first["attempts"] == 1 and first["pid"] == os.getpid() and "finished" not in first
    failed = coordinator.record_stage("run-a", "validate", "failed", error="DataError: no rows", seconds=0.5)
    assert failed["status"] == "failed" and failed["error"] == "DataError: no rows" and failed["started"]
    retry = coordinator.record_stage("run-a", "validate", "started")
    assert retry["attempts"] == 2 and "error" not in retry and "seconds" not in retry  # a new attempt
    done = coordinator.record_stage("run-a", "validate", "complete", result={"rows": 10, "paths": ["a"]},
                                    seconds=1.25)
    assert done["result"] == {"rows": 10, "paths": ["a"]} and done["seconds"] == 1.25 and done["attempts"] == 2
    coordinator.record_stage("run-a", "train", "skipped", reason="nothing changed since champion version 3")
    coordinator.record_run("run-b")
    states = coordinator.stage_states("run-a")
    assert set(states) == {"validate", "train"} and states["train"]["reason"].startswith("nothing changed")
    assert [(r.run_id, set(r.stages)) for r in coordinator.list_runs()] == [
        ("run-a", {"validate", "train"}), ("run-b", set())]
    with pytest.raises(ValueError, match="unknown stage status 'done'"):
        coordinator.record_stage("run-a", "validate", "done")


# --- leases ---------------------------------------------------------------------------------------------------------


def test_two_processes_race_for_one_run_and_exactly_one_holds_it(database_url, isolated_home, coordinator, caplog):
    outcomes, processes = _race_two(_race_for_run, database_url, str(isolated_home), "run-x")
    assert [kind for kind, _, _ in outcomes] == ["busy", "held"]
    (_, _, message), (_, winner, _) = outcomes
    assert message.startswith("run run-x is being run by another process (host ") and f"pid {winner}," in message
    assert issubclass(LeaseBusyError, RunError)  # bad input: the CLI's one line, no Airflow retry

    holder = coordinator.run_holder("run-x")
    assert holder is not None and holder.pid == winner
    caplog.set_level(logging.INFO, logger="fashion_tagger.coordination")
    started = time.monotonic()
    with coordinator.run_lease("run-x", wait_s=20) as lease:  # waits for the winner to finish (2 s)
        assert lease.info.pid == os.getpid() and 0.2 < time.monotonic() - started < 15
    assert any("waiting for lease 'run:run-x', held by another process" in r.message for r in caplog.records)
    assert coordinator.run_holder("run-x") is None  # released on exit
    for process in processes:
        process.join(TIMEOUT_S)


def test_a_lease_nests_in_its_process_is_released_by_the_outer_block_and_knows_when_it_is_lost(coordinator):
    with coordinator.lease("fetch:demo") as outer:
        with coordinator.lease("fetch:demo") as inner:
            assert inner is outer
        holder = coordinator.lease_holder("fetch:demo")
        assert holder is not None and holder.pid == os.getpid()
    assert coordinator.lease_holder("fetch:demo") is None

    with coordinator.lease("register:fashion-tagger", ttl_s=0.6) as lease:
        lease.check()
        with coordinator.engine.begin() as conn:  # another process took it over while this one stalled
            conn.execute(sa.update(metadata.tables["ft_leases"]).values(token="theirs"))
        assert lease.lost.wait(5)
        with pytest.raises(RunError, match="lease 'register:fashion-tagger' was lost"):
            lease.check()
    assert coordinator.lease_holder("register:fashion-tagger") is not None  # theirs: leaving did not delete it


def test_a_holder_killed_with_sigkill_frees_its_lease_within_ttl_though_its_forked_child_lives(
        database_url, isolated_home, coordinator):
    ttl_s, results = 2.0, SPAWN.Queue()
    process = _start(_hold_and_fork, database_url, str(isolated_home), "cache:240x320", ttl_s, results)
    pid, worker = results.get(timeout=TIMEOUT_S)
    try:
        first = coordinator.lease_holder("cache:240x320")
        assert first is not None and first.pid == pid
        time.sleep(ttl_s * 1.5)  # past one ttl: still held, because the heartbeat renews it
        renewed = coordinator.lease_holder("cache:240x320")
        assert renewed is not None and renewed.expires_at > first.expires_at
        with pytest.raises(LeaseBusyError, match="lease 'cache:240x320' is held by another process"), \
                coordinator.lease("cache:240x320"):
            pass

        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while process.exitcode is None:  # reaped by pid: join() would wait for the fork, which holds its pipe
            time.sleep(0.05)
        assert process.exitcode == -signal.SIGKILL
        with coordinator.lease("cache:240x320", ttl_s=ttl_s, wait_s=ttl_s + 5) as lease:
            freed_after = time.monotonic() - killed
            assert lease.info.pid == os.getpid()
        os.kill(worker, 0)  # the forked child is still alive: it never held the lease
        assert freed_after <= ttl_s + 1.0, f"the lease freed itself {freed_after:.1f} s after the kill"
    finally:
        for stray in (pid, worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)


# --- test-part membership -------------------------------------------------------------------------------------------


def test_two_writers_of_the_same_membership_get_one_part(database_url, isolated_home, coordinator):
    record, images = "test-0.2-seed1", [f"{i:064x}" for i in range(1500)]
    writers, barrier = [connect(database_url, isolated_home) for _ in range(2)], threading.Barrier(2)

    def write(index: int) -> dict[str, str]:
        part = ("test", "train_val")[index]
        barrier.wait(TIMEOUT_S)
        return writers[index].assign_test_membership(record, [(sha, part) for sha in images])

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(write, range(2))
    assert first == second == coordinator.test_membership(record) and len(first) == len(images)

    # A later writer gets the stored part of what is known and its own for what is new.
    later = coordinator.assign_test_membership(record, [(images[0], "train_val"), (images[0], "test"),
                                                        ("f" * 64, "test")])
    assert later == {images[0]: first[images[0]], "f" * 64: "test"}
    assert coordinator.test_membership("test-0.3-seed1") == {}  # records are apart
    with pytest.raises(ValueError, match="unknown membership part 'val'"):
        coordinator.assign_test_membership(record, [("e" * 64, "val")])
    with pytest.raises(sa.exc.IntegrityError), coordinator.engine.begin() as conn:  # unique in the schema itself
        conn.execute(sa.insert(metadata.tables["ft_test_membership"]).values(
            record=record, image_sha256=images[1], part="test", added="now"))
    for writer in writers:
        writer.close()


# --- a home written before ------------------------------------------------------------------------------------------


def test_a_legacy_home_is_imported_once(coordinator, isolated_home):
    """A home written before the database: runs/<id>/state.json files and test_membership/*.parquet tables, as the
    file-based runner wrote them."""
    import pandas as pd

    from fashion_tagger.core.config import load_config, save_config

    home = Home(isolated_home)
    entries = {
        "fetch": {"status": "complete", "attempts": 1, "pid": 7, "host": "old", "started": "2026-11-01T10:00:00Z",
                  "finished": "2026-11-01T10:00:01Z", "result": {"raw_dir": "/data/raw"}, "seconds": 0.4},
        "validate": {"status": "failed", "attempts": 1, "pid": 7, "host": "old", "started": "2026-11-01T10:00:01Z",
                     "finished": "2026-11-01T10:00:02Z", "error": "QualityGateError: 60% rejected", "seconds": 1.0},
    }
    run, broken = home.run("cli__2026-11-01T10-00-00.000Z-aaaaaa"), home.run("cli__2026-11-01T10-00-01.000Z-bbbbbb")
    for layout in (run, broken):
        layout.root.mkdir(parents=True)
        save_config(load_config("demo"), layout.root)
    run.state.write_text(json.dumps({"run_id": run.run_id, "created": "2026-11-01T10:00:00Z", "stages": entries}))
    broken.state.write_text("{not json")

    rng = np.random.default_rng(0)
    keys = np.array([f"h{i:064x}" for i in range(60)] + ["id17", "id18"], dtype=object)
    test = rng.random(len(keys)) < 0.2
    home.test_memberships.mkdir(parents=True)
    pd.DataFrame({"key": keys.astype(str), "test": test, "source_hash": "abc", "added": "2026-11-01T10:00:00+00:00"}
                 ).to_parquet(home.test_membership(0.2, 42), index=False)

    summary = import_legacy(isolated_home, coordinator)
    assert (summary.runs, summary.stages, summary.membership_records, summary.membership_images) == (1, 2, 1, 62)
    assert summary.unreadable == [broken.state.relative_to(isolated_home).as_posix()]
    assert coordinator.stage_states(run.run_id) == entries  # the entries, exactly
    assert [r.run_id for r in coordinator.list_runs()] == [run.run_id]
    expected = {(k[1:] if k.startswith("h") else k): ("test" if t else "train_val")
                for k, t in zip(keys, test, strict=True)}
    assert coordinator.test_membership(home.test_membership(0.2, 42).stem) == expected

    again = import_legacy(isolated_home, coordinator)
    assert (again.imported_files, again.stages, again.membership_images, again.already_imported) == (0, 0, 0, 2)
    assert again.message == f"nothing to import from {isolated_home}: its 2 file(s) were imported before"
    assert coordinator.stage_states(run.run_id) == entries
