"""Register a trained run in the MLflow model registry and decide, on the same validation data, whether it
becomes `champion`.

A new version gets the alias `challenger`; the current champion is re-scored on the challenger's validation
split (its stored score came from other data) and `champion` moves only when the challenger is better.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fashion_tagger import tracking
from fashion_tagger.cache import PREPARED_FILENAME, cached_image_path, read_prepared
from fashion_tagger.config import CONFIG_FILENAME, Config, load_config
from fashion_tagger.errors import FashionTaggerError
from fashion_tagger.io import StageResult, read_json, sha256_file, write_json
from fashion_tagger.labels import LABELS_FILENAME, LabelSpace, label_column
from fashion_tagger.pyfunc_model import PATH_COLUMN
from fashion_tagger.schema import IGNORE_INDEX

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
REGISTRATION_FILENAME = "registration.json"
GATE_FILENAME = "gate.json"
EXPORT_DIRNAME = "export"
MODEL_NAME_IN_RUN = "model"

PROMOTED, REJECTED, HELD = "promoted", "rejected", "held"

# Model version tags.
TAG_CONTENT_ID = "fashion_tagger.content_id"
TAG_HEADLINE = "headline_macro_f1"
TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_CHALLENGER_SCORE = "gate.challenger_headline"
TAG_CHAMPION_SCORE = "gate.champion_headline"
TAG_CHAMPION_VERSION = "gate.champion_version"
TAG_GATE_SPLIT = "gate.split_hash"
TAG_GATE_ROWS = "gate.rows"


class RegistryError(FashionTaggerError):
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


# --------------------------------------------------------------------------------------------- run outputs


@dataclass
class TrainingOutputs:
    """What `register` needs from a training run directory."""

    run_dir: Path
    config: Config
    checkpoint: Path
    split_dir: Path
    labels: LabelSpace
    eval_metrics: dict[str, Any]

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"


def _run_config(run_dir: Path, fallback: Config) -> Config:
    path = run_dir / CONFIG_FILENAME
    if not path.is_file():
        return fallback
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    known = {k: v for k, v in data.items() if k in Config.model_fields}
    return load_config(overrides=known)


def _split_dir_of(run_dir: Path) -> Path | None:
    """The split a run trained on: run.json (written by `train`), else a `split_dir` in metrics.json."""
    for name in ("run.json", "metrics.json"):
        if (run_dir / name).is_file():
            value = read_json(run_dir / name).get("split_dir")
            if value and (Path(value) / LABELS_FILENAME).is_file():
                return Path(value)
    return None


def _best_checkpoint(run_dir: Path) -> Path | None:
    if (run_dir / "metrics.json").is_file():
        value = read_json(run_dir / "metrics.json").get("best_checkpoint")
        if value and Path(value).is_file():
            return Path(value)
    checkpoints = run_dir / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        if (checkpoints / name).is_file():
            return checkpoints / name
    found = sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
    return found[0] if found else None


def training_outputs(run_dir: str | Path, config: Config) -> TrainingOutputs:
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise RegistryError(f"run dir {run_dir} does not exist: train first (`fashion-tagger train --run-dir ...`)")
    checkpoint = _best_checkpoint(run_dir)
    if checkpoint is None:
        raise RegistryError(f"{run_dir} has no checkpoint in checkpoints/: train first")
    split_dir = _split_dir_of(run_dir)
    if split_dir is None:
        raise RegistryError(f"cannot tell which split {run_dir} was trained on (run.json names no split dir with "
                            "labels.json): train it with `fashion-tagger train`")
    eval_path = run_dir / "eval" / "metrics.json"
    return TrainingOutputs(
        run_dir=run_dir,
        config=_run_config(run_dir, config),
        checkpoint=checkpoint,
        split_dir=split_dir,
        labels=LabelSpace.load(split_dir),
        eval_metrics=read_json(eval_path) if eval_path.is_file() else {},
    )


def content_id(outputs: TrainingOutputs) -> str:
    """Identity of what gets registered: the weights and the label space they decode with."""
    digest = hashlib.sha256()
    digest.update(sha256_file(outputs.checkpoint).encode())
    digest.update(sha256_file(outputs.split_dir / LABELS_FILENAME).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- the gate


@dataclass
class GateData:
    """The validation images of a split and their true labels, as the gate feeds them to every model."""

    paths: list[str]
    y_true: dict[str, np.ndarray]
    labels: LabelSpace
    split_hash: str


def gate_data(split_dir: str | Path) -> GateData:
    """The split's validation rows: original images where they still exist, else the prepared cache copy."""
    split_dir = Path(split_dir)
    val_path = split_dir / "val.parquet"
    if not val_path.is_file():
        raise RegistryError(f"{val_path} does not exist: the gate needs the run's validation split")
    labels = LabelSpace.load(split_dir)
    val = pd.read_parquet(val_path)
    prepared = read_prepared(split_dir) if (split_dir / PREPARED_FILENAME).is_file() else None
    paths = []
    for original, sha in zip(val["image_path"], val.get("image_sha256", [None] * len(val)), strict=True):
        if original and Path(original).is_file():
            paths.append(str(original))
        elif prepared and sha:
            paths.append(str(cached_image_path(prepared["cache_root"], sha, prepared["width"], prepared["height"])))
        else:
            raise RegistryError(f"validation image {original} is gone and has no prepared copy; "
                                "re-run fetch/prepare for this split")
    y_true = {a: val[label_column(a)].to_numpy(dtype=np.int64) for a in labels.attributes}
    return GateData(paths=paths, y_true=y_true, labels=labels, split_hash=sha256_file(val_path))


def predict_paths(model: Any, paths: Sequence[str], batch_size: int) -> pd.DataFrame:
    """Run a pyfunc model over image paths in batches (bounded memory for large splits)."""
    from tqdm.auto import tqdm

    from fashion_tagger.progress import log_progress

    parts = []
    batches = tqdm(range(0, len(paths), batch_size), desc="gate", unit="batch", leave=False, disable=None)
    for start in log_progress(batches, total=len(batches), what="gate", unit="batches"):
        batch = pd.DataFrame({PATH_COLUMN: list(paths[start : start + batch_size])})
        parts.append(model.predict(batch))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def encode_predictions(predictions: pd.DataFrame, labels: LabelSpace) -> dict[str, np.ndarray]:
    """Class names -> indices of LABELS; names (or whole attributes) it does not know become IGNORE_INDEX,
    which never matches a true label, so a model is not rewarded for classes the split does not score."""
    encoded = {}
    for attribute, names in labels.classes.items():
        if attribute not in predictions.columns:
            encoded[attribute] = np.full(len(predictions), IGNORE_INDEX, dtype=np.int64)
            continue
        lookup = {name: i for i, name in enumerate(names)}
        encoded[attribute] = np.array([lookup.get(str(v), IGNORE_INDEX) for v in predictions[attribute]],
                                      dtype=np.int64)
    return encoded


def score(y_true: Mapping[str, np.ndarray], y_pred: Mapping[str, np.ndarray], labels: LabelSpace) -> dict[str, Any]:
    """Headline and per-attribute macro-F1/accuracy, computed by the evaluation stage's own metric code."""
    from fashion_tagger.evaluate import compute_metrics

    metrics = compute_metrics(y_true, y_pred, labels)
    return {
        "headline_macro_f1": float(metrics["headline_macro_f1"]),
        "exact_match": _maybe_float(metrics.get("exact_match")),
        "attributes": {
            attribute: {"macro_f1": _maybe_float(row.get("macro_f1")), "accuracy": _maybe_float(row.get("accuracy"))}
            for attribute, row in metrics["attributes"].items()
        },
    }


def _maybe_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def decide(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    min_delta: float,
    max_attribute_drop: float,
) -> tuple[str, str, dict[str, float]]:
    """PROMOTED or REJECTED, why, and the per-attribute macro-F1 drops (champion minus challenger)."""
    if champion is None:
        return PROMOTED, "first model: there is no champion yet", {}
    drops = {}
    for attribute, row in challenger["attributes"].items():
        before = (champion["attributes"].get(attribute) or {}).get("macro_f1")
        after = row.get("macro_f1")
        if before is not None and after is not None:
            drops[attribute] = before - after
    new, old = challenger["headline_macro_f1"], champion["headline_macro_f1"]
    worst = max(drops, key=drops.get) if drops else None
    # "Higher by at least min_delta": an equal model never replaces the champion (no churn for nothing), and
    # a hair of tolerance lets equal models compare equal despite float summation order.
    if new <= old + 1e-9 or new + 1e-9 < old + min_delta:
        return REJECTED, f"headline {new:.4f} is not above champion {old:.4f} by min_delta {min_delta}", drops
    if worst is not None and drops[worst] > max_attribute_drop + 1e-9:
        return (REJECTED, f"{worst} macro-F1 drops by {drops[worst]:.4f} > max_attribute_drop {max_attribute_drop}",
                drops)
    return PROMOTED, f"headline {new:.4f} > champion {old:.4f}, by at least min_delta {min_delta}", drops


# ------------------------------------------------------------------------------------------- registration


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


def _float_tag(tags: Mapping[str, str], key: str) -> float | None:
    value = tags.get(key)
    return float(value) if value not in (None, "", "None") else None


def _result_from_version(client: MlflowClient, version: ModelVersion, run_dir: Path, uri: str,
                         already: bool) -> RegistrationResult:
    tags = version.tags
    saved = read_json(run_dir / REGISTRATION_FILENAME) if (run_dir / REGISTRATION_FILENAME).is_file() else {}
    return RegistrationResult(
        run_dir=run_dir,
        model_name=version.name,
        version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        run_id=version.run_id or "",
        aliases=_aliases(client, version.name, version.version),
        decision=tags.get(TAG_DECISION, ""),
        reason=tags.get(TAG_REASON, ""),
        headline_macro_f1=_float_tag(tags, TAG_HEADLINE),
        champion_version=tags.get(TAG_CHAMPION_VERSION) or None,
        champion_headline=_float_tag(tags, TAG_CHAMPION_SCORE),
        gate_rows=int(tags.get(TAG_GATE_ROWS, 0) or 0),
        already_registered=already,
        tracking_uri=uri,
        attributes=saved.get("attributes", {}) if str(saved.get("version")) == str(version.version) else {},
    )


def _log_run_artifacts(client: MlflowClient, run_id: str, outputs: TrainingOutputs) -> None:
    """labels.json, the data reports, evaluation outputs and the config into the training run."""
    split_dir = outputs.split_dir
    client.log_artifact(run_id, str(split_dir / LABELS_FILENAME), "data")
    split_report_path = split_dir / "split_report.json"
    if split_report_path.is_file():
        client.log_artifact(run_id, str(split_report_path), "data")
        clean_dir = read_json(split_report_path).get("clean_dir")
        if clean_dir and (Path(clean_dir) / "report.json").is_file():
            client.log_artifact(run_id, str(Path(clean_dir) / "report.json"), "data/validation")
    if outputs.eval_dir.is_dir():
        client.log_artifacts(run_id, str(outputs.eval_dir), "eval")
    if (outputs.run_dir / CONFIG_FILENAME).is_file():
        client.log_artifact(run_id, str(outputs.run_dir / CONFIG_FILENAME))
    metrics_path = outputs.run_dir / "metrics.json"
    if metrics_path.is_file():
        client.log_artifact(run_id, str(metrics_path), "train")


def _eval_metrics_to_log(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    flat = {}
    for key in ("headline_macro_f1", "exact_match"):
        if (value := _maybe_float(metrics.get(key))) is not None:
            flat[f"{prefix}{key}"] = value
    for attribute, row in (metrics.get("attributes") or {}).items():
        for key in ("accuracy", "macro_f1", "weighted_f1"):
            if (value := _maybe_float(row.get(key))) is not None:
                flat[f"{prefix}{attribute}.{key}"] = value
    return flat


def _validation_report(split_dir: Path) -> dict[str, Any]:
    split_report_path = split_dir / "split_report.json"
    if not split_report_path.is_file():
        return {}
    clean_dir = read_json(split_report_path).get("clean_dir")
    report = Path(clean_dir) / "report.json" if clean_dir else None
    return read_json(report) if report and report.is_file() else {}


def sample_grid(paths: Sequence[str], predictions: pd.DataFrame, gate: GateData, out_path: Path,
                count: int = 12) -> Path:
    """COUNT validation images spread over the split, with predicted tags (red where the tag is wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    count = min(count, len(paths))
    columns = min(4, count) or 1
    rows = max(1, math.ceil(count / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    picks = np.unique(np.linspace(0, len(paths) - 1, count).round().astype(int)) if count else []
    for ax, i in zip(axes.flat, picks, strict=False):
        with Image.open(paths[i]) as image:
            image.draft("RGB", (240, 320))  # full-size JPEGs decode at a fraction of their size
            image = image.convert("RGB")
            image.thumbnail((240, 320))
            ax.imshow(image)
        for j, attribute in enumerate(gate.labels.attributes):
            predicted = str(predictions.at[i, attribute]) if attribute in predictions.columns else "?"
            truth_index = int(gate.y_true[attribute][i])
            truth = gate.labels.classes[attribute][truth_index] if truth_index >= 0 else None
            colour = "black" if truth is None else ("green" if truth == predicted else "red")
            confidence = predictions.get(f"{attribute}_confidence")
            suffix = f" {float(confidence.iloc[i]):.2f}" if confidence is not None else ""
            ax.text(0.0, -0.04 - 0.075 * j, f"{attribute}: {predicted}{suffix}", transform=ax.transAxes,
                    fontsize=7, color=colour, va="top")
    fig.suptitle("validation samples: predicted tags (green right, red wrong, black unlabelled)", fontsize=9)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def register_run(run_dir: str | Path, config: Config) -> RegistrationResult:
    """Log RUN_DIR to MLflow, register it as `challenger`, re-score the champion on the same validation split
    and move `champion` when the gate says so. Registering the same weights again changes nothing."""

    outputs = training_outputs(run_dir, config)
    run_dir = outputs.run_dir
    name = config.registry.model_name
    cid = content_id(outputs)

    with tracking.tracking_session(config) as client:
        uri = tracking.tracking_uri(config)
        version = _find_version(client, name, cid)
        if version is not None and version.tags.get(TAG_DECISION):
            log.info("%s is already %s version %s: nothing to do", run_dir, name, version.version)
            return _result_from_version(client, version, run_dir, uri, already=True)

        dataset_hash = outputs.labels.source_hash or None
        tracked_while_training = tracking.read_run_id(run_dir, client) is not None
        run_id = tracking.start_or_resume_run(client, outputs.config, run_dir, dataset_hash=dataset_hash)
        if not tracked_while_training and (run_dir / "metrics.json").is_file():
            tracking.log_epoch_history(client, run_id, read_json(run_dir / "metrics.json").get("history") or [])
        for key, value in tracking.run_tags(outputs.config, run_dir=run_dir, dataset_hash=dataset_hash).items():
            client.set_tag(run_id, key, value)
        tracking.log_params_once(client, run_id, tracking.flat_params(outputs.config))
        if version is None:
            version = _log_and_register(client, outputs, run_id, cid, name, set_challenger=config.registry.promote)
        else:
            log.info("resuming the gate of %s version %s (an earlier attempt stopped before it)", name,
                     version.version)

        gate = _run_gate(client, outputs, version, config)
        _record(client, outputs, run_id, version, gate, config)
        version = client.get_model_version(name, version.version)
        result = _result_from_version(client, version, run_dir, uri, already=False)
        result.attributes = gate["attributes"]
        write_json(run_dir / REGISTRATION_FILENAME, {**result.to_dict(), "gate": gate})
        client.set_terminated(run_id)
        return result


def _log_and_register(client: MlflowClient, outputs: TrainingOutputs, run_id: str, cid: str, name: str,
                      set_challenger: bool) -> ModelVersion:
    """Export the checkpoint, log it as the run's pyfunc model and register it as a new version of NAME."""
    import mlflow

    from fashion_tagger.predict import Predictor
    from fashion_tagger.pyfunc_model import log_tagger_model

    export_dir = outputs.run_dir / EXPORT_DIRNAME
    Predictor.from_checkpoint(outputs.checkpoint).export(export_dir)
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
    version = mlflow.register_model(
        info.model_uri,
        name,
        tags={TAG_CONTENT_ID: cid, tracking.TAG_RUN_DIR: str(outputs.run_dir),
              tracking.TAG_DATASET_HASH: outputs.labels.source_hash or "unknown"},
    )
    if set_challenger:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    log.info("registered %s version %s from %s", name, version.version, outputs.run_dir)
    return version


def _score_version(name: str, version: str, data: GateData, batch_size: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Load a registered version as serving would (pyfunc from the registry) and score it on DATA."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    predictions = predict_paths(model, data.paths, batch_size)
    return score(data.y_true, encode_predictions(predictions, data.labels), data.labels), predictions


def _run_gate(client: MlflowClient, outputs: TrainingOutputs, version: ModelVersion, config: Config) -> dict[str, Any]:
    """Score the challenger and the current champion on the challenger's validation split and decide."""
    registry = config.registry
    name, number = version.name, str(version.version)
    data = gate_data(outputs.split_dir)
    log.info("gate: scoring %s version %s on %d validation images", name, number, len(data.paths))
    challenger, predictions = _score_version(name, number, data, registry.gate_batch_size)
    champion_version = _champion(client, name)
    champion = None
    if champion_version is not None and str(champion_version.version) == number:
        # An earlier attempt moved the alias and stopped before recording why.
        decision, reason, drops = PROMOTED, "already champion from an earlier attempt", {}
    else:
        if champion_version is not None:
            log.info("gate: re-scoring champion version %s on the same images", champion_version.version)
            try:
                champion, _ = _score_version(name, str(champion_version.version), data, registry.gate_batch_size)
            except Exception as exc:
                # Deciding without the champion's score would be a guess; say how to get past it instead.
                raise RegistryError(
                    f"cannot score the champion ({name} version {champion_version.version}) on {outputs.split_dir}: "
                    f"{type(exc).__name__}: {exc}. Fix that version, or move the alias "
                    f"(MlflowClient().set_registered_model_alias('{name}', 'champion', VERSION)) and register again"
                ) from exc
        decision, reason, drops = decide(
            challenger, champion, min_delta=registry.min_delta, max_attribute_drop=registry.max_attribute_drop
        )
    if not registry.promote:
        decision, reason = HELD, f"registry.promote is false, aliases unchanged (the gate says {decision}: {reason})"
    attributes = {
        attribute: {
            "challenger_macro_f1": row["macro_f1"],
            "champion_macro_f1": (champion["attributes"].get(attribute) or {}).get("macro_f1") if champion else None,
            "drop": drops.get(attribute),
        }
        for attribute, row in challenger["attributes"].items()
    }
    grid = None
    if data.paths:
        grid = sample_grid(data.paths, predictions, data, outputs.run_dir / "sample_predictions.png")
    return {
        "model_name": name,
        "version": number,
        "decision": decision,
        "reason": reason,
        "challenger_headline": challenger["headline_macro_f1"],
        "champion_version": str(champion_version.version) if champion_version is not None else None,
        "champion_headline": champion["headline_macro_f1"] if champion else None,
        "champion_stored_headline": _float_tag(champion_version.tags, TAG_HEADLINE) if champion_version else None,
        "min_delta": registry.min_delta,
        "max_attribute_drop": registry.max_attribute_drop,
        "split_dir": str(outputs.split_dir),
        "split_hash": data.split_hash,
        "rows": len(data.paths),
        "attributes": attributes,
        "challenger": challenger,
        "champion": champion,
        "sample_grid": str(grid) if grid else None,
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _record(client: MlflowClient, outputs: TrainingOutputs, run_id: str, version: ModelVersion,
            gate: Mapping[str, Any], config: Config) -> None:
    """Move aliases first, then write the decision tags: a version with a decision tag is finished, so a
    retry after a crash in between repeats the gate instead of skipping the alias move."""
    name, number = version.name, str(version.version)
    if gate["decision"] == PROMOTED:
        client.set_registered_model_alias(name, CHAMPION, number)
        aliases = client.get_registered_model(name).aliases
        if str(aliases.get(CHALLENGER)) == number:
            client.delete_registered_model_alias(name, CHALLENGER)
    client.log_dict(run_id, dict(gate), GATE_FILENAME)
    if gate.get("sample_grid"):
        client.log_artifact(run_id, gate["sample_grid"], "samples")
    metrics = {"gate.challenger_headline": gate["challenger_headline"]}
    if gate["champion_headline"] is not None:
        metrics["gate.champion_headline"] = gate["champion_headline"]
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
    card = tracking.model_card(
        config=outputs.config,
        labels=outputs.labels,
        metrics=outputs.eval_metrics or gate["challenger"],
        validation_report=_validation_report(outputs.split_dir),
        split_report=read_json(outputs.split_dir / "split_report.json")
        if (outputs.split_dir / "split_report.json").is_file() else None,
        gate=gate,
        model_name=name,
        version=number,
    )
    (outputs.run_dir / "model_card.md").write_text(card)
    client.log_text(run_id, card, "model_card.md")
    client.update_model_version(name, number, description=card[:4900])
    tags = {
        TAG_HEADLINE: gate["challenger_headline"],
        TAG_CHALLENGER_SCORE: gate["challenger_headline"],
        TAG_CHAMPION_SCORE: gate["champion_headline"] if gate["champion_headline"] is not None else "",
        TAG_CHAMPION_VERSION: gate["champion_version"] or "",
        TAG_GATE_SPLIT: gate["split_hash"],
        TAG_GATE_ROWS: gate["rows"],
        TAG_REASON: gate["reason"][:4900],
        TAG_DECISION: gate["decision"],  # last: marks the registration finished
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, number, key, str(value))
    log.info("gate: %s version %s %s (%s)", name, number, gate["decision"], gate["reason"])


# ---------------------------------------------------------------------------------------------- listing


def list_versions(config: Config) -> list[dict[str, Any]]:
    """Every version of `registry.model_name`, newest first: aliases, headline metric, gate decision."""
    from mlflow.exceptions import MlflowException

    name = config.registry.model_name
    with tracking.tracking_session(config) as client:
        try:
            aliases = client.get_registered_model(name).aliases
        except MlflowException:
            return []
        by_version: dict[str, list[str]] = {}
        for alias, number in aliases.items():
            by_version.setdefault(str(number), []).append(alias)
        rows = []
        for version in client.search_model_versions(f"name='{name}'"):
            tags = version.tags
            rows.append({
                "name": name,
                "version": str(version.version),
                "aliases": sorted(by_version.get(str(version.version), [])),
                "headline_macro_f1": _float_tag(tags, TAG_HEADLINE),
                "decision": tags.get(TAG_DECISION, ""),
                "champion_headline": _float_tag(tags, TAG_CHAMPION_SCORE),
                "created": dt.datetime.fromtimestamp(version.creation_timestamp / 1000, dt.UTC)
                .isoformat(timespec="seconds"),
                "run_id": version.run_id or "",
                "run_dir": tags.get(tracking.TAG_RUN_DIR, ""),
            })
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def format_versions(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain table for `fashion-tagger models`."""
    if not rows:
        return "no registered versions yet: run `fashion-tagger register --run-dir DIR` after training"
    headers = ("version", "aliases", "headline", "decision", "champion then", "created")
    table = [headers] + [
        (
            str(row["version"]),
            ",".join(row["aliases"]) or "-",
            f"{row['headline_macro_f1']:.4f}" if row.get("headline_macro_f1") is not None else "-",
            row.get("decision") or "-",
            f"{row['champion_headline']:.4f}" if row.get("champion_headline") is not None else "-",
            str(row.get("created", "")).replace("+00:00", "Z"),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"{rows[0]['name']}\n" + "\n".join(lines)


def ui_command(tracking_uri: str, port: int = 5000) -> str:
    """How to browse this store: `mlflow ui` for a local store, the server's address otherwise."""
    if tracking.is_local_store(tracking_uri):
        return f"mlflow ui --backend-store-uri {tracking_uri} --port {port}  (then open http://127.0.0.1:{port})"
    return f"open {tracking_uri} in a browser"


def describe_registration(result: RegistrationResult | Mapping[str, Any]) -> str:
    """A few lines for the end of `make run`: version, alias, headline metric, how to load and browse it."""
    r = result.to_dict() if isinstance(result, RegistrationResult) else dict(result)
    headline = f"{r['headline_macro_f1']:.4f}" if r.get("headline_macro_f1") is not None else "n/a"
    aliases = ", ".join(r.get("aliases") or []) or "none"
    again = " (already registered: nothing changed)" if r.get("already_registered") else ""
    lines = [
        f"registered {r['model_name']} version {r['version']}{again}; aliases: {aliases}",
        f"headline macro-F1 {headline} on {r.get('gate_rows', 0)} validation images; gate: {r['decision']} "
        f"({r['reason']})",
    ]
    if r.get("champion_version"):
        champion = r.get("champion_headline")
        lines.append(f"champion version {r['champion_version']} scored "
                     f"{champion:.4f} on the same images" if champion is not None else "")
    alias = CHAMPION if CHAMPION in (r.get("aliases") or []) else None
    uri = f"models:/{r['model_name']}@{alias}" if alias else r.get("model_uri", "")
    lines.append(f"load it: mlflow.pyfunc.load_model('{uri}') or `fashion-tagger predict --model {uri} IMAGE`")
    lines.append(f"browse runs and models: {ui_command(r.get('tracking_uri', ''))}")
    return "\n".join(line for line in lines if line)
