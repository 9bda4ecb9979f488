#!/bin/sh
# Build closewait-trace_VERSION_all.deb with Debian's tools (dpkg-buildpackage, debhelper).
#   deploy/debian/build.sh [OUTDIR]      (default OUTDIR: dist/)
# The packaging lives in deploy/debian/debian; it is put at the top of a copy of the source
# tree, where dpkg-buildpackage expects it, together with the systemd unit and its defaults.
set -eu
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:-dist}")
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/closewait-trace-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' closewait_trace/__init__.py)
mkdir -p "$src"
cp -a closewait_trace bpf README.md "$src/"
mkdir -p "$src/docs" "$src/deploy"
cp -a docs/deploy.md docs/json-schema.md "$src/docs/"
cp -a deploy/container deploy/prometheus deploy/grafana "$src/deploy/"
cp -a deploy/debian/debian "$src/debian"
cp deploy/systemd/closewait-trace.service "$src/debian/closewait-trace.service"
cp deploy/systemd/closewait-trace.default "$src/debian/closewait-trace.default"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
(cd "$src" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) \
  || { tail -30 "$work/build.log" >&2; exit 1; }
mv "$work"/closewait-trace_*_all.deb "$out/"
ls "$out"/closewait-trace_*_all.deb
