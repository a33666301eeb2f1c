#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim-bookworm when no container registry can be
# reached: debootstrap a minimal Debian bookworm with Python 3.11 and `docker import` it.
# Cached by tag: does nothing when the image already exists.
# Usage: bash tests/docker/make_base_image.sh [TAG]   (default TAG: local/python:3.11-bookworm)
set -euo pipefail

TAG="${1:-local/python:3.11-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates,curl"

log() { echo "make_base_image: $*" >&2; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already exists"
    exit 0
fi

rootfs="$(mktemp -d /var/tmp/base-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

log "debootstrap bookworm into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"

cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF

# This host may reach the registries through a TLS-intercepting egress proxy whose CA
# lives in /usr/local/share/ca-certificates. Installing it the Debian way keeps it in the
# bundle when a later apt-get (Dockerfile.serve) regenerates /etc/ssl/certs.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
fi

rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/*

log "importing as $TAG"
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
log "built $TAG ($(docker image inspect --format '{{.Size}}' "$TAG") bytes)"
