"""Airflow as its users run it: api-server, scheduler and dag-processor on loopback (SQLite, LocalExecutor, this
repo's dags/), a login through the simple auth manager, and the DAG triggered through REST API v2 with the
parameters the UI form sends, until the run succeeds. Every process started here is stopped, also on failure."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from process_sessions import session_members

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "fashion_tagger_training"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
USER, PASSWORD = "trainer", secrets.token_urlsafe(12)
RUN_TIMEOUT_S = 300
FORM = {  # what the trigger form sends: typed values, empty fields as null
    "preset": "demo",
    "source": "synthetic:300",
    "max_rows": None,
    "min_class_count": 10,
    "backbone": "test_efficientnet",
    "pretrained": "no",
    "image_width": 32,
    "image_height": 40,
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": None,
    "promote": "yes",
    "min_delta": 0.0,
    "force": "keep",
}


def _load_airflow_env():
    spec = importlib.util.spec_from_file_location("airflow_env", REPO / "scripts" / "airflow_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Api:
    """A minimal REST API v2 client (stdlib only) holding the JWT of one user."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.token: str | None = None

    def request(self, method: str, path: str, body: Any = None, *, expect: tuple[int, ...] = (200,)) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        if status not in expect:
            raise AssertionError(f"{method} {path} -> {status}: {text[:2000]}")
        return json.loads(text) if text else None

    def login(self, username: str, password: str) -> None:
        self.token = self.request("POST", "/auth/token", {"username": username, "password": password},
                                  expect=(200, 201))["access_token"]


def wait_for(what: str, probe, timeout_s: float, interval_s: float = 2.0, logs: Path | None = None):
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if (value := probe()) is not None:
                return value
        except (OSError, AssertionError) as exc:
            last_error = exc
        time.sleep(interval_s)
    tail = ""
    if logs is not None:
        tail = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})\n{tail}")


@contextmanager
def airflow_processes(env: dict[str, str], log_dir: Path):
    """Start api-server, scheduler and dag-processor, each in a session of its own, and end every process of those
    sessions on exit: task runners put themselves in process groups of their own but stay in the session."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for component in ("api-server", "scheduler", "dag-processor"):
            with open(log_dir / f"{component}.log", "w") as log:
                procs.append(subprocess.Popen([AIRFLOW, component], env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            _signal_session(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in procs:
            _signal_session(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _signal_session(session_id: int, sig: int) -> None:
    for pid in session_members(session_id):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@pytest.fixture
def airflow(isolated_home, tmp_path):
    """A running Airflow on a free loopback port with a known admin user; yields a logged-in API client."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FASHION_TAGGER_", "MLFLOW_"))}
    env.update(_load_airflow_env().airflow_env(isolated_home, port=port, host="127.0.0.1"))
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}))
    env.update(
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),  # shared by every component started here
        AIRFLOW__API__WORKERS="1",
        FASHION_TAGGER_SCHEDULE="none",  # only the run this test triggers
        FASHION_TAGGER_TASK_RETRIES="0",
    )
    result = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"airflow db migrate: {result.stdout[-2000:]}{result.stderr[-3000:]}"

    logs = tmp_path / "logs"
    with airflow_processes(env, logs) as procs:
        api = Api(f"http://127.0.0.1:{port}")
        wait_for("the api-server", lambda: api.request("GET", "/api/v2/monitor/health"), 180, logs=logs)
        api.login(USER, PASSWORD)
        # GPU tasks wait for a slot in pool `gpu`: one per GPU (the CLI equivalent: airflow pools set gpu 1 ...).
        api.request("POST", "/api/v2/pools", {"name": "gpu", "slots": 1, "description": "one slot per GPU"},
                    expect=(200, 201))
        api.logs = logs
        yield api
    left = {proc.args[1]: session_members(proc.pid) for proc in procs}
    assert not any(left.values()), f"processes left running: {left}"


@pytest.mark.slow
def test_trigger_through_the_rest_api_with_form_params_and_wait_for_success(airflow):
    api = airflow

    def parsed():
        body = api.request("GET", f"/api/v2/dags/{DAG_ID}", expect=(200, 404))
        return body if body.get("dag_id") == DAG_ID else None

    dag = wait_for("the DAG to be parsed", parsed, 180, logs=api.logs)
    assert dag["is_paused"] is True  # new DAGs start paused
    assert api.request("GET", "/api/v2/importErrors")["total_entries"] == 0

    # What the trigger form is built from.
    details = api.request("GET", f"/api/v2/dags/{DAG_ID}/details")
    form = details["params"]
    assert set(FORM) == set(form)
    assert form["epochs"]["schema"]["minimum"] == 1 and form["preset"]["schema"]["enum"] == ["default", "demo"]
    assert form["learning_rate"]["description"]
    assert details["max_active_runs"] == 1 and details["catchup"] is False

    # Out-of-range values are refused at trigger time, before anything runs.
    api.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {**FORM, "epochs": 0}},
                expect=(400,))

    api.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    run = api.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                      {"logical_date": None, "conf": FORM, "note": "triggered by tests/test_airflow_api.py"})
    run_id = run["dag_run_id"]
    run_path = f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def finished():
        state = api.request("GET", run_path)["state"]
        return state if state in ("success", "failed") else None

    state = wait_for("the DAG run to finish", finished, RUN_TIMEOUT_S, interval_s=5, logs=api.logs)
    tis = {ti["task_id"]: ti for ti in api.request("GET", f"{run_path}/taskInstances")["task_instances"]}
    if state != "success":
        failed = [t for t, ti in tis.items() if ti["state"] == "failed"]
        log = api.request("GET", f"{run_path}/taskInstances/{failed[0]}/logs/1?full_content=true") if failed else {}
        pytest.fail(f"DAG run {state}; failed tasks {failed}:\n{json.dumps(log)[-6000:]}")
    assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(tis, "success") and len(tis) == 7
    assert (tis["train_model"]["queue"], tis["train_model"]["pool"]) == ("gpu", "gpu")

    # The trainer's own output is part of the task log, line by line.
    train_log = json.dumps(api.request("GET", f"{run_path}/taskInstances/train_model/logs/1?full_content=true"))
    assert "-m fashion_tagger train" in train_log
    assert "best_checkpoint" in train_log

    xcom = api.request("GET", f"{run_path}/taskInstances/register_model/xcomEntries/return_value?deserialize=true")
    registered = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    assert registered["version"] == "1" and "champion" in registered["aliases"]

    events = api.request("GET", f"/api/v2/assets/events?source_dag_id={DAG_ID}&source_run_id="
                                f"{urllib.parse.quote(run_id, safe='')}")["asset_events"]
    assert {e["source_task_id"] for e in events} == {"fetch_dataset", "register_model"}
