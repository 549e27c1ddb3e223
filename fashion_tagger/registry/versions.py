"""The registered versions as people see them: `fashion-tagger models`, and the lines `make run` ends with."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from fashion_tagger.core import tracking
from fashion_tagger.core.config import Config
from fashion_tagger.core.text import text_table
from fashion_tagger.core.tracking import TAG_CHAMPION_SCORE, TAG_DECISION, TAG_HEADLINE
from fashion_tagger.registry.register import CHAMPION, RegistrationResult, float_tag


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
                "headline_macro_f1": float_tag(tags, TAG_HEADLINE),
                "decision": tags.get(TAG_DECISION, ""),
                "champion_headline": float_tag(tags, TAG_CHAMPION_SCORE),
                "created": dt.datetime.fromtimestamp(version.creation_timestamp / 1000, dt.UTC)
                .isoformat(timespec="seconds"),
                "run_id": version.run_id or "",
                "run_dir": tags.get(tracking.TAG_RUN_DIR, ""),
            })
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def format_versions(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain table for `fashion-tagger models`."""
    if not rows:
        return "no registered versions yet: `fashion-tagger run` (or `fashion-tagger register RUN`) registers one"
    headers = ("version", "aliases", "headline", "decision", "champion then", "created")
    table = [
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
    return f"{rows[0]['name']}\n" + text_table(headers, table)


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
        f"headline macro-F1 {headline} on {r.get('gate_rows', 0)} test images; gate: {r['decision']} "
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
