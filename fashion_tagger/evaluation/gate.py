"""The promotion gate: score the challenger and the champion on the split's test part through the serving path
(`scoring`), and decide by a paired bootstrap (`bootstrap`) whether the challenger replaces the champion.

Pure of registration: it is handed model URIs and a split, and returns scores, intervals, predictions and a
decision. docs/stages.md states the rule with a worked example.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fashion_tagger.core.config import RegistryConfig
from fashion_tagger.data.labels import LabelSpace
from fashion_tagger.evaluation.bootstrap import paired_bootstrap
from fashion_tagger.evaluation.scoring import ScoringSet, encode_predictions, predict_paths, scoring_set

log = logging.getLogger(__name__)

PROMOTED, REJECTED, HELD = "promoted", "rejected", "held"


GateData = ScoringSet  # the test images of a split and their true labels, as the gate feeds them to every model


def gate_data(split_dir: str | Path) -> GateData:
    """The split's test rows: original images where they still exist, else the prepared cache copy."""
    return scoring_set(split_dir, "test")


def score(y_true: Mapping[str, np.ndarray], y_pred: Mapping[str, np.ndarray], labels: LabelSpace) -> dict[str, Any]:
    """Headline and per-attribute macro-F1/accuracy, computed by the evaluation stage's own metric code."""
    from fashion_tagger.evaluation.metrics import compute_metrics

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
    comparison: Mapping[str, Any] | None,
    *,
    min_delta: float,
    max_attribute_drop: float,
) -> tuple[str, str]:
    """PROMOTED or REJECTED, and why, from the paired bootstrap COMPARISON (`bootstrap.paired_bootstrap`).

    Promoted when the lower end of the 95 % interval of the headline gain is above MIN_DELTA and no attribute's
    macro-F1 drop is credibly worse than MAX_ATTRIBUTE_DROP, i.e. the lower end of its drop interval is above it.
    """
    if champion is None or comparison is None:
        return PROMOTED, "first model: there is no champion yet"
    gain = comparison["headline_gain"]
    new, old = challenger["headline_macro_f1"], champion["headline_macro_f1"]
    interval = f"95% interval of the headline gain [{gain['low']:+.4f}, {gain['high']:+.4f}]"
    # A hair of tolerance so that identical predictions (a gain of exactly 0 everywhere) never pass min_delta 0.
    if not gain["low"] > min_delta + 1e-12:
        return REJECTED, (f"headline {new:.4f} vs champion {old:.4f}: the {interval} does not lie above min_delta "
                          f"{min_delta}")
    drops = comparison["attribute_drops"]
    credible = {a: d for a, d in drops.items() if d["low"] > max_attribute_drop + 1e-12}
    if credible:
        worst = max(credible, key=lambda a: credible[a]["low"])
        d = credible[worst]
        return REJECTED, (f"{worst} macro-F1 drops by {d['mean']:.4f} (95% interval [{d['low']:.4f}, "
                          f"{d['high']:.4f}]), credibly more than max_attribute_drop {max_attribute_drop}")
    return PROMOTED, (f"headline {new:.4f} vs champion {old:.4f}: the {interval} lies above min_delta {min_delta}, "
                      f"and no attribute drops credibly more than {max_attribute_drop}")


def score_model(model_uri: str, data: GateData, batch_size: int) -> tuple[dict[str, Any], pd.DataFrame,
                                                                          dict[str, np.ndarray]]:
    """Load a model as serving would (pyfunc, e.g. from the registry) and score it on DATA: its scores, its
    predictions and those predictions encoded on DATA's classes."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    predictions = predict_paths(model, data.paths, batch_size, desc="gate")
    encoded = encode_predictions(predictions, data.labels)
    return score(data.y_true, encoded, data.labels), predictions, encoded


def champion_warning(champion_membership: str | None, membership: str | None, champion_version: str) -> str | None:
    """Why the champion's score on this test part may be optimistic, or None when its test part was the same."""
    if not champion_membership:
        return (f"champion version {champion_version} was registered before test membership was recorded: its "
                "training data may overlap this test part, so its score here may be optimistic")
    # A champion registered before the database recorded the file (`.../test-0.1-seed42.parquet`): same record.
    if Path(champion_membership).stem != Path(membership or "").stem:
        return (f"champion version {champion_version} was trained with another test membership record "
                f"({champion_membership}, this split uses {membership}): its training data may overlap this "
                "test part, so its score here may be optimistic")
    return None


def run_gate(
    name: str,
    version: str,
    champion_version: str | None,
    data: GateData,
    registry: RegistryConfig,
    *,
    champion_stored_headline: float | None = None,
    champion_membership: str | None = None,
    membership: str | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score version VERSION of NAME and the current champion on DATA (the test part) and decide by a paired
    bootstrap; the challenger's predictions too.

    A champion that cannot be scored stops the gate: deciding without its score would be a guess.
    CHAMPION_MEMBERSHIP and MEMBERSHIP name the test membership records the champion and this split were made
    with; when they differ the decision carries a warning.
    """
    log.info("gate: scoring %s version %s on %d test images", name, version, len(data.paths))
    challenger, predictions, challenger_pred = score_model(f"models:/{name}/{version}", data,
                                                           registry.gate_batch_size)
    champion: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    warnings: list[str] = []
    if champion_version is not None and champion_version == version:
        # An earlier attempt moved the alias and stopped before recording why.
        decision, reason = PROMOTED, "already champion from an earlier attempt"
    else:
        if champion_version is not None:
            log.info("gate: re-scoring champion version %s on the same images", champion_version)
            if warning := champion_warning(champion_membership, membership, champion_version):
                log.warning("gate: %s", warning)
                warnings.append(warning)
            try:
                champion, _, champion_pred = score_model(f"models:/{name}/{champion_version}", data,
                                                         registry.gate_batch_size)
            except Exception as exc:
                from fashion_tagger.core.errors import ModelError

                raise ModelError(
                    f"cannot score the champion ({name} version {champion_version}): {type(exc).__name__}: {exc}. "
                    f"Fix that version, or move the alias (MlflowClient().set_registered_model_alias('{name}', "
                    "'champion', VERSION)) and register again"
                ) from exc
            started = time.perf_counter()
            comparison = paired_bootstrap(data.y_true, challenger_pred, champion_pred, data.labels,
                                          resamples=registry.bootstrap_resamples, seed=registry.bootstrap_seed)
            log.info("gate: %d bootstrap resamples over %d images in %.2f s", registry.bootstrap_resamples,
                     len(data.paths), time.perf_counter() - started)
        decision, reason = decide(challenger, champion, comparison, min_delta=registry.min_delta,
                                  max_attribute_drop=registry.max_attribute_drop)
    if not registry.promote:
        decision, reason = HELD, f"registry.promote is false, aliases unchanged (the gate says {decision}: {reason})"
    drops = (comparison or {}).get("attribute_drops", {})
    attributes = {
        attribute: {
            "challenger_macro_f1": row["macro_f1"],
            "champion_macro_f1": (champion["attributes"].get(attribute) or {}).get("macro_f1") if champion else None,
            "drop": (drops.get(attribute) or {}).get("mean"),
            "drop_interval": [drops[attribute]["low"], drops[attribute]["high"]] if attribute in drops else None,
        }
        for attribute, row in challenger["attributes"].items()
    }
    gain = (comparison or {}).get("headline_gain")
    gate = {
        "model_name": name,
        "version": version,
        "decision": decision,
        "reason": reason,
        "warnings": warnings,
        "split": data.part,
        "challenger_headline": challenger["headline_macro_f1"],
        "champion_version": champion_version,
        "champion_headline": champion["headline_macro_f1"] if champion else None,
        "champion_stored_headline": champion_stored_headline,
        "headline_gain_interval": [gain["low"], gain["high"]] if gain else None,
        "bootstrap": comparison,
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
