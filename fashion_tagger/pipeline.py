"""Every stage in order, in one process, without Airflow: `fashion-tagger run`.

The DAG runs the same stage functions task by task; both write a run's outputs under `<home>/runs/<run id>/`
(`orchestration.RunPaths`) and share the raw downloads and the prepared-image cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fashion_tagger import stages
from fashion_tagger.config import Config, save_config
from fashion_tagger.io import StageResult
from fashion_tagger.orchestration import run_paths

log = logging.getLogger(__name__)


@dataclass
class PipelineResult(StageResult):
    run_root: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    summary: str = ""


def run_all(config: Config, run_id: str | None = None) -> PipelineResult:
    """fetch -> validate -> split -> prepare -> train -> evaluate -> register, each stage's summary kept."""
    from fashion_tagger.evaluate import evaluate_run
    from fashion_tagger.registry import describe_registration, register_run
    from fashion_tagger.train import train_model

    paths = run_paths(config, run_id or f"cli__{datetime.now(UTC):%Y-%m-%dT%H-%M-%S}")
    save_config(config, paths.root)
    result = PipelineResult(run_root=paths.root)

    def stage(name: str, call):
        log.info("stage %s ...", name)
        started = time.perf_counter()
        outcome = call()
        result.seconds[name] = round(time.perf_counter() - started, 2)
        result.stages[name] = outcome.to_dict()
        log.info("stage %s done in %.1f s", name, result.seconds[name])
        return outcome

    fetched = stage("fetch", lambda: stages.fetch(config))
    stage("validate", lambda: stages.validate(config, fetched.raw_dir, paths.validate))
    stage("split", lambda: stages.split(config, paths.validate, paths.split))
    stage("prepare", lambda: stages.prepare(config, paths.split))
    stage("train", lambda: train_model(config, split_dir=paths.split, run_dir=paths.train))
    stage("evaluate", lambda: evaluate_run(paths.train, split_dir=paths.split))
    registration = stage("register", lambda: register_run(paths.train, config))
    result.summary = describe_registration(registration)
    return result

