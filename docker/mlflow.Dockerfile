# MLflow tracking server and model registry with its authentication app (mlflow[auth]): Postgres as the backend
# store and the user store (psycopg2), an S3 bucket (MinIO) behind --serve-artifacts (boto3), so clients never
# need the bucket's credentials. Every Python package is pinned by the project's constraints.txt.
#
#   docker build -f docker/mlflow.Dockerfile -t fashion-tagger-mlflow:0.1.0 .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.8
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt "mlflow[auth]==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" "boto3==${BOTO3_VERSION}" \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 1000 mlflow

# The server's launcher (writes the auth app's settings from the environment) and the one-shot that makes the
# users; docker-compose.yaml runs them as the `mlflow` and `mlflow-init` services.
COPY --chmod=755 docker/mlflow-server.sh /usr/local/bin/mlflow-server
COPY --chmod=644 docker/mlflow-init.py /opt/mlflow/mlflow-init.py
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow-server"]
