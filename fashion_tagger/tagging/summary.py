"""A finished tagging run in MLflow: its counts and throughput as metrics of a run in the experiment
`tagging.experiment`, the model as params, a confidence histogram per attribute and the small CSVs as artifacts.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fashion_tagger.core import io
from fashion_tagger.core.config import Config, load_config
from fashion_tagger.core.layout import TagsDir
from fashion_tagger.core.plots import saved_figure
from fashion_tagger.core.schema import ATTRIBUTES
from fashion_tagger.serving.rows import confidence_column

log = logging.getLogger(__name__)


def confidence_histograms(table: pd.DataFrame, thresholds: Mapping[str, float | None],
                          out_dir: str | Path) -> list[Path]:
    """One PNG per tagged attribute: the histogram of its confidences, the review threshold marked."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for attribute in ATTRIBUTES:
        values = table[confidence_column(attribute)].dropna() if len(table) else pd.Series(dtype=float)
        if values.empty:
            continue
        path = out_dir / f"confidence_{attribute}.png"
        with saved_figure(path, dpi=90, figsize=(5, 3.2)) as (_, ax):
            ax.hist(values, bins=20, range=(0, 1), color="#4c72b0")
            if thresholds.get(attribute) is not None:
                ax.axvline(thresholds[attribute], color="#c44e52", linestyle="--",
                           label=f"review below {thresholds[attribute]:.2f}")
                ax.legend(fontsize=8)
            ax.set(title=f"{attribute}: confidence of {len(values)} tags", xlabel="confidence", ylabel="images")
        paths.append(path)
    return paths


def log_summary(out_dir: str | Path, config: Config | None = None, *, tags: Mapping[str, str] | None = None) -> str:
    """Log a finished run's summary to the MLflow experiment `tagging.experiment`: counts and throughput as
    metrics, the model as params, a confidence histogram per attribute and the small CSVs as artifacts."""
    from fashion_tagger.core import tracking

    config = config or load_config()
    tags_dir = TagsDir(Path(out_dir))
    summary = io.read_json(tags_dir.summary)
    table = pd.read_parquet(tags_dir.tags)
    experiment_config = config.model_copy(
        update={"registry": config.registry.model_copy(update={"experiment": config.tagging.experiment})})
    metrics = {key: float(summary[key]) for key in ("listed", "tagged", "reused", "rejected", "review",
                                                    "changed_items", "changed_tags", "removed", "seconds",
                                                    "images_per_second", "shards")}
    for attribute in ATTRIBUTES:
        values = table[confidence_column(attribute)].dropna() if len(table) else pd.Series(dtype=float)
        if len(values):
            metrics[f"mean_confidence.{attribute}"] = float(values.mean())
    for attribute, share in (summary.get("coverage") or {}).items():  # accepted without review
        metrics[f"coverage.{attribute}"] = float(share)
        metrics[f"accepted.{attribute}"] = float(summary["accepted"][attribute])
    with tracking.tracking_session(experiment_config) as client:
        from mlflow.entities import Metric, Param

        experiment_id = tracking.ensure_experiment(client, experiment_config)
        run_tags = {"fashion_tagger.model_name": summary["model_name"],
                    "fashion_tagger.model_version": summary["model_version"], **(tags or {})}
        run = client.create_run(experiment_id, run_name=f"{summary['model_name']}-v{summary['model_version']}",
                                tags=run_tags)
        run_id = run.info.run_id
        stamp = int(time.time() * 1000)
        params = {"model_uri": summary["model_uri"], "requested_model": summary.get("requested_model", ""),
                  "out_dir": str(tags_dir.dir), **{f"threshold.{a}": str(v) for a, v in summary["thresholds"].items()}}
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        with tempfile.TemporaryDirectory(prefix="tagging-summary-") as tmp:
            confidence_histograms(table, summary["thresholds"], Path(tmp) / "histograms")
            client.log_artifacts(run_id, str(Path(tmp) / "histograms"), "histograms")
        for path in (tags_dir.summary, tags_dir.review_csv, tags_dir.changes_csv, tags_dir.rejects):
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
    log.info("logged the tagging summary as run %s of experiment %s", run_id, config.tagging.experiment)
    return run_id
