"""The run as the unit of work: unique ids, one owner of the layout, state and status, resume after a kill,
concurrent runs that coordinate through locks, model identity, and files other accounts can read."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fashion_tagger.core import io
from fashion_tagger.core.config import load_config
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.layout import Home, new_run_id
from fashion_tagger.runs.run import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    create_run,
    interrupted_runs_like,
    list_runs,
    open_run,
    read_state,
    run_lock,
    run_status,
)
from fashion_tagger.runs.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
# The issue's own command: the demo preset on 400 generated rows, one epoch.
DEMO_RUN = ["run", "--config", "demo", "--set", "data.source=synthetic:400", "--set", "labels.min_class_count=10",
            "--set", "train.epochs=1", "--set", "train.progress_bar=false"]


def cli(home: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_TAGGER_", "MLFLOW_"))}
    env.update(FASHION_TAGGER_HOME=str(home), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "fashion_tagger", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def model_versions(home: Path) -> list[dict]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return [{"version": v.version, **v.tags} for v in client.search_model_versions("name='fashion-tagger'")]


# --- ids, state, status, locks ---------------------------------------------------------------------------------------


def test_run_ids_are_unique_within_one_millisecond():
    ids = {new_run_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert sorted(ids)[0].startswith("cli__") and all("Z-" in i for i in ids)


def test_runs_created_at_the_same_moment_get_separate_folders(isolated_home):
    config = load_config("demo")
    created: list = []
    threads = [threading.Thread(target=lambda: created.append(create_run(config))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({run.root for run in created}) == 8
    assert all(run.layout.config.is_file() for run in created)


def test_an_orchestrator_run_id_is_reused_with_the_same_config_and_refused_with_another(isolated_home):
    config = load_config("demo")
    run = create_run(config, "manual__2025-06-01T10:20:30+00:00")
    again = create_run(config, "manual__2025-06-01T10:20:30+00:00")  # a retried first task
    assert again.root == run.root and again.config == config
    with pytest.raises(RunError, match="another configuration"):
        create_run(load_config("demo", ["train.epochs=9"]), "manual__2025-06-01T10:20:30+00:00")
    assert open_run(run.id).config == config == open_run(run.root).config


def test_status_follows_the_stages_and_the_lock(isolated_home, tmp_path):
    from fashion_tagger.data.synthetic.generator import generate_dataset

    raw = generate_dataset(tmp_path / "raw", rows=120, seed=1).out_dir
    run = create_run(load_config("demo", [f"data.source={raw}", "labels.min_class_count=5", "data.min_rows=50"]))
    assert run_status(run.layout) == INTERRUPTED  # created, nothing run
    assert interrupted_runs_like(run.config) == [run.id]  # `run` with this config says how to resume it
    assert interrupted_runs_like(load_config("demo", ["train.epochs=9"])) == []
    run_stage(run, "fetch")
    assert read_state(run.layout)["stages"]["fetch"]["status"] == "complete"

    # Another process holding the run's lease is "running", and a second executor is refused at once, naming it.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from fashion_tagger.runs.run import run_lock; "
        "from fashion_tagger.core.layout import RunLayout\n"
        "with run_lock(RunLayout(Path(sys.argv[1]))):\n print('locked', flush=True); time.sleep(60)"),
        str(run.layout.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_status(run.layout) == RUNNING
        with pytest.raises(RunError, match=rf"being run by another process \(host .*, pid {holder.pid}, since"):
            run_stage(run, "validate")
    finally:
        holder.kill()  # SIGKILL: no chance to release the lease
        holder.wait()
    # Its holder is gone from this host: free at once, not after the lease's ttl.
    assert run_status(run.layout) == INTERRUPTED

    # A stage that raises is recorded as failed, with its error, and the run shows it.
    (Path(raw) / "styles.csv").write_text("id,gender\n1,Men\n")
    with pytest.raises(Exception, match="missing columns"):
        run_stage(run, "validate")
    rows = list_runs(run.config.layout)
    assert rows[0]["status"] == FAILED and rows[0]["next_stage"] == "validate" and "missing columns" in rows[0]["error"]


def test_the_lock_is_reentrant_within_a_process(isolated_home):
    run = create_run(load_config("demo"))
    with run_lock(run.layout), run_lock(run.layout):
        assert run_status(run.layout) != RUNNING  # held by us, not by another process
    with run_lock(run.layout):
        pass


def test_a_stage_removes_what_a_killed_writer_left(isolated_home, tmp_path):
    from fashion_tagger.data.synthetic.generator import generate_dataset

    raw = generate_dataset(tmp_path / "raw", rows=120, seed=1).out_dir
    run = create_run(load_config("demo", [f"data.source={raw}", "data.min_rows=50"]))
    run_stage(run, "fetch")
    leftover = run.layout.validate.dir / ".clean.parquet.abc123.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a parquet file")
    run_stage(run, "validate")
    assert not leftover.exists() and run.layout.validate.clean.is_file()


def test_files_get_the_process_umask_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = io.write_json(tmp_path / "out.json", {"a": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(io.write_text(tmp_path / "x.txt", "x").stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_a_second_fetch_of_one_source_waits_and_reuses_the_first(tmp_path):
    """Two processes fetch the same generated dataset into one raw/: one generates, the other reuses."""
    code = ("import json, sys; from fashion_tagger.data.sources import fetch_dataset; "
            "r = fetch_dataset('synthetic:1500', sys.argv[1]); print(json.dumps({'downloaded': r.downloaded}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "raw")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1])["downloaded"])
    assert sorted(outcomes) == [False, True]
    assert not list((tmp_path / "raw").glob(".*.partial"))


# --- the whole run, as a user would ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_started_at_the_same_moment_in_a_fresh_home_both_succeed(tmp_path):
    """Fresh home: no dataset, no cache, no MLflow store. Both fetch, prepare, create the store and register."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_TAGGER_", "MLFLOW_"))}
    env.update(FASHION_TAGGER_HOME=str(home), PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "fashion_tagger", *DEMO_RUN], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        results.append(last_json(out))
    roots = {r["run_root"] for r in results}
    assert len(roots) == 2 and all(Path(r).parent == home / "runs" for r in roots)
    assert sum(r["stages"]["fetch"]["downloaded"] for r in results) == 1  # one generated the dataset
    # Exactly one model version per distinct model: identity is what the model computes. (A run that reached
    # training after the other registered the same data and config skips retraining: then it registers nothing.)
    registered = [r["stages"]["register"] for r in results if "register" in r["stages"]]
    assert registered and all(r.get("version") for r in registered)
    versions = model_versions(home)
    assert len(versions) == len({v["fashion_tagger.content_id"] for v in versions}) == len(
        {r["version"] for r in registered})
    assert [row["status"] for row in list_runs(Home(home))] == [COMPLETE, COMPLETE]


@pytest.mark.slow
def test_a_killed_run_resumes_without_retraining_finished_epochs_and_a_rerun_registers_nothing(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_TAGGER_", "MLFLOW_"))}
    env.update(FASHION_TAGGER_HOME=str(home), PYTHONUNBUFFERED="1")
    args = ["run", "--config", "demo", "--set", "data.source=synthetic:400", "--set", "labels.min_class_count=10",
            "--set", "train.epochs=5", "--set", "train.early_stopping_patience=5", "--set", "train.progress_bar=false"]
    proc = subprocess.Popen([sys.executable, "-m", "fashion_tagger", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((home / "runs").glob("*/train/metrics.json"))
        if found:
            try:
                metrics = json.loads(found[0].read_text())
            except (json.JSONDecodeError, OSError):
                metrics = None
            if metrics and metrics.get("epochs_completed", 0) >= 2:
                break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers, as the OOM killer would
    proc.wait()
    import torch

    (last,) = (home / "runs").glob("*/train/checkpoints/last.ckpt")
    checkpointed = torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1  # epochs it holds

    (row,) = list_runs(Home(home))
    assert (row["status"], row["last_completed_stage"], row["next_stage"]) == (INTERRUPTED, "prepare", "train")
    run_id = row["run_id"]

    resumed = last_json(cli(home, "run", "--resume", run_id).stdout)
    assert resumed["skipped"] == ["fetch", "validate", "split", "prepare"]
    train = resumed["stages"]["train"]
    assert train["resumed"] is True and train["epochs_completed"] == 5
    history = json.loads((home / "runs" / run_id / "train" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    # The resumed attempt logged (so trained) only the epochs after the last checkpoint.
    import pandas as pd

    logs = sorted((home / "runs" / run_id / "train" / "logs").glob("version_*/metrics.csv"))
    trained_again = set(pd.read_csv(logs[-1])["epoch"].dropna().astype(int))
    assert trained_again == set(range(checkpointed, 5)) and checkpointed >= 1
    state = read_state(open_run(run_id, Home(home)).layout)
    assert state["stages"]["train"]["attempts"] == 2
    assert [r["status"] for r in list_runs(Home(home))] == [COMPLETE]
    assert len(model_versions(home)) == 1

    # A rerun of the finished run, and registering its model again, register nothing new.
    again = cli(home, "run", "--resume", run_id)
    assert last_json(again.stdout)["skipped"] == ["fetch", "validate", "split", "prepare", "train", "evaluate",
                                                  "register"]
    registered = cli(home, "register", run_id)
    assert last_json(registered.stdout)["already_registered"] is True
    assert "already fashion-tagger version 1" in registered.stderr
    assert len(model_versions(home)) == 1


def test_a_models_identity_is_its_weights_labels_and_preprocessing_not_its_file(tmp_path):
    import torch
    from tagger_helpers import make_split, tiny_config

    from fashion_tagger.serving.predictor import Predictor
    from fashion_tagger.training.train import train_model

    result = train_model(tiny_config(epochs=1), split_dir=make_split(tmp_path), run_dir=tmp_path / "run")
    identity = Predictor.from_checkpoint(result.best_checkpoint).identity()
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["epoch"] += 7  # what differs between two runs' files of one model
    checkpoint["optimizer_states"] = []
    # Beside the run's own checkpoints, so the copies read the same calibration.json (part of what a model computes).
    folder = result.best_checkpoint.parent
    torch.save(checkpoint, folder / "copy.ckpt")
    assert (folder / "copy.ckpt").read_bytes() != result.best_checkpoint.read_bytes()
    assert Predictor.from_checkpoint(folder / "copy.ckpt").identity() == identity
    name = next(k for k in checkpoint["state_dict"] if k.startswith("model.heads."))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3
    torch.save(checkpoint, folder / "changed.ckpt")
    assert Predictor.from_checkpoint(folder / "changed.ckpt").identity() != identity
    # Other temperatures are other confidences: another model.
    torch.save(torch.load(result.best_checkpoint, map_location="cpu", weights_only=False), tmp_path / "alone.ckpt")
    assert Predictor.from_checkpoint(tmp_path / "alone.ckpt").identity() != identity  # no calibration beside it


def test_a_new_mlflow_store_keeps_the_default_experiments_artifacts_in_the_home(isolated_home, tmp_path, monkeypatch):
    from fashion_tagger.core import tracking

    monkeypatch.chdir(tmp_path)  # wherever the process runs, nothing lands in ./mlruns
    with tracking.tracking_session(load_config("demo")) as client:
        location = client.get_experiment("0").artifact_location
    assert location.startswith((isolated_home / "mlartifacts").resolve().as_uri())
    assert not (tmp_path / "mlruns").exists()
