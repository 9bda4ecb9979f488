#!/bin/sh
# Build the closewait-trace image with podman where no registry can be reached: the base
# (Debian 12, minbase) is made from Debian's packages with debootstrap and imported, then the
# Containerfile is built on it. The base's tarball is cached, so a second build is quick.
#
#   deploy/container/build.sh [TAG]          (default TAG: localhost/closewait-trace:dev)
#
# Environment: CLOSEWAIT_CACHE (default /var/cache/closewait-trace), DEBIAN_MIRROR (default
# http://deb.debian.org/debian). With a registry, `podman build -f deploy/container/Containerfile .`
# uses debian:bookworm-slim instead.
set -eu
cd "$(dirname "$0")/../.."
tag=${1:-localhost/closewait-trace:dev}
cache=${CLOSEWAIT_CACHE:-/var/cache/closewait-trace}/container
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/closewait-base:bookworm
tarball=$cache/debian-bookworm-minbase.tar
podman="podman --runtime /usr/sbin/runc"

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (apt-get install $tool)" >&2; exit 69; }
done
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "build.sh: debootstrap --variant=minbase bookworm (once; cached in $tarball)" >&2
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -5 "$cache/debootstrap.log" >&2; exit 1; }
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
    "$mirror" "$mirror" > "$root/etc/apt/sources.list"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
if ! $podman image exists "$base"; then
  $podman import --change 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null
fi
# --network host: the RUN steps reach Debian's archive the way this machine does.
$podman build --network host --build-arg BASE="$base" -f deploy/container/Containerfile \
  -t "$tag" .
echo "build.sh: built $tag" >&2
