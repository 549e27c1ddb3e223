#!/usr/bin/env bash
# Fills every empty secret of a .env file (made from .env.example) with a random hex value, and leaves
# values already set alone, so it is safe to rerun.   usage: docker/generate-env.sh [.env]
set -euo pipefail
env_file="${1:-.env}"
example="$(dirname "$0")/../.env.example"
[[ -f "$env_file" ]] || cp "$example" "$env_file"
chmod 600 "$env_file"

# Hex: safe inside URLs and never mistaken for a command-line flag.
random() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
fernet() { python3 -c "import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"; }

# Every secret of .env.example; the two MinIO user names too, for a .env made from an older .env.example.
for var in POSTGRES_PASSWORD MLFLOW_DB_PASSWORD FASHION_TAGGER_DB_PASSWORD REDIS_PASSWORD MINIO_ROOT_USER \
           MINIO_ROOT_PASSWORD MINIO_MLFLOW_USER MINIO_MLFLOW_PASSWORD MINIO_WORKER_USER MINIO_WORKER_PASSWORD \
           MLFLOW_ADMIN_PASSWORD MLFLOW_SERVICE_PASSWORD MLFLOW_READER_PASSWORD MLFLOW_FLASK_SECRET_KEY \
           AIRFLOW_FERNET_KEY AIRFLOW_JWT_SECRET AIRFLOW_API_SECRET_KEY AIRFLOW_ADMIN_PASSWORD; do
  if grep -Eq "^${var}=.+" "$env_file"; then
    continue
  fi
  case "$var" in
    AIRFLOW_FERNET_KEY) value="$(fernet)" ;;
    # 64 bytes: Airflow signs its tokens with HS512.
    AIRFLOW_JWT_SECRET) value="$(random 32)" ;;
    MINIO_ROOT_USER) value="minio-$(random 4)" ;;
    MINIO_MLFLOW_USER) value="mlflow-artifacts" ;;
    MINIO_WORKER_USER) value="fashion-tagger-worker" ;;
    *) value="$(random 20)" ;;
  esac
  if grep -Eq "^${var}=" "$env_file"; then
    sed -i "s|^${var}=.*|${var}=${value}|" "$env_file"
  else
    echo "${var}=${value}" >>"$env_file"
  fi
  echo "generated ${var}"
done
