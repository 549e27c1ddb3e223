"""The registry and its promotion gate against a real MLflow (SQLite in tmp): first model becomes champion,
better challengers are promoted, worse ones are not, the champion is re-scored on the challenger's split,
and registering the same run twice changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from tagger_fixtures import make_run, make_split, tiny_config, true_labels

from fashion_tagger.core import tracking
from fashion_tagger.core.io import read_json, sha256_file
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation import gate
from fashion_tagger.evaluation.bootstrap import paired_bootstrap
from fashion_tagger.evaluation.metrics import compute_metrics
from fashion_tagger.registry import register as registry
from fashion_tagger.registry import versions


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating MLflow's tables takes seconds, so tests share the database
    and keep apart by model and experiment name."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def config_for(store, request):
    def build(**registry_fields):
        name = request.node.name.removeprefix("test_")[:40]
        return tiny_config(tracking_uri=store, model_name=name, experiment=name, **registry_fields)

    return build


def _aliases(config) -> dict[str, str]:
    with tracking.tracking_session(config) as client:
        return {alias: str(v) for alias, v in client.get_registered_model(config.registry.model_name).aliases.items()}


def _version_tags(config, version: str) -> dict[str, str]:
    with tracking.tracking_session(config) as client:
        return client.get_model_version(config.registry.model_name, version).tags


# ----------------------------------------------------------------------------------------- pure gate logic


def _scores(headline: float, **attributes: float) -> dict:
    return {"headline_macro_f1": headline, "attributes": {a: {"macro_f1": v} for a, v in attributes.items()}}


def _comparison(low: float, high: float, **drops: tuple[float, float]) -> dict:
    return {"headline_gain": {"low": low, "high": high, "mean": (low + high) / 2},
            "attribute_drops": {a: {"low": lo, "high": hi, "mean": (lo + hi) / 2} for a, (lo, hi) in drops.items()}}


def test_decide_needs_the_gain_interval_above_min_delta_and_no_credible_attribute_drop():
    champion, challenger = _scores(0.70, a=0.8, b=0.6), _scores(0.72, a=0.83, b=0.61)
    decision, reason = gate.decide(challenger, None, None, min_delta=0.0, max_attribute_drop=0.02)
    assert decision == registry.PROMOTED and "no champion" in reason
    # The interval must lie above min_delta: touching 0 is not enough, a better point estimate is not enough.
    assert gate.decide(challenger, champion, _comparison(0.0, 0.0, a=(0, 0), b=(0, 0)), min_delta=0.0,
                       max_attribute_drop=0.02)[0] == registry.REJECTED
    decision, reason = gate.decide(challenger, champion, _comparison(-0.01, 0.05, a=(-0.05, 0.01), b=(-0.03, 0.02)),
                                   min_delta=0.0, max_attribute_drop=0.02)
    assert decision == registry.REJECTED and "[-0.0100, +0.0500]" in reason and "min_delta 0.0" in reason
    ok = _comparison(0.004, 0.036, a=(-0.06, 0.0), b=(-0.02, 0.015))
    assert gate.decide(challenger, champion, ok, min_delta=0.0, max_attribute_drop=0.02)[0] == registry.PROMOTED
    assert gate.decide(challenger, champion, ok, min_delta=0.01, max_attribute_drop=0.02)[0] == registry.REJECTED
    # Better on average, but attribute b credibly drops more than the tolerance (its whole interval is above it).
    collapse = _comparison(0.01, 0.05, a=(-0.2, -0.1), b=(0.03, 0.07))
    decision, reason = gate.decide(challenger, champion, collapse, min_delta=0.0, max_attribute_drop=0.02)
    assert decision == registry.REJECTED and reason.startswith("b macro-F1 drops") and "credibly" in reason
    # A drop that may exceed the tolerance but is not shown to (interval straddles it) does not block.
    maybe = _comparison(0.01, 0.05, a=(-0.2, -0.1), b=(0.0, 0.05))
    assert gate.decide(challenger, champion, maybe, min_delta=0.0, max_attribute_drop=0.02)[0] == registry.PROMOTED


def _noisy_predictions(truth: np.ndarray, accuracy: float, k: int, rng) -> np.ndarray:
    wrong = rng.random(len(truth)) > accuracy
    return np.where(wrong, (truth + rng.integers(1, k, len(truth))) % k, truth)


def test_bootstrap_intervals_separate_real_gains_from_noise():
    labels = LabelSpace(classes={"a": ("x", "y", "z"), "b": ("p", "q")}, min_class_count=1)
    rng = np.random.default_rng(0)
    n = 3000
    truth = {"a": rng.integers(0, 3, n), "b": rng.integers(0, 2, n)}
    truth["a"][:50] = -1  # 'None' labels are left out, as in compute_metrics
    champion = {"a": _noisy_predictions(truth["a"], 0.7, 3, rng), "b": _noisy_predictions(truth["b"], 0.7, 2, rng)}

    # The point estimate at equal weights is exactly compute_metrics' headline.
    from fashion_tagger.evaluation.bootstrap import macro_f1_per_resample

    for attribute, k in (("a", 3), ("b", 2)):
        ones = np.ones((1, n), dtype=np.float32)
        assert macro_f1_per_resample(ones, truth[attribute], champion[attribute], k)[0] == pytest.approx(
            compute_metrics(truth, champion, labels)["attributes"][attribute]["macro_f1"], abs=1e-6)

    def compare(challenger):
        import time

        started = time.perf_counter()
        result = paired_bootstrap(truth, challenger, champion, labels, resamples=1000, seed=0)
        assert time.perf_counter() - started < 10
        return result

    identical = compare({a: p.copy() for a, p in champion.items()})
    assert identical["headline_gain"] == {"low": 0.0, "high": 0.0, "mean": 0.0}
    # Better only by noise: 60 answers fixed and 54 others broken, 6 more right answers out of 3,000.
    noise = {a: p.copy() for a, p in champion.items()}
    fixed = np.flatnonzero(noise["b"] != truth["b"])[:60]
    broken = np.flatnonzero(noise["b"] == truth["b"])[:54]
    noise["b"][fixed], noise["b"][broken] = truth["b"][fixed], 1 - truth["b"][broken]
    noisy = compare(noise)
    assert noisy["headline_gain"]["mean"] > 0 and noisy["headline_gain"]["low"] < 0 < noisy["headline_gain"]["high"]
    assert gate.decide(_scores(0.71), _scores(0.7), noisy, min_delta=0.0, max_attribute_drop=0.02)[0] == (
        registry.REJECTED)
    # Clearly better: 80 % right instead of 70 % on both attributes.
    better = compare({"a": _noisy_predictions(truth["a"], 0.8, 3, rng), "b": _noisy_predictions(truth["b"], 0.8, 2,
                                                                                              rng)})
    assert better["headline_gain"]["low"] > 0.05
    assert gate.decide(_scores(0.8), _scores(0.7), better, min_delta=0.0, max_attribute_drop=0.02)[0] == (
        registry.PROMOTED)
    # Seeded: the same intervals again.
    assert compare(noise) == noisy


def test_predictions_are_mapped_onto_the_challengers_classes_by_name():
    labels = LabelSpace(classes={"baseColour": ("Blue", "Green", "Red"), "season": ("Summer", "Winter")},
                        min_class_count=1)
    # A champion trained on another label space: same names at other indices, a class the split lacks,
    # and no season head at all.
    predictions = pd.DataFrame({"baseColour": ["Red", "Blue", "Purple", "Green"]})
    encoded = gate.encode_predictions(predictions, labels)
    assert encoded["baseColour"].tolist() == [2, 0, -1, 1]
    assert encoded["season"].tolist() == [-1, -1, -1, -1]


# --------------------------------------------------------------------------------- against a real MLflow


def test_first_model_becomes_champion_and_registering_again_is_a_no_op(tmp_path, config_for, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2024-01-01T00:00:00")
    config = config_for()
    split = make_split(tmp_path / "split")
    run_dir = make_run(tmp_path / "run", split, "probe")
    # A training run already recorded in the run folder (a retried register): register continues it.
    with tracking.tracking_session(config) as client:
        run_id = tracking.start_or_resume_run(client, config, run_dir, dataset_hash=tracking.dataset_hash_of(split))
        for epoch, score in enumerate([0.4, 0.6]):
            client.log_metric(run_id, "val_macro_f1", score, step=epoch)
    assert read_json(run_dir / "mlflow_run.json")["run_id"] == run_id

    first = registry.register_run(run_dir, config)
    assert first.run_id == run_id
    assert (first.version, first.decision, first.aliases) == ("1", registry.PROMOTED, ["champion"])
    assert first.headline_macro_f1 > 0.9 and first.gate_rows == 24 and not first.already_registered
    assert first.champion_version is None and first.champion_headline is None

    saved = read_json(run_dir / "registration.json")
    assert saved["version"] == "1" and saved["gate"]["decision"] == registry.PROMOTED
    tags = _version_tags(config, "1")
    assert tags[registry.TAG_DECISION] == registry.PROMOTED
    assert float(tags[registry.TAG_HEADLINE]) == pytest.approx(first.headline_macro_f1)
    assert tags[registry.TAG_GATE_SPLIT] == sha256_file(split / "test.parquet")
    assert tags[registry.TAG_GATE_PART] == "test"

    # The training run: whole config as params, per-epoch history, tags and artifacts.
    client = mlflow.MlflowClient(config.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.data.params["train.epochs"] == str(config.train.epochs)
    assert run.data.params["model.backbone"] == "test_efficientnet"
    assert run.data.tags[tracking.TAG_DATASET_HASH] == "tiny-0"
    assert run.data.tags[tracking.TAG_AIRFLOW_RUN_ID] == "manual__2024-01-01T00:00:00"
    assert run.data.tags[tracking.TAG_CODE_VERSION].startswith("0.1.0")
    # The split's three parts are the run's dataset inputs, each digest the split's fingerprint (or part hash).
    inputs = {tag.value: entry.dataset for entry in run.inputs.dataset_inputs for tag in entry.tags
              if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "validation", "test"}
    assert inputs["test"].digest == sha256_file(split / "test.parquet")[:32]
    assert inputs["training"].name.endswith("-train") and '"num_rows": 24' in inputs["test"].profile
    # Named so a person browsing the experiment tells runs apart: backbone, dataset, the run folder's id tail.
    assert run.info.run_name == tracking.run_name(config, run_dir)
    assert run.info.run_name.startswith("test_efficientnet-") and run.info.run_name.endswith(f"-{run_dir.name}")
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "val_macro_f1")] == [(0, 0.4), (1, 0.6)]
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"model_card.md", "gate.json", "data", "samples", "config.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(first.run_id, "data")} >= {"data/labels.json"}
    card = client.download_artifacts(first.run_id, "model_card.md", str(tmp_path))
    text = Path(card).read_text()
    assert "tiny-0" in text and "| masterCategory |" in text and "Known limits" in text

    again = registry.register_run(run_dir, config)
    assert again.already_registered and again.version == "1" and again.decision == registry.PROMOTED
    assert len(client.get_run(first.run_id).inputs.dataset_inputs) == 3  # not logged twice
    with tracking.tracking_session(config) as client:
        assert len(client.search_model_versions(f"name='{config.registry.model_name}'")) == 1


def test_better_challenger_is_promoted_and_worse_one_stays_challenger(tmp_path, config_for):
    config = config_for()
    split = make_split(tmp_path / "split")
    weak = make_run(tmp_path / "weak", split, "constant:Apparel,Blue")
    strong = make_run(tmp_path / "strong", split, "probe")
    worse = make_run(tmp_path / "worse", split, "constant:Footwear,Red")

    assert registry.register_run(weak, config).decision == registry.PROMOTED
    promoted = registry.register_run(strong, config)
    assert (promoted.version, promoted.decision, promoted.champion_version) == ("2", registry.PROMOTED, "1")
    assert promoted.headline_macro_f1 > promoted.champion_headline + 0.5
    assert _aliases(config) == {"champion": "2"}
    # The champion came from a split without a test membership record: scored, with a warning that says so.
    gate_record = read_json(strong / "registration.json")["gate"]
    assert gate_record["headline_gain_interval"][0] > 0.3
    assert "before test membership was recorded" in gate_record["warnings"][0]
    assert "before test membership was recorded" in _version_tags(config, "2")[registry.TAG_WARNING]
    assert "**warning**: champion version 1" in (strong / "model_card.md").read_text()

    rejected = registry.register_run(worse, config)
    assert (rejected.version, rejected.decision, rejected.champion_version) == ("3", registry.REJECTED, "2")
    assert rejected.champion_headline == pytest.approx(promoted.headline_macro_f1)
    assert rejected.aliases == ["challenger"]
    assert _aliases(config) == {"champion": "2", "challenger": "3"}

    # With promotion off the gate still scores, but no alias moves.
    held = registry.register_run(make_run(tmp_path / "held", split, "constant:Apparel,Blue", strength=3.0),
                                 config_for(promote=False))
    assert held.decision == registry.HELD and held.aliases == [] and "promote is false" in held.reason
    assert _aliases(config) == {"champion": "2", "challenger": "3"}

    rows = versions.list_versions(config)
    assert [(r["version"], r["aliases"], r["decision"]) for r in rows] == [
        ("4", [], registry.HELD), ("3", ["challenger"], registry.REJECTED), ("2", ["champion"], registry.PROMOTED),
        ("1", [], registry.PROMOTED),
    ]
    table = versions.format_versions(rows)
    assert "champion" in table and "rejected" in table and table.count("\n") == 6
    text = versions.describe_registration(promoted)
    assert "version 2" in text and "models:/" in text and "mlflow ui --backend-store-uri sqlite:///" in text


def test_a_model_identical_in_its_answers_is_rejected_with_an_interval_spanning_zero(tmp_path, config_for):
    config = config_for()
    split = make_split(tmp_path / "split", rows=40, membership="home/test_membership/test-0.1-seed42.parquet")
    first = registry.register_run(make_run(tmp_path / "a", split, "constant:Apparel,Blue"), config)
    # Other weights (another version), the same answer on every image.
    same = registry.register_run(make_run(tmp_path / "b", split, "constant:Apparel,Blue", strength=3.0), config)
    assert (first.version, same.version, same.decision) == ("1", "2", registry.REJECTED)
    gate_record = read_json(tmp_path / "b" / "registration.json")["gate"]
    low, high = gate_record["headline_gain_interval"]
    assert low <= 0 <= high and (low, high) == (0.0, 0.0)
    assert "does not lie above min_delta" in same.reason and gate_record["warnings"] == []
    assert gate_record["bootstrap"]["resamples"] == 1000 and gate_record["bootstrap"]["images"] == 40
    tags = _version_tags(config, "2")
    assert (float(tags[registry.TAG_GAIN_LOW]), float(tags[registry.TAG_GAIN_HIGH])) == (0.0, 0.0)
    assert tags[registry.TAG_TEST_MEMBERSHIP] == "home/test_membership/test-0.1-seed42.parquet"
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "95% interval of the headline gain" in card and "[+0.0000, +0.0000]" in card
    assert _aliases(config) == {"champion": "1", "challenger": "2"}


def test_evaluate_and_the_gate_give_one_model_one_score(tmp_path, config_for):
    """One scoring path: evaluate (a checkpoint) and the gate (the registered pyfunc) score the same images the same
    way, originals first and the prepared copy where an original is gone."""
    from fashion_tagger.core.layout import SplitDir, cached_image_path
    from fashion_tagger.evaluation.evaluate import evaluate_run

    config = config_for()
    split = make_split(tmp_path / "split", rows=40)
    cache = tmp_path / "cache"
    test = pd.read_parquet(split / "test.parquet")
    for original, sha in zip(test["image_path"][:5], test["image_sha256"][:5], strict=True):
        cached = cached_image_path(cache, sha, 32, 40)
        cached.parent.mkdir(parents=True, exist_ok=True)
        Path(original).rename(cached)  # the original is gone; its prepared copy remains
    (SplitDir(split).prepared).write_text(json.dumps({"cache_root": str(cache), "width": 32, "height": 40}))
    run_dir = make_run(tmp_path / "run", split, "probe:noisy")

    evaluated = evaluate_run(run_dir, config)
    registered = registry.register_run(run_dir, config)
    # Neither trivially right nor constant: its answers hang on the pixels of each image.
    assert 0.4 < evaluated.attributes["masterCategory"]["macro_f1"] < 0.95
    assert registered.headline_macro_f1 == pytest.approx(evaluated.headline_macro_f1, abs=1e-6)
    gate_record = read_json(run_dir / "registration.json")["gate"]
    for attribute, row in gate_record["attributes"].items():
        assert row["challenger_macro_f1"] == pytest.approx(evaluated.attributes[attribute]["macro_f1"], abs=1e-6)
    metrics = read_json(run_dir / "eval" / "metrics.json")
    assert metrics["split"] == "test" and metrics["val"]["split"] == "val"
    client = mlflow.MlflowClient(config.tracking_uri)
    logged = client.get_run(registered.run_id).data.metrics
    assert logged["eval.test.headline_macro_f1"] == pytest.approx(evaluated.headline_macro_f1)
    assert "eval.val.headline_macro_f1" in logged
    card = (run_dir / "model_card.md").read_text()
    assert "## Test metrics (the headline)" in card and "## Validation metrics" in card


def test_champion_is_rescored_on_the_challengers_split(tmp_path, config_for):
    config = config_for()
    split_a = make_split(tmp_path / "split_a", seed=0)
    # Another split: other class balance, a colour class the champion never saw, so 'Red' has another index.
    split_b = make_split(tmp_path / "split_b", rows=24, footwear_share=0.75, colours=("Blue", "Green", "Red"), seed=1)
    assert LabelSpace.load(split_b).classes["baseColour"] == ("Blue", "Green", "Red")

    champion = registry.register_run(make_run(tmp_path / "champion", split_a, "constant:Footwear,Red"), config)
    challenger = registry.register_run(make_run(tmp_path / "challenger", split_b, "probe"), config)

    # What the champion scores on split B, computed here independently: 'Footwear' and 'Red' everywhere.
    labels_b = LabelSpace.load(split_b)
    y_true = true_labels(split_b)
    y_pred = {"masterCategory": np.full(24, labels_b.classes["masterCategory"].index("Footwear")),
              "baseColour": np.full(24, labels_b.classes["baseColour"].index("Red"))}
    expected = compute_metrics(y_true, y_pred, labels_b)["headline_macro_f1"]

    assert challenger.champion_version == champion.version == "1"
    assert challenger.champion_headline == pytest.approx(expected)
    assert challenger.champion_headline != pytest.approx(champion.headline_macro_f1)  # its stored score (split A)
    assert challenger.decision == registry.PROMOTED and _aliases(config) == {"champion": "2"}

    gate = read_json(tmp_path / "challenger" / "registration.json")["gate"]
    assert gate["split_hash"] == sha256_file(split_b / "test.parquet") != sha256_file(split_a / "test.parquet")
    assert gate["champion_stored_headline"] == pytest.approx(champion.headline_macro_f1)
    assert gate["champion"]["attributes"]["baseColour"]["macro_f1"] == pytest.approx(
        compute_metrics(y_true, y_pred, labels_b)["attributes"]["baseColour"]["macro_f1"])
    tags = _version_tags(config, "2")
    assert float(tags[registry.TAG_CHAMPION_SCORE]) == pytest.approx(expected)
    client = mlflow.MlflowClient(config.tracking_uri)
    # Trained without the MLflow logger: register logs the epoch history from metrics.json instead.
    assert [m.step for m in client.get_metric_history(challenger.run_id, "val_macro_f1")] == [0]
    logged = json.loads(Path(client.download_artifacts(challenger.run_id, "gate.json", str(tmp_path))).read_text())
    assert logged["champion_headline"] == pytest.approx(expected) and logged["rows"] == 24


def test_the_tag_keys_of_runs_and_versions_are_a_published_interface():
    """Homes and registries written by earlier versions are read by these keys (the champion's fingerprint, the
    gate's record): moving a module must never rename one."""
    keys = {name: value for module in (registry, tracking) for name, value in vars(module).items()
            if name.startswith("TAG_")}
    assert keys == {
        "TAG_CONTENT_ID": "fashion_tagger.content_id", "TAG_HEADLINE": "headline_macro_f1",
        "TAG_DECISION": "gate.decision", "TAG_REASON": "gate.reason",
        "TAG_CHALLENGER_SCORE": "gate.challenger_headline", "TAG_CHAMPION_SCORE": "gate.champion_headline",
        "TAG_CHAMPION_VERSION": "gate.champion_version", "TAG_GATE_SPLIT": "gate.split_hash",
        "TAG_GATE_ROWS": "gate.rows", "TAG_GATE_PART": "gate.split", "TAG_GAIN_LOW": "gate.headline_gain_low",
        "TAG_GAIN_HIGH": "gate.headline_gain_high", "TAG_WARNING": "gate.warning",
        "TAG_TEST_MEMBERSHIP": "fashion_tagger.test_membership", "TAG_FINGERPRINT": "fashion_tagger.fingerprint",
        "TAG_DATASET_HASH": "fashion_tagger.dataset_hash", "TAG_DATASET_SOURCE": "fashion_tagger.dataset_source",
        "TAG_CODE_VERSION": "fashion_tagger.code_version", "TAG_GIT_COMMIT": "fashion_tagger.git_commit",
        "TAG_AIRFLOW_RUN_ID": "airflow.dag_run_id", "TAG_RUN_DIR": "fashion_tagger.run_dir",
    }


def test_a_tracking_server_that_does_not_answer_is_transient_and_a_refusal_is_not(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from native_stack import free_port

    from fashion_tagger.core.errors import ModelUnavailableError
    from fashion_tagger.core.tracking import unanswered_is_transient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ModelUnavailableError, match=rf"the MLflow tracking server {uri} did not answer \(.*\); "
                                                    "retry once it is up") as caught, unanswered_is_transient(uri):
        MlflowClient(uri).search_experiments()
    assert caught.value.exit_code == 75 and "\n" not in str(caught.value)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(MlflowException, match="No Experiment with id=424242"), unanswered_is_transient(store):
        MlflowClient(store).get_experiment("424242")
