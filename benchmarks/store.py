"""Images per second of staging prepared 240x320 JPEGs out to and in from a local S3 endpoint (moto's server),
packed in tar shards against one object per file, against a plain local copy, all in one run.

Run: .venv/bin/python benchmarks/store.py [--images 2000] [--endpoint http://127.0.0.1:9000]
Without --endpoint it starts moto's server on loopback. Prints a markdown table and the extrapolation to 44,419 images.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
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

from moto_server import MOTO_ENV, moto_s3_server  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto's server")
    parser.add_argument("--shard-mb", type=int, default=shards.SHARD_BYTES >> 20)
    parser.add_argument("--work", type=Path, help="where the local copies and the scratch folder go (default: "
                        "the system's temporary folder); the filesystem's file-creation rate bounds every column")
    args = parser.parse_args()

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
