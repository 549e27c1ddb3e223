"""Airflow DAG `fashion_tagger_training`: retrain, evaluate and register the fashion product tagger.

One task per stage of the run, in the order of the stage registry (`fashion_tagger.runs.stage_registry`); each
calls its stage with the run's folder and hands the next task a small JSON summary. See docs/dag.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import Param, dag, task
from airflow.sdk.configuration import conf
from fashion_tagger_common import ASSETS, DEFAULT_ARGS, GPU_POOL, GPU_QUEUE, errors_follow_the_contract, schedule

from fashion_tagger.orchestration import dag_support, form  # light: the config schema and helpers, no torch/mlflow
from fashion_tagger.orchestration.kubernetes import gpu_executor_config, runs_pods
from fashion_tagger.runs.stage_registry import Stage, stages

TRAIN_GPUS = dag_support.train_gpus()
RUNS_PODS = runs_pods(conf.get("core", "executor", fallback=""))

# Set by the DAG, not by the trigger form: one training process per GPU the task reserves in the pool,
# and no progress bars, since task logs are files, not terminals.
FIXED_OVERRIDES: dict[str, Any] = {"train": {"devices": str(TRAIN_GPUS), "progress_bar": False}}

# The trigger form, generated from the configuration schema and the presets (fashion_tagger.orchestration.form).
PARAMS = {name: Param(**spec) for name, spec in form.form_params().items()}


def start_run(context: dict[str, Any]) -> str:
    """The first task's run, created from the trigger parameters and named by the Airflow run id: its folder, or
    its URL for an object-store home (the next task may run on another machine, with its own copy of the home)."""
    from fashion_tagger.runs.run import create_run

    config = form.config_from_params(context["params"], fixed=FIXED_OVERRIDES)
    return create_run(config, context["run_id"]).location


def skip_if_unchanged(run_root: str) -> None:
    """Skip this task, and with it every later one, when nothing changed since the champion (reason in the log)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from fashion_tagger.runs.run import open_run
    from fashion_tagger.runs.stages import retrain_skip_reason, skip_retraining

    run = open_run(run_root)
    if reason := retrain_skip_reason(run):
        skip_retraining(run, reason)
        raise AirflowSkipException(reason)


def run_in_task(stage: Stage, run_root: str) -> dict[str, Any]:
    """Run STAGE of the run at RUN_ROOT inside this task, or as its child process when the stage asks for one."""
    from fashion_tagger.runs.run import open_run
    from fashion_tagger.runs.stages import run_stage

    if not stage.child_process:
        return run_stage(open_run(run_root), stage.name)
    from fashion_tagger.core.parallel import device_processes
    from fashion_tagger.orchestration.child import run_stage_process

    nproc = device_processes(open_run(run_root).config.train.devices) if stage.per_device else 1
    return run_stage_process(stage.name, run_root, nproc=nproc)


def stage_task(stage: Stage):
    """The Airflow task of STAGE, its routing, timeout, asset and documentation read from the stage's declaration.
    The first task starts the run; every other one takes the run folder from the task before it."""
    options: dict[str, Any] = {"task_id": stage.airflow_task_id, "doc_md": stage.task_doc}
    if stage.outlet:
        options["outlets"] = [ASSETS[stage.outlet]]
    if stage.gpu:
        options |= {"queue": GPU_QUEUE, "pool": GPU_POOL}
        # The GPU pod, only under a KubernetesExecutor; None when `kubernetes` is not installed.
        if RUNS_PODS and (executor_config := gpu_executor_config(TRAIN_GPUS if stage.per_device else 1)) is not None:
            options["executor_config"] = executor_config
    if stage.per_device:
        options["pool_slots"] = TRAIN_GPUS
    if stage.timeout_hours is not None:
        options["execution_timeout"] = dag_support.timeout_from_env(stage.name, stage.timeout_hours)

    def run_stage_task(upstream: dict[str, Any] | None = None, **context) -> dict[str, Any]:
        with errors_follow_the_contract():
            run_root = start_run(context) if upstream is None else upstream["run_root"]
            if stage.skip_when_unchanged:
                skip_if_unchanged(run_root)
            result = run_in_task(stage, run_root)
        if stage.outlet:
            context["outlet_events"][ASSETS[stage.outlet]].extra = {
                key: result[key] for key in stage.outlet_extra if key in result}
        return {"run_root": run_root, **result}

    return task(**options)(run_stage_task)


def _stage_list() -> str:
    *names, last = (stage.name for stage in stages())
    return f"{', '.join(names).capitalize()} and {last}"


@dag(
    dag_id="fashion_tagger_training",
    dag_display_name="Fashion tagger: retrain and register",
    description=f"{_stage_list()} the fashion product tagger.",
    schedule=schedule("FASHION_TAGGER_SCHEDULE", "@weekly"),
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=dag_support.max_active_runs(),
    params=PARAMS,
    tags=["fashion-tagger", "training", "mlflow"],
    default_args=DEFAULT_ARGS,
    doc_md=f"""
### Retrain the fashion product tagger

{" → ".join(f"`{stage.airflow_task_id}`" for stage in stages())}

* **Trigger** with the form: a preset (`default` for production, `demo` for a CPU smoke run) and the
  fields that override it; empty fields keep the preset's values. Bad parameters fail `fetch_dataset`
  with a message naming the field.
* **Outputs** of a run go to `<FASHION_TAGGER_HOME>/runs/<run id>/` (`config.yaml`, `validate/`, `split/`,
  `train/` with checkpoints, metrics and `eval/`). Downloads (`raw/`) and resized images (`cache/`) are
  shared by all runs and keyed by content.
* **GPU**: `train_model` and `evaluate_model` run on queue `gpu` in pool `gpu` (one slot per GPU), each in
  a child process whose output is this task's log. A retry of `train_model` resumes from the last checkpoint.
* **Nothing changed**: when the data, labels and training configuration equal the champion's, `train_model`,
  `evaluate_model` and `register_model` are skipped (the reason is in `train_model`'s log); `force` trains.
* **Assets**: `fashion_tagger_raw_dataset` after fetching, `fashion_tagger_model` after registration.
* **Results**: the MLflow model registry (`make up`, then http://localhost:5000), alias `champion`.
""",
)
def fashion_tagger_training():
    first, *rest = stages()
    upstream = stage_task(first)()
    for stage in rest:
        upstream = stage_task(stage)(upstream)


fashion_tagger_training()
