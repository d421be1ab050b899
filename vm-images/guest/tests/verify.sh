#!/bin/sh
# verify: second boot after rw.sh: are rw.sh's bytes (and the host pattern)
# still on the disk?  Read-only: never writes to /dev/vda.
# usage: vub.test=verify [vub.seed=S]   (same seed as the rw boot)
# Prints VUB: verify-md5 ..., then VUB: verify-ok or VUB: MISMATCH ... (rc 1).
set -eu
. /lib/vub/testlib.sh
rw_layout
bad=0
dev_read 0 $MiB /tmp/host.got
check host-pattern "$(md5f /tmp/host.got)" "$(pat "$HOST_WORD" $MiB | md5sum | cut -d' ' -f1)" || bad=1
dev_read $MiB $((4 * MiB)) /tmp/guest.got
check guest-pattern "$(md5f /tmp/guest.got)" "$(pat "$GUEST_WORD" $((4 * MiB)) | md5sum | cut -d' ' -f1)" || bad=1
dev_read "$TAIL_OFF" $MiB /tmp/tail.got
check tail-pattern "$(md5f /tmp/tail.got)" "$(pat "$TAIL_WORD" $MiB | md5sum | cut -d' ' -f1)" || bad=1
echo "VUB: verify-md5 host=$(md5f /tmp/host.got) guest=$(md5f /tmp/guest.got) tail=$(md5f /tmp/tail.got) tail_offset=$TAIL_OFF"
[ $bad = 0 ] || exit 1
echo "VUB: verify-ok"
