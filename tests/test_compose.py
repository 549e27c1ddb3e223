"""docker-compose.yaml and docker/ without Docker: the compose specification's schema, files it names,
service dependencies, secrets only from .env, the GPU worker's queue and device reservation, and the production
security of the stack: MLflow's sign-in and who holds which credential, loopback-only ports, container hardening,
the MinIO users, and the two linters `make lint-deploy` runs (hadolint, compose-lint) able to fail.

Docker's engine cannot run here, so nothing starts a container: the scripts the containers run are executed
with stand-ins for `mc` and `mlflow` on PATH, and tests/test_native_stack.py runs the MLflow scripts for real."""

from __future__ import annotations

import json
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
    one_shots = {"airflow-init", "minio-init", "mlflow-init", "airflow-cli"}
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
    assert all(p in mlflow for p in ("mlflow[auth]==", "psycopg2", "boto3"))


def test_mlflow_serves_artifacts_from_the_bucket_on_its_own_database(services):
    mlflow = services["mlflow"]
    assert mlflow["command"] == ["mlflow-server"]
    env = _environment(mlflow)
    assert re.fullmatch(r"postgresql://mlflow:\$\{MLFLOW_DB_PASSWORD:\?[^}]*\}@postgres:5432/mlflow",
                        env["MLFLOW_BACKEND_STORE_URI"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://${MLFLOW_BUCKET")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    server = (REPO / "docker" / "mlflow-server.sh").read_text()
    assert "--serve-artifacts" in server and "--artifacts-destination" in server
    dockerfile = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert "docker/mlflow-server.sh /usr/local/bin/mlflow-server" in dockerfile
    init = (REPO / "docker" / "minio-init.sh").read_text()
    assert "mc mb" in init and "MLFLOW_BUCKET" in init
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def _named_volumes(service: dict) -> dict[str, str]:
    """Named volume -> mount path (bind mounts, which start with . or $, left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if source and not source.startswith((".", "$", "/")):
            mounts[source] = rest.split(":")[0]
    return mounts


def test_the_home_is_a_bucket_and_airflow_components_share_the_jwt_secret(compose, services):
    airflow = [n for n in services if n.startswith("airflow-") and n != "airflow-cli"]
    for name in airflow:
        env = _environment(services[name])
        assert env["FASHION_TAGGER_HOME"] == "s3://${FASHION_TAGGER_BUCKET:-fashion-tagger-home}/home", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert _env_example()["FASHION_TAGGER_BUCKET"] == "fashion-tagger-home"
    init = (REPO / "docker" / "airflow-init.sh").read_text()
    assert re.search(r"airflow pools set gpu ", init)


def test_each_worker_has_its_own_scratch_and_shares_no_volume(compose, services):
    scratch = {}
    for name in WORKERS:
        env = _environment(services[name])
        assert env["FASHION_TAGGER_SCRATCH"] == "/opt/fashion-tagger-scratch", name
        mounts = _named_volumes(services[name])
        (volume,) = [v for v, path in mounts.items() if path == env["FASHION_TAGGER_SCRATCH"]]
        scratch[name] = volume
    assert scratch == {"airflow-worker": "scratch-default", "airflow-worker-gpu": "scratch-gpu"}
    # Nothing a worker mounts is mounted by any other service: no folder in common, the store is the only path.
    for name in WORKERS:
        for volume in _named_volumes(services[name]):
            others = [n for n, s in services.items() if n != name and volume in _named_volumes(s)]
            assert not others, f"{name} shares volume {volume} with {others}"
    assert "fashion-tagger-data" not in compose["volumes"], "the shared data volume is gone"
    for dockerfile in ("airflow.Dockerfile", "gpu-worker.Dockerfile"):
        text = (REPO / "docker" / dockerfile).read_text()
        assert "chmod 2775 /opt/fashion-tagger-scratch" in text, "a new scratch volume must be writable by group 0"
        assert "fashion-tagger-data" not in text


def test_workers_reach_the_coordination_database_as_its_own_role(services):
    url = ("postgresql+psycopg2://fashion_tagger:${FASHION_TAGGER_DB_PASSWORD:?set FASHION_TAGGER_DB_PASSWORD in .env}"
           "@postgres:5432/fashion_tagger")
    for name, service in services.items():
        env = _environment(service)
        if name in WORKERS:
            assert env["FASHION_TAGGER_DATABASE_URL"] == url, name
        else:
            assert "FASHION_TAGGER_DATABASE_URL" not in env, f"{name} runs no stage: no coordination credentials"
    assert _environment(services["postgres"])["FASHION_TAGGER_DB_PASSWORD"].startswith("${FASHION_TAGGER_DB_PASSWORD:?")
    postgres_init = (REPO / "docker" / "postgres-init.sh").read_text()
    assert "CREATE ROLE fashion_tagger LOGIN PASSWORD :'fashion_tagger_password'" in postgres_init
    assert "CREATE DATABASE fashion_tagger OWNER fashion_tagger" in postgres_init


def test_postgres_init_creates_each_role_and_database(tmp_path):
    (tmp_path / "bin").mkdir()
    _stub(tmp_path / "bin", "psql", 'echo "ARGS $*" >"$PSQL_LOG"; cat >>"$PSQL_LOG"\n')
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "PSQL_LOG": str(tmp_path / "psql.log"),
           "POSTGRES_USER": "airflow", "POSTGRES_DB": "airflow", "MLFLOW_DB_PASSWORD": "mlflow-pw",
           "FASHION_TAGGER_DB_PASSWORD": "ft-pw"}
    script = str(REPO / "docker" / "postgres-init.sh")
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "psql.log").read_text()
    # Passwords travel as psql variables, quoted by psql, never spliced into the SQL text.
    assert "-v fashion_tagger_password=ft-pw" in log and "ft-pw" not in log.split("\n", 1)[1]
    assert "CREATE DATABASE fashion_tagger OWNER fashion_tagger;" in log
    missing = subprocess.run(["bash", script], env=env | {"FASHION_TAGGER_DB_PASSWORD": ""}, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0 and "set FASHION_TAGGER_DB_PASSWORD in .env" in missing.stderr


# --- production security -------------------------------------------------------------------------------------
ENV_DEFAULT = re.compile(r"\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]+)\}")
# What each service adds back after dropping every capability, and why (see the compose file's comments).
CAPABILITIES = {
    "postgres": {"CHOWN", "DAC_OVERRIDE", "SETGID", "SETUID"},  # chown of the data folder, then gosu
    "redis": {"CHOWN", "SETGID", "SETUID"},  # the same, for /data
}
WORKERS = ("airflow-worker", "airflow-worker-gpu")


def test_mlflow_requires_sign_in_with_its_user_store_in_postgres(services):
    env = _environment(services["mlflow"])
    assert re.fullmatch(r"postgresql://mlflow:\$\{MLFLOW_DB_PASSWORD:\?[^}]*\}@postgres:5432/mlflow_auth",
                        env["MLFLOW_AUTH_DATABASE_URI"])
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name].startswith("${") and ":?" in env[name], f"{name} must be required from .env"
    postgres_init = (REPO / "docker" / "postgres-init.sh").read_text()
    assert "CREATE DATABASE mlflow_auth OWNER mlflow" in postgres_init
    dockerfile = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert '"mlflow[auth]==' in dockerfile, "the auth app needs the mlflow[auth] extra (Flask-WTF)"


def test_only_the_workers_sign_in_to_mlflow_and_as_the_service_user(services):
    for name, service in services.items():
        env = _environment(service)
        if name in WORKERS:
            assert env["MLFLOW_TRACKING_USERNAME"].startswith("${MLFLOW_SERVICE_USERNAME:-"), name
            assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_SERVICE_PASSWORD:?"), name
        elif name == "mlflow-init":
            assert env["MLFLOW_TRACKING_USERNAME"].startswith("${MLFLOW_ADMIN_USERNAME:-")
            assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
        else:
            assert "MLFLOW_TRACKING_PASSWORD" not in env, f"{name} has no business signing in to MLflow"
        holds_admin = any("MLFLOW_ADMIN_PASSWORD" in value for value in env.values())
        assert holds_admin == (name in ("mlflow", "mlflow-init")), f"{name} and the MLflow admin password"
    for name in WORKERS:
        assert services[name]["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    assert services["mlflow-init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_minio_root_credentials_stay_with_minio_and_minio_init(services):
    for name, service in services.items():
        holds_root = any("MINIO_ROOT_" in value for value in _environment(service).values())
        assert holds_root == (name in ("minio", "minio-init")), name
    mlflow = _environment(services["mlflow"])
    assert mlflow["AWS_ACCESS_KEY_ID"].startswith("${MINIO_MLFLOW_USER:?")
    assert mlflow["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_MLFLOW_PASSWORD:?")
    # Every worker reads and writes the home: one MinIO user, the same for all of them.
    for name in WORKERS:
        worker = _environment(services[name])
        assert worker["AWS_ACCESS_KEY_ID"].startswith("${MINIO_WORKER_USER:?"), name
        assert worker["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_WORKER_PASSWORD:?"), name
        assert worker["AWS_ENDPOINT_URL"] == "http://minio:9000", name
    for name, service in services.items():
        if name not in (*WORKERS, "mlflow"):
            assert "AWS_SECRET_ACCESS_KEY" not in _environment(service), f"{name} needs no bucket keys"


def test_published_ports_listen_on_the_bind_address_loopback_by_default(services):
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published.keys() == {"airflow-apiserver", "mlflow", "minio"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port} binds every interface"
    assert _env_example()["BIND_ADDRESS"] == "127.0.0.1"


def test_every_service_drops_privileges_and_has_limits_from_env(services):
    example = _env_example()
    for name, service in services.items():
        assert service.get("security_opt") == ["no-new-privileges:true"], name
        assert service.get("cap_drop") == ["ALL"], name
        assert set(service.get("cap_add", [])) == CAPABILITIES.get(name, set()), name
        assert str(service.get("user", "")).split(":")[0] not in ("0", "root"), f"{name} runs as root"
        assert not service.get("privileged"), name
        for key in ("mem_limit", "cpus"):
            match = ENV_DEFAULT.fullmatch(str(service.get(key, "")))
            assert match, f"{name}: {key} must come from .env with a default, got {service.get(key)!r}"
            assert example.get(match["name"]) == match["default"], f".env.example must show {match['name']}"


def test_images_have_pinned_versions_overridable_from_env(services):
    example = _env_example()
    for name, service in services.items():
        match = ENV_DEFAULT.fullmatch(service["image"])
        assert match, f"{name}: image {service['image']!r} should be ${{VAR:-image:tag}} (a digest goes in .env)"
        image = match["default"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag not in ("latest", "stable", "edge"), f"{name}: {image} has no pinned version"
        assert example[match["name"]] == image, f".env.example must show {match['name']}={image}"


def test_dockerfiles_use_numeric_users_and_pinned_pip_installs():
    for dockerfile in sorted((REPO / "docker").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and all(u.split(":")[0].isdigit() for u in users), f"{dockerfile.name}: USER {users}"
        assert users[-1].split(":")[0] != "0", f"{dockerfile.name} must not end as root"
        for command in re.findall(r"^RUN (pip install .*?)(?:&&|$)", text.replace("\\\n", " "), re.M):
            packages = [w.strip('"') for w in command.split() if not w.startswith("-") and "/" not in w]
            packages = [p for p in packages[2:] if not p.startswith("$") and p != '"${TORCH_INDEX_URL}"']
            for package in packages:
                assert "==" in package, f"{dockerfile.name}: unpinned pip install {package!r}"


def test_every_variable_of_the_compose_file_is_documented_in_env_example():
    example = _env_example()
    text = _compose_text()
    # $${VAR} is the container's own variable, escaped from compose.
    names = {ref["name"] for ref in INTERPOLATION.finditer(text) if text[ref.start() - 1] != "$"}
    # AIRFLOW_PROJ_DIR only moves the dags bind mount of a development checkout, as in Airflow's compose file.
    missing = names - example.keys() - {"AIRFLOW_PROJ_DIR"}
    assert not missing, f"missing from .env.example: {sorted(missing)}"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _minio_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "MC_LOG": str(tmp_path / "mc.log"),
        "POLICY_DIR": str(tmp_path / "policies"),
        "MINIO_ROOT_USER": "root-user", "MINIO_ROOT_PASSWORD": "root-password",
        "MLFLOW_BUCKET": "mlflow", "DATA_BUCKET": "fashion-data", "HOME_BUCKET": "fashion-tagger-home",
        "MINIO_MLFLOW_USER": "mlflow-artifacts", "MINIO_MLFLOW_PASSWORD": "mlflow-secret-0123456789",
        "MINIO_WORKER_USER": "fashion-tagger-worker", "MINIO_WORKER_PASSWORD": "worker-secret-0123456789",
    }


@pytest.fixture()
def fake_mc(tmp_path):
    """An `mc` that logs its arguments, keeps each policy it is given, and answers a second attach of the same
    policy the way MinIO does."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "policies").mkdir()
    _stub(tmp_path / "bin", "mc", '''echo "$*" >>"$MC_LOG"
case "$1 $2 $3" in
  "admin policy create") cp "$6" "$POLICY_DIR/$5.json" ;;
  "admin policy attach")
    if [ -n "${MC_ATTACH_ERROR:-}" ]; then echo "mc: <ERROR> $MC_ATTACH_ERROR" >&2; exit 1; fi ;;
esac
''')
    return tmp_path


def test_minio_init_gives_each_client_a_user_limited_to_its_buckets(fake_mc):
    env = _minio_env(fake_mc)
    result = subprocess.run(["sh", str(REPO / "docker" / "minio-init.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = (fake_mc / "mc.log").read_text().splitlines()
    assert calls[0] == "alias set local http://minio:9000 root-user root-password"
    assert "admin user add local mlflow-artifacts mlflow-secret-0123456789" in calls
    assert "admin user add local fashion-tagger-worker worker-secret-0123456789" in calls
    assert "admin policy attach local mlflow-artifacts --user mlflow-artifacts" in calls
    assert "admin policy attach local fashion-tagger-worker --user fashion-tagger-worker" in calls
    assert "mb --ignore-existing local/mlflow local/fashion-data local/fashion-tagger-home" in calls
    # Root appears only in the alias: no user is given root's keys.
    assert sum("root-password" in call for call in calls) == 1

    def grants(policy: str) -> dict[str, set[str]]:
        document = json.loads((fake_mc / "policies" / f"{policy}.json").read_text())
        out: dict[str, set[str]] = {}
        for statement in document["Statement"]:
            assert statement["Effect"] == "Allow"
            for resource in statement["Resource"]:
                out.setdefault(resource, set()).update(statement["Action"])
        return out

    mlflow = grants("mlflow-artifacts")
    assert mlflow.keys() == {"arn:aws:s3:::mlflow", "arn:aws:s3:::mlflow/*"}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= mlflow["arn:aws:s3:::mlflow/*"]
    worker = grants("fashion-tagger-worker")
    assert worker.keys() == {"arn:aws:s3:::fashion-tagger-home", "arn:aws:s3:::fashion-tagger-home/*",
                             "arn:aws:s3:::fashion-data", "arn:aws:s3:::fashion-data/*"}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= worker["arn:aws:s3:::fashion-tagger-home/*"]
    # The dataset source stays read-only: the workers fetch from it, never change it.
    assert worker["arn:aws:s3:::fashion-data"] == {"s3:GetBucketLocation", "s3:ListBucket"}
    assert worker["arn:aws:s3:::fashion-data/*"] == {"s3:GetObject"}


def test_minio_init_reruns_cleanly_and_fails_on_a_real_error(fake_mc):
    script = str(REPO / "docker" / "minio-init.sh")
    env = _minio_env(fake_mc)
    again = subprocess.run(["sh", script], env=env | {"MC_ATTACH_ERROR": "The specified policy change is already "
                                                      "in effect."}, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    broken = subprocess.run(["sh", script], env=env | {"MC_ATTACH_ERROR": "Access Denied."}, capture_output=True,
                            text=True, timeout=60)
    assert broken.returncode != 0 and "Access Denied" in broken.stderr
    missing = subprocess.run(["sh", script], env=env | {"MINIO_WORKER_PASSWORD": ""}, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1
    assert "MINIO_WORKER_PASSWORD is empty; set it in .env" in missing.stderr


def _mlflow_server_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bin").mkdir(exist_ok=True)
    # Prints what the real `mlflow` would receive: its arguments and the auth app's settings file.
    _stub(tmp_path / "bin", "mlflow", 'echo "ARGS $*"; stat -c "MODE %a" "$MLFLOW_AUTH_CONFIG_PATH"; '
                                      'cat "$MLFLOW_AUTH_CONFIG_PATH"\n')
    return {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:pw@postgres:5432/mlflow",
        "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:p%40ss@postgres:5432/mlflow_auth",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"),
        "MLFLOW_ALLOWED_HOSTS": "mlflow,localhost",
    }


def test_mlflow_server_starts_the_auth_app_with_no_default_permission(tmp_path):
    import configparser

    env = _mlflow_server_env(tmp_path)
    result = subprocess.run(["bash", str(REPO / "docker" / "mlflow-server.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    args = lines[0].split()
    assert args[1:5] == ["server", "--app-name", "basic-auth", "--backend-store-uri"]
    assert "--serve-artifacts" in args and args[args.index("--allowed-hosts") + 1] == "mlflow,localhost"
    assert lines[1] == "MODE 600", "the settings hold a database password: readable by their owner only"
    config = configparser.ConfigParser()
    config.read_string("\n".join(lines[2:]))
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert config["mlflow"]["auth_cache_ttl_seconds"] == "60"
    # configparser reads %% back as %: the percent-encoded password arrives intact.
    assert config["mlflow"]["database_uri"] == env["MLFLOW_AUTH_DATABASE_URI"]
    assert "admin-secret" not in result.stdout, "the admin password stays in the environment, out of the file"


def test_mlflow_server_refuses_to_start_without_the_admin_password(tmp_path):
    env = _mlflow_server_env(tmp_path) | {"MLFLOW_AUTH_ADMIN_PASSWORD": ""}
    result = subprocess.run(["bash", str(REPO / "docker" / "mlflow-server.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "ARGS" not in result.stdout
    assert "MLFLOW_AUTH_ADMIN_PASSWORD is empty; set it in .env" in result.stderr


# --- the linters of `make lint-deploy` ------------------------------------------------------------------------
def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def _compose_lint(path: Path) -> list[dict]:
    """Unsuppressed findings, as `make lint-deploy` grades them."""
    result = subprocess.run([_tool("compose-lint"), "check", "--format", "json", "--no-env", "--strict-config",
                             "--config", str(REPO / ".compose-lint.yml"), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    findings = report["findings"] if isinstance(report, dict) else report
    return [f for f in findings if not f.get("suppressed")]


def test_compose_lint_finds_nothing_of_medium_severity_or_above():
    findings = _compose_lint(COMPOSE)
    serious = [f"{f['service']}: {f['rule_id']} {f['message']}" for f in findings if f["severity"] != "low"]
    assert not serious, "\n".join(serious)


def test_compose_lint_catches_a_service_that_keeps_its_capabilities(tmp_path):
    weakened = tmp_path / "docker-compose.yaml"
    weakened.write_text(COMPOSE.read_text().replace("  cap_drop:\n    - ALL\n", "", 1)
                        .replace('"${BIND_ADDRESS:-127.0.0.1}:5000:5000"', '"5000:5000"'))
    rules = {(f["rule_id"], f["service"]) for f in _compose_lint(weakened)}
    assert ("CL-0006", "airflow-scheduler") in rules and ("CL-0006", "minio") in rules
    assert ("CL-0005", "mlflow") in rules


def test_hadolint_passes_and_catches_a_named_user(tmp_path):
    dockerfiles = sorted(str(p) for p in (REPO / "docker").glob("*.Dockerfile"))
    clean = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", *dockerfiles],
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    named = tmp_path / "named.Dockerfile"
    named.write_text((REPO / "docker" / "mlflow.Dockerfile").read_text().replace("USER 1000", "USER mlflow"))
    caught = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(named)],
                            capture_output=True, text=True, timeout=120)
    assert caught.returncode != 0 and "DL3066" in caught.stdout
