#!/bin/sh
# mq: multi-queue check.
# usage: vub.test=mq [vub.queues=N]   (run-vm.sh passes vub.queues=--queues)
# Prints VUB: nr_hw_queues=N (directories in /sys/block/vda/mq).  If
# vub.queues is set, the guest must see min(N, online CPUs) queues (virtio-blk
# uses no more queues than CPUs), else VUB: MISMATCH.  Then, pinned to each
# CPU in turn (so each hardware queue gets requests), writes 1 MiB at
# 16 MiB + cpu MiB with O_DIRECT, reads it back and compares.
set -eu
. /lib/vub/testlib.sh
n=$(ls -d /sys/block/vda/mq/*/ | wc -l)
ncpu=$(nproc)
echo "VUB: nr_hw_queues=$n cpus=$ncpu"
bad=0
if [ -n "${VUB_QUEUES:-}" ]; then
  want=$VUB_QUEUES; [ "$ncpu" -lt "$want" ] && want=$ncpu
  [ "$n" = "$want" ] || { echo "VUB: MISMATCH nr_hw_queues=$n want=$want (queues=$VUB_QUEUES cpus=$ncpu)"; bad=1; }
fi
[ "$(devsize)" -ge $(( (16 + ncpu) * MiB )) ] || fail "disk too small for mq I/O"
c=0
while [ $c -lt "$ncpu" ]; do
  pat "MQCPU$c$SEEDSFX" $MiB > /tmp/p
  off=$(( (16 + c) * MiB ))
  taskset -c $c dd if=/tmp/p of="$DEV" bs=$MiB seek=$off oflag=direct,seek_bytes conv=notrunc,fsync 2>/tmp/dd.err \
    || fail "write on cpu $c: $(cat /tmp/dd.err)"
  taskset -c $c dd if="$DEV" of=/tmp/g bs=$MiB skip=$off count=$MiB iflag=direct,skip_bytes,count_bytes 2>/tmp/dd.err \
    || fail "read on cpu $c: $(cat /tmp/dd.err)"
  check "mq-cpu$c" "$(md5f /tmp/g)" "$(md5f /tmp/p)" || bad=1
  c=$((c + 1))
done
[ $bad = 0 ] || exit 1
echo "VUB: mq-ok"
