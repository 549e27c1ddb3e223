"""Structural tests of the Airflow DAG: it imports cleanly and quickly, and its tasks, parameters, retries, docs and
GPU routing are what the UI, the scheduler and the Celery workers rely on. No metadata database is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from fashion_tagger.core.config_sources import preset_names
from fashion_tagger.orchestration import form as orchestration

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
DAG_FILE = DAGS / "fashion_tagger_training.py"
DAG_ID = "fashion_tagger_training"
TASK_ORDER = [
    "fetch_dataset",
    "validate_dataset",
    "build_splits",
    "prepare_images",
    "train_model",
    "evaluate_model",
    "register_model",
]
GPU_TASKS = {"train_model", "evaluate_model"}
HEAVY_MODULES = ("torch", "torchvision", "timm", "lightning", "mlflow", "pandas", "sklearn")
DAG_ENV = (
    "FASHION_TAGGER_SCHEDULE",
    "FASHION_TAGGER_GPU_QUEUE",
    "FASHION_TAGGER_GPU_POOL",
    "FASHION_TAGGER_TRAIN_GPUS",
    "FASHION_TAGGER_TASK_RETRIES",
    "FASHION_TAGGER_TRAIN_TIMEOUT_HOURS",
    "FASHION_TAGGER_PRESET",
)


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name in DAG_ENV:
            mp.delenv(name, raising=False)
        # Only takes effect when this session has not imported Airflow yet; nothing here touches the database.
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        from airflow.dag_processing.dagbag import BundleDagBag

        # As the DAG processor loads a bundle: its folder on sys.path, for the DAGs' shared module.
        return BundleDagBag(str(DAGS), bundle_path=DAGS)


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags[DAG_ID]


def test_dag_folder_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dags) == ["fashion_tagger_tagging", DAG_ID]  # the tagging DAG: tests/test_tagging.py
    # The shared module is imported by both DAGs, never parsed as a DAG file itself (dags/.airflowignore).
    assert sorted(Path(stat.file).name for stat in dagbag.dagbag_stats) == [
        "fashion_tagger_tagging.py", "fashion_tagger_training.py"]


PARSE_PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from airflow.dag_processing.dagbag import BundleDagBag  # loaded already in a DAG processor; not what we measure

    started = time.perf_counter()
    bag = BundleDagBag(sys.argv[1], bundle_path=os.path.dirname(sys.argv[1]))
    seconds = time.perf_counter() - started
    dag = bag.dags.get("fashion_tagger_training")
    train = dag.task_dict["train_model"] if dag else None
    print(json.dumps({
        "seconds": seconds,
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "heavy": [m for m in sys.argv[2].split(",") if m in sys.modules],
        "schedule": dag.schedule if dag else None,
        "queue": train.queue if dag else None,
        "pool": train.pool if dag else None,
        "pool_slots": train.pool_slots if dag else None,
        "retries": train.retries if dag else None,
    }))
    """
)


def _parse_in_fresh_process(tmp_path, **env: str) -> dict:
    child_env = {k: v for k, v in os.environ.items() if k not in DAG_ENV}
    child_env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        # A database that cannot exist: parsing must not need one.
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path}/missing/dir/airflow.db",
        **env,
    )
    result = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(DAG_FILE), ",".join(HEAVY_MODULES)],
        capture_output=True, text=True, env=child_env, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_parsing_is_fast_needs_no_database_and_imports_no_ml_library(tmp_path):
    probe = _parse_in_fresh_process(tmp_path)
    assert probe["errors"] == {}
    assert probe["heavy"] == [], f"parsing the DAG imported {probe['heavy']}"
    assert probe["seconds"] < 2.0, f"parsing took {probe['seconds']:.2f} s"
    assert (probe["schedule"], probe["queue"], probe["pool"], probe["pool_slots"]) == ("@weekly", "gpu", "gpu", 1)


def test_routing_and_schedule_follow_the_environment(tmp_path):
    probe = _parse_in_fresh_process(
        tmp_path,
        FASHION_TAGGER_SCHEDULE="@daily",
        FASHION_TAGGER_GPU_QUEUE="cuda",
        FASHION_TAGGER_GPU_POOL="a100",
        FASHION_TAGGER_TRAIN_GPUS="2",
        FASHION_TAGGER_TASK_RETRIES="5",
    )
    assert (probe["schedule"], probe["queue"], probe["pool"], probe["pool_slots"]) == ("@daily", "cuda", "a100", 2)
    assert probe["retries"] == 5


@pytest.fixture(scope="module")
def dag_module(dag):
    """The module DagBag loaded the DAG file as, for its helpers and assets."""
    return sys.modules[dag.task_dict["fetch_dataset"].python_callable.__module__]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "@weekly"), ("@daily", "@daily"), ("0 3 * * 1", "0 3 * * 1"), ("none", None), ("", None), ("None", None)],
)
def test_schedule_setting(value, expected):
    from fashion_tagger.orchestration.dag_support import parse_schedule

    assert parse_schedule(value, "@weekly") == expected


def test_tasks_run_in_order(dag):
    assert [t.task_id for t in dag.topological_sort()] == TASK_ORDER
    for previous, current in zip(TASK_ORDER, TASK_ORDER[1:], strict=False):
        assert dag.task_dict[current].upstream_task_ids == {previous}


def test_scheduling(dag):
    assert dag.schedule == "@weekly"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.start_date is not None and dag.start_date.tzinfo is not None
    assert {"fashion-tagger", "training"} <= set(dag.tags)


def test_retries_with_exponential_backoff(dag):
    args = dag.default_args
    assert args["retries"] >= 1
    assert args["retry_exponential_backoff"] > 1
    assert args["retry_delay"] <= args["max_retry_delay"]
    for task in dag.tasks:
        assert task.retries == args["retries"], task.task_id
        assert task.retry_exponential_backoff == args["retry_exponential_backoff"], task.task_id


def test_gpu_tasks_are_routed_and_bounded(dag):
    for task_id in GPU_TASKS:
        task = dag.task_dict[task_id]
        assert (task.queue, task.pool) == ("gpu", "gpu"), task_id
        assert isinstance(task.execution_timeout, timedelta) and task.execution_timeout > timedelta(0), task_id
    assert dag.task_dict["train_model"].execution_timeout >= timedelta(hours=1)
    for task in dag.tasks:
        if task.task_id not in GPU_TASKS:
            assert task.queue == "default", task.task_id
            assert task.pool == "default_pool", task.task_id


def test_assets_mark_the_raw_dataset_and_the_model(dag):
    def outlet_names(task_id):
        return [asset.name for asset in dag.task_dict[task_id].outlets]

    assert outlet_names("fetch_dataset") == ["fashion_tagger_raw_dataset"]
    assert outlet_names("register_model") == ["fashion_tagger_model"]
    assert all(not dag.task_dict[t].outlets for t in TASK_ORDER[1:-1])


def test_dag_and_tasks_are_documented(dag):
    assert "Retrain the fashion product tagger" in dag.doc_md
    for name in ("runs/", "gpu", "champion"):
        assert name in dag.doc_md
    for task in dag.tasks:
        assert task.doc_md and len(task.doc_md.split()) >= 10, task.task_id


# --- parameters: the UI trigger form ---------------------------------------------------------------------------------

EXPECTED_TYPES = {
    "preset": "string",
    "source": ["null", "string"],
    "max_rows": ["null", "integer"],
    "min_class_count": ["null", "integer"],
    "backbone": ["null", "string"],
    "pretrained": "string",
    "image_width": ["null", "integer"],
    "image_height": ["null", "integer"],
    "epochs": ["null", "integer"],
    "batch_size": ["null", "integer"],
    "learning_rate": ["null", "number"],
    "force": "string",
    "promote": "string",
    "min_delta": ["null", "number"],
}


def _param(dag, name):
    return dag.params.get_param(name)


def test_params_are_typed_titled_and_described(dag):
    assert set(dag.params) == set(EXPECTED_TYPES) == {"preset", *orchestration.PARAM_CONFIG_KEYS}
    for name, expected_type in EXPECTED_TYPES.items():
        param = _param(dag, name)
        assert param.schema["type"] == expected_type, name
        assert param.schema.get("title"), name
        assert param.description and len(param.description) > 15, name
        assert param.schema.get("section"), name


def test_enums_and_bounds(dag):
    assert _param(dag, "preset").schema["enum"] == preset_names()
    assert set(_param(dag, "preset").schema["values_display"]) == set(preset_names())
    # The DAG shows exactly the form generated from the config schema, nothing restated by hand.
    for name, spec in orchestration.form_params().items():
        assert {k: v for k, v in _param(dag, name).schema.items() if k in spec} == {
            k: v for k, v in spec.items() if k not in ("default", "description")}, name
    bounded = {"max_rows", "min_class_count", "image_width", "image_height", "epochs", "batch_size", "min_delta"}
    for name in bounded:
        assert "minimum" in _param(dag, name).schema, name
    assert _param(dag, "learning_rate").schema["exclusiveMinimum"] == 0
    assert (_param(dag, "image_width").schema["minimum"], _param(dag, "image_width").schema["maximum"]) == (16, 2048)
    assert "pattern" in _param(dag, "source").schema and _param(dag, "source").schema["examples"]


def test_defaults_validate_and_build_a_config(dag, monkeypatch):
    resolved = dag.params.validate()
    assert resolved["preset"] == "default"
    assert resolved["source"] == orchestration.default_source("default") or resolved["source"].startswith(
        ("synthetic:", "kaggle:")
    )
    config = orchestration.config_from_params(resolved)
    assert config.model.backbone == "efficientnet_b3"


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPES))
def test_every_value_the_form_accepts_at_its_bounds_builds_a_config(dag, name):
    schema = _param(dag, name).schema
    values = [schema[k] for k in ("minimum", "maximum") if k in schema]
    if "exclusiveMinimum" in schema:
        values.append(schema["exclusiveMinimum"] + 1e-6)
    values += [v for v in schema.get("examples", []) if name == "source"]
    values += [v for v in schema.get("enum", []) if v is not None]
    for value in values:
        _param(dag, name).resolve(value)  # the form accepts it ...
        orchestration.config_from_params({"preset": "demo", name: value})  # ... and so does the configuration


@pytest.mark.parametrize(
    ("name", "value"),
    [("epochs", 0), ("image_width", 4), ("learning_rate", 0), ("preset", "huge"), ("source", "ftp://x"),
     ("max_rows", 0), ("pretrained", True), ("pretrained", "maybe"), ("batch_size", 1.5)],
)
def test_the_form_rejects_out_of_range_values(dag, name, value):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        _param(dag, name).resolve(value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"preset": "demo", "epochs": 0}, "epochs (train.epochs)"),
        ({"preset": "demo", "epoch": 3}, "unknown parameter(s) epoch"),
    ],
)
def test_bad_params_fail_the_first_task_without_retry(dag, params, message):
    """Values that bypass the form (REST conf, typos) fail fetch_dataset with the field named, and no retry."""
    from airflow.sdk.exceptions import AirflowFailException

    fetch = dag.task_dict["fetch_dataset"].python_callable
    with pytest.raises(AirflowFailException) as excinfo:
        fetch(params=params, run_id="manual__2025-01-01T00:00:00+00:00", outlet_events={})
    assert message in str(excinfo.value)


def test_transient_faults_are_raised_for_airflow_to_retry(dag_module):
    """The DAG's side of the error contract: bad input fails now, a transient fault or a crash is retried."""
    from airflow.sdk.exceptions import AirflowFailException

    from fashion_tagger.core.errors import DataError, ModelUnavailableError, SourceUnavailableError
    from fashion_tagger.orchestration.child import StageProcessError

    for bad in (DataError("bad"), StageProcessError("child said bad input", returncode=2)):
        with pytest.raises(AirflowFailException), dag_module.errors_follow_the_contract():
            raise bad
    for transient in (SourceUnavailableError("net"), ModelUnavailableError("hub"),
                      StageProcessError("killed", returncode=-9), StageProcessError("crash", returncode=1)):
        with pytest.raises(type(transient)), dag_module.errors_follow_the_contract():
            raise transient
