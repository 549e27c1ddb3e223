"""docker-compose.yaml and docker/ without Docker: the compose specification's schema, files it names,
service dependencies, secrets only from .env, and the GPU worker's queue and device reservation."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|_KEY$|TOKEN|FERNET", re.IGNORECASE)
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _compose_text() -> str:
    """The compose file without its comment lines (which may show `${VAR:?...}` as an example)."""
    return "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _check_jsonschema() -> list[str]:
    exe = Path(sys.executable).parent / "check-jsonschema"
    return [str(exe)] if exe.exists() else [shutil.which("check-jsonschema") or "check-jsonschema"]


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def _strings(node, path=""):
    """Every (path, string) in a YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_compose_file_matches_the_compose_specification():
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_broken_file(tmp_path):
    # The check above must be able to fail: a device reservation with a scalar where a list belongs.
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capabilities: gpu"))
    result = _validate(broken)
    assert result.returncode != 0
    assert "capabilities" in result.stdout + result.stderr


def test_the_topology_of_the_official_airflow_compose_file_plus_mlflow_and_minio(services):
    expected = {
        "postgres", "redis", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
        "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "mlflow", "minio", "minio-init",
    }
    assert expected <= services.keys()
    for name, service in services.items():
        if name.startswith("airflow-") and name not in ("airflow-init", "airflow-cli"):
            assert _environment(service)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def test_every_build_context_and_dockerfile_exists(services):
    builds = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"airflow-worker", "airflow-worker-gpu", "mlflow"} <= builds.keys()
    for name, build in builds.items():
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        # COPY sources must exist in the context too, or the build fails on the first missing file.
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
                for source in sources:
                    assert (context / source).exists(), f"{dockerfile.name}: COPY source {source} is missing"


def test_every_mounted_file_and_init_script_exists(services):
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith(("./", "${AIRFLOW_PROJ_DIR:-.}/")):
                path = REPO / source.split("/", 1)[1]
                assert path.exists(), f"{name} mounts {source}, which does not exist"


def test_depends_on_names_defined_services_with_conditions(services):
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        targets = depends if isinstance(depends, dict) else dict.fromkeys(depends, {})
        for target, spec in targets.items():
            assert target in services, f"{name} depends on undefined service {target}"
            assert target != name
            assert spec.get("condition") in allowed, f"{name} -> {target}: a condition is needed"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"


def test_long_running_services_have_health_checks(services):
    one_shots = {"airflow-init", "minio-init", "airflow-cli"}
    for name, service in services.items():
        if name not in one_shots:
            assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"


def test_no_literal_secrets_in_the_compose_file():
    text = _compose_text()
    compose = yaml.safe_load(text)
    for path, value in _strings(compose):
        key = path.rsplit(".", 1)[-1]
        if SECRET_KEY.search(key) and value:
            refs = list(INTERPOLATION.finditer(value))
            assert refs, f"{path} holds a literal secret; read it from .env: ${{VAR:?set VAR in .env}}"
            for ref in refs:
                assert ref["op"] not in ("-", ":-") or not ref["arg"], f"{path}: a secret with a default value"
        # Passwords inside URLs (postgresql://user:pass@host) must be interpolated too.
        for match in re.finditer(r"://[^:/@\s]*:([^@\s]+)@", value):
            assert match.group(1).startswith(("${", "$${")), f"{path}: literal password in a URL"
    # A secret variable never has a non-empty default anywhere in the file.
    for ref in INTERPOLATION.finditer(text):
        if SECRET_KEY.search(ref["name"]) and ref["op"] in ("-", ":-"):
            assert not ref["arg"], f"${{{ref['name']}}} has a default value"


def test_required_variables_are_documented_in_env_example_without_values():
    example = _env_example()
    text = _compose_text()
    required = {ref["name"] for ref in INTERPOLATION.finditer(text) if ref["op"] in (":?", "?")}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_JWT_SECRET", "MINIO_ROOT_PASSWORD"} <= required
    assert required <= example.keys(), f"missing from .env.example: {sorted(required - example.keys())}"
    for name in required:
        if SECRET_KEY.search(name):
            assert example[name] == "", f".env.example must not ship a value for {name}"
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in gitignore


def test_generate_env_fills_every_required_secret(tmp_path):
    env_file = tmp_path / ".env"
    subprocess.run(["bash", str(REPO / "docker" / "generate-env.sh"), str(env_file)], check=True,
                   capture_output=True, timeout=60)
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line and not line.startswith("#"))
    required = {ref["name"] for ref in INTERPOLATION.finditer(_compose_text()) if ref["op"] == ":?"}
    for name in required:
        # Long and URL-safe: the passwords end up inside connection URLs.
        shortest = 16 if SECRET_KEY.search(name) else 1
        assert re.fullmatch(rf"[A-Za-z0-9_=-]{{{shortest},}}", values[name]), f"{name}={values[name]!r}"
    before = env_file.read_text()
    subprocess.run(["bash", str(REPO / "docker" / "generate-env.sh"), str(env_file)], check=True,
                   capture_output=True, timeout=60)
    assert env_file.read_text() == before, "a rerun must keep the secrets already set"


def test_gpu_worker_serves_queue_gpu_and_reserves_nvidia_devices(services):
    worker = services["airflow-worker-gpu"]
    command = worker["command"] if isinstance(worker["command"], str) else " ".join(worker["command"])
    assert re.search(r"celery worker .*(--queues|-q) gpu\b", command), command
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count") == "all" for d in devices)
    assert worker["build"]["dockerfile"] == "docker/gpu-worker.Dockerfile"
    assert "shm_size" in worker, "DataLoader workers need more than Docker's 64 MB of /dev/shm"
    default = services["airflow-worker"]["command"]
    assert re.search(r"(--queues|-q) default\b", default), default
    env = _environment(worker)
    assert env["FASHION_TAGGER_GPU_QUEUE"] == "gpu"


def test_images_route_torch_builds_to_the_right_workers():
    airflow = (REPO / "docker" / "airflow.Dockerfile").read_text()
    gpu = (REPO / "docker" / "gpu-worker.Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}", airflow, re.M)
    assert "whl/cpu" in airflow and "torch.version.cuda" in airflow
    assert "whl/cpu" not in gpu and '"--queues", "gpu"' in gpu
    mlflow = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert all(p in mlflow for p in ("mlflow==", "psycopg2", "boto3"))


def test_mlflow_serves_artifacts_from_the_bucket_on_its_own_database(services):
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"]) if isinstance(mlflow["command"], list) else mlflow["command"]
    assert "--serve-artifacts" in command
    assert re.search(r"--artifacts-destination \"?s3://", command)
    assert re.search(r"--backend-store-uri \"?postgresql://mlflow:[^@]+@postgres:5432/mlflow", command)
    assert _environment(mlflow)["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    init = " ".join(services["minio-init"]["command"])
    assert "mc mb" in init and "MLFLOW_BUCKET" in init
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_airflow_components_share_one_data_volume_and_the_jwt_secret(compose, services):
    airflow = [n for n in services if n.startswith("airflow-") and n != "airflow-cli"]
    for name in airflow:
        service = services[name]
        assert any(str(v).startswith("fashion-tagger-data:") for v in service.get("volumes", [])), name
        env = _environment(service)
        assert env["FASHION_TAGGER_HOME"] == "/opt/fashion-tagger-data"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert "fashion-tagger-data" in compose["volumes"]
    init = (REPO / "docker" / "airflow-init.sh").read_text()
    assert re.search(r"airflow pools set gpu ", init)
