# The two images of deploy/kubernetes, from the repository root (docs/kubernetes.md, "Images"):
#   docker build --target server -t REGISTRY/ts-batch-classify-server:0.1.0 .
#   docker build --target client -t REGISTRY/ts-batch-classify-client:0.1.0 .
# `make test-images` builds both here with podman and runs them as the manifests declare
# (scripts/images.sh, tests/images/).
# server: TorchServe, its workers' packages, nginx and the probe (the replica pods; nginx's
# configuration comes from a ConfigMap made of deploy/nginx).
# client: the classifier and rollout commands only, no torch, no Java (the Jobs).
# Each installs its lock (requirements-server.lock, requirements-client.lock: written by
# deploy/lock.py from the tested .venv, every package pinned with its hash; tests/test_lock.py
# fails when a lock and .venv differ), so an image never runs a version the tests did not.
# Debian 12 (bookworm) because it packages the Java 17 runtime TorchServe 0.12 is tested with.
# BASE: the digest pins the base image (update it and the tag together); where it cannot be pulled
# (no container registry reachable), scripts/images.sh builds a stand-in from Debian's packages
# and passes it here. A build machine that intercepts TLS passes its CA bundle as the build secret
# `ca` (`--secret id=ca,src=FILE`): mounted for pip's run only, never written into a layer.
ARG BASE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
# checkov:skip=CKV_DOCKER_7: BASE defaults to a tag pinned by digest (the ARG above); a stand-in is passed only by scripts/images.sh
FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/dev/null \
    PYTHONPATH=/app \
    PATH=/app/.venv/bin:$PATH
# A high uid/gid (above the host's usual range), the same in both images and every pod.
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app
RUN python -m venv /app/.venv
# pip with the build secret `ca` as its CA bundle when one is given.
RUN printf '#!/bin/sh\n[ -s /run/secrets/ca ] && export PIP_CERT=/run/secrets/ca\nexec pip install --no-deps --require-hashes "$@"\n' \
        >/usr/local/bin/pip-locked && chmod 755 /usr/local/bin/pip-locked

FROM base AS client
# What core/, client/ and handler/preprocessing.py import (no torch: the client decodes with PIL/numpy),
# and matplotlib for --class-folders' confusion matrix (deploy/lock.py names the roots).
COPY requirements-client.lock .
RUN --mount=type=secret,id=ca pip-locked -r requirements-client.lock
COPY core/ core/
COPY client/ client/
COPY handler/ handler/
COPY scripts/classify_dir.py scripts/manage.py scripts/merge_shards.py scripts/report.py scripts/
COPY deploy/kubernetes/make_fleet.py deploy/kubernetes/publish_mar.py deploy/kubernetes/
# matplotlib's cache on the Jobs' /tmp volume (the root filesystem is read-only, there is no home).
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
# A batch command, not a server: nothing to check while it runs.
HEALTHCHECK NONE
ENTRYPOINT ["python"]

FROM base AS server
# NVIDIA_DRIVER_CAPABILITIES: TorchServe counts GPUs with nvidia-smi, which the NVIDIA
# container runtime mounts only with "utility".
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Java 17 for TorchServe's frontend, nginx in front of it (with its stream module, which bounds
# each client address's connections: deploy/nginx), tini as PID 1 to pass signals to the whole
# process group, procps for `kill`: TorchServe stops a worker by running `kill -9 PID` (without it
# every scale-down and unregister answers 500). The man1 folder: the JRE's post-install step links
# manual pages there.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless nginx libnginx-mod-stream tini procps \
    && rm -rf /var/lib/apt/lists/*
# What the workers import (torch's Linux wheels are CUDA builds, ~5.5 GB), and the probe's requests.
COPY requirements-server.lock .
RUN --mount=type=secret,id=ca pip-locked -r requirements-server.lock
COPY handler/ handler/
COPY core/ core/
COPY deploy/kubernetes/start-torchserve.sh deploy/kubernetes/probe.py deploy/kubernetes/
USER 10001:10001
# For `docker run`; Kubernetes uses the pod's own probes (deploy/kubernetes/statefulset.yaml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s CMD ["python", "/app/deploy/kubernetes/probe.py", "live"]
ENTRYPOINT ["tini", "-g", "--"]
CMD ["bash", "/app/deploy/kubernetes/start-torchserve.sh"]
