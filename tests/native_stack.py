"""The topology of docker-compose.yaml started natively on loopback ports, for CI where Docker cannot run:
PostgreSQL, Redis, moto's S3 server, an MLflow server on both with its authentication (started by
docker/mlflow-server.sh, its users made by docker/mlflow-init.py, as in the compose file), and Airflow 3 with the
CeleryExecutor (api-server, scheduler, dag-processor, one Celery worker on queue `default` and one on queue `gpu`,
both signed in to MLflow as the service user).

There is no shared folder: the home is `s3://fashion-tagger-home/home` on the S3 server, run state and leases are in
the coordination database `fashion_tagger` on the PostgreSQL server, and each worker stands for a machine of its own
with only its own scratch folder and user home (`machines/<worker>/{scratch,home}`).

`with NativeStack() as stack:` starts everything and stops every process group on exit, also on failure.
`python tests/native_stack.py` keeps a stack up until Ctrl-C and prints where everything is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADMIN_USER = "admin"
BUCKET = "mlflow"
HOME_BUCKET = "fashion-tagger-home"  # docker-compose.yaml's FASHION_TAGGER_BUCKET default
HOME_URL = f"s3://{HOME_BUCKET}/home"
# The MLflow users docker-compose.yaml defaults to (MLFLOW_*_USERNAME in .env.example).
MLFLOW_ADMIN = "admin"
MLFLOW_SERVICE_USER = "fashion-tagger-worker"
MLFLOW_READER = "fashion-tagger-reader"
MLFLOW_USERS = {MLFLOW_ADMIN: "mlflow_admin", MLFLOW_SERVICE_USER: "mlflow_service", MLFLOW_READER: "mlflow_reader"}
# Each Celery worker stands for a machine of its own: its celery nodename and the hostname it reports on
# task instances (through [core] hostname_callable) are the same, as they are in a container.
WORKER_QUEUES = {"default-worker": "default", "gpu-worker": "gpu"}
# Two default-queue tasks at once, so two DAG runs really overlap (fetch, split, prepare); one trainer per GPU.
WORKER_CONCURRENCY = {"default": 2, "gpu": 1}
MAX_ACTIVE_RUNS = 2
RETRY_DELAY_S = 5  # a killed trainer's retry starts within seconds instead of a minute
HEARTBEAT_TIMEOUT_S = 20  # a killed worker's task is failed (and retried) after this, not after 300 s
GPU_POOL_SLOTS = 1
POSTGRES_USER = "postgres"  # PostgreSQL refuses to run as root; the Debian package creates this user.


class StackError(RuntimeError):
    """A service of the native stack did not come up; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin (Debian's layout), or $PG_BIN."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def missing_prerequisites() -> list[str]:
    """What scripts/ensure_services.sh installs, when it is not there yet."""
    missing = []
    if postgres_bin_dir() is None:
        missing.append("postgresql")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    try:
        import pwd

        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        missing.append(f"unix user {POSTGRES_USER}")
    return missing


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class Service:
    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    cmd: list[str] = field(default_factory=list)  # how it was started: what `restart` and `revive` start again
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None

    def running(self) -> bool:
        return self.popen.poll() is None


# The long-running services docker-compose.yaml gives `restart: always`: `revive` starts again any that exited.
RESTART_ALWAYS = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "mlflow",
                  *(f"airflow-worker-{queue}" for queue in WORKER_QUEUES.values()))


class NativeStack:
    """Starts the stack in a fresh temporary folder; `stop()` ends every process group it started."""

    def __init__(self, dags_folder: Path = REPO / "dags", *, keep_root: bool | None = None) -> None:
        self.dags_folder = Path(dags_folder)
        # NATIVE_STACK_KEEP=1 keeps the folder (logs, task logs, data) for a post-mortem.
        self.keep_root = bool(os.environ.get("NATIVE_STACK_KEEP")) if keep_root is None else keep_root
        # Under /tmp rather than pytest's tmp_path: the postgres user must be able to reach its data folder.
        self.root = Path(tempfile.mkdtemp(prefix="fashion-tagger-stack-"))
        self.root.chmod(0o755)
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.airflow_home = self.root / "airflow"
        # One folder per worker "machine": its scratch (FASHION_TAGGER_SCRATCH) and its user home ($HOME).
        self.machines = {host: self.root / "machines" / host for host in WORKER_QUEUES}
        self.ports = {name: free_port() for name in ("postgres", "redis", "s3", "mlflow", "api")}
        self.secrets = {
            name: secrets.token_hex(16)
            for name in ("airflow_db", "mlflow_db", "fashion_tagger_db", "redis", "api", "admin", "aws_key",
                         "aws_secret", "mlflow_admin", "mlflow_service", "mlflow_reader", "mlflow_flask")
        }
        # 64 bytes: Airflow signs with HS512, and PyJWT warns about shorter keys.
        self.secrets["jwt"] = secrets.token_hex(32)
        self.services: list[Service] = []
        self.held_down: set[str] = set()  # services a test stopped on purpose (`down`)
        self._small_scratches: set[Path] = set()  # scratch folders under a small tmpfs (`shrink_scratch`)
        self.timings: dict[str, float] = {}
        self._token: str | None = None
        self._stopped = False

    # --- addresses ------------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def broker_url(self) -> str:
        return f"redis://:{self.secrets['redis']}@127.0.0.1:{self.ports['redis']}/0"

    def pg_url(self, user: str, database: str, scheme: str = "postgresql") -> str:
        return f"{scheme}://{user}:{self.secrets[user + '_db']}@127.0.0.1:{self.ports['postgres']}/{database}"

    @property
    def admin_password(self) -> str:
        return self.secrets["admin"]

    @property
    def database_url(self) -> str:
        """The coordination database, as the workers reach it (FASHION_TAGGER_DATABASE_URL)."""
        return self.pg_url("fashion_tagger", "fashion_tagger")

    def scratch(self, host: str) -> Path:
        return self.machines[host] / "scratch"

    def store_env(self) -> dict[str, str]:
        """What a machine needs to work on the home: the bucket, its endpoint and keys, the coordination database."""
        return {
            "FASHION_TAGGER_HOME": HOME_URL,
            "FASHION_TAGGER_DATABASE_URL": self.database_url,
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": self.secrets["aws_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["aws_secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def home_objects(self, prefix: str = "") -> dict[str, int]:
        """{key under the home: size} of every object of the home in the bucket (below PREFIX)."""
        root = HOME_URL.removeprefix(f"s3://{HOME_BUCKET}/") + "/"
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=HOME_BUCKET, Prefix=root + prefix)
        return {obj["Key"].removeprefix(root): obj["Size"] for page in pages for obj in page.get("Contents", [])}

    def mlflow_auth(self, username: str) -> tuple[str, str]:
        """(username, password) of one of MLFLOW_USERS, for requests' `auth=` or MLFLOW_TRACKING_*."""
        return username, self.secrets[MLFLOW_USERS[username]]

    def mlflow_env(self, username: str) -> dict[str, str]:
        """What a client of the MLflow server needs to act as USERNAME."""
        user, password = self.mlflow_auth(username)
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password}

    def s3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=self.secrets["aws_key"],
            aws_secret_access_key=self.secrets["aws_secret"],
            region_name="us-east-1",
        )

    # --- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> NativeStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 240) -> NativeStack:
        missing = missing_prerequisites()
        if missing:
            raise StackError(f"missing {', '.join(missing)}: run scripts/ensure_services.sh")
        atexit.register(self.stop)
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._start_postgres(deadline)
            self.timings["postgres"] = time.monotonic() - started
            self._start_redis()
            self._start_s3()
            mlflow = self._start_mlflow()
            self._airflow_db_migrate(deadline)
            self.timings["airflow db migrate"] = time.monotonic() - started
            # The same pool airflow-init creates in docker-compose.yaml, set while the components start.
            pools = self._spawn("airflow-pools", [
                self._bin("airflow"), "pools", "set", "gpu", str(GPU_POOL_SLOTS), "one slot per GPU",
            ], self.airflow_env())
            self._start_airflow()
            self.wait_healthy(deadline, mlflow=mlflow, one_shots=[pools])
            self.timings["healthy"] = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (SIGINT for PostgreSQL: fast shutdown) to every process group, clients before the
        stores they use, then SIGKILL to whatever group is left after `timeout` seconds."""
        if self._stopped:
            return
        self._stopped = True
        stores = {"postgres", "redis", "moto-s3"}
        clients = [s for s in self.services if s.name not in stores]
        for wave in (clients, [s for s in self.services if s.name in stores]):
            for service in reversed(wave):
                if service.running():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(service.popen.pid, service.stop_signal)
            deadline = time.monotonic() + timeout
            for service in wave:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            # Children (task supervisors, uvicorn workers) may outlive their leader: the whole group goes.
            for service in wave:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.popen.wait(timeout=5)
        atexit.unregister(self.stop)
        for host in self.machines:
            self.grow_scratch(host)
        if not self.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- processes ------------------------------------------------------------------------------------
    def _bin(self, name: str) -> str:
        candidate = VENV_BIN / name
        return str(candidate) if candidate.exists() else (shutil.which(name) or name)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], *, user: str | None = None,
               stop_signal: int = signal.SIGTERM) -> Service:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                cmd, env=env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, user=user,
            )
        service = Service(name, popen, log, stop_signal, list(cmd), dict(env), user)
        self.services.append(service)
        return service

    # --- faults ---------------------------------------------------------------------------------------
    def service(self, name: str) -> Service:
        found = [s for s in self.services if s.name == name]
        if not found:
            raise StackError(f"no service {name!r}: {[s.name for s in self.services]}")
        return found[-1]

    def _respawn(self, old: Service) -> Service:
        self.services.remove(old)
        new = self._spawn(old.name, old.cmd, old.env, user=old.user, stop_signal=old.stop_signal)
        for attribute, value in list(vars(self).items()):  # self.postgres, self.redis, ... follow the new process
            if value is old:
                setattr(self, attribute, new)
        for host, worker in list(getattr(self, "workers", {}).items()):
            if worker is old:
                self.workers[host] = new
        return new

    def down(self, name: str, *, timeout: float = 30) -> Service:
        """Stop service NAME as its supervisor would: its stop signal, then SIGKILL after TIMEOUT (and for whatever
        its process group left behind). `up` starts it again."""
        old = self.service(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.popen.pid, old.stop_signal)
        try:
            old.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(old.popen.pid, signal.SIGKILL)
            old.popen.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.popen.pid, signal.SIGKILL)
        with old.log.open("a") as out:
            out.write("\n--- stopped (fault injected)\n")
        self.held_down.add(name)  # not `revive`d: it stays down until `up`
        return old

    def kill(self, name: str) -> Service:
        """`kill -9` of service NAME's whole process group (a worker's task processes with it), as a machine that
        dies would; it stays down until `up`."""
        old = self.service(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.popen.pid, signal.SIGKILL)
        old.popen.wait()
        with old.log.open("a") as out:
            out.write("\n--- killed with SIGKILL (fault injected)\n")
        self.held_down.add(name)
        return old

    def up(self, name: str) -> Service:
        """Start the stopped service NAME again with the command it was started with."""
        old = self.service(name)
        if old.running():
            raise StackError(f"{name} is running: stop it with down() first")
        with old.log.open("a") as out:
            out.write("\n--- started again\n")
        self.held_down.discard(name)
        return self._respawn(old)

    def restart(self, name: str, *, down_s: float = 0.0, timeout: float = 30) -> Service:
        """`down`, DOWN_S seconds, `up`."""
        self.down(name, timeout=timeout)
        time.sleep(down_s)
        return self.up(name)

    def shrink_scratch(self, host: str, megabytes: int) -> str | None:
        """Mount a tmpfs of MEGABYTES over HOST's scratch folder (empty, as a small disk of its own), as a machine
        whose scratch disk is full would have; None once mounted, else why the machine refuses (not root, no
        CAP_SYS_ADMIN in a container). `grow_scratch` takes it away again."""
        folder = self.scratch(host)
        folder.mkdir(parents=True, exist_ok=True)
        if not shutil.which("mount"):
            return "no mount command on this machine"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0777", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"mount -t tmpfs refused: {(done.stderr or done.stdout).strip()}"
        self._small_scratches.add(folder)
        atexit.register(self.grow_scratch, host)
        return None

    def grow_scratch(self, host: str) -> None:
        """Unmount the small filesystem `shrink_scratch` put over HOST's scratch folder (the folder's own contents
        under it come back); nothing when there is none."""
        folder = self.scratch(host)
        if folder not in self._small_scratches:
            return
        done = subprocess.run(["umount", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:  # busy: a process still has a file open there; it goes once that closes
            subprocess.run(["umount", "-l", str(folder)], check=True, capture_output=True)
        self._small_scratches.discard(folder)

    def revive(self) -> list[str]:
        """Start again every RESTART_ALWAYS service that exited (`restart: always` in docker-compose.yaml)."""
        revived = []
        for service in [s for s in self.services
                        if s.name in RESTART_ALWAYS and s.name not in self.held_down and not s.running()]:
            with service.log.open("a") as out:
                out.write(f"\n--- exited with {service.popen.returncode}; started again (restart: always)\n")
            self._respawn(service)
            revived.append(service.name)
        return revived

    def _run(self, name: str, cmd: list[str], env: dict[str, str] | None = None, *, user: str | None = None,
             timeout: float = 120) -> None:
        service = self._spawn(name, cmd, env or self.base_env(), user=user)
        try:
            rc = service.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StackError(f"{name} did not finish within {timeout:.0f}s:\n{log_tail(service.log)}") from None
        if rc != 0:
            raise StackError(f"{name} exited with {rc}:\n{log_tail(service.log)}")
        # Finished and reaped: stop() must not signal a process group id the system may hand out again.
        self.services.remove(service)

    def _wait(self, what: str, check: Callable[[], Any], deadline: float, *services: Service) -> Any:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            for service in services:
                if not service.running():
                    raise StackError(f"{service.name} exited with {service.popen.returncode} before {what}:\n"
                                     f"{log_tail(service.log)}")
            try:
                result = check()
                if result:
                    return result
            except Exception as exc:  # the service is still starting: connection refused, 503, ...
                last = exc
            time.sleep(0.5)
        tails = "".join(f"\n--- {s.name}\n{log_tail(s.log)}" for s in services)
        raise StackError(f"timed out waiting for {what} (last error: {last!r}){tails}")

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW", "MLFLOW_", "AWS_", "FASHION_TAGGER_", "KAGGLE_"))}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # --- PostgreSQL, Redis, S3, MLflow --------------------------------------------------------------
    def _start_postgres(self, deadline: float) -> None:
        pg_bin = postgres_bin_dir()
        data = self.root / "postgres"
        data.mkdir()
        shutil.chown(data, POSTGRES_USER, POSTGRES_USER)
        self._run("initdb", [str(pg_bin / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "-E", "UTF8",
                             "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256"],
                  user=POSTGRES_USER)
        self.postgres = self._spawn("postgres", [
            str(pg_bin / "postgres"), "-D", str(data), "-p", str(self.ports["postgres"]),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
            "-c", "max_connections=200",
            # A throwaway cluster: durability buys nothing here and costs seconds on every migration.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ], self.base_env(), user=POSTGRES_USER, stop_signal=signal.SIGINT)
        isready = [str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.ports["postgres"])]
        self._wait("PostgreSQL to accept connections",
                   lambda: subprocess.run(isready, check=False).returncode == 0, deadline, self.postgres)
        sql = (
            f"CREATE ROLE airflow LOGIN PASSWORD '{self.secrets['airflow_db']}';"
            "CREATE DATABASE airflow OWNER airflow;"
            f"CREATE ROLE mlflow LOGIN PASSWORD '{self.secrets['mlflow_db']}';"
            "CREATE DATABASE mlflow OWNER mlflow;"
            # MLflow's user store: its own database on the same server, as docker/postgres-init.sh makes it.
            "CREATE DATABASE mlflow_auth OWNER mlflow;"
            # The coordination database, with a role of its own (docker/postgres-init.sh).
            f"CREATE ROLE fashion_tagger LOGIN PASSWORD '{self.secrets['fashion_tagger_db']}';"
            "CREATE DATABASE fashion_tagger OWNER fashion_tagger;"
        )
        for statement in sql.rstrip(";").split(";"):
            self._run("psql", [str(pg_bin / "psql"), "-v", "ON_ERROR_STOP=1", "-h", str(data),
                               "-p", str(self.ports["postgres"]), "-U", POSTGRES_USER, "-d", "postgres",
                               "-c", statement], user=POSTGRES_USER)

    def _start_redis(self) -> None:
        redis_dir = self.root / "redis"
        redis_dir.mkdir()
        self.redis = self._spawn("redis", [
            shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(self.ports["redis"]),
            "--requirepass", self.secrets["redis"], "--appendonly", "no", "--dir", str(redis_dir),
            # Saved on shutdown, like the compose service's defaults: a restart keeps Celery's queued tasks.
            "--save", "3600 1",
        ], self.base_env())

    def _start_s3(self) -> None:
        env = self.base_env()
        self.s3 = self._spawn("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                          "-p", str(self.ports["s3"])], env)

    def _start_mlflow(self) -> Service:
        """docker/mlflow-server.sh with the environment docker-compose.yaml gives the `mlflow` service."""
        env = self.base_env() | {
            "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
            "MLFLOW_BACKEND_STORE_URI": self.pg_url("mlflow", "mlflow"),
            "MLFLOW_AUTH_DATABASE_URI": self.pg_url("mlflow", "mlflow_auth"),
            "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "mlflow-auth" / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["mlflow_admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["mlflow_flask"],
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/",
            "MLFLOW_HOST": "127.0.0.1",
            "MLFLOW_PORT": str(self.ports["mlflow"]),
            "MLFLOW_WORKERS": "1",
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": self.secrets["aws_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["aws_secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.mlflow = self._spawn("mlflow", ["bash", str(REPO / "docker" / "mlflow-server.sh")], env)
        return self.mlflow

    def _init_mlflow_users(self, deadline: float) -> None:
        """docker/mlflow-init.py as the admin, as the compose file's `mlflow-init` service runs it."""
        env = self.base_env() | self.mlflow_env(MLFLOW_ADMIN) | {
            "MLFLOW_SERVICE_USERNAME": MLFLOW_SERVICE_USER,
            "MLFLOW_SERVICE_PASSWORD": self.secrets["mlflow_service"],
            "MLFLOW_READER_USERNAME": MLFLOW_READER,
            "MLFLOW_READER_PASSWORD": self.secrets["mlflow_reader"],
        }
        self._run("mlflow-init", [sys.executable, str(REPO / "docker" / "mlflow-init.py")], env,
                  timeout=max(30.0, deadline - time.monotonic()))

    # --- Airflow --------------------------------------------------------------------------------------
    def airflow_env(self) -> dict[str, str]:
        """The settings docker-compose.yaml gives every Airflow container, pointed at the loopback services."""
        return self.base_env() | {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg_url("airflow", "airflow", "postgresql+psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": self.pg_url("airflow", "airflow", "db+postgresql"),
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets["jwt"],
            "AIRFLOW__API__SECRET_KEY": self.secrets["api"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.airflow_home / "logs"),
            "FASHION_TAGGER_HOME": HOME_URL,
            # Manual runs only: unpausing a scheduled DAG would start a run of its own.
            "FASHION_TAGGER_SCHEDULE": "none",
            # Read when the DAG is parsed (max_active_runs, default_args), so every component gets them.
            "FASHION_TAGGER_MAX_ACTIVE_RUNS": str(MAX_ACTIVE_RUNS),
            "FASHION_TAGGER_TASK_RETRY_DELAY_S": str(RETRY_DELAY_S),
            # A task whose worker died stops heartbeating; the scheduler fails it (and Airflow retries it) after
            # this many seconds instead of Airflow's default 300.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",  # as docker-compose.yaml: a task fails fast, Airflow retries it
        }

    @property
    def fernet_key(self) -> str:
        import base64

        if not hasattr(self, "_fernet_key"):
            self._fernet_key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        return self._fernet_key

    def _airflow_db_migrate(self, deadline: float) -> None:
        self.airflow_home.mkdir()
        for machine in self.machines.values():
            (machine / "scratch").mkdir(parents=True)
            (machine / "home").mkdir()
        # The simple auth manager keeps the passwords of the users it knows in this file.
        (self.airflow_home / "passwords.json").write_text(f'{{"{ADMIN_USER}": "{self.admin_password}"}}')
        pylib = self.root / "pylib"
        pylib.mkdir()
        (pylib / "native_stack_hostname.py").write_text(
            '"""[core] hostname_callable of the native stack: one machine per worker."""\n\n'
            "import os\n\n\ndef hostname() -> str:\n"
            '    return os.environ["NATIVE_STACK_HOSTNAME"]\n'
        )
        self._run("airflow-db-migrate", [self._bin("airflow"), "db", "migrate"], self.airflow_env(),
                  timeout=max(30.0, deadline - time.monotonic()))

    def _start_airflow(self) -> None:
        env = self.airflow_env()
        airflow = self._bin("airflow")
        self.api_server = self._spawn("airflow-api-server", [
            airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.ports["api"]), "--workers", "1",
        ], env)
        self.scheduler = self._spawn("airflow-scheduler", [airflow, "scheduler"], env)
        self.dag_processor = self._spawn("airflow-dag-processor", [airflow, "dag-processor"], env)
        self.workers: dict[str, Service] = {}
        for hostname, queue in WORKER_QUEUES.items():
            worker_env = env | {
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "native_stack_hostname.hostname",
                "NATIVE_STACK_HOSTNAME": hostname,
                # Only the workers talk to MLflow, as its service user (docker-compose.yaml does the same).
                **self.mlflow_env(MLFLOW_SERVICE_USER),
                # ... and to the home's bucket and the coordination database; each has a disk of its own.
                **self.store_env(),
                "FASHION_TAGGER_SCRATCH": str(self.scratch(hostname)),
                "HOME": str(self.machines[hostname] / "home"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(self.root / "pylib"), env.get("PYTHONPATH")])),
            }
            # Logs land on the shared local disk, where the api-server reads them: no log server per worker.
            self.workers[hostname] = self._spawn(f"airflow-worker-{queue}", [
                airflow, "celery", "worker", "--queues", queue, "--concurrency", str(WORKER_CONCURRENCY[queue]),
                "--celery-hostname", hostname, "--skip-serve-logs",
            ], worker_env)

    # --- health ---------------------------------------------------------------------------------------
    def wait_healthy(self, deadline: float, *, mlflow: Service, one_shots: list[Service] = ()) -> dict[str, Any]:
        """Each service answers its own health check, as the compose file's healthchecks ask."""
        import redis

        report: dict[str, Any] = {}
        client = redis.Redis(host="127.0.0.1", port=self.ports["redis"], password=self.secrets["redis"])
        report["redis"] = self._wait("Redis PING", client.ping, deadline, self.redis)
        client.close()

        def make_buckets() -> bool:
            s3 = self.s3_client()
            for bucket in (BUCKET, HOME_BUCKET):
                if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                    s3.create_bucket(Bucket=bucket)
                s3.head_bucket(Bucket=bucket)
            return True

        report["s3"] = self._wait(f"the S3 buckets {BUCKET} and {HOME_BUCKET}", make_buckets, deadline, self.s3)
        report["mlflow"] = self._wait(
            "MLflow /health", lambda: requests.get(f"{self.mlflow_url}/health", timeout=5).ok, deadline, mlflow)
        self._init_mlflow_users(deadline)

        def airflow_health() -> dict | None:
            health = requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
            parts = ("metadatabase", "scheduler", "dag_processor")
            return health if all(health[p]["status"] == "healthy" for p in parts) else None

        report["airflow"] = self._wait("Airflow /api/v2/monitor/health", airflow_health, deadline,
                                       self.api_server, self.scheduler, self.dag_processor)
        report["celery"] = self._wait("both Celery workers on their queues", self.celery_queues, deadline,
                                      *self.workers.values())
        for shot in one_shots:
            self._wait(f"{shot.name} to finish", lambda s=shot: not s.running(), deadline)
            if shot.popen.returncode != 0:
                raise StackError(f"{shot.name} exited with {shot.popen.returncode}:\n{log_tail(shot.log)}")
            self.services.remove(shot)
        self.health = report
        return report

    def celery_queues(self) -> dict[str, list[str]] | None:
        """{celery nodename: [queues]} once every worker answers, else None."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            replies = app.control.inspect(timeout=2).active_queues() or {}
        finally:
            app.close()
        queues = {node: sorted(q["name"] for q in qs) for node, qs in replies.items()}
        expected = {f"celery@{host}" for host in WORKER_QUEUES}
        return queues if expected <= queues.keys() else None

    # --- REST API v2 ----------------------------------------------------------------------------------
    def token(self) -> str:
        """A JWT from /auth/token with the admin's name and password, as a script or the UI gets one."""
        if self._token is None:
            reply = requests.post(f"{self.api_url}/auth/token",
                                  json={"username": ADMIN_USER, "password": self.admin_password}, timeout=30)
            reply.raise_for_status()
            self._token = reply.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = requests.request(method, f"{self.api_url}/api/v2/{path.lstrip('/')}",
                                 headers={"Authorization": f"Bearer {self.token()}"}, timeout=30, **kwargs)
        if not reply.ok:
            raise StackError(f"{method} {path} -> {reply.status_code}: {reply.text[:2000]}")
        return reply.json() if reply.content else None

    def diagnostics(self, lines: int = 30) -> str:
        """Tails of every service log and of every task log: what a failing test prints."""
        parts = [f"--- {s.name} ({'running' if s.running() else f'exit {s.popen.returncode}'})\n"
                 f"{log_tail(s.log, lines)}" for s in self.services if not s.name.startswith(("psql", "initdb"))]
        task_logs = sorted((self.airflow_home / "logs").rglob("*.log"), key=lambda p: p.stat().st_mtime)
        for path in task_logs[-8:]:
            rel = path.relative_to(self.airflow_home / "logs")
            parts.append(f"--- task log {rel}\n{_strip_json_log(log_tail(path, lines))}")
        return "\n".join(parts)


def _strip_json_log(text: str) -> str:
    """Task logs are JSON lines in Airflow 3: keep the event text and the exception of each record."""
    import json

    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if not isinstance(record, dict):
            out.append(line)
            continue
        out.append(f"{record.get('level', '')} {record.get('event', '')}".strip())
        for error in record.get("error_detail") or []:
            frames = error.get("frames") or []
            out.extend(f"    {f.get('filename')}:{f.get('lineno')} in {f.get('name')}" for f in frames[-6:])
            out.append(f"  {error.get('exc_type')}: {error.get('exc_value')}")
    return "\n".join(out)


def main() -> None:
    stack = NativeStack(keep_root="--keep" in sys.argv or None)
    started = time.monotonic()
    with stack:
        print(f"native stack up in {time.monotonic() - started:.0f}s (root {stack.root})")
        print(f"  Airflow  {stack.api_url}  user {ADMIN_USER} password {stack.admin_password}")
        print(f"  MLflow   {stack.mlflow_url}  users " + ", ".join(
            "{} password {}".format(*stack.mlflow_auth(user)) for user in MLFLOW_USERS))
        print(f"  S3       {stack.s3_url} buckets {BUCKET} (MLflow's artifacts), {HOME_BUCKET} (the home {HOME_URL})")
        print(f"  database {stack.database_url}")
        print(f"  workers  {stack.health['celery']}")
        print("Ctrl-C stops everything.")
        with contextlib.suppress(KeyboardInterrupt):
            while all(s.running() for s in stack.services):
                time.sleep(1)


if __name__ == "__main__":
    main()
