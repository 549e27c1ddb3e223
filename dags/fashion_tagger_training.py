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

from fashion_tagger import orchestration  # light: the config schema and helpers, no torch/mlflow

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
def bad_input_fails_now():
    """Bad parameters or bad data fail the task at once: a retry cannot fix them."""
    from airflow.sdk.exceptions import AirflowFailException

    from fashion_tagger.config import ConfigError
    from fashion_tagger.errors import DataError
    from fashion_tagger.orchestration import StageProcessError

    try:
        yield
    except (ConfigError, DataError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
    except StageProcessError as exc:
        if exc.bad_input:
            raise AirflowFailException(str(exc)) from exc
        raise


SECTION_DATA = "Data"
SECTION_MODEL = "Model and training"
SECTION_REGISTRY = "Registration"
EMPTY_KEEPS_PRESET = " Leave empty to keep the preset's value."

PARAMS = {
    "preset": Param(
        orchestration.default_preset(),
        type="string",
        enum=["default", "demo"],
        values_display={
            "default": "default: full dataset, EfficientNet-B3, 30 epochs (GPU)",
            "demo": "demo: small images and backbone, 3 epochs (CPU, minutes)",
        },
        title="Preset",
        description="Base configuration the other fields override.",
        section=SECTION_DATA,
    ),
    "source": Param(
        orchestration.default_source(orchestration.default_preset()),
        type=["null", "string"],
        pattern=r"^(kaggle:[\w.-]+/[\w.-]+|s3://[^/\s]+(/\S*)?|synthetic:[1-9][0-9]*|[/~.]\S*)$",
        examples=[
            "kaggle:paramaggarwal/fashion-product-images-dataset",
            "kaggle:paramaggarwal/fashion-product-images-small",
            "s3://fashion-data/fashion-dataset",
            "synthetic:3000",
        ],
        title="Dataset source",
        description="kaggle:OWNER/DATASET, a folder on the worker holding styles.csv and images/, "
        "s3://bucket/prefix, or synthetic:N (a generated dataset of N rows)." + EMPTY_KEEPS_PRESET,
        section=SECTION_DATA,
    ),
    "max_rows": Param(
        None,
        type=["null", "integer"],
        minimum=100,
        title="Maximum rows",
        description="Train on a stratified subset of at most this many clean rows; empty for all.",
        section=SECTION_DATA,
    ),
    "min_class_count": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=100000,
        title="Minimum class count",
        description="Classes with fewer rows are not learned (mapped to 'None')." + EMPTY_KEEPS_PRESET,
        section=SECTION_DATA,
    ),
    "backbone": Param(
        None,
        type=["null", "string"],
        pattern=r"^[a-z0-9_.]+$",
        examples=["efficientnet_b3", "efficientnet_b0", "convnext_tiny", "resnet50", "test_efficientnet"],
        title="Backbone",
        description="A timm model name." + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "pretrained": Param(
        None,
        type=["null", "boolean"],
        title="Pretrained weights",
        description="Start from ImageNet weights (needs the timm hub or model.pretrained_path)."
        + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "image_width": Param(
        None,
        type=["null", "integer"],
        minimum=16,
        maximum=2048,
        title="Image width",
        description="Pixels; product photos are 3:4, e.g. 240 x 320." + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "image_height": Param(
        None,
        type=["null", "integer"],
        minimum=16,
        maximum=2048,
        title="Image height",
        description="Pixels." + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "epochs": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=500,
        title="Epochs",
        description="Maximum epochs (early stopping may end sooner)." + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "batch_size": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=4096,
        title="Batch size",
        description="Images per step and GPU." + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "learning_rate": Param(
        None,
        type=["null", "number"],
        exclusiveMinimum=0,
        maximum=1,
        title="Learning rate",
        description="Peak learning rate of the heads (the backbone gets a fraction)." + EMPTY_KEEPS_PRESET,
        section=SECTION_MODEL,
    ),
    "promote": Param(
        None,
        type=["null", "boolean"],
        title="Promote",
        description="Move alias `champion` to the new version when it passes the gate." + EMPTY_KEEPS_PRESET,
        section=SECTION_REGISTRY,
    ),
    "min_delta": Param(
        None,
        type=["null", "number"],
        minimum=0,
        maximum=1,
        title="Minimum improvement",
        description="Headline macro-F1 the new version must gain over the champion." + EMPTY_KEEPS_PRESET,
        section=SECTION_REGISTRY,
    ),
}


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
    default_args={
        "owner": "fashion-tagger",
        "retries": RETRIES,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    },
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
    * **Assets**: `fashion_tagger_raw_dataset` after fetching, `fashion_tagger_model` after registration.
    * **Results**: the MLflow model registry (`make up`, then http://localhost:5000), alias `champion`.
    """

    @task(outlets=[RAW_DATASET])
    def fetch_dataset(**context) -> dict[str, Any]:
        """
        Validate the trigger parameters, write the run's `config.yaml`, and make the dataset available under
        `<home>/raw/<name>/` (Kaggle, S3, a folder or a generated one). A complete earlier download is reused.
        """
        from fashion_tagger import stages
        from fashion_tagger.orchestration import start_run

        with bad_input_fails_now():
            config, paths = start_run(context["params"], context["run_id"], fixed=FIXED_OVERRIDES)
            result = stages.fetch(config)
        context["outlet_events"][RAW_DATASET].extra = {
            "source": result.source,
            "raw_dir": str(result.raw_dir),
            "rows": result.rows,
        }
        return {"run_root": str(paths.root), **result.to_dict()}

    @task
    def validate_dataset(fetched: dict[str, Any]) -> dict[str, Any]:
        """
        Check `styles.csv` and every image: `validate/clean.parquet`, `rejects.csv` (each rejected line with
        its reason) and `report.json`. Fails without retrying when a quality gate fails. Runs as a child
        process (`python -m fashion_tagger validate`): its image checks use a process pool, and a Celery
        worker's task process is a daemon, which may not start processes of its own.
        """
        from fashion_tagger.orchestration import resume_run, run_stage, validate_command

        _, paths = resume_run(fetched["run_root"])
        with bad_input_fails_now():
            result = run_stage("validate", validate_command(paths.config, fetched["raw_dir"], paths.validate))
        return {"run_root": str(paths.root), **result}

    @task
    def build_splits(validated: dict[str, Any]) -> dict[str, Any]:
        """Encode the labels and write a stratified train/validation split to `split/`."""
        from fashion_tagger import stages
        from fashion_tagger.orchestration import resume_run

        config, paths = resume_run(validated["run_root"])
        with bad_input_fails_now():
            result = stages.split(config, paths.validate, paths.split)
        return {"run_root": str(paths.root), **result.to_dict()}

    @task
    def prepare_images(splits: dict[str, Any]) -> dict[str, Any]:
        """
        Resize every image of the split once into the shared cache `<home>/cache/`, keyed by content hash.
        Runs as a child process (`python -m fashion_tagger prepare`): its worker pool starts processes that
        re-import the main module, which inside an Airflow worker is Airflow itself.
        """
        from fashion_tagger.orchestration import prepare_command, resume_run, run_stage

        config, paths = resume_run(splits["run_root"])
        with bad_input_fails_now():
            result = run_stage("prepare", prepare_command(paths.config, paths.split, config.cache_root))
        return {"run_root": str(paths.root), **result}

    @task(queue=GPU_QUEUE, pool=GPU_POOL, pool_slots=TRAIN_GPUS, execution_timeout=TRAIN_TIMEOUT)
    def train_model(prepared: dict[str, Any]) -> dict[str, Any]:
        """
        Train in a child process (`python -m fashion_tagger train`, torchrun when the task has several GPUs)
        so CUDA never starts inside the worker; its output streams into this log. Writes `train/checkpoints/`
        and `train/metrics.json`; a retry resumes from `train/checkpoints/last.ckpt`.
        """
        from fashion_tagger.orchestration import gpu_processes, resume_run, run_stage, train_command

        config, paths = resume_run(prepared["run_root"])
        command = train_command(paths.config, paths.train, paths.split, nproc=gpu_processes(config.train.devices))
        with bad_input_fails_now():
            result = run_stage("train", command)
        return {"run_root": str(paths.root), **result}

    @task(queue=GPU_QUEUE, pool=GPU_POOL, execution_timeout=EVAL_TIMEOUT)
    def evaluate_model(trained: dict[str, Any]) -> dict[str, Any]:
        """
        Score the best checkpoint on the validation split in a child process: per-attribute and per-class
        metrics, confusion matrices and plots in `train/eval/`.
        """
        from fashion_tagger.orchestration import evaluate_command, resume_run, run_stage

        _, paths = resume_run(trained["run_root"])
        with bad_input_fails_now():
            result = run_stage("evaluate", evaluate_command(paths.train, paths.split))
        return {"run_root": str(paths.root), **result}

    @task(outlets=[REGISTERED_MODEL])
    def register_model(evaluated: dict[str, Any], **context) -> dict[str, Any]:
        """
        Log the run to MLflow, register the model as a new version (alias `challenger`) and apply the
        promotion gate: alias `champion` moves only when the new version beats it. The decision is recorded
        on the version.
        """
        from fashion_tagger import registry
        from fashion_tagger.orchestration import resume_run

        config, paths = resume_run(evaluated["run_root"])
        result = registry.register_run(paths.train, config).to_dict()
        context["outlet_events"][REGISTERED_MODEL].extra = {
            key: result[key] for key in ("model_name", "version", "model_uri", "aliases", "decision") if key in result
        }
        return {"run_root": str(paths.root), **result}

    fetched = fetch_dataset()
    validated = validate_dataset(fetched)
    splits = build_splits(validated)
    prepared = prepare_images(splits)
    trained = train_model(prepared)
    evaluated = evaluate_model(trained)
    register_model(evaluated)


fashion_tagger_training()
