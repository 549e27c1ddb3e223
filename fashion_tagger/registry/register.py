"""Register a trained run in the MLflow model registry, apply the promotion gate, and list the versions.

A new version gets the alias `challenger`; `gate.run_gate` scores it and the current champion on the same
test images, and `champion` moves only when the challenger is credibly better (a paired bootstrap). A version's
identity is what the model computes (`Predictor.identity`), so registering the same model again, from any run,
changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fashion_tagger.core import tracking
from fashion_tagger.core.config import Config
from fashion_tagger.core.errors import RunError
from fashion_tagger.core.io import StageResult, read_json, write_json, write_text
from fashion_tagger.core.layout import TrainDir
from fashion_tagger.core.tracking import (
    TAG_CHALLENGER_SCORE,
    TAG_CHAMPION_SCORE,
    TAG_CHAMPION_VERSION,
    TAG_CONTENT_ID,
    TAG_DECISION,
    TAG_FINGERPRINT,
    TAG_GAIN_HIGH,
    TAG_GAIN_LOW,
    TAG_GATE_PART,
    TAG_GATE_ROWS,
    TAG_GATE_SPLIT,
    TAG_HEADLINE,
    TAG_REASON,
    TAG_TEST_MEMBERSHIP,
    TAG_WARNING,
)
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation import gate as gate_module
from fashion_tagger.registry import model_card as reports
from fashion_tagger.training.module import MONITOR

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from fashion_tagger.serving.predictor import Predictor

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME_IN_RUN = "model"
GATE_ARTIFACT = "gate.json"

PROMOTED, REJECTED, HELD = gate_module.PROMOTED, gate_module.REJECTED, gate_module.HELD



class RegistryError(RunError):
    """A run that cannot be registered (missing outputs) or a registry in an unexpected state."""


@dataclass
class RegistrationResult(StageResult):
    run_dir: Path
    model_name: str
    version: str
    model_uri: str
    run_id: str
    aliases: list[str]
    decision: str
    reason: str
    headline_macro_f1: float | None
    champion_version: str | None = None
    champion_headline: float | None = None
    gate_rows: int = 0
    already_registered: bool = False
    tracking_uri: str = ""
    attributes: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class TrainingOutputs:
    """What `register` needs from a training run folder; the config is the run's own, read once by the caller."""

    train_dir: TrainDir
    config: Config
    checkpoint: Path
    split_dir: Path
    labels: LabelSpace
    eval_metrics: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.train_dir.dir


def training_outputs(run_dir: str | Path, config: Config) -> TrainingOutputs:
    train_dir = TrainDir(Path(run_dir).expanduser().resolve())
    if not train_dir.dir.is_dir():
        raise RegistryError(f"run folder {train_dir.dir} does not exist: train first")
    split_dir = train_dir.recorded_split()
    eval_path = train_dir.eval.metrics
    return TrainingOutputs(
        train_dir=train_dir,
        config=config,
        checkpoint=train_dir.checkpoint(),
        split_dir=split_dir,
        labels=LabelSpace.load(split_dir),
        eval_metrics=read_json(eval_path) if eval_path.is_file() else {},
    )


def _find_version(client: MlflowClient, name: str, cid: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        candidates = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in candidates:
        if version.tags.get(TAG_CONTENT_ID) == cid:
            return client.get_model_version(name, version.version)
    return None


def _aliases(client: MlflowClient, name: str, version: str) -> list[str]:
    return sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version))


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def float_tag(tags: Mapping[str, str], key: str) -> float | None:
    value = tags.get(key)
    return float(value) if value not in (None, "", "None") else None


def _result_from_version(client: MlflowClient, version: ModelVersion, run_dir: Path, uri: str,
                         already: bool) -> RegistrationResult:
    tags = version.tags
    registration = TrainDir(run_dir).registration
    saved = read_json(registration) if registration.is_file() else {}
    return RegistrationResult(
        run_dir=run_dir,
        model_name=version.name,
        version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        run_id=version.run_id or "",
        aliases=_aliases(client, version.name, version.version),
        decision=tags.get(TAG_DECISION, ""),
        reason=tags.get(TAG_REASON, ""),
        headline_macro_f1=float_tag(tags, TAG_HEADLINE),
        champion_version=tags.get(TAG_CHAMPION_VERSION) or None,
        champion_headline=float_tag(tags, TAG_CHAMPION_SCORE),
        gate_rows=int(tags.get(TAG_GATE_ROWS, 0) or 0),
        already_registered=already,
        tracking_uri=uri,
        attributes=saved.get("attributes", {}) if str(saved.get("version")) == str(version.version) else {},
    )


def _log_run_artifacts(client: MlflowClient, run_id: str, outputs: TrainingOutputs) -> None:
    """labels.json, the data reports, evaluation outputs, the config and training metrics into the MLflow run."""
    from fashion_tagger.core.layout import SplitDir, ValidateDir

    split = SplitDir(outputs.split_dir)
    client.log_artifact(run_id, str(split.labels), "data")
    if split.report.is_file():
        client.log_artifact(run_id, str(split.report), "data")
        clean_dir = read_json(split.report).get("clean_dir")
        if clean_dir and ValidateDir(Path(clean_dir)).report.is_file():
            client.log_artifact(run_id, str(ValidateDir(Path(clean_dir)).report), "data/validation")
    train = outputs.train_dir
    if train.eval.dir.is_dir():
        client.log_artifacts(run_id, str(train.eval.dir), train.eval.dir.name)  # the MLflow run mirrors the folder
    if train.config.is_file():
        client.log_artifact(run_id, str(train.config))
    if train.metrics.is_file():
        client.log_artifact(run_id, str(train.metrics), "train")


def _eval_metrics_to_log(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """`eval.test.headline_macro_f1`, `eval.val.<attribute>.macro_f1`...: the part is in every name."""
    flat = {}
    for part, scores in ((metrics.get("split", "test"), metrics), ("val", metrics.get("val") or {})):
        for key in ("headline_macro_f1", "exact_match"):
            if (value := gate_module.maybe_float(scores.get(key))) is not None:
                flat[f"{prefix}{part}.{key}"] = value
        for attribute, row in (scores.get("attributes") or {}).items():
            for key in ("accuracy", "macro_f1", "weighted_f1"):
                if (value := gate_module.maybe_float(row.get(key))) is not None:
                    flat[f"{prefix}{part}.{attribute}.{key}"] = value
    return flat


# The split's parts as MLflow dataset inputs of the training run, with MLflow's contexts.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def log_split_inputs(client: MlflowClient, run_id: str, split_dir: Path, labels: LabelSpace) -> int:
    """Log SPLIT_DIR's train, validation and test parts as the run's dataset inputs (`mlflow.log_input`): named
    `<split fingerprint[:12]>-<part>`, digest = the split's fingerprint (the part file's hash for a split written
    before fingerprints), the part's ids and labels as the schema and profile. A part already logged (a retried
    register) is not logged again. The parts logged now, returned."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    from fashion_tagger.core.io import sha256_file
    from fashion_tagger.core.layout import SplitDir
    from fashion_tagger.data.fingerprint import read_fingerprint

    run = client.get_run(run_id)
    logged = {(entry.dataset.name, tag.value) for entry in (run.inputs.dataset_inputs if run.inputs else [])
              for tag in entry.tags if tag.key == "mlflow.data.context"}
    fingerprint = read_fingerprint(split_dir)
    count = 0
    with mlflow.start_run(run_id=run_id):
        for part, context in DATASET_CONTEXTS.items():
            path = SplitDir(split_dir).part(part)
            if not path.is_file():
                continue
            digest = (fingerprint or sha256_file(path))[:32]
            name = f"{digest[:12]}-{part}"
            if (name, context) in logged:
                continue
            frame = pd.read_parquet(path, columns=["id", *labels.attributes]).astype(str)
            with warnings.catch_warnings():
                # MLflow registers its local-file source class twice and warns that a path matches both.
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                dataset = from_pandas(frame, source=str(path), name=name, digest=digest)
            mlflow.log_input(dataset, context=context)
            count += 1
    return count


def membership_of_split(split_dir: Path) -> str:
    """The test membership record a split's test part came from ("" for a split without one)."""
    return str((reports.split_report(split_dir).get("test_membership") or {}).get("membership") or "")


def champion_fingerprint(config: Config) -> tuple[str | None, str]:
    """(the champion's version, its fingerprint tag); (None, "") without a champion, "" for one registered
    before fingerprints existed."""
    name = config.registry.model_name
    uri = tracking.tracking_uri(config)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None, ""  # no store yet, so no champion: not worth creating the store to find out
    with tracking.tracking_session(config) as client:
        champion = _champion(client, name)
        if champion is None:
            return None, ""
        return str(champion.version), champion.tags.get(TAG_FINGERPRINT, "")


def register_run(run_dir: str | Path, config: Config) -> RegistrationResult:
    """Log the training run folder RUN_DIR to MLflow, register it as `challenger`, score it and the champion on
    the same test images and move `champion` when the gate says so. CONFIG is the run's own configuration.
    Registering a model that is already a version (the same weights, labels and preprocessing) changes nothing.
    """
    from fashion_tagger.serving.predictor import Predictor

    outputs = training_outputs(run_dir, config)
    run_dir = outputs.run_dir
    name = config.registry.model_name
    predictor = Predictor.from_checkpoint(outputs.checkpoint)
    cid = predictor.identity()

    from fashion_tagger.workspace.workspace import open_workspace

    # A lease in the coordination database orders registrations of NAME across processes and machines.
    with tracking.tracking_session(config) as client, open_workspace(config.layout).lease(
        f"register:{name}", f"registering into {name}"
    ):
        uri = tracking.tracking_uri(config)
        version = _find_version(client, name, cid)
        if version is not None and version.tags.get(TAG_DECISION):
            log.info("%s is already %s version %s (same weights, labels and preprocessing): nothing to do",
                     run_dir, name, version.version)
            return _result_from_version(client, version, run_dir, uri, already=True)

        dataset_hash = outputs.labels.source_hash or None
        run_id = tracking.start_or_resume_run(client, config, run_dir, dataset_hash=dataset_hash)
        # Training may have made the run already (its system metrics); the epochs are logged here, once.
        if not client.get_metric_history(run_id, MONITOR) and outputs.train_dir.metrics.is_file():
            tracking.log_epoch_history(client, run_id, read_json(outputs.train_dir.metrics).get("history") or [])
        for key, value in tracking.run_tags(config, run_dir=run_dir, dataset_hash=dataset_hash).items():
            client.set_tag(run_id, key, value)
        tracking.log_params_once(client, run_id, tracking.flat_params(config))
        log_split_inputs(client, run_id, outputs.split_dir, outputs.labels)
        if version is None:
            version = _log_and_register(client, outputs, predictor, run_id, cid, name,
                                        set_challenger=config.registry.promote)
        else:
            log.info("resuming the gate of %s version %s (an earlier attempt stopped before it)", name,
                     version.version)

        champion = _champion(client, name)
        data = gate_module.gate_data(outputs.split_dir)
        gate, predictions = gate_module.run_gate(
            name, str(version.version), str(champion.version) if champion is not None else None, data,
            config.registry,
            champion_stored_headline=float_tag(champion.tags, TAG_HEADLINE) if champion is not None else None,
            champion_membership=champion.tags.get(TAG_TEST_MEMBERSHIP) if champion is not None else None,
            membership=membership_of_split(outputs.split_dir) or None,
        )
        gate["split_dir"] = str(outputs.split_dir)
        if data.paths:
            gate["sample_grid"] = str(reports.sample_grid(data.paths, predictions, data, outputs.train_dir.sample_grid))
        _record(client, outputs, run_id, version, gate)
        version = client.get_model_version(name, version.version)
        result = _result_from_version(client, version, run_dir, uri, already=False)
        result.attributes = gate["attributes"]
        write_json(outputs.train_dir.registration, {**result.to_dict(), "gate": gate})
        client.set_terminated(run_id)
        return result


def _log_and_register(client: MlflowClient, outputs: TrainingOutputs, predictor: Predictor, run_id: str, cid: str,
                      name: str, set_challenger: bool) -> ModelVersion:
    """Export the checkpoint, log it as the run's pyfunc model and register it as a new version of NAME."""
    import mlflow

    from fashion_tagger.serving.pyfunc_model import log_tagger_model

    export_dir = outputs.train_dir.export
    predictor.export(export_dir)
    _log_run_artifacts(client, run_id, outputs)
    cfg = outputs.config
    with mlflow.start_run(run_id=run_id):
        if eval_metrics := _eval_metrics_to_log(outputs.eval_metrics, "eval."):
            mlflow.log_metrics(eval_metrics)
        info = log_tagger_model(
            export_dir,
            name=MODEL_NAME_IN_RUN,
            params={"backbone": cfg.model.backbone, "image_size": f"{cfg.images.width}x{cfg.images.height}"},
            tags={TAG_CONTENT_ID: cid},
            metadata={"attributes": outputs.labels.attributes, "content_id": cid},
        )
    from fashion_tagger.data.fingerprint import read_fingerprint

    tags = {TAG_CONTENT_ID: cid, tracking.TAG_RUN_DIR: str(outputs.run_dir),
            tracking.TAG_DATASET_HASH: outputs.labels.source_hash or "unknown"}
    if membership := membership_of_split(outputs.split_dir):
        tags[TAG_TEST_MEMBERSHIP] = membership
    if fingerprint := read_fingerprint(outputs.split_dir):
        tags[TAG_FINGERPRINT] = fingerprint
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    if set_challenger:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    log.info("registered %s version %s from %s", name, version.version, outputs.run_dir)
    return version


def _record(client: MlflowClient, outputs: TrainingOutputs, run_id: str, version: ModelVersion,
            gate: Mapping[str, Any]) -> None:
    """Move aliases first, then write the decision tags: a version with a decision tag is finished, so a
    retry after a crash in between repeats the gate instead of skipping the alias move."""
    name, number = version.name, str(version.version)
    if gate["decision"] == PROMOTED:
        client.set_registered_model_alias(name, CHAMPION, number)
        aliases = client.get_registered_model(name).aliases
        if str(aliases.get(CHALLENGER)) == number:
            client.delete_registered_model_alias(name, CHALLENGER)
    client.log_dict(run_id, dict(gate), GATE_ARTIFACT)
    if gate.get("sample_grid"):
        client.log_artifact(run_id, gate["sample_grid"], "samples")
    metrics = {"gate.challenger_headline": gate["challenger_headline"]}
    if gate["champion_headline"] is not None:
        metrics["gate.champion_headline"] = gate["champion_headline"]
    if gate.get("headline_gain_interval"):
        metrics["gate.headline_gain_low"], metrics["gate.headline_gain_high"] = gate["headline_gain_interval"]
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
    card = reports.model_card(
        config=outputs.config,
        labels=outputs.labels,
        metrics=outputs.eval_metrics or gate["challenger"],
        validation_report=reports.validation_report(outputs.split_dir),
        split_report=reports.split_report(outputs.split_dir) or None,
        gate=gate,
        model_name=name,
        version=number,
    )
    write_text(outputs.train_dir.model_card, card)
    client.log_text(run_id, card, outputs.train_dir.model_card.name)
    client.update_model_version(name, number, description=card[:4900])
    tags = {
        TAG_HEADLINE: gate["challenger_headline"],
        TAG_CHALLENGER_SCORE: gate["challenger_headline"],
        TAG_CHAMPION_SCORE: gate["champion_headline"] if gate["champion_headline"] is not None else "",
        TAG_CHAMPION_VERSION: gate["champion_version"] or "",
        TAG_GATE_SPLIT: gate["split_hash"],
        TAG_GATE_ROWS: gate["rows"],
        TAG_GATE_PART: gate.get("split", "test"),
        TAG_GAIN_LOW: (gate.get("headline_gain_interval") or [""])[0],
        TAG_GAIN_HIGH: (gate.get("headline_gain_interval") or ["", ""])[1],
        TAG_WARNING: " ".join(gate.get("warnings") or [])[:4900],
        TAG_REASON: gate["reason"][:4900],
        TAG_DECISION: gate["decision"],  # last: marks the registration finished
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, number, key, str(value))
    log.info("gate: %s version %s %s (%s)", name, number, gate["decision"], gate["reason"])
