"""Adding a stage is one declaration: a stage registered with `@register_stage` is in the run order, the run's
state, `fashion-tagger --help` and the training DAG's tasks, with nothing else edited."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fashion_tagger.core.config import load_config
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.io import StageResult
from fashion_tagger.runs import stage_registry
from fashion_tagger.runs.pipeline import run_all
from fashion_tagger.runs.run import (
    COMPLETE,
    INTERRUPTED,
    STAGE_COMPLETE,
    create_run,
    list_runs,
    read_state,
    record_stage,
    run_status,
)
from fashion_tagger.runs.stage_registry import get_stage, register_stage, stage_names
from fashion_tagger.runs.stages import retrain_stages

DAGS = Path(__file__).resolve().parents[1] / "dags"
BUILT_IN = ("fetch", "validate", "split", "prepare", "train", "evaluate", "register")


@dataclass
class Published(StageResult):
    published: str


@pytest.fixture
def publish_stage(monkeypatch):
    """A no-op stage `publish` after `register`, declared the way stages.py declares its own; removed afterwards."""
    monkeypatch.setattr(stage_registry, "_registry", dict(stage_registry._registry))

    @register_stage(summary="Publish the registered model to the catalog team (a test stage that does nothing)",
                    output=lambda layout: layout.train.dir, task_id="publish_model")
    def publish(run) -> Published:
        return Published(published=run.id)

    yield get_stage("publish")
    monkeypatch.undo()
    if "fashion_tagger.cli" in sys.modules:  # rebuilt without the stage, for the tests after this one
        importlib.reload(sys.modules["fashion_tagger.cli"])


def test_the_built_in_stages_in_their_order():
    assert stage_names() == BUILT_IN
    assert retrain_stages() == ("train", "evaluate", "register")
    assert get_stage("train").airflow_task_id == "train_model" and get_stage("train").gpu
    with pytest.raises(RunError, match="unknown stage 'trian': the stages are fetch, validate"):
        get_stage("trian")


def test_a_stage_name_is_declared_once(publish_stage):
    with pytest.raises(RunError, match="stage 'publish' is declared twice"):
        register_stage(summary="again")(publish_stage.function)


def test_a_registered_stage_is_in_the_run_order_and_the_runs_state(publish_stage, isolated_home):
    assert stage_names() == (*BUILT_IN, "publish")
    assert retrain_stages()[-1] == "publish"  # skipped with train, as Airflow skips the tasks after train_model

    run = create_run(load_config("demo"))
    for name in BUILT_IN:  # as if they had run: this test is about the new stage
        record_stage(run.layout, name, STAGE_COMPLETE, result={"model_name": "m", "version": "1",
                                                             "decision": "promoted", "reason": "r"})
    assert run_status(run.layout) == INTERRUPTED  # the new stage is part of every run now
    assert list_runs(run.config.layout)[0]["next_stage"] == "publish"

    result = run_all(run)
    assert result.skipped == list(BUILT_IN) and result.stages["publish"] == {"published": run.id}
    entry = read_state(run.layout)["stages"]["publish"]
    assert (entry["status"], entry["result"]) == (STAGE_COMPLETE, {"published": run.id})
    assert run_status(run.layout) == COMPLETE


def test_a_registered_stage_is_a_cli_command_and_in_runs_help(publish_stage):
    import fashion_tagger.cli

    cli = importlib.reload(fashion_tagger.cli)  # the CLI is built from the registry when it is imported
    runner = CliRunner()
    help_text = runner.invoke(cli.app, ["--help"], terminal_width=200).output
    assert "publish" in help_text and "Publish the registered model to the catalog team" in help_text
    assert "register, publish" in runner.invoke(cli.app, ["run", "--help"], terminal_width=200).output
    assert "RUN" in runner.invoke(cli.app, ["publish", "--help"]).output


def test_a_registered_stage_is_a_task_of_the_training_dag(publish_stage, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))  # only if this session has not imported Airflow
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(str(DAGS / "fashion_tagger_training.py"), bundle_path=DAGS)  # parsed now, after registering
    assert bag.import_errors == {}
    dag = bag.dags["fashion_tagger_training"]
    order = [task.task_id for task in dag.topological_sort()]
    assert order[-2:] == ["register_model", "publish_model"]
    publish = dag.task_dict["publish_model"]
    assert publish.upstream_task_ids == {"register_model"}
    assert (publish.queue, publish.doc_md) == ("default", f"{publish_stage.summary}.")
    assert "`register_model` → `publish_model`" in dag.doc_md
