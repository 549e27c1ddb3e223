"""The `fashion-tagger` command line: stages chained through the paths they print, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_tagger.core.layout import RunLayout
from fashion_tagger.runs.run import read_state


def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "fashion_tagger", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_stage_commands_take_the_run_and_chain_through_its_state(tmp_path, isolated_home):
    synth = last_json(cli("synth", tmp_path / "raw", "--rows", "300", "--seed", "3").stdout)
    assert synth["rows"] == 300 and Path(synth["out_dir"], "styles.csv").is_file()

    overrides = ["--set", f"data.source={synth['out_dir']}", "--set", "labels.min_class_count=10",
                 "--set", "images.width=24", "--set", "images.height=32"]
    created = last_json(cli("new", "--config", "demo", *overrides).stdout)
    run_id, run_root = created["run_id"], Path(created["run_root"])
    assert run_root == isolated_home.resolve() / "runs" / run_id and (run_root / "config.yaml").is_file()

    # A stage before the one it needs names what to run first.
    early = cli("split", run_id, check=False)
    assert early.returncode == 2 and "no completed validate stage" in early.stderr

    fetched = last_json(cli("fetch", run_id).stdout)
    assert fetched["raw_dir"] == str(Path(synth["out_dir"]).resolve())
    validated = last_json(cli("validate", run_id).stdout)
    assert validated["lines_read"] == validated["rows_clean"] + validated["rows_rejected"] == 300
    split = last_json(cli("split", str(run_root)).stdout)  # by folder as well as by id
    assert split["train_rows"] + split["val_rows"] + split["test_rows"] == validated["rows_clean"]
    assert split["test_rows"] > 0 and len(split["fingerprint"]) == 64

    prepared = last_json(cli("prepare", run_id).stdout)
    assert prepared["cache_root"] == str(isolated_home.resolve() / "cache")
    assert (prepared["width"], prepared["height"]) == (24, 32)
    again = last_json(cli("prepare", run_id).stdout)
    assert again["written"] == 0 and again["cached"] == prepared["images"]

    runs = json.loads(cli("runs", "--json").stdout)
    assert [(r["run_id"], r["status"], r["last_completed_stage"]) for r in runs] == [
        (run_id, "interrupted", "prepare")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["split", "nowhere"], "run 'nowhere' not found"),
        (["run", "--set", "data.source=ftp://example/data"], "ftp://example/data"),
        (["config", "--set", "train.epochs=0"], "train.epochs"),
        (["run", "--set", "data.source=kaggle:paramaggarwal/fashion-product-images-dataset"], "KAGGLE_USERNAME"),
        (["run", "--resume", "never-started"], "run 'never-started' not found"),
    ],
)
def test_bad_input_is_one_line_without_a_traceback(args, message, tmp_path, monkeypatch, isolated_home):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    proc = cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_verbose_shows_the_traceback_of_an_understood_error(isolated_home):
    proc = cli("--verbose", "split", "nowhere", check=False)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "run 'nowhere' not found" in proc.stderr


@pytest.mark.slow
def test_run_executes_every_stage_and_registers_a_champion(isolated_home):
    args = (
        "run", "--config", "demo",
        "--set", "data.source=synthetic:300",
        "--set", "labels.min_class_count=10",
        "--set", "model.backbone=test_efficientnet", "--set", "model.pretrained=false",
        "--set", "images.width=32", "--set", "images.height=40",
        "--set", "train.epochs=1", "--set", "train.progress_bar=false",
    )  # fmt: skip
    proc = cli(*args)
    result = last_json(proc.stdout)
    assert list(result["stages"]) == ["fetch", "validate", "split", "prepare", "train", "evaluate", "register"]
    assert Path(result["run_root"]).parent == isolated_home.resolve() / "runs"
    assert "champion" in result["stages"]["register"]["aliases"]
    assert "registered fashion-tagger version 1" in proc.stderr
    runs = json.loads(cli("runs", "--json").stdout)
    assert [(r["run_id"], r["status"], r["model_version"]) for r in runs] == [(result["run_id"], "complete", "1")]

    # The same data and configuration again: nothing to retrain, and a line that says so.
    again = cli(*args)
    skipped = last_json(again.stdout)
    assert skipped["skipped"] == ["train", "evaluate", "register"]
    assert list(skipped["stages"]) == ["fetch", "validate", "split", "prepare"]
    assert "skipped training, evaluation and registration: nothing changed since champion version 1" in again.stderr
    state = read_state(RunLayout(Path(skipped["run_root"])))["stages"]  # in the home's coordination database
    assert state["train"]["status"] == "skipped" and "fingerprint" in state["train"]["reason"]
    assert json.loads(cli("runs", "--json").stdout)[1]["status"] == "complete"
    # --force trains anyway.
    forced = last_json(cli(*args, "--force").stdout)
    assert forced["stages"]["train"]["epochs_completed"] == 1 and "register" in forced["stages"]
