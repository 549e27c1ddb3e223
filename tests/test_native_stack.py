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
RUN_TIMEOUT_S = 480


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


def test_dag_run_trains_on_the_gpu_worker_and_registers_a_champion(stack, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    dag = _wait_for_dag(stack, deadline)
    if dag["is_paused"]:
        stack.api("PATCH", f"dags/{DAG_ID}", json={"is_paused": False})
    run = stack.api("POST", f"dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": SMOKE_PARAMS})
    run_id = run["dag_run_id"]

    def task_instances() -> dict[str, dict]:
        listing = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in listing}

    state, tis = run["state"], {}
    # A failed attempt ends the test at once: the smoke run needs no retry, and waiting out the retry delays
    # would only hide the error for minutes.
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(3)
        state = stack.api("GET", f"dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        tis = task_instances()
        if any(ti["state"] in ("failed", "up_for_retry", "upstream_failed") for ti in tis.values()):
            state = "failed"
    elapsed = time.monotonic() - started
    tis = task_instances()
    summary = {t: (ti["state"], ti["queue"], ti["hostname"], round(ti["duration"] or 0, 1)) for t, ti in tis.items()}
    if state != "success":
        pytest.fail(f"DAG run {run_id} ended {state!r} after {elapsed:.0f}s: {summary}\n{stack.diagnostics()}")
    print(f"\nDAG run succeeded in {elapsed:.0f}s: {summary}")

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
