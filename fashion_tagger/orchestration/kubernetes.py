"""The pod a KubernetesExecutor runs a GPU stage in: the `executor_config` of `train_model` and `evaluate_model`,
a `pod_override` (GPU image, `nvidia.com/gpu`, node selector, tolerations, the home's environment, a scratch
emptyDir) merged into the executor's pod template. The DAG builds it only when Airflow's executor runs pods
(`runs_pods`): a serialized V1Pod makes every Airflow process that reads the DAG import `kubernetes`, and Airflow
3.3 remembers a failed first import for good (see docker/airflow-plugins/fashion_tagger_kubernetes.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from fashion_tagger.core.errors import ConfigError

IMAGE_ENV = "FASHION_TAGGER_K8S_GPU_IMAGE"
NODE_SELECTOR_ENV = "FASHION_TAGGER_K8S_NODE_SELECTOR"
TOLERATIONS_ENV = "FASHION_TAGGER_K8S_TOLERATIONS"
SECRET_ENV = "FASHION_TAGGER_K8S_SECRET"
SCRATCH_SIZE_ENV = "FASHION_TAGGER_K8S_SCRATCH_SIZE"
SHM_SIZE_ENV = "FASHION_TAGGER_K8S_SHM_SIZE"

# The image docker-compose.yaml builds for the gpu-queue worker (docker/gpu-worker.Dockerfile).
DEFAULT_IMAGE = "fashion-tagger-gpu-worker:0.1.0"
DEFAULT_SHM_SIZE = "16Gi"
# The KubernetesExecutor merges an override into its template's container of this name.
CONTAINER = "base"
GPU_RESOURCE = "nvidia.com/gpu"
SCRATCH_PATH = "/opt/fashion-tagger-scratch"
SCRATCH_VOLUME = "fashion-tagger-scratch"
SHM_VOLUME = "dshm"

# Settings without a credential in them, copied from the scheduler's environment where it has them. The database
# URL may hold a password: it is copied only when it holds none and no Secret is named (see _plain_env).
PLAIN_ENV = ("FASHION_TAGGER_HOME", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")
DATABASE_URL_ENV = "FASHION_TAGGER_DATABASE_URL"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
KUBERNETES_EXECUTOR = "KubernetesExecutor"

_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = re.compile(rf"({_DNS_SUBDOMAIN}/)?{_LABEL_NAME}")
LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")
SECRET_NAME = re.compile(_DNS_SUBDOMAIN)
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?([KMGTPE]i?|[kmMGTPE]|e[0-9]+)?")
_PASSWORD_IN_URL = re.compile(r"://[^/@:]*:[^/@]+@")


def parse_node_selector(raw: str | None) -> dict[str, str]:
    """`key=value,key2=value2` as a node selector; empty or unset is none."""
    selector: dict[str, str] = {}
    for item in _items(raw):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
            raise ConfigError(f"${NODE_SELECTOR_ENV}: {item!r} is not key=value with a Kubernetes label key and "
                              f"value (e.g. nvidia.com/gpu.present=true,pool=gpu)")
        if key in selector:
            raise ConfigError(f"${NODE_SELECTOR_ENV}: {key!r} is given twice; give each label key once")
        selector[key] = value
    return selector


def parse_tolerations(raw: str | None) -> list[dict[str, str]]:
    """`key=value:Effect,key:Effect` as tolerations: `Equal` with a value, `Exists` without one."""
    tolerations = []
    for item in _items(raw):
        spec, sep, effect = (part.strip() for part in item.rpartition(":"))
        key, eq, value = (part.strip() for part in spec.partition("="))
        if not sep or effect not in EFFECTS or not LABEL_KEY.fullmatch(key) or (eq and not value) \
                or not LABEL_VALUE.fullmatch(value):
            raise ConfigError(f"${TOLERATIONS_ENV}: {item!r} is not key=value:Effect or key:Effect with Effect one "
                              f"of {', '.join(EFFECTS)} (e.g. nvidia.com/gpu:NoSchedule)")
        toleration = {"key": key, "operator": "Equal" if eq else "Exists", "effect": effect}
        if eq:
            toleration["value"] = value
        tolerations.append(toleration)
    return tolerations


def _items(raw: str | None) -> list[str]:
    return [item.strip() for item in (raw or "").split(",") if item.strip()]


def _image(env: Mapping[str, str]) -> str:
    image = env.get(IMAGE_ENV, "").strip() or DEFAULT_IMAGE
    if re.search(r"\s", image) or image.startswith((":", "@", "/")):
        raise ConfigError(f"${IMAGE_ENV}: {image!r} is not an image reference (registry/name:tag or name@sha256:...)")
    return image


def _secret(env: Mapping[str, str]) -> str | None:
    name = env.get(SECRET_ENV, "").strip()
    if name and (len(name) > 253 or not SECRET_NAME.fullmatch(name)):
        raise ConfigError(f"${SECRET_ENV}: {name!r} is not a Secret name (lowercase letters, digits, '-' and '.', "
                          f"at most 253 characters)")
    return name or None


def _quantity(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name, "").strip() or default
    if value is not None and not QUANTITY.fullmatch(value):
        raise ConfigError(f"${name}: {value!r} is not a Kubernetes quantity (e.g. 16Gi, 500M)")
    return value


def _plain_env(env: Mapping[str, str], secret: str | None) -> dict[str, str]:
    """What the pod's environment gets as literal values. A pod override is stored in the metadata database and
    shown by `kubectl get pod -o yaml`, so no credential goes into it: with a Secret named, the database URL and the
    store's and MLflow's credentials come from it (envFrom); without one, a database URL that holds a password is
    left to the executor's pod template (the Helm values' `secret` entries put it there)."""
    values = {name: env[name] for name in PLAIN_ENV if env.get(name)}
    url = env.get(DATABASE_URL_ENV, "")
    if url and secret is None and not _PASSWORD_IN_URL.search(url):
        values[DATABASE_URL_ENV] = url
    values["FASHION_TAGGER_SCRATCH"] = SCRATCH_PATH
    return values


def gpu_pod_spec(gpus: int, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The pod override as the Kubernetes API's JSON (camelCase keys), from the settings in ENV (default: this
    process's environment). Every bad setting is a one-line ConfigError naming its variable."""
    env = os.environ if env is None else env
    if gpus < 1:
        raise ConfigError(f"a GPU stage needs at least one GPU, not {gpus}")
    secret = _secret(env)
    scratch: dict[str, Any] = {}
    if size := _quantity(env, SCRATCH_SIZE_ENV, None):
        scratch["sizeLimit"] = size
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": _image(env),
        "resources": {"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}},
        "env": [{"name": name, "value": value} for name, value in _plain_env(env, secret).items()],
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": SCRATCH_PATH},
                         # DataLoader workers pass batches through /dev/shm, 64 MB in a pod unless mounted.
                         {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
    }
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": SCRATCH_VOLUME, "emptyDir": scratch},
                    {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory",
                                                      "sizeLimit": _quantity(env, SHM_SIZE_ENV, DEFAULT_SHM_SIZE)}}],
    }
    if selector := parse_node_selector(env.get(NODE_SELECTOR_ENV)):
        spec["nodeSelector"] = selector
    if tolerations := parse_tolerations(env.get(TOLERATIONS_ENV)):
        spec["tolerations"] = tolerations
    return spec


def runs_pods(executors: str) -> bool:
    """Whether Airflow's `[core] executor` setting runs tasks as pods: one executor or a comma-separated list, each
    a name (`KubernetesExecutor`), a class path or `alias:class.path`."""
    classes = (item.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1] for item in executors.split(","))
    return KUBERNETES_EXECUTOR in classes


def gpu_executor_config(gpus: int, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """`{"pod_override": V1Pod}` for a GPU stage that uses GPUS devices, or None when the `kubernetes` package is not
    installed (a Celery deployment: the executor ignores executor_config, and the DAG must parse without it)."""
    try:
        from kubernetes.client import models as k8s
    except ImportError:
        return None
    spec = gpu_pod_spec(gpus, env)
    container = spec["containers"][0]
    pod_spec = k8s.V1PodSpec(
        containers=[k8s.V1Container(
            name=container["name"],
            image=container["image"],
            resources=k8s.V1ResourceRequirements(**container["resources"]),
            env=[k8s.V1EnvVar(**item) for item in container["env"]],
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=item["secretRef"]["name"]))
                      for item in container.get("envFrom", [])] or None,
            volume_mounts=[k8s.V1VolumeMount(name=m["name"], mount_path=m["mountPath"])
                           for m in container["volumeMounts"]],
        )],
        volumes=[k8s.V1Volume(name=v["name"], empty_dir=k8s.V1EmptyDirVolumeSource(
            medium=v["emptyDir"].get("medium"), size_limit=v["emptyDir"].get("sizeLimit"))) for v in spec["volumes"]],
        node_selector=spec.get("nodeSelector"),
        tolerations=[k8s.V1Toleration(**t) for t in spec.get("tolerations", [])] or None,
    )
    return {"pod_override": k8s.V1Pod(spec=pod_spec)}
