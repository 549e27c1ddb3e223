"""The embedded Airflow's settings, in one place: AIRFLOW_HOME inside the project home, SQLite, this repo's dags/.

`make run` (scripts/run_dag.py), `make up` (scripts/up.sh, through `--shell`) and the API test use the same values,
so the DAG runs of `make run` show up in the UI that `make up` serves.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "fashion_tagger_training"


def project_home() -> tuple[str, Path]:
    """The home as FASHION_TAGGER_HOME names it (a folder or an s3:// URL) and this machine's folder for it: the
    folder itself, or the local copy of an object-store home, where Airflow's and MLflow's embedded files live."""
    from fashion_tagger.core.config import project_home as home_of_project

    home = home_of_project()
    return home.location, home.root


def airflow_env(home: Path | None = None, *, port: int = 8080, host: str = "127.0.0.1") -> dict[str, str]:
    """Environment for every Airflow command of the embedded default. Values already set in the environment win
    for the settings a user may want to change (executor, parallelism, users); paths always follow the home."""
    location, home = (str(home.resolve()), home.resolve()) if home else project_home()
    airflow_home = home / "airflow"
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    env = {
        "FASHION_TAGGER_HOME": location,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": base_url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
        # The MLflow store of `fashion_tagger.core.config.Config.tracking_uri`, named so `mlflow ui` finds it too.
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
    }
    if location != str(home) and not os.environ.get("MLFLOW_TRACKING_URI"):
        # An object-store home needs a tracking server (Config.tracking_uri says so): no local store in its copy.
        del env["MLFLOW_TRACKING_URI"]
    defaults = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        # Two cores: one task at a time keeps training from competing with the scheduler.
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        # Runs start when someone triggers them: a weekly schedule would, once the DAG is unpaused, also start the
        # run of the latest week, ahead of the one just triggered. Deployments keep the DAG's `@weekly`.
        "FASHION_TAGGER_SCHEDULE": "none",
    }
    env.update({key: os.environ.get(key, value) for key, value in defaults.items()})
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shell", action="store_true", help="print `export K=V` lines for a shell to eval")
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW_UI_PORT", "8080")))
    parser.add_argument("--host", default=os.environ.get("AIRFLOW_UI_HOST", "127.0.0.1"))
    args = parser.parse_args()
    for key, value in airflow_env(port=args.port, host=args.host).items():
        print(f"export {key}={shlex.quote(value)}" if args.shell else f"{key}={value}")


if __name__ == "__main__":
    main()
