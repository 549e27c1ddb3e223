"""Every stage of a run in order, in one process, without Airflow: `fashion-tagger run` and `run --resume`.

The DAG runs the same `stages.run_stage` task by task. A resumed run continues after its last completed stage;
its training continues from `last.ckpt`, so no completed epoch is trained again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_tagger.io import StageResult
from fashion_tagger.runs import STAGE_COMPLETE, STAGES, Run, read_state, run_lock
from fashion_tagger.stages import run_stage

log = logging.getLogger(__name__)


@dataclass
class PipelineResult(StageResult):
    run_id: str
    run_root: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # completed by an earlier attempt of this run
    summary: str = ""


def run_all(run: Run) -> PipelineResult:
    """fetch -> validate -> split -> prepare -> train -> evaluate -> register; completed stages are kept as they are."""
    from fashion_tagger.registry import describe_registration

    result = PipelineResult(run_id=run.id, run_root=run.root)
    with run_lock(run.layout):  # for the whole run, so a second `run --resume` of it fails at once
        for name in STAGES:
            entry = read_state(run.layout)["stages"].get(name, {})
            if entry.get("status") == STAGE_COMPLETE:
                log.info("run %s: stage %s already complete, skipping it", run.id, name)
                result.skipped.append(name)
                result.stages[name] = entry.get("result", {})
                continue
            result.stages[name] = run_stage(run, name)
            result.seconds[name] = read_state(run.layout)["stages"][name].get("seconds", 0.0)
    result.summary = describe_registration(result.stages["register"])
    return result
