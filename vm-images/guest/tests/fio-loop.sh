#!/bin/sh
# fio-loop: rounds of fio random 4 KiB writes at queue depth DEPTH with
# O_DIRECT (libaio) and crc32c verify over the first SIZE bytes of the disk,
# while the host disturbs the backend (tests/boot_handover.rs hands the
# daemon over, tests/boot_migration.rs and bench/migration.py migrate the
# VM). They pass this file at run time as the fw_cfg script (`run-vm.sh
# --script`, or `-fw_cfg name=opt/vub/script,file=...`): they run this
# file as it is, whatever initramfs is cached (which holds a copy too,
# /tests/fio-loop.sh for `vub.test=fio-loop`).
# The loop ends after the round that started while the fw_cfg blob
# opt/vub/stop read 1 (why=stop; boot_migration gives the last destination
# QEMU `-fw_cfg name=opt/vub/stop,string=1`, the others 0; without the
# blob no round is the last), or after the first round that ends LOOP_SECS
# or more after the loop started (why=time), or at the first failure
# (why=bad).
# Round r uses seed SEED+r and the pattern FIOPATTERN-<SEED+r>: a block an
# earlier round wrote fails fio's numberio check (other seed, other order)
# and the sampled pattern check after fio's verify (page cache dropped).
# usage: vub.seed=S vub.loop_secs=N [vub.fio_size=32M] [vub.fio_depth=32]
#        [vub.fio_samples=16]
# Prints
#   VUB: loop-start size= depth= seed= secs= uptime=
#   VUB: round R ok seed= secs= final=0|1 uptime=     (one per round)
#   VUB: round R fio-verify MISMATCH ... / fio-io error ... / fio failed ...
#   VUB: dmesg-error LINE
#   VUB: loop-done rounds=N last_seed=S bad=B why=stop|time|bad uptime=
set -eu
. /lib/vub/testlib.sh
FIO=/usr/bin/fio
SIZE=${VUB_FIO_SIZE:-32M}
DEPTH=${VUB_FIO_DEPTH:-32}
SEED=${VUB_SEED:-1}
SECS=${VUB_LOOP_SECS:-20}
SAMPLES=${VUB_FIO_SAMPLES:-16}
BS=4096
HDR=44   # fio's verify header (40 bytes) + crc32c (4)
STOP=/sys/firmware/qemu_fw_cfg/by_name/opt/vub/stop/raw
[ -x "$FIO" ] || fail "no $FIO in the initramfs (vm-images/images.sh builds it)"
case "$SIZE" in *M) ;; *) fail "vub.fio_size=$SIZE: expected NM" ;; esac
SIZE_BYTES=$(( ${SIZE%M} * MiB ))
nblk=$((SIZE_BYTES / BS))
end=$(awk -v a="$(up)" -v s="$SECS" 'BEGIN{printf "%.2f", a + s}')
echo "VUB: loop-start size=$SIZE depth=$DEPTH seed=$SEED secs=$SECS uptime=$(up)"
r=0; bad=0; last=none; why=bad
while :; do
  final=0
  if [ -r "$STOP" ] && [ "$(cat "$STOP")" = 1 ]; then final=1; fi
  s=$((SEED + r))
  word=FIOPATTERN-$s
  hex=0x$(printf '%s\n' "$word" | od -An -tx1 | tr -d ' \n')
  t0=$(up)
  if "$FIO" --name=v --filename="$DEV" --rw=randwrite --bs=4k --iodepth="$DEPTH" \
      --ioengine=libaio --direct=1 --size="$SIZE" --verify=crc32c --verify_pattern="$hex" \
      --verify_fatal=1 --do_verify=1 --randrepeat=1 --randseed="$s" --verify_state_save=0 \
      --eta=never > /tmp/fio.out 2>&1; then rc=0; else rc=$?; fi
  if [ $rc != 0 ]; then
    bad=1
    fio_failed $rc "round $r"
    break
  fi
  pat "$word" $BS | tail -c +$((HDR + 1)) > /tmp/want
  drop_caches
  i=0
  while [ $i -le "$SAMPLES" ]; do
    b=$((i * nblk / SAMPLES))
    [ $i = "$SAMPLES" ] && b=$((nblk - 1))
    if ! dd if="$DEV" bs=$BS skip=$((b * BS + HDR)) count=$((BS - HDR)) \
        iflag=skip_bytes,count_bytes 2>/tmp/dd.err > /tmp/got; then
      echo "VUB: round $r read of block $b failed: $(cat /tmp/dd.err)"; bad=1; break
    fi
    if ! cmp -s /tmp/got /tmp/want; then
      echo "VUB: round $r fio-verify MISMATCH pattern at offset $((b * BS)): not $word after fio's header: $(head -c 24 /tmp/got | od -An -c | tr -s ' \n' '  ')"
      bad=1; break
    fi
    i=$((i + 1))
  done
  [ $bad = 0 ] || break
  t1=$(up)
  echo "VUB: round $r ok seed=$s secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}') final=$final uptime=$t1"
  last=$s
  r=$((r + 1))
  if [ $final = 1 ]; then why=stop; break; fi
  if awk -v a="$t1" -v b="$end" 'BEGIN{exit !(a >= b)}'; then why=time; break; fi
done
dmesg | grep -iE 'I/O error|Buffer I/O|blk_update_request|(vda|virtio_blk|virtio).*(error|fail|timeout|abort)' > /tmp/dmesg.err || true
while read -r l; do echo "VUB: dmesg-error $l"; bad=1; done < /tmp/dmesg.err
echo "VUB: loop-done rounds=$r last_seed=$last bad=$bad why=$why uptime=$(up)"
[ $bad = 0 ]
