#!/bin/sh
# fio-verify: fio random 4 KiB writes at queue depth N with crc32c verify on
# the disk (needs /usr/bin/fio: images.sh builds it with build-fio.sh).
# usage: vub.test=fio-verify [vub.fio_size=192M] [vub.fio_depth=32] [vub.seed=S (1)]
#        [vub.fio_mode=both|write|verify] [vub.fio_samples=64]
# Runs, with everything in /tmp (tmpfs, the test's working directory):
#   fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=DEPTH
#       --ioengine=libaio --direct=1 --size=SIZE --verify=crc32c
#       --verify_pattern=<hex of "FIOPATTERN-S\n"> --verify_fatal=1
#       --do_verify=1 --randrepeat=1 --randseed=S --verify_state_save=0
# Modes: both (default) writes and then verifies in one fio job; write only
# writes (--do_verify=0); verify only reads back what an earlier boot with
# the same size and seed wrote (--verify_only; a second boot, e.g. after the
# host restarted the backend).
# Why the pattern: for a pure write job fio 3.33 takes each block's rand_seed
# from its own header, and --verify_only skips the numberio check, so crc32c
# alone passes any disk that an earlier fio run of the same size wrote.  The
# blocks are filled with a seed-specific pattern instead of random bytes, and
# after fio's verify VUB_FIO_SAMPLES blocks spread evenly over the range,
# and the last one, are read back (page cache dropped) and their bytes after
# fio's 44-byte header compared with the pattern, so a disk that another seed
# wrote cannot pass.
# Prints
#   VUB: fio-start mode= size= depth= seed= pattern= fio=
#   VUB: fio-write-done io=<fio's io amount> (modes both and write)
#   VUB: fio-verify-ok samples=N (modes both and verify)
#     or VUB: fio-verify MISMATCH <fio's error line>  (or: pattern at offset ...)
#     or VUB: fio-io error <fio's error line> / VUB: fio failed rc=N ...
#   VUB: dmesg-error LINE     (kernel I/O errors on the disk; a failure)
#   VUB: fio-stats mode= size= depth= secs=S write: IOPS=.. BW=.. (io/time) read(verify): IOPS=..
set -eu
. /lib/vub/testlib.sh
FIO=/usr/bin/fio
SIZE=${VUB_FIO_SIZE:-192M}
DEPTH=${VUB_FIO_DEPTH:-32}
SEED=${VUB_SEED:-1}
MODE=${VUB_FIO_MODE:-both}
SAMPLES=${VUB_FIO_SAMPLES:-64}
BS=4096
HDR=44   # struct verify_header (40 bytes) + struct vhdr_crc32 (4) at the start of each block

[ -x "$FIO" ] || fail "no $FIO in the initramfs (vm-images/images.sh builds it)"
case "$DEPTH$SEED$SAMPLES" in *[!0-9]*) fail "vub.fio_depth, vub.seed and vub.fio_samples must be numbers" ;; esac
case "$MODE" in both|write|verify) ;; *) fail "vub.fio_mode=$MODE: expected both, write or verify" ;; esac
# fio's K/M/G are powers of 2 (kb_base=1024)
case "$SIZE" in
  *[Kk]) n=${SIZE%?}; mul=1024 ;;
  *[Mm]) n=${SIZE%?}; mul=1048576 ;;
  *[Gg]) n=${SIZE%?}; mul=1073741824 ;;
  *) n=$SIZE; mul=1 ;;
esac
case "$n" in ''|*[!0-9]*) fail "vub.fio_size=$SIZE: expected N, NK, NM or NG" ;; esac
SIZE_BYTES=$((n * mul))
[ "$SIZE_BYTES" -ge $BS ] && [ $((SIZE_BYTES % BS)) = 0 ] || fail "vub.fio_size=$SIZE: not a multiple of $BS"
[ "$SIZE_BYTES" -le "$(devsize)" ] || fail "vub.fio_size=$SIZE is larger than the disk ($(devsize) bytes)"

WORD=FIOPATTERN-$SEED
PAT=0x$(printf '%s\n' "$WORD" | od -An -tx1 | tr -d ' \n')
set -- --name=v --filename="$DEV" --rw=randwrite --bs=4k --iodepth="$DEPTH" \
       --ioengine=libaio --direct=1 --size="$SIZE" --verify=crc32c --verify_pattern="$PAT" \
       --verify_fatal=1 --randrepeat=1 --randseed="$SEED" --verify_state_save=0 --eta=never
case "$MODE" in
  both) set -- "$@" --do_verify=1 ;;
  write) set -- "$@" --do_verify=0 ;;
  verify) set -- "$@" --do_verify=1 --verify_only ;;
esac
echo "VUB: fio-start mode=$MODE size=$SIZE depth=$DEPTH seed=$SEED pattern=$WORD fio=$("$FIO" --version) uptime=$(up)"
t0=$(up)
if "$FIO" "$@" > /tmp/fio.out 2>&1; then rc=0; else rc=$?; fi
t1=$(up)
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')

wline=$(grep -m1 -E '^ *write: IOPS=' /tmp/fio.out || true)
rline=$(grep -m1 -E '^ *read: IOPS=' /tmp/fio.out || true)
vline=$(grep -m1 -E "$FIO_VERIFY_ERR" /tmp/fio.out || true)
# write phase complete: fio only starts its verify phase (or exits 0) after it
wio=$(echo "$wline" | sed -n 's/.*)(\([^/]*\)\/.*/\1/p')
if [ "$MODE" != verify ] && { [ $rc = 0 ] || [ -n "$vline" ]; }; then
  echo "VUB: fio-write-done io=${wio:-?} size=$SIZE uptime=$t1"
fi

bad=0
if [ $rc != 0 ]; then
  bad=1
  fio_failed $rc
elif [ "$MODE" != write ]; then
  # the seed check fio cannot do (see above): sampled blocks hold WORD's
  # pattern after fio's header.  Page cache dropped, so the reads reach the disk.
  nblk=$((SIZE_BYTES / BS))
  blocks=; i=0
  while [ $i -lt "$SAMPLES" ]; do blocks="$blocks $((i * nblk / SAMPLES))"; i=$((i + 1)); done
  blocks="$blocks $((nblk - 1))"
  pat "$WORD" $BS | tail -c +$((HDR + 1)) > /tmp/want
  : > /tmp/got; : > /tmp/wantall; checked=0
  drop_caches
  for b in $blocks; do
    dd if="$DEV" bs=$BS skip=$((b * BS + HDR)) count=$((BS - HDR)) iflag=skip_bytes,count_bytes \
       2>/tmp/dd.err >> /tmp/got || fail "read of block $b: $(cat /tmp/dd.err)"
    cat /tmp/want >> /tmp/wantall
    checked=$((checked + 1))
  done
  if [ "$(md5f /tmp/got)" != "$(md5f /tmp/wantall)" ]; then
    bad=1; n=0
    for b in $blocks; do   # find the first bad block
      if ! tail -c +$((n * (BS - HDR) + 1)) /tmp/got | head -c $((BS - HDR)) | cmp -s - /tmp/want; then
        echo "VUB: fio-verify MISMATCH pattern at offset $((b * BS)): block does not hold $WORD after fio's header (stale or foreign data): $(tail -c +$((n * (BS - HDR) + 1)) /tmp/got | head -c 24 | od -An -c | tr -s ' \n' '  ')"
        break
      fi
      n=$((n + 1))
    done
  fi
  [ $bad = 0 ] && echo "VUB: fio-verify-ok samples=$checked pattern=$WORD uptime=$(up)"
fi

dmesg | grep -iE 'I/O error|Buffer I/O|blk_update_request|(vda|virtio_blk|virtio).*(error|fail|timeout|abort)' > /tmp/dmesg.err || true
while read -r l; do echo "VUB: dmesg-error $l"; bad=1; done < /tmp/dmesg.err

stats=$(printf '%s %s' "${wline:+write:${wline#*write:}}" "${rline:+read(verify):${rline#*read:}}" | sed 's/; [0-9]* zone resets//g; s/^ *//; s/ *$//' | tr -s ' ')
echo "VUB: fio-stats mode=$MODE size=$SIZE depth=$DEPTH secs=$secs ${stats:-none}"
[ $bad = 0 ]
