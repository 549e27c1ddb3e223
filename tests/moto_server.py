"""moto's S3 server as a process on a loopback port, for tests and benchmarks that need a real endpoint (requests
over HTTP, other processes able to reach it) without Docker: `with moto_s3_server() as endpoint: ...`; and an
MLflow tracking server the same way (`mlflow_server`), which an object-store home requires.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from native_stack import free_port, log_tail

# moto accepts any credentials; boto3 only needs some, and a region.
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_SERVERS: dict[str, subprocess.Popen] = {}  # endpoint -> the moto server answering it


def pause(endpoint: str) -> None:
    """Stop ENDPOINT's server (SIGSTOP): connections are still accepted by the kernel, nothing answers them, as
    with an endpoint behind a broken network path. `resume` lets it go on."""
    os.killpg(_SERVERS[endpoint].pid, signal.SIGSTOP)


def resume(endpoint: str) -> None:
    os.killpg(_SERVERS[endpoint].pid, signal.SIGCONT)


@contextlib.contextmanager
def _served(popen: subprocess.Popen, what: str, health_url: str, log: Path, timeout: float, *,
            poll_s: float, stop_s: float) -> Iterator[None]:
    """Wait until HEALTH_URL answers (an error with LOG's tail if POPEN exits or TIMEOUT passes), then, on exit,
    stop POPEN's process group: SIGTERM, SIGKILL after STOP_S seconds."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {popen.returncode}:\n{log_tail(log)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(health_url, timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {timeout:.0f}s:\n{log_tail(log)}")
            time.sleep(poll_s)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


@contextlib.contextmanager
def moto_s3_server(timeout: float = 30) -> Iterator[str]:
    """Start `python -m moto.server` on 127.0.0.1, yield its endpoint URL once it answers, stop it on exit."""
    port = free_port()
    fd, name = tempfile.mkstemp(prefix="moto-s3-", suffix=".log")
    log = Path(name)
    popen = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    os.close(fd)
    endpoint = f"http://127.0.0.1:{port}"
    _SERVERS[endpoint] = popen
    try:
        with _served(popen, "moto's server", f"{endpoint}/moto-api/", log, timeout, poll_s=0.2, stop_s=10):
            yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGCONT)  # a paused server could not stop
        _SERVERS.pop(endpoint, None)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str, *, artifacts: str | None = None, env: dict[str, str] | None = None,
                  timeout: float = 120) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over the BACKEND store (e.g. sqlite:///...), its new artifacts at ARTIFACTS
    (default: a folder under ROOT), with ENV (default: this process's); yields its URL once /health answers."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "mlflow-server.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend,
           "--artifacts-destination", artifacts or str(root / "artifacts")]
    with open(log, "w") as out:
        popen = subprocess.Popen(cmd, env=env if env is not None else dict(os.environ), stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    with _served(popen, "the MLflow server", f"{url}/health", log, timeout, poll_s=0.5, stop_s=20):
        yield url
