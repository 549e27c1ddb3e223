#!/usr/bin/env bash
# Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d): MLflow gets its own
# role and database beside Airflow's metadata DB, so either can be backed up or moved on its own, and a second
# database, mlflow_auth, for the users and grants of its authentication (docker/mlflow-server.sh).
# A volume made before mlflow_auth existed needs it once by hand (docs/deploy.md, *MLflow users*).
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
