"""`make run`: the whole workflow through the Airflow DAG, once, in this process (`dag.test()`).

Airflow's metadata is SQLite in <FASHION_TAGGER_HOME>/airflow and MLflow's is <FASHION_TAGGER_HOME>/mlflow.db, the
stores `make up` serves afterwards. Kaggle data is used when credentials are set, the generated dataset otherwise.

    python scripts/run_dag.py                       # demo preset
    python scripts/run_dag.py --param epochs=1 --param backbone=test_efficientnet --param pretrained=false \
        --summary-json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from airflow_env import DAG_ID, REPO, airflow_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="configuration preset (default: demo)")
    parser.add_argument(
        "--param", "-p", action="append", default=[], metavar="NAME=VALUE",
        help="a DAG parameter, as in the trigger form (value parsed as YAML), e.g. epochs=2; repeatable",
    )
    parser.add_argument("--summary-json", type=Path, help="write the run's task states and results here")
    return parser.parse_args(argv)


def run_conf(preset: str, items: list[str]) -> dict[str, Any]:
    from fashion_tagger.orchestration.form import KAGGLE_SMALL, SYNTHETIC_DEFAULT, default_source

    conf: dict[str, Any] = {"preset": preset}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            sys.exit(f"--param {item!r} must look like NAME=VALUE, e.g. epochs=2")
        value = yaml.safe_load(raw) if raw.strip() else None
        # Yes/no fields of the form are the strings keep/yes/no (YAML would read yes/no as booleans).
        conf[name.strip()] = ("yes" if value else "no") if isinstance(value, bool) else value
    if "source" not in conf:
        conf["source"] = default_source(preset)
        if conf["source"].startswith("kaggle:"):
            print(f"data: Kaggle credentials found, using {conf['source']}")
            if conf["source"] == KAGGLE_SMALL and "max_rows" not in conf:
                conf["max_rows"] = 6000  # keeps the demo within minutes on a laptop
        elif conf["source"] == SYNTHETIC_DEFAULT and not os.environ.get("FASHION_TAGGER_SOURCE"):
            print(
                f"data: no Kaggle credentials (KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json), using the "
                f"generated dataset {conf['source']}"
            )
        else:
            print(f"data: FASHION_TAGGER_SOURCE={conf['source']}")
    else:
        print(f"data: {conf['source']}")
    return conf


def migrate_metadata_db() -> None:
    """Create or upgrade Airflow's SQLite database (quick when it is current)."""
    from airflow.utils import db

    try:
        db.check_migrations(timeout=1)
    except TimeoutError:
        print("airflow: preparing the metadata database (first run: about a minute)")
        db.initdb()


def load_dag():
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(str(REPO / "dags"), bundle_path=REPO / "dags")  # the folder on sys.path, for its shared module
    if bag.import_errors:
        sys.exit("the DAG folder has import errors:\n" + "\n".join(f"{k}: {v}" for k, v in bag.import_errors.items()))
    return bag.dags[DAG_ID]


def summarize(dag, dag_run) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = {ti.task_id: ti for ti in dag_run.get_task_instances(session=session)}
        rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=DAG_ID, key="return_value"))
        results = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    order = [t.task_id for t in dag.topological_sort()]
    return {
        "dag_id": DAG_ID,
        "run_id": dag_run.run_id,
        "state": str(dag_run.state),
        "tasks": {task_id: str(tis[task_id].state) if task_id in tis else "none" for task_id in order},
        "seconds": {task_id: round(tis[task_id].duration or 0, 1) for task_id in order if task_id in tis},
        "results": results,
    }


def report(summary: dict[str, Any], seconds: float) -> None:
    print(f"\nDAG run {summary['run_id']}: {summary['state']} in {seconds:.0f} s")
    for task_id in summary["tasks"]:
        seconds = summary["seconds"].get(task_id)
        print(f"  {task_id:<18} {summary['tasks'][task_id]:<10} {f'{seconds:.0f} s' if seconds else ''}")
    registered = summary["results"].get("register_model")
    if registered:
        from fashion_tagger.registry.versions import describe_registration

        print()
        print(describe_registration(registered))
    failed = [t for t, state in summary["tasks"].items() if state not in ("success", "skipped")]
    if failed:
        print(f"\nfailed at {failed[0]}: its log is above; outputs so far under {run_root(summary)}")
    print(
        "\nbrowse: `make up`, then Airflow http://localhost:8080 (login printed by make up) and "
        "MLflow http://localhost:5000; `make down` stops them"
    )


def run_root(summary: dict[str, Any]) -> str:
    return next((r["run_root"] for r in summary["results"].values() if "run_root" in r), "<home>/runs")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(airflow_env())  # before Airflow is imported: it reads its settings once
    # An interactive run should stop at the first failure instead of waiting out the retry backoff.
    os.environ.setdefault("FASHION_TAGGER_TASK_RETRIES", "0")
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    conf = run_conf(args.preset, args.param)
    print(f"airflow: AIRFLOW_HOME={os.environ['AIRFLOW_HOME']} (SQLite), DAG {DAG_ID}, conf {json.dumps(conf)}")

    started = time.perf_counter()
    migrate_metadata_db()
    dag = load_dag()
    dag_run = dag.test(run_conf=conf)
    summary = summarize(dag, dag_run)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
    report(summary, time.perf_counter() - started)
    return 0 if summary["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
