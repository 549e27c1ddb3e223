"""The entry points of catalog tagging: `tag_catalog` behind `fashion-tagger tag`, and one function per task of the
tagging DAG (`pin_model` ... `log_summary`), each taking and returning JSON-able values (paths, ids, counts), so
that the DAG only passes them on and XCom never carries a table or a model.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.config import Config, load_config, project_home, save_config
from fashion_tagger.core.layout import Home, TaggingWorkDir, TagsDir
from fashion_tagger.tagging import outputs
from fashion_tagger.tagging import summary as mlflow_summary
from fashion_tagger.tagging.catalog import list_catalog, split_listing
from fashion_tagger.tagging.tagger import (
    PinnedModel,
    load_tagger,
    requested_model,
    resolve_model,
    review_thresholds,
    tag_items,
)
from fashion_tagger.workspace.workspace import Workspace, open_workspace

log = logging.getLogger(__name__)

CATALOG_ENV = "FASHION_TAGGER_CATALOG"  # the catalog when `tagging.catalog` is empty
TAGS_DIR_ENV = "FASHION_TAGGER_TAGS_DIR"  # the tags folder when `tagging.out_dir` is empty
SHARD_RESULT_KEYS = ("out_dir", "tagged", "reused", "rejected", "seconds")
MERGED_EVENT_KEYS = ("model_name", "model_version", "table", "tagged", "review")  # the tags asset's event extra

JsonRunner = Callable[[str, Sequence[str]], Mapping[str, Any]]


def tag_catalog(
    source: str | Path,
    model_uri: str | PinnedModel | None,
    out_dir: str | Path,
    *,
    config: Config | None = None,
    manifest: str | Path | None = None,
    previous: str | Path | None = None,
    device: str | None = None,
) -> outputs.TaggingResult:
    """Tag every image of SOURCE with one pinned version of MODEL_URI (None: `tagging.model`, else the champion)
    into the tags folder OUT_DIR: tags.parquet, rejects.csv, the review queue, the changes and summary.json.

    The previous table is OUT_DIR/tags.parquet unless PREVIOUS names another one (a shard compares against
    the merged table). Images it holds under the same model version and content hash are not tagged again.
    """
    config = config or load_config()
    if isinstance(model_uri, PinnedModel):
        model = model_uri
    else:
        model = resolve_model(model_uri or requested_model(config), config)
    tags = TagsDir(Path(out_dir).expanduser())
    items, rejects = list_catalog(source, manifest=manifest, s3_endpoint_url=config.data.s3_endpoint_url)
    before = outputs.read_table(previous if previous is not None else tags.tags)
    log.info("tagging %d images of %s with %s version %s", len(items), source, model.name, model.version)
    predictor = load_tagger(model, config, device)
    settings = config.tagging
    table, unreadable, counts = tag_items(items, predictor, model, previous=before, batch_size=settings.batch_size,
                                          workers=settings.workers, s3_endpoint_url=config.data.s3_endpoint_url)
    rejects = pd.concat([df for df in (rejects, unreadable) if len(df)] or [rejects], ignore_index=True)
    thresholds = review_thresholds(predictor, settings)
    return outputs.write_outputs(tags.dir, table, rejects, model=model, counts=counts, previous=before,
                                 thresholds={a: d["threshold"] for a, d in thresholds.items()},
                                 threshold_details=thresholds)


# --- the tagging DAG's tasks --------------------------------------------------------------------------------------


def catalog_source(config: Config) -> str:
    """`tagging.catalog`, else $FASHION_TAGGER_CATALOG, else <home>/catalog (for an object-store home its URL,
    `s3://.../catalog`, which every machine lists and reads directly)."""
    home = config.layout
    return config.tagging.catalog or os.environ.get(CATALOG_ENV) or open_workspace(home).url(home.catalog)


def tags_folder(config: Config) -> Path:
    """`tagging.out_dir`, else $FASHION_TAGGER_TAGS_DIR, else <home>/tags."""
    chosen = config.tagging.out_dir or os.environ.get(TAGS_DIR_ENV)
    return Path(chosen).expanduser() if chosen else Home(config.home_dir).tags.dir


# With an object-store home each task may run on another machine: the folders the tasks hand on are this machine's
# copy of the home (`_here`), and the files they read and write travel through the store, one object each. The tags
# folder's files go up table first and summary last, as `outputs.write_outputs` writes them; each shard folder is
# written by one task only.


def _workspace() -> Workspace:
    return open_workspace(project_home())


def _here(path: str | Path) -> Path:
    """PATH, recorded by a task on some machine, on this one (`Home.localize`; unchanged for a local home)."""
    return project_home().localize(path)


def _tag_files(folder: Path) -> tuple[Path, ...]:
    tags = TagsDir(folder)
    return (tags.tags, tags.rejects, tags.review_csv, tags.review_parquet, tags.changes_csv, tags.changes_parquet,
            tags.summary)


def _work(run: Mapping[str, Any]) -> tuple[TaggingWorkDir, Config]:
    work = TaggingWorkDir(_here(run["work_dir"]))
    _workspace().pull_files((work.config, work.model, work.rejects))
    return work, load_config(work.config)


def pin_model(overrides: Mapping[str, Any], run_id: str, *, preset: str | None = None) -> dict[str, str]:
    """Build the run's configuration (PRESET, then OVERRIDES such as {"tagging": {"catalog": ..., "shard_size":
    ...}}), resolve its catalog, tags folder and model into one concrete version (`@champion` -> its number now),
    and keep them in the run's work folder (config.yaml, model.json). The run's paths and pinned model."""
    config = load_config(preset, dict(overrides))
    source, out_dir = catalog_source(config), tags_folder(config)
    model = resolve_model(requested_model(config), config)
    resolved = config.tagging.model_copy(update={"catalog": source, "out_dir": str(out_dir), "model": model.requested})
    work = TagsDir(out_dir).work(run_id)
    save_config(config.model_copy(update={"tagging": resolved}), work.dir)
    io.write_json(work.model, model.to_dict())
    _workspace().push_files((work.config, work.model))
    return {"source": source, "out_dir": str(out_dir), "work_dir": str(work.dir), **model.to_dict()}


def list_shards(run: Mapping[str, Any]) -> list[dict[str, str]]:
    """List the run's catalog into its work folder (the listing and the rejects of listing it) and split it into
    shards of `tagging.shard_size` images: one dict per shard for `tag_shard`."""
    work, config = _work(run)
    items, rejects = list_catalog(run["source"], s3_endpoint_url=config.data.s3_endpoint_url)
    io.write_parquet(items, work.listing)
    with io.atomic_path(work.rejects) as tmp:
        rejects.to_csv(tmp, index=False)
    shards = split_listing(items, config.tagging.shard_size, work.dir)
    _workspace().push_files((work.listing, work.rejects, *shards))
    return [{"listing": str(path), "work_dir": run["work_dir"], "out_dir": run["out_dir"],
             "model_uri": run["model_uri"]} for path in shards]


def shard_command(shard: Mapping[str, str], python: str | None = None) -> list[str]:
    """`python -m fashion_tagger tag <listing> --out <shard folder> ...`: one shard, its pinned version, compared
    with the merged table, with the run's config.yaml."""
    listing = Path(shard["listing"])
    return [python or sys.executable, "-m", "fashion_tagger", "tag", *map(str, [
        listing, "--out", listing.parent, "--model", shard["model_uri"],
        "--previous", TagsDir(Path(shard["out_dir"])).tags,
        "--config", TaggingWorkDir(Path(shard["work_dir"])).config,
    ])]


def tag_shard(shard: Mapping[str, str], run_command: JsonRunner) -> dict[str, Any]:
    """Tag one shard in a child process: RUN_COMMAND (the orchestration's runner of a command that prints its
    JSON result) runs `shard_command`, so CUDA never starts in the caller. The shard's folder and counts."""
    here = {**shard, **{key: str(_here(shard[key])) for key in ("listing", "work_dir", "out_dir")}}
    listing, workspace = Path(here["listing"]), _workspace()
    workspace.pull_files((TaggingWorkDir(Path(here["work_dir"])).config, listing, TagsDir(Path(here["out_dir"])).tags))
    result = run_command("tag", shard_command(here))
    workspace.push_files(_tag_files(listing.parent))
    return {key: result[key] for key in SHARD_RESULT_KEYS}


def merge_shards(run: Mapping[str, Any], shard_dirs: Sequence[str]) -> dict[str, Any]:
    """Merge the shard folders and the listing's rejects into the run's tags folder (see `outputs.merge_shards`)."""
    work, _ = _work(run)
    folders, out_dir, workspace = [_here(d) for d in shard_dirs], _here(run["out_dir"]), _workspace()
    workspace.pull_files([path for folder in folders for path in _tag_files(folder)])
    workspace.pull_files((TagsDir(out_dir).tags,))  # the previous table, for the changes
    # The thresholds the shards judged their tags with (the pinned model's, or the run's hand-set ones).
    result = outputs.merge_shards(folders, out_dir, PinnedModel.from_dict(run),
                                  extra_rejects=pd.read_csv(work.rejects, dtype=str)).to_dict()
    workspace.push_files(_tag_files(out_dir))
    result.pop("files")
    return result


def log_summary(run: Mapping[str, Any], merged: Mapping[str, Any], tags: Mapping[str, str]) -> dict[str, Any]:
    """Log the merged run to MLflow (`summary.log_summary`) with TAGS on the MLflow run; MERGED and its run id."""
    _, config = _work(run)
    out_dir = _here(run["out_dir"])
    _workspace().pull_files(_tag_files(out_dir))
    return {**merged, "mlflow_run_id": mlflow_summary.log_summary(out_dir, config, tags=tags)}
