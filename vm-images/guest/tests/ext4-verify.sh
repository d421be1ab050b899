#!/bin/sh
# ext4-verify: second boot after ext4.sh: mount the filesystem read-only and
# check every file's md5 against the regenerated pattern and the MD5SUMS
# manifest ext4.sh stored.  Never writes to the disk.
# usage: vub.test=ext4-verify [vub.seed=S]   (same seed as the ext4 boot)
# Prints VUB: ext4-verify-ok, or VUB: MISMATCH ... lines and rc 1.
set -eu
. /lib/vub/testlib.sh
mount -t ext4 -o ro "$DEV" /mnt || fail "mount -t ext4 -o ro $DEV"
bad=0
n=0
while read -r name size word; do
  n=$((n + 1))
  want=$(pat "$word$SEEDSFX" "$size" | md5sum | cut -d' ' -f1)
  if [ ! -f "/mnt/$name" ]; then echo "VUB: MISMATCH ext4 file $name missing"; bad=1; continue; fi
  got=$(md5f "/mnt/$name")
  gsz=$(stat -c %s "/mnt/$name")
  [ "$gsz" = "$size" ] || { echo "VUB: MISMATCH ext4 file $name size=$gsz want=$size"; bad=1; }
  check "ext4-file $name" "$got" "$want" || bad=1
done <<LIST
$EXT4_FILES
LIST
if [ -f /mnt/MD5SUMS ]; then
  (cd /mnt && md5sum -c MD5SUMS > /tmp/check.log 2>&1) || { sed 's/^/VUB: MISMATCH manifest /' /tmp/check.log | grep -v ': OK$'; bad=1; }
else
  echo "VUB: MISMATCH ext4 MD5SUMS missing"; bad=1
fi
umount /mnt
[ $bad = 0 ] || exit 1
echo "VUB: ext4-verify-ok files=$n"
