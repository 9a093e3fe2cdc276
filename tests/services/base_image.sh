#!/usr/bin/env bash
# Build the base image of every kernel-gateway image without any image registry:
#
#   debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
#       bookworm <rootfs> <this machine's Debian mirror>
#   tar -C <rootfs> -c . | docker import - kgw-base:bookworm
#
# It stands in for the Dockerfiles' default base, the official python:3.11-slim-bookworm, and offers
# what that image offers, no more: Debian bookworm with apt (sources set, below), python3 3.11 with
# venv and pip, CA certificates, useradd. So the same Dockerfiles build on both, with
# `--build-arg BASE=kgw-base:bookworm`; like the official image it has no tini, which the
# Dockerfiles install with apt.
#
# The mirror is the one apt on this machine uses (/etc/apt/sources.list and sources.list.d), so it is
# reachable wherever apt-get is. The host's CA bundle (/etc/ssl/certs/ca-certificates.crt) goes into
# the rootfs, and its certificates that Debian's bundle lacks go into
# /usr/local/share/ca-certificates, so pip in derived builds (and update-ca-certificates there) trust
# what the host trusts.
#
# The rootfs tarball is cached under ${KGW_CACHE_DIR:-/var/cache/kgw}, named by a hash of this
# script, the suite, the package list, the mirror and the CA bundle; the image carries the same
# hash as label kernel_gateway.inputs-hash, so a second run with unchanged inputs does nothing.
#
# Usage: tests/services/base_image.sh [--force] [TAG]     (TAG defaults to kgw-base:bookworm)
# Needs: root, docker (a running engine), debootstrap (apt-get installed when missing).
set -euo pipefail

FORCE=0
if [[ "${1:-}" == "--force" ]]; then FORCE=1; shift; fi
TAG="${1:-kgw-base:bookworm}"
SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
CACHE="${KGW_CACHE_DIR:-/var/cache/kgw}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
LABEL=kernel_gateway.inputs-hash
say() { echo "[base $(date +%H:%M:%S)] $*"; }

# The first URI apt uses for "$1" (a suite), from deb822 .sources files and one-line .list files.
apt_uri() {
    local suite="$1" files=()
    shopt -s nullglob
    files=(/etc/apt/sources.list.d/*.sources)
    if ((${#files[@]})); then
        awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Types:/) types = $i
                    if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) suites = " " $i " "
                }
                if (types ~ /[ \t]deb([ \t]|$)/ && suites ~ ("[ \t]" suite "[ \t]")) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "${files[@]}"
    fi
    files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    for f in "${files[@]}"; do
        [[ -f "$f" ]] || continue
        awk -v suite="$suite" '$1 == "deb" {
                i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
    shopt -u nullglob
}

MIRROR="${KGW_DEBIAN_MIRROR:-$(apt_uri "$SUITE" | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY="$(apt_uri "$SUITE-security" | head -n1)"
SECURITY="${SECURITY:-http://deb.debian.org/debian-security}"

KEY="$( { sha256sum <"$0"; echo "$SUITE $INCLUDE $MIRROR $SECURITY"; sha256sum <"$HOST_CA"; } | sha256sum | cut -c1-64)"

up_to_date() {
    [[ "$FORCE" == 0 ]] &&
        [[ "$(docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$TAG" 2>/dev/null)" == "$KEY" ]]
}
if up_to_date; then say "$TAG is up to date (${KEY:0:12})"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 1800 9 || { say "timed out waiting for $CACHE/.lock"; exit 1; }
if up_to_date; then say "$TAG is up to date (${KEY:0:12})"; exit 0; fi  # another process built it meanwhile

TARBALL="$CACHE/rootfs-$SUITE-${KEY:0:16}.tar"
if [[ "$FORCE" == 1 || ! -s "$TARBALL" ]]; then
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    ROOTFS="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    trap 'rm -rf "$ROOTFS" "$TARBALL.tmp"' EXIT
    say "debootstrap $SUITE from $MIRROR into $ROOTFS (a few minutes on first run)"
    started=$SECONDS
    mkdir -p "$CACHE/debs"  # downloaded packages, reused by the next debootstrap
    if ! timeout 1200 debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$INCLUDE" \
            "$SUITE" "$ROOTFS" "$MIRROR" \
            >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE/debootstrap.log"
        [[ -f "$ROOTFS/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log"
        say "debootstrap failed (log: $CACHE/debootstrap.log)"
        exit 1
    fi
    say "debootstrap done in $((SECONDS - started))s"

    # apt inside derived images: the same mirrors, main + updates + security.
    cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
    # Trust what the host trusts: host certificates missing from Debian's bundle become local CAs
    # (kept by update-ca-certificates in derived images), then the host bundle itself is installed.
    python3 - "$HOST_CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt" "$ROOTFS/usr/local/share/ca-certificates" <<'EOF'
import re, sys
from pathlib import Path
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host, debian, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
known = {"".join(c.split()) for c in pem.findall(Path(debian).read_text())}
extra = [c for c in pem.findall(Path(host).read_text()) if "".join(c.split()) not in known]
out.mkdir(parents=True, exist_ok=True)
for index, cert in enumerate(extra):
    (out / f"host-{index:03d}.crt").write_text(cert + "\n")
print(f"{len(extra)} host certificate(s) added to Debian's bundle")
EOF
    chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || true
    cp "$HOST_CA" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"

    # Nothing of this machine's identity or caches in the image (docker provides resolv.conf/hostname).
    : >"$ROOTFS/etc/resolv.conf"
    echo localhost >"$ROOTFS/etc/hostname"
    # Slim like Debian's -slim images: no man pages, docs (but copyrights) or translations, now or later.
    cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/kgw-slim" <<'EOF'
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    find "$ROOTFS/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
    find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
    rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
           "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* "$ROOTFS/debootstrap"

    tar -C "$ROOTFS" --numeric-owner --sort=name -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOTFS"
    trap - EXIT
    # Older tarballs of this suite are superseded.
    find "$CACHE" -maxdepth 1 -name "rootfs-$SUITE-*.tar" ! -name "$(basename "$TARBALL")" -delete
    say "cached $TARBALL ($(du -h "$TARBALL" | cut -f1))"
else
    say "using cached $TARBALL"
fi

previous="$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)"
docker import \
    --change "LABEL $LABEL=$KEY" \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $SUITE minbase + $INCLUDE" \
    "$TARBALL" "$TAG" >/dev/null
# The superseded image goes, unless images built on it still exist (they are rebuilt, then it can).
if [[ -n "$previous" && "$previous" != "$(docker image inspect --format '{{.Id}}' "$TAG")" ]]; then
    docker image rm "$previous" >/dev/null 2>&1 || true
fi
say "imported $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
