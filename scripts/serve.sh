#!/usr/bin/env bash
# Start, stop or inspect this repository's TorchServe (0.12.0) on 127.0.0.1.
#   scripts/serve.sh start [MAR...]  start with config.properties, load the given archives of the
#                                    model store, wait until every model has a READY worker
#   scripts/serve.sh stop            stop the server started from this log folder (by its pid)
#                                    and wait until its ports are free
#   scripts/serve.sh status          models, versions, the default version and workers
# Environment, so that a second server can run beside the first (defaults from config.properties):
#   TS_INFERENCE_PORT TS_MANAGEMENT_PORT TS_METRICS_PORT TS_GRPC_INFERENCE_PORT
#   TS_GRPC_MANAGEMENT_PORT TS_WORKER_PORT   MODEL_STORE [model_store/]
#   TS_LOG_DIR [logs/]: logs, the derived config and the state (pid, ports) of one server
#   TS_TMPDIR [$TS_LOG_DIR/tmp]: TMPDIR of torchserve (its pid file) and its workers' sockets
#   TS_KEY_DIR [repository root]: where torchserve runs, so where key_file.json is written
#   TS_START_TIMEOUT [180] seconds `start` waits;  TS_CONFIG [config.properties]
#   TS_TOKEN_AUTH [on]: `off` turns TorchServe's own token authorization off, only for a server
#                  behind scripts/front_proxy.sh (nginx checks the tokens); key_file.json is then
#                  written as {} (no keys), so clients of this server send none
set -euo pipefail

die() { echo "error: $1" >&2; exit "${2:-2}"; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY="$REPO/.venv/bin/python"
USAGE="usage: scripts/serve.sh start [MAR...] | stop | status"

# Relative paths in the environment are the caller's; resolve them before any cd.
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
CONFIG=$(abs "${TS_CONFIG:-$REPO/config.properties}")
LOG_DIR=$(abs "${TS_LOG_DIR:-$REPO/logs}")
STATE="$LOG_DIR/serve.state"  # pid, ports and paths of the running server, for stop and status

prop() {  # the last value of a key in config.properties
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$CONFIG" | tail -n 1
}
port_of() { local v; v=$(prop "$1"); v=${v##*:}; printf '%s\n' "${v%%/*}"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
is_torchserve() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q "$2"; }

size_of() { stat -c %s "$1" 2>/dev/null || echo 0; }
since() { tail -c "+$(($2 + 1))" "$1" 2>/dev/null || true; }  # a log's lines written after offset $2

explain() {  # this start's distinct error lines of the workers and the frontend, without timestamps
    { since "$LOG_DIR/model_log.log" "$model_log_offset" | grep -E 'Error|Exception|died|[Ff]ailed'
      since "$LOG_DIR/ts_log.log" "$ts_log_offset" | grep -E '\[(WARN|ERROR) ?\]'; } \
        | sed -E 's/^[0-9T:,-]+ //' | grep -vE 'nvidia-smi|xpu-smi|InterruptedException|Traceback' \
        | awk '!seen[$0]++' | tail -n 20 || true
    if ! kill -0 "$1" 2>/dev/null; then  # the frontend itself exited: its console says why
        echo "--- TorchServe exited; the end of $LOG_DIR/torchserve.out:"
        tail -n 15 "$LOG_DIR/torchserve.out"
    fi
}

load_state() {
    [ -f "$STATE" ] || return 1
    # shellcheck disable=SC1090
    source "$STATE"
}

start() {
    [ -f "$CONFIG" ] || die "config not found: $CONFIG"
    [ -x "$REPO/.venv/bin/torchserve" ] || die "$REPO/.venv/bin/torchserve not found; run 'make install'"
    command -v java >/dev/null 2>&1 \
        || die "java not found on PATH; TorchServe's frontend needs Java >= 11 ('make install')"
    "$PY" -c "import yaml" 2>/dev/null \
        || die "PyYAML missing from .venv: every worker would die at start ('make install')"
    if load_state && kill -0 "$pid" 2>/dev/null && is_torchserve "$pid" org.pytorch.serve.ModelServer; then
        die "TorchServe already running from $LOG_DIR (pid $pid); run 'scripts/serve.sh stop' first" 1
    fi

    local http=${TS_INFERENCE_PORT:-$(port_of inference_address)}
    local mgmt=${TS_MANAGEMENT_PORT:-$(port_of management_address)}
    local metrics=${TS_METRICS_PORT:-$(port_of metrics_address)}
    local grpc=${TS_GRPC_INFERENCE_PORT:-$(prop grpc_inference_port)}
    local grpc_mgmt=${TS_GRPC_MANAGEMENT_PORT:-$(prop grpc_management_port)}
    local worker=${TS_WORKER_PORT:-$(prop initial_worker_port)}
    local name port
    for name in http mgmt metrics grpc grpc_mgmt worker; do
        port=${!name}
        [[ "$port" =~ ^[0-9]+$ ]] || die "port '$name' is '$port': set it in $CONFIG or the environment"
    done
    for port in "$http" "$mgmt" "$metrics" "$grpc" "$grpc_mgmt"; do
        ! listening "$port" || die "port $port on 127.0.0.1 is already in use (another server?); \
choose free ones with TS_INFERENCE_PORT, TS_MANAGEMENT_PORT, TS_METRICS_PORT, TS_GRPC_*_PORT" 1
    done

    local store key_dir
    store=$(abs "${MODEL_STORE:-$REPO/$(prop model_store)}")
    [ -d "$store" ] || die "model store not found: $store"
    store=$(cd "$store" && pwd)
    [[ "$store" != *'\'* ]] || die "model store path must not contain a backslash: $store"
    key_dir=$(abs "${TS_KEY_DIR:-$REPO}")
    local tmp
    tmp=$(abs "${TS_TMPDIR:-$LOG_DIR/tmp}")
    mkdir -p "$key_dir" "$tmp" "$LOG_DIR"
    key_dir=$(cd "$key_dir" && pwd)
    # Workers listen on Unix sockets $tmp/.ts.sock.PORT, and a socket path has at most 107 bytes.
    [ "${#tmp}" -le 80 ] \
        || die "TMPDIR path too long for Unix sockets (${#tmp} > 80 bytes): $tmp; set TS_TMPDIR"

    local token_auth=${TS_TOKEN_AUTH:-on}
    case "$token_auth" in on|off) ;; *) die "TS_TOKEN_AUTH='$token_auth': expected on or off" ;; esac

    local models=() mar
    for mar in "$@"; do  # a file name in the store, or a path to a file inside the store
        if [ -f "$mar" ] && [ "$(cd "$(dirname "$mar")" && pwd)" != "$store" ]; then
            die "$mar is not in the model store $store (copy it there, or set MODEL_STORE)"
        fi
        [ -f "$store/$(basename "$mar")" ] || die "$(basename "$mar") not found in the model store $store"
        models+=("$(basename "$mar")")
    done

    # The derived config: config.properties with this server's ports and absolute paths.
    # Properties: a backslash escapes, so \\Q...\\E reaches the regex as \Q...\E (a literal path).
    local derived="$LOG_DIR/config.properties"
    {
        echo "# Written by scripts/serve.sh from $CONFIG; edit that file, not this one."
        local replaced="inference_address|management_address|metrics_address|grpc_inference_port"
        replaced+="|grpc_management_port|initial_worker_port|model_store|allowed_urls|load_models|metrics_config"
        grep -vE "^[[:space:]]*($replaced)[[:space:]]*=" "$CONFIG"
        echo "inference_address=http://127.0.0.1:$http"
        echo "management_address=http://127.0.0.1:$mgmt"
        echo "metrics_address=http://127.0.0.1:$metrics"
        echo "grpc_inference_port=$grpc"
        echo "grpc_management_port=$grpc_mgmt"
        echo "initial_worker_port=$worker"
        echo "model_store=$store"
        local metrics_config
        metrics_config=$(prop metrics_config)
        if [ -n "$metrics_config" ]; then  # relative to the repository, like model_store
            case "$metrics_config" in /*) ;; *) metrics_config="$REPO/$metrics_config" ;; esac
            [ -f "$metrics_config" ] || die "metrics_config $metrics_config not found" 2
            echo "metrics_config=$metrics_config"
        fi
        echo "allowed_urls=file://\\\\Q$store/\\\\E[A-Za-z0-9_][A-Za-z0-9._-]*[.]mar"
        if [ "$token_auth" = off ]; then
            echo "# TS_TOKEN_AUTH=off: on loopback behind scripts/front_proxy.sh, which checks the tokens."
            echo "disable_token_authorization=true"
        fi
    } >"$derived"

    rm -f "$key_dir/key_file.json"  # a stale file would hold the keys of a dead server
    rm -f "$tmp/.model_server.pid"
    model_log_offset=$(size_of "$LOG_DIR/model_log.log")  # logs are appended across starts
    ts_log_offset=$(size_of "$LOG_DIR/ts_log.log")
    (
        cd "$key_dir"  # torchserve writes key_file.json in its working folder
        # TMPDIR: the pid file torchserve checks; TEMP: java.io.tmpdir (worker sockets, unpacked .mar).
        # --ncs: no config snapshots; the derived config above is the whole state.
        PATH="$REPO/.venv/bin:$PATH" TMPDIR="$tmp" TEMP="$tmp" \
            LOG_LOCATION="$LOG_DIR" METRICS_LOCATION="$LOG_DIR" \
            "$REPO/.venv/bin/torchserve" --start --ncs --ts-config "$derived" --model-store "$store" \
            ${models[@]+--models "${models[@]}"} >"$LOG_DIR/torchserve.out" 2>&1 </dev/null
    ) || { tail -n 20 "$LOG_DIR/torchserve.out" >&2; die "torchserve --start failed" 1; }
    if [ "$token_auth" = off ]; then  # TorchServe writes no key file then: say so to every client
        (umask 077 && echo '{}' >"$key_dir/key_file.json")
        echo "serve: token authorization is OFF: any local process can use the management API;" \
             "let other machines in only through scripts/front_proxy.sh"
    fi
    [ -s "$tmp/.model_server.pid" ] || die "torchserve did not write $tmp/.model_server.pid" 1
    local pid
    pid=$(head -n 1 "$tmp/.model_server.pid")
    {
        printf 'pid=%q\n' "$pid"
        printf 'ports=%q\n' "$http $mgmt $metrics $grpc $grpc_mgmt"
        printf 'inference_url=%q\n' "http://127.0.0.1:$http"
        printf 'management_url=%q\n' "http://127.0.0.1:$mgmt"
        printf 'metrics_url=%q\n' "http://127.0.0.1:$metrics"
        printf 'key_file=%q\n' "$key_dir/key_file.json"
        printf 'store=%q\n' "$store"
        printf 'tmp=%q\n' "$tmp"
    } >"$STATE"

    local timeout=${TS_START_TIMEOUT:-180}
    echo "serve: TorchServe pid $pid starting on 127.0.0.1:$http (management :$mgmt, metrics :$metrics)," \
         "models: ${models[*]:-none}; waiting up to ${timeout}s"
    if ! "$PY" -m core.readiness wait --url "http://127.0.0.1:$http" \
            --management-url "http://127.0.0.1:$mgmt" --key-file "$key_dir/key_file.json" \
            --timeout "$timeout" --pid "$pid" --log "$LOG_DIR/ts_log.log" --log-offset "$ts_log_offset"; then
        echo "error: TorchServe did not become ready (it exited, its workers kept dying at load, or" \
             "${timeout}s passed); the log lines that explain it:" >&2
        sleep 1  # the frontend copies the workers' output into model_log.log with a lag
        explain "$pid" >&2
        echo "(full logs: $LOG_DIR)" >&2
        stop >/dev/null 2>&1 || true
        exit 1
    fi
    echo "serve: ready: http://127.0.0.1:$http, key file $key_dir/key_file.json, logs $LOG_DIR"
}

stop() {
    if ! load_state; then
        echo "serve: no server started from $LOG_DIR"
        return 0
    fi
    if kill -0 "$pid" 2>/dev/null && is_torchserve "$pid" org.pytorch.serve.ModelServer; then
        local workers w i
        workers=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 240); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "serve: pid $pid ignored SIGTERM for 60s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        for w in $workers; do  # the frontend stops its workers; make sure none is left behind
            if kill -0 "$w" 2>/dev/null && is_torchserve "$w" model_service_worker; then
                kill -TERM "$w" 2>/dev/null || true
            fi
        done
    fi
    local port busy
    for i in $(seq 1 120); do
        busy=""
        for port in $ports; do listening "$port" && busy+=" $port"; done
        [ -z "$busy" ] && break
        sleep 0.25
    done
    [ -z "$busy" ] || die "ports still in use after stopping pid $pid:$busy" 1
    rm -f "$STATE" "${tmp:-$LOG_DIR/tmp}/.model_server.pid" "$key_file"
    echo "serve: stopped pid $pid; ports $ports are free"
}

status() {
    if ! load_state || ! kill -0 "$pid" 2>/dev/null; then
        echo "serve: not running (log folder $LOG_DIR)"
        return 3
    fi
    echo "serve: TorchServe pid $pid: inference $inference_url, management $management_url," \
         "metrics $metrics_url/metrics; key file $key_file; store $store"
    "$PY" -m core.readiness status --url "$inference_url" \
        --management-url "$management_url" --key-file "$key_file"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    start) start "$@" ;;
    stop) [ $# -eq 0 ] || die "stop takes no arguments ($USAGE)"; stop ;;
    status) [ $# -eq 0 ] || die "status takes no arguments ($USAGE)"; status ;;
    -h|--help) echo "$USAGE" ;;
    *) die "unknown command '${command}' ($USAGE)" ;;
esac
