#!/usr/bin/env bash
# nginx in front of a local TorchServe, so other machines can classify against it safely: the one
# configuration of the pods (deploy/nginx/nginx.conf.template, rendered by deploy/nginx/render.sh).
#   scripts/front_proxy.sh start    render the config, start nginx, return when it answers
#   scripts/front_proxy.sh stop     stop the nginx started from PROXY_DIR (by its pid)
#   scripts/front_proxy.sh status   is it running, and does TorchServe answer behind it
#   scripts/front_proxy.sh reload   re-render (new tokens, new limits) and reload without a drop
# Start TorchServe behind it with its own token authorization off:
#   TS_TOKEN_AUTH=off scripts/serve.sh start MODEL.mar
# Environment (the template's header has the whole contract):
#   PROXY_LISTEN [127.0.0.1:8090]  PROXY_BACKEND [http://127.0.0.1:8080]  PROXY_TOKEN_FILE
#   PROXY_MANAGEMENT_LISTEN [127.0.0.1:8091]  PROXY_MANAGEMENT_BACKEND [http://127.0.0.1:8081]
#   PROXY_MANAGEMENT_TOKEN_FILE   PROXY_DIR [logs/proxy]: its pid, rendered config and logs
#   PROXY_TS_CONFIG [$TS_CONFIG or config.properties]: max_request_size is the body limit
set -euo pipefail

die() { echo "error: $1" >&2; exit "${2:-2}"; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE="usage: scripts/front_proxy.sh start | stop | status | reload"

abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
export PROXY_DIR PROXY_LISTEN PROXY_MANAGEMENT_LISTEN PROXY_TS_CONFIG
PROXY_DIR=$(abs "${PROXY_DIR:-$REPO/logs/proxy}")
PROXY_LISTEN=${PROXY_LISTEN:-127.0.0.1:8090}
PROXY_MANAGEMENT_LISTEN=${PROXY_MANAGEMENT_LISTEN:-127.0.0.1:8091}
PROXY_TS_CONFIG=$(abs "${PROXY_TS_CONFIG:-${TS_CONFIG:-$REPO/config.properties}}")
[ -z "${PROXY_TOKEN_FILE:-}" ] || export PROXY_TOKEN_FILE=$(abs "$PROXY_TOKEN_FILE")
[ -z "${PROXY_MANAGEMENT_TOKEN_FILE:-}" ] \
    || export PROXY_MANAGEMENT_TOKEN_FILE=$(abs "$PROXY_MANAGEMENT_TOKEN_FILE")
PID_FILE="$PROXY_DIR/nginx.pid"
NGINX=$(command -v nginx || true)
[ -n "$NGINX" ] || { [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx; } || NGINX=""

host_of() {  # the address to reach a listen address at: a wildcard is reached on loopback
    local h=${1%:*}
    h=${h#[}; h=${h%]}
    case "$h" in 0.0.0.0) h=127.0.0.1 ;; ::) h=::1 ;; esac
    printf '%s\n' "$h"
}
port_of() { printf '%s\n' "${1##*:}"; }
listening() { (exec 3<>"/dev/tcp/$(host_of "$1")/$(port_of "$1")") 2>/dev/null; }

# The status code nginx gives GET /ping with the token in file $2 (none when $2 is empty); bash
# built-ins only, so the token never shows on a command line.
ping_status() {
    local token="" line=""
    if [ -n "${2:-}" ]; then
        while IFS= read -r line || [ -n "$line" ]; do
            line=${line//$'\r'/}; line=${line//[[:space:]]/}
            [[ -n "$line" && "$line" != '#'* ]] && { token=$line; break; }
        done <"$2"
    fi
    local auth=""
    [ -z "$token" ] || auth="Authorization: Bearer $token"$'\r\n'
    (
        exec 3<>"/dev/tcp/$(host_of "$1")/$(port_of "$1")" || exit 1
        printf 'GET /ping HTTP/1.0\r\n%s\r\n' "$auth" >&3
        IFS=' ' read -r -t 10 _ code _ <&3 && printf '%s\n' "$code"
    ) 2>/dev/null || true
}

running_pid() {  # the pid of the nginx master started from PROXY_DIR, or nothing
    [ -s "$PID_FILE" ] || return 0
    local pid
    pid=$(head -n 1 "$PID_FILE")
    [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-c $PROXY_DIR/nginx.conf" && echo "$pid" || true
}

# As root, nginx's workers run as nobody and must reach PROXY_DIR/tmp (request bodies).
check_reachable_by_workers() {
    [ "$(id -u)" = 0 ] || return 0
    local dir
    dir=$(dirname "$PROXY_DIR")
    while [ "$dir" != / ]; do
        [[ "$(stat -c %A "$dir")" == *[xt] ]] \
            || die "$dir is not searchable by others: nginx's workers (user nobody, as this runs \
as root) could not reach $PROXY_DIR/tmp; choose another PROXY_DIR"
        dir=$(dirname "$dir")
    done
}

start() {
    [ -n "$NGINX" ] || die "nginx not found (on PATH or /usr/sbin); run 'make install'"
    [ -n "${PROXY_TOKEN_FILE:-}" ] || die "PROXY_TOKEN_FILE is not set: name the file holding the inference token"
    [ -n "${PROXY_MANAGEMENT_TOKEN_FILE:-}" ] \
        || die "PROXY_MANAGEMENT_TOKEN_FILE is not set: name the file holding the management token"
    local pid
    pid=$(running_pid)
    [ -z "$pid" ] || die "nginx already running from $PROXY_DIR (pid $pid); run 'scripts/front_proxy.sh stop' first" 1
    local address
    for address in "$PROXY_LISTEN" "$PROXY_MANAGEMENT_LISTEN" ${PROXY_METRICS_LISTEN:+"$PROXY_METRICS_LISTEN"}; do
        ! listening "$address" || die "$address is already in use (another server?); choose a free one \
with PROXY_LISTEN / PROXY_MANAGEMENT_LISTEN" 1
    done
    mkdir -p "$PROXY_DIR"
    check_reachable_by_workers
    sh "$REPO/deploy/nginx/render.sh" >/dev/null  # prints its own one-line error
    rm -f "$PID_FILE" "$PROXY_DIR"/*.sock  # the http server's sockets, left by an nginx that was killed
    local out
    if ! out=$("$NGINX" -p "$PROXY_DIR" -e "$PROXY_DIR/logs/error.log" -c "$PROXY_DIR/nginx.conf" 2>&1); then
        local why
        why=$(printf '%s\n' "$out" | grep -m1 -E 'emerg|alert' || printf '%s\n' "$out" | tail -n 1)
        case "$why" in *"Address already in use"*) why="a port is already in use: $why" ;; esac
        die "nginx did not start: $why" 1
    fi
    local i code=""
    for i in $(seq 1 100); do
        code=$(ping_status "$PROXY_LISTEN")
        [ -n "$code" ] && break
        sleep 0.1
    done
    if [ -z "$code" ]; then
        stop >/dev/null 2>&1 || true
        die "nginx started but does not answer on $PROXY_LISTEN (see $PROXY_DIR/logs/error.log)" 1
    fi
    pid=$(running_pid)
    local backend
    code=$(ping_status "$PROXY_LISTEN" "$PROXY_TOKEN_FILE")
    case "$code" in
        200) backend="TorchServe answers /ping" ;;
        *) backend="TorchServe does not answer yet (GET /ping through the proxy: ${code:-no answer});"
           backend+=" start it with TS_TOKEN_AUTH=off scripts/serve.sh start" ;;
    esac
    echo "front_proxy: nginx pid $pid: inference http://$PROXY_LISTEN, management http://$PROXY_MANAGEMENT_LISTEN," \
         "config and logs in $PROXY_DIR; $backend"
}

stop() {
    local pid i
    pid=$(running_pid)
    if [ -z "$pid" ]; then
        echo "front_proxy: no nginx running from $PROXY_DIR"
        return 0
    fi
    kill -QUIT "$pid" 2>/dev/null || true  # graceful: requests in flight are answered first
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "front_proxy: pid $pid still serving after 10s; stopping it now" >&2
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    kill -0 "$pid" 2>/dev/null && die "nginx pid $pid did not stop" 1
    rm -f "$PID_FILE"
    echo "front_proxy: stopped nginx pid $pid"
}

status() {
    local pid
    pid=$(running_pid)
    [ -n "$pid" ] || { echo "front_proxy: not running (PROXY_DIR $PROXY_DIR)"; return 3; }
    local code=""
    [ -z "${PROXY_TOKEN_FILE:-}" ] || code=$(ping_status "$PROXY_LISTEN" "$PROXY_TOKEN_FILE")
    echo "front_proxy: nginx pid $pid: inference http://$PROXY_LISTEN, management" \
         "http://$PROXY_MANAGEMENT_LISTEN; GET /ping through it: ${code:-not tried (PROXY_TOKEN_FILE unset)}"
}

reload() {
    local pid
    pid=$(running_pid)
    [ -n "$pid" ] || die "no nginx running from $PROXY_DIR; use start" 1
    sh "$REPO/deploy/nginx/render.sh" >/dev/null
    # The workers of the old configuration keep accepting connections until the master has told
    # them to leave: wait until they are gone, so that after `reload` only the new one answers
    # (a token just removed is refused by every connection). Bounded: a worker finishing a long
    # request is left to finish it.
    local old_workers waited=0
    old_workers=$(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ' || true)
    kill -HUP "$pid"
    while [ "$waited" -lt 300 ]; do
        local alive=""
        for worker in $old_workers; do
            [ "$(ps -o ppid= -p "$worker" 2>/dev/null | tr -d ' ')" = "$pid" ] && alive="$alive $worker"
        done
        old_workers=$alive
        [ -z "$old_workers" ] && break
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "front_proxy: nginx pid $pid reloaded $PROXY_DIR/nginx.conf${old_workers:+ (old workers$old_workers still finishing requests)}"
}

command=${1:-}
[ $# -gt 0 ] && shift
[ $# -eq 0 ] || die "$command takes no arguments ($USAGE)"
case "$command" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    reload) reload ;;
    -h|--help) echo "$USAGE" ;;
    *) die "unknown command '${command}' ($USAGE)" ;;
esac
