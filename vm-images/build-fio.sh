#!/bin/bash
# Build a small static fio for the test guest from the Debian source package
# of this machine's release (Debian's /usr/bin/fio links 64 shared libraries).
#
# usage: build-fio.sh OUTDIR
# env:   FIO_SRC=fio=3.33-3   what `apt-get source` fetches (default fio/CODENAME,
#                             CODENAME from /etc/os-release)
#        FIO_JOBS=N           make -jN (default 2)
#
# Does nothing if OUTDIR/fio exists (delete OUTDIR to rebuild).  Otherwise,
# as root (apt-get):
#   * installs what is missing of gcc, libc6-dev (libc.a), make and libaio-dev
#     (libaio.a) with `apt-get install --no-install-recommends`;
#   * if no deb-src entry for CODENAME is configured, adds one, derived from
#     the machine's own Debian source (same URI and Signed-By; as in
#     scripts/deps.sh), in /etc/apt/sources.list.d/vhost-user-ubd-src.sources,
#     then runs `apt-get update` (also when the source is unknown to apt or
#     its download fails);
#   * `apt-get source --download-only` into a temp dir (no dpkg-dev needed),
#     unpacks the upstream orig tarball with tar (Debian's patches are not
#     applied: for 3.33-3 they touch only the build system: man path,
#     config.log, hardening flags);
#   * ./configure --build-static --disable-native --disable-lex plus every
#     --disable-X for optional libraries that this fio's configure knows;
#     zlib (no configure switch) is dropped from config-host.{mak,h}, so the
#     result does not depend on whether zlib1g-dev is installed;
#   * make fio, checks that it is static and has libaio, strips it, runs a
#     1 MiB libaio crc32c write+verify on the host as a smoke test;
#   * writes OUTDIR/build-info (versions, flags, libraries), OUTDIR/configure.txt
#     (configure's feature table) and, last,
#     OUTDIR/fio, so its presence means the directory is complete.
# Progress goes to stderr.  Temp dirs: mktemp -d under ${TMPDIR:-/tmp},
# removed on exit.  Not locked: images.sh calls it under its cache lock.
set -eu -o pipefail
OUT=${1:?usage: build-fio.sh OUTDIR}
say() { echo "build-fio: $*" >&2; }
die() { echo "build-fio: error: $*" >&2; exit 1; }

if [ -f "$OUT/fio" ]; then
  say "$OUT/fio exists ($(sed -n 's/^fio=//p' "$OUT/build-info" 2>/dev/null || echo '?')), nothing to do"
  exit 0
fi
T0=$(date +%s)
OURS=/etc/apt/sources.list.d/vhost-user-ubd-src.sources
[ -r /etc/os-release ] && . /etc/os-release
CODENAME=${VERSION_CODENAME:-}
[ -n "$CODENAME" ] || die "no VERSION_CODENAME in /etc/os-release"
SRC=${FIO_SRC:-fio/$CODENAME}
JOBS=${FIO_JOBS:-2}
command -v apt-get >/dev/null 2>&1 || die "no apt-get: this script needs Debian's apt"

APT_UPDATED=
apt_update() {
  [ -n "$APT_UPDATED" ] && return 0
  say "apt-get update"
  apt-get update -qq >&2 || die "apt-get update failed (see above)"
  APT_UPDATED=1
}
need_root() { [ "$(id -u)" = 0 ] || die "$* needs root (apt-get); run as root"; }

# --- build dependencies
installed() { case $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) in ?i*) return 0 ;; esac; return 1; }
missing=
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
command -v make >/dev/null 2>&1 || missing="$missing make"
installed libc6-dev || missing="$missing libc6-dev"
installed libaio-dev || missing="$missing libaio-dev"
if [ -n "$missing" ]; then
  need_root "installing$missing"
  say "apt-get install$missing"
  # shellcheck disable=SC2086
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; then
    apt_update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null ||
      die "apt-get install$missing failed"
  fi
fi
LIBAIO_A=$(gcc -print-file-name=libaio.a)
[ -f "$LIBAIO_A" ] || die "no static libaio.a (gcc -print-file-name=libaio.a): is libaio-dev installed?"
[ -f "$(gcc -print-file-name=libc.a)" ] || die "no static libc.a: is libc6-dev installed?"

# --- a deb-src source for CODENAME
# The machine's Debian source for CODENAME as "URI|Signed-By" (deb822 or
# one-line entries): the helper scripts/deps.sh uses too.
. "$(cd "$(dirname "$0")" && pwd)/../scripts/debian-source.sh"
# Is a deb-src entry for CODENAME configured (uncommented, any file apt reads)?
debsrc_configured() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v want="$CODENAME" '
      function flush() {
        if (types ~ /(^| )deb-src( |$)/ && (" " suites " ") ~ (" " want " ") && enabled !~ /^[Nn]o/) { found = 1; exit }
        types = suites = enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      { line = $0; sub(/^[^:]*:[ \t]*/, "", line) }
      /^Types:/ { types = line } /^Suites:/ { suites = line } /^Enabled:/ { enabled = line }
      END { if (!found) flush(); exit !found }' "$f" && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v want="$CODENAME" '
      $1 == "deb-src" {
        i = 2
        if ($2 ~ /^\[/) { for (; i <= NF; i++) if ($i ~ /\]$/) { i++; break } }
        if ($(i+1) == want) { found = 1; exit }
      }
      END { exit !found }' "$f" && return 0
  done
  return 1
}
if ! debsrc_configured; then
  src=$(debian_source)
  [ -n "$src" ] || die "no Debian '$CODENAME' source in /etc/apt/sources.list{,.d} to derive a deb-src entry from; add 'deb-src' for $CODENAME main by hand"
  uri=${src%%|*}; key=${src#*|}
  need_root "adding $OURS"
  say "adding deb-src $CODENAME main from the machine's Debian mirror ($uri) as $OURS"
  {
    echo "# Added by vhost-user-ubd vm-images/build-fio.sh: fio's Debian source for the test guest."
    echo "Types: deb-src"
    echo "URIs: $uri"
    echo "Suites: $CODENAME"
    echo "Components: main"
    [ -n "$key" ] && echo "Signed-By: $key"
  } > "$OURS"
  apt_update
elif ! apt-cache showsrc --only-source fio 2>/dev/null | grep '^Package: fio' >/dev/null; then
  say "fio's source is unknown to apt"
  apt_update
fi

# --- download and unpack
TMP=$(mktemp -d "${TMPDIR:-/tmp}/vub-fio.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
chmod 0755 "$TMP"; mkdir "$TMP/dl"; chmod 0777 "$TMP/dl"   # apt's _apt sandbox user writes here
download() { (cd "$TMP/dl" && apt-get source -q --download-only "$SRC" </dev/null >"$TMP/apt-source.log" 2>&1); }
say "apt-get source --download-only $SRC"
if ! download; then
  if [ -z "$APT_UPDATED" ]; then
    say "download failed ($(tail -n1 "$TMP/apt-source.log")), running apt-get update and retrying"
    apt_update
    download || { cat "$TMP/apt-source.log" >&2; die "apt-get source $SRC failed"; }
  else
    cat "$TMP/apt-source.log" >&2; die "apt-get source $SRC failed"
  fi
fi
DSC=$(ls "$TMP"/dl/fio_*.dsc)
DEBVER=$(awk '/^Version: / {print $2; exit}' "$DSC")
ORIG=$(ls "$TMP"/dl/fio_*.orig.tar.* | grep -v '\.asc$' | head -n1)
[ -f "$ORIG" ] || die "no orig tarball among: $(ls "$TMP/dl" | tr '\n' ' ')"
say "fio $DEBVER: unpacking ${ORIG##*/}"
mkdir "$TMP/src"
tar -xf "$ORIG" -C "$TMP/src"
S=$(find "$TMP/src" -mindepth 2 -maxdepth 2 -name configure -printf '%h\n' | head -n1)
[ -n "$S" ] || die "no configure in ${ORIG##*/}"

# --- configure (static, minimal)
cd "$S"
FLAGS="--build-static --disable-native --disable-lex"
help=$(./configure --help 2>&1 || true)
for opt in numa rdma rados rbd http gfapi pmem libnfs xnvme libzbc tcmalloc dfs libblkio isal; do
  case "$help" in *"--disable-$opt "*) FLAGS="$FLAGS --disable-$opt" ;; esac
done
say "./configure $FLAGS"
# shellcheck disable=SC2086
TMPDIR=$TMP ./configure $FLAGS > "$TMP/configure.log" 2>&1 || { tail -n 30 "$TMP/configure.log" >&2; die "configure failed"; }
# zlib has no configure switch: it is only for compressed logs and the
# client/server protocol, which the guest does not use.
sed -i '/^CONFIG_ZLIB=/d; /^LIBS+=/s/ *-lz\b//g' config-host.mak
sed -i '/^#define CONFIG_ZLIB$/d' config-host.h
case "$(cat config-host.h config-host.mak)" in *CONFIG_ZLIB*) die "could not remove zlib from config-host.{h,mak}" ;; esac
grep -q '^#define CONFIG_LIBAIO$' config-host.h || { cat "$TMP/configure.log" >&2; die "configure did not find libaio (libaio-dev)"; }

# --- build
say "make -j$JOBS fio"
make -j"$JOBS" V=1 fio > "$TMP/make.log" 2>&1 || { tail -n 40 "$TMP/make.log" >&2; die "make failed"; }
LIBS=$(awk '/ -o fio / {line = $0} END {n = split(line, a, " "); for (i = 1; i <= n; i++) if (a[i] ~ /^-l/ && !seen[a[i]]++) printf "%s ", a[i]}' "$TMP/make.log")
say "linked statically with: ${LIBS:-?}"
case "$(readelf -lW fio) $(readelf -dW fio 2>&1)" in
  *INTERP*|*NEEDED*) readelf -dW fio | grep NEEDED >&2 || true; die "fio is not statically linked" ;;
esac
strip fio
VERSION=$(./fio --version)
case " $(./fio --enghelp 2>/dev/null | tr -s ' \t\n' '   ') " in *" libaio "*) ;; *) false ;; esac || die "$VERSION has no libaio engine"

# --- smoke test on the host: libaio + crc32c verify on a 1 MiB file
mkdir "$TMP/smoke"
if ! (cd "$TMP/smoke" && "$S/fio" --name=smoke --filename="$TMP/smoke/f" --size=1M --bs=4k \
        --rw=randwrite --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --output="$TMP/smoke.out" >/dev/null 2>&1); then
  cat "$TMP/smoke.out" >&2 2>/dev/null || true
  die "smoke test of the new fio failed"
fi

# --- install
mkdir -p "$OUT"
{
  echo "fio=$VERSION"
  echo "debian_source=fio $DEBVER ($SRC)"
  echo "orig=${ORIG##*/} sha256=$(sha256sum "$ORIG" | cut -d' ' -f1)"
  echo "configure=$FLAGS (zlib removed from config-host)"
  echo "libs=${LIBS% }"
  echo "gcc=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
  echo "libaio-dev=$(dpkg-query -W -f='${Version}' libaio-dev 2>/dev/null || echo '?')"
  echo "size=$(stat -c %s fio)"
} > "$OUT/build-info"
{ cat "$TMP/configure.log"; echo "# build-fio.sh then removed zlib (CONFIG_ZLIB, -lz) from config-host.{h,mak}"; } > "$OUT/configure.txt"
install -m 0755 fio "$OUT/fio.tmp"
mv -f "$OUT/fio.tmp" "$OUT/fio"
say "$VERSION (Debian $DEBVER) -> $OUT/fio ($(stat -c %s "$OUT/fio") bytes, static) in $(( $(date +%s) - T0 )) s"
