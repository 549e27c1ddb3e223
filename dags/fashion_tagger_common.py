"""What both DAGs of fashion-tagger share, as Airflow objects: GPU routing, retries, assets, the schedule and the
error-contract adapter (their Airflow-free parts are `fashion_tagger.orchestration.dag_support`). Not a DAG file:
`.airflowignore` keeps the DAG processor from parsing it; the DAGs import it from the bundle folder on sys.path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

from fashion_tagger.orchestration import dag_support  # light: no torch/mlflow at parse time

# Deployment settings, read when a DAG file is parsed.
GPU_QUEUE = dag_support.gpu_queue()
GPU_POOL = dag_support.gpu_pool()
RETRIES = dag_support.task_retries()
DEFAULT_ARGS = dag_support.default_args(RETRIES)

ASSETS: dict[str, Asset] = {spec.name: Asset(name=spec.name, uri=spec.uri, group=spec.group)
                            for spec in dag_support.ASSETS}
RAW_DATASET = ASSETS[dag_support.RAW_DATASET.name]
REGISTERED_MODEL = ASSETS[dag_support.REGISTERED_MODEL.name]
CATALOG = ASSETS[dag_support.CATALOG.name]
CATALOG_TAGS = ASSETS[dag_support.CATALOG_TAGS.name]


def schedule(variable: str, default: str, *, or_assets=None):
    """The schedule in $VARIABLE (a cron preset or expression; DEFAULT when unset; `none` for none), or, with
    OR_ASSETS, an event of those assets or that cron, whichever comes first (`none`: the events only)."""
    cron = dag_support.parse_schedule(os.environ.get(variable), default)
    if or_assets is None or cron is None:
        return cron if or_assets is None else or_assets
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=or_assets)


@contextmanager
def errors_follow_the_contract():
    """fashion_tagger.core.errors' contract: bad input fails the task at once (no retry); transient faults and crashes
    are raised as they are, so Airflow retries them."""
    from airflow.sdk.exceptions import AirflowFailException

    with dag_support.final_errors_raise(AirflowFailException):
        yield
