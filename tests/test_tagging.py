"""Catalog tagging: tags equal the served model's, broken files become rejects, reruns tag only what changed, a new
champion retags everything with a changes report, the review queue, S3 catalogs, the CLI command, and the tagging
DAG (structure, and `dag.test()` against a registered champion)."""

from __future__ import annotations

import io as _io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tagger_fixtures import draw, jpeg_bytes, make_run, make_split, tiny_config
from tagger_helpers import train_on_real_small_images

from fashion_tagger.core.config import DEFAULT_REVIEW_THRESHOLDS, ConfigError, load_config
from fashion_tagger.core.errors import DataError, SourceError, SourceUnavailableError
from fashion_tagger.core.layout import TagsDir
from fashion_tagger.core.schema import ATTRIBUTES
from fashion_tagger.orchestration import form
from fashion_tagger.tagging import jobs, outputs, tagger
from fashion_tagger.tagging.catalog import NoModelYet, TaggingError, list_catalog, read_listing, split_listing

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "fashion_tagger_tagging.py"
DAG_ID = "fashion_tagger_tagging"
GOOD = 30  # drawn product photos in the generated catalog
BROKEN = {"9001": "truncated", "9002": "empty", "9003": "text"}
MISSING_ID = "9004"  # in styles.csv, no image
MODEL_NAME = "fashion-tagger"


def make_catalog(root: Path, rows: int = GOOD, seed: int = 5) -> Path:
    """images/<id>.jpg drawn like the tiny models' training images (block shape = masterCategory, colour =
    baseColour), three broken files, one byte-identical copy under another id, and styles.csv with the truth."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(rows):
        master, colour = ("Apparel", "Footwear")[i % 2], ("Blue", "Red")[(i // 2) % 2]
        (images / f"{5000 + i}.jpg").write_bytes(jpeg_bytes(draw(master, colour, rng)))
        records.append({"id": 5000 + i, "masterCategory": master, "baseColour": colour})
    shutil.copyfile(images / "5000.jpg", images / "5999.jpg")  # same content, another product
    records.append({**records[0], "id": 5999})
    valid = (images / "5001.jpg").read_bytes()
    (images / "9001.jpg").write_bytes(valid[: len(valid) // 2])
    (images / "9002.jpg").write_bytes(b"")
    (images / "9003.jpg").write_text("this is a product description, not a photo\n")
    records += [{"id": int(i), "masterCategory": "Apparel", "baseColour": "Blue"} for i in (*BROKEN, MISSING_ID)]
    pd.DataFrame(records).to_csv(root / "styles.csv", index=False)
    return root


def truth(catalog: Path) -> pd.DataFrame:
    return pd.read_csv(catalog / "styles.csv", dtype=str).set_index("id")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("catalog") / "catalog")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """One SQLite MLflow store for the module with two registered versions: 1 = the nearly perfect probe
    (champion), 2 = always Footwear/Red with a weak margin (registered, not promoted: the gate rejects it)."""
    from fashion_tagger.registry import register as registry

    root = tmp_path_factory.mktemp("models")
    store = f"sqlite:///{root / 'mlflow.db'}"
    config = tiny_config(root / "home", tracking_uri=store)
    split = make_split(root / "split")
    probe = make_run(root / "probe", split, "probe", config)
    weak = make_run(root / "weak", split, "constant:Footwear,Red", config, strength=0.5)
    first, second = registry.register_run(probe, config), registry.register_run(weak, config)
    assert (first.version, second.version) == ("1", "2") and "champion" in first.aliases
    return {"store": store, "config": config, "probe_run": probe, "weak_run": weak}


def tag_config(models: dict, **tagging_fields) -> object:
    return load_config(overrides={**models["config"].model_dump(mode="json"),
                                  "tagging": {"workers": 2, "batch_size": 8, **tagging_fields}})


def promote(models: dict, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(models["store"], models["store"]).set_registered_model_alias(MODEL_NAME, "champion", version)


# --- the library --------------------------------------------------------------------------------------------------


def test_tags_equal_the_served_model_and_broken_files_are_rejects(catalog, models, tmp_path):
    from fashion_tagger.core import tracking

    promote(models, "1")
    config = tag_config(models)
    result = jobs.tag_catalog(catalog, f"models:/{MODEL_NAME}@champion", tmp_path / "tags", config=config)
    assert (result.model_name, result.model_version, result.model_uri) == (MODEL_NAME, "1", f"models:/{MODEL_NAME}/1")
    assert (result.listed, result.tagged, result.reused, result.rejected) == (GOOD + 1 + 4, GOOD + 1, 0, 4)

    table = pd.read_parquet(result.table)
    assert list(table.columns) == outputs.TAGS_COLUMNS
    assert len(table) == GOOD + 1 and table["id"].is_unique
    assert set(table["model_version"]) == {"1"} and table["tagged_at"].dt.tz is not None
    # The tiny model tags two attributes; the other five columns exist and are empty.
    assert table[["season", "usage", "season_confidence"]].isna().all().all()
    assert table["image_sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    copies = table.set_index("id").loc[["5000", "5999"]]
    assert copies["image_sha256"].nunique() == 1 and copies["masterCategory"].nunique() == 1

    # Exactly what the served pyfunc model answers for the same files.
    served = tracking.load_model(f"models:/{MODEL_NAME}/1", config).predict(
        pd.DataFrame({"image": [Path(p).read_bytes() for p in table["image_path"]]}))
    for attribute in ("masterCategory", "baseColour"):
        assert table[attribute].tolist() == served[attribute].tolist()
        np.testing.assert_allclose(table[f"{attribute}_confidence"], served[f"{attribute}_confidence"], atol=1e-3)
    expected = truth(catalog).loc[table["id"]]
    assert (table["masterCategory"].to_numpy() == expected["masterCategory"].to_numpy()).mean() >= 0.9
    assert (table["baseColour"].to_numpy() == expected["baseColour"].to_numpy()).mean() >= 0.9

    rejects = pd.read_csv(TagsDir(tmp_path / "tags").rejects, dtype=str).set_index("id")
    assert set(rejects.index) == {*BROKEN, MISSING_ID}
    assert "truncated" in rejects.at["9001", "reason"].lower()
    assert rejects.at["9002", "reason"].endswith("9002.jpg as an image: empty (0 bytes)")
    assert "9003.jpg as an image: UnidentifiedImageError" in rejects.at["9003", "reason"]
    assert "in the manifest but no image" in rejects.at[MISSING_ID, "reason"]
    summary = json.loads((TagsDir(tmp_path / "tags").summary).read_text())
    assert summary["requested_model"] == f"models:/{MODEL_NAME}@champion" and summary["tagged"] == GOOD + 1


def test_rerun_tags_only_new_content_and_a_new_champion_retags_with_a_changes_report(catalog, models, tmp_path):
    promote(models, "1")
    config = tag_config(models)
    work = tmp_path / "catalog"
    shutil.copytree(catalog, work)
    out = tmp_path / "tags"
    first = jobs.tag_catalog(work, f"models:/{MODEL_NAME}@champion", out, config=config)
    before = pd.read_parquet(TagsDir(out).tags)

    again = jobs.tag_catalog(work, f"models:/{MODEL_NAME}@champion", out, config=config)
    assert (again.tagged, again.reused, again.changed_items) == (0, first.tagged, 0)
    after = pd.read_parquet(TagsDir(out).tags)
    pd.testing.assert_frame_equal(before, after)  # tagged_at included: nothing was tagged again

    # A product photo replaced under the same id is tagged again; a new product too; a deleted one leaves.
    shutil.copyfile(work / "images" / "5001.jpg", work / "images" / "5000.jpg")  # now Footwear
    (work / "images" / "5998.jpg").write_bytes((work / "images" / "5002.jpg").read_bytes())
    (work / "images" / "5029.jpg").unlink()
    styles = pd.read_csv(work / "styles.csv")
    pd.concat([styles, pd.DataFrame([{"id": 5998}])]).to_csv(work / "styles.csv", index=False)
    third = jobs.tag_catalog(work, f"models:/{MODEL_NAME}@champion", out, config=config)
    assert (third.tagged, third.reused, third.removed) == (0, first.tagged, 1)  # same contents as known ones
    changes = pd.read_csv(TagsDir(out).changes_csv, dtype={"id": str})
    assert set(changes["id"]) == {"5000"} and set(changes["attribute"]) >= {"masterCategory"}

    # Promote another version: everything is tagged again and every changed tag is reported with both confidences.
    prior = pd.read_parquet(TagsDir(out).tags)
    promote(models, "2")
    retag = jobs.tag_catalog(work, f"models:/{MODEL_NAME}@champion", out, config=config)
    assert (retag.model_version, retag.tagged, retag.reused) == ("2", first.tagged, 0)
    table = pd.read_parquet(TagsDir(out).tags)
    assert set(table["model_version"]) == {"2"} and set(table["masterCategory"]) == {"Footwear"}
    changes = pd.read_parquet(TagsDir(out).changes_parquet)
    assert retag.changed_items == changes["id"].nunique() > 0
    assert (changes["previous_model_version"] == "1").all() and (changes["model_version"] == "2").all()
    master = changes[changes["attribute"] == "masterCategory"]
    assert (master["previous_tag"] == "Apparel").all() and (master["tag"] == "Footwear").all()
    assert (master["previous_confidence"] > 0.9).all() and np.allclose(master["confidence"], 1 / (1 + np.exp(-0.5)))
    assert set(master["id"]) == set(prior.loc[prior["masterCategory"] == "Apparel", "id"])

    # The weak model is unsure everywhere: every item is in the review queue, least confident first.
    review = pd.read_csv(TagsDir(out).review_csv, dtype={"id": str})
    assert len(review) == len(table) and review["lowest_confidence"].is_monotonic_increasing
    assert set(review["low_attributes"]) == {"masterCategory"}  # 0.62: under 0.8, over baseColour's 0.5
    assert {"image_path", "masterCategory", "masterCategory_confidence"} <= set(review.columns)
    assert review["id"].tolist() == pd.read_parquet(TagsDir(out).review_parquet)["id"].tolist()


def test_review_queue_uses_each_attributes_threshold():
    table = pd.DataFrame({
        "id": ["a", "b", "c", "d"], "image_path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        "masterCategory": ["Apparel"] * 4, "masterCategory_confidence": [0.95, 0.7, 0.99, 0.5],
        "season": ["Summer"] * 4, "season_confidence": [0.45, 0.9, 0.3, 0.35],
        "usage": [None] * 4, "usage_confidence": [np.nan] * 4,
    })
    queue = outputs.review_queue(table, {"masterCategory": 0.8, "season": 0.4, "usage": 0.5})
    assert queue["id"].tolist() == ["c", "d", "b"]  # a: both above their thresholds
    assert queue["lowest_confidence"].tolist() == [0.3, 0.35, 0.7]
    assert queue["low_attributes"].tolist() == ["season", "masterCategory,season", "masterCategory"]
    assert queue.columns[:4].tolist() == ["id", "image_path", "lowest_confidence", "low_attributes"]

    # Hand-set thresholds are overrides; by default a model's own (calibrated) thresholds apply, and a model
    # without them falls back to DEFAULT_REVIEW_THRESHOLDS.
    assert load_config().tagging.thresholds == {} and DEFAULT_REVIEW_THRESHOLDS.keys() == set(ATTRIBUTES)
    with pytest.raises(ConfigError, match="thresholds"):
        load_config(overrides=["tagging.thresholds={colour: 0.5}"])
    with pytest.raises(ConfigError, match="out of range"):
        load_config(overrides=["tagging.thresholds={season: 1.5}"])


def test_the_model_is_resolved_once_and_bad_uris_say_what_to_do(models, tmp_path):
    config = tag_config(models)
    promote(models, "1")
    pinned = tagger.resolve_model(f"models:/{MODEL_NAME}@champion", config)
    promote(models, "2")  # a promotion after resolving does not move what was pinned
    assert (pinned.version, pinned.uri) == ("1", f"models:/{MODEL_NAME}/1")
    assert tagger.resolve_model(f"models:/{MODEL_NAME}@champion", config).version == "2"
    assert tagger.resolve_model(f"models:/{MODEL_NAME}/1", config) == tagger.PinnedModel(
        MODEL_NAME, "1", f"models:/{MODEL_NAME}/1", f"models:/{MODEL_NAME}/1")
    with pytest.raises(NoModelYet, match="no-such-model@champion is not in the registry.*register"):
        tagger.resolve_model("models:/no-such-model@champion", config)
    with pytest.raises(NoModelYet, match=f"{MODEL_NAME}@nope is not in the registry"):
        tagger.resolve_model(f"models:/{MODEL_NAME}@nope", config)
    with pytest.raises(TaggingError, match="must look like models:/NAME@ALIAS"):
        tagger.resolve_model(f"models:/{MODEL_NAME}/latest", config)
    with pytest.raises(TaggingError, match="neither a models:/ URI nor an existing export"):
        tagger.resolve_model(str(tmp_path / "nothing"), config)
    local = tagger.resolve_model(str(models["probe_run"]), config)
    assert local.name == tagger.LOCAL_MODEL_NAME and local.version.startswith("sha256:")


def test_an_s3_catalog_gets_the_same_tags_as_the_folder(catalog, models, tmp_path, monkeypatch):
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    config = tag_config(models, workers=0)  # moto's bucket lives in this process's memory
    folder = jobs.tag_catalog(catalog, str(models["probe_run"]), tmp_path / "folder", config=config)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="shop")
        s3.upload_file(str(catalog / "styles.csv"), "shop", "photos/styles.csv")
        for image in (catalog / "images").iterdir():
            s3.upload_file(str(image), "shop", f"photos/images/{image.name}")
        remote = jobs.tag_catalog("s3://shop/photos", str(models["probe_run"]), tmp_path / "s3", config=config)
        with pytest.raises(SourceError, match="listing s3://missing-bucket/x failed"):  # bad input: not retried
            list_catalog("s3://missing-bucket/x")
    with pytest.raises(SourceUnavailableError, match="listing s3://shop/x failed.*did not answer"):  # retried
        list_catalog("s3://shop/x", s3_endpoint_url="http://127.0.0.1:9")
    assert (remote.tagged, remote.rejected) == (folder.tagged, folder.rejected)
    by_folder = pd.read_parquet(folder.table).set_index("id")
    by_s3 = pd.read_parquet(remote.table).set_index("id")
    assert by_s3["image_path"].str.startswith("s3://shop/photos/images/").all()
    columns = ["image_sha256", "masterCategory", "baseColour", "model_version"]
    pd.testing.assert_frame_equal(by_s3[columns], by_folder[columns])


def test_listing_rules(tmp_path):
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "a" / "1.jpg").write_bytes(b"1")
    (tmp_path / "a" / "x" / "1.png").write_bytes(b"2")  # the same id in a subfolder
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    items, rejects = list_catalog(tmp_path / "a")
    assert items["id"].tolist() == ["1"] and rejects["reason"].str.startswith("duplicate id").all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        list_catalog(tmp_path / "empty")
    with pytest.raises(DataError, match="neither a folder"):
        list_catalog(tmp_path / "missing")
    (tmp_path / "ids.csv").write_text("sku\n1\n")
    with pytest.raises(DataError, match="no column 'id'"):
        list_catalog(tmp_path / "a", manifest=tmp_path / "ids.csv")
    shards = split_listing(pd.DataFrame({"id": list("abcde"), "image_path": list("abcde")}), 2, tmp_path / "s")
    assert [len(read_listing(p)) for p in shards] == [2, 2, 1]


def test_cli_tags_a_folder_and_reports_bad_input_in_one_line(catalog, models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "fashion_tagger", "tag", str(catalog), "--model", str(models["probe_run"]),
               "--out", str(tmp_path / "tags"), "--set", "tagging.workers=0"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (result["tagged"], result["rejected"], result["model_name"]) == (GOOD + 1, 4, "local")
    assert Path(result["files"][TagsDir(tmp_path / "tags").review_csv.name]).is_file()

    bad = subprocess.run([*command[:4], str(tmp_path / "nowhere"), *command[5:]], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "nowhere is neither a folder, an s3://bucket/prefix nor a listing .parquet" in bad.stderr


# --- the DAG: structure ---------------------------------------------------------------------------------------------

HEAVY_MODULES = ("torch", "torchvision", "timm", "lightning", "mlflow", "pandas", "sklearn")
DAG_ENV = ("FASHION_TAGGER_TAGGING_SCHEDULE", "FASHION_TAGGER_GPU_QUEUE", "FASHION_TAGGER_GPU_POOL",
           "FASHION_TAGGER_TASK_RETRIES", "FASHION_TAGGER_SHARD_TIMEOUT_HOURS")
PARSE_PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from airflow.dag_processing.dagbag import BundleDagBag

    started = time.perf_counter()
    bag = BundleDagBag(sys.argv[1], bundle_path=os.path.dirname(sys.argv[1]))  # on sys.path, as Airflow puts it
    seconds = time.perf_counter() - started
    dag = bag.dags.get("fashion_tagger_tagging")
    shard = dag.task_dict["tag_shard"] if dag else None
    schedule = dag.timetable if dag else None
    condition = getattr(schedule, "asset_condition", None)
    print(json.dumps({
        "seconds": seconds,
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "heavy": [m for m in sys.argv[2].split(",") if m in sys.modules],
        "timetable": type(schedule).__name__,
        "cron": getattr(getattr(schedule, "timetable", None), "expression", None),
        "assets": sorted(a.name for a in condition.objects) if condition else [],
        "tasks": [t.task_id for t in dag.topological_sort()] if dag else [],
        "queue": shard.queue if dag else None,
        "pool": shard.pool if dag else None,
        "retries": shard.retries if dag else None,
        "mapped": type(shard).__name__ if dag else None,
        "docs": all(t.doc_md and len(t.doc_md.split()) >= 10 for t in dag.tasks) if dag else False,
        "outlets": {t.task_id: [a.name for a in t.outlets] for t in dag.tasks if t.outlets} if dag else {},
    }))
    """
)


def _parse(tmp_path, **env: str) -> dict:
    child_env = {k: v for k, v in os.environ.items() if k not in DAG_ENV}
    child_env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                     AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path}/missing/dir/airflow.db", **env)
    proc = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(DAG_FILE), ",".join(HEAVY_MODULES)],
                          capture_output=True, text=True, env=child_env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tagging_dag_parses_fast_without_ml_libraries_and_follows_the_champion(tmp_path):
    probe = _parse(tmp_path)
    assert probe["errors"] == {}
    assert probe["heavy"] == [], f"parsing the DAG imported {probe['heavy']}"
    assert probe["seconds"] < 2.0
    assert probe["timetable"] == "AssetOrTimeSchedule" and probe["cron"] == "0 3 * * *"
    assert probe["assets"] == ["fashion_tagger_catalog", "fashion_tagger_model"]
    assert probe["tasks"] == ["pin_model", "list_shards", "tag_shard", "merge_shards", "log_summary"]
    assert probe["mapped"].endswith("MappedOperator")  # one task instance per shard
    assert (probe["queue"], probe["pool"], probe["retries"]) == ("gpu", "gpu", 2)
    assert probe["docs"] and probe["outlets"] == {"merge_shards": ["fashion_tagger_catalog_tags"]}


def test_tagging_dag_schedule_and_routing_follow_the_environment(tmp_path):
    probe = _parse(tmp_path, FASHION_TAGGER_TAGGING_SCHEDULE="none", FASHION_TAGGER_GPU_QUEUE="cuda",
                   FASHION_TAGGER_GPU_POOL="a100", FASHION_TAGGER_TASK_RETRIES="0")
    assert probe["timetable"] == "AssetTriggeredTimetable"
    assert probe["assets"] == ["fashion_tagger_catalog", "fashion_tagger_model"]
    assert (probe["queue"], probe["pool"], probe["retries"]) == ("cuda", "a100", 0)


def test_a_scheduled_run_before_the_first_champion_is_skipped_and_a_manual_one_fails(isolated_home):
    """A fresh install's first scheduled tagging run has no champion to tag with: skipped, not a red run."""
    from types import SimpleNamespace

    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.sdk.exceptions import AirflowSkipException

    pin_model = BundleDagBag(str(REPO / "dags"), bundle_path=REPO / "dags").dags[DAG_ID].task_dict["pin_model"]
    params = {name: spec.get("default") for name, spec in form.tagging_form_params().items()}
    for run_type in ("scheduled", "asset_triggered"):
        with pytest.raises(AirflowSkipException, match="nothing to tag yet: model models:/fashion-tagger@champion"):
            pin_model.python_callable(params=params, run_id=f"{run_type}__1",
                                      dag_run=SimpleNamespace(run_type=run_type))
    with pytest.raises(Exception, match="fashion-tagger@champion is not in the registry") as failed:
        pin_model.python_callable(params=params, run_id="manual__1", dag_run=SimpleNamespace(run_type="manual"))
    assert type(failed.value).__name__ == "AirflowFailException"


def test_the_model_asset_is_the_one_the_training_dag_updates():
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(str(REPO / "dags"), bundle_path=REPO / "dags")
    assert bag.import_errors == {}
    training, tagger = bag.dags["fashion_tagger_training"], bag.dags[DAG_ID]
    produced = {(a.name, a.uri) for a in training.task_dict["register_model"].outlets}
    consumed = {(a.name, a.uri) for a in tagger.timetable.asset_condition.objects}
    assert produced & consumed == {("fashion_tagger_model", "x-fashion-tagger://registered-model")}


# --- the DAG: dag.test() against a registered champion --------------------------------------------------------------

RUN_PROBE = textwrap.dedent(
    """
    import json, sys
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.models.xcom import XComModel
    from airflow.utils import db
    from airflow.utils.session import create_session

    try:
        db.check_migrations(timeout=1)
    except TimeoutError:
        db.initdb()
    dag = BundleDagBag(sys.argv[1], bundle_path=sys.argv[1]).dags["fashion_tagger_tagging"]
    run = dag.test(run_conf=json.loads(sys.argv[2]))
    with create_session() as session:
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances(session=session)}
        rows = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=dag.dag_id, key="return_value"))
        results = {row.task_id: XComModel.deserialize_value(row) for row in rows if row.map_index < 0}
    print("RESULT " + json.dumps({"state": str(run.state), "tasks": states, "results": results}, default=str))
    """
)


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("airflow_tagging")


def run_tagging_dag(airflow_home: Path, home: Path, store: str, conf: dict) -> dict:
    """One `dag.test()` in a fresh process: Airflow reads its settings once, at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FASHION_TAGGER_", "MLFLOW_"))}
    env.update(
        PYTHONPATH=str(REPO), FASHION_TAGGER_HOME=str(home), FASHION_TAGGER_TASK_RETRIES="0",
        MLFLOW_TRACKING_URI=store, AIRFLOW_HOME=str(airflow_home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{airflow_home / 'airflow.db'}",
    )
    proc = subprocess.run([sys.executable, "-c", RUN_PROBE, str(REPO / "dags"), json.dumps(conf)],
                          capture_output=True, text=True, env=env, timeout=900)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dag_test.log").write_text(proc.stdout + proc.stderr)  # for the assertion messages below
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (proc.stdout + proc.stderr)[-8000:]
    summary = json.loads(lines[-1].removeprefix("RESULT "))
    assert summary["state"] == "success", (summary["tasks"], (proc.stdout + proc.stderr)[-8000:])
    return summary


@pytest.mark.slow
def test_dag_tags_the_catalog_then_only_new_images_then_retags_for_a_new_champion(
    catalog, models, airflow_home, isolated_home, tmp_path
):
    from mlflow import MlflowClient

    promote(models, "1")
    out = tmp_path / "tags"
    conf = {"source": str(catalog), "out_dir": str(out), "shard_size": 20}

    first = run_tagging_dag(airflow_home, isolated_home, models["store"], conf)
    assert set(first["tasks"].values()) == {"success"}
    pinned = first["results"]["pin_model"]
    assert (pinned["model_version"], pinned["model_uri"]) == ("1", f"models:/{MODEL_NAME}/1")
    merged = first["results"]["merge_shards"]
    assert (merged["shards"], merged["tagged"], merged["reused"], merged["rejected"]) == (2, GOOD + 1, 0, 4)
    table = pd.read_parquet(TagsDir(out).tags)
    assert len(table) == GOOD + 1 and set(table["model_version"]) == {"1"} and table["id"].is_unique
    rejects = pd.read_csv(TagsDir(out).rejects, dtype=str)
    assert set(rejects["id"]) == {*BROKEN, MISSING_ID}
    review = pd.read_parquet(TagsDir(out).review_parquet)
    assert (TagsDir(out).review_csv).is_file() and len(review) == merged["review"]
    assert review["lowest_confidence"].is_monotonic_increasing
    client = MlflowClient(models["store"])
    logged = client.get_run(first["results"]["log_summary"]["mlflow_run_id"])
    assert client.get_experiment(logged.info.experiment_id).name == "fashion-tagger-tagging"
    assert logged.data.metrics["tagged"] == GOOD + 1 and logged.data.metrics["images_per_second"] > 0
    histograms = {a.path for a in client.list_artifacts(logged.info.run_id, "histograms")}
    assert histograms == {"histograms/confidence_masterCategory.png", "histograms/confidence_baseColour.png"}

    second = run_tagging_dag(airflow_home, isolated_home, models["store"], conf)
    merged = second["results"]["merge_shards"]
    assert (merged["tagged"], merged["reused"], merged["changed_items"]) == (0, GOOD + 1, 0)
    pd.testing.assert_frame_equal(pd.read_parquet(TagsDir(out).tags), table)

    promote(models, "2")
    third = run_tagging_dag(airflow_home, isolated_home, models["store"], conf)
    assert third["results"]["pin_model"]["model_version"] == "2"
    merged = third["results"]["merge_shards"]
    assert (merged["tagged"], merged["reused"]) == (GOOD + 1, 0) and merged["changed_items"] > 0
    changes = pd.read_csv(TagsDir(out).changes_csv, dtype={"id": str})
    assert len(changes) == merged["changed_tags"] > 0
    assert {"previous_confidence", "confidence", "previous_tag", "tag"} <= set(changes.columns)
    assert set(pd.read_parquet(TagsDir(out).tags)["model_version"]) == {"2"}


# --- real data --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_data
def test_tags_of_a_model_trained_on_real_photos_agree_with_styles_csv(real_small_raw, tmp_path, one_torch_thread):
    """Train briefly on the real small images, then tag held-out real photos: far above the majority share."""
    config = train_on_real_small_images(real_small_raw, tmp_path, tagging={"workers": 2})

    # Tag photos the model never trained on: every real image outside the training split.
    trained_on = set(pd.read_parquet(tmp_path / "split" / "train.parquet")["id"].astype(str))
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for image in sorted((real_small_raw / "images").iterdir()):
        if image.stem not in trained_on:
            (catalog / image.name).symlink_to(image.resolve())
    result = jobs.tag_catalog(catalog, str(tmp_path / "run"), tmp_path / "tags", config=config)
    assert result.tagged >= 2500 and result.rejected == 0

    styles = pd.read_csv(real_small_raw / "styles.csv", dtype=str, on_bad_lines="skip").set_index("id")
    table = pd.read_parquet(result.table).set_index("id").join(styles, rsuffix="_true", how="inner")
    for attribute in ("masterCategory", "gender"):
        accuracy = float((table[attribute] == table[f"{attribute}_true"]).mean())
        majority = float(table[f"{attribute}_true"].value_counts(normalize=True).iloc[0])
        print(f"{attribute}: accuracy {accuracy:.3f} vs majority share {majority:.3f} on {len(table)} photos")
        assert accuracy > majority + 0.15, (attribute, accuracy, majority)


@pytest.mark.services
def test_the_dag_tasks_tag_through_an_object_store_home_each_on_another_machine(catalog, models, tmp_path,
                                                                               monkeypatch):
    """The tagging DAG's tasks with the home in S3 (moto's server) and the registry on an MLflow server, each task
    on a "machine" with its own empty scratch folder: the catalog is read from <home>/catalog in the bucket, the
    shards' outputs and the merged tags reach the next machine only through the store."""
    import boto3
    from moto_server import MOTO_ENV, mlflow_server, moto_s3_server

    from fashion_tagger.orchestration.child import run_json_command
    from fashion_tagger.workspace.workspace import close_workspaces

    promote(models, "1")
    with moto_s3_server() as endpoint, mlflow_server(tmp_path / "mlflow", models["store"]) as tracking:
        env = {**MOTO_ENV, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_TRACKING_URI": tracking,
               "FASHION_TAGGER_HOME": "s3://shop/home",
               "FASHION_TAGGER_DATABASE_URL": f"sqlite:///{tmp_path / 'coordination.db'}"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in (jobs.CATALOG_ENV, jobs.TAGS_DIR_ENV):
            monkeypatch.delenv(name, raising=False)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="shop")
        for path in sorted(p for p in catalog.rglob("*") if p.is_file()):
            s3.upload_file(str(path), "shop", f"home/catalog/{path.relative_to(catalog).as_posix()}")

        def on(machine: str) -> None:
            close_workspaces()
            monkeypatch.setenv("FASHION_TAGGER_SCRATCH", str(tmp_path / "machines" / machine))

        def tag_run(run_id: str, shard_size: int) -> dict:
            on(f"{run_id}-pin")
            run = jobs.pin_model({"tagging": {"shard_size": shard_size, "workers": 2, "batch_size": 8}}, run_id)
            assert run["source"] == "s3://shop/home/catalog"
            on(f"{run_id}-list")
            shards = jobs.list_shards(run)
            done = []
            for number, shard in enumerate(shards):
                on(f"{run_id}-gpu-{number}")
                done.append(jobs.tag_shard(shard, run_json_command))
            on(f"{run_id}-merge")
            merged = jobs.merge_shards(run, [shard["out_dir"] for shard in done])
            on(f"{run_id}-summary")
            return {"pinned": run, "shards": len(shards), "merged": merged,
                    "logged": jobs.log_summary(run, merged, tags={"airflow.dag_run_id": run_id})}

        first = tag_run("manual__first", shard_size=20)
        merged = first["merged"]
        assert (first["shards"], merged["shards"], merged["tagged"], merged["reused"], merged["rejected"]) == (
            2, 2, GOOD + 1, 0, 4)
        objects = {o["Key"] for o in s3.list_objects_v2(Bucket="shop", Prefix="home/tags/")["Contents"]}
        for name in ("tags.parquet", "rejects.csv", "review.parquet", "changes.csv", "summary.json"):
            assert f"home/tags/{name}" in objects, sorted(objects)
        def read(key: str) -> _io.BytesIO:
            return _io.BytesIO(s3.get_object(Bucket="shop", Key=f"home/tags/{key}")["Body"].read())

        table = pd.read_parquet(read("tags.parquet"))
        assert len(table) == GOOD + 1 and table["id"].is_unique and set(table["model_version"]) == {"1"}
        assert table["image_path"].str.startswith("s3://shop/home/catalog/images/").all()
        rejects = pd.read_csv(read("rejects.csv"), dtype=str)
        assert set(rejects["id"]) == {*BROKEN, MISSING_ID}

        # A second run on new machines finds the previous table in the store: nothing is tagged again.
        second = tag_run("manual__second", shard_size=100)["merged"]  # one shard
        assert (second["tagged"], second["reused"], second["changed_items"]) == (0, GOOD + 1, 0)
    close_workspaces()


def test_accepted_flags_and_the_review_queue_are_complements():
    rng = np.random.default_rng(0)
    n = 200
    table = pd.DataFrame({"id": [f"i{k}" for k in range(n)], "image_path": [f"{k}.jpg" for k in range(n)]})
    for attribute in ("gender", "season", "usage"):
        table[attribute] = "x"
        table[f"{attribute}_confidence"] = rng.random(n)
    table.loc[::7, "usage_confidence"] = np.nan  # no tag there: nothing to accept or review
    thresholds = {"gender": 0.3, "season": None, "usage": 0.6}  # season: no threshold met its target
    marked = outputs.with_accepted(table, thresholds)
    queue = outputs.review_queue(marked, thresholds)
    assert not marked["season_accepted"].any()  # None accepts nothing: every season tag is reviewed
    assert (marked["gender_accepted"] == (table["gender_confidence"] >= 0.3)).all()
    has_usage = table["usage_confidence"].notna()
    assert (marked.loc[has_usage, "usage_accepted"] == (table.loc[has_usage, "usage_confidence"] >= 0.6)).all()
    # Exactly the rows with a tag not accepted are in the queue, each with the attributes not accepted.
    not_accepted = {row.id: sorted(a for a in thresholds if getattr(row, f"{a}_confidence") == getattr(
        row, f"{a}_confidence") and not getattr(row, f"{a}_accepted")) for row in marked.itertuples()}
    expected = {i for i, low in not_accepted.items() if low}
    assert set(queue["id"]) == expected
    for row in queue.itertuples():
        assert sorted(row.low_attributes.split(",")) == not_accepted[row.id]
    assert list(marked.columns[2:5]) == ["gender", "gender_confidence", "gender_accepted"]


def test_review_thresholds_come_from_the_model_unless_set_by_hand():
    from types import SimpleNamespace

    from fashion_tagger.tagging.tagger import review_thresholds

    calibrated = SimpleNamespace(attributes=["gender", "season", "usage"], calibration={"thresholds": {
        "gender": {"threshold": 0.71, "target": 0.95, "precision": 0.956},
        "season": {"threshold": None, "target": 0.95, "precision": None}}})
    chosen = review_thresholds(calibrated, load_config(overrides=["tagging.thresholds={usage: 0.2}"]).tagging)
    assert chosen["gender"] == {"threshold": 0.71, "source": "model", "target_precision": 0.95,
                                "validation_precision": 0.956}
    assert chosen["season"]["threshold"] is None and chosen["season"]["source"] == "model"
    assert chosen["usage"] == {"threshold": 0.2, "source": "tagging.thresholds"}
    uncalibrated = SimpleNamespace(attributes=["gender", "usage"], calibration={})
    chosen = review_thresholds(uncalibrated, load_config().tagging)
    assert chosen["gender"]["threshold"] == DEFAULT_REVIEW_THRESHOLDS["gender"]
    assert chosen["gender"]["source"].startswith("default")


def test_a_calibrated_models_thresholds_decide_what_is_accepted_and_reviewed(tmp_path):
    """A model carrying its own thresholds (train/calibration.json beside its checkpoint): `tag` accepts the tags
    at or above them, reviews exactly the rest, says where each threshold came from, and a hand-set one wins."""
    from fashion_tagger.core.io import read_json, write_json

    split = make_split(tmp_path / "split", rows=16)
    run_dir = make_run(tmp_path / "run", split, "probe:noisy")
    write_json(run_dir / "calibration.json", {"temperatures": {"masterCategory": 1.0, "baseColour": 1.0},
                                              "thresholds": {
                                                  "masterCategory": {"threshold": 0.9, "target": 0.95,
                                                                     "precision": 0.97},
                                                  "baseColour": {"threshold": None, "target": 0.95,
                                                                 "precision": None}}})
    catalog = split / "images"
    out = tmp_path / "tags"
    result = jobs.tag_catalog(catalog, str(run_dir), out, config=tiny_config())
    table = pd.read_parquet(TagsDir(out).tags)
    summary = read_json(TagsDir(out).summary)
    assert summary["threshold_details"]["masterCategory"] == {"threshold": 0.9, "source": "model",
                                                             "target_precision": 0.95, "validation_precision": 0.97}
    assert summary["thresholds"]["baseColour"] is None
    assert (table["masterCategory_accepted"] == (table["masterCategory_confidence"] >= 0.9)).all()
    assert not table["baseColour_accepted"].any()  # no threshold reached the target: every tag is reviewed
    review = pd.read_parquet(TagsDir(out).review_parquet)
    assert set(review["id"]) == set(table["id"])  # every item has a baseColour tag to review
    assert result.accepted["masterCategory"] == int(table["masterCategory_accepted"].sum())
    assert result.coverage["baseColour"] == 0.0

    base = tiny_config()
    hand_set = base.model_copy(update={"tagging": base.tagging.model_copy(update={"thresholds": {"baseColour": 0.0}})})
    by_hand = jobs.tag_catalog(catalog, str(run_dir), tmp_path / "tags-by-hand",
                               config=hand_set)
    table = pd.read_parquet(TagsDir(tmp_path / "tags-by-hand").tags)
    assert table["baseColour_accepted"].all() and by_hand.coverage["baseColour"] == 1.0
    details = read_json(TagsDir(tmp_path / "tags-by-hand").summary)["threshold_details"]
    assert details["baseColour"]["source"] == "tagging.thresholds"
    review = pd.read_parquet(TagsDir(tmp_path / "tags-by-hand").review_parquet)
    assert set(review["id"]) == set(table.loc[~table["masterCategory_accepted"], "id"])
