#!/bin/sh
# resize: the disk grows while the guest runs (the host resizes it through
# the daemon's control socket and the daemon sends CONFIG_CHANGE_MSG).
# usage: vub.test=resize [vub.seed=S]     (run by /init under sh -e)
#  1. prints VUB: resize-wait sectors=N and waits (60 s at most) for
#     /sys/block/vda/size to change;
#  2. prints VUB: resized from=N to=M, writes `yes GUESTRESIZE-S` to the
#     last 4 KiB of the new size (O_DIRECT + fsync), reads it back;
# Prints VUB: resize-ok tail_offset=BYTES, or a failed/MISMATCH line.
set -eu
. /lib/vub/testlib.sh
old=$(cat /sys/block/vda/size)
echo "VUB: resize-wait sectors=$old"
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
  i=$((i + 1))
  [ $i -lt 600 ] || fail "the size is still $old sectors after 60 s"
  sleep 0.1
done
new=$(cat /sys/block/vda/size)
echo "VUB: resized from=$old to=$new after=$((i / 10)).$((i % 10))s"
off=$(( (new - 8) * 512 ))
pat "GUESTRESIZE-${VUB_SEED:-0}" 4096 > /tmp/tail.want
dev_write /tmp/tail.want "$off"
drop_caches
dev_read "$off" 4096 /tmp/tail.got
check resize-tail "$(md5f /tmp/tail.got)" "$(md5f /tmp/tail.want)" || exit 1
echo "VUB: resize-ok tail_offset=$off"
