"""The GPU stages' pod under a KubernetesExecutor (`fashion_tagger.orchestration.kubernetes`), built with the real
`kubernetes` client models and serialised the way Airflow stores it; the training DAG's GPU tasks carrying it; and
the Helm values file (`docker/helm-values.yaml`) holding the environment contract with no shared volume for the home.
Nothing here reaches a cluster or the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fashion_tagger.core.errors import ConfigError
from fashion_tagger.orchestration import kubernetes as pods

k8s = pytest.importorskip("kubernetes.client")

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
HELM_VALUES = REPO / "docker" / "helm-values.yaml"
GPU_TASKS = {"train_model": "FASHION_TAGGER_TRAIN_GPUS", "evaluate_model": None}
SCHEDULER_ENV = {
    "FASHION_TAGGER_HOME": "s3://fashion-tagger-home/home",
    "AWS_ENDPOINT_URL": "http://minio:9000",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "FASHION_TAGGER_DATABASE_URL": "postgresql+psycopg2://fashion_tagger:s3cret-pw@postgres:5432/fashion_tagger",
    "AWS_SECRET_ACCESS_KEY": "never-in-a-pod-spec",
    "MLFLOW_TRACKING_PASSWORD": "never-in-a-pod-spec-either",
}


def _pod_dict(config: dict) -> dict:
    pod = config["pod_override"]
    assert isinstance(pod, k8s.V1Pod)
    return k8s.ApiClient().sanitize_for_serialization(pod)


def _container(config: dict) -> dict:
    (container,) = _pod_dict(config)["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_the_override_asks_for_the_gpus_in_the_gpu_image_on_the_base_container():
    config = pods.gpu_executor_config(2, {"FASHION_TAGGER_K8S_GPU_IMAGE": "registry.example.com/ft-gpu:1.2@sha256:ab"})
    container = _container(config)
    assert container["name"] == "base", "the KubernetesExecutor merges the override into its `base` container"
    assert container["image"] == "registry.example.com/ft-gpu:1.2@sha256:ab"
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}
    default = _container(pods.gpu_executor_config(1, {}))
    assert default["image"] == "fashion-tagger-gpu-worker:0.1.0", "the image docker-compose.yaml builds"
    assert default["resources"]["limits"] == {"nvidia.com/gpu": "1"}


def test_scratch_is_an_empty_dir_of_the_pod_and_shm_is_memory_backed():
    config = pods.gpu_executor_config(1, {"FASHION_TAGGER_K8S_SCRATCH_SIZE": "200Gi"})
    spec = _pod_dict(config)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["fashion-tagger-scratch"] == {"name": "fashion-tagger-scratch", "emptyDir": {"sizeLimit": "200Gi"}}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"]), "no shared volume: the home is the store"
    container = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"fashion-tagger-scratch": "/opt/fashion-tagger-scratch", "dshm": "/dev/shm"}
    assert _env(container)["FASHION_TAGGER_SCRATCH"] == "/opt/fashion-tagger-scratch"
    unbounded = _pod_dict(pods.gpu_executor_config(1, {}))["spec"]["volumes"][0]
    assert unbounded == {"name": "fashion-tagger-scratch", "emptyDir": {}}


def test_node_selector_and_tolerations_come_from_the_settings():
    config = pods.gpu_executor_config(1, {
        "FASHION_TAGGER_K8S_NODE_SELECTOR": "nvidia.com/gpu.present=true, pool=a100",
        "FASHION_TAGGER_K8S_TOLERATIONS": "nvidia.com/gpu:NoSchedule,dedicated=ml:NoExecute",
    })
    spec = _pod_dict(config)["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
    ]
    plain = _pod_dict(pods.gpu_executor_config(1, {}))["spec"]
    assert "nodeSelector" not in plain and "tolerations" not in plain


def test_without_a_secret_the_settings_pass_through_but_no_credential_does():
    container = _container(pods.gpu_executor_config(1, SCHEDULER_ENV))
    env = _env(container)
    assert env == {
        "FASHION_TAGGER_HOME": "s3://fashion-tagger-home/home",
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "FASHION_TAGGER_SCRATCH": "/opt/fashion-tagger-scratch",
    }, "a database URL with a password stays out of the pod spec (the pod template's secret entries carry it)"
    assert "envFrom" not in container
    text = json.dumps(container)
    assert "s3cret-pw" not in text and "never-in-a-pod-spec" not in text
    passwordless = SCHEDULER_ENV | {"FASHION_TAGGER_DATABASE_URL": "postgresql+psycopg2://ft@db:5432/fashion_tagger"}
    assert _env(_container(pods.gpu_executor_config(1, passwordless)))["FASHION_TAGGER_DATABASE_URL"] == (
        "postgresql+psycopg2://ft@db:5432/fashion_tagger")


def test_a_named_secret_supplies_the_credentials_through_env_from():
    container = _container(pods.gpu_executor_config(1, SCHEDULER_ENV | {"FASHION_TAGGER_K8S_SECRET": "ft-env"}))
    assert container["envFrom"] == [{"secretRef": {"name": "ft-env"}}]
    env = _env(container)
    assert "FASHION_TAGGER_DATABASE_URL" not in env, "a literal value would shadow the Secret's"
    assert env["FASHION_TAGGER_HOME"] == "s3://fashion-tagger-home/home"
    assert "s3cret-pw" not in json.dumps(container)


@pytest.mark.parametrize(("env", "message"), [
    ({"FASHION_TAGGER_K8S_NODE_SELECTOR": "gpu"}, "$FASHION_TAGGER_K8S_NODE_SELECTOR: 'gpu' is not key=value"),
    ({"FASHION_TAGGER_K8S_NODE_SELECTOR": "pool=a,pool=b"}, "$FASHION_TAGGER_K8S_NODE_SELECTOR: 'pool' is given twice"),
    ({"FASHION_TAGGER_K8S_NODE_SELECTOR": "bad key=x"}, "$FASHION_TAGGER_K8S_NODE_SELECTOR: 'bad key=x' is not"),
    ({"FASHION_TAGGER_K8S_TOLERATIONS": "gpu=true"}, "'gpu=true' is not key=value:Effect"),
    ({"FASHION_TAGGER_K8S_TOLERATIONS": "gpu:Sometimes"}, "with Effect one of NoSchedule, PreferNoSchedule, NoExecute"),
    ({"FASHION_TAGGER_K8S_TOLERATIONS": "gpu=:NoSchedule"}, "$FASHION_TAGGER_K8S_TOLERATIONS: 'gpu=:NoSchedule'"),
    ({"FASHION_TAGGER_K8S_SECRET": "Has_Capitals"}, "$FASHION_TAGGER_K8S_SECRET: 'Has_Capitals' is not a Secret name"),
    ({"FASHION_TAGGER_K8S_GPU_IMAGE": "two words"}, "$FASHION_TAGGER_K8S_GPU_IMAGE: 'two words' is not an image"),
    ({"FASHION_TAGGER_K8S_SCRATCH_SIZE": "lots"}, "$FASHION_TAGGER_K8S_SCRATCH_SIZE: 'lots' is not a Kubernetes"),
    ({"FASHION_TAGGER_K8S_SHM_SIZE": "16 GB"}, "$FASHION_TAGGER_K8S_SHM_SIZE: '16 GB' is not a Kubernetes quantity"),
])
def test_bad_settings_are_one_line_errors_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as caught:
        pods.gpu_executor_config(1, env)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_gpus_below_one_are_refused():
    with pytest.raises(ConfigError, match="at least one GPU"):
        pods.gpu_pod_spec(0, {})


# --- the training DAG -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_dag(tmp_path_factory):
    """As tests/test_dag.py loads it: the dags folder as a bundle, no metadata database; two GPUs per training."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASHION_TAGGER_TRAIN_GPUS", "2")
        mp.setenv("FASHION_TAGGER_K8S_TOLERATIONS", "nvidia.com/gpu:NoSchedule")
        mp.setenv("AIRFLOW__CORE__EXECUTOR", "KubernetesExecutor")
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        from airflow.dag_processing.dagbag import BundleDagBag

        bag = BundleDagBag(str(DAGS), bundle_path=DAGS)
        assert bag.import_errors == {}
        return bag.dags["fashion_tagger_training"]


def test_the_gpu_tasks_carry_the_pod_override_and_the_others_none(training_dag):
    for task in training_dag.tasks:
        if task.task_id not in GPU_TASKS:
            assert not task.executor_config, task.task_id
            continue
        container = _container(task.executor_config)
        expected = "2" if GPU_TASKS[task.task_id] else "1"  # evaluation runs one process on one device
        assert container["resources"]["limits"] == {"nvidia.com/gpu": expected}, task.task_id
        assert _pod_dict(task.executor_config)["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert task.pool_slots == (2 if GPU_TASKS[task.task_id] else 1), task.task_id


def test_the_pod_override_survives_airflows_serialisation(training_dag):
    from airflow.serialization.serialized_objects import DagSerialization

    task = DagSerialization.from_dict(DagSerialization.to_dict(training_dag)).task_dict["train_model"]
    pod = task.executor_config["pod_override"]
    assert isinstance(pod, k8s.V1Pod)
    assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "2"}


@pytest.mark.parametrize(("executors", "pods_"), [
    ("KubernetesExecutor", True),
    ("CeleryExecutor,KubernetesExecutor", True),
    (" CeleryExecutor , airflow.providers.cncf.kubernetes.executors.kubernetes_executor.KubernetesExecutor", True),
    ("k8s:airflow.providers.cncf.kubernetes.executors.kubernetes_executor.KubernetesExecutor", True),
    ("CeleryExecutor", False),
    ("LocalExecutor", False),
    ("", False),
    ("my.KubernetesExecutorLike", False),
])
def test_runs_pods_reads_every_spelling_of_the_executor_setting(executors, pods_):
    assert pods.runs_pods(executors) is pods_


PARSE = textwrap.dedent(
    """
    import json, sys
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(sys.argv[1], bundle_path=sys.argv[1])
    dag = bag.dags["fashion_tagger_training"]
    print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                      "configs": {t.task_id: bool(t.executor_config) for t in dag.tasks}}))
    """
)


def _parse(tmp_path, executor: str, script: str = PARSE, *args: Path, plugins: Path | None = None) -> dict:
    """What SCRIPT prints last (JSON), run on the dags folder in a fresh interpreter under EXECUTOR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_TAGGER_", "AIRFLOW__"))}
    env |= {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor, "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins or tmp_path / "none"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/missing/dir/airflow.db"}
    result = subprocess.run([sys.executable, "-c", script, str(DAGS), *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_under_celery_no_task_carries_a_pod(tmp_path):
    """A serialized pod would make the API server import `kubernetes` for nothing (and risk the race the plugin
    avoids): only a KubernetesExecutor gets one."""
    probe = _parse(tmp_path, "CeleryExecutor")
    assert probe["errors"] == {}
    assert not any(probe["configs"].values()), probe["configs"]


# The serialized DAG as the DAG processor stores it under a KubernetesExecutor, written to argv[2].
SERIALIZE = textwrap.dedent(
    """
    import json, sys
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.serialization.serialized_objects import DagSerialization

    bag = BundleDagBag(sys.argv[1], bundle_path=sys.argv[1])
    with open(sys.argv[2], "w") as out:
        json.dump(DagSerialization.to_dict(bag.dags["fashion_tagger_training"]), out)
    print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}}))
    """
)
# As a fresh API server: plugins loaded, `kubernetes` not imported yet, then the UI's queries deserializing the
# DAG (with its pods) in eight threads at once.
DESERIALIZE_IN_THREADS = textwrap.dedent(
    """
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    from airflow import plugins_manager
    from airflow.serialization.serialized_objects import DagSerialization

    assert "kubernetes" not in sys.modules
    plugins_manager.ensure_plugins_loaded()
    loaded = [p.name for p in plugins_manager._get_plugins()[0]]
    data = json.load(open(sys.argv[2]))

    def deserialize(_):
        try:
            dag = DagSerialization.from_dict(data)
        except Exception as error:
            return f"{type(error).__name__}: {error} ({error.__cause__!r})"
        return type(dag.task_dict["train_model"].executor_config["pod_override"]).__name__

    with ThreadPoolExecutor(8) as pool:
        kinds = list(pool.map(deserialize, range(8)))
    print(json.dumps({"plugins": loaded, "errors": plugins_manager.get_import_errors(), "kinds": kinds}))
    """
)


def test_the_plugin_loads_kubernetes_before_the_api_server_deserializes_pods_in_threads(tmp_path):
    """Without it, two threads importing the client first together can fail, and Airflow remembers the failure: the
    DAG's pages answered 500 ('An unexpected error occurred while trying to deserialize Dag') until a restart."""
    serialized = tmp_path / "dag.json"
    assert _parse(tmp_path, "KubernetesExecutor", SERIALIZE, serialized)["errors"] == {}
    probe = _parse(tmp_path, "KubernetesExecutor", DESERIALIZE_IN_THREADS, serialized,
                   plugins=REPO / "docker" / "airflow-plugins")
    assert probe["plugins"] == ["fashion_tagger_kubernetes"], probe
    assert probe["errors"] == {}
    assert probe["kinds"] == ["V1Pod"] * 8, probe["kinds"]


PARSE_WITHOUT_KUBERNETES = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["kubernetes"] = None  # as if the package were not installed: every import of it fails
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(sys.argv[1], bundle_path=sys.argv[1])
    dag = bag.dags["fashion_tagger_training"]
    print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                      "configs": {t.task_id: bool(t.executor_config) for t in dag.tasks}}))
    """
)


def test_the_dag_parses_without_the_kubernetes_package(tmp_path):
    probe = _parse(tmp_path, "KubernetesExecutor", PARSE_WITHOUT_KUBERNETES)
    assert probe["errors"] == {}
    assert not any(probe["configs"].values()), "without kubernetes no pod is built, even for a KubernetesExecutor"


# --- the Helm values file -------------------------------------------------------------------------------------
CONTRACT_ENV = {"FASHION_TAGGER_HOME", "FASHION_TAGGER_SCRATCH", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}
SECRET_ENV = {"FASHION_TAGGER_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_helm_values_give_every_airflow_container_the_contract_env(helm_values):
    env = {item["name"]: item["value"] for item in helm_values["env"]}
    assert env.keys() >= CONTRACT_ENV
    assert env["FASHION_TAGGER_HOME"].startswith("s3://")
    assert env["FASHION_TAGGER_SCRATCH"] == pods.SCRATCH_PATH
    # Credentials: from one Secret, for the workers and task pods only, never a literal value.
    workers = {item["name"]: item for item in helm_values["workers"]["env"]}
    assert workers.keys() == SECRET_ENV
    assert {item["valueFrom"]["secretKeyRef"]["name"] for item in workers.values()} == {"fashion-tagger-env"}
    assert all("value" not in item for item in workers.values())
    assert not SECRET_ENV & env.keys() and not helm_values.get("secret")
    assert helm_values["executor"] == "CeleryExecutor"
    assert env["FASHION_TAGGER_GPU_QUEUE"] == "gpu"


def test_helm_values_share_no_volume_for_the_home(helm_values):
    for path, key, value in _walk(helm_values):
        if key == "persistence" and isinstance(value, dict) and path.startswith(".workers"):
            assert value.get("enabled") is False, f"{path}: a worker keeps nothing but its scratch"
        if key == "accessModes":
            assert "ReadWriteMany" not in value, f"{path}: no ReadWriteMany volume"
        assert key != "persistentVolumeClaim", f"{path}: no claim shared between pods"
    assert not helm_values.get("volumes") and not helm_values.get("volumeMounts")


def test_helm_values_give_the_gpu_worker_set_its_queue_gpus_and_own_scratch(helm_values):
    celery = helm_values["workers"]["celery"]
    assert celery["queue"] == "default"
    (gpu,) = [s for s in celery["sets"] if s["name"] == "gpu"]
    assert gpu["queue"] == "gpu"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == gpu["resources"]["requests"]["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["tolerations"])
    for worker in (celery, gpu):
        volumes = {v["name"]: v for v in worker["extraVolumes"]}
        mounts = {m["mountPath"]: m["name"] for m in worker["extraVolumeMounts"]}
        scratch = volumes[mounts[pods.SCRATCH_PATH]]
        assert "emptyDir" in scratch or "ephemeral" in scratch, "each worker's scratch is its own, never shared"
    assert "/dev/shm" in {m["mountPath"] for m in gpu["extraVolumeMounts"]}
    assert "nvidia.com/gpu" not in json.dumps(celery.get("resources", {})), "the default set holds no GPU"
