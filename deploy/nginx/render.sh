#!/bin/sh
# Render deploy/nginx/nginx.conf.template into $PROXY_DIR/nginx.conf and the token maps into
# $PROXY_DIR/tokens.map (mode 0600), for scripts/front_proxy.sh and for a pod's nginx container
# alike. POSIX sh and coreutils only, so it runs in a small image. The environment is the
# contract written at the top of the template; every error is one line naming what is wrong.
#   sh deploy/nginx/render.sh                 render and check the result with `nginx -t`
#   sh deploy/nginx/render.sh --foreground    render, then exec nginx in the foreground (a pod)
#   sh deploy/nginx/render.sh --reload        render again, then have the running nginx reload
#                                             (a rotated token: docs/security.md)
# Tokens never appear on a command line: they are read and written by shell built-ins only.
set -eu

die() { echo "render.sh: error: $*" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
TEMPLATE="$HERE/nginx.conf.template"
NGINX=$(command -v nginx 2>/dev/null || true)
[ -n "$NGINX" ] || { [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx; } \
    || die "nginx not found (on PATH or /usr/sbin); 'make install' installs Debian's nginx"
MODE=${1:-check}
case "$MODE" in check|--foreground|--reload) ;; *) die "usage: render.sh [--foreground|--reload]" ;; esac

: "${PROXY_DIR:?PROXY_DIR must name a writable folder for the rendered config, pid and logs}"
: "${PROXY_TOKEN_FILE:?PROXY_TOKEN_FILE must name the file holding the inference token}"
: "${PROXY_MANAGEMENT_TOKEN_FILE:?PROXY_MANAGEMENT_TOKEN_FILE must name the file holding the management token}"
LISTEN=${PROXY_LISTEN:-127.0.0.1:8090}
MANAGEMENT_LISTEN=${PROXY_MANAGEMENT_LISTEN:-127.0.0.1:8091}
METRICS_LISTEN=${PROXY_METRICS_LISTEN:-}
DEFAULT_TS_CONFIG="$HERE/../../config.properties"
TS_CONFIG=${PROXY_TS_CONFIG:-$DEFAULT_TS_CONFIG}

# ADDRESS:PORT, the address an IPv4 literal or a bracketed IPv6 literal.
check_listen() {
    case "$2" in
        *[!]0-9.:[a-fA-F]*|'') die "$1='$2': expected ADDRESS:PORT, e.g. 127.0.0.1:8090 or [::1]:8090" ;;
    esac
    port=${2##*:}
    case "$port" in ''|*[!0-9]*) die "$1='$2': no port after the last ':'" ;; esac
    [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "$1='$2': port out of range"
}
# http://HOST:PORT[/] -> HOST:PORT; no path, no credentials, no scheme but http.
backend_of() {
    rest=${2#http://}
    rest=${rest%/}
    case "$2" in http://*) ;; *) die "$1='$2': expected http://HOST:PORT" ;; esac
    case "$rest" in
        ''|*[!]A-Za-z0-9.:[-]*) die "$1='$2': expected http://HOST:PORT (no path, user or query)" ;;
    esac
    port=${rest##*:}
    case "$port" in ''|*[!0-9]*) die "$1='$2': no port" ;; esac
    printf '%s\n' "$rest"
}
check_listen PROXY_LISTEN "$LISTEN"
check_listen PROXY_MANAGEMENT_LISTEN "$MANAGEMENT_LISTEN"
[ -z "$METRICS_LISTEN" ] || check_listen PROXY_METRICS_LISTEN "$METRICS_LISTEN"
INFERENCE_BACKEND=$(backend_of PROXY_BACKEND "${PROXY_BACKEND:-http://127.0.0.1:8080}")
MANAGEMENT_BACKEND=$(backend_of PROXY_MANAGEMENT_BACKEND "${PROXY_MANAGEMENT_BACKEND:-http://127.0.0.1:8081}")
METRICS_BACKEND=$(backend_of PROXY_METRICS_BACKEND "${PROXY_METRICS_BACKEND:-http://127.0.0.1:8082}")

seconds() {
    case "$2" in ''|*[!0-9]*|0) die "$1='$2': expected a whole number of seconds >= 1" ;; esac
    printf '%s\n' "$2"
}
HEADER_TIMEOUT=$(seconds PROXY_HEADER_TIMEOUT "${PROXY_HEADER_TIMEOUT:-10}")
BODY_TIMEOUT=$(seconds PROXY_BODY_TIMEOUT "${PROXY_BODY_TIMEOUT:-10}")
UPSTREAM_TIMEOUT=$(seconds PROXY_UPSTREAM_TIMEOUT "${PROXY_UPSTREAM_TIMEOUT:-300}")
# The stream layer's idle limit only has to outlast the http server's longest wait: TorchServe's
# answer, a keep-alive connection (65 s), a header or a body.
STREAM_IDLE_TIMEOUT=65
for t in "$UPSTREAM_TIMEOUT" "$HEADER_TIMEOUT" "$BODY_TIMEOUT"; do
    [ "$t" -le "$STREAM_IDLE_TIMEOUT" ] || STREAM_IDLE_TIMEOUT=$t
done
STREAM_IDLE_TIMEOUT=$((STREAM_IDLE_TIMEOUT + 60))

# Connections (the template's stream block): one address holds at most PER_ADDRESS, and each costs
# nginx three connections, each a file descriptor. A worker gets as many connections as the hard
# limit on open files allows (nginx raises its soft limit to worker_rlimit_nofile), up to 16,384,
# less 1,024 descriptors for spool files, logs and listening sockets; fewer than 2,048 would let one
# address's 3 x 512 fill most of a worker, so that is refused. Behind a load balancer or an ingress
# that connects from one address, every client shares that address's limit: raise it there.
PER_ADDRESS=${PROXY_CONNECTIONS_PER_ADDRESS:-512}
case "$PER_ADDRESS" in ''|*[!0-9]*|0) die "PROXY_CONNECTIONS_PER_ADDRESS='$PER_ADDRESS': expected a whole number >= 1" ;; esac
fd_limit=$(ulimit -H -n)
case "$fd_limit" in unlimited) fd_limit=1048576 ;; ''|*[!0-9]*) die "ulimit -H -n gave '$fd_limit'" ;; esac
WORKER_NOFILE=$(( fd_limit < 17408 ? fd_limit : 17408 ))
WORKER_CONNECTIONS=$((WORKER_NOFILE - 1024))
[ "$WORKER_CONNECTIONS" -ge 2048 ] \
    || die "the hard limit on open files is $fd_limit; nginx needs at least 3072 (2,048 connections a worker and room for files): raise it (ulimit -Hn, or the container runtime's nofile limit)"

# The stream module: built in, or Debian's libnginx-mod-stream (a module to load).
build=$("$NGINX" -V 2>&1)
case "$build" in
    *"--with-stream=dynamic"*)
        modules=$(printf '%s\n' "$build" | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p')
        modules=${modules:-/usr/lib/nginx/modules}
        [ -f "$modules/ngx_stream_module.so" ] \
            || die "$modules/ngx_stream_module.so not found: install Debian's libnginx-mod-stream ('make install' does)"
        LOAD_STREAM="load_module $modules/ngx_stream_module.so;" ;;
    *"--with-stream "*|*"--with-stream") LOAD_STREAM="# the stream module is built into this nginx" ;;
    *) die "$NGINX has no stream module (nginx -V shows no --with-stream); Debian's nginx with libnginx-mod-stream has" ;;
esac

# The body limit is TorchServe's own max_request_size (its default when the key is absent).
[ -f "$TS_CONFIG" ] || die "$TS_CONFIG: TorchServe config not found (PROXY_TS_CONFIG); its max_request_size is the body limit"
MAX_BODY=$(sed -n 's/^[[:space:]]*max_request_size[[:space:]]*=[[:space:]]*//p' "$TS_CONFIG" | tail -n 1 | tr -d '\r[:space:]')
MAX_BODY=${MAX_BODY:-6553500}
case "$MAX_BODY" in *[!0-9]*) die "$TS_CONFIG: max_request_size='$MAX_BODY' is not a number of bytes" ;; esac

# The spool's budget (the pods' nginx volume less room for the config): the template's three
# classes of spooled bodies (over 256 KiB and under 1 MB, under 10 MB, larger or chunked) get a
# quarter, a quarter and a half of it, each body counted at its class's largest size.
SPOOL_BYTES=${PROXY_SPOOL_BYTES:-1006632960}
case "$SPOOL_BYTES" in ''|*[!0-9]*) die "PROXY_SPOOL_BYTES='$SPOOL_BYTES': expected a number of bytes" ;; esac
smaller() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
SPOOL_SMALL=$(( SPOOL_BYTES / 4 / $(smaller 1000000 "$MAX_BODY") ))
SPOOL_MEDIUM=$(( SPOOL_BYTES / 4 / $(smaller 10000000 "$MAX_BODY") ))
SPOOL_LARGE=$(( SPOOL_BYTES / 2 / MAX_BODY ))
[ "$SPOOL_LARGE" -ge 1 ] && [ "$SPOOL_MEDIUM" -ge 1 ] && [ "$SPOOL_SMALL" -ge 1 ] \
    || die "PROXY_SPOOL_BYTES=$SPOOL_BYTES is too small for max_request_size=$MAX_BODY (at least $(( 2 * MAX_BODY )) for one body of each class)"
# One client address may hold half of each class's places, rounded up.
SPOOL_SMALL_SHARE=$(( (SPOOL_SMALL + 1) / 2 ))
SPOOL_MEDIUM_SHARE=$(( (SPOOL_MEDIUM + 1) / 2 ))
SPOOL_LARGE_SHARE=$(( (SPOOL_LARGE + 1) / 2 ))

# Paths go into the config unquoted: letters, digits and / . _ + - only.
safe_path() {
    case "$2" in
        /*) ;;
        *) die "$1='$2': expected an absolute path" ;;
    esac
    case "$2" in *[!A-Za-z0-9/._+-]*) die "$1='$2': only letters, digits and / . _ + - are allowed" ;; esac
}
safe_path PROXY_DIR "$PROXY_DIR"
ACCESS_LOG=${PROXY_ACCESS_LOG:-$PROXY_DIR/logs/access.log}
ERROR_LOG=${PROXY_ERROR_LOG:-$PROXY_DIR/logs/error.log}
safe_path PROXY_ACCESS_LOG "$ACCESS_LOG"
safe_path PROXY_ERROR_LOG "$ERROR_LOG"
# The http server listens on unix sockets in PROXY_DIR, whose paths must fit a sockaddr_un.
[ "${#PROXY_DIR}" -le 90 ] || die "PROXY_DIR='$PROXY_DIR': at most 90 characters (its unix sockets' paths must fit in 108)"

# The token-file rule, shared with core/keys.py's read_tokens (tests/test_tokens.py runs one table
# of cases against both): the file is printable ASCII, tab and LF, with a CR allowed only before a
# LF or at its end (a CRLF file); each line is stripped of its CR and of blanks; blank lines and
# #-comments are skipped; every other line is a token (two during a rotation) of 32 to 512 letters,
# digits or . _ ~ + / = - with at least 8 different characters and not the same as an earlier one,
# letter case aside: nginx's map compares tokens without it (docs/security.md).
read_tokens() {  # $1 variable name (for messages), $2 file, $3 role -> map lines on stdout
    [ -e "$2" ] || die "$2: token file not found ($1)"
    [ -f "$2" ] && [ -r "$2" ] || die "$2: token file not readable ($1)"
    bad=$(LC_ALL=C grep -a -n -m 1 -e "[^$TAB$CR -~]" -e "$CR." "$2" | cut -d: -f1)
    [ -z "$bad" ] || die "$2: line $bad: not printable ASCII (a NUL or other control byte, a CR inside a line, a byte order mark or a non-ASCII character) ($1)"
    count=0
    number=0
    seen=" "
    while IFS= read -r line || [ -n "$line" ]; do
        number=$((number + 1))
        token=${line%"$CR"}
        token=${token#"${token%%[!" $TAB"]*}"}
        token=${token%"${token##*[!" $TAB"]}"}
        case "$token" in ''|'#'*) continue ;; esac
        case "$token" in
            *[!A-Za-z0-9._~+/=-]*) die "$2: line $number: a token may hold only letters, digits and . _ ~ + / = - ($1)" ;;
        esac
        [ "${#token}" -ge 32 ] || die "$2: line $number: a token has ${#token} characters; at least 32 are needed ($1)"
        [ "${#token}" -le 512 ] || die "$2: line $number: a token has more than 512 characters ($1)"
        lower=$(printf '%s' "$token" | tr 'A-Z' 'a-z')
        distinct=$(printf '%s' "$lower" | fold -w 1 | sort -u | wc -l)
        distinct=$((distinct + 0))
        [ "$distinct" -ge 8 ] \
            || die "$2: line $number: a token has $distinct different characters (letter case aside); at least 8 are needed ($1)"
        case "$seen" in
            *" $lower:"*) rest=${seen#*" $lower:"}
                          die "$2: line $number: the token of line ${rest%% *} again (letter case aside) ($1)" ;;
        esac
        seen="$seen $lower:$number "
        printf '    "Bearer %s" %s;\n' "$token" "$3"
        count=$((count + 1))
    done <"$2"
    [ "$count" -gt 0 ] || die "$2: the file holds no token (only blank lines and # comments) ($1)"
}
TAB=$(printf '\t')
CR=$(printf '\r')

umask 077
mkdir -p "$PROXY_DIR/logs" "$PROXY_DIR/tmp" || die "$PROXY_DIR: cannot create (PROXY_DIR must be writable)"
[ -w "$PROXY_DIR" ] || die "$PROXY_DIR: not writable (PROXY_DIR)"
inference_map=$(read_tokens PROXY_TOKEN_FILE "$PROXY_TOKEN_FILE" inference)
management_map=$(read_tokens PROXY_MANAGEMENT_TOKEN_FILE "$PROXY_MANAGEMENT_TOKEN_FILE" management)
duplicates=$(printf '%s\n%s\n' "$inference_map" "$management_map" | cut -d'"' -f2 | tr 'A-Z' 'a-z' | sort | uniq -d)
[ -z "$duplicates" ] || die "$PROXY_TOKEN_FILE, $PROXY_MANAGEMENT_TOKEN_FILE: a token appears twice (the inference and the management token must differ)"

# Run as root (a workstation's sudo, a CI container), nginx's master reads this and opens the
# ports and logs; its workers switch to nobody, which must reach the temp folder.
if [ "$(id -u)" = 0 ]; then
    group=nobody
    grep -q '^nogroup:' /etc/group 2>/dev/null && group=nogroup
    USER_DIRECTIVE="user nobody $group;"
    chmod 0711 "$PROXY_DIR" "$PROXY_DIR/tmp"
else
    USER_DIRECTIVE="# not root: the workers run as the same user as the master"
fi

workers=${PROXY_WORKERS:-2}
case "$workers" in ''|*[!0-9]*|0) die "PROXY_WORKERS='$workers': expected a whole number >= 1" ;; esac

# Written beside the final files, then renamed: a reload never reads half a file.
tokens_tmp="$PROXY_DIR/.tokens.map.new"
{
    echo "# Rendered by deploy/nginx/render.sh from PROXY_TOKEN_FILE and PROXY_MANAGEMENT_TOKEN_FILE."
    echo 'map $http_authorization $proxy_token_role {'
    echo '    default "";'
    printf '%s\n%s\n' "$inference_map" "$management_map"
    echo '}'
} >"$tokens_tmp"
chmod 0600 "$tokens_tmp"

conf_tmp="$PROXY_DIR/.nginx.conf.new"
metrics_filter='/^#BEGIN metrics$/,/^#END metrics$/d'
[ -z "$METRICS_LISTEN" ] || metrics_filter='/^#BEGIN metrics$/d;/^#END metrics$/d'
{
    echo "# Rendered by deploy/nginx/render.sh from deploy/nginx/nginx.conf.template; edit that, not this."
    sed -e "$metrics_filter" \
        -e "s|@PROXY_DIR@|$PROXY_DIR|g" \
        -e "s|@ACCESS_LOG@|$ACCESS_LOG|g" \
        -e "s|@ERROR_LOG@|$ERROR_LOG|g" \
        -e "s|@USER_DIRECTIVE@|$USER_DIRECTIVE|g" \
        -e "s|@WORKERS@|$workers|g" \
        -e "s|@LOAD_STREAM@|$LOAD_STREAM|g" \
        -e "s|@WORKER_NOFILE@|$WORKER_NOFILE|g" \
        -e "s|@WORKER_CONNECTIONS@|$WORKER_CONNECTIONS|g" \
        -e "s|@PER_ADDRESS@|$PER_ADDRESS|g" \
        -e "s|@STREAM_IDLE_TIMEOUT@|$STREAM_IDLE_TIMEOUT|g" \
        -e "s|@MAX_BODY@|$MAX_BODY|g" \
        -e "s|@SPOOL_SMALL@|$SPOOL_SMALL|g" \
        -e "s|@SPOOL_MEDIUM@|$SPOOL_MEDIUM|g" \
        -e "s|@SPOOL_LARGE@|$SPOOL_LARGE|g" \
        -e "s|@SPOOL_SMALL_SHARE@|$SPOOL_SMALL_SHARE|g" \
        -e "s|@SPOOL_MEDIUM_SHARE@|$SPOOL_MEDIUM_SHARE|g" \
        -e "s|@SPOOL_LARGE_SHARE@|$SPOOL_LARGE_SHARE|g" \
        -e "s|@HEADER_TIMEOUT@|$HEADER_TIMEOUT|g" \
        -e "s|@BODY_TIMEOUT@|$BODY_TIMEOUT|g" \
        -e "s|@UPSTREAM_TIMEOUT@|$UPSTREAM_TIMEOUT|g" \
        -e "s|@INFERENCE_BACKEND@|$INFERENCE_BACKEND|g" \
        -e "s|@MANAGEMENT_BACKEND@|$MANAGEMENT_BACKEND|g" \
        -e "s|@METRICS_BACKEND@|$METRICS_BACKEND|g" \
        -e "s|@PROXY_LISTEN@|$LISTEN|g" \
        -e "s|@PROXY_MANAGEMENT_LISTEN@|$MANAGEMENT_LISTEN|g" \
        -e "s|@PROXY_METRICS_LISTEN@|$METRICS_LISTEN|g" \
        "$TEMPLATE"
} >"$conf_tmp"
! grep -q '@[A-Z_]*@' "$conf_tmp" || die "$TEMPLATE: a placeholder was left unrendered: $(grep -o '@[A-Z_]*@' "$conf_tmp" | head -n 1)"
mv -f "$tokens_tmp" "$PROXY_DIR/tokens.map"
mv -f "$conf_tmp" "$PROXY_DIR/nginx.conf"

# -e: nginx's own error log before it reads the config (its built-in default is under /var/log).
if ! out=$("$NGINX" -t -q -p "$PROXY_DIR" -e "$ERROR_LOG" -c "$PROXY_DIR/nginx.conf" 2>&1); then
    die "nginx -t rejects $PROXY_DIR/nginx.conf: $(printf '%s' "$out" | grep -m1 -E 'emerg|alert|error' || printf '%s' "$out" | head -n 1)"
fi
echo "render.sh: $PROXY_DIR/nginx.conf (inference $LISTEN -> $INFERENCE_BACKEND, management" \
     "$MANAGEMENT_LISTEN -> $MANAGEMENT_BACKEND${METRICS_LISTEN:+, metrics $METRICS_LISTEN -> $METRICS_BACKEND}," \
     "body limit $MAX_BODY bytes from $TS_CONFIG, spool caps $SPOOL_SMALL/$SPOOL_MEDIUM/$SPOOL_LARGE" \
     "within $SPOOL_BYTES bytes (an address $SPOOL_SMALL_SHARE/$SPOOL_MEDIUM_SHARE/$SPOOL_LARGE_SHARE)," \
     "$WORKER_CONNECTIONS connections a worker, $PER_ADDRESS an address)"
if [ "$MODE" = --foreground ]; then
    rm -f "$PROXY_DIR"/*.sock  # left by an nginx that was killed (a pod's volume outlives it)
    exec "$NGINX" -p "$PROXY_DIR" -e "$ERROR_LOG" -c "$PROXY_DIR/nginx.conf" -g 'daemon off;'
fi
if [ "$MODE" = --reload ]; then
    exec "$NGINX" -p "$PROXY_DIR" -e "$ERROR_LOG" -c "$PROXY_DIR/nginx.conf" -s reload
fi
