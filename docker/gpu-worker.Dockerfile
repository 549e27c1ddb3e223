# Celery worker for the `gpu` queue: the official Airflow image plus fashion-tagger with a CUDA build
# of torch. Only train_model and evaluate_model are routed here; they start training as a child
# process, so CUDA is initialised in a fresh interpreter, never in a forked Celery process.
#
#   docker build -f docker/gpu-worker.Dockerfile -t fashion-tagger-gpu-worker .
# The host needs an NVIDIA driver and the NVIDIA Container Toolkit; the CUDA runtime comes in the wheels.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# PyPI, whose Linux torch wheels bundle the newest CUDA runtime. For an older host driver point this at a
# PyTorch CUDA wheel index (cu126, cu128, ...) matching it.
ARG TORCH_INDEX_URL=https://pypi.org/simple

# Numeric users: 0 is root, 50000 the image's `airflow`. The scratch folder is group 0 and group-writable, so a
# new volume mounted there can be written by any AIRFLOW_UID (they all run in group 0) without a chown as root.
USER 0
RUN mkdir -p /opt/fashion-tagger /opt/fashion-tagger-scratch \
    && chown -R 50000:0 /opt/fashion-tagger /opt/fashion-tagger-scratch \
    && chmod 2775 /opt/fashion-tagger-scratch
USER 50000

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/fashion-tagger
COPY --chown=50000:0 pyproject.toml README.md ./
COPY --chown=50000:0 fashion_tagger ./fashion_tagger
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" "/opt/fashion-tagger[airflow]" \
    && python -c "import torch; assert torch.version.cuda, 'the gpu worker needs a CUDA build of torch'"

COPY --chown=50000:0 dags /opt/airflow/dags
# Under a KubernetesExecutor: imports the kubernetes client before the API server answers (see the file).
COPY --chown=50000:0 docker/airflow-plugins /opt/airflow/plugins

# The home (FASHION_TAGGER_HOME=s3://...) and its credentials come from the deployment; this is the local cache.
ENV FASHION_TAGGER_SCRATCH=/opt/fashion-tagger-scratch \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/airflow
# The official entrypoint prefixes `airflow`; one task at a time per GPU (the `gpu` pool has one slot per GPU).
CMD ["celery", "worker", "--queues", "gpu", "--concurrency", "1"]
