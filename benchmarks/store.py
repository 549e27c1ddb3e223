"""Images per second of staging prepared 240x320 JPEGs out to and in from a local S3 endpoint (moto's server),
packed in tar shards against one object per file, against a plain local copy, all in one run.

Run: .venv/bin/python benchmarks/store.py [--images 2000] [--endpoint http://127.0.0.1:9000]
Without --endpoint it starts moto's server on loopback. Prints a markdown table and the extrapolation to 44,419 images.

With --demo-run it measures instead what staging costs a whole run: the demo preset's stages, each in a process of
its own as the DAG's tasks run them (fetch, validate, split, prepare and register on one "machine", train and
evaluate on another, each machine with its own scratch folder, empty when the run starts), once on a local home and
once on an S3 home (moto's server, the coordination database in SQLite, an MLflow server with its artifacts in the
same S3 server), and prints each stage's seconds on both, the staging seconds the stage runner recorded, and the
S3 run's extra share.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # moto_server: the same loopback server the storage tests start

from moto_server import MOTO_ENV, mlflow_server, moto_s3_server  # noqa: E402

from fashion_tagger.storage import shards  # noqa: E402
from fashion_tagger.storage.base import Store  # noqa: E402
from fashion_tagger.storage.publish import publish  # noqa: E402
from fashion_tagger.storage.scratch import stage_in  # noqa: E402
from fashion_tagger.storage.store import open_store  # noqa: E402

FULL_DATASET = 44_419  # images of the complete Kaggle dataset
WIDTH, HEIGHT, QUALITY = 240, 320, 95  # the default preset's prepared images
NOISE = 2.0  # sensor-like noise that puts a generated JPEG near a prepared real one (about 16 KB)


def generate(folder: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """COUNT distinct JPEGs named by content hash, as the prepared-image cache names them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    folder.mkdir(parents=True)
    files = {}
    for _ in range(count):
        tint = rng.uniform(0.2, 1.0, size=3)
        base = (x[..., None] * tint + y[..., None] * tint[::-1]) % 256
        pixels = np.clip(base + rng.normal(0, NOISE, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=QUALITY)
        data = buffer.getvalue()
        name = f"{hashlib.sha256(data).hexdigest()}.jpg"
        (folder / name).write_bytes(data)
        files[name] = folder / name
    return files


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def local_copy(images: Path, work: Path) -> tuple[float, float, float]:
    """Out to a folder standing for a shared volume, back in; warm = the same copy again (nothing is cached)."""
    shared = work / "shared"
    out = timed(lambda: shutil.copytree(images, shared))
    cold = timed(lambda: shutil.copytree(shared, work / "in"))
    warm = timed(lambda: shutil.copytree(shared, work / "in-again"))
    return out, cold, warm


def per_file(store: Store, images: Path, work: Path) -> tuple[float, float, float]:
    prefix = "cache/images/240x320"
    out = timed(lambda: publish(store, images, prefix))
    cold = timed(lambda: stage_in(store, prefix, work / "in", scratch=work / "scratch"))
    warm = timed(lambda: stage_in(store, prefix, work / "in-again", scratch=work / "scratch"))
    return out, cold, warm


def sharded(store: Store, files: dict[str, Path], work: Path, shard_bytes: int) -> tuple[float, float, float, int]:
    prefix = "cache/shards/240x320"
    made: list[Path] = []

    def stage_out() -> None:
        made.extend(shards.pack(files, work / "shards", max_bytes=shard_bytes))
        publish(store, work / "shards", prefix)

    def stage_in_and_unpack(name: str) -> None:
        stage_in(store, prefix, work / name, scratch=work / "scratch")
        shards.unpack_all(work / name, work / f"{name}-images")

    out = timed(stage_out)
    cold = timed(lambda: stage_in_and_unpack("in"))
    warm = timed(lambda: stage_in_and_unpack("in-again"))
    return out, cold, warm, len(made)


@contextmanager
def s3_home(endpoint: str | None) -> Iterator[Store]:
    """A fresh bucket on ENDPOINT (moto's server on loopback when None), as the home's store."""
    server = moto_s3_server() if endpoint is None else nullcontext(endpoint)
    with server as url:
        for name, value in MOTO_ENV.items():  # any credentials do for moto; a real endpoint keeps the user's
            os.environ.setdefault(name, value)
        os.environ["AWS_ENDPOINT_URL"] = url
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        yield open_store(f"s3://{bucket}/home")


# --- a whole run: the demo preset on a local home and on an S3 home ------------------------------------------------

# Which "machine" runs each stage: the DAG's queues (train and evaluate on the gpu worker).
MACHINES = {"fetch": "default", "validate": "default", "split": "default", "prepare": "default",
            "train": "gpu", "evaluate": "gpu", "register": "default"}
CREATE = """
import json, sys
from fashion_tagger.core.config import load_config
from fashion_tagger.runs.run import create_run
print(json.dumps(create_run(load_config(sys.argv[1], json.loads(sys.argv[2]))).id))
"""
STAGE = """
import json, sys, time
from fashion_tagger.runs.run import open_run, stage_state
from fashion_tagger.runs.stages import run_stage
started = time.perf_counter()
run = open_run(sys.argv[1])
result = run_stage(run, sys.argv[2])
entry = stage_state(run.layout, sys.argv[2])
print(json.dumps({"seconds": entry["seconds"], "wall": time.perf_counter() - started,
                  "staging": result.get("staging_seconds", 0.0)}))
"""


def _python(code: str, *args: str, env: dict[str, str], log: Path) -> object:
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=out,
                              text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{args} exited with {done.returncode}; its log: {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def demo_run(root: Path, home: str, env: dict[str, str], preset: str, overrides: list[str]) -> dict[str, dict]:
    """Every stage of one run of PRESET on HOME, each in its own process on its machine's scratch folder (empty
    when the run starts: each run gets new machines, which keep their scratch from stage to stage as workers do)."""
    number = len(list(root.glob("run-*.log")))
    log = root / f"run-{number}.log"
    base = env | {"FASHION_TAGGER_HOME": home}
    run_id = _python(CREATE, preset, json.dumps(overrides), env=base | {"FASHION_TAGGER_SCRATCH": str(root / "x")},
                     log=log)
    stages = {}
    for stage, machine in MACHINES.items():
        scratch = root / f"scratch-{number}-{machine}"
        stages[stage] = _python(STAGE, str(run_id), stage, env=base | {"FASHION_TAGGER_SCRATCH": str(scratch)},
                                log=log)
        print(f"  {home}: {stage} {stages[stage]['seconds']:.1f} s", flush=True)
    return stages


def measure_demo_run(args: argparse.Namespace) -> None:
    overrides = [*args.set]
    with tempfile.TemporaryDirectory(prefix="bench-store-run-", dir=args.work) as tmp, \
            (moto_s3_server() if args.endpoint is None else nullcontext(args.endpoint)) as url:
        root = Path(tmp)
        import boto3

        env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_TAGGER_", "MLFLOW_"))}
        env |= {**MOTO_ENV, "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url}
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in MOTO_ENV.items()
                                                 if k != "AWS_DEFAULT_REGION"}).create_bucket(Bucket=bucket)
        with mlflow_server(root / "mlflow", f"sqlite:///{root / 'mlflow.db'}", artifacts=f"s3://{bucket}/mlflow",
                           env=env) as tracking:
            env["MLFLOW_TRACKING_URI"] = tracking
            homes = {"local": str(root / "local-home"), "s3": f"s3://{bucket}/home"}
            runs: dict[str, list[dict[str, dict]]] = {"local": [], "s3": []}
            for repeat in range(args.repeats):
                for name, home in homes.items():
                    extra = {"FASHION_TAGGER_DATABASE_URL": f"sqlite:///{root / 'coordination.db'}"} \
                        if name == "s3" else {}
                    model = [f"registry.model_name=bench-{name}-{repeat}"]
                    runs[name].append(demo_run(root, home, env | extra, args.preset, overrides + model))
    _report_demo_runs(runs, args)


def _report_demo_runs(runs: dict[str, list[dict[str, dict]]], args: argparse.Namespace) -> None:
    print(f"\npreset {args.preset} {' '.join(args.set)}, {os.cpu_count()} CPUs, endpoint: "
          f"{args.endpoint or 'moto server on loopback'}; seconds per stage as the run recorded them "
          "(mean of the repeats)\n")
    print("| stage | machine | local home (s) | S3 home (s) | of which staging (s) | extra (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")

    def mean(name: str, stage: str, key: str) -> float:
        return sum(run[stage][key] for run in runs[name]) / len(runs[name])

    totals = {"local": 0.0, "s3": 0.0, "staging": 0.0}
    for stage, machine in MACHINES.items():
        local, remote, staging = mean("local", stage, "seconds"), mean("s3", stage, "seconds"), \
            mean("s3", stage, "staging")
        totals["local"] += local
        totals["s3"] += remote
        totals["staging"] += staging
        print(f"| {stage} | {machine} | {local:.1f} | {remote:.1f} | {staging:.1f} | {remote - local:+.1f} |")
    extra = totals["s3"] - totals["local"]
    print(f"| **run** | | {totals['local']:.1f} | {totals['s3']:.1f} | {totals['staging']:.1f} | {extra:+.1f} |")
    print(f"\nextra seconds of the S3 home: {extra:.1f} s = {100 * extra / totals['s3']:.1f} % of its run "
          f"(target at most 20 %); the stage runner's staging alone: {100 * totals['staging'] / totals['s3']:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto's server")
    parser.add_argument("--shard-mb", type=int, default=shards.SHARD_BYTES >> 20)
    parser.add_argument("--work", type=Path, help="where the local copies and the scratch folder go (default: "
                        "the system's temporary folder); the filesystem's file-creation rate bounds every column")
    parser.add_argument("--demo-run", action="store_true", help="measure a whole run's staging instead (see above)")
    parser.add_argument("--preset", default="demo", help="with --demo-run: the preset to run")
    parser.add_argument("--set", action="append", default=[], help="with --demo-run: a config override")
    parser.add_argument("--repeats", type=int, default=1, help="with --demo-run: runs on each home, alternating")
    args = parser.parse_args()
    if args.demo_run:
        measure_demo_run(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.work) as tmp, s3_home(args.endpoint) as store:
        root = Path(tmp)
        files = generate(root / "prepared", args.images)
        mean_kb = sum(p.stat().st_size for p in files.values()) / len(files) / 1024
        rows = [("local copy (a shared folder)", args.images, *local_copy(root / "prepared", root / "local"))]
        rows.append(("S3, one object per file", args.images, *per_file(store, root / "prepared", root / "per-file")))
        out, cold, warm, count = sharded(store, files, root / "sharded", args.shard_mb << 20)
        rows.append((f"S3, tar shards of {args.shard_mb} MB", count, out, cold, warm))

    n = args.images
    print(f"\n{n} generated {WIDTH}x{HEIGHT} JPEGs (quality {QUALITY}, mean {mean_kb:.1f} KB), endpoint: "
          f"{args.endpoint or 'moto server on loopback'}, {os.cpu_count()} CPUs, work folder "
          f"{args.work or tempfile.gettempdir()}\n")
    print("| method | objects | stage out (img/s) | stage in, empty scratch (img/s) | stage in, warm scratch (img/s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, objects, out, cold, warm in rows:
        print(f"| {name} | {objects} | {n / out:,.0f} | {n / cold:,.0f} | {n / warm:,.0f} |")
    print("\nExtrapolated (linearly, at the rates measured above) to the complete dataset's "
          f"{FULL_DATASET:,} prepared images, stage-in with an empty scratch folder:")
    for name, _, _, cold, _ in rows:
        print(f"- {name}: {FULL_DATASET * cold / n:,.1f} s")


if __name__ == "__main__":
    main()
