#!/bin/bash
# Build the test guest's initramfs (gzip'd cpio newc).
#
# usage: build-initramfs.sh KERNELDIR OUT
#   KERNELDIR  as made by fetch-kernel.sh (kver, modules/<kver>/)
#   OUT        e.g. cache/initrd.cpio.gz
# env: FORCE=1 rebuilds even when OUT is up to date.
#
# OUT is rebuilt only when it is missing or older than any file under guest/,
# this script, modclosure.sh or KERNELDIR/kver.  Contents:
#   /bin/busybox (busybox-static) + a symlink per applet
#   /lib/modules/NAME.ko + /lib/modules/modules.order (load order, resolved
#       through .modinfo depends=, see modclosure.sh)
#   /init (guest/init), /lib/vub/testlib.sh (guest/testlib.sh),
#   /tests/*.sh (guest/tests/*.sh)
# Written with `busybox cpio -o -H newc -R 0:0` (no root-only steps: the
# guest mounts devtmpfs instead of needing device nodes) and gzip.
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KDIR=${1:?usage: build-initramfs.sh KERNELDIR OUT}
OUT=${2:?usage: build-initramfs.sh KERNELDIR OUT}
BUSYBOX=${BUSYBOX:-/bin/busybox}
KVER=$(cat "$KDIR/kver")
MODROOT=$KDIR/modules/$KVER

if [ -f "$OUT" ] && [ "${FORCE:-0}" != 1 ]; then
  newer=$(find "$HERE/guest" "$HERE/build-initramfs.sh" "$HERE/modclosure.sh" "$KDIR/kver" \
          -newer "$OUT" -print -quit)
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
echo "$KVER" > "$ST/etc/vub-kver"

mkdir -p "$(dirname "$OUT")"
( cd "$ST" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null ) \
  | gzip -n -6 > "$OUT.tmp.$$"
mv -f "$OUT.tmp.$$" "$OUT"
echo "build-initramfs: $OUT ($(stat -c %s "$OUT") bytes; modules: $(tr '\n' ' ' < "$ST/lib/modules/modules.order"); tests: $(cd "$ST/tests" && ls | sed 's/\.sh$//' | tr '\n' ' '))"
