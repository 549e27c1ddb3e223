#!/usr/bin/env bash
# Starts the MLflow tracking server with its built-in authentication (`--app-name basic-auth`). Every setting
# comes from the environment (docker-compose.yaml's `mlflow` service; tests/native_stack.py runs this same
# script), so that no password is written into the image or onto a command line.
#
# The auth app reads its settings from an INI file (MLFLOW_AUTH_CONFIG_PATH). It is written here, readable by
# this user only, because it holds the user store's database URI and its password. The admin's password is
# not written into it: the app takes MLFLOW_AUTH_ADMIN_PASSWORD from the environment, and only to create the
# admin on an empty user store.
set -euo pipefail

for var in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI MLFLOW_ARTIFACTS_DESTINATION \
           MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
  if [[ -z "${!var:-}" ]]; then
    echo "mlflow-server: $var is empty; set it in .env (see .env.example)" >&2
    exit 1
  fi
done

config="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$config")"
# configparser treats % as the start of an interpolation: a percent-encoded password must be doubled.
cat >"$config" <<EOF
[mlflow]
# Requests without credentials are always refused (401). An authenticated user with no grant on a resource
# gets this: nothing. docker/mlflow-init.py grants the service and read-only users what they may do.
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_AUTH_DATABASE_URI//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Each request carries the password, and checking its hash costs far more than the request itself; a worker
# remembers a good check this long. A changed or revoked password still works for up to that long on the
# workers that did not handle the change.
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config"

# The browser may reach the server under another name (a TLS proxy): MLFLOW_ALLOWED_HOSTS lists them.
exec mlflow server --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-1}" \
  ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"} \
  "$@"
