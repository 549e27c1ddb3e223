"""The promotion gate: score the challenger and the champion on the same images through the serving path, and
decide whether the challenger replaces the champion.

Pure of registration: it is handed model URIs and a split, and returns scores, predictions and a decision.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fashion_tagger.cache import cached_image_path, read_prepared
from fashion_tagger.config import RegistryConfig
from fashion_tagger.errors import RunError
from fashion_tagger.io import sha256_file
from fashion_tagger.labels import LabelSpace, label_column
from fashion_tagger.layout import SplitDir
from fashion_tagger.pyfunc_model import PATH_COLUMN
from fashion_tagger.schema import IGNORE_INDEX

log = logging.getLogger(__name__)

PROMOTED, REJECTED, HELD = "promoted", "rejected", "held"


@dataclass
class GateData:
    """The validation images of a split and their true labels, as the gate feeds them to every model."""

    paths: list[str]
    y_true: dict[str, np.ndarray]
    labels: LabelSpace
    split_hash: str


def gate_data(split_dir: str | Path) -> GateData:
    """The split's validation rows: original images where they still exist, else the prepared cache copy."""
    split = SplitDir(Path(split_dir))
    val_path = split.val
    if not val_path.is_file():
        raise RunError(f"{val_path} does not exist: the gate needs the run's validation split")
    labels = LabelSpace.load(split.labels)
    val = pd.read_parquet(val_path)
    prepared = read_prepared(split.dir) if split.prepared.is_file() else None
    paths = []
    for original, sha in zip(val["image_path"], val.get("image_sha256", [None] * len(val)), strict=True):
        if original and Path(original).is_file():
            paths.append(str(original))
        elif prepared and sha:
            paths.append(str(cached_image_path(prepared["cache_root"], sha, prepared["width"], prepared["height"])))
        else:
            raise RunError(f"validation image {original} is gone and has no prepared copy; "
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
    from fashion_tagger.metrics import compute_metrics

    metrics = compute_metrics(y_true, y_pred, labels)
    return {
        "headline_macro_f1": float(metrics["headline_macro_f1"]),
        "exact_match": maybe_float(metrics.get("exact_match")),
        "attributes": {
            attribute: {"macro_f1": maybe_float(row.get("macro_f1")), "accuracy": maybe_float(row.get("accuracy"))}
            for attribute, row in metrics["attributes"].items()
        },
    }


def maybe_float(value: Any) -> float | None:
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


def score_model(model_uri: str, data: GateData, batch_size: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Load a model as serving would (pyfunc, e.g. from the registry) and score it on DATA."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    predictions = predict_paths(model, data.paths, batch_size)
    return score(data.y_true, encode_predictions(predictions, data.labels), data.labels), predictions


def run_gate(
    name: str,
    version: str,
    champion_version: str | None,
    data: GateData,
    registry: RegistryConfig,
    *,
    champion_stored_headline: float | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score version VERSION of NAME and the current champion on DATA and decide; the challenger's predictions too.

    A champion that cannot be scored stops the gate: deciding without its score would be a guess.
    """
    log.info("gate: scoring %s version %s on %d validation images", name, version, len(data.paths))
    challenger, predictions = score_model(f"models:/{name}/{version}", data, registry.gate_batch_size)
    champion = None
    if champion_version is not None and champion_version == version:
        # An earlier attempt moved the alias and stopped before recording why.
        decision, reason, drops = PROMOTED, "already champion from an earlier attempt", {}
    else:
        if champion_version is not None:
            log.info("gate: re-scoring champion version %s on the same images", champion_version)
            try:
                champion, _ = score_model(f"models:/{name}/{champion_version}", data, registry.gate_batch_size)
            except Exception as exc:
                from fashion_tagger.errors import ModelError

                raise ModelError(
                    f"cannot score the champion ({name} version {champion_version}): {type(exc).__name__}: {exc}. "
                    f"Fix that version, or move the alias (MlflowClient().set_registered_model_alias('{name}', "
                    "'champion', VERSION)) and register again"
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
    gate = {
        "model_name": name,
        "version": version,
        "decision": decision,
        "reason": reason,
        "challenger_headline": challenger["headline_macro_f1"],
        "champion_version": champion_version,
        "champion_headline": champion["headline_macro_f1"] if champion else None,
        "champion_stored_headline": champion_stored_headline,
        "min_delta": registry.min_delta,
        "max_attribute_drop": registry.max_attribute_drop,
        "split_hash": data.split_hash,
        "rows": len(data.paths),
        "attributes": attributes,
        "challenger": challenger,
        "champion": champion,
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return gate, predictions
