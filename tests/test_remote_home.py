"""A home in an object store (moto's S3 server on loopback) with coordination in a database: every stage runs as if
on another machine, with a scratch folder of its own and emptied, and finds what the stages before it published."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from moto_server import MOTO_ENV, moto_s3_server

from fashion_tagger.core.config import load_config
from fashion_tagger.core.errors import ConfigError, RunError
from fashion_tagger.runs.run import create_run, list_runs, open_run, read_state
from fashion_tagger.runs.stage_registry import stage_names
from fashion_tagger.runs.stages import run_stage
from fashion_tagger.storage.publish import is_published
from fashion_tagger.storage.store import open_store
from fashion_tagger.workspace.workspace import close_workspaces

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def remote_home(s3_endpoint, tmp_path, monkeypatch) -> str:
    for name, value in {**MOTO_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    bucket = f"home-{uuid.uuid4().hex[:12]}"
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/ft"
    monkeypatch.setenv("FASHION_TAGGER_HOME", url)
    monkeypatch.setenv("FASHION_TAGGER_DATABASE_URL", f"sqlite:///{tmp_path / 'coordination.db'}")
    return url


def _new_machine(tmp_path, monkeypatch, name: str) -> None:
    """As if the next step ran on another machine: a scratch folder of its own, empty, and no open workspace."""
    close_workspaces()
    scratch = tmp_path / f"scratch-{name}"
    shutil.rmtree(scratch, ignore_errors=True)
    monkeypatch.setenv("FASHION_TAGGER_SCRATCH", str(scratch))


def test_a_remote_home_needs_the_database_url(remote_home, monkeypatch):
    monkeypatch.delenv("FASHION_TAGGER_DATABASE_URL")
    with pytest.raises(ConfigError, match="FASHION_TAGGER_DATABASE_URL is not set, and the home is an object-store"):
        create_run(load_config("demo"))


def test_every_stage_on_another_machine_finds_what_the_others_published(remote_home, tmp_path, monkeypatch):
    from fashion_tagger.data.synthetic.generator import generate_dataset

    raw = generate_dataset(tmp_path / "raw", rows=160, seed=3).out_dir
    overrides = [f"data.source={raw}", "labels.min_class_count=5", "data.min_rows=50", "train.epochs=1",
                 "train.progress_bar=false"]
    _new_machine(tmp_path, monkeypatch, "create")
    run_id = create_run(load_config("demo", overrides)).id
    machines = {}
    for number, stage in enumerate(stage_names()[:-1]):  # register needs a tracking server: the stack test's part
        _new_machine(tmp_path, monkeypatch, f"{number}-{stage}")
        run = open_run(run_id)
        assert run.layout.root.is_relative_to(tmp_path / f"scratch-{number}-{stage}")
        machines[stage] = run_stage(run, stage)
    assert machines["train"]["epochs_completed"] == 1
    assert all(result.get("staging_seconds", 0) >= 0 for result in machines.values())

    store = open_store(remote_home)
    prefix = f"runs/{run_id}"
    for folder in ("validate", "split", "train"):
        assert is_published(store, f"{prefix}/{folder}"), folder
    assert store.exists(f"{prefix}/train/checkpoints/last.ckpt")
    assert store.exists(f"{prefix}/train/eval/metrics.json")
    assert store.exists(f"{prefix}/config.yaml")
    batches = [k for k in store.list("cache") if k.endswith("/shards.json")]
    assert len(batches) == 1  # the prepared images travel as one batch of shards, not one object each

    # From a machine with an empty scratch folder: the run, its state and its status, from the store and database.
    _new_machine(tmp_path, monkeypatch, "reader")
    rows = list_runs(load_config(None).layout)
    assert [(r["run_id"], r["last_completed_stage"]) for r in rows] == [(run_id, "evaluate")]
    assert rows[0]["root"] == store.url(prefix)
    state = read_state(open_run(run_id).layout)["stages"]
    # A task hands the next one the run's location: its URL, or (recorded before) its folder on another machine.
    first = tmp_path / "scratch-create"
    other_copy = next(first.glob("homes/*/runs")) / run_id
    for ref in (rows[0]["root"], str(other_copy), f"{other_copy}/"):
        run = open_run(ref)
        assert (run.id, run.location) == (run_id, store.url(prefix)), ref
        assert run.root.is_relative_to(tmp_path / "scratch-reader") and run.layout.config.is_file(), ref
    for bad in (f"{remote_home}/runs/", f"{remote_home}/runs/{run_id}/train", str(tmp_path / "elsewhere" / run_id)):
        with pytest.raises(RunError, match="is not a run of the home"):
            open_run(bad)
    assert [state[s]["status"] for s in stage_names()[:-1]] == ["complete"] * (len(stage_names()) - 1)

    # A second run of the same data prepares nothing again: its images are in the published batch.
    _new_machine(tmp_path, monkeypatch, "second")
    second = create_run(load_config("demo", overrides))
    for stage in ("fetch", "validate", "split", "prepare"):
        _new_machine(tmp_path, monkeypatch, f"second-{stage}")
        result = run_stage(open_run(second.id), stage)
    assert result["written"] == 0 and result["cached"] == result["images"]
    assert len([k for k in store.list("cache") if k.endswith("/shards.json")]) == 1


def test_offline_weights_written_on_one_machine_are_found_by_name_on_another(remote_home, tmp_path, monkeypatch,
                                                                             caplog):
    import hashlib
    import logging

    from fashion_tagger.model.weights import WeightsError, resolve_pretrained_path, write_weights

    name = "tf_efficientnet_lite0.imagenet.safetensors"
    _new_machine(tmp_path, monkeypatch, "connected")
    written = write_weights("imagenet-lite0", load_config(None).layout)
    assert written.pretrained_path == f"weights:{name}" and written.created
    store = open_store(remote_home)
    assert store.exists(f"weights/{name}")
    digest = hashlib.sha256(written.path.read_bytes()).hexdigest()

    _new_machine(tmp_path, monkeypatch, "air-gapped")
    config = load_config("demo", [f"model.pretrained_path=weights:{name}"])
    path = resolve_pretrained_path(config.model.pretrained_path, config.model.backbone, config.layout)
    assert path.startswith(str(tmp_path / "scratch-air-gapped"))
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest

    _new_machine(tmp_path, monkeypatch, "worker")  # the named source is fetched, not converted again
    with caplog.at_level(logging.INFO, logger="fashion_tagger.model.weights"):
        path = resolve_pretrained_path("imagenet-lite0", "tf_efficientnet_lite0", load_config(None).layout)
    assert "converting" not in caplog.text and hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest

    with pytest.raises(WeightsError, match="model.pretrained_path weights:nope.safetensors: nope.safetensors is not "
                                           "in the home's weights .*`fashion-tagger weights TIMM_NAME`"):
        resolve_pretrained_path("weights:nope.safetensors", "efficientnet_b3", load_config(None).layout)
    with pytest.raises(ConfigError, match="give weights:<file name> of a file in the home's weights/ folder"):
        load_config("demo", ["model.pretrained_path=weights:../etc/passwd"])
