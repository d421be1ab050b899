#!/bin/sh
# ext4: first boot of the filesystem test.  DESTROYS the disk contents.
# usage: vub.test=ext4 [vub.seed=S] [vub.fs_kb=KBYTES]   (second boot: ext4-verify)
# busybox has no mkfs.ext4, only mke2fs (ext2, no journal); the cloud kernel
# has ext4 built in and mounts ext2 through the ext4 driver (-t ext4).
# Makes the filesystem (whole disk, or the first vub.fs_kb KiB), mounts it,
# writes the files listed in testlib.sh (EXT4_FILES, known md5s) plus an
# MD5SUMS manifest, syncs, unmounts, drops caches, remounts read-only and
# checks them once.  Prints VUB: ext4-file NAME size=.. md5=.. per file, then
# VUB: ext4-ok, or MISMATCH/failed lines and rc 1.
set -eu
. /lib/vub/testlib.sh
mke2fs -F -L vubtest "$DEV" ${VUB_FS_KB:-} > /tmp/mkfs.log 2>&1 || fail "mke2fs: $(tail -3 /tmp/mkfs.log)"
mount -t ext4 "$DEV" /mnt || fail "mount -t ext4 $DEV"
: > /tmp/want
while read -r name size word; do
  mkdir -p "/mnt/$(dirname "$name")"
  pat "$word$SEEDSFX" "$size" > "/mnt/$name"
  sum=$(pat "$word$SEEDSFX" "$size" | md5sum | cut -d' ' -f1)
  echo "$sum  $name" >> /tmp/want
  echo "VUB: ext4-file $name size=$size md5=$sum"
done <<LIST
$EXT4_FILES
LIST
cp /tmp/want /mnt/MD5SUMS
sync
umount /mnt || fail "umount"
drop_caches
mount -t ext4 -o ro "$DEV" /mnt || fail "remount ro"
(cd /mnt && md5sum -c /tmp/want > /tmp/check.log 2>&1) || { sed 's/^/VUB: MISMATCH /' /tmp/check.log | grep -v ': OK$'; umount /mnt; exit 1; }
umount /mnt
echo "VUB: ext4-ok files=$(wc -l < /tmp/want)"
