#!/usr/bin/env bash
# One-shot setup run by the airflow-init service before any other Airflow component starts: migrate the
# metadata DB, create the admin user and the `gpu` pool. Idempotent: `docker compose up` runs it on every start.
# It runs as AIRFLOW_UID like every Airflow container, never as root.
set -euo pipefail

for var in AIRFLOW_UID AIRFLOW_ADMIN_USERNAME AIRFLOW_ADMIN_PASSWORD GPU_POOL_SLOTS; do
  if [[ -z "${!var:-}" ]]; then
    echo "airflow-init: $var is empty; set it in .env (see .env.example)" >&2
    exit 1
  fi
done

# A new named volume takes the owner and mode of the image's folder: group 0, group-writable (see
# docker/airflow.Dockerfile), so any AIRFLOW_UID in group 0 can write it and nothing needs chown. The workers'
# scratch volumes are made from /opt/fashion-tagger-scratch the same way.
for dir in /opt/airflow/logs; do
  if [[ ! -w "$dir" ]]; then
    echo "airflow-init: $dir is not writable by uid $(id -u) gid $(id -g) ($(stat -c '%U:%G %A' "$dir"));" \
      "give it to group 0 once: docker compose run --rm --user 0 --entrypoint chmod airflow-init -R g+rwX $dir" >&2
    exit 1
  fi
done

# The official entrypoint migrates the DB (_AIRFLOW_DB_MIGRATE) and creates the user (_AIRFLOW_WWW_USER_CREATE)
# before running the command it is given.
_AIRFLOW_DB_MIGRATE=true _AIRFLOW_WWW_USER_CREATE=true \
  _AIRFLOW_WWW_USER_USERNAME="${AIRFLOW_ADMIN_USERNAME}" _AIRFLOW_WWW_USER_PASSWORD="${AIRFLOW_ADMIN_PASSWORD}" \
  /entrypoint airflow version

# One slot per GPU: train_model and evaluate_model run in this pool, so two trainings never share a device.
/entrypoint airflow pools set gpu "${GPU_POOL_SLOTS}" "one slot per GPU on the gpu-queue workers"
