#!/usr/bin/env bash
# Run this pod's TorchServe in the foreground (the container's main process, under tini -g).
# Its working folder is $TS_KEY_ROOT/$POD_NAME on the shared key volume, so the key_file.json it
# writes at start is where the fleet file tells clients to read it (deploy/kubernetes/make_fleet.py).
# Environment (set by statefulset.yaml):
#   POD_NAME      the pod's name (downward API), e.g. ts-0
#   TS_CONFIG     config.properties from the ConfigMap   MODEL_STORE  the model store volume
#   TS_MODELS     archives of the store to load at start, space-separated (the ts-models ConfigMap)
#   TS_KEY_ROOT   the key volume [/keys]                 LOG_LOCATION TorchServe's log folder
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

key_dir="${TS_KEY_ROOT:-/keys}/$POD_NAME"
mkdir -p "$key_dir" || die "cannot create $key_dir: the key volume must be writable by uid $(id -u) or gid $(id -g)"
chmod 0700 "$key_dir"  # TorchServe writes the file 0600; the folder stays private to the same uid
rm -f "$key_dir/key_file.json"  # a previous container's keys: clients must not use them
mkdir -p "${LOG_LOCATION:-/tmp/torchserve/logs}"
rm -f "${TMPDIR:-/tmp}/.model_server.pid"  # /tmp (an emptyDir) outlives a container restart
cd "$key_dir"  # TorchServe writes key_file.json in its working folder

echo "start-torchserve: $POD_NAME, keys in $key_dir, models: ${models[*]:-none}"
# `torchserve --foreground` is a Python launcher waiting on the Java frontend. tini -g sends
# SIGTERM to the whole process group; the launcher ignores it (a handler, not SIG_IGN, which Java
# would inherit) so it keeps waiting while the frontend shuts down its workers, then exits with it.
exec python -c 'import signal, sys
signal.signal(signal.SIGTERM, lambda *_: None)
sys.argv[0] = "torchserve"
from ts.model_server import start
start()' --foreground --ncs --ts-config "$TS_CONFIG" --model-store "$MODEL_STORE" \
    ${models[@]+--models "${models[@]}"}
