"""Resize every image of a split once to the training resolution into the content-addressed cache shared by all runs.

JPEGs are decoded at a reduced DCT scale (`data.imaging.read_fitted`), so a 1800x2400 photo costs a fraction of a
full decode; epochs then read small cached JPEGs instead of decoding full-size ones again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from fashion_tagger.core import io
from fashion_tagger.core.config import Config
from fashion_tagger.core.errors import DataError
from fashion_tagger.core.layout import SPLIT_PARTS, SplitDir, cache_size_dir, cached_image_path, localize_like
from fashion_tagger.core.parallel import WorkerCount, pool_workers
from fashion_tagger.core.progress import log_progress
from fashion_tagger.data.imaging import ImageReadError, read_fitted

log = logging.getLogger(__name__)


@dataclass
class PrepareResult(io.StageResult):
    split_dir: Path
    cache_root: Path
    width: int
    height: int
    images: int  # distinct image contents (sha256) in train, val and test
    written: int
    cached: int  # already in the cache from an earlier run
    failed: int
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)


def prepare_image(source: str | Path, dest: str | Path, width: int, height: int, jpeg_quality: int = 95) -> None:
    """Decode, resize and write one image; the file appears under its final name only when complete."""
    out = read_fitted(source, width, height)
    with io.atomic_path(Path(dest)) as tmp:
        out.save(tmp, "JPEG", quality=jpeg_quality)


def _prepare_task(task: tuple[str, str, str, int, int, int]) -> tuple[str, str | None]:
    """Pool worker: returns the error text instead of raising, so one bad image does not stop the others."""
    sha, source, dest, width, height, quality = task
    try:
        prepare_image(source, dest, width, height, quality)
    except ImageReadError as exc:
        return sha, str(exc)
    except OSError as exc:  # writing into the cache
        return sha, f"cannot write {dest}: {type(exc).__name__}: {exc}"
    return sha, None


def load_split_images(split_dir: Path) -> pd.DataFrame:
    """One row per distinct image content (image_sha256, image_path) over train, val and test."""
    frames = []
    for part in SPLIT_PARTS:
        path = SplitDir(split_dir).part(part)
        if not path.is_file():
            raise DataError(f"{path} does not exist: run the split stage to create {split_dir} first")
        frame = pd.read_parquet(path, columns=None)
        missing = [col for col in ("image_path", "image_sha256") if col not in frame.columns]
        if missing:
            raise DataError(f"{path} is missing columns: {', '.join(missing)}; rebuild it with validate and split")
        frames.append(frame[["image_sha256", "image_path"]])
    images = pd.concat(frames, ignore_index=True)
    if images["image_sha256"].isna().any():
        raise DataError(
            f"{split_dir} has rows without image_sha256: it was split from a metadata-only validation; "
            "rerun validate without --metadata-only, then split"
        )
    return images.drop_duplicates("image_sha256", keep="first").reset_index(drop=True)


def prepare_images(split_dir: str | Path, cache_root: str | Path, config: Config) -> PrepareResult:
    """Write every distinct image of train/val/test into the cache at images.width x images.height, with
    `images.workers` processes; cached ones are skipped."""
    started = time.perf_counter()
    width, height, jpeg_quality, workers = (config.images.width, config.images.height, config.images.jpeg_quality,
                                            config.images.workers)
    split_dir, cache_root = Path(split_dir), Path(cache_root)
    split = SplitDir(split_dir)
    images = load_split_images(split_dir)
    size_dir = cache_size_dir(cache_root, width, height)
    # Two runs preparing into one cache would write the same images twice: the second waits, then finds them.
    with io.file_lock(size_dir.with_name(f"{size_dir.name}.lock"), f"the image cache {size_dir}"):
        if removed := io.remove_stale_temporaries(size_dir, depth=2):
            log.info("removed %d partial images left by an interrupted prepare in %s", removed, size_dir)
        tasks = []
        for sha, source in zip(images["image_sha256"], images["image_path"], strict=True):
            source = localize_like(source, split_dir)  # validated on another machine's copy of the home
            dest = cached_image_path(cache_root, sha, width, height)
            # Writes are atomic, so an existing file is a complete one.
            if not dest.is_file():
                tasks.append((sha, str(source), str(dest), width, height, jpeg_quality))
        cached = len(images) - len(tasks)
        errors = _run_tasks(tasks, workers)

    if errors:
        by_sha = dict(zip(images["image_sha256"], images["image_path"], strict=True))
        failures = [{"image_sha256": sha, "image_path": str(by_sha[sha]), "error": err} for sha, err in errors]
        report = io.write_json(split.prepare_failures, failures)
        # prepared.json promises every image is cached; a stale one must not survive a failed rerun.
        split.prepared.unlink(missing_ok=True)
        first = failures[0]
        raise DataError(
            f"{len(failures)} of {len(images)} images could not be prepared, e.g. {first['image_path']} "
            f"(sha256 {first['image_sha256']}): {first['error']}; all are listed in {report}. "
            "Validation should have rejected them: rerun validate and split"
        )
    split.prepare_failures.unlink(missing_ok=True)
    result = PrepareResult(
        split_dir=split_dir,
        cache_root=cache_root,
        width=width,
        height=height,
        images=len(images),
        written=len(tasks),
        cached=cached,
        failed=0,
        seconds=round(time.perf_counter() - started, 3),
    )
    summary = result.to_dict()
    del summary["split_dir"], summary["failures"]
    summary["cache_root"] = str(cache_root.resolve())
    summary["jpeg_quality"] = jpeg_quality
    io.write_json(split.prepared, summary)
    return result


def _run_tasks(tasks: list[tuple[Any, ...]], workers: WorkerCount) -> list[tuple[str, str]]:
    """Process the tasks (in a pool when it pays off) and return (sha, error) of each failure."""
    if not tasks:
        return []
    errors = []
    with tqdm(total=len(tasks), desc="prepare", unit="img", disable=None) as progress, \
            _outcomes(tasks, pool_workers(workers, len(tasks))) as outcomes:
        for sha, err in log_progress(outcomes, total=len(tasks), what="prepare", unit="images"):
            if err:
                errors.append((sha, err))
            progress.update()
    return errors


@contextmanager
def _outcomes(tasks: list[tuple[Any, ...]], workers: int) -> Iterator[Iterator[tuple[str, str | None]]]:
    """(sha, error or None) of each task as it finishes: in this process, or in a pool of WORKERS processes."""
    if workers == 1:
        yield map(_prepare_task, tasks)
        return
    chunksize = max(1, min(64, len(tasks) // (workers * 8)))
    # forkserver: workers start clean, without the parent's threads or its torch/MLflow state; the preload
    # imports this module once in the server, so each worker is a cheap fork of it.
    context = get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(workers) as pool:
        yield pool.imap_unordered(_prepare_task, tasks, chunksize=chunksize)
