"""The seven stages of a run, each `stage(run) -> result` with its settings from the run's own config, declared once
in run order with `@register_stage` (`stage_registry.py`).

`run_stage(run, name)` is what every caller uses (the CLI, `fashion-tagger run`, the DAG): it holds the run's lock,
removes what a killed writer of the stage left, and records the stage as started, complete or failed in the run's
state. Heavy modules are imported inside each function.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fashion_tagger.core import io
from fashion_tagger.core.io import StageResult
from fashion_tagger.runs.run import (
    STAGE_COMPLETE,
    STAGE_FAILED,
    STAGE_SKIPPED,
    STAGE_STARTED,
    Run,
    is_rank_zero,
    record_stage,
    run_lock,
    stage_result,
    stage_state,
)
from fashion_tagger.runs.stage_registry import get_stage, register_stage, stage_names, stages

log = logging.getLogger(__name__)


@register_stage(
    summary="Make the run's dataset source available under <home>/raw/ (a complete earlier copy is reused)",
    task_id="fetch_dataset", outlet="fashion_tagger_raw_dataset", outlet_extra=("source", "raw_dir", "rows"),
    doc="""
    Validate the trigger parameters, create the run folder with its `config.yaml`, and make the dataset
    available under `<home>/raw/<name>/` (Kaggle, S3, a folder or a generated one). A complete earlier
    download is reused; a second run fetching the same source waits for the first and reuses it.
    """,
)
def fetch(run: Run) -> StageResult:
    """Make the configured source available under `<home>/raw/<name>/` (a complete earlier copy is reused)."""
    from fashion_tagger.runs.staging import fetch_into_home

    return fetch_into_home(run)


@register_stage(
    summary="Validate and clean styles.csv and the images: clean.parquet, rejects.csv, report.json",
    output=lambda layout: layout.validate.dir, reads=lambda run: (raw_dir(run),), task_id="validate_dataset",
    child_process=True,
    doc="""
    Check `styles.csv` and every image: `validate/clean.parquet`, `rejects.csv` (each rejected line with
    its reason) and `report.json`. Fails without retrying when a quality gate fails. Runs as a child
    process (`python -m fashion_tagger validate RUN`): its image checks use a process pool, and a Celery
    worker's task process is a daemon, which may not start processes of its own.
    """,
)
def validate(run: Run) -> StageResult:
    """Check styles.csv and every image of the fetched dataset: `validate/` (clean table, rejects, report)."""
    from fashion_tagger.data.validate import validate_dataset

    return validate_dataset(raw_dir(run), run.layout.validate.dir, run.config)


def raw_dir(run: Run) -> Path:
    """The raw dataset folder fetch made, in this machine's copy of the home."""
    return run.config.layout.localize(stage_result(run.layout, "fetch")["raw_dir"])


@register_stage(
    summary="Encode labels and write a stratified train/validation/test split (duplicate images kept together)",
    output=lambda layout: layout.split.dir, reads=lambda run: (run.layout.validate.dir,), task_id="build_splits",
    doc="Encode the labels and write the train/validation/test parts to `split/` (an image once in test stays).",
)
def split(run: Run) -> StageResult:
    """Encode the labels and split the clean table: `split/` (parts, labels.json, split report)."""
    from fashion_tagger.data.fingerprint import write_fingerprint
    from fashion_tagger.data.split import split_dataset

    config = run.config
    from fashion_tagger.coordination.membership import MembershipRecord

    record = config.layout.test_membership(config.split.test_fraction, config.split.seed).stem
    result = split_dataset(run.layout.validate.dir, run.layout.split.dir, config,
                           test_membership=MembershipRecord(run.workspace.coordinator, record))
    result.fingerprint = write_fingerprint(config, run.layout.split.dir)["fingerprint"]
    return result


@register_stage(
    summary="Resize every image once into the content-addressed cache shared by all runs",
    output=lambda layout: layout.split.dir, task_id="prepare_images",
    child_process=True,
    doc="""
    Resize every image of the split once into the shared cache `<home>/cache/`, keyed by content hash.
    Runs as a child process (`python -m fashion_tagger prepare RUN`): its worker pool starts processes that
    re-import the main module, which inside an Airflow worker is Airflow itself.
    """,
)
def prepare(run: Run) -> StageResult:
    """Resize every image of the split once into the shared cache `<home>/cache/`."""
    from fashion_tagger.runs.staging import prepare_into_home

    return prepare_into_home(run)


@register_stage(
    summary="Train the tagger, or resume it from its last checkpoint",
    output=lambda layout: layout.train.dir, reads=lambda run: (run.layout.split.dir,), images=True,
    task_id="train_model", child_process=True, gpu=True, per_device=True, timeout_hours=12, skip_when_unchanged=True,
    doc="""
    Train in a child process (`python -m fashion_tagger train RUN`, torchrun when the task has several GPUs)
    so CUDA never starts inside the worker; its output streams into this log. Writes `train/checkpoints/`
    and `train/metrics.json`; a retry resumes from `train/checkpoints/last.ckpt`.

    Skipped, with the reason in this log, when the data, labels and training configuration equal the
    champion's (their fingerprint); evaluation and registration are then skipped too. `force` trains anyway.
    """,
)
def train(run: Run) -> StageResult:
    """Train, or resume from `train/checkpoints/last.ckpt`: no completed epoch is trained again."""
    from fashion_tagger.training.train import train_model

    return train_model(run.config, split_dir=run.layout.split.dir, run_dir=run.layout.train.dir)


@register_stage(
    summary="Per-attribute and per-class metrics, confusion matrices and plots",
    output=lambda layout: layout.train.eval.dir, reads=lambda run: (run.layout.split.dir,), images=True,
    task_id="evaluate_model",
    child_process=True, gpu=True, timeout_hours=2,
    doc="""
    Score the best checkpoint on the test part (the headline) and the validation part in a child process:
    per-attribute and per-class metrics, confusion matrices and plots in `train/eval/`.
    """,
)
def evaluate(run: Run) -> StageResult:
    """Score the best checkpoint on the test part (the headline) and the validation part: `train/eval/`."""
    from fashion_tagger.evaluation.evaluate import evaluate_run

    return evaluate_run(run.layout.train.dir, run.config, split_dir=run.layout.split.dir)


@register_stage(
    summary="Register the model in MLflow and apply the promotion gate",
    output=lambda layout: layout.train.dir, reads=lambda run: (run.layout.split.dir,), task_id="register_model",
    outlet="fashion_tagger_model",
    outlet_extra=("model_name", "version", "model_uri", "aliases", "decision"),
    doc="""
    Log the run to MLflow, register the model as a new version (alias `challenger`) and apply the
    promotion gate: alias `champion` moves only when the new version beats it on the test part by more than
    the noise (a paired bootstrap). The decision, its interval and reason are recorded on the version. A
    model that is already registered (same weights, labels, preprocessing) is not registered again.
    """,
)
def register(run: Run) -> StageResult:
    """Register the model in MLflow and apply the promotion gate; a tracking server that does not answer is a
    transient error (the task retries, and registering again is a no-op for a version already registered)."""
    from fashion_tagger.core.tracking import tracking_uri, unanswered_is_transient
    from fashion_tagger.registry.register import register_run

    with unanswered_is_transient(tracking_uri(run.config)):
        return register_run(run.layout.train.dir, run.config)


def retrain_stages() -> tuple[str, ...]:
    """What a run skips when nothing changed since the champion: the first `skip_when_unchanged` stage (train)
    and every stage after it, as Airflow skips the tasks downstream of a skipped one."""
    names = stage_names()
    first = next((i for i, stage in enumerate(stages()) if stage.skip_when_unchanged), len(names))
    return names[first:]


def retrain_skip_reason(run: Run, *, force: bool = False) -> str | None:
    """Why training RUN would repeat the champion's training, or None when it should train.

    It trains when FORCE or `train.force` is set, when there is no champion, or when the split's fingerprint
    (`fingerprint.py`: clean data, labels, parts, training configuration) differs from the champion's.
    """
    from fashion_tagger.data.fingerprint import read_fingerprint
    from fashion_tagger.registry.register import champion_fingerprint

    if force or run.config.train.force:
        return None
    mine = read_fingerprint(run.layout.split.dir)
    version, theirs = champion_fingerprint(run.config) if mine else (None, "")
    if version is None or theirs != mine:
        return None
    return (f"nothing changed since champion version {version} of {run.config.registry.model_name}: the same clean "
            f"data, labels, parts and training configuration (fingerprint {mine[:12]}); set force (--force, "
            "train.force=true) to train anyway")


def skip_retraining(run: Run, reason: str) -> None:
    """Record train, evaluate and register (`retrain_stages`) as skipped, with REASON, in the run's state."""
    skipped = retrain_stages()
    with run_lock(run.layout):
        for name in skipped:
            record_stage(run.layout, name, STAGE_SKIPPED, reason=reason)
    log.info("run %s: skipping %s: %s", run.id, ", ".join(skipped), reason)


def run_stage(run: Run, name: str) -> dict[str, Any]:
    """Execute stage NAME of RUN and return its result as a dict; the stage before it must have completed."""
    stage = get_stage(name)
    index = stage_names().index(name)
    if index:
        stage_result(run.layout, stage_names()[index - 1])  # raises, naming the stage to run first
    from fashion_tagger.runs import staging

    if not is_rank_zero():
        # torchrun's other ranks join rank 0's training; rank 0 alone locks the run and records its state.
        staging.stage_in(run, stage)
        return stage.function(run).to_dict()
    with run_lock(run.layout):
        attempts = int(stage_state(run.layout, name).get("attempts", 0))
        log.info("run %s: stage %s%s", run.id, name, f" (attempt {attempts + 1})" if attempts else "")
        record_stage(run.layout, name, STAGE_STARTED)
        started = time.perf_counter()
        try:
            staging.stage_in(run, stage)
            staged = time.perf_counter() - started
            if stage.output is not None and (removed := io.remove_stale_temporaries(stage.output(run.layout))):
                log.info("stage %s: removed %d temporary file(s) left by an interrupted attempt", name, removed)
            result = stage.function(run).to_dict()
            published = time.perf_counter()
            staging.stage_out(run, stage)  # before it is recorded complete: a later stage on any machine finds it
            staged += time.perf_counter() - published
        except Exception as exc:  # Ctrl-C or a kill leaves the stage "started": the run shows as interrupted
            record_stage(run.layout, name, STAGE_FAILED, error=f"{type(exc).__name__}: {exc}"[:2000],
                         seconds=round(time.perf_counter() - started, 2))
            raise
        seconds = round(time.perf_counter() - started, 2)
        if run.workspace.is_remote:
            result["staging_seconds"] = round(staged, 2)
        record_stage(run.layout, name, STAGE_COMPLETE, result=result, seconds=seconds)
        log.info("run %s: stage %s done in %.1f s", run.id, name, seconds)
        return result
