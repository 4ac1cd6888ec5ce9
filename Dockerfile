# syntax=docker/dockerfile:1
# GSA-Serve serving images: the service on ONNX Runtime, no torch, no training code.
#
#   docker build -t gsa-serve:cpu .                           onnxruntime on python:3.12-slim
#   docker build -t gsa-serve:gpu --build-arg VARIANT=gpu .   onnxruntime-gpu on the CUDA runtime
#   docker build -t gsa-serve:cpu-models --build-arg MODELS=models .   models/ baked in at /models
#   docker build -t gsa-serve:cpu-ray --build-arg WITH_RAY=1 .   with Ray Serve (deploy/rayservice.yaml)
#
# Without MODELS, /models is empty: mount a model repository there read-only (docker-compose.yml
# does). The environment is built by deploy/install-serve.sh, which tests/deploy run the same way.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# onnxruntime-gpu on PyPI (1.31) is built for CUDA 13 and cuDNN 9; keep this image on the same major
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- bases: the Python that builds the environment is the one that runs it ----------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV SERVE_EXTRA=serve

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu's python3 (3.12 on 24.04); package versions follow the base image's pinned release
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV SERVE_EXTRA=serve-gpu

# ---- build: the virtualenv at /opt/venv ---------------------------------------------------------
# base-${VARIANT} is one of the stages above, tagged there
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
# any value adds the `ray` extra (Ray Serve, for python -m service.cluster and KubeRay)
ARG WITH_RAY=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/install-serve.sh deploy/
COPY gsa_contract/ gsa_contract/
COPY service/ service/
RUN --mount=type=cache,target=/root/.cache/pip sh deploy/install-serve.sh /opt/venv "$SERVE_EXTRA${WITH_RAY:+,ray}"

# ---- serve: the environment, a non-root user, the models -----------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS serve
ARG MODELS=deploy/no-models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GSA_HOST=0.0.0.0 \
    GSA_PORT=8000 \
    GSA_MODEL_DIR=/models \
    GSA_JOBS_DIR=/var/lib/gsa/jobs \
    GSA_GRACEFUL_SHUTDOWN_S=30
# /var/lib/gsa holds job data (GSA_JOBS_DIR); a fresh named volume mounted there takes this owner
RUN groupadd --gid 10001 gsa \
 && useradd --uid 10001 --gid gsa --home-dir /var/lib/gsa --no-create-home --shell /usr/sbin/nologin gsa \
 && install -d -o gsa -g gsa -m 0750 /var/lib/gsa
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/gsa-healthcheck
COPY ${MODELS}/ /models/
USER 10001:10001
WORKDIR /var/lib/gsa
EXPOSE 8000
# uvicorn drains on SIGTERM: no new connections, in-flight requests get GSA_GRACEFUL_SHUTDOWN_S,
# then the batchers finish their queues. Give `docker stop` longer (--stop-timeout 40; compose
# sets stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/gsa-healthcheck"]
CMD ["python", "-m", "service"]
