# MLflow tracking server and model registry: Postgres as the backend store (psycopg2) and an S3 bucket
# (MinIO) behind --serve-artifacts (boto3), so clients never need the bucket's credentials.
#
#   docker build -f docker/mlflow.Dockerfile -t fashion-tagger-mlflow .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" \
    && useradd --create-home --uid 1000 mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# The flags (backend store, artifact destination, allowed hosts) come from docker-compose.yaml.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
