"""The production topology of docker-compose.yaml, started natively (tests/native_stack.py): the DAG is
triggered through the REST API v2 as a UI user would, training must run on the `gpu`-queue worker, the model's
artifacts must land in the S3 bucket and its version must carry the alias champion in the MLflow server.
MLflow runs with its authentication: anonymous requests are refused, the read-only user reads but cannot move
an alias, and the workers register and promote as the service user.

No shared folder (issue 19): the home is a bucket on the S3 server, state and leases are in the coordination
database, each worker has only its own scratch folder; the DAG test checks that nothing of the run is anywhere else.

Needs PostgreSQL and Redis from Debian (scripts/ensure_services.sh installs them); about 4-6 minutes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from native_stack import (
    BUCKET,
    GPU_POOL_SLOTS,
    HOME_BUCKET,
    HOME_URL,
    MLFLOW_ADMIN,
    MLFLOW_READER,
    MLFLOW_SERVICE_USER,
    WORKER_QUEUES,
    NativeStack,
    StackError,
    missing_prerequisites,
)

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]

DAG_ID = "fashion_tagger_training"
GPU_TASKS = {"train_model", "evaluate_model"}
DEFAULT_TASKS = {"fetch_dataset", "validate_dataset", "build_splits", "prepare_images", "register_model"}
# What a user would type into the trigger form for a smoke run: a small generated dataset, timm's test
# backbone, tiny images, one epoch.
SMOKE_PARAMS = {
    "preset": "demo",
    "source": "synthetic:300",
    "backbone": "test_efficientnet",
    "pretrained": "no",
    "image_width": 24,
    "image_height": 32,
    "epochs": 1,
    "batch_size": 32,
    "min_class_count": 10,
    "promote": "yes",
}
# The DAG run whose trainer is killed: three epochs of a few seconds each, so the kill lands inside one.
KILL_PARAMS = SMOKE_PARAMS | {"source": "synthetic:600", "image_width": 128, "image_height": 160, "epochs": 3}
# Two runs at once on a dataset no run of this module has fetched yet.
TWIN_PARAMS = SMOKE_PARAMS | {"source": "synthetic:400"}
RUN_TIMEOUT_S = 600
GPU_HOST = "gpu-worker"
RETRIED = {"prepare_images", "train_model"}  # the tasks the kill test kills once each
SMALL_SCRATCH_MB = 16  # the gpu worker's scratch disk after the kill: less than a stage-in's 64 MB margin


@pytest.fixture(scope="module")
def stack():
    missing = missing_prerequisites()
    if missing:
        message = f"missing {', '.join(missing)}: run scripts/ensure_services.sh (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    native = NativeStack()
    try:
        native.start()
        print(f"\nnative stack healthy after {native.timings['healthy']:.0f}s: {native.timings}")
        yield native
    finally:
        native.stop()


def test_every_service_answers_its_health_check(stack):
    import psycopg2
    import requests

    for user in ("airflow", "mlflow"):
        with psycopg2.connect(stack.pg_url(user, user)) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone()[0] == user
    assert stack.health["redis"] is True
    assert BUCKET in {b["Name"] for b in stack.s3_client().list_buckets()["Buckets"]}
    assert requests.get(f"{stack.mlflow_url}/health", timeout=10).text.strip() == "OK"
    health = stack.api("GET", "monitor/health")
    for component in ("metadatabase", "scheduler", "dag_processor"):
        assert health[component]["status"] == "healthy", health
    assert stack.celery_queues() == {f"celery@{host}": [queue] for host, queue in WORKER_QUEUES.items()}
    pools = {p["name"]: p["slots"] for p in stack.api("GET", "pools")["pools"]}
    assert pools["gpu"] == GPU_POOL_SLOTS


def test_mlflow_refuses_anonymous_requests_and_writes_outside_a_grant(stack):
    import requests

    api = f"{stack.mlflow_url}/api/2.0/mlflow"
    anonymous = requests.get(f"{api}/experiments/search", params={"max_results": 10}, timeout=10)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    wrong = requests.get(f"{api}/experiments/search", params={"max_results": 10}, timeout=10,
                         auth=(MLFLOW_READER, "not-the-password"))
    assert wrong.status_code == 401
    # The health check stays open: it is what the compose healthcheck and the proxies poll.
    assert requests.get(f"{stack.mlflow_url}/health", timeout=10).status_code == 200
    # Managing users is the admin's alone.
    for user in (MLFLOW_SERVICE_USER, MLFLOW_READER):
        reply = requests.post(f"{api}/users/create", json={"username": f"{user}-2", "password": "x" * 24},
                              auth=stack.mlflow_auth(user), timeout=10)
        assert reply.status_code == 403, (user, reply.text)
    listing = requests.get(f"{api}/users/list", auth=stack.mlflow_auth(MLFLOW_ADMIN), timeout=10)
    assert listing.status_code == 200, listing.text
    users = {u["username"]: u["is_admin"] for u in listing.json()["users"]}
    assert users == {MLFLOW_ADMIN: True, MLFLOW_SERVICE_USER: False, MLFLOW_READER: False}


def _wait_for_dag(stack: NativeStack, deadline: float) -> dict:
    while time.monotonic() < deadline:
        errors = stack.api("GET", "importErrors")["import_errors"]
        if errors:
            pytest.fail("the DAG folder has import errors:\n" + "\n".join(e["stack_trace"] for e in errors))
        try:
            return stack.api("GET", f"dags/{DAG_ID}")
        except StackError as exc:
            if "404" not in str(exc):
                raise
        time.sleep(2)
    pytest.fail(f"{DAG_ID} was not parsed in time:\n{stack.diagnostics()}")


def _xcom(stack: NativeStack, run_id: str, task_id: str) -> dict:
    entry = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                      params={"deserialize": "true"})
    value = entry["value"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = ast.literal_eval(value)
    return value


def _assert_read_only_user_cannot_move_the_alias(stack: NativeStack, name: str, version: str) -> None:
    """... but cannot set or delete an alias, nor register a version: 403 from the server."""
    import requests

    api = f"{stack.mlflow_url}/api/2.0/mlflow"
    auth = stack.mlflow_auth(MLFLOW_READER)
    attempts = {
        "set alias": requests.post(f"{api}/registered-models/alias", auth=auth, timeout=10,
                                   json={"name": name, "alias": "champion", "version": str(version)}),
        "delete alias": requests.delete(f"{api}/registered-models/alias", auth=auth, timeout=10,
                                        json={"name": name, "alias": "champion"}),
        "new version": requests.post(f"{api}/model-versions/create", auth=auth, timeout=10,
                                     json={"name": name, "source": "models:/m-0"}),
    }
    for what, reply in attempts.items():
        assert reply.status_code == 403, f"read-only user, {what}: {reply.status_code} {reply.text[:300]}"


def _assert_the_service_user_owns_the_pipeline(stack: NativeStack, name: str, experiment_id: str) -> None:
    """The workers signed in as the service user: it created the experiment (MLflow makes the creator its
    manager) and holds the model; the reader only reads both."""
    import requests

    def permission(user: str, kind: str, key: str) -> str:
        reply = requests.get(f"{stack.mlflow_url}/api/3.0/mlflow/users/permissions/get", timeout=10,
                             params={"username": user, "resource_type": kind, "resource_id": key},
                             auth=stack.mlflow_auth(MLFLOW_ADMIN))
        assert reply.ok, reply.text
        return reply.json()["permission"]

    granted = {
        (user, kind): permission(user, kind, key)
        for user in (MLFLOW_SERVICE_USER, MLFLOW_READER)
        for kind, key in (("experiment", experiment_id), ("registered_model", name))
    }
    assert granted == {
        (MLFLOW_SERVICE_USER, "experiment"): "MANAGE", (MLFLOW_SERVICE_USER, "registered_model"): "MANAGE",
        (MLFLOW_READER, "experiment"): "READ", (MLFLOW_READER, "registered_model"): "READ",
    }


def _assert_nothing_of_the_run_outside_the_store(stack: NativeStack, run_id: str, tmp_path: Path) -> None:
    """No shared folder: the run lives in the home's bucket and the coordination database; on the worker machines
    only in their scratch folders (and Airflow's own task logs). Another machine with an empty scratch folder sees
    it complete through `fashion-tagger runs`."""
    from fashion_tagger.core.layout import run_dir_name

    folder = run_dir_name(run_id)
    objects = {key.removeprefix(f"runs/{folder}/"): size for key, size in stack.home_objects(f"runs/{folder}/").items()}
    for key in ("config.yaml", "validate/clean.parquet", "split/test.parquet", "train/checkpoints/last.ckpt",
                "train/eval/metrics.json", "train/registration.json"):
        assert key in objects, f"{HOME_URL}/runs/{folder}/{key} is missing: {sorted(objects)[:60]}"
    services = {"logs", "airflow", "postgres", "redis", "pylib", "mlflow-auth", "machines"}
    assert {p.name for p in stack.root.iterdir()} <= services, sorted(p.name for p in stack.root.iterdir())
    allowed = [stack.scratch(host) for host in stack.machines] + [stack.airflow_home / "logs"]
    outside = [p for p in stack.root.rglob(f"*{folder}*") if not any(p.is_relative_to(a) for a in allowed)]
    assert not outside, f"files of run {folder} outside the store and the scratch folders: {outside[:10]}"
    for host, machine in stack.machines.items():
        assert not (machine / "home" / ".fashion-tagger").exists(), f"{host} wrote a home in its user folder"
    env = stack.base_env() | stack.store_env() | {"FASHION_TAGGER_SCRATCH": str(tmp_path / "scratch"),
                                                   "HOME": str(tmp_path)}
    listing = subprocess.run([str(Path(sys.executable).parent / "fashion-tagger"), "runs", "--json"], env=env,
                             capture_output=True, text=True, timeout=180)
    assert listing.returncode == 0, listing.stderr[-3000:]
    rows = {row["run_id"]: row for row in json.loads(listing.stdout)}
    row = rows.get(run_id) or rows.get(folder)
    assert row is not None and row["status"] == "complete", (run_id, rows)
    assert row["root"].startswith(HOME_URL), row


def _trigger(stack: NativeStack, conf: dict, deadline: float) -> str:
    dag = _wait_for_dag(stack, deadline)
    if dag["is_paused"]:
        stack.api("PATCH", f"dags/{DAG_ID}", json={"is_paused": False})
    return stack.api("POST", f"dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})["dag_run_id"]


def _task_instances(stack: NativeStack, run_id: str) -> dict[str, dict]:
    listing = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return {ti["task_id"]: ti for ti in listing}


def _summary(tis: dict[str, dict]) -> dict[str, tuple]:
    return {t: (ti["state"], ti["queue"], ti["hostname"], ti["try_number"], round(ti["duration"] or 0, 1))
            for t, ti in tis.items()}


def _task_log(stack: NativeStack, run_id: str, task_id: str, attempt: int) -> str:
    """The text of attempt ATTEMPT of TASK_ID in RUN_ID, as the worker wrote it (JSON lines, one event each)."""
    from native_stack import _strip_json_log

    paths = sorted((stack.airflow_home / "logs").rglob(f"run_id={run_id}/task_id={task_id}/attempt={attempt}.log"))
    return "\n".join(_strip_json_log(path.read_text(errors="replace")) for path in paths)


def _epochs_logged(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"epoch (\d+)/\d+: train loss", text)]


def _trainer_pid(folder: str) -> int | None:
    """The stage child `python -m fashion_tagger train <run>` of the run folder FOLDER, not its forked
    DataLoader workers (same command line, parent among them)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "fashion_tagger train" in text and folder in text:
            found[int(proc.name)] = ppid
    tops = [pid for pid, ppid in found.items() if ppid not in found]
    return tops[0] if len(tops) == 1 else None


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _empty(folder: Path) -> int:
    """Remove everything under FOLDER (a worker's scratch), keeping the folder; the number of files removed."""
    import shutil

    removed = sum(1 for p in folder.rglob("*") if not p.is_dir())
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return removed


def _kill_the_trainer_in_epoch_2(stack: NativeStack, run_id: str, deadline: float) -> dict:
    """Wait until the training attempt has finished epoch 1 and published its checkpoint, `kill -9` its stage
    child, and empty the gpu worker's scratch folder before Airflow retries. What attempt 1 had done, returned."""
    from fashion_tagger.core.layout import run_dir_name

    folder = run_dir_name(run_id)
    published = re.compile(rf"published \S*runs/{re.escape(folder)}/train:")
    seen: list[tuple] = []  # what the test saw, when it changed: the failure message's timeline
    while time.monotonic() < deadline:
        text = _task_log(stack, run_id, "train_model", 1)
        epochs = _epochs_logged(text)
        pid = _trainer_pid(folder)
        now = (epochs, len(published.findall(text)), pid, len(text))
        if not seen or seen[-1][1:] != now:
            seen.append((round(time.monotonic() - deadline + RUN_TIMEOUT_S, 1), *now))
        if 3 in epochs:
            pytest.fail(f"training finished before it could be killed; seen (s, epochs, checkpoints, pid, log "
                        f"chars): {seen}\n{text[-3000:]}")
        if epochs and published.search(text) and pid is not None:
            os.kill(pid, 9)
            break
        tis = _task_instances(stack, run_id)
        # prepare_images is up for retry for a while: its worker was killed.
        if any(ti["state"] in ("failed", "upstream_failed") or (ti["state"] == "up_for_retry" and t != "prepare_images")
               for t, ti in tis.items()):
            pytest.fail(f"DAG run {run_id} failed before the kill: {_summary(tis)}\n{stack.diagnostics()}")
        time.sleep(0.2)
    else:
        pytest.fail(f"training of {run_id} never reached epoch 2:\n{stack.diagnostics()}")
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    removed = _empty(stack.scratch(GPU_HOST))
    # The emptied scratch folder is then a disk too small for the retry (where the machine lets a test mount one).
    refused = stack.shrink_scratch(GPU_HOST, SMALL_SCRATCH_MB)
    text = _task_log(stack, run_id, "train_model", 1)
    killed = {"pid": pid, "epochs": _epochs_logged(text), "checkpoints": len(published.findall(text)),
              "scratch_files_removed": removed, "small_scratch": refused is None}
    print(f"\nkilled trainer {pid} of {run_id} after epochs {killed['epochs']} "
          f"({killed['checkpoints']} checkpoint(s) published); emptied {GPU_HOST}'s scratch ({removed} files)"
          + (f", now a {SMALL_SCRATCH_MB} MB filesystem" if refused is None
             else f"; the full-scratch fault is left out on this machine: {refused}"))
    return killed


def _wait_out_the_full_scratch(stack: NativeStack, run_id: str, deadline: float) -> str:
    """The training retry on a scratch folder too small for what it stages in: it fails before downloading anything
    with one line naming the folder and the space needed, a transient error, so Airflow retries it; once it is up
    for retry the folder gets its disk back. That attempt's error line, returned."""
    from fashion_tagger.storage.scratch import OBJECTS_DIRNAME

    scratch = stack.scratch(GPU_HOST)
    while time.monotonic() < deadline:
        train = _task_instances(stack, run_id).get("train_model", {})
        if train.get("try_number") == 2 and train.get("state") == "up_for_retry":
            break
        if train.get("state") in ("success", "failed"):
            pytest.fail(f"train_model try {train.get('try_number')} ended {train.get('state')} on a full scratch "
                        f"folder:\n{_task_log(stack, run_id, 'train_model', train['try_number'])[-4000:]}")
        time.sleep(0.5)
    else:
        pytest.fail(f"train_model's retry on the full scratch folder never failed:\n{stack.diagnostics()}")
    log = _task_log(stack, run_id, "train_model", 2)
    lines = re.findall(rf"error: the scratch folder {re.escape(str(scratch))} has [\d.,]+ MB free, and staging in "
                       rf"s3://\S+ needs [\d.,]+ MB .*", log)
    assert len(set(lines)) == 1, log[-4000:]  # the stage's one line (the task's error repeats its last lines)
    # Nothing was downloaded into the small disk, so nothing half-written is left in it either.
    leftovers = [p for p in scratch.rglob("*") if p.is_file()]
    assert not [p for p in leftovers
                if p.relative_to(scratch).parts[0] == OBJECTS_DIRNAME or p.name.endswith(".tmp")], leftovers
    stack.grow_scratch(GPU_HOST)
    print(f"train_model try 2 on the {SMALL_SCRATCH_MB} MB scratch: {lines[0].strip()[:300]}; "
          f"{len(leftovers)} files left in it; disk given back")
    return lines[0]


def _kill_the_default_worker_in_prepare(stack: NativeStack, run_id: str, deadline: float) -> dict:
    """`kill -9` of the default-queue worker (its task processes with it) once prepare_images runs on it, and the
    worker started again, as `restart: always` would; the scheduler fails the silent task after its heartbeat
    timeout and Airflow retries it. What attempt 1 had logged, returned."""
    while time.monotonic() < deadline:
        tis = _task_instances(stack, run_id)
        prepare = tis.get("prepare_images", {})
        if prepare.get("state") == "running" and prepare.get("hostname") == "default-worker":
            break
        if prepare.get("state") == "success":
            pytest.fail(f"prepare_images finished before the worker could be killed: {_summary(tis)}")
        if any(ti["state"] in ("failed", "up_for_retry", "upstream_failed") for ti in tis.values()):
            pytest.fail(f"DAG run {run_id} failed before the kill: {_summary(tis)}\n{stack.diagnostics()}")
        time.sleep(0.2)
    else:
        pytest.fail(f"prepare_images of {run_id} never ran:\n{stack.diagnostics()}")
    time.sleep(2)  # into the stage: its stage-in or its first images
    stack.kill("airflow-worker-default")
    killed_at = time.monotonic()
    text = _task_log(stack, run_id, "prepare_images", 1)
    time.sleep(2)
    stack.up("airflow-worker-default")
    print(f"\nkilled the default worker during prepare_images of {run_id}; its log had {len(text)} chars")
    return {"log": text, "killed_at": killed_at}


def _assert_nothing_half_published(stack: NativeStack, monkeypatch) -> int:
    """Every published folder of the home (a manifest) has every file its manifest lists, at its size: an attempt
    killed mid-publication left no folder that a reader would take as complete. The folders checked, returned."""
    from fashion_tagger.storage.publish import MANIFEST_NAME, read_manifest
    from fashion_tagger.storage.store import open_store

    for key, value in stack.store_env().items():
        monkeypatch.setenv(key, value)
    root = HOME_URL.removeprefix(f"s3://{HOME_BUCKET}/")
    objects = stack.home_objects()
    store = open_store(HOME_URL)
    manifests = [key for key in objects if key.rsplit("/", 1)[-1] == MANIFEST_NAME]
    for key in manifests:
        prefix = key.rsplit("/", 1)[0]
        for name, entry in read_manifest(store, prefix).items():
            size = objects.get(f"{prefix}/{name}")
            assert size == entry.size, f"s3://{HOME_BUCKET}/{root}/{prefix}/{name}: {size} bytes, manifest {entry}"
    assert manifests, f"no published folder in the home: {sorted(objects)[:20]}"
    return len(manifests)


def _assert_training_resumed(stack: NativeStack, run_id: str, killed: dict, tis: dict[str, dict]) -> None:
    """Airflow retried the training on the gpu worker, which resumed from the last published checkpoint: the
    second attempt's log holds only the epochs after it."""
    from fashion_tagger.core.layout import run_dir_name

    train = tis["train_model"]
    last = 3 if killed["small_scratch"] else 2  # the killed attempt, [the one on the full scratch folder,] the retry
    assert train["try_number"] == last, _summary(tis)
    assert all(ti["try_number"] == 1 for task, ti in tis.items() if task not in RETRIED), _summary(tis)
    done = killed["checkpoints"]
    assert 1 <= done < 3, killed
    retry = _task_log(stack, run_id, "train_model", last)
    assert _epochs_logged(retry) == list(range(done + 1, 4)), retry[-4000:]
    folder = re.escape(run_dir_name(run_id))
    assert re.search(rf"resuming \S*{folder}\S* from \S*last\.ckpt", retry), retry[-4000:]
    # The scratch folder was empty: the retry downloaded the training folder, its checkpoint included, from the store.
    staged = re.findall(rf"staged in \S*runs/{folder}/train: \d+ files \((\d+) downloaded", retry)
    assert staged and int(staged[0]) >= 1, retry[-4000:]


def test_dag_run_survives_a_killed_trainer_and_registers_one_champion(stack, monkeypatch, tmp_path):
    """A full DAG run: the default-queue worker is killed with SIGKILL during prepare_images and started again;
    its trainer is killed with SIGKILL after epoch 1 of 3 and the gpu worker's scratch folder emptied and made a
    16 MB filesystem (where the machine lets the test mount one), so that the first retry finds it full and fails
    with one line naming it; the folder gets its disk back. Airflow retries both tasks, training resumes from the
    checkpoint in the store, nothing half-written is published, and the run registers one version."""
    from mlflow import MlflowClient

    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    run_id = _trigger(stack, KILL_PARAMS, deadline)
    worker_killed = _kill_the_default_worker_in_prepare(stack, run_id, deadline)
    killed = _kill_the_trainer_in_epoch_2(stack, run_id, deadline)
    if killed["small_scratch"]:
        _wait_out_the_full_scratch(stack, run_id, deadline)

    state, tis = "running", {}
    # Any other failed attempt ends the test at once: waiting out the retry delays would only hide the error.
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(3)
        state = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        tis = _task_instances(stack, run_id)
        if any(ti["state"] in ("failed", "upstream_failed") or (ti["state"] == "up_for_retry" and t not in RETRIED)
               for t, ti in tis.items()):
            state = "failed"
    elapsed = time.monotonic() - started
    tis = _task_instances(stack, run_id)
    summary = _summary(tis)
    if state != "success":
        pytest.fail(f"DAG run {run_id} ended {state!r} after {elapsed:.0f}s: {summary}\n{stack.diagnostics()}")
    print(f"DAG run succeeded in {elapsed:.0f}s: {summary}")
    assert tis["prepare_images"]["try_number"] == 2, summary  # the killed worker's attempt failed, the retry ran
    print(f"prepare_images, try 2: {_xcom(stack, run_id, 'prepare_images')}")
    _assert_training_resumed(stack, run_id, killed, tis)
    print(f"{_assert_nothing_half_published(stack, monkeypatch)} published folders in the home, each complete; "
          f"the worker's prepare attempt had logged {len(worker_killed['log'])} chars")

    # Routing: training and evaluation on the gpu queue and its worker, in the gpu pool; the rest on default.
    assert tis.keys() >= GPU_TASKS | DEFAULT_TASKS
    for task_id in GPU_TASKS:
        ti = tis[task_id]
        assert (ti["queue"], ti["pool"], ti["hostname"]) == ("gpu", "gpu", "gpu-worker"), ti
    for task_id in DEFAULT_TASKS:
        ti = tis[task_id]
        assert (ti["queue"], ti["hostname"]) == ("default", "default-worker"), ti

    registered = _xcom(stack, run_id, "register_model")
    name = registered["model_name"]
    # The read-only user sees the champion the workers promoted ...
    for key, value in stack.mlflow_env(MLFLOW_READER).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(registered["version"])
    assert champion.run_id == registered["run_id"]
    assert "champion" in registered["aliases"]
    assert client.get_run(champion.run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == [champion.version], "the killed attempt registered a version too"
    _assert_read_only_user_cannot_move_the_alias(stack, name, champion.version)
    _assert_the_service_user_owns_the_pipeline(stack, name, client.get_run(champion.run_id).info.experiment_id)

    # The artifacts went through the MLflow server into the bucket: the clients never held its keys.
    objects = {obj["Key"]: obj["Size"]
               for page in stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
               for obj in page.get("Contents", [])}
    model_files = [k for k in objects if k.endswith("/MLmodel")]
    # MLflow 3 stores a logged model under <experiment>/models/<model id>/artifacts/.
    owners = {champion.run_id, getattr(champion, "model_id", None), *re.findall(r"m-[0-9a-f]{32}", champion.source)}
    mine = [k for k in model_files if any(owner and owner in k for owner in owners)]
    assert mine, f"no MLmodel of version {champion.version} ({champion.source}) in s3://{BUCKET}: {model_files}"
    prefix = mine[0].rsplit("/", 1)[0] + "/"
    weights = max((size, key) for key, size in objects.items() if key.startswith(prefix))
    assert weights[0] > 10_000, f"the model folder {prefix} holds no weights: {sorted(objects)[:40]}"
    print(f"champion {registered['model_name']} v{champion.version}: {len(objects)} objects in s3://{BUCKET}, "
          f"largest in the model folder {weights[1]} ({weights[0]} bytes)")
    _assert_nothing_of_the_run_outside_the_store(stack, run_id, tmp_path)


def _read_parquet_from_home(stack: NativeStack, key: str):
    import io

    import pandas as pd

    root = HOME_URL.removeprefix(f"s3://{HOME_BUCKET}/")
    body = stack.s3_client().get_object(Bucket=HOME_BUCKET, Key=f"{root}/{key}")["Body"].read()
    return pd.read_parquet(io.BytesIO(body))


def test_two_runs_at_once_on_a_new_dataset_fetch_and_prepare_it_once(stack, monkeypatch):
    """Two DAG runs triggered together on a dataset no run has fetched: both succeed, one fetches and the other
    reuses it, each image is prepared once, and both have the same test part (the membership record)."""
    from datetime import datetime

    from mlflow import MlflowClient

    from fashion_tagger.core.layout import run_dir_name

    for key, value in stack.mlflow_env(MLFLOW_READER).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    runs = [_trigger(stack, TWIN_PARAMS, deadline) for _ in range(2)]
    states = {}
    while time.monotonic() < deadline:
        states = {run_id: stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}")["state"] for run_id in runs}
        if all(state in ("success", "failed") for state in states.values()):
            break
        if any(ti["state"] in ("failed", "up_for_retry", "upstream_failed")
               for run_id in runs for ti in _task_instances(stack, run_id).values()):
            break
        time.sleep(3)
    elapsed = time.monotonic() - started
    tis = {run_id: _task_instances(stack, run_id) for run_id in runs}
    summaries = {run_id: _summary(tis[run_id]) for run_id in runs}
    if any(state != "success" for state in states.values()):
        pytest.fail(f"DAG runs ended {states} after {elapsed:.0f}s: {summaries}\n{stack.diagnostics()}")
    print(f"\ntwo DAG runs succeeded in {elapsed:.0f}s: {summaries}")

    # They ran at once: their fetch tasks overlapped in time (one waited on the other's lease).
    spans = [(datetime.fromisoformat(tis[r]["fetch_dataset"]["start_date"]),
              datetime.fromisoformat(tis[r]["fetch_dataset"]["end_date"])) for r in runs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"the fetches did not overlap: {spans}"

    fetched = [_xcom(stack, run_id, "fetch_dataset") for run_id in runs]
    assert sorted(f["downloaded"] for f in fetched) == [False, True], fetched
    assert fetched[0]["raw_dir"] == fetched[1]["raw_dir"] and fetched[0]["images"] == fetched[1]["images"], fetched
    prepared = [_xcom(stack, run_id, "prepare_images") for run_id in runs]
    images = {p["images"] for p in prepared}
    assert len(images) == 1, prepared
    assert sum(p["written"] for p in prepared) == images.pop(), f"an image was prepared twice: {prepared}"
    assert all(p["written"] + p["cached"] == p["images"] for p in prepared), prepared

    tests = [_read_parquet_from_home(stack, f"runs/{run_dir_name(run_id)}/split/test.parquet") for run_id in runs]
    assert len(tests[0]) > 0
    assert sorted(tests[0]["id"]) == sorted(tests[1]["id"]), "the two runs' test parts differ"

    registered = [_xcom(stack, run_id, "register_model") for run_id in runs]
    name = registered[0]["model_name"]
    for entry in registered:
        mine = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == entry["run_id"]]
        assert [v.version for v in mine] == [str(entry["version"])], (entry, mine)


def test_a_run_completes_through_service_faults_and_registers_one_version(stack, monkeypatch):
    """One DAG run through three faults of the services under it:
    - PostgreSQL (Airflow's, MLflow's and the coordination database) restarted while `validate_dataset` runs;
    - Redis (Celery's broker) restarted while `train_model` runs;
    - the MLflow server stopped as evaluation ends and started again once `register_model` is up for retry.
    Services that exit are started again, as `restart: always` does in docker-compose.yaml. The run completes;
    `register_model` retried on the transient "did not answer" error, and exactly one version is registered."""
    from mlflow import MlflowClient

    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    run_id = _trigger(stack, SMOKE_PARAMS | {"source": "synthetic:350"}, deadline)
    restarts, done, events, state, tis = {"postgres": "validate_dataset", "redis": "train_model"}, {}, [], "queued", {}

    def event(*what: object) -> None:
        events.append((round(time.monotonic() - started), *what))

    mlflow_down = mlflow_up = False
    try:
        while time.monotonic() < deadline:
            if revived := stack.revive():
                event("started again", revived)
            try:
                tis = _task_instances(stack, run_id)
                state = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}")["state"]
            except Exception as exc:  # the API server waits for its database too
                event("API", type(exc).__name__)
                time.sleep(2)
                continue
            for service, task_id in restarts.items():
                if service not in done and tis.get(task_id, {}).get("state") == "running":
                    stack.restart(service, down_s=3)
                    done[service] = task_id
                    event(f"restarted {service}", task_id)
            if not mlflow_down and tis.get("evaluate_model", {}).get("state") == "success":
                stack.down("mlflow")
                mlflow_down = True
                event("stopped mlflow")
            if mlflow_down and not mlflow_up and tis.get("register_model", {}).get("state") == "up_for_retry":
                stack.up("mlflow")
                mlflow_up = True
                event("started mlflow")
            if state in ("success", "failed") or any(ti["state"] in ("failed", "upstream_failed")
                                                     for ti in tis.values()):
                break
            time.sleep(1)
    finally:
        if not stack.service("mlflow").running():
            stack.up("mlflow")  # for the tests after this one
    summary = _summary(tis)
    if state != "success":
        pytest.fail(f"DAG run {run_id} ended {state!r}: {summary}; events {events}\n{stack.diagnostics()}")
    print(f"\nDAG run through the faults in {time.monotonic() - started:.0f}s: {summary}; events {events}")
    assert done == restarts and mlflow_up, events
    assert tis["register_model"]["try_number"] >= 2, summary
    first = _task_log(stack, run_id, "register_model", 1)
    assert re.search(r"the MLflow tracking server \S+ did not answer", first), first[-3000:]

    registered = _xcom(stack, run_id, "register_model")
    for key, value in stack.mlflow_env(MLFLOW_READER).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    mine = [v for v in client.search_model_versions(f"name='{registered['model_name']}'")
            if v.run_id == registered["run_id"]]
    assert [v.version for v in mine] == [str(registered["version"])], mine
