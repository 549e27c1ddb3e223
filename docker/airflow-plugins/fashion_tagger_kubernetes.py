"""Airflow plugin: under a KubernetesExecutor, import the `kubernetes` client once, at start, in the main thread.

The training DAG's GPU tasks then carry a serialized V1Pod (their `pod_override`), and every Airflow process that
reads the DAG (the API server above all) imports `kubernetes` on first use. The API server answers requests in
threads, the UI asks for several of a DAG's views at once, and the client's lazy package fails when two threads
import it first together ("cannot import name 'ApiClient'", or a `_DeadlockError`). Airflow 3.3 caches that failed
import (`serialized_objects._has_kubernetes`), so the DAG stays undeserializable ("An unexpected error occurred while
trying to deserialize Dag") until the process restarts. Importing here, as the plugins load (before any request),
avoids the race.

The images copy this file into the plugins folder (/opt/airflow/plugins); it does nothing under any other executor.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk.configuration import conf

from fashion_tagger.orchestration.kubernetes import runs_pods


def preload_kubernetes() -> bool:
    """Import the client modules Airflow's (de)serialization of pods uses; False when the package is missing."""
    try:
        from kubernetes.client import models  # noqa: F401
        from kubernetes.client.api_client import ApiClient  # noqa: F401
    except ImportError:
        return False
    from airflow.serialization.serialized_objects import _has_kubernetes

    return _has_kubernetes(attempt_import=True)


class FashionTaggerKubernetesPlugin(AirflowPlugin):
    name = "fashion_tagger_kubernetes"

    @classmethod
    def on_load(cls, *args, **kwargs) -> None:
        if runs_pods(conf.get("core", "executor", fallback="")) and not preload_kubernetes():
            raise RuntimeError("the KubernetesExecutor needs the `kubernetes` package: pip install kubernetes")
