#!/bin/bash
# End-to-end check of the vm-images scripts with qemu-storage-daemon (or any
# vhost-user-blk backend) serving a raw image; not needed by the Rust tests.
#
# usage: vm-images/selftest-qsd.sh [SCENARIO...]
#   rw         (2 queues) make-base, boot rw, host checks the bytes in the image,
#              restart backend, boot verify; boot verify with a wrong seed
#              must FAIL (proves verify detects stale data)
#   ext4       boot ext4, host e2fsck -fn (if installed), restart, ext4-verify
#   mq         backend and QEMU with 2 queues, boot mq, expect nr_hw_queues=2
#   reconnect  boot reconnect with --reconnect; at iteration 5 the backend is
#              killed with SIGKILL and restarted 2 s later; all iterations must pass
#   fwcfg      a test script passed through fw_cfg (run-vm.sh --script)
#   (default: all, in that order)
# env: VUB_BACKEND='CMD ... {SOCK} ... {IMG} ... {QUEUES}'  run this instead
#      of qemu-storage-daemon ({SOCK}/{IMG}/{QUEUES} are substituted; it must
#      create and listen on SOCK and exit on SIGTERM).
#      KEEP=1 keeps the images in the work directory.
# Work files (images, serial logs, backend logs) go to a new directory
# vm-images/cache/selftest.XXXXXX, printed at the start.
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SCEN=("$@"); [ ${#SCEN[@]} -gt 0 ] || SCEN=(rw ext4 mq reconnect fwcfg)
"$HERE/images.sh" >/dev/null
W=$(mktemp -d "$HERE/cache/selftest.XXXXXX")
SOCK=$W/vub.sock
SEED=$(date +%s)
BPID= VMPID=
echo "selftest: work dir $W seed $SEED"

start_backend() { # IMG QUEUES
  rm -f "$SOCK"
  if [ -n "${VUB_BACKEND:-}" ]; then
    local c=${VUB_BACKEND//\{SOCK\}/$SOCK}; c=${c//\{IMG\}/$1}; c=${c//\{QUEUES\}/$2}
    bash -c "exec $c" </dev/null >>"$W/backend.log" 2>&1 &
  else
    qemu-storage-daemon \
      --blockdev "driver=file,node-name=file0,filename=$1,cache.direct=on,aio=native" \
      --blockdev driver=raw,node-name=disk0,file=file0 \
      --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$2" \
      </dev/null >>"$W/backend.log" 2>&1 &
  fi
  BPID=$!
  for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; kill -0 $BPID 2>/dev/null || break; sleep 0.05; done
  echo "selftest: backend did not listen on $SOCK:" >&2; tail "$W/backend.log" >&2; return 1
}
stop_backend() { # SIGTERM, SIGKILL after 10 s
  [ -n "$BPID" ] || return 0
  kill -TERM $BPID 2>/dev/null || true
  for _ in $(seq 100); do kill -0 $BPID 2>/dev/null || break; sleep 0.1; done
  kill -KILL $BPID 2>/dev/null || true
  wait $BPID 2>/dev/null || true
  BPID=
}
cleanup() {
  [ -z "$VMPID" ] || { kill -TERM $VMPID 2>/dev/null || true; wait $VMPID 2>/dev/null || true; }
  stop_backend
  rm -f "$SOCK"
  [ "${KEEP:-0}" = 1 ] || rm -f "$W"/*.raw
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass=0 fail=0
ok() { echo "selftest: PASS $*"; pass=$((pass + 1)); }
ko() { echo "selftest: FAIL $*"; fail=$((fail + 1)); }
pat_md5() { { yes "$1" || true; } | head -c "$2" | md5sum | cut -d' ' -f1; }
img_md5() { dd if="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none | md5sum | cut -d' ' -f1; }
vm() { "$HERE/run-vm.sh" --socket "$SOCK" "$@"; }

for s in "${SCEN[@]}"; do
  echo "=== $s"
  case "$s" in
  rw)
    IMG=$W/rw.raw
    "$HERE/make-base.sh" "$IMG" 1G
    start_backend "$IMG" 2
    if vm --test rw --queues 2 --append "vub.seed=$SEED" --serial-log "$W/rw.log"; then ok "rw boot"; else ko "rw boot"; fi
    stop_backend
    sz=$(stat -c %s "$IMG")
    if [ "$(img_md5 "$IMG" 1048576 4194304)" = "$(pat_md5 "GUESTPATTERN-$SEED" 4194304)" ] &&
       [ "$(img_md5 "$IMG" $((sz - 1048576)) 1048576)" = "$(pat_md5 "GUESTTAIL-$SEED" 1048576)" ] &&
       [ "$(img_md5 "$IMG" 0 1048576)" = "$(pat_md5 HOSTPATTERN 1048576)" ] &&
       grep -aq "VUB: rw-md5 .*guest=$(img_md5 "$IMG" 1048576 4194304) " "$W/rw.log"; then
      ok "rw host-side image check"
    else ko "rw host-side image check"; fi
    start_backend "$IMG" 2
    if vm --test verify --queues 2 --append "vub.seed=$SEED" --serial-log "$W/verify.log"; then ok "verify boot"; else ko "verify boot"; fi
    if vm --test verify --append "vub.seed=wrong$SEED" --serial-log "$W/verify-neg.log" >/dev/null 2>&1; then
      ko "verify with a wrong seed passed"
    elif grep -aq 'VUB: MISMATCH guest-pattern' "$W/verify-neg.log"; then ok "verify with a wrong seed fails as expected"
    else ko "verify with a wrong seed: no MISMATCH line"; fi
    stop_backend ;;
  ext4)
    IMG=$W/ext4.raw
    "$HERE/make-base.sh" "$IMG" 1G
    start_backend "$IMG" 1
    if vm --test ext4 --append "vub.seed=$SEED" --serial-log "$W/ext4.log"; then ok "ext4 boot"; else ko "ext4 boot"; fi
    stop_backend
    if command -v e2fsck >/dev/null; then
      if e2fsck -fn "$IMG" > "$W/e2fsck.log" 2>&1; then ok "host e2fsck -fn"; else ko "host e2fsck -fn (see $W/e2fsck.log)"; fi
    fi
    start_backend "$IMG" 1
    if vm --test ext4-verify --append "vub.seed=$SEED" --serial-log "$W/ext4-verify.log"; then ok "ext4-verify boot"; else ko "ext4-verify boot"; fi
    stop_backend ;;
  mq)
    IMG=$W/mq.raw
    "$HERE/make-base.sh" "$IMG" 64M
    start_backend "$IMG" 2
    if vm --test mq --queues 2 --serial-log "$W/mq.log" && grep -aq 'VUB: nr_hw_queues=2 ' "$W/mq.log"; then
      ok "mq boot, nr_hw_queues=2"; else ko "mq boot"; fi
    stop_backend ;;
  reconnect)
    IMG=$W/reconnect.raw
    "$HERE/make-base.sh" "$IMG" 256M
    LOG=$W/reconnect.log
    start_backend "$IMG" 1
    vm --test reconnect --reconnect --timeout 120 --append "vub.iters=30 vub.seed=$SEED" \
       --serial-log "$LOG" > "$W/reconnect.out" 2>&1 &
    VMPID=$!
    for _ in $(seq 600); do grep -aq '^VUB: iter 5 ok' "$LOG" 2>/dev/null && break; kill -0 $VMPID 2>/dev/null || break; sleep 0.1; done
    if grep -aq '^VUB: iter 5 ok' "$LOG"; then
      echo "selftest: SIGKILL backend pid $BPID after $(grep -ac '^VUB: iter' "$LOG") iterations"
      kill -KILL $BPID; wait $BPID 2>/dev/null || true; BPID=
      sleep 2
      start_backend "$IMG" 1
      echo "selftest: backend restarted (pid $BPID)"
    else
      echo "selftest: guest never reached iteration 5"
    fi
    rc=0; wait $VMPID || rc=$?; VMPID=
    cat "$W/reconnect.out"
    n=$(grep -ac '^VUB: iter [0-9]* ok' "$LOG" || true)
    maxdt=$(sed -n 's/^VUB: iter [0-9]* ok .*dt=\([0-9.]*\).*/\1/p' "$LOG" | sort -n | tail -1)
    if [ $rc = 0 ] && [ "$n" = 30 ]; then ok "reconnect: 30/30 iterations, longest iteration ${maxdt}s"
    else ko "reconnect: run-vm rc=$rc, $n/30 iterations ok"; fi
    stop_backend ;;
  fwcfg)
    IMG=$W/fwcfg.raw
    "$HERE/make-base.sh" "$IMG" 16M
    printf '%s\n' '. /lib/vub/testlib.sh' 'echo "VUB: fwcfg-script size=$(devsize) seed=${VUB_SEED:-}"' > "$W/fwcfg-test.sh"
    start_backend "$IMG" 1
    if vm --test none --script "$W/fwcfg-test.sh" --append "vub.seed=$SEED" --serial-log "$W/fwcfg.log" &&
       grep -aq "VUB: fwcfg-script size=16777216 seed=$SEED" "$W/fwcfg.log"; then ok "fw_cfg script"; else ko "fw_cfg script"; fi
    stop_backend ;;
  *) ko "unknown scenario $s" ;;
  esac
done
echo "selftest: $pass passed, $fail failed (logs in $W)"
[ $fail = 0 ]
