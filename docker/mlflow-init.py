"""One-shot setup of the MLflow server's users, run as its admin once the server is healthy (the `mlflow-init`
service of docker-compose.yaml; tests/native_stack.py runs it the same way). Idempotent: each run sets every
password from the environment, so rotating one is editing .env and running this again.

Who may do what (docs/deploy.md, *MLflow users*):
  admin         everything, users and grants included (created by the server itself on an empty user store)
  service user  MANAGE on the pipeline's experiment and registered model: runs, model versions, aliases
  reader        READ on every experiment and registered model: browses runs, metrics, artifacts and versions
Anyone else who authenticates gets the server's default_permission, NO_PERMISSIONS; anonymous requests get 401.
"""

from __future__ import annotations

import os
import sys
import time

from mlflow.exceptions import RestException
from mlflow.server.auth.client import AuthServiceClient

ALL = "*"


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name) or default
    if not value:
        sys.exit(f"mlflow-init: {name} is empty; set it in .env (see .env.example)")
    return value


def _wait_for_server(auth: AuthServiceClient, admin: str, timeout: float = 120) -> None:
    """The server answers /health before its workers finish starting; the first real call proves it is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            auth.get_user(admin)
            return
        except RestException:
            raise
        except Exception as exc:  # connection refused or reset while the server starts
            if time.monotonic() > deadline:
                sys.exit(f"mlflow-init: no answer from {auth.tracking_uri} within {timeout:.0f}s: {exc}")
            time.sleep(2)


def ensure_user(auth: AuthServiceClient, username: str, password: str) -> str:
    """Create USERNAME, or set its password when it exists; never an admin."""
    try:
        user = auth.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return "created"
    # An admin changing another user's password needs no current password.
    auth.update_user_password(username, password)
    if user.is_admin:
        auth.update_user_admin(username, False)
    return "password set"


def ensure_grant(auth: AuthServiceClient, username: str, resource_type: str, resource_id: str,
                 permission: str) -> None:
    """Exactly PERMISSION on the resource: a grant at another level is replaced."""
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def main() -> None:
    uri = _env("MLFLOW_TRACKING_URI")
    admin = _env("MLFLOW_TRACKING_USERNAME")
    _env("MLFLOW_TRACKING_PASSWORD")  # the admin's: the clients below send it with every request
    service = _env("MLFLOW_SERVICE_USERNAME")
    reader = _env("MLFLOW_READER_USERNAME")
    experiment = _env("MLFLOW_EXPERIMENT_NAME", "fashion-tagger")
    model = _env("MLFLOW_MODEL_NAME", "fashion-tagger")
    if len({admin, service, reader}) != 3:
        sys.exit(f"mlflow-init: the admin, service and reader users need three different names, "
                 f"got {admin!r}, {service!r}, {reader!r}")

    auth = AuthServiceClient(uri)
    _wait_for_server(auth, admin)
    for username, password_var in ((service, "MLFLOW_SERVICE_PASSWORD"), (reader, "MLFLOW_READER_PASSWORD")):
        print(f"mlflow-init: user {username}: {ensure_user(auth, username, _env(password_var))}")

    # Registered-model grants are by name, so the service user owns the model before its first version.
    ensure_grant(auth, service, "registered_model", model, "MANAGE")
    # Experiment grants are by id: when the experiment does not exist yet the service user creates it on the
    # first run, and MLflow makes its creator its manager.
    from mlflow import MlflowClient

    found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    if found is not None:
        ensure_grant(auth, service, "experiment", found.experiment_id, "MANAGE")
    ensure_grant(auth, reader, "experiment", ALL, "READ")
    ensure_grant(auth, reader, "registered_model", ALL, "READ")
    where = f"experiment {found.experiment_id}" if found else "the experiment it will create"
    print(f"mlflow-init: {service} manages model {model!r} and {where} ({experiment!r}); "
          f"{reader} reads every experiment and model")


if __name__ == "__main__":
    main()
