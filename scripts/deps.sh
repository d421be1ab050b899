#!/bin/bash
# Install the Debian packages the interop, boot and benchmark runs need.
#
# usage: scripts/deps.sh            (what `make deps` runs)
# env:   VUB_QEMU_SUITE=SUITE       force the suite QEMU comes from
#                                   (e.g. bookworm or bookworm-backports)
#        VUB_DEPS_DRY_RUN=1         say what would be done, change nothing
#
# Rules:
#  * QEMU's system emulator comes from the same suite as the qemu-utils the
#    machine already has: qemu-utils 10 from bookworm-backports breaks
#    qemu-system-common 7.2 from bookworm main, so a plain
#    `apt-get install qemu-system-x86` fails ("held broken packages").
#    When that suite is not in the apt sources, a source for it is added,
#    derived from the machine's own Debian source (same mirror, same key).
#    With no qemu-utils at all, QEMU comes from backports when the machine's
#    mirror has it (the project's platform is QEMU 10), else from main.
#  * Nothing the machine came with is removed or downgraded: every install is
#    simulated first and refused if apt would remove or downgrade a package.
#  * apt runs only when a needed binary is missing. At the end the versions
#    in use are printed, and a still-missing binary fails with its package
#    named.
set -euo pipefail

# nbdfuse, fusermount3, ip: a base on a network store (tests/network_base.rs,
# bench/network_base.py: qemu-nbd exports it, nbdfuse mounts it as a file).
# virsh, libvirtd, virt-xml-validate, xmllint: a libvirt domain on our socket
# (tests/libvirt.rs). libvirt from the codename's suite (9.0 on bookworm),
# not backports (which would pull systemd 254); its QEMU driver is a module
# with no binary to look for, so it is a base package.
NEED_BINS="uml_mkcow uml_moo qemu-system-x86_64 qemu-storage-daemon qemu-img busybox mkfs.ext4 python3 nbdfuse fusermount3 ip virsh libvirtd virt-xml-validate xmllint"
BASE_PKGS="uml-utilities busybox-static python3 e2fsprogs libnbd-bin fuse3 iproute2 libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu libxml2-utils"
QEMU_PKGS="qemu-system-x86 qemu-utils"
OURS=/etc/apt/sources.list.d/vhost-user-ubd-backports.sources
DRY=${VUB_DEPS_DRY_RUN:-}

say() { echo "deps: $*"; }
die() { echo "deps: error: $*" >&2; exit 1; }

pkg_of() {
  case $1 in
    uml_mkcow|uml_moo) echo uml-utilities ;;
    qemu-system-x86_64) echo qemu-system-x86 ;;
    qemu-storage-daemon|qemu-img) echo qemu-utils ;;
    busybox) echo busybox-static ;;
    mkfs.ext4) echo e2fsprogs ;;
    nbdfuse) echo libnbd-bin ;;
    fusermount3) echo fuse3 ;;
    ip) echo iproute2 ;;
    virsh|virt-xml-validate) echo libvirt-clients ;;
    libvirtd) echo libvirt-daemon ;;
    xmllint) echo libxml2-utils ;;
    *) echo "$1" ;;
  esac
}

missing_bins() {
  local b out=""
  for b in $NEED_BINS; do command -v "$b" >/dev/null 2>&1 || out="$out $b"; done
  echo "${out# }"
}

installed_version() { { dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$1 ~ /^.i/ {print $2}'; }

report_versions() {
  local p v
  for p in qemu-utils qemu-system-x86 qemu-system-common uml-utilities busybox-static e2fsprogs python3 libnbd-bin fuse3 libvirt-daemon; do
    v=$(installed_version "$p")
    say "  $p ${v:-(not installed)}"
  done
  command -v qemu-system-x86_64 >/dev/null 2>&1 && say "  $(qemu-system-x86_64 --version | head -n1)"
  command -v qemu-storage-daemon >/dev/null 2>&1 && say "  $(qemu-storage-daemon --version | head -n1)"
  return 0
}

missing=$(missing_bins)
if [ -z "$missing" ]; then
  say "all needed binaries present:"
  report_versions
  exit 0
fi
say "missing: $missing"
[ "$(id -u)" = 0 ] || die "installing needs root (apt-get); as root: make deps, or install: $(for b in $missing; do pkg_of "$b"; done | sort -u | tr '\n' ' ')"
command -v apt-get >/dev/null 2>&1 || die "no apt-get: install by hand: $(for b in $missing; do pkg_of "$b"; done | sort -u | tr '\n' ' ')"

. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
BPO=$CODENAME-backports

# debian_source (CODENAME, OURS): scripts/debian-source.sh.
. "$(dirname "$0")/debian-source.sh"

suite_in_sources() {
  # apt knows the suite when its Release file was fetched ...
  apt-cache policy 2>/dev/null | grep "a=$1,\|n=$1,\|/$1 " >/dev/null && return 0
  # ... or will after the next update: an uncommented entry in a file apt reads.
  grep -sE "^[^#]*[[:space:]]$1([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources >/dev/null
}

add_backports_source() {
  suite_in_sources "$BPO" && return 0
  local src uri key
  src=$(debian_source)
  [ -n "$src" ] || die "no Debian '$CODENAME' source in /etc/apt/sources.list{,.d} to derive '$BPO' from; add a $BPO source by hand, or set VUB_QEMU_SUITE=$CODENAME"
  uri=${src%%|*}; key=${src#*|}
  say "adding $BPO from the machine's Debian mirror ($uri) as $OURS"
  [ -n "$DRY" ] && return 0
  {
    echo "# Added by vhost-user-ubd scripts/deps.sh: QEMU must come from the suite of the installed qemu-utils."
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: $BPO"
    echo "Components: main"
    [ -n "$key" ] && echo "Signed-By: $key"
  } > "$OURS"
  APT_UPDATED=
}

APT_UPDATED=
apt_update() {
  [ -n "$APT_UPDATED" ] && return 0
  say "apt-get update"
  [ -n "$DRY" ] || apt-get update -qq || die "apt-get update failed (see above): check the sources in /etc/apt/sources.list.d/"
  APT_UPDATED=1
}

# Install with a simulation first: refuse removals and downgrades.
safe_install() {
  local sim bad
  sim=$(apt-get install -s --no-install-recommends "$@" 2>&1) || {
    echo "$sim" | tail -n 20 >&2
    die "apt cannot install: $* (simulation above); this step changed nothing"
  }
  bad=$(echo "$sim" | awk '/^Remv / {print "remove " $2}')
  bad="$bad$(echo "$sim" | awk '/^Inst / && $3 ~ /^\[/ {old=$3; gsub(/[][]/, "", old); new=$4; sub(/^\(/, "", new); print $2, old, new}' |
    while read -r p old new; do
      # an `if`, not `&&`: an upgrade (the common case) must not leave the
      # loop, and with it this assignment, failing under `set -e`
      if dpkg --compare-versions "$new" lt "$old"; then echo " downgrade $p $old -> $new"; fi
    done)"
  [ -z "$bad" ] || die "installing '$*' would $bad; refusing (this script never removes or downgrades what the machine has). Set VUB_QEMU_SUITE to the suite of your QEMU packages."
  say "apt-get install $*"
  [ -n "$DRY" ] && return 0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove "$@" >/dev/null ||
    die "apt-get install $* failed"
}

# Which suite QEMU comes from (decided before apt runs, so that one
# `apt-get update` also reads an added backports source).
utils_ver=$(installed_version qemu-utils)
if [ -n "${VUB_QEMU_SUITE:-}" ]; then
  suite=$VUB_QEMU_SUITE
  why="VUB_QEMU_SUITE"
elif [ -n "$utils_ver" ]; then
  case $utils_ver in
    *~bpo*|*bpo[0-9]*) suite=$BPO ;;
    *) suite=$CODENAME ;;
  esac
  why="installed qemu-utils $utils_ver"
else
  suite=$BPO
  why="no QEMU installed; the platform is QEMU 10"
fi
if [ "$suite" = "$BPO" ]; then
  if ! suite_in_sources "$BPO"; then
    if [ -z "${VUB_QEMU_SUITE:-}" ] && [ -z "$utils_ver" ] && [ -z "$(debian_source)" ]; then
      suite=$CODENAME; why="no QEMU installed and no mirror to derive $BPO from"
    else
      add_backports_source
    fi
  fi
fi
say "QEMU from $suite ($why)"
apt_update

base=""
for p in $BASE_PKGS; do [ -n "$(installed_version "$p")" ] || base="$base $p"; done
# shellcheck disable=SC2086
[ -z "$base" ] || safe_install $base

qemu=""
for p in $QEMU_PKGS; do [ -n "$(installed_version "$p")" ] || qemu="$qemu $p"; done
if [ -n "$qemu" ]; then
  # shellcheck disable=SC2086
  if [ "$suite" = "$CODENAME" ]; then safe_install $qemu; else safe_install -t "$suite" $qemu; fi
fi

[ -n "$DRY" ] && { say "dry run: nothing changed"; exit 0; }
still=$(missing_bins)
say "versions in use:"
report_versions
[ -z "$still" ] || die "still missing after install: $still (package(s): $(for b in $still; do pkg_of "$b"; done | sort -u | tr '\n' ' ')); install them by hand with apt-get"
say "done"
