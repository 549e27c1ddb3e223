"""What every DAG of the project shares and that needs no Airflow: `default_args`, the error contract's orchestrator
side, the deployment settings read from the environment (GPU queue and pool, retries, timeouts, schedules) and
the assets' names and URIs. `dags/fashion_tagger_common.py` turns them into Airflow objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fashion_tagger.core.errors import ConfigError, FashionTaggerError

GPU_QUEUE_ENV = "FASHION_TAGGER_GPU_QUEUE"
GPU_POOL_ENV = "FASHION_TAGGER_GPU_POOL"
RETRIES_ENV = "FASHION_TAGGER_TASK_RETRIES"  # `make run` sets 0 to fail fast
TRAIN_GPUS_ENV = "FASHION_TAGGER_TRAIN_GPUS"
RETRY_DELAY_ENV = "FASHION_TAGGER_TASK_RETRY_DELAY_S"  # the first retry's delay; later ones double, up to 30 min
MAX_ACTIVE_RUNS_ENV = "FASHION_TAGGER_MAX_ACTIVE_RUNS"  # training runs at once; they coordinate through leases
MANUAL_SCHEDULES = ("", "none", "null", "manual")


@dataclass(frozen=True)
class AssetSpec:
    name: str
    uri: str
    group: str


RAW_DATASET = AssetSpec("fashion_tagger_raw_dataset", "x-fashion-tagger://raw-dataset", "dataset")
# Updated by the training DAG's registration; an event means a new version, maybe a new champion.
REGISTERED_MODEL = AssetSpec("fashion_tagger_model", "x-fashion-tagger://registered-model", "model")
# Updated by whatever loads new product photos (another DAG, or the REST API's asset events).
CATALOG = AssetSpec("fashion_tagger_catalog", "x-fashion-tagger://catalog", "catalog")
CATALOG_TAGS = AssetSpec("fashion_tagger_catalog_tags", "x-fashion-tagger://catalog-tags", "catalog")
ASSETS: tuple[AssetSpec, ...] = (RAW_DATASET, REGISTERED_MODEL, CATALOG, CATALOG_TAGS)


def _from_env(name: str, default: float, kind: type[int] | type[float]) -> Any:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"${name} must be {'a whole number' if kind is int else 'a number'}, not {raw!r}") from None


def gpu_queue() -> str:
    return os.environ.get(GPU_QUEUE_ENV, "gpu")


def gpu_pool() -> str:
    return os.environ.get(GPU_POOL_ENV, "gpu")


def task_retries() -> int:
    return int(_from_env(RETRIES_ENV, 2, int))


def max_active_runs() -> int:
    """Training DAG runs active at once (default 1). More may overlap safely: fetch, preparation, the test part and
    registration are leases in the coordination database, and training waits for the GPU pool's slots."""
    value = int(_from_env(MAX_ACTIVE_RUNS_ENV, 1, int))
    if value < 1:
        raise ConfigError(f"${MAX_ACTIVE_RUNS_ENV} must be at least 1, not {value}")
    return value


def retry_delay() -> timedelta:
    """The delay before a task's first retry: ${RETRY_DELAY_ENV} seconds, default 60."""
    seconds = float(_from_env(RETRY_DELAY_ENV, 60, float))
    if seconds < 0:
        raise ConfigError(f"${RETRY_DELAY_ENV} must be zero or more seconds, not {seconds:g}")
    return timedelta(seconds=seconds)


def train_gpus() -> int:
    """GPUs one training reserves: its pool slots and its processes (`train.devices`); at least one."""
    return max(int(_from_env(TRAIN_GPUS_ENV, 1, int)), 1)


def timeout_from_env(name: str, default_hours: float) -> timedelta:
    """$FASHION_TAGGER_<NAME>_TIMEOUT_HOURS, else DEFAULT_HOURS: a task's execution timeout."""
    return timedelta(hours=_from_env(f"FASHION_TAGGER_{name.upper()}_TIMEOUT_HOURS", default_hours, float))


def parse_schedule(value: str | None, default: str) -> str | None:
    """A schedule setting: unset is DEFAULT, `none` (or empty, `null`, `manual`) is None, anything else is taken
    as a cron preset or expression (`@daily`, `0 3 * * 1`)."""
    if value is None:
        return default
    value = value.strip()
    return None if value.lower() in MANUAL_SCHEDULES else value


def default_args(retries: int) -> dict[str, Any]:
    """Airflow `default_args` of the project's DAGs: RETRIES with exponential backoff from `retry_delay()` (1 minute
    by default) to 30 minutes."""
    return {
        "owner": "fashion-tagger",
        "retries": retries,
        "retry_delay": retry_delay(),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }


@contextmanager
def final_errors_raise(fail: type[Exception]) -> Iterator[None]:
    """The orchestrator's side of the error contract (errors.py): bad input is re-raised as FAIL (Airflow's
    AirflowFailException: no retry, a retry would meet the same input); transient faults and crashes propagate
    unchanged, so the orchestrator retries them."""
    try:
        yield
    except FashionTaggerError as exc:
        if not exc.retryable:
            raise fail(f"{type(exc).__name__}: {exc}") from exc
        raise
