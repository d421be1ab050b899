#!/bin/bash
# One entry point for the guest images: fetch the kernel and build the
# initramfs into vm-images/cache/ (git-ignored), each only when missing or
# out of date, and print where they are.
#
# usage: vm-images/images.sh
# env:   VUB_CACHE=DIR  cache directory (default vm-images/cache)
#        KERNEL_PKG=... pin the kernel package (see fetch-kernel.sh; delete
#                       the cache's kernel/ directory to switch)
# stdout (one KEY=VALUE per line, absolute paths):
#   KERNEL=.../cache/kernel/vmlinuz
#   INITRD=.../cache/initrd.cpio.gz
#   KVER=6.1.0-NN-cloud-amd64
# Progress goes to stderr.  Concurrent callers (parallel tests) serialise on
# a lock file in the cache, so it is safe to call from every test.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VUB_CACHE:-$HERE/cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
exec 9>"$CACHE/.lock"
flock 9
"$HERE/fetch-kernel.sh" "$CACHE/kernel" >&2
"$HERE/build-initramfs.sh" "$CACHE/kernel" "$CACHE/initrd.cpio.gz" >&2
echo "KERNEL=$CACHE/kernel/vmlinuz"
echo "INITRD=$CACHE/initrd.cpio.gz"
echo "KVER=$(cat "$CACHE/kernel/kver")"
