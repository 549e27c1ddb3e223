"""Airflow DAG `fashion_tagger_tagging`: tag the product catalog with the champion and keep the tags current.

Runs when a new model is registered, when the catalog asset is updated, and on a cron schedule. Each task calls
one function of `fashion_tagger.tagging` with paths; the shards are tagged in parallel, as child processes, on
the GPU queue. See docs/tagging.md.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import Any

from airflow.sdk import Param, dag, task
from fashion_tagger_common import (
    CATALOG,
    CATALOG_TAGS,
    DEFAULT_ARGS,
    GPU_POOL,
    GPU_QUEUE,
    REGISTERED_MODEL,
    errors_follow_the_contract,
    schedule,
)

from fashion_tagger.orchestration import dag_support, form  # light: no torch/mlflow at parse time

SHARD_TIMEOUT = dag_support.timeout_from_env("shard", 4)  # $FASHION_TAGGER_SHARD_TIMEOUT_HOURS
DEFAULT_CRON = "0 3 * * *"  # nightly: picks up photos added to the catalog folder without an asset event


TAG_SHARD_DOC = """
Tag one shard with the pinned version in a child process (`fashion-tagger tag`): its DataLoader workers decode
while the network runs, and CUDA never starts inside the Airflow worker. Images already tagged by this version
(same content hash in the merged table) are not tagged again.
"""

# The trigger form, generated from the configuration schema (fashion_tagger.orchestration.form.TAGGING_FORM_FIELDS).
PARAMS = {name: Param(**spec) for name, spec in form.tagging_form_params().items()}


@dag(
    dag_id="fashion_tagger_tagging",
    dag_display_name="Fashion tagger: tag the catalog",
    description="Tag every catalog photo with the champion: incremental, sharded, with a review queue.",
    schedule=schedule("FASHION_TAGGER_TAGGING_SCHEDULE", DEFAULT_CRON, or_assets=REGISTERED_MODEL | CATALOG),
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # two runs would write the same tags folder
    params=PARAMS,
    tags=["fashion-tagger", "tagging", "mlflow"],
    default_args=DEFAULT_ARGS,
)
def fashion_tagger_tagging():
    """
    ### Tag the product catalog with the champion

    `pin_model` → `list_shards` → `tag_shard` (one mapped task per shard) → `merge_shards` → `log_summary`

    * **Triggers**: a new registered model (asset `fashion_tagger_model`, from the training DAG), an update of
      asset `fashion_tagger_catalog`, and the cron `FASHION_TAGGER_TAGGING_SCHEDULE` (default 03:00 UTC).
    * **Model**: `models:/fashion-tagger@champion` is resolved once, in `pin_model`; every shard loads that
      version, so a champion promoted mid-run never mixes two models in one table.
    * **Incremental**: an image whose content this version has tagged already keeps its tags; a new champion
      retags everything and `changes.csv` lists every tag that changed, with both confidences.
    * **Outputs** in the tags folder: `tags.parquet`, `rejects.csv`, `review.csv`/`review.parquet` (tags under
      their attribute's threshold, least confident first), `changes.csv`, `summary.json`; a run's shards under
      `work/<run id>/`. Summary, throughput and confidence histograms: MLflow experiment `fashion-tagger-tagging`.
    * **GPU**: `tag_shard` runs on queue `gpu` in pool `gpu`, as a child process (`fashion-tagger tag`).
    """

    @task
    def pin_model(**context) -> dict[str, Any]:
        """
        Resolve the trigger parameters into the catalog, the tags folder and one concrete model version
        (`@champion` → its version number now), and write the run's `config.yaml` and `model.json`.
        """
        from fashion_tagger.core import io
        from fashion_tagger.core.config import load_config, save_config
        from fashion_tagger.core.layout import run_dir_name
        from fashion_tagger.orchestration.form import default_preset
        from fashion_tagger.tagging.tagger import PINNED_MODEL_FILENAME, resolve_model, run_work_dir

        params = context["params"]
        with errors_follow_the_contract():
            sizes = {key: params[key] for key in ("shard_size", "batch_size") if params.get(key) is not None}
            config = load_config(default_preset(), {"tagging": sizes})
            source = params.get("source") or os.environ.get("FASHION_TAGGER_CATALOG") or str(
                config.home_dir / "catalog")
            out_dir = params.get("out_dir") or os.environ.get("FASHION_TAGGER_TAGS_DIR") or str(
                config.home_dir / "tags")
            model = resolve_model(params.get("model") or f"models:/{config.registry.model_name}@champion", config)
        work_dir = run_work_dir(out_dir, run_dir_name(context["run_id"]))
        save_config(config, work_dir)
        io.write_json(work_dir / PINNED_MODEL_FILENAME, model.to_dict())
        return {"source": source, "out_dir": out_dir, "work_dir": str(work_dir), **model.to_dict()}

    @task
    def list_shards(run: dict[str, Any]) -> list[dict[str, Any]]:
        """
        List the catalog's images (id = file name), write the listing and the listing's rejects (ids of the
        manifest without an image, duplicate ids) and split it into shards of `tagging.shard_size` images.
        """
        from fashion_tagger.core import io
        from fashion_tagger.core.config import CONFIG_FILENAME, load_config
        from fashion_tagger.tagging.tagger import LISTING_FILENAME, REJECTS_FILENAME, list_catalog, split_listing

        config = load_config(os.path.join(run["work_dir"], CONFIG_FILENAME))
        with errors_follow_the_contract():
            items, rejects = list_catalog(run["source"], s3_endpoint_url=config.data.s3_endpoint_url)
        io.write_parquet(items, os.path.join(run["work_dir"], LISTING_FILENAME))
        rejects.to_csv(os.path.join(run["work_dir"], REJECTS_FILENAME), index=False)
        shards = split_listing(items, config.tagging.shard_size, run["work_dir"])
        return [{"listing": str(path), "work_dir": run["work_dir"], "out_dir": run["out_dir"],
                 "model_uri": run["model_uri"]} for path in shards]

    # A mapped task does not take its docstring as doc_md by itself, so the UI would show none.
    @task(queue=GPU_QUEUE, pool=GPU_POOL, execution_timeout=SHARD_TIMEOUT, doc_md=TAG_SHARD_DOC)
    def tag_shard(shard: dict[str, Any]) -> dict[str, Any]:
        from pathlib import Path

        from fashion_tagger.core.config import CONFIG_FILENAME
        from fashion_tagger.orchestration.child import run_json_command
        from fashion_tagger.tagging.tagger import TAGS_FILENAME

        listing = Path(shard["listing"])
        command = [sys.executable, "-m", "fashion_tagger", "tag", *map(str, [
            listing, "--out", listing.parent, "--model", shard["model_uri"],
            "--previous", Path(shard["out_dir"]) / TAGS_FILENAME,
            "--config", Path(shard["work_dir"]) / CONFIG_FILENAME,
        ])]
        with errors_follow_the_contract():
            result = run_json_command("tag", command)
        return {key: result[key] for key in ("out_dir", "tagged", "reused", "rejected", "seconds")}

    @task(outlets=[CATALOG_TAGS])
    def merge_shards(run: dict[str, Any], shards: list[dict[str, Any]], **context) -> dict[str, Any]:
        """
        Merge the shards into the tags folder: `tags.parquet`, `rejects.csv`, the review queue and the
        changes against the previous table, then `summary.json`.
        """
        import pandas as pd

        from fashion_tagger.core.config import CONFIG_FILENAME, load_config
        from fashion_tagger.tagging.tagger import REJECTS_FILENAME, PinnedModel
        from fashion_tagger.tagging.tagger import merge_shards as merge

        config = load_config(os.path.join(run["work_dir"], CONFIG_FILENAME))
        # By index up to the count: iterating the lazy sequence probes one past the end and logs a 404 as an error.
        shard_dirs = [shards[i]["out_dir"] for i in range(len(shards))]
        listing_rejects = pd.read_csv(os.path.join(run["work_dir"], REJECTS_FILENAME), dtype=str)
        result = merge(shard_dirs, run["out_dir"], PinnedModel.from_dict(run), config=config,
                       extra_rejects=listing_rejects).to_dict()
        result.pop("files")
        context["outlet_events"][CATALOG_TAGS].extra = {
            key: result[key] for key in ("model_name", "model_version", "table", "tagged", "review")}
        return result

    @task
    def log_summary(run: dict[str, Any], merged: dict[str, Any], **context) -> dict[str, Any]:
        """
        Log the run to MLflow experiment `fashion-tagger-tagging`: counts and images/s as metrics, a
        confidence histogram per attribute, the summary, review queue, changes and rejects as artifacts.
        """
        from fashion_tagger.core.config import CONFIG_FILENAME, load_config
        from fashion_tagger.tagging.tagger import log_summary as log_to_mlflow

        config = load_config(os.path.join(run["work_dir"], CONFIG_FILENAME))
        run_id = log_to_mlflow(run["out_dir"], config, tags={"airflow.dag_run_id": context["run_id"]})
        return {**merged, "mlflow_run_id": run_id}

    run = pin_model()
    shards = tag_shard.expand(shard=list_shards(run))
    log_summary(run, merge_shards(run, shards))


fashion_tagger_tagging()
