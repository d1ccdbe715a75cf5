#!/usr/bin/env bash
# Build the base of the CPU images from Debian packages and print its id (sha256:…), the digest
# containers/Dockerfile is then built FROM. No registry is needed: debootstrap fetches the
# packages of Debian 12 (bookworm, minbase) and the engine imports the tree as an image.
#
# Usage: bash containers/cpu-base.sh [NAME]      (default srpo-cpu-base:bookworm)
# An existing NAME is reused; REBUILD=1 makes a new one (e.g. for Debian's security updates).
# Engine: ENGINE=docker (default) or podman. Mirror: DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail
engine=${ENGINE:-docker}
name=${1:-srpo-cpu-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

image_id() {
  local id
  id=$("$engine" image inspect --format '{{.Id}}' "$1") || return 1
  echo "sha256:${id#sha256:}"
}

if [[ -z ${REBUILD:-} ]] && image_id "$name" 2>/dev/null; then exit 0; fi
command -v debootstrap > /dev/null || { echo "cpu-base: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "cpu-base: debootstrap --variant=minbase bookworm from $mirror" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" > "$root.log" 2>&1 \
  || { echo "cpu-base: debootstrap failed, see $root.log" >&2; exit 1; }
rm -f "$root.log"
# The apt lists debootstrap leaves behind are the mirror's state at build time: not part of the
# image (the Dockerfile runs apt-get update itself).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar --numeric-owner -C "$root" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$name" > /dev/null
image_id "$name"
