#!/usr/bin/env bash
# Idempotent set-up: Java >= 11 for TorchServe's frontend, Debian's nginx (the front proxy of the
# pods and of scripts/front_proxy.sh), Debian's prometheus and chromium (the observability tests),
# .venv with the pinned runtime and test requirements and this project installed editable, and
# .venv-checkov with the manifest scanner the tests run. A stamp keyed on the requirement lists and
# pyproject.toml makes a rerun a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

java_major() {
    java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1") ? v[2] : v[1]; exit}'
}
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 11 ]; then
    echo "install: Java >= 11 not found; installing openjdk-17-jre-headless"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless
fi

# nginx: the maintained component in front of TorchServe (docs/security.md). Installed, not
# started: front_proxy.sh runs its own instance; where an init system runs Debian's default
# nginx service after the install, `systemctl disable --now nginx` stops it (it serves a static page).
# Its stream module (libnginx-mod-stream) bounds each client address's connections before a
# request header is read (deploy/nginx/nginx.conf.template).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "install: nginx not found; installing Debian's nginx and its stream module"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nginx libnginx-mod-stream
elif [ ! -f /usr/lib/nginx/modules/ngx_stream_module.so ] \
        && "$(command -v nginx || echo /usr/sbin/nginx)" -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
    echo "install: nginx's stream module not found; installing Debian's libnginx-mod-stream"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libnginx-mod-stream
fi

# Prometheus (promtool checks deploy/monitoring's rules; the tests start a real Prometheus that
# scrapes a real TorchServe) and Chromium (the tests open the batch report headless): Debian's
# packages, installed, never started here. Debian's prometheus package may start its own service
# where an init system runs: `systemctl disable --now prometheus` stops it.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
    echo "install: installing Debian's ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Checkov in its own venv: its pins (packaging 23.2, networkx 2.6.3) would downgrade torch's.
CHECKOV="checkov==3.3.30"
[ -x .venv-checkov/bin/python ] || "$PY" -m venv .venv-checkov
stamp=".venv/.requirements-$(cat requirements.txt requirements-test.txt constraints.txt pyproject.toml <(echo "$CHECKOV") \
    | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -x .venv-checkov/bin/checkov ]; then
    echo "install: .venv is up to date"
    exit 0
fi
# PIP_CONFIG_FILE=/dev/null: a machine-wide pip config may carry a constraint
# file that caps torch below the pinned release; the pins here are the truth.
# constraints.txt: every package of the tested .venv (deploy/lock.py), so a new .venv equals the one
# the images' locks were written from, whatever was released since.
PIP_CONFIG_FILE=/dev/null .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
PIP_CONFIG_FILE=/dev/null .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-test.txt -c constraints.txt
PIP_CONFIG_FILE=/dev/null .venv-checkov/bin/pip install --quiet --disable-pip-version-check "$CHECKOV"
# The project itself, editable: its packages (client, handler, training, benchmarks) import from
# anywhere, with no sys.path edits, and pyproject.toml's console scripts land in .venv/bin.
PIP_CONFIG_FILE=/dev/null .venv/bin/pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e .
rm -f .venv/.requirements-*
touch "$stamp"
echo "install: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
