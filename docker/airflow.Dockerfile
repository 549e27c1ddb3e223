# Airflow image for the control plane (api-server, scheduler, dag-processor, triggerer) and the
# default-queue Celery worker: the official image plus fashion-tagger with the CPU build of torch,
# so that no CUDA library is ever loaded next to the scheduler (apache/airflow#19701).
#
#   docker build -f docker/airflow.Dockerfile -t fashion-tagger-airflow .
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# PyTorch's CPU-only wheel index: the same torch API, none of the CUDA wheels (several GB smaller).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Numeric users: 0 is root, 50000 the image's `airflow`. The scratch folder is group 0 and group-writable, so a
# new volume mounted there can be written by any AIRFLOW_UID (they all run in group 0) without a chown as root.
USER 0
RUN mkdir -p /opt/fashion-tagger /opt/fashion-tagger-scratch \
    && chown -R 50000:0 /opt/fashion-tagger /opt/fashion-tagger-scratch \
    && chmod 2775 /opt/fashion-tagger-scratch
USER 50000

# torch first, in its own layer: editing the project must not download it again.
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/fashion-tagger
COPY --chown=50000:0 pyproject.toml README.md ./
COPY --chown=50000:0 fashion_tagger ./fashion_tagger
# Pinning apache-airflow keeps pip from moving the image's own Airflow while it resolves the project.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" "/opt/fashion-tagger[airflow]" \
    && python -c "import torch; assert not torch.version.cuda, 'the Airflow image must carry the CPU build of torch'"

COPY --chown=50000:0 docker/airflow-init.sh /opt/fashion-tagger/docker/airflow-init.sh
# DAGs are baked in so that a worker on another machine needs nothing but the image;
# docker-compose.yaml bind-mounts ./dags over them for development.
COPY --chown=50000:0 dags /opt/airflow/dags
# Under a KubernetesExecutor: imports the kubernetes client before the API server answers (see the file).
COPY --chown=50000:0 docker/airflow-plugins /opt/airflow/plugins

# The home (FASHION_TAGGER_HOME=s3://...) and its credentials come from the deployment; this is the local cache.
ENV FASHION_TAGGER_SCRATCH=/opt/fashion-tagger-scratch
WORKDIR /opt/airflow
