"""The one registry of a run's stages: `@register_stage` declares a stage once, in run order.

Everything that lists stages reads it: the run order and state (`run.py`), `run_stage`, the CLI's stage
commands and `fashion-tagger run`, and the training DAG's tasks. The built-in stages are declared in `stages.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fashion_tagger.core.errors import RunError
from fashion_tagger.core.io import StageResult
from fashion_tagger.core.layout import RunLayout

# The argument is a `runs.run.Run`, not imported: run.py reads this registry for the run order.
StageFunction = TypeVar("StageFunction", bound=Callable[[Any], StageResult])


@dataclass(frozen=True)
class Stage:
    """One stage: what it does, where it writes in the run, and how the training DAG runs it."""

    name: str
    function: Callable[[Any], StageResult]
    summary: str  # one line: the CLI command's help, `fashion-tagger run`'s help
    output: Callable[[RunLayout], Path] | None = None  # its folder in the run; None when it writes outside the run
    # What it reads beyond its own folder, staged in from an object-store home first (`staging.py`): run -> folders.
    reads: Callable[[Any], tuple[Path, ...]] | None = None
    images: bool = False  # reads the prepared images its split lists (staged in as shard batches)
    # What the DAG needs; none of it changes what the stage does.
    task_id: str = ""  # the Airflow task id; default the stage's name
    doc: str = ""  # the task's documentation in the Airflow UI; default the summary
    child_process: bool = False  # runs as `python -m fashion_tagger NAME RUN` rather than inside the worker
    gpu: bool = False  # on the GPU queue and pool
    per_device: bool = False  # one process per device of `train.devices` (torchrun), a pool slot per GPU
    timeout_hours: float | None = None  # the task's execution timeout
    outlet: str | None = None  # name of the asset the task updates
    outlet_extra: tuple[str, ...] = ()  # result keys the asset event carries
    skip_when_unchanged: bool = False  # this stage and every later one are skipped when nothing changed

    @property
    def airflow_task_id(self) -> str:
        return self.task_id or self.name

    @property
    def task_doc(self) -> str:
        return inspect.cleandoc(self.doc) if self.doc else f"{self.summary}."


_registry: dict[str, Stage] = {}  # in declaration order, which is the run order


def register_stage(
    name: str | None = None, *, summary: str, output: Callable[[RunLayout], Path] | None = None, **fields: Any
) -> Callable[[StageFunction], StageFunction]:
    """Declare the decorated `stage(run) -> StageResult` as stage NAME (default: the function's name), after
    every stage declared before it. FIELDS are the other fields of `Stage` (reads, images, task_id, gpu, ...)."""

    def declare(function: StageFunction) -> StageFunction:
        stage = Stage(name or function.__name__, function, summary, output, **fields)
        if stage.name in _registry:
            raise RunError(f"stage {stage.name!r} is declared twice: a stage name names one stage")
        _registry[stage.name] = stage
        return function

    return declare


def stages() -> tuple[Stage, ...]:
    """Every stage, in run order."""
    return tuple(_registry.values())


def stage_names() -> tuple[str, ...]:
    return tuple(_registry)


def get_stage(name: str) -> Stage:
    """The stage called NAME; an error listing the stages when there is none."""
    if name not in _registry:
        raise RunError(f"unknown stage {name!r}: the stages are {', '.join(_registry)}")
    return _registry[name]
