#!/bin/bash
# One entry point for the guest images: fetch the kernel, build a static
# fio (build-fio.sh, from Debian's source package) and build the initramfs
# into vm-images/cache/ (git-ignored), each only when missing or out of
# date, and print where they are.
#
# usage: vm-images/images.sh
# env:   VUB_CACHE=DIR  cache directory (default vm-images/cache)
#        KERNEL_PKG=... pin the kernel package (see fetch-kernel.sh; delete
#                       the cache's kernel/ directory to switch)
#        FIO_SRC=...    what build-fio.sh fetches (delete the cache's fio/
#                       directory to rebuild)
# stdout (one KEY=VALUE per line, absolute paths):
#   KERNEL=.../cache/kernel/vmlinuz
#   INITRD=.../cache/initrd.cpio.gz
#   KVER=6.1.0-NN-cloud-amd64
#   FIO=.../cache/fio/fio          (also /usr/bin/fio in the initramfs)
# Progress goes to stderr.  Concurrent callers (parallel tests) serialise on
# a lock file in the cache, so it is safe to call from every test.
# The first call builds fio (as root: apt-get; about 30 s here); if that
# fails, images.sh fails, because the fio-verify test needs it.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VUB_CACHE:-$HERE/cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
exec 9>"$CACHE/.lock"
flock 9
"$HERE/fetch-kernel.sh" "$CACHE/kernel" >&2
if ! "$HERE/build-fio.sh" "$CACHE/fio" >&2; then
  echo "images: error: building fio into $CACHE/fio failed (see the build-fio: lines above)." \
       "The guest needs /usr/bin/fio for the fio-verify test; fix the cause and run images.sh again." >&2
  exit 1
fi
"$HERE/build-initramfs.sh" "$CACHE/kernel" "$CACHE/initrd.cpio.gz" "$CACHE/fio/fio" >&2
echo "KERNEL=$CACHE/kernel/vmlinuz"
echo "INITRD=$CACHE/initrd.cpio.gz"
echo "KVER=$(cat "$CACHE/kernel/kver")"
echo "FIO=$CACHE/fio/fio"
