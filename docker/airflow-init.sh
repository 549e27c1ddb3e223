#!/usr/bin/env bash
# One-shot setup run by the airflow-init service before any other Airflow component starts: migrate the
# metadata DB, create the admin user and the `gpu` pool. Idempotent: `docker compose up` runs it on every start.
set -euo pipefail

for var in AIRFLOW_UID AIRFLOW_ADMIN_USERNAME AIRFLOW_ADMIN_PASSWORD GPU_POOL_SLOTS; do
  if [[ -z "${!var:-}" ]]; then
    echo "airflow-init: $var is empty; set it in .env (see .env.example)" >&2
    exit 1
  fi
done

# Named volumes are created root-owned; the Airflow processes run as AIRFLOW_UID with group 0, and create
# everything below these folders themselves (not recursive: the data volume may hold a large image cache).
mkdir -p /opt/airflow/logs /opt/fashion-tagger-data
chown "${AIRFLOW_UID}:0" /opt/airflow/logs /opt/fashion-tagger-data

# The official entrypoint migrates the DB (_AIRFLOW_DB_MIGRATE) and creates the user (_AIRFLOW_WWW_USER_CREATE)
# before running the command it is given.
_AIRFLOW_DB_MIGRATE=true _AIRFLOW_WWW_USER_CREATE=true \
  _AIRFLOW_WWW_USER_USERNAME="${AIRFLOW_ADMIN_USERNAME}" _AIRFLOW_WWW_USER_PASSWORD="${AIRFLOW_ADMIN_PASSWORD}" \
  /entrypoint airflow version

# One slot per GPU: train_model and evaluate_model run in this pool, so two trainings never share a device.
/entrypoint airflow pools set gpu "${GPU_POOL_SLOTS}" "one slot per GPU on the gpu-queue workers"
