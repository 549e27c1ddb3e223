"""Airflow DAG `fashion_tagger_training`: retrain, evaluate and register the fashion product tagger.

Each task calls one stage of the `fashion_tagger` library with paths and hands the next task a small JSON
summary; image preparation, training and evaluation run as child processes, the last two on the GPU queue.
See docs/dag.md.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, task

from fashion_tagger.orchestration import form as orchestration  # light: the config schema and helpers, no torch/mlflow

# Routing and limits are deployment settings, read when the file is parsed.
GPU_QUEUE = os.environ.get("FASHION_TAGGER_GPU_QUEUE", "gpu")
GPU_POOL = os.environ.get("FASHION_TAGGER_GPU_POOL", "gpu")
TRAIN_GPUS = max(int(os.environ.get("FASHION_TAGGER_TRAIN_GPUS", "1")), 1)
TRAIN_TIMEOUT = timedelta(hours=float(os.environ.get("FASHION_TAGGER_TRAIN_TIMEOUT_HOURS", "12")))
EVAL_TIMEOUT = timedelta(hours=2)
RETRIES = int(os.environ.get("FASHION_TAGGER_TASK_RETRIES", "2"))  # `make run` sets 0 to fail fast
SCHEDULE_ENV = "FASHION_TAGGER_SCHEDULE"

RAW_DATASET = Asset(name="fashion_tagger_raw_dataset", uri="x-fashion-tagger://raw-dataset", group="dataset")
REGISTERED_MODEL = Asset(name="fashion_tagger_model", uri="x-fashion-tagger://registered-model", group="model")

# Set by the DAG, not by the trigger form: one training process per GPU the task reserves in the pool,
# and no progress bars, since task logs are files, not terminals.
FIXED_OVERRIDES: dict[str, Any] = {"train": {"devices": str(TRAIN_GPUS), "progress_bar": False}}


def schedule_from_env(value: str | None) -> str | None:
    """`@weekly` unless FASHION_TAGGER_SCHEDULE says otherwise (a cron preset or expression; `none` for manual)."""
    if value is None:
        return "@weekly"
    value = value.strip()
    return None if value.lower() in ("", "none", "null", "manual") else value


@contextmanager
def errors_follow_the_contract():
    """fashion_tagger.core.errors' contract: bad input fails the task at once (no retry); transient faults and crashes
    are raised as they are, so Airflow retries them."""
    from airflow.sdk.exceptions import AirflowFailException

    with orchestration.final_errors_raise(AirflowFailException):
        yield


# The trigger form, generated from the configuration schema and the presets (fashion_tagger.orchestration.form).
PARAMS = {name: Param(**spec) for name, spec in orchestration.form_params().items()}


@dag(
    dag_id="fashion_tagger_training",
    dag_display_name="Fashion tagger: retrain and register",
    description="Fetch, validate, split, prepare, train, evaluate and register the fashion product tagger.",
    schedule=schedule_from_env(os.environ.get(SCHEDULE_ENV)),
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["fashion-tagger", "training", "mlflow"],
    default_args=orchestration.default_args(RETRIES),
)
def fashion_tagger_training():
    """
    ### Retrain the fashion product tagger

    `fetch_dataset` → `validate_dataset` → `build_splits` → `prepare_images` → `train_model`
    → `evaluate_model` → `register_model`

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
    """

    @task(outlets=[RAW_DATASET])
    def fetch_dataset(**context) -> dict[str, Any]:
        """
        Validate the trigger parameters, create the run folder with its `config.yaml`, and make the dataset
        available under `<home>/raw/<name>/` (Kaggle, S3, a folder or a generated one). A complete earlier
        download is reused; a second run fetching the same source waits for the first and reuses it.
        """
        from fashion_tagger.runs.run import create_run
        from fashion_tagger.runs.stages import run_stage

        with errors_follow_the_contract():
            config = orchestration.config_from_params(context["params"], fixed=FIXED_OVERRIDES)
            run = create_run(config, context["run_id"])
            result = run_stage(run, "fetch")
        context["outlet_events"][RAW_DATASET].extra = {
            "source": result["source"],
            "raw_dir": str(result["raw_dir"]),
            "rows": result["rows"],
        }
        return {"run_root": str(run.root), **result}

    @task
    def validate_dataset(fetched: dict[str, Any]) -> dict[str, Any]:
        """
        Check `styles.csv` and every image: `validate/clean.parquet`, `rejects.csv` (each rejected line with
        its reason) and `report.json`. Fails without retrying when a quality gate fails. Runs as a child
        process (`python -m fashion_tagger validate RUN`): its image checks use a process pool, and a Celery
        worker's task process is a daemon, which may not start processes of its own.
        """
        with errors_follow_the_contract():
            result = orchestration.run_stage_process("validate", fetched["run_root"])
        return {"run_root": fetched["run_root"], **result}

    @task
    def build_splits(validated: dict[str, Any]) -> dict[str, Any]:
        """Encode the labels and write the train/validation/test parts to `split/` (an image once in test stays)."""
        from fashion_tagger.runs.run import open_run
        from fashion_tagger.runs.stages import run_stage

        with errors_follow_the_contract():
            result = run_stage(open_run(validated["run_root"]), "split")
        return {"run_root": validated["run_root"], **result}

    @task
    def prepare_images(splits: dict[str, Any]) -> dict[str, Any]:
        """
        Resize every image of the split once into the shared cache `<home>/cache/`, keyed by content hash.
        Runs as a child process (`python -m fashion_tagger prepare RUN`): its worker pool starts processes that
        re-import the main module, which inside an Airflow worker is Airflow itself.
        """
        with errors_follow_the_contract():
            result = orchestration.run_stage_process("prepare", splits["run_root"])
        return {"run_root": splits["run_root"], **result}

    @task(queue=GPU_QUEUE, pool=GPU_POOL, pool_slots=TRAIN_GPUS, execution_timeout=TRAIN_TIMEOUT)
    def train_model(prepared: dict[str, Any]) -> dict[str, Any]:
        """
        Train in a child process (`python -m fashion_tagger train RUN`, torchrun when the task has several GPUs)
        so CUDA never starts inside the worker; its output streams into this log. Writes `train/checkpoints/`
        and `train/metrics.json`; a retry resumes from `train/checkpoints/last.ckpt`.

        Skipped, with the reason in this log, when the data, labels and training configuration equal the
        champion's (their fingerprint); evaluation and registration are then skipped too. `force` trains anyway.
        """
        from airflow.sdk.exceptions import AirflowSkipException

        from fashion_tagger.core.parallel import device_processes
        from fashion_tagger.runs.run import open_run
        from fashion_tagger.runs.stages import retrain_skip_reason, skip_retraining

        with errors_follow_the_contract():
            run = open_run(prepared["run_root"])
            if reason := retrain_skip_reason(run):
                skip_retraining(run, reason)
                raise AirflowSkipException(reason)
            nproc = device_processes(run.config.train.devices)
            result = orchestration.run_stage_process("train", run.root, nproc=nproc)
        return {"run_root": prepared["run_root"], **result}

    @task(queue=GPU_QUEUE, pool=GPU_POOL, execution_timeout=EVAL_TIMEOUT)
    def evaluate_model(trained: dict[str, Any]) -> dict[str, Any]:
        """
        Score the best checkpoint on the test part (the headline) and the validation part in a child process:
        per-attribute and per-class metrics, confusion matrices and plots in `train/eval/`.
        """
        with errors_follow_the_contract():
            result = orchestration.run_stage_process("evaluate", trained["run_root"])
        return {"run_root": trained["run_root"], **result}

    @task(outlets=[REGISTERED_MODEL])
    def register_model(evaluated: dict[str, Any], **context) -> dict[str, Any]:
        """
        Log the run to MLflow, register the model as a new version (alias `challenger`) and apply the
        promotion gate: alias `champion` moves only when the new version beats it on the test part by more than
        the noise (a paired bootstrap). The decision, its interval and reason are recorded on the version. A
        model that is already registered (same weights, labels, preprocessing) is not registered again.
        """
        from fashion_tagger.runs.run import open_run
        from fashion_tagger.runs.stages import run_stage

        with errors_follow_the_contract():
            result = run_stage(open_run(evaluated["run_root"]), "register")
        context["outlet_events"][REGISTERED_MODEL].extra = {
            key: result[key] for key in ("model_name", "version", "model_uri", "aliases", "decision") if key in result
        }
        return {"run_root": evaluated["run_root"], **result}

    fetched = fetch_dataset()
    validated = validate_dataset(fetched)
    splits = build_splits(validated)
    prepared = prepare_images(splits)
    trained = train_model(prepared)
    evaluated = evaluate_model(trained)
    register_model(evaluated)


fashion_tagger_training()
