# The image every pod of deploy/kubernetes runs: TorchServe replicas, their auth proxy, the
# classification Job and the toolbox. Build from the repository root:
#   docker build -t REGISTRY/ts-batch-classify:0.1.0 .
# Debian 12 (bookworm) because it packages the Java 17 runtime TorchServe 0.12 is tested with.
FROM python:3.11-slim-bookworm

# NVIDIA_DRIVER_CAPABILITIES: TorchServe counts GPUs with nvidia-smi, which the NVIDIA
# container runtime mounts only with "utility".
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/dev/null \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Java 17 for TorchServe's frontend; tini as PID 1 to pass SIGTERM to the whole process group.
# The man1 folder: the JRE's post-install step links manual pages there, and slim images lack it.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --user-group app

WORKDIR /app
# Dependencies first, so that a code change does not reinstall torch (a CUDA build, ~5.5 GB).
# The venv sits where the repository's scripts look for it (.venv beside them).
COPY requirements.txt .
RUN python -m venv /app/.venv \
    && /app/.venv/bin/pip install -r requirements.txt
ENV PATH=/app/.venv/bin:$PATH

# The repository (.dockerignore leaves out .venv, runs, logs, data, archives and keys).
COPY . .
# The project itself (client, handler, training): importable by every command, probe and proxy.
RUN /app/.venv/bin/pip install --no-deps --no-build-isolation -e .
# The model store is a mounted volume; the folder is its mount point.
RUN mkdir -p /app/model_store

USER 1000:1000
ENTRYPOINT ["tini", "-g", "--"]
CMD ["bash", "/app/deploy/kubernetes/start-torchserve.sh"]
