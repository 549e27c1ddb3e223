"""The served model under load: `mlflow models serve` of a tagger on loopback, N concurrent clients sending real
JPEGs (one per request, base64 JSON as a remote client sends them) for a fixed time; latency p50/p99, requests/s,
errors, and the server's memory before and after. Against it, in the same run and on the same cores: what
decoding and preprocessing the same images alone reaches (`tag_frame`'s reading, no network), in as many
processes as the server has CPU cores.

Run: .venv/bin/python benchmarks/serve_load.py [--clients 8] [--seconds 60] [--backbone tf_efficientnet_lite0]
     [--width 240 --height 320] [--workers 1] [--append docs/performance.md]
Reads ../shared/data/fashion-real/images-full when present (--real DIR elsewhere), else generated full-size JPEGs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import DEFAULT_REAL, export_model, publish  # noqa: E402

SECTION = "## the served model under load (issue 20)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_model(export_dir: Path, work: Path) -> tuple[str, str]:
    """The export logged as our pyfunc model into a throwaway SQLite store: (tracking URI, model URI)."""
    import mlflow

    from fashion_tagger.core import tracking
    from fashion_tagger.core.config import load_config
    from fashion_tagger.serving.pyfunc_model import log_tagger_model

    config = load_config(overrides={"home": str(work / "home")})
    with tracking.tracking_session(config) as client:
        with mlflow.start_run(experiment_id=tracking.ensure_experiment(client, config)):
            info = log_tagger_model(export_dir, name="model")
        return tracking.tracking_uri(config), info.model_uri


def group_rss_mb(pid: int) -> float:
    """Resident memory of the server's process group (the CLI, uvicorn and its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total / 1024


def serve(tracking_uri: str, model_uri: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "FASHION_TAGGER_DEVICE": "cpu",
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                              env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if server.poll() is not None:
            break
        time.sleep(1)
    raise SystemExit(f"the server did not come up:\n{log.read_text()[-3000:]}")


def post(port: int, body: bytes) -> tuple[int, float]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        status = 0
    return status, time.perf_counter() - started


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            status, latency = post(port, bodies[i % len(bodies)])
            i += clients
            with lock:
                if status == 200:
                    latencies.append(latency)
                else:
                    failures[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies), "errors": failures[0], "seconds": elapsed,
            "rate": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0}


def _read_for_the_model(args: tuple[list[bytes], int, int, float]) -> int:
    """As the served model reads a request (`tag_frame`'s decode and preprocessing), for SECONDS: images done."""
    import pandas as pd
    import torch

    from fashion_tagger.data.imaging import ImageTransform
    from fashion_tagger.serving.pyfunc_model import read_rows

    torch.set_num_threads(1)
    images, width, height, seconds = args
    transform = ImageTransform(width, height, [0.5] * 3, [0.5] * 3)
    done, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        frame = pd.DataFrame({"image": [images[done % len(images)]]})
        decoded, _ = read_rows(frame, size=(width, height))
        torch.stack([transform(image) for image in decoded if image is not None])
        done += 1
    return done


def decode_rate(images: list[bytes], width: int, height: int, processes: int, seconds: float) -> float:
    with ProcessPoolExecutor(processes) as pool:
        started = time.monotonic()
        done = sum(pool.map(_read_for_the_model, [(images, width, height, seconds)] * processes))
        return done / (time.monotonic() - started)


def forward_rate(export: Path, seconds: float) -> float:
    """The network alone on one preprocessed image at a time (what each request costs beyond reading it)."""
    import torch

    from fashion_tagger.serving.predictor import Predictor

    predictor = Predictor.from_export(export, device="cpu")
    batch = torch.zeros(1, 3, predictor.image_size[1], predictor.image_size[0])
    predictor.predict_probabilities(batch)
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        predictor.predict_probabilities(batch)
        done += 1
    return done / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--append", type=Path, help=f"write the table into this file's '{SECTION}' section")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        files = sorted((args.real / "images-full").glob("*.jpg")) if (args.real / "images-full").is_dir() else []
        source = f"real full-size photos ({len(files)})"
        if not files:
            from fashion_tagger.data.synthetic.generator import generate_dataset

            generate_dataset(work / "raw", rows=60, size="full", seed=3)
            files, source = sorted((work / "raw" / "images").glob("*.jpg")), "generated full-size JPEGs (60)"
        images = [path.read_bytes() for path in files]
        bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()]]}})
                  .encode() for b in images]
        print(f"{source}, mean {sum(map(len, images)) / len(images) / 1024:.0f} KB", flush=True)

        export = export_model(args.backbone, args.width, args.height, work / "export")
        tracking_uri, model_uri = log_model(export, work)
        port = _free_port()
        server = serve(tracking_uri, model_uri, port, args.workers, work / "serve.log")
        try:
            for body in bodies[: args.clients]:  # warm up: first requests build the model's caches
                post(port, body)
            before = group_rss_mb(server.pid)
            print(f"serving on :{port}, {before:.0f} MB; {args.clients} clients for {args.seconds:.0f} s", flush=True)
            result = load(port, bodies, args.clients, args.seconds)
            after = group_rss_mb(server.pid)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        cores = os.cpu_count() or 1
        print(f"decoding alone in {cores} processes for {min(args.seconds, 30):.0f} s", flush=True)
        decoding = decode_rate(images, args.width, args.height, cores, min(args.seconds, 30))
        forward = forward_rate(export, min(args.seconds, 20))

    rows = [{
        "model": f"{args.backbone} {args.width}x{args.height}", "clients": args.clients, "workers": args.workers,
        "requests": result["requests"], "errors": result["errors"], "req/s": round(result["rate"], 1),
        "p50 ms": round(result["p50_ms"]), "p99 ms": round(result["p99_ms"]),
        "decode+preprocess alone img/s": round(decoding, 1),
        "served / decode-alone": f"{result['rate'] / decoding:.0%}",
        "network alone img/s (batch 1)": round(forward, 1),
        "served / min(decode, network)": f"{result['rate'] / min(decoding, forward):.0%}",
        "server MB before -> after": f"{before:,.0f} -> {after:,.0f}",
    }]
    description = (f"`mlflow models serve` (CPU, {args.workers} worker) of a randomly initialised tagger with the "
                   f"production head sizes, {args.clients} clients each sending one {source.split(' (')[0]} per "
                   f"request (base64 JSON) for {args.seconds:.0f} s after a warm-up; decoding and preprocessing alone "
                   "is `read_rows` + the model's transform in one process per core on the same images, and the "
                   "network alone is its forward on one image at a time with all cores. Target: "
                   "served requests/s at least 60 % of decoding alone, no errors, no memory growth.")
    publish(SECTION, description, "benchmarks/serve_load.py", rows, args.append)


if __name__ == "__main__":
    main()
