#!/usr/bin/env bash
# Run this pod's TorchServe in the foreground (the container's main process, under tini -g).
# It binds 127.0.0.1 with its own token authorization off (config.properties): nginx, in the
# same pod, is what listens on the pod IP. The root filesystem is read-only: TorchServe's working
# folder, logs, pid file and unpacked archives live on the /tmp emptyDir.
# Environment (set by statefulset.yaml):
#   POD_NAME      the pod's name (downward API), e.g. ts-0
#   TS_CONFIG     config.properties from the ConfigMap   MODEL_STORE  the model store volume
#   TS_MODELS     archives of the store to load at start, space-separated (the ts-models ConfigMap)
#   LOG_LOCATION  TorchServe's log folder
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
: "${POD_NAME:?POD_NAME must be set from metadata.name}"
: "${TS_CONFIG:?TS_CONFIG must name config.properties}"
: "${MODEL_STORE:?MODEL_STORE must name the model store}"
[ -f "$TS_CONFIG" ] || die "config not found: $TS_CONFIG"
[ -d "$MODEL_STORE" ] || die "model store not found: $MODEL_STORE"

read -ra models <<<"${TS_MODELS:-}"
for mar in "${models[@]}"; do
    [ -f "$MODEL_STORE/$mar" ] || die "$mar (TS_MODELS) is not in the model store $MODEL_STORE"
done

work="${TMPDIR:-/tmp}/torchserve"
mkdir -p "$work" "${LOG_LOCATION:-$work/logs}"
rm -f "${TMPDIR:-/tmp}/.model_server.pid"  # /tmp (an emptyDir) outlives a container restart
cd "$work"  # TorchServe writes into its working folder; the image's /app is read-only

echo "start-torchserve: $POD_NAME, models: ${models[*]:-none}"
# `torchserve --foreground` is a Python launcher waiting on the Java frontend. tini -g sends
# SIGTERM to the whole process group; the launcher ignores it (a handler, not SIG_IGN, which Java
# would inherit) so it keeps waiting while the frontend shuts down its workers, then exits with it.
exec python -c 'import signal, sys
signal.signal(signal.SIGTERM, lambda *_: None)
sys.argv[0] = "torchserve"
from ts.model_server import start
start()' --foreground --ncs --ts-config "$TS_CONFIG" --model-store "$MODEL_STORE" \
    ${models[@]+--models "${models[@]}"}
