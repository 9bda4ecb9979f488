#!/usr/bin/env bash
# Fetch extra Debian kernels for the VM matrix into a cache, without installing them: the
# host's own package set stays as it is. For each wanted kernel, a separate sources list
# (the suite on the same Debian mirror this machine uses) is read with apt's Dir:: options,
# then `apt-get download` and `dpkg-deb -x` unpack image, modules and headers into
#   $CLOSEWAIT_VM_CACHE/kernels/RELEASE/{boot,lib/modules,usr/src}
# which tests/vm/runner.py boots (virtme-ng finds the modules next to the image).
#
#   scripts/vm-kernels.sh [--refresh]     idempotent: a kernel already unpacked is kept
set -euo pipefail

CACHE=${CLOSEWAIT_VM_CACHE:-/var/lib/closewait-vm}
refresh=0
[ "${1:-}" = "--refresh" ] && refresh=1

# suite  image metapackage (its Depends names the versioned image)
WANTED=(
  "bullseye linux-image-amd64"      # Debian 11: Linux 5.10
  "bookworm linux-image-rt-amd64"   # Debian 12: Linux 6.1 PREEMPT_RT
)

# The Debian archive and security URIs this machine already uses (deb822 or one-line format).
mirror() {
  local want=$1 uri
  uri=$(awk -v want="$want" '
    /^URIs:/ { u=$2 } /^Suites:/ { s=$0 }
    /^$/ { if (u != "" && ((want=="security") == (s ~ /-security/))) { print u; exit } u=""; s="" }
    END { if (u != "" && ((want=="security") == (s ~ /-security/))) print u }' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
  if [ -z "$uri" ]; then
    uri=$(awk -v want="$want" '$1=="deb" && $2 !~ /^\[/ { if ((want=="security") == ($3 ~ /-security/)) { print $2; exit } }' \
      /etc/apt/sources.list 2>/dev/null || true)
  fi
  case "$want:$uri" in
    archive:) uri=http://deb.debian.org/debian ;;
    security:) uri=http://deb.debian.org/debian-security ;;
  esac
  echo "$uri"
}

# apt options that read only this suite's lists and an empty dpkg status (so candidates are
# the suite's own versions, not the host's installed ones).
apt_opts() {
  local d=$CACHE/apt-$1
  echo "-o Dir::Etc::sourcelist=$d/sources.list -o Dir::Etc::sourceparts=- -o Dir::State::Lists=$d/lists" \
       "-o Dir::Cache=$d/cache -o Dir::State::status=$d/status -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
}

update_suite() {
  local suite=$1 d=$CACHE/apt-$1 key=/usr/share/keyrings/debian-archive-keyring.gpg
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/debs"
  : > "$d/status"
  {
    echo "deb [signed-by=$key] $(mirror archive) $suite main"
    echo "deb [signed-by=$key] $(mirror security) $suite-security main"
  } > "$d/sources.list"
  # shellcheck disable=SC2046
  apt-get -qq $(apt_opts "$suite") update
}

depends_on() {  # the first Depends of a package in a suite
  # shellcheck disable=SC2046
  apt-cache $(apt_opts "$1") depends "$2" | awk '/Depends:/ { print $2 }'
}

fetch_kernel() {
  local suite=$1 meta=$2 stamp=$3 d=$CACHE/apt-$1 image release headers root pkgs deb
  update_suite "$suite"
  image=$(depends_on "$suite" "$meta" | head -1)
  release=${image#linux-image-}
  root=$CACHE/kernels/$release
  if [ -e "$root/.complete" ]; then
    echo "vm-kernels: $release already in $root"; echo "$release" > "$stamp"; return
  fi
  headers=linux-headers-$release
  pkgs=("$image" "$headers")
  # the common half and linux-kbuild-X (the flavour's scripts/ and tools/ point there)
  while read -r dep; do
    case "$dep" in linux-headers-*|linux-kbuild-*) pkgs+=("$dep") ;; esac
  done < <(depends_on "$suite" "$headers")
  echo "vm-kernels: fetching ${pkgs[*]} ($suite)"
  rm -rf "$d/debs" "$root.tmp" && mkdir -p "$d/debs" "$root.tmp"
  # shellcheck disable=SC2046
  (cd "$d/debs" && apt-get -qq $(apt_opts "$suite") download "${pkgs[@]}")
  for deb in "$d"/debs/*.deb; do dpkg-deb -x "$deb" "$root.tmp"; done
  depmod -b "$root.tmp" "$release"   # Debian's packages ship no modules.dep
  printf '%s\n' "${pkgs[@]}" > "$root.tmp/.complete"
  rm -rf "$root" && mv "$root.tmp" "$root"
  rm -rf "$d/debs"
  echo "$release" > "$stamp"
  echo "vm-kernels: $release unpacked in $root"
}

for w in "${WANTED[@]}"; do
  # shellcheck disable=SC2086
  set -- $w
  stamp=$CACHE/kernels/.$1-$2   # the release fetched last time for this suite and package
  if [ "$refresh" = 0 ] && [ -e "$CACHE/kernels/$(cat "$stamp" 2>/dev/null)/.complete" ]; then
    continue   # already there: no network
  fi
  fetch_kernel "$1" "$2" "$stamp"
done
