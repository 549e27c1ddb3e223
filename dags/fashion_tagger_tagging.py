"""Airflow DAG `fashion_tagger_tagging`: tag the product catalog with the champion and keep the tags current.

Runs when a new model is registered, when the catalog asset is updated, and on a cron schedule. Each task calls
one function of `fashion_tagger.tagging` with paths; the shards are tagged in parallel, as child processes, on
the GPU queue. See docs/tagging.md.
"""

from __future__ import annotations

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
        from airflow.sdk.exceptions import AirflowSkipException

        from fashion_tagger.orchestration.form import TAGGING_FORM_FIELDS, default_preset, param_overrides
        from fashion_tagger.tagging import jobs
        from fashion_tagger.tagging.catalog import NoModelYet

        with errors_follow_the_contract():
            overrides = param_overrides(context["params"], TAGGING_FORM_FIELDS)  # {"tagging": {"catalog": ...}}
            try:
                return jobs.pin_model(overrides, context["run_id"], preset=default_preset())
            except NoModelYet as exc:
                # A scheduled or asset-triggered run before the first champion has nothing to tag with: skipped,
                # not failed. A person who triggers a run by hand is told the model is missing.
                run_type = getattr(context["dag_run"].run_type, "value", context["dag_run"].run_type)
                if run_type == "manual":
                    raise
                raise AirflowSkipException(f"nothing to tag yet: {exc}") from None

    @task
    def list_shards(run: dict[str, Any]) -> list[dict[str, Any]]:
        """
        List the catalog's images (id = file name), write the listing and the listing's rejects (ids of the
        manifest without an image, duplicate ids) and split it into shards of `tagging.shard_size` images.
        """
        from fashion_tagger.tagging import jobs

        with errors_follow_the_contract():
            return jobs.list_shards(run)

    # A mapped task does not take its docstring as doc_md by itself, so the UI would show none.
    @task(queue=GPU_QUEUE, pool=GPU_POOL, execution_timeout=SHARD_TIMEOUT, doc_md=TAG_SHARD_DOC)
    def tag_shard(shard: dict[str, Any]) -> dict[str, Any]:
        from fashion_tagger.orchestration.child import run_json_command
        from fashion_tagger.tagging import jobs

        with errors_follow_the_contract():
            return jobs.tag_shard(shard, run_json_command)  # the command line is `jobs.shard_command(shard)`

    @task(outlets=[CATALOG_TAGS])
    def merge_shards(run: dict[str, Any], shards: list[dict[str, Any]], **context) -> dict[str, Any]:
        """
        Merge the shards into the tags folder: `tags.parquet`, `rejects.csv`, the review queue and the
        changes against the previous table, then `summary.json`.
        """
        from fashion_tagger.tagging import jobs

        # By index up to the count: iterating the lazy sequence probes one past the end and logs a 404 as an error.
        shard_dirs = [shards[i]["out_dir"] for i in range(len(shards))]
        with errors_follow_the_contract():
            result = jobs.merge_shards(run, shard_dirs)
        context["outlet_events"][CATALOG_TAGS].extra = {key: result[key] for key in jobs.MERGED_EVENT_KEYS}
        return result

    @task
    def log_summary(run: dict[str, Any], merged: dict[str, Any], **context) -> dict[str, Any]:
        """
        Log the run to MLflow experiment `fashion-tagger-tagging`: counts and images/s as metrics, a
        confidence histogram per attribute, the summary, review queue, changes and rejects as artifacts.
        """
        from fashion_tagger.tagging import jobs

        return jobs.log_summary(run, merged, tags={"airflow.dag_run_id": context["run_id"]})

    run = pin_model()
    shards = tag_shard.expand(shard=list_shards(run))
    log_summary(run, merge_shards(run, shards))


fashion_tagger_tagging()
