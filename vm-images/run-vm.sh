#!/bin/bash
# Boot the test guest once, its disk served by a vhost-user-blk backend that
# listens on SOCK (our daemon, or qemu-storage-daemon), and judge the result.
#
# usage: run-vm.sh --socket SOCK --test NAME [--queues N] [--reconnect]
#                  [--reconnect-ms MS] [--serial-log FILE] [--timeout S] [--append "EXTRA"]
#                  [--script FILE] [--smp N] [--mem MiB] [--kernel F] [--initrd F]
#   --socket SOCK      backend's unix socket (must listen, unless --reconnect)
#   --test NAME        guest/tests/NAME.sh (rw verify ext4 ext4-verify mq reconnect none)
#   --queues N         vhost-user-blk-pci num-queues (default 1; the backend
#                      must offer at least N: QEMU exits at once otherwise);
#                      0: no num-queues, QEMU's default (the vCPU count)
#   --reconnect        QEMU may start before the backend and reconnects when
#                      it is restarted, retrying every second: -chardev
#                      ...,reconnect-ms=1000 on QEMU >= 9.2, reconnect=1 before
#   --reconnect-ms MS  the same, retrying every MS milliseconds (QEMU >= 9.2;
#                      older QEMU rounds it up to whole seconds)
#   --serial-log FILE  guest console (default: a new file from mktemp); QEMU's
#                      own stderr goes to FILE.qemu
#   --timeout S        host timeout for QEMU (default 60; `timeout -k 5`)
#   --append "EXTRA"   more kernel cmdline, e.g. "vub.seed=7 vub.iters=50"
#   --script FILE      pass FILE as fw_cfg opt/vub/script: the guest runs it
#                      instead of /tests/NAME.sh (no initramfs rebuild needed)
#   --kernel/--initrd  default: vm-images/cache/, built by images.sh if missing
# env: VUB_ACCEL=tcg|kvm overrides the accelerator choice (default: kvm only
#      if /proc/cpuinfo has vmx or svm and /dev/kvm is usable, else tcg;
#      this machine's /dev/kvm is PVM, which cannot run stock kernels).
#      VUB_VERBOSE=1 prints the QEMU command line to stderr.
#
# Prints the guest's VUB: lines and a summary line
#   run-vm: test=NAME result=pass|fail|timeout|interrupted qemu_rc=N wall=S ...
# Exit status: 0 only if the log has "VUB: test-end ... rc=0" and no VUB: line
# with MISMATCH, failed or error; 124 on timeout; 130 if run-vm.sh got
# SIGTERM/SIGINT/SIGHUP (QEMU is stopped too); 2 on usage errors; else 1.
# QEMU's own exit code is not trusted (it exits 0 after SIGTERM too).
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
usage() { sed -n '2,/^set -eu/{/^#/p}' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SOCK= TEST= QUEUES=1 RECONNECT=0 RECONNECT_MS=1000 LOG= TIMEOUT=60 EXTRA= SCRIPT= SMP=2 MEM=512
KERNEL= INITRD=
while [ $# -gt 0 ]; do
  case "$1" in
    --socket) SOCK=${2:?}; shift ;;
    --test) TEST=${2:?}; shift ;;
    --queues) QUEUES=${2:?}; shift ;;
    --reconnect) RECONNECT=1 ;;
    --reconnect-ms) RECONNECT=1; RECONNECT_MS=${2:?}; shift ;;
    --serial-log) LOG=${2:?}; shift ;;
    --timeout) TIMEOUT=${2:?}; shift ;;
    --append) EXTRA=${2?}; shift ;;
    --script) SCRIPT=${2:?}; shift ;;
    --smp) SMP=${2:?}; shift ;;
    --mem) MEM=${2:?}; shift ;;
    --kernel) KERNEL=${2:?}; shift ;;
    --initrd) INITRD=${2:?}; shift ;;
    -h|--help) usage ;;
    *) echo "run-vm: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[ -n "$SOCK" ] && [ -n "$TEST" ] || { echo "run-vm: --socket and --test are required" >&2; usage; }
case "$QUEUES$TIMEOUT$SMP$MEM$RECONNECT_MS" in *[!0-9]*) echo "run-vm: numeric option expected" >&2; exit 2 ;; esac
case "$TEST" in *[!A-Za-z0-9_.-]*) echo "run-vm: bad test name $TEST" >&2; exit 2 ;; esac

if [ -z "$KERNEL" ] || [ -z "$INITRD" ]; then
  ierr=$(mktemp "${TMPDIR:-/tmp}/vub-images.XXXXXX")
  paths=$("$HERE/images.sh" 2>"$ierr") || { cat "$ierr" >&2; rm -f "$ierr"; exit 1; }
  rm -f "$ierr"
  [ -n "$KERNEL" ] || KERNEL=$(printf '%s\n' "$paths" | sed -n 's/^KERNEL=//p')
  [ -n "$INITRD" ] || INITRD=$(printf '%s\n' "$paths" | sed -n 's/^INITRD=//p')
fi
for f in "$KERNEL" "$INITRD" ${SCRIPT:+"$SCRIPT"}; do
  [ -f "$f" ] || { echo "run-vm: $f not found" >&2; exit 2; }
done
if [ "$RECONNECT" = 0 ] && [ ! -S "$SOCK" ]; then
  echo "run-vm: $SOCK is not a listening socket (start the backend first, or use --reconnect)" >&2
  exit 1
fi
if [ -z "$LOG" ]; then
  LOG=$(mktemp "${TMPDIR:-/tmp}/vub-serial-$TEST.XXXXXX")
fi
QLOG=$LOG.qemu

ACCEL=${VUB_ACCEL:-}
if [ -z "$ACCEL" ]; then
  ACCEL=tcg
  if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then ACCEL=kvm; fi
fi
case "$ACCEL" in
  tcg) CPU=max ;;
  kvm) CPU=host ;;
  *) echo "run-vm: VUB_ACCEL must be tcg or kvm" >&2; exit 2 ;;
esac

esc() { printf '%s' "$1" | sed 's/,/,,/g'; }   # QEMU option values: ',' -> ',,'
CHR="socket,id=vub0,path=$(esc "$SOCK")"
if [ "$RECONNECT" = 1 ]; then
  # reconnect-ms arrived in QEMU 9.2 (reconnect=SECONDS is deprecated there).
  qver=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  read -r qmaj qmin <<<"${qver:-0 0}"
  if [ "$qmaj" -gt 9 ] || { [ "$qmaj" = 9 ] && [ "$qmin" -ge 2 ]; }; then
    CHR="$CHR,reconnect-ms=$RECONNECT_MS"
  else
    CHR="$CHR,reconnect=$(( (RECONNECT_MS + 999) / 1000 ))"
  fi
fi
# --queues 0: QEMU picks num-queues itself (the vCPU count), which the
# guest then sees.
if [ "$QUEUES" = 0 ]; then NUMQ= GUEST_QUEUES=$SMP; else NUMQ=",num-queues=$QUEUES" GUEST_QUEUES=$QUEUES; fi
FWCFG=()
[ -n "$SCRIPT" ] && FWCFG=(-fw_cfg "name=opt/vub/script,file=$(esc "$SCRIPT")")

CMD=(timeout -k 5 "$TIMEOUT"
  qemu-system-x86_64 -nodefaults -no-user-config -display none -monitor none
  -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on"
  -machine "q35,accel=$ACCEL,memory-backend=mem" -cpu "$CPU" -smp "$SMP" -m "${MEM}M"
  -chardev "$CHR"
  -device "vhost-user-blk-pci,chardev=vub0${NUMQ}"
  -kernel "$KERNEL" -initrd "$INITRD"
  -append "console=ttyS0 panic=-1 quiet vub.test=$TEST vub.queues=$GUEST_QUEUES $EXTRA"
  -serial "file:$(esc "$LOG")" -no-reboot
  "${FWCFG[@]}")
: > "$LOG"
[ -n "${VUB_VERBOSE:-}" ] && echo "run-vm: ${CMD[*]}" >&2

start=$(date +%s%N)
"${CMD[@]}" </dev/null >"$QLOG" 2>&1 &
QPID=$!
# if we are stopped, stop QEMU too (timeout forwards the signal to it)
SIGNALLED=0
trap 'SIGNALLED=1; kill -TERM $QPID 2>/dev/null || true' TERM INT HUP
qrc=0
while :; do
  wait $QPID && qrc=0 || qrc=$?
  kill -0 $QPID 2>/dev/null || break   # wait returned because of a trapped signal
done
trap - TERM INT HUP
wall=$(( ($(date +%s%N) - start) / 1000000 ))
wall=$(printf '%d.%03d' $((wall / 1000)) $((wall % 1000)))

tr -d '\r' < "$LOG" | grep -a 'VUB:' || true
result=pass
if [ "$SIGNALLED" = 1 ]; then
  result=interrupted
elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  result=timeout
elif ! tr -d '\r' < "$LOG" | grep -aqE 'VUB: test-end .* rc=0( |$)'; then
  result=fail
elif tr -d '\r' < "$LOG" | grep -aqE 'VUB:.*(MISMATCH|failed|error)'; then
  result=fail
fi
if [ "$result" != pass ] && [ -s "$QLOG" ]; then
  echo "run-vm: QEMU stderr ($QLOG):" >&2
  tail -20 "$QLOG" >&2
fi
echo "run-vm: test=$TEST result=$result qemu_rc=$qrc wall=${wall}s accel=$ACCEL queues=$QUEUES serial=$LOG"
case "$result" in
  pass) exit 0 ;;
  timeout) exit 124 ;;
  interrupted) exit 130 ;;
  *) exit 1 ;;
esac
