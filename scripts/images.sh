#!/usr/bin/env bash
# Build the project's two container images with podman, as `make test-images` does:
#   scripts/images.sh setup    podman + runc from Debian, and the project's own containers.conf
#   scripts/images.sh base     the base image: the Dockerfile's pinned BASE where it can be pulled,
#                              else a stand-in built from Debian's packages (debootstrap)
#   scripts/images.sh build    both targets of the Dockerfile (server, client) on that base
#   scripts/images.sh env      the environment lines the other commands run under (to `eval`)
# Nothing outside the project is configured: CONTAINERS_CONF points at .podman/containers.conf
# (runc, because crun refuses this kind of machine's hybrid cgroups; no default ulimits, because
# the sandbox lacks CAP_SYS_RESOURCE). Idempotent: a second run reuses the base and the layer cache.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.podman
export CONTAINERS_CONF=$STATE/containers.conf
SERVER_IMAGE=${SERVER_IMAGE:-localhost/ts-batch-classify-server:test}
CLIENT_IMAGE=${CLIENT_IMAGE:-localhost/ts-batch-classify-client:test}
STANDIN=localhost/ts-batch-classify-base-standin:bookworm
# The Dockerfile's default BASE, read from the Dockerfile itself (one place).
PINNED_BASE=$(sed -n 's/^ARG BASE=//p' Dockerfile)
log() { printf 'images: %s\n' "$*" >&2; }

setup() {
    local need=()
    command -v podman >/dev/null 2>&1 || need+=(podman)
    command -v runc >/dev/null 2>&1 || need+=(runc)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    command -v nft >/dev/null 2>&1 || need+=(nftables)
    # netavark (podman's network backend, the bridge of every RUN step and pod) sets its rules
    # with iptables; without it a build fails with "netavark: No such file or directory".
    command -v iptables >/dev/null 2>&1 || need+=(iptables)
    # A pod's infra container runs catatonit ("building local pause image: finding pause binary").
    command -v catatonit >/dev/null 2>&1 || [ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing Debian's ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${need[@]}" netavark aardvark-dns uidmap conmon >/dev/null
    fi
    mkdir -p "$STATE"
    cat >"$STATE/containers.conf.new" <<'EOF'
# Written by scripts/images.sh: the project's podman settings, used through CONTAINERS_CONF only.
[containers]
# The sandbox lacks CAP_SYS_RESOURCE: podman's default nofile/nproc ulimits cannot be set.
default_ulimits = []
[engine]
# crun refuses cgroups in hybrid mode; runc runs them.
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    mv "$STATE/containers.conf.new" "$CONTAINERS_CONF"
}

# Prints the base image to build on.
base() {
    if podman image exists "$PINNED_BASE" 2>/dev/null || podman pull -q "$PINNED_BASE" >/dev/null 2>&1; then
        log "base: $PINNED_BASE (the Dockerfile's pinned base)"
        echo "$PINNED_BASE"
        return
    fi
    if ! podman image exists "$STANDIN"; then
        log "base: $PINNED_BASE cannot be pulled here (no container registry); building a stand-in"
        log "      from Debian bookworm's packages with debootstrap (python3.11, venv)"
        local rootfs
        rootfs=$(mktemp -d /var/tmp/ts-standin.XXXXXX)
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian >"$STATE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$STATE/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
        # Debian's bookworm sources, the updates and security suites too, for the image's apt-get.
        cat >"$rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | podman import \
            --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$STANDIN" >/dev/null
        rm -rf "$rootfs"
    fi
    log "base: $STANDIN (a stand-in: Debian bookworm's python3.11, not $PINNED_BASE)"
    echo "$STANDIN"
}

build() {
    local base_image target image started
    base_image=$(base)
    # A build machine behind TLS interception trusts its own CA bundle: mounted at build time as a
    # secret, never copied into a layer. Without one, pip uses the image's own certificates.
    local ca_args=()
    local ca=${BUILD_CA_BUNDLE:-${PIP_CERT:-}}
    [ -n "$ca" ] && [ -f "$ca" ] && ca_args=(--secret "id=ca,src=$ca")
    for target in server client; do
        image=$SERVER_IMAGE
        [ "$target" = client ] && image=$CLIENT_IMAGE
        started=$(date +%s)
        podman build -q --layers --format docker --target "$target" --build-arg "BASE=$base_image" \
            "${ca_args[@]}" -t "$image" -f Dockerfile . >/dev/null
        log "built $image in $(( $(date +%s) - started )) s, $(podman image inspect -f '{{.Size}}' "$image" \
            | awk '{printf "%.0f MB", $1 / 1e6}')"
    done
    # Superseded builds of these tags: their layers would fill the disk over a few runs.
    podman image prune -f >/dev/null 2>&1 || true
}

case "${1:-}" in
    setup) setup ;;
    base) setup; base ;;
    build) setup; build ;;
    env) echo "export CONTAINERS_CONF=$CONTAINERS_CONF SERVER_IMAGE=$SERVER_IMAGE CLIENT_IMAGE=$CLIENT_IMAGE" ;;
    *) echo "usage: scripts/images.sh setup|base|build|env" >&2; exit 2 ;;
esac
