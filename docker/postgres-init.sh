#!/usr/bin/env bash
# Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d): beside Airflow's metadata DB,
# - MLflow's own role and database, and a second database, mlflow_auth, for the users and grants of its
#   authentication (docker/mlflow-server.sh);
# - fashion-tagger's coordination database (run and stage state, leases, test-part membership) with its own role,
#   which the workers reach as FASHION_TAGGER_DATABASE_URL; its tables are made by the library's migrations.
# So each can be backed up, moved or have its password rotated on its own. A volume made before one of these
# existed needs it once by hand (docs/deploy.md, *MLflow users* and *The coordination database*).
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in .env}"
: "${FASHION_TAGGER_DB_PASSWORD:?set FASHION_TAGGER_DB_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" -v fashion_tagger_password="$FASHION_TAGGER_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE ROLE fashion_tagger LOGIN PASSWORD :'fashion_tagger_password';
CREATE DATABASE fashion_tagger OWNER fashion_tagger;
REVOKE ALL ON DATABASE fashion_tagger FROM PUBLIC;
SQL
