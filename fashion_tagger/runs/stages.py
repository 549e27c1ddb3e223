"""The seven stages of a run, each with one shape: `stage(run) -> result`, its settings from the run's own config.

`run_stage(run, name)` is what every caller uses (the CLI stage commands, `fashion-tagger run`, the DAG's
in-process tasks and its child processes): it holds the run's lock, removes what a killed writer of this stage
left behind, and records the stage as started, complete (with its result) or failed in the run's state.
Heavy modules are imported inside each function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fashion_tagger.core import io
from fashion_tagger.core.io import StageResult
from fashion_tagger.runs.run import (
    STAGE_COMPLETE,
    STAGE_FAILED,
    STAGE_SKIPPED,
    STAGE_STARTED,
    STAGES,
    Run,
    is_rank_zero,
    record_stage,
    run_lock,
    stage_result,
    stage_state,
)

log = logging.getLogger(__name__)


def fetch(run: Run) -> StageResult:
    """Make the configured source available under `<home>/raw/<name>/` (a complete earlier copy is reused)."""
    from fashion_tagger.data.sources import fetch_dataset

    config = run.config
    return fetch_dataset(
        config.data.source,
        config.raw_root,
        s3_endpoint_url=config.data.s3_endpoint_url,
        synthetic_size=config.data.synthetic_size,
        synthetic_seed=config.data.synthetic_seed,
    )


def validate(run: Run) -> StageResult:
    """Check styles.csv and every image of the fetched dataset: `validate/` (clean table, rejects, report)."""
    from fashion_tagger.data.validate import validate_dataset

    return validate_dataset(stage_result(run.layout, "fetch")["raw_dir"], run.layout.validate.dir, run.config)


def split(run: Run) -> StageResult:
    """Encode the labels and split the clean table: `split/` (parts, labels.json, split report)."""
    from fashion_tagger.data.fingerprint import write_fingerprint
    from fashion_tagger.data.split import split_dataset

    config = run.config
    result = split_dataset(run.layout.validate.dir, run.layout.split.dir, config,
                           test_membership=config.layout.test_membership(config.split.test_fraction, config.split.seed))
    result.fingerprint = write_fingerprint(config, run.layout.split.dir)["fingerprint"]
    return result


def prepare(run: Run) -> StageResult:
    """Resize every image of the split once into the shared cache `<home>/cache/`."""
    from fashion_tagger.data.prepare import prepare_images

    return prepare_images(run.layout.split.dir, run.config.cache_root, run.config)


def train(run: Run) -> StageResult:
    """Train, or resume from `train/checkpoints/last.ckpt`: no completed epoch is trained again."""
    from fashion_tagger.training.train import train_model

    return train_model(run.config, split_dir=run.layout.split.dir, run_dir=run.layout.train.dir)


def evaluate(run: Run) -> StageResult:
    """Score the best checkpoint on the test part (the headline) and the validation part: `train/eval/`."""
    from fashion_tagger.evaluation.evaluate import evaluate_run

    return evaluate_run(run.layout.train.dir, run.config, split_dir=run.layout.split.dir)


def register(run: Run) -> StageResult:
    """Register the model in MLflow and apply the promotion gate."""
    from fashion_tagger.registry.register import register_run

    return register_run(run.layout.train.dir, run.config)


STAGE_FUNCTIONS: dict[str, Callable[[Run], StageResult]] = {
    "fetch": fetch,
    "validate": validate,
    "split": split,
    "prepare": prepare,
    "train": train,
    "evaluate": evaluate,
    "register": register,
}
assert tuple(STAGE_FUNCTIONS) == STAGES


RETRAIN_STAGES = ("train", "evaluate", "register")  # what a run skips when nothing changed since the champion


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
    """Record train, evaluate and register as skipped, with REASON, in the run's state."""
    with run_lock(run.layout):
        for name in RETRAIN_STAGES:
            record_stage(run.layout, name, STAGE_SKIPPED, reason=reason)
    log.info("run %s: skipping %s: %s", run.id, ", ".join(RETRAIN_STAGES), reason)


def _output_dir(run: Run, name: str) -> Path | None:
    """Where a stage writes inside the run (its atomic-write temporaries are cleaned from there)."""
    layout = run.layout
    return {
        "validate": layout.validate.dir,
        "split": layout.split.dir,
        "prepare": layout.split.dir,
        "train": layout.train.dir,
        "evaluate": layout.train.eval.dir,
        "register": layout.train.dir,
    }.get(name)


def run_stage(run: Run, name: str) -> dict[str, Any]:
    """Execute stage NAME of RUN and return its result as a dict; the stage before it must have completed."""
    if name not in STAGE_FUNCTIONS:
        from fashion_tagger.core.errors import RunError

        raise RunError(f"unknown stage {name!r}: the stages are {', '.join(STAGES)}")
    index = STAGES.index(name)
    if index:
        stage_result(run.layout, STAGES[index - 1])  # raises, naming the stage to run first
    if not is_rank_zero():
        # torchrun's other ranks join rank 0's training; rank 0 alone locks the run and records its state.
        return STAGE_FUNCTIONS[name](run).to_dict()
    with run_lock(run.layout):
        output_dir = _output_dir(run, name)
        if output_dir is not None and (removed := io.remove_stale_temporaries(output_dir)):
            log.info("stage %s: removed %d temporary file(s) left by an interrupted attempt", name, removed)
        attempts = int(stage_state(run.layout, name).get("attempts", 0))
        log.info("run %s: stage %s%s", run.id, name, f" (attempt {attempts + 1})" if attempts else "")
        record_stage(run.layout, name, STAGE_STARTED)
        started = time.perf_counter()
        try:
            result = STAGE_FUNCTIONS[name](run).to_dict()
        except Exception as exc:  # Ctrl-C or a kill leaves the stage "started": the run shows as interrupted
            record_stage(run.layout, name, STAGE_FAILED, error=f"{type(exc).__name__}: {exc}"[:2000],
                         seconds=round(time.perf_counter() - started, 2))
            raise
        seconds = round(time.perf_counter() - started, 2)
        record_stage(run.layout, name, STAGE_COMPLETE, result=result, seconds=seconds)
        log.info("run %s: stage %s done in %.1f s", run.id, name, seconds)
        return result
