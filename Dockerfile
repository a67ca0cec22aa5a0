# modelmesh-sidecar: a drop-in image for ModelMesh's runtime adapter and model puller.
#
#   docker build -t modelmesh-sidecar .
#
# The controller starts the adapter container as /opt/app/<serverType>-adapter and the
# storage helper as /opt/app/puller; both are here. How to configure and run it, and what
# the image weighs: docs/deploy.md.
#
# Without a Docker engine, tests/deploy/ checks this file: it is parsed
# (test_dockerfile.py) and the RUN steps of the build stage are replayed into a temporary
# folder, where every /opt/app command is started (test_image_install.py). Keep the
# paths /opt/venv, /opt/app and /wheels literal: the replay maps them.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a wheel of the project, installed with its dependencies into /opt/venv ----
FROM ${PYTHON_IMAGE} AS build

# Storage SDKs to install (extras of modelmesh-sidecar); the default serves every storage
# type we ship. Build with --build-arg EXTRAS=s3 for a smaller image.
ARG EXTRAS=s3,gcs,azure

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapter/ adapter/
COPY runtimes/ runtimes/
COPY puller/ puller/
COPY protos/ protos/

# Every dependency has a binary wheel for CPython 3.11 on linux (amd64 and arm64), so no
# compiler is needed here either. The venv gets no pip or setuptools of its own: the base
# image's pip installs into it (--python), and only what the sidecar imports is copied on.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && wheel="$(ls /wheels/modelmesh_sidecar-*.whl)" \
 && python -m pip --python /opt/venv/bin/python install "${wheel}[${EXTRAS}]"

# The controller's commands: each adapter is a link to mesh-adapter, which takes the
# runtime from the name it was started under; the puller runs `mesh-puller serve`.
RUN mkdir -p /opt/app \
 && ln -s /opt/venv/bin/mesh-adapter /opt/app/mlserver-adapter \
 && ln -s /opt/venv/bin/mesh-adapter /opt/app/triton-adapter \
 && ln -s /opt/venv/bin/mesh-adapter /opt/app/torchserve-adapter \
 && ln -s /opt/venv/bin/mesh-adapter /opt/app/ovms-adapter \
 && printf '#!/bin/sh\nexec /opt/venv/bin/mesh-puller serve "$@"\n' > /opt/app/puller \
 && chmod 0755 /opt/app/puller

# ---- final: the interpreter, the venv and the commands; no compiler, no pip cache ----
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="modelmesh-sidecar" \
      org.opencontainers.image.description="ModelMesh runtime adapter and model puller (mmesh.ModelRuntime), drop-in for modelmesh-runtime-adapter" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# uid 2000 in group 0: OpenShift runs the container as an arbitrary uid that is always
# in group 0, so everything the sidecar writes is owned by group 0 and group-writable.
# HOME is not under ROOT_MODEL_DIR: the adapter clears that folder before its first READY.
RUN useradd --uid 2000 --gid 0 --home-dir /home/sidecar --create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /models /storage-config /pvc_mounts \
 && chown 2000:0 /models /storage-config /pvc_mounts /home/sidecar \
 && chmod 0775 /models /storage-config /pvc_mounts /home/sidecar

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/app /opt/app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sidecar \
    ROOT_MODEL_DIR=/models \
    STORAGE_CONFIG_DIR=/storage-config \
    PVC_MOUNTS_DIR=/pvc_mounts

USER 2000:0
WORKDIR /home/sidecar

# 8085: the adapter (ADAPTER_PORT); 8084: the standalone puller (PORT; the controller
# sets 8086); 8087: Prometheus /metrics when started with METRICS_PORT=8087 (off by
# default; one process per port, so a puller in the same pod needs another).
EXPOSE 8085 8084 8086 8087

# The controller always gives the command; started bare, the image says how to use it.
CMD ["mesh-adapter", "--help"]
