#!/usr/bin/env bash
# Build the bids-denoise image where no registry can be reached (CI, an air-gapped lab machine).
#
#   scripts/build_image.sh [TAG]          (default TAG: localhost/bids-denoise:dev)
#
# What it does, each step only when needed:
#   1. a local Debian base image: `debootstrap --variant=minbase bookworm` from the apt mirror this
#      machine already uses, imported as localhost/debian-minbase:bookworm (skipped if present);
#   2. the local wheelhouse: wheels found in WHEELS_FROM (default: pip's find-links, e.g. the CPU
#      torch wheel a CI machine keeps on disk) are copied into wheels/;
#   3. the build, with the base and torch build arguments pointed at those local things, and the
#      host's CA bundle passed as a build secret when pip needs one (PIP_CERT / SSL_CERT_FILE).
#
# Environment: ENGINE (podman or docker; default podman), BASE_IMAGE (skip step 1 and use this),
# TORCH_SPEC (default: the torch wheel found in step 2, else the Dockerfile's default), WHEELS_FROM,
# DEBIAN_MIRROR (default: the first URIs of /etc/apt/sources.list.d/debian.sources, else
# deb.debian.org). Podman on hosts with hybrid cgroups wants the runc runtime and higher ulimits:
# see tests/test_image.py for the containers.conf the CI uses.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-localhost/bids-denoise:dev}
ENGINE=${ENGINE:-podman}
BASE_TAG=localhost/debian-minbase:bookworm

log() { echo "build_image: $*" >&2; }

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=$BASE_TAG
    if ! "$ENGINE" image exists "$BASE_TAG" 2>/dev/null && ! "$ENGINE" image inspect "$BASE_TAG" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { log "debootstrap is needed to make the base image"; exit 1; }
        mirror=${DEBIAN_MIRROR:-}
        if [ -z "$mirror" ] && [ -r /etc/apt/sources.list.d/debian.sources ]; then
            mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
        fi
        mirror=${mirror:-http://deb.debian.org/debian}
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        log "debootstrap bookworm from $mirror"
        debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
        tar -C "$rootfs" -c . | "$ENGINE" import - "$BASE_TAG" >/dev/null
        rm -rf "$rootfs"
        trap - EXIT
    fi
fi

wheels_from=${WHEELS_FROM:-$(pip config get global.find-links 2>/dev/null || true)}
wheels_from=${wheels_from:-${PIP_FIND_LINKS:-}}
torch_wheel=""
for folder in $wheels_from; do
    [ -d "$folder" ] || continue
    for wheel in "$folder"/*.whl; do
        [ -e "$wheel" ] || continue
        [ -e "wheels/$(basename "$wheel")" ] || cp "$wheel" wheels/
        case $(basename "$wheel") in torch-*) torch_wheel=$(basename "$wheel") ;; esac
    done
done
if [ -z "${TORCH_SPEC:-}" ] && [ -n "$torch_wheel" ]; then
    TORCH_SPEC="torch==$(echo "$torch_wheel" | cut -d- -f2)"
fi

args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$(python3 -c 'import re,sys; print(re.search(r"__version__ = \"(.+)\"", open("bids_denoise/_version.py").read()).group(1))')")
[ -n "${TORCH_SPEC:-}" ] && args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
revision=$(git rev-parse --short HEAD 2>/dev/null || true)
[ -n "$revision" ] && args+=(--build-arg "VCS_REF=$revision")
ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
[ -n "$ca" ] && [ -s "$ca" ] && args+=(--secret "id=ca,src=$ca")
# the host's network: a build needs PyPI and the Debian mirror, and no bridge may exist here
[ "$ENGINE" = podman ] && args+=(--network host)

log "$ENGINE build -t $TAG (base $BASE_IMAGE, ${TORCH_SPEC:-default torch})"
"$ENGINE" build "${args[@]}" -t "$TAG" .
