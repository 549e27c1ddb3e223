"""The `fashion-tagger` command line: stages chained through the paths they print, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_data_stages_chain_through_the_paths_they_print(tmp_path, isolated_home):
    synth = last_json(cli("synth", tmp_path / "raw", "--rows", "300", "--seed", "3").stdout)
    assert synth["rows"] == 300 and Path(synth["out_dir"], "styles.csv").is_file()

    overrides = ["--set", "labels.min_class_count=10", "--set", "images.width=24", "--set", "images.height=32"]
    validated = last_json(cli("validate", synth["out_dir"], tmp_path / "clean", *overrides).stdout)
    assert validated["lines_read"] == validated["rows_clean"] + validated["rows_rejected"] == 300
    assert (tmp_path / "clean" / "config.yaml").is_file()

    split = last_json(cli("split", tmp_path / "clean", tmp_path / "split", *overrides).stdout)
    assert split["train_rows"] + split["val_rows"] == validated["rows_clean"]

    prepared = last_json(cli("prepare", tmp_path / "split", *overrides).stdout)
    assert prepared["cache_root"] == str(isolated_home.resolve() / "cache")
    assert (prepared["width"], prepared["height"]) == (24, 32)
    again = last_json(cli("prepare", tmp_path / "split", *overrides).stdout)
    assert again["written"] == 0 and again["cached"] == prepared["images"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["split", "nowhere", "out"], "clean.parquet does not exist"),
        (["fetch", "ftp://example/data"], "ftp://example/data"),
        (["config", "--set", "train.epochs=0"], "train.epochs"),
        (["fetch", "kaggle:paramaggarwal/fashion-product-images-dataset"], "KAGGLE_USERNAME"),
    ],
)
def test_bad_input_is_one_line_without_a_traceback(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    proc = cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_executes_every_stage_and_registers_a_champion(isolated_home):
    proc = cli(
        "run", "--config", "demo",
        "--set", "data.source=synthetic:300",
        "--set", "labels.min_class_count=10",
        "--set", "model.backbone=test_efficientnet", "--set", "model.pretrained=false",
        "--set", "images.width=32", "--set", "images.height=40",
        "--set", "train.epochs=1", "--set", "train.progress_bar=false",
    )  # fmt: skip
    result = last_json(proc.stdout)
    assert list(result["stages"]) == ["fetch", "validate", "split", "prepare", "train", "evaluate", "register"]
    assert Path(result["run_root"]).parent == isolated_home.resolve() / "runs"
    assert "champion" in result["stages"]["register"]["aliases"]
    assert "registered fashion-tagger version 1" in proc.stderr
