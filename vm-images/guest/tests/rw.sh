#!/bin/sh
# rw: read/write smoke test on /dev/vda (first boot; verify.sh is the second).
# usage: vub.test=rw [vub.seed=S]     (run by /init under sh -e)
# The host wrote `yes HOSTPATTERN | head -c 1M` at offset 0 (make-base.sh).
#  1. checks that first MiB (O_DIRECT read);
#  2. writes `yes GUESTPATTERN[-S] | head -c 4M` at offset 1 MiB and
#     `yes GUESTTAIL[-S] | head -c 1M` at the last MiB (4 KiB aligned),
#     O_DIRECT + fsync;
#  3. drop_caches, reads both back with O_DIRECT and buffered, compares md5.
# Prints VUB: rw-md5 host=.. guest=.. tail=.. guest_offset=.. tail_offset=..
# (the host can compare these with the bytes it finds in the image) and
# VUB: rw-ok, or VUB: MISMATCH ... lines and rc 1.
set -eu
. /lib/vub/testlib.sh
rw_layout
pat "$HOST_WORD" $MiB > /tmp/host.want
pat "$GUEST_WORD" $((4 * MiB)) > /tmp/guest.want
pat "$TAIL_WORD" $MiB > /tmp/tail.want
bad=0

dev_read 0 $MiB /tmp/host.got
check host-pattern "$(md5f /tmp/host.got)" "$(md5f /tmp/host.want)" || bad=1

dev_write /tmp/guest.want $MiB
dev_write /tmp/tail.want "$TAIL_OFF"
drop_caches

dev_read $MiB $((4 * MiB)) /tmp/guest.got
check guest-pattern "$(md5f /tmp/guest.got)" "$(md5f /tmp/guest.want)" || bad=1
dev_read "$TAIL_OFF" $MiB /tmp/tail.got
check tail-pattern "$(md5f /tmp/tail.got)" "$(md5f /tmp/tail.want)" || bad=1
# the same ranges through the page cache (different request sizes / readahead)
drop_caches
dev_read $MiB $((4 * MiB)) /tmp/guest.got buffered
check guest-pattern-buffered "$(md5f /tmp/guest.got)" "$(md5f /tmp/guest.want)" || bad=1
dev_read "$TAIL_OFF" $MiB /tmp/tail.got buffered
check tail-pattern-buffered "$(md5f /tmp/tail.got)" "$(md5f /tmp/tail.want)" || bad=1

echo "VUB: rw-md5 host=$(md5f /tmp/host.want) guest=$(md5f /tmp/guest.want)" \
     "tail=$(md5f /tmp/tail.want) guest_offset=$MiB guest_len=$((4 * MiB))" \
     "tail_offset=$TAIL_OFF tail_len=$MiB size_bytes=$SZ"
[ $bad = 0 ] || exit 1
echo "VUB: rw-ok"
