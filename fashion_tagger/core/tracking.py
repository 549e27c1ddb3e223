"""Where runs are tracked and what each one records: MLflow store resolution, run tags, params and epoch history.

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
from fashion_tagger.core.config import Config, config_to_flat_dict
from fashion_tagger.core.errors import ModelUnavailableError, first_line
from fashion_tagger.core.io import read_json, write_json
from fashion_tagger.core.layout import SplitDir, TrainDir

if TYPE_CHECKING:
    from mlflow import MlflowClient


log = logging.getLogger(__name__)

S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
AIRFLOW_RUN_ID_ENV = "AIRFLOW_CTX_DAG_RUN_ID"

# Tag keys shared by runs and model versions.
TAG_DATASET_HASH = "fashion_tagger.dataset_hash"
TAG_DATASET_SOURCE = "fashion_tagger.dataset_source"
TAG_CODE_VERSION = "fashion_tagger.code_version"
TAG_GIT_COMMIT = "fashion_tagger.git_commit"
TAG_AIRFLOW_RUN_ID = "airflow.dag_run_id"
TAG_RUN_DIR = "fashion_tagger.run_dir"

# Model version tags: what the registry and the gate record on a version.
TAG_CONTENT_ID = "fashion_tagger.content_id"
TAG_HEADLINE = "headline_macro_f1"
TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_CHALLENGER_SCORE = "gate.challenger_headline"
TAG_CHAMPION_SCORE = "gate.champion_headline"
TAG_CHAMPION_VERSION = "gate.champion_version"
TAG_GATE_SPLIT = "gate.split_hash"
TAG_GATE_ROWS = "gate.rows"
TAG_GATE_PART = "gate.split"  # which part the gate and the headline scored: test
TAG_GAIN_LOW = "gate.headline_gain_low"  # the 95 % interval of (challenger - champion) headline macro-F1
TAG_GAIN_HIGH = "gate.headline_gain_high"
TAG_WARNING = "gate.warning"
TAG_TEST_MEMBERSHIP = "fashion_tagger.test_membership"  # the record the split's test part came from
TAG_FINGERPRINT = "fashion_tagger.fingerprint"  # what the model's training depended on (data/fingerprint.py)


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
        if config.layout.url:  # a database store beside an object-store home: artifacts in that store
            return f"{config.layout.url}/{config.layout.mlflow_artifacts.name}/{_slug(experiment)}"
        return (config.layout.mlflow_artifacts / _slug(experiment)).as_uri()
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "default"


# What MLflow's client says when the server did not answer (its own retries spent), as opposed to a refusal.
_UNANSWERED = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
               "RemoteDisconnected", "Connection aborted", "Read timed out", "too many 502 error responses",
               "too many 503 error responses", "too many 504 error responses")


@contextlib.contextmanager
def unanswered_is_transient(uri: str) -> Iterator[None]:
    """A tracking server that does not answer, in the error contract's terms: a transient `ModelUnavailableError`
    naming URI (a task retries once the server is back); anything else MLflow raises passes through."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.exceptions.ConnectionError) as exc:
        text = str(exc)
        if isinstance(exc, MlflowException) and not any(marker in text for marker in _UNANSWERED):
            raise
        raise ModelUnavailableError(f"the MLflow tracking server {uri} did not answer "
                                    f"({first_line(exc)[:300]}); retry once it is up") from exc


@contextlib.contextmanager
def tracking_session(config: Config) -> Iterator[MlflowClient]:
    """Point the fluent MLflow API at this config's store for the block, then restore what was there before.

    The fluent API (`start_run`, `log_model`) only reads a process-wide URI; restoring it keeps one
    configuration from leaking into the next caller in the same process (tests, the in-process pipeline).
    """
    import mlflow

    uri = tracking_uri(config)
    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env_uri = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri(None) below would delete it
    endpoint = config.registry.s3_endpoint_url
    previous_endpoint = os.environ.get(S3_ENDPOINT_ENV)
    if endpoint and not previous_endpoint:
        # MLflow's S3 artifact repository reads the endpoint (MinIO) from the environment only.
        os.environ[S3_ENDPOINT_ENV] = endpoint
    mlflow.set_tracking_uri(uri)
    try:
        yield new_client(uri, config.layout.mlflow_artifacts)
    finally:
        mlflow.set_tracking_uri(previous_uri)  # type: ignore[arg-type]  # None unsets it, as mlflow documents
        if previous_env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env_uri
        if endpoint and not previous_endpoint:
            os.environ.pop(S3_ENDPOINT_ENV, None)


def new_client(uri: str, artifact_root: Path) -> MlflowClient:
    """An MlflowClient of URI. A SQLite store's schema is created (or migrated) under a lock beside its file:
    building the client creates the tracking store and its first registry call the registry store, and two
    processes doing either at once collide. A new store gets ARTIFACT_ROOT as the artifact location of its
    `Default` experiment, instead of `./mlruns` in whatever folder the process happens to run in."""
    import mlflow

    from fashion_tagger.core.io import file_lock

    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(tracking_uri=uri)
    database = Path(uri.removeprefix("sqlite:///")).expanduser()
    with file_lock(database.with_name(f"{database.name}.lock"), f"the MLflow store {database}"):
        if not database.is_file():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifact_root.as_uri()).engine.dispose()
        client = mlflow.MlflowClient(tracking_uri=uri)
        client.search_registered_models(max_results=1)
    return client


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
    labels_path = SplitDir(Path(split_dir)).labels
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
    path = TrainDir(Path(run_dir)).mlflow_run
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
        TrainDir(Path(run_dir)).mlflow_run, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
    )


def run_name(config: Config, run_dir: str | Path) -> str:
    """What a person browsing MLflow tells runs apart by: `<backbone>-<dataset>-<run id tail>`, e.g.
    `efficientnet_b3-fashion-product-images-dataset-3f9a1c2b` (RUN_DIR is the run's `train/` folder or the run)."""
    run_dir = Path(run_dir)
    run_folder = run_dir.parent if run_dir.name == "train" else run_dir
    source = config.data.source.rstrip("/")
    dataset = source.rsplit("/", 1)[-1].split(":", 1)[-1] if "/" in source else source.replace(":", "")
    tail = run_folder.name.rsplit("-", 1)[-1][-8:]
    return f"{config.model.backbone}-{dataset}-{tail}"


def start_or_resume_run(client: MlflowClient, config: Config, run_dir: str | Path, *,
                        dataset_hash: str | None = None) -> str:
    """The run tracking RUN_DIR: the recorded one when this store has it, else a new run (recorded in RUN_DIR)."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_id := read_run_id(run_dir, client):
        return run_id
    experiment_id = ensure_experiment(client, config)
    tags = run_tags(config, run_dir=run_dir, dataset_hash=dataset_hash)
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    tags[MLFLOW_RUN_NAME] = run_name(config, run_dir)
    run = client.create_run(experiment_id, tags=tags)
    run_id = str(run.info.run_id)
    write_run_id(run_dir, run_id, experiment_id, tracking_uri(config))
    return run_id


HEALTH_TIMEOUT_S = 3.0


def _answers_health(uri: str) -> None:
    """Raise ModelUnavailableError unless the tracking server at URI answers its /health endpoint within
    HEALTH_TIMEOUT_S (any HTTP answer counts: an authenticating server may refuse it)."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ModelUnavailableError(f"the MLflow tracking server {uri} did not answer ({first_line(exc)})") from exc


@contextlib.contextmanager
def system_metrics_while(config: Config, run_dir: str | Path, *, dataset_hash: str | None = None
                         ) -> Iterator[str | None]:
    """Within the block, MLflow's system metrics monitor samples CPU, memory, disk, network and GPU use every
    `train.system_metrics_interval_s` into RUN_DIR's MLflow run (created now if register has not yet); its id is
    yielded. Training needs no tracking store: when it is off (`train.system_metrics: false`) or does not take the
    run, the block runs without it (a warning says why) and None is yielded."""
    if not config.train.system_metrics:
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            uri = tracking_uri(config)
            if not is_local_store(uri):
                _answers_health(uri)  # a server that is down costs 3 s here, not MLflow's minutes of retries
            client = stack.enter_context(tracking_session(config))
            run_id = start_or_resume_run(client, config, run_dir, dataset_hash=dataset_hash)
            monitor = SystemMetricsMonitor(run_id, sampling_interval=config.train.system_metrics_interval_s,
                                           resume_logging=True, tracking_uri=tracking_uri(config))
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - any failure of the store: training goes on without the samples
            # (Not tracking_uri(config) here: for a misconfigured home that raises the very error being reported.)
            log.warning("training %s without system metrics: the tracking store did not take its run (%s)",
                        run_dir, first_line(exc))
            yield None
            return
        try:
            yield run_id
        finally:
            monitor.finish()


def log_epoch_history(client: MlflowClient, run_id: str, history: list[Mapping[str, Any]]) -> int:
    """Per-epoch metrics from a run's metrics.json history (training writes them there; register logs them)."""
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

    from fashion_tagger.core.config import load_config

    with tracking_session(config or load_config()):
        return mlflow.pyfunc.load_model(model_uri)
