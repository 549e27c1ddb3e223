"""End to end through Airflow: the DAG run by `dag.test()` (scripts/run_dag.py, exactly what `make run` does) on a
small generated dataset with a tiny backbone registers a version with alias champion; a second run meets the gate;
a run on unchanged data skips training unless forced."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_dag import TASK_ORDER

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "source=synthetic:300",
    "backbone=test_efficientnet",
    "image_width=32",
    "image_height=40",
    "epochs=1",
    "batch_size=32",
    "min_class_count=10",
    "pretrained=no",
]


def run_dag(home: Path, params: list[str], name: str) -> tuple[dict, str]:
    """Run scripts/run_dag.py in a fresh process: Airflow reads its settings once, at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FASHION_TAGGER_", "MLFLOW_"))}
    env.update(FASHION_TAGGER_HOME=str(home), FASHION_TAGGER_TASK_RETRIES="0")
    summary_path = home / f"{name}.json"
    cmd = [sys.executable, "scripts/run_dag.py", "--preset", "demo", "--summary-json", str(summary_path)]
    cmd += [f"--param={p}" for p in params]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert summary_path.is_file(), output[-6000:]
    return json.loads(summary_path.read_text()), output


def _mlflow_client(home: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", registry_uri=f"sqlite:///{home / 'mlflow.db'}")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict, str]:
    home = tmp_path_factory.mktemp("dag_e2e") / "home"
    home.mkdir()
    summary, output = run_dag(home, TINY, "first")
    return home, summary, output


@pytest.mark.slow
def test_dag_runs_end_to_end_and_registers_a_champion(first_run):
    home, first, output = first_run
    assert first["state"] == "success", output[-8000:]
    assert first["tasks"] == dict.fromkeys(TASK_ORDER, "success")
    results = first["results"]

    # Every task handed on a small JSON summary of paths, counts and metrics, all under one run folder.
    run_root = Path(results["fetch_dataset"]["run_root"])
    assert run_root.parent == home / "runs"
    assert {r["run_root"] for r in results.values()} == {str(run_root)}
    assert len(json.dumps(results)) < 64_000
    assert (run_root / "config.yaml").is_file()
    assert (run_root / "validate" / "clean.parquet").is_file()
    assert (run_root / "split" / "labels.json").is_file()
    assert (run_root / "train" / "checkpoints" / "last.ckpt").is_file()
    assert (run_root / "train" / "eval" / "metrics.json").is_file()
    assert results["validate_dataset"]["rows_clean"] >= 250
    assert results["prepare_images"]["failed"] == 0
    assert results["train_model"]["epochs_completed"] == 1

    registered = results["register_model"]
    assert registered["version"] == "1"
    assert "champion" in registered["aliases"]
    assert f"registered {registered['model_name']} version 1" in output  # make run's closing report
    assert "make up" in output
    client = _mlflow_client(home)
    assert str(client.get_model_version_by_alias(registered["model_name"], "champion").version) == "1"


@pytest.mark.slow
def test_a_second_run_reuses_the_caches_and_meets_the_gate(first_run):
    home, first, _ = first_run
    assert first["state"] == "success"
    # A bar it cannot clear: a new version, the decision recorded on it, the champion kept.
    second, output = run_dag(home, [*TINY, "epochs=2", "min_delta=1.0"], "second")
    assert second["state"] == "success", output[-8000:]
    results = second["results"]
    assert results["fetch_dataset"]["run_root"] != first["results"]["fetch_dataset"]["run_root"]
    assert results["fetch_dataset"]["downloaded"] is False  # the raw dataset is reused ...
    assert results["prepare_images"]["written"] == 0  # ... and so are the prepared images
    gated = results["register_model"]
    assert gated["version"] == "2"
    assert gated["decision"] == "rejected"
    assert "min_delta" in gated["reason"]
    assert "champion" not in gated["aliases"]
    client = _mlflow_client(home)
    assert str(client.get_model_version_by_alias(gated["model_name"], "champion").version) == "1"
    assert client.get_model_version(gated["model_name"], "2").tags["gate.decision"] == "rejected"


@pytest.mark.slow
def test_unchanged_data_skips_training_and_force_trains(first_run):
    """Retrain only when something changed: the first run's parameters again match the champion's fingerprint."""
    home, first, _ = first_run
    assert first["state"] == "success"
    unchanged, output = run_dag(home, TINY, "unchanged")
    assert unchanged["state"] == "success", output[-8000:]
    assert unchanged["tasks"] == {**dict.fromkeys(TASK_ORDER[:4], "success"),
                                  **dict.fromkeys(["train_model", "evaluate_model", "register_model"], "skipped")}
    assert "nothing changed since champion version 1" in output
    run_root = Path(unchanged["results"]["fetch_dataset"]["run_root"])
    from fashion_tagger.core.layout import RunLayout
    from fashion_tagger.runs.run import read_state

    state = read_state(RunLayout(run_root))["stages"]  # in the home's coordination database
    assert [state[s]["status"] for s in ("train", "evaluate", "register")] == ["skipped"] * 3

    forced, output = run_dag(home, [*TINY, "force=yes"], "forced")
    assert forced["state"] == "success", output[-8000:]
    assert forced["tasks"] == dict.fromkeys(TASK_ORDER, "success")
    assert forced["results"]["train_model"]["epochs_completed"] == 1


@pytest.mark.slow
def test_several_training_processes_start_through_torchrun(first_run, tmp_path, caplog):
    """The multi-GPU launch (FASHION_TAGGER_TRAIN_GPUS > 1), here as two CPU ranks over gloo."""
    from fashion_tagger.core.config import load_config
    from fashion_tagger.core.parallel import device_processes
    from fashion_tagger.orchestration import child
    from fashion_tagger.runs.run import create_run
    from fashion_tagger.runs.stages import run_stage

    home, first, _ = first_run
    run_root = Path(first["results"]["fetch_dataset"]["run_root"])
    overrides = [f"home={home}", 'train.devices="2"', "train.accelerator=cpu", "train.num_workers=0"]
    run = create_run(load_config(run_root / "config.yaml", overrides))
    for stage in ("fetch", "validate", "split", "prepare"):
        run_stage(run, stage)  # the dataset and the prepared images are reused from the first run
    nproc = device_processes(run.config.train.devices)
    assert "torch.distributed.run" in child.stage_command("train", run.root, nproc=nproc)
    with caplog.at_level(logging.INFO, logger="fashion_tagger.train"):  # the child's output: fashion_tagger.<stage>
        result = child.run_stage_process("train", run.root, nproc=nproc)
    assert result["epochs_completed"] == 1
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "GLOBAL_RANK: 1" in log and "Starting with 2 processes" in log
    # Rank 0 alone recorded the stage in the run's state.
    from fashion_tagger.runs.run import read_state

    assert read_state(run.layout)["stages"]["train"]["status"] == "complete"
