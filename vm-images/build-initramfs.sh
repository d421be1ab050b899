#!/bin/bash
# Build the test guest's initramfs (gzip'd cpio newc).
#
# usage: build-initramfs.sh KERNELDIR OUT [FIO]
#   KERNELDIR  as made by fetch-kernel.sh (kver, modules/<kver>/)
#   OUT        e.g. cache/initrd.cpio.gz
#   FIO        a static fio binary (build-fio.sh), installed as /usr/bin/fio
#              when the file exists; images.sh passes cache/fio/fio
# env: FORCE=1 rebuilds even when OUT is up to date.
#
# OUT is rebuilt only when it is missing or older than any file under guest/,
# this script, modclosure.sh, KERNELDIR/kver or FIO, or when OUT.manifest
# (which fio OUT holds: "fio SIZE CKSUM" or "fio none") does not match FIO.
# Contents:
#   /bin/busybox (busybox-static) + a symlink per applet
#   /lib/modules/NAME.ko + /lib/modules/modules.order (load order, resolved
#       through .modinfo depends=, see modclosure.sh)
#   /init (guest/init), /lib/vub/testlib.sh (guest/testlib.sh),
#   /tests/*.sh (guest/tests/*.sh)
#   /usr/bin/fio (FIO, if given and present)
# Written with `busybox cpio -o -H newc -R 0:0` (no root-only steps: the
# guest mounts devtmpfs instead of needing device nodes) and gzip.
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KDIR=${1:?usage: build-initramfs.sh KERNELDIR OUT}
OUT=${2:?usage: build-initramfs.sh KERNELDIR OUT}
BUSYBOX=${BUSYBOX:-/bin/busybox}
KVER=$(cat "$KDIR/kver")
MODROOT=$KDIR/modules/$KVER
FIO=${3:-}
[ -n "$FIO" ] && [ ! -f "$FIO" ] && FIO=
MANIFEST="fio none"
[ -n "$FIO" ] && MANIFEST="fio $(stat -c %s "$FIO") $(cksum < "$FIO" | cut -d' ' -f1)"

if [ -f "$OUT" ] && [ "${FORCE:-0}" != 1 ]; then
  newer=$(find "$HERE/guest" "$HERE/build-initramfs.sh" "$HERE/modclosure.sh" "$KDIR/kver" ${FIO:+"$FIO"} \
          -newer "$OUT" -print -quit)
  if [ -z "$newer" ] && [ "$(cat "$OUT.manifest" 2>/dev/null)" != "$MANIFEST" ]; then
    newer="$OUT.manifest (now: $MANIFEST)"
  fi
  if [ -z "$newer" ]; then
    echo "build-initramfs: $OUT is up to date"
    exit 0
  fi
  echo "build-initramfs: $newer is newer than $OUT, rebuilding"
fi

[ -x "$BUSYBOX" ] || { echo "build-initramfs: $BUSYBOX missing: apt-get install -y busybox-static" >&2; exit 1; }
if ldd "$BUSYBOX" >/dev/null 2>&1; then   # ldd fails on a static binary
  echo "build-initramfs: $BUSYBOX is dynamically linked: apt-get install -y busybox-static" >&2; exit 1
fi

ST=$(mktemp -d "${TMPDIR:-/tmp}/vub-initramfs.XXXXXX")
trap 'rm -rf "$ST"; rm -f "$OUT.tmp.$$"' EXIT
mkdir -p "$ST"/bin "$ST"/sbin "$ST"/etc "$ST"/proc "$ST"/sys "$ST"/dev "$ST"/tmp \
         "$ST"/mnt "$ST"/tests "$ST"/lib/modules "$ST"/lib/vub
cp "$BUSYBOX" "$ST/bin/busybox"
for a in $("$BUSYBOX" --list); do
  [ "$a" = busybox ] || ln -s busybox "$ST/bin/$a"
done

: > "$ST/lib/modules/modules.order"
while IFS= read -r f; do
  n=${f##*/}; n=${n%.ko}; n=${n//-/_}
  cp "$MODROOT/$f" "$ST/lib/modules/$n.ko"
  echo "$n" >> "$ST/lib/modules/modules.order"
done < <("$HERE/modclosure.sh" "$MODROOT")

install -m 0755 "$HERE/guest/init" "$ST/init"
install -m 0644 "$HERE/guest/testlib.sh" "$ST/lib/vub/testlib.sh"
for t in "$HERE"/guest/tests/*.sh; do install -m 0755 "$t" "$ST/tests/"; done
if [ -n "$FIO" ]; then
  mkdir -p "$ST/usr/bin"
  install -m 0755 "$FIO" "$ST/usr/bin/fio"
fi
echo "$KVER" > "$ST/etc/vub-kver"

mkdir -p "$(dirname "$OUT")"
( cd "$ST" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null ) \
  | gzip -n -6 > "$OUT.tmp.$$"
mv -f "$OUT.tmp.$$" "$OUT"
echo "$MANIFEST" > "$OUT.manifest"
echo "build-initramfs: $OUT ($(stat -c %s "$OUT") bytes; modules: $(tr '\n' ' ' < "$ST/lib/modules/modules.order"); tests: $(cd "$ST/tests" && ls | sed 's/\.sh$//' | tr '\n' ' ');" \
     "fio: $([ -n "$FIO" ] && echo "/usr/bin/fio $(stat -c %s "$FIO") bytes" || echo none))"
