#!/bin/sh
# reconnect: long-running verified I/O while the host kills and restarts the
# backend (QEMU needs -chardev ...,reconnect=1: run-vm.sh --reconnect).
# usage: vub.test=reconnect [vub.iters=N (30)] [vub.sleep=SECONDS (0.2)] [vub.seed=S]
# Iteration i: write 1 MiB of `yes ITERi[-S]` at (8 + i mod span) MiB with
# O_DIRECT + fsync, read it back with O_DIRECT, compare.  Prints
#   VUB: iter i ok t=UPTIME dt=SECONDS      (dt shows the stall while the backend is down)
# or VUB: MISMATCH / failed lines.  At the end every kernel log line about
# I/O errors on the disk is printed as VUB: dmesg-error LINE (a failure), and
# VUB: reconnect-done iters=N bad=B.
set -eu
. /lib/vub/testlib.sh
N=${VUB_ITERS:-30}
SLP=${VUB_SLEEP:-0.2}
span=$(( $(devsize) / MiB - 9 ))
[ "$span" -ge 1 ] || fail "disk too small"
i=0; bad=0
while [ "$i" -lt "$N" ]; do
  t0=$(up)
  pat "ITER$i$SEEDSFX" $MiB > /tmp/p
  off=$(( (8 + i % span) * MiB ))
  if ! dd if=/tmp/p of="$DEV" bs=$MiB seek=$off oflag=direct,seek_bytes conv=notrunc,fsync 2>/tmp/dd.err; then
    echo "VUB: iter $i write failed: $(cat /tmp/dd.err)"; bad=1
  elif ! dd if="$DEV" of=/tmp/g bs=$MiB skip=$off count=$MiB iflag=direct,skip_bytes,count_bytes 2>/tmp/dd.err; then
    echo "VUB: iter $i read failed: $(cat /tmp/dd.err)"; bad=1
  elif [ "$(md5f /tmp/g)" != "$(md5f /tmp/p)" ]; then
    echo "VUB: iter $i MISMATCH at offset $off"; bad=1
  else
    t1=$(up)
    echo "VUB: iter $i ok t=$t1 dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b - a}')"
  fi
  i=$((i + 1))
  sleep "$SLP"
done
dmesg | grep -iE 'I/O error|Buffer I/O|blk_update_request|(vda|virtio_blk|virtio).*(error|fail|timeout|abort)' > /tmp/dmesg.err || true
while read -r l; do echo "VUB: dmesg-error $l"; bad=1; done < /tmp/dmesg.err
echo "VUB: reconnect-done iters=$N bad=$bad"
[ $bad = 0 ]
