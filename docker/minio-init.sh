#!/bin/sh
# Run by the minio-init service, the only holder of MinIO's root credentials: makes the three buckets and one
# user per client, each limited to what it does. Idempotent: `mc admin user add` sets the password of an
# existing user, so rotating one is editing .env and running this again (docs/deploy.md).
#   MINIO_MLFLOW_USER  the MLflow server (--serve-artifacts): read and write in MLFLOW_BUCKET only
#   MINIO_WORKER_USER  every Airflow worker: read and write in HOME_BUCKET (the fashion-tagger home), read
#                      DATA_BUCKET (dataset sources for fetch_dataset); nothing else
set -eu

for var in MINIO_ROOT_USER MINIO_ROOT_PASSWORD MLFLOW_BUCKET DATA_BUCKET HOME_BUCKET MINIO_MLFLOW_USER \
           MINIO_MLFLOW_PASSWORD MINIO_WORKER_USER MINIO_WORKER_PASSWORD; do
  eval "value=\${$var:-}"
  if [ -z "$value" ]; then
    echo "minio-init: $var is empty; set it in .env (see .env.example)" >&2
    exit 1
  fi
done

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$MLFLOW_BUCKET" "local/$DATA_BUCKET" "local/$HOME_BUCKET"

policies="$(mktemp -d)"
cat >"$policies/mlflow-artifacts.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$MLFLOW_BUCKET"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$MLFLOW_BUCKET/*"]}
  ]
}
JSON
# Deleting is allowed in the home: publication replaces objects and removes a killed writer's leftovers.
cat >"$policies/fashion-tagger-worker.json" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow",
     "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
     "Resource": ["arn:aws:s3:::$HOME_BUCKET"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$HOME_BUCKET/*"]},
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$DATA_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["arn:aws:s3:::$DATA_BUCKET/*"]}
  ]
}
JSON

# A second attach of the same policy fails with "already in effect": that is the state we want.
attach() {
  if ! output="$(mc admin policy attach local "$1" --user "$2" 2>&1)"; then
    case "$output" in
      *"already in effect"*) ;;
      *) echo "$output" >&2; exit 1 ;;
    esac
  fi
}

for pair in "mlflow-artifacts:$MINIO_MLFLOW_USER:$MINIO_MLFLOW_PASSWORD" \
            "fashion-tagger-worker:$MINIO_WORKER_USER:$MINIO_WORKER_PASSWORD"; do
  policy="${pair%%:*}"; rest="${pair#*:}"; user="${rest%%:*}"; password="${rest#*:}"
  mc admin policy create local "$policy" "$policies/$policy.json"
  mc admin user add local "$user" "$password"
  attach "$policy" "$user"
  echo "minio-init: $user has policy $policy"
done
rm -rf "$policies"
mc ls local
