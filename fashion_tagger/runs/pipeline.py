"""Every stage of a run in order, in one process, without Airflow: `fashion-tagger run` and `run --resume`.

The DAG runs the same `stages.run_stage` task by task. A resumed run continues after its last completed stage;
its training continues from `last.ckpt`, so no completed epoch is trained again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_tagger.core.io import StageResult
from fashion_tagger.runs.run import STAGE_COMPLETE, STAGE_SKIPPED, Run, read_state, run_lock
from fashion_tagger.runs.stage_registry import stage_names
from fashion_tagger.runs.stages import run_stage

log = logging.getLogger(__name__)


@dataclass
class PipelineResult(StageResult):
    run_id: str
    run_root: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # completed by an earlier attempt of this run
    not_retrained: str = ""  # why train, evaluate and register were skipped (nothing changed), if they were
    summary: str = ""


def run_all(run: Run, *, force: bool = False) -> PipelineResult:
    """Every stage in run order (fetch -> ... -> register); completed stages are kept as they are.

    Train, evaluate and register (`stages.retrain_stages`) are skipped when nothing changed since the champion
    (`stages.retrain_skip_reason`) unless FORCE or `train.force` is set.
    """
    from fashion_tagger.registry.versions import describe_registration
    from fashion_tagger.runs.stages import retrain_skip_reason, retrain_stages, skip_retraining

    result = PipelineResult(run_id=run.id, run_root=run.root)
    with run_lock(run.layout):  # for the whole run, so a second `run --resume` of it fails at once
        retrain = retrain_stages()
        for name in stage_names():
            entry = read_state(run.layout)["stages"].get(name, {})
            # A stage skipped by an earlier attempt (nothing changed) runs when this one is forced.
            if entry.get("status") == STAGE_COMPLETE or (entry.get("status") == STAGE_SKIPPED and not force):
                log.info("run %s: stage %s already %s, skipping it", run.id, name, entry["status"])
                result.skipped.append(name)
                result.stages[name] = entry.get("result", {})
                result.not_retrained = result.not_retrained or entry.get("reason", "")
                continue
            if retrain and name == retrain[0] and (reason := retrain_skip_reason(run, force=force)):
                skip_retraining(run, reason)
                result.not_retrained = reason
                result.skipped += list(retrain)
                break
            result.stages[name] = run_stage(run, name)
            result.seconds[name] = read_state(run.layout)["stages"][name].get("seconds", 0.0)
    if result.not_retrained:
        result.summary = f"skipped training, evaluation and registration: {result.not_retrained}"
    else:
        result.summary = describe_registration(result.stages["register"])
    return result
