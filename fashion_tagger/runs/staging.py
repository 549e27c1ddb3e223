"""What `run_stage` moves between an object-store home and this machine around each stage, and the two stages whose
outputs are shared by every run (the raw dataset, the prepared-image cache) under their leases.

Before a stage: what it reads (`Stage.reads`), its run folder (writable, so training resumes into its checkpoints)
and, for `Stage.images`, the prepared-image batches its split lists. After it: its run folder is published, manifest
last. For a local home all of this is nothing but the leases.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fashion_tagger.core.io import StageResult
from fashion_tagger.core.layout import RunLayout, SplitDir, cache_size_dir
from fashion_tagger.runs.stage_registry import Stage
from fashion_tagger.workspace.workspace import Workspace

log = logging.getLogger(__name__)

SOURCES_DIRNAME = ".sources"  # raw/.sources/<sha of the source>.json: what fetching a source gave, once per home


def run_folder(stage: Stage, layout: RunLayout) -> Path | None:
    """The top folder of the run that STAGE writes (`train/` for evaluate's `train/eval/`): what is published."""
    if stage.output is None:
        return None
    output = stage.output(layout)
    return layout.root / output.relative_to(layout.root).parts[0]


def stage_in(run: Any, stage: Stage) -> None:
    """Everything STAGE of RUN reads, into this machine's copy of the home (nothing to do for a local home)."""
    workspace: Workspace = run.workspace
    if not workspace.is_remote:
        return
    for folder in stage.reads(run) if stage.reads else ():
        workspace.require(folder, f"{folder.name}/ of run {run.id}")
    if (own := run_folder(stage, run.layout)) is not None:
        workspace.pull(own, writable=True)
    if stage.images:
        stage_in_images(workspace, run.layout.split.dir)


def stage_out(run: Any, stage: Stage) -> None:
    if (own := run_folder(stage, run.layout)) is not None:
        run.workspace.push(own)


def stage_in_images(workspace: Workspace, split_dir: Path) -> None:
    """The prepared images of the split at SPLIT_DIR, from the batches its prepared.json lists."""
    from fashion_tagger.data.cache import read_prepared
    from fashion_tagger.workspace.prepared import stage_in_batches

    prepared = read_prepared(split_dir)
    size_dir = cache_size_dir(workspace.localize(prepared["cache_root"]), prepared["width"], prepared["height"])
    stage_in_batches(workspace, size_dir, prepared.get("batches", []))


# --- the shared stages ---------------------------------------------------------------------------------------------


def fetch_into_home(run: Any) -> StageResult:
    """The run's dataset source in the home's `raw/`, fetched by one process for every run and machine: the
    others wait on the lease `fetch:<source>` and reuse what it published."""
    from fashion_tagger.data.sources import FetchResult, fetch_dataset

    config, workspace = run.config, run.workspace
    data = config.data

    def fetch() -> FetchResult:
        return fetch_dataset(data.source, config.raw_root, s3_endpoint_url=data.s3_endpoint_url,
                             synthetic_size=data.synthetic_size, synthetic_seed=data.synthetic_seed)

    identity = json.dumps([data.source, data.synthetic_size, data.synthetic_seed])
    record = config.raw_root / SOURCES_DIRNAME / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"
    with workspace.lease(f"fetch:{record.stem}", f"the fetch of {data.source}"):
        if workspace.store is None:
            return fetch()
        key = workspace.key(record)
        if workspace.store.exists(key):
            known = json.loads(workspace.store.read_bytes(key))
            raw_dir = config.raw_root / known["name"]
            if workspace.is_published(raw_dir):
                log.info("%s was fetched before into %s: reusing it", data.source, workspace.url(raw_dir))
                return FetchResult(**{**known, "raw_dir": raw_dir, "downloaded": False, "seconds": 0.0})
        result = fetch()
        raw_dir = config.raw_root / result.name
        # As shards: thousands of images in a few objects. A local folder used in place gets a copy in the home.
        workspace.publish_folder(Path(result.raw_dir), workspace.key(raw_dir), packed=True)
        summary = {**result.to_dict(), "raw_dir": str(raw_dir)}
        workspace.store.write_bytes(key, json.dumps(summary).encode())
        result.raw_dir = raw_dir
        return result


def prepare_into_home(run: Any) -> StageResult:
    """Resize the split's images into the cache; for an object-store home, under the lease of the cache's size,
    only the images no run published before, published as one new batch, then every batch the split needs listed in
    its prepared.json (`workspace.prepared`)."""
    from fashion_tagger.core import io
    from fashion_tagger.data.prepare import load_split_images, prepare_images

    config, workspace, split = run.config, run.workspace, SplitDir(run.layout.split.dir)
    from fashion_tagger.workspace.prepared import publish_batch, published_images, stage_in_batches

    size_dir = cache_size_dir(config.cache_root, config.images.width, config.images.height)
    with workspace.lease(f"cache:{size_dir.name}", f"the image cache at {size_dir.name}"):
        if not workspace.is_remote:
            return prepare_images(split.dir, config.cache_root, config)
        shas = set(load_split_images(split.dir)["image_sha256"])
        published = published_images(workspace, size_dir)
        holding = {published[sha] for sha in shas if sha in published}  # the batches with images of this split
        stage_in_batches(workspace, size_dir, holding)
        new = sorted(shas - set(published))
        if new:
            workspace.require(run.config.raw_root / _raw_name(run), "the raw dataset")
        result = prepare_images(split.dir, config.cache_root, config)
        batch = publish_batch(workspace, size_dir, new)
        prepared = io.read_json(split.prepared)
        io.write_json(split.prepared, {**prepared, "batches": sorted(holding | ({batch} if batch else set()))})
        return result


def _raw_name(run: Any) -> str:
    from fashion_tagger.runs.run import stage_result

    return Path(stage_result(run.layout, "fetch")["raw_dir"]).name
