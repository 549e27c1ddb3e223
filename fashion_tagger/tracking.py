"""Where runs are tracked and what each one records: MLflow store resolution, run tags, params and the model card.

The embedded default is a SQLite store in the project home with artifacts under `<home>/mlartifacts`; any
tracking server comes in through `MLFLOW_TRACKING_URI` (or `registry.tracking_uri`), S3/MinIO artifacts through boto3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fashion_tagger import __version__
from fashion_tagger.config import Config, config_to_flat_dict
from fashion_tagger.io import read_json, write_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fashion_tagger.labels import LabelSpace

log = logging.getLogger(__name__)

RUN_ID_FILENAME = "mlflow_run.json"  # in a run dir: the MLflow run that tracks it, so later stages log into it
ARTIFACTS_DIRNAME = "mlartifacts"
S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
AIRFLOW_RUN_ID_ENV = "AIRFLOW_CTX_DAG_RUN_ID"

# Tag keys shared by runs and model versions.
TAG_DATASET_HASH = "fashion_tagger.dataset_hash"
TAG_DATASET_SOURCE = "fashion_tagger.dataset_source"
TAG_CODE_VERSION = "fashion_tagger.code_version"
TAG_GIT_COMMIT = "fashion_tagger.git_commit"
TAG_AIRFLOW_RUN_ID = "airflow.dag_run_id"
TAG_RUN_DIR = "fashion_tagger.run_dir"


def tracking_uri(config: Config) -> str:
    """`registry.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<home>/mlflow.db`."""
    uri = config.tracking_uri
    if uri.startswith("sqlite:///"):
        # SQLite creates the database file but not its folder.
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def is_local_store(uri: str) -> bool:
    """A store this process writes directly (SQLite, a database, files), as opposed to a tracking server."""
    return not uri.startswith(("http://", "https://", "databricks"))


def artifact_location(config: Config, experiment: str | None = None) -> str | None:
    """Artifact root for a new experiment: `registry.artifact_location`, else `<home>/mlartifacts/<experiment>`
    for a local store, else None so a tracking server applies its own `--artifacts-destination`."""
    experiment = experiment or config.registry.experiment
    if config.registry.artifact_location:
        return f"{config.registry.artifact_location.rstrip('/')}/{_slug(experiment)}"
    if is_local_store(tracking_uri(config)):
        return (config.home_dir / ARTIFACTS_DIRNAME / _slug(experiment)).as_uri()
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "default"


@contextlib.contextmanager
def tracking_session(config: Config) -> Iterator[MlflowClient]:
    """Point the fluent MLflow API at this config's store for the block, then restore what was there before.

    The fluent API (`start_run`, `log_model`) only reads a process-wide URI; restoring it keeps one
    configuration from leaking into the next caller in the same process (tests, the in-process pipeline).
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    uri = tracking_uri(config)
    previous_uri = tracking_utils._tracking_uri
    previous_env_uri = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri(None) below would delete it
    endpoint = config.registry.s3_endpoint_url
    previous_endpoint = os.environ.get(S3_ENDPOINT_ENV)
    if endpoint and not previous_endpoint:
        # MLflow's S3 artifact repository reads the endpoint (MinIO) from the environment only.
        os.environ[S3_ENDPOINT_ENV] = endpoint
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env_uri
        if endpoint and not previous_endpoint:
            os.environ.pop(S3_ENDPOINT_ENV, None)


def ensure_experiment(client: MlflowClient, config: Config) -> str:
    """The id of `registry.experiment`, created with our artifact root when missing (restored when deleted)."""
    name = config.registry.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(config, name))
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding our code (with `-dirty` when it has local changes), if it is one."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None


def code_version() -> str:
    """`<package version>+<commit>` when the code runs from a git checkout, else the package version."""
    commit = git_commit()
    return f"{__version__}+{commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}" if commit else __version__


def run_tags(config: Config, *, run_dir: str | Path | None = None, dataset_hash: str | None = None) -> dict[str, str]:
    """Tags every training run carries: dataset hash, code version, the Airflow run that launched it."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {TAG_CODE_VERSION: code_version(), TAG_DATASET_SOURCE: config.data.source}
    if commit := git_commit():
        tags[TAG_GIT_COMMIT] = commit
        tags[MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
    if dataset_hash:
        tags[TAG_DATASET_HASH] = dataset_hash
    if run_dir is not None:
        tags[TAG_RUN_DIR] = str(Path(run_dir).expanduser().resolve())
    if airflow_run := os.environ.get(AIRFLOW_RUN_ID_ENV):
        tags[TAG_AIRFLOW_RUN_ID] = airflow_run
        for env, key in (("AIRFLOW_CTX_DAG_ID", "airflow.dag_id"), ("AIRFLOW_CTX_TASK_ID", "airflow.task_id")):
            if value := os.environ.get(env):
                tags[key] = value
    return tags


def dataset_hash_of(split_dir: str | Path | None) -> str | None:
    """The content hash of the clean table a split came from (labels.json `source_hash`)."""
    if split_dir is None:
        return None
    labels_path = Path(split_dir) / "labels.json"
    if not labels_path.is_file():
        return None
    return read_json(labels_path).get("source_hash") or None


def flat_params(config: Config) -> dict[str, str]:
    """The resolved config as MLflow params (`train.epochs` -> '30'), values cut to MLflow's 6000-char limit."""
    return {key: ("" if value is None else str(value))[:6000] for key, value in config_to_flat_dict(config).items()}


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, str]:
    """Log params the run does not have yet. MLflow params are immutable, so a resumed run whose config
    changed keeps its first values; the changes are returned (and logged as a warning) instead of failing."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start : start + 100])
    if changed:
        log.warning("run %s keeps its first values of changed params: %s", run_id, ", ".join(sorted(changed)))
    return changed


def read_run_id(run_dir: str | Path, client: MlflowClient | None = None) -> str | None:
    """The MLflow run recorded in RUN_DIR, if any, and (given a client) only if that store knows it."""
    path = Path(run_dir) / RUN_ID_FILENAME
    if not path.is_file():
        return None
    run_id = read_json(path).get("run_id")
    if run_id and client is not None:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
    return run_id or None


def write_run_id(run_dir: str | Path, run_id: str, experiment_id: str, uri: str) -> Path:
    return write_json(
        Path(run_dir) / RUN_ID_FILENAME, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
    )


def start_or_resume_run(client: MlflowClient, config: Config, run_dir: str | Path, *,
                        dataset_hash: str | None = None) -> str:
    """The run tracking RUN_DIR: the recorded one when this store has it, else a new run (recorded in RUN_DIR)."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_id := read_run_id(run_dir, client):
        return run_id
    experiment_id = ensure_experiment(client, config)
    tags = run_tags(config, run_dir=run_dir, dataset_hash=dataset_hash)
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    tags[MLFLOW_RUN_NAME] = run_dir.name
    run = client.create_run(experiment_id, tags=tags)
    write_run_id(run_dir, run.info.run_id, experiment_id, tracking_uri(config))
    return run.info.run_id


def log_epoch_history(client: MlflowClient, run_id: str, history: list[Mapping[str, Any]]) -> int:
    """Per-epoch metrics from a run's metrics.json history (for runs trained without the MLflow logger)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(entry.get("epoch", i)))
        for i, entry in enumerate(history)
        for key, value in entry.items()
        if key not in ("epoch", "step") and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return len(metrics)


def load_model(model_uri: str, config: Config | None = None) -> Any:
    """`mlflow.pyfunc.load_model` against this project's store, so `models:/fashion-tagger@champion` resolves
    without MLFLOW_TRACKING_URI being set (the model is fully loaded before the store is released)."""
    import mlflow.pyfunc

    from fashion_tagger.config import load_config

    with tracking_session(config or load_config()):
        return mlflow.pyfunc.load_model(model_uri)


def mlflow_logger(config: Config, run_dir: str | Path, *, split_dir: str | Path | None = None) -> Any:
    """A Lightning `MLFlowLogger` for per-epoch metrics, logging into the run recorded in RUN_DIR.

    On rank zero the run is created (or resumed, when RUN_DIR was trained before) with our tags and the
    flattened config as params, and its id is written to RUN_DIR/mlflow_run.json, which `register` reads
    to log the model into the same run. Other ranks get a logger that Lightning keeps silent.
    """
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    uri = tracking_uri(config)
    if rank_zero_only.rank != 0:
        return MLFlowLogger(experiment_name=config.registry.experiment, tracking_uri=uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = start_or_resume_run(client, config, run_dir, dataset_hash=dataset_hash_of(split_dir))
    log_params_once(client, run_id, flat_params(config))
    return MLFlowLogger(
        experiment_name=config.registry.experiment,
        tracking_uri=uri,
        run_id=run_id,
        artifact_location=artifact_location(config),
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def model_card(
    *,
    config: Config,
    labels: LabelSpace,
    metrics: Mapping[str, Any] | None = None,
    validation_report: Mapping[str, Any] | None = None,
    split_report: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    version: str | None = None,
) -> str:
    """Markdown model card: data source and hash, row counts, classes per attribute, metrics, config, limits."""
    validation_report = validation_report or {}
    split_report = split_report or {}
    metrics = metrics or {}
    title = f"{model_name or config.registry.model_name}" + (f" version {version}" if version else "")
    lines = [f"# Model card: {title}", "", "Tags a product photo with one value per attribute and a confidence.", ""]

    lines += ["## Data", ""]
    lines.append(f"- source: `{config.data.source}`")
    lines.append(f"- clean table hash (sha256): `{labels.source_hash or 'unknown'}`")
    if validation_report:
        lines.append(
            f"- validation: {_fmt(validation_report.get('lines_read'))} lines read, "
            f"{_fmt(validation_report.get('rows_clean'))} clean rows, "
            f"{_fmt(validation_report.get('rows_rejected'))} rejected"
        )
    if split_report:
        lines.append(
            f"- split: {_fmt(split_report.get('train_rows'))} train rows, {_fmt(split_report.get('val_rows'))} "
            f"validation rows (val_fraction {split_report.get('val_fraction')}, seed {split_report.get('seed')}, "
            "duplicate images kept on one side)"
        )
    lines.append(f"- classes rarer than {labels.min_class_count} rows are labelled 'None' and never trained on")
    lines.append("")

    lines += ["## Classes per attribute", "", "| attribute | classes | trained classes | mapped to 'None' |",
              "| --- | ---: | --- | ---: |"]
    for attribute, names in labels.classes.items():
        shown = ", ".join(names[:12]) + (f", … (+{len(names) - 12})" if len(names) > 12 else "")
        lines.append(f"| {attribute} | {len(names)} | {shown} | {len(labels.mapped_to_none(attribute))} |")
    lines.append("")

    lines += ["## Validation metrics", ""]
    if metrics:
        lines.append(f"Headline (mean macro-F1 over attributes): **{_fmt(metrics.get('headline_macro_f1'))}**; "
                     f"exact match over all attributes: {_fmt(metrics.get('exact_match'))}.")
        lines += ["", "| attribute | accuracy | macro-F1 | weighted-F1 |", "| --- | ---: | ---: | ---: |"]
        for attribute, row in (metrics.get("attributes") or {}).items():
            lines.append(f"| {attribute} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('macro_f1'))} | "
                         f"{_fmt(row.get('weighted_f1'))} |")
    else:
        lines.append("No evaluation was recorded for this run.")
    lines.append("")

    if gate:
        lines += ["## Promotion gate", ""]
        lines.append(f"- decision: **{gate.get('decision')}** ({gate.get('reason')})")
        lines.append(f"- challenger headline on the gate split: {_fmt(gate.get('challenger_headline'))}")
        if gate.get("champion_version"):
            lines.append(f"- champion version {gate['champion_version']} re-scored on the same split: "
                         f"{_fmt(gate.get('champion_headline'))}")
        lines.append("")

    model, train, images = config.model, config.train, config.images
    lines += ["## Training configuration", "", "| setting | value |", "| --- | --- |"]
    for key, value in (
        ("backbone", f"{model.backbone} (pretrained: {model.pretrained})"),
        ("heads", f"hidden {model.hidden_dim or 'none'}, dropout {model.dropout}"),
        ("input", f"{images.width}x{images.height} RGB, padded white to 3:4"),
        ("loss", f"{train.loss}, label smoothing {train.label_smoothing}, 'None' masked"),
        ("optimiser", f"AdamW lr {train.lr} (backbone x{train.backbone_lr_scale}), weight decay {train.weight_decay}"),
        ("schedule", f"{train.schedule}, warmup {train.warmup_epochs} epochs"),
        ("epochs / batch", f"{train.epochs} / {train.batch_size}"),
        ("seed", str(train.seed)),
    ):
        lines.append(f"| {key} | {value} |")
    lines += ["", "Full configuration: `config.yaml` among the run's artifacts and the run's params.", ""]

    lines += ["## Known limits", ""]
    lines.append("- Trained on catalogue photos (one product, plain background); other photos are out of distribution.")
    lines.append("- It always answers with one of the trained classes: 'None' and rare classes are never predicted, "
                 "so check the confidence.")
    lines.append("- baseColour, season and usage come from catalogue metadata and are partly subjective; expect "
                 "lower scores there than on category attributes.")
    if config.data.source.startswith("synthetic"):
        lines.append("- **Trained on generated data**: for demonstrating the workflow only, not for real photos.")
    if not model.pretrained:
        lines.append("- The backbone was trained from scratch (no pretrained weights).")
    lines.append("")
    return "\n".join(lines)
