#!/bin/bash
# End-to-end demo of vhost-user-ubd (what `make demo` runs):
#   1. a base image (vm-images/make-base.sh) and a UML COW file over it
#      (`vhost-user-ubd create`); the base's sha256 is recorded;
#   2. the daemon serves the COW on a vhost-user socket;
#   3. a QEMU guest (TCG) boots with the COW as its only disk, writes and
#      verifies data (guest test `rw`) and powers off;
#   4. a second boot reads the data back (`verify`): it persisted;
#   5. `vhost-user-ubd info` of the COW;
#   6. the base image's sha256 is unchanged;
#   7. the daemon is stopped with SIGTERM (it must exit 0);
#   8. host side: `uml_moo` merges the COW and the guest's bytes are found
#      at the offsets the guest wrote them to.
# Ends with a `demo: PASS` or `demo: FAIL ...` line; exit status 0 only on PASS.
#
# usage: scripts/demo.sh
# env:   VUB_BIN=PATH   the daemon binary (default target/release/vhost-user-ubd)
#        KEEP=1         keep the work directory (default: removed at the end)
#        BASE_SIZE=256M size of the base image
# Needs what `make deps images` provides: qemu-system-x86_64, busybox,
# uml_moo, and the guest kernel/initramfs (vm-images/images.sh builds them
# if missing). All files go to a new work dir under vm-images/cache/.
set -eu -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VM=$ROOT/vm-images
BIN=${VUB_BIN:-$ROOT/target/release/vhost-user-ubd}
BASE_SIZE=${BASE_SIZE:-256M}
T0=$(date +%s%N)

W= DPID= STEP=0 NSTEPS=9 RESULT=FAIL WHY="interrupted"
elapsed() { local ms=$((($(date +%s%N) - T0) / 1000000)); printf '%d.%01ds' $((ms / 1000)) $((ms % 1000 / 100)); }
section() { STEP=$((STEP + 1)); printf '\n==== [%d/%d] %s  (t=%s)\n' "$STEP" "$NSTEPS" "$*" "$(elapsed)"; }
say() { printf '  %s\n' "$*"; }
fail() { WHY=$*; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
pat_md5() { { yes "$1" || true; } | head -c "$2" | md5sum | cut -d' ' -f1; }
# the socket is bound and listening (no test connection: the daemon would
# see a spurious frontend)
listening() { awk -v p="$1" '$8 == p && $4 == "00010000" { f = 1 } END { exit !f }' /proc/net/unix; }
img_md5() { dd if="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none | md5sum | cut -d' ' -f1; }

start_daemon() {
  rm -f "$SOCK"
  echo "----- daemon start $(date -u +%FT%TZ)" >> "$W/daemon.log"
  RUST_LOG=${RUST_LOG:-info} "$BIN" serve --socket "$SOCK" --cow "$COW" \
    </dev/null >>"$W/daemon.log" 2>&1 &
  DPID=$!
  for _ in $(seq 300); do
    listening "$SOCK" && return 0
    kill -0 "$DPID" 2>/dev/null || break
    sleep 0.05
  done
  tail -20 "$W/daemon.log" | sed 's/^/  | /'
  fail "the daemon did not listen on $SOCK"
}
# SIGTERM; returns the daemon's exit status (KILL after 20 s: status 137)
stop_daemon() {
  local pid=$DPID rc=0
  DPID=
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" || rc=$?
  return $rc
}
cleanup() {
  rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$DPID" ]; then kill -KILL "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; fi
  if [ "$RESULT" != PASS ] && [ -n "$W" ] && [ -s "$W/daemon.log" ]; then
    echo; echo "---- daemon log (last 30 lines)"; tail -30 "$W/daemon.log"
  fi
  if [ -n "$W" ] && [ -d "$W" ]; then
    if [ "${KEEP:-0}" = 1 ]; then echo; echo "work dir kept: $W"
    else rm -rf "$W"; echo; echo "work dir $W removed (KEEP=1 keeps it)"; fi
  fi
  echo
  if [ "$RESULT" = PASS ] && [ $rc = 0 ]; then
    echo "demo: PASS ($(elapsed))"
  else
    echo "demo: FAIL at step $STEP: $WHY ($(elapsed))"
    [ $rc != 0 ] || rc=1
  fi
  exit $rc
}
trap cleanup EXIT
trap 'WHY="interrupted"; exit 130' INT TERM HUP

echo "vhost-user-ubd end-to-end demo: a QEMU guest on a UML COW disk served over vhost-user"

section "Prerequisites"
[ -x "$BIN" ] || fail "no daemon binary at $BIN: run \`cargo build --release\` or set VUB_BIN"
for t in qemu-system-x86_64 busybox uml_moo sha256sum md5sum; do
  command -v "$t" >/dev/null || fail "$t is not installed: run \`make deps images\`"
done
say "daemon:  $BIN ($("$BIN" --version))"
say "qemu:    $(qemu-system-x86_64 --version | head -1)"
IMAGES=$("$VM/images.sh" 2>/dev/null) || fail "vm-images/images.sh failed: run \`make images\`"
KERNEL=$(sed -n 's/^KERNEL=//p' <<<"$IMAGES")
INITRD=$(sed -n 's/^INITRD=//p' <<<"$IMAGES")
say "guest:   kernel $(sed -n 's/^KVER=//p' <<<"$IMAGES"), initramfs $(du -h "$INITRD" | cut -f1)"
mkdir -p "$VM/cache"
W=$(mktemp -d "$VM/cache/demo.XXXXXX")
SOCK=$W/vub.sock BASE=$W/base.raw COW=$W/disk.cow
SEED=$(date +%s)
say "work dir: $W"

section "Base image and a UML COW file over it"
"$VM/make-base.sh" "$BASE" "$BASE_SIZE" | sed 's/^/  /'
SZ=$(stat -c %s "$BASE")
BASE_SHA=$(sha "$BASE")
say "base sha256: $BASE_SHA"
"$BIN" create "$COW" "$BASE" 2>&1 | sed 's/^/  /'
"$BIN" check "$COW" 2>&1 | sed 's/^/  /' || fail "vhost-user-ubd check refused the new COW"
for f in "$BASE" "$COW"; do
  say "$(printf '%-9s %10s bytes, %5s allocated (sparse)' "$(basename "$f")" "$(stat -c %s "$f")" "$(du -h "$f" | cut -f1)")"
done

section "Start the daemon"
start_daemon
say "vhost-user-ubd serve --socket $SOCK --cow $COW   (pid $DPID)"
say "log: $W/daemon.log"

VMARGS=(--socket "$SOCK" --kernel "$KERNEL" --initrd "$INITRD" --timeout 90 --append "vub.seed=$SEED")
section "Boot 1: the guest writes and verifies (guest test rw, seed $SEED)"
"$VM/run-vm.sh" "${VMARGS[@]}" --test rw --serial-log "$W/boot1.serial" 2>&1 | sed 's/^/  /' \
  || fail "boot 1 (rw) failed"
RWLINE=$(tr -d '\r' < "$W/boot1.serial" | grep -a '^VUB: rw-md5 ')
grep -aq '^VUB: rw-ok' "$W/boot1.serial" || fail "boot 1: no rw-ok"

section "Boot 2: the data persisted (guest test verify, same seed)"
"$VM/run-vm.sh" "${VMARGS[@]}" --test verify --serial-log "$W/boot2.serial" 2>&1 | sed 's/^/  /' \
  || fail "boot 2 (verify) failed"
grep -aq '^VUB: verify-ok' "$W/boot2.serial" || fail "boot 2: no verify-ok"

section "vhost-user-ubd info $COW"
"$BIN" info "$COW" 2>&1 | sed 's/^/  /' || fail "vhost-user-ubd info failed"

section "The base image is unchanged"
NOW_SHA=$(sha "$BASE")
say "before: $BASE_SHA"
say "after:  $NOW_SHA"
[ "$NOW_SHA" = "$BASE_SHA" ] || fail "the base image changed"
say "unchanged: every guest write went to the COW file"

section "Stop the daemon with SIGTERM"
t=$(date +%s%N)
rc=0; stop_daemon || rc=$?
say "exit status $rc after $((($(date +%s%N) - t) / 1000000)) ms"
[ $rc = 0 ] || fail "the daemon exited with status $rc after SIGTERM"
echo "  daemon log:"
sed 's/^/  | /' "$W/daemon.log"

section "Host side: uml_moo merges the COW; the guest's bytes are in place"
uml_moo "$COW" "$W/merged.raw" >/dev/null 2>&1 || fail "uml_moo failed"
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$RWLINE"; }
check_range() { # LABEL OFFSET LEN WORD GUEST_MD5
  local got want
  got=$(img_md5 "$W/merged.raw" "$2" "$3")
  want=$(pat_md5 "$4" "$3")
  if [ "$got" = "$want" ] && [ "$got" = "$5" ]; then
    say "$(printf '%-6s offset %-9s %8s bytes  md5 %s = guest\x27s = yes %s' "$1" "$2" "$3" "$got" "$4")"
  else
    say "$1 at $2: merged md5 $got, guest printed $5, expected $want"
    fail "merged image: $1 range differs"
  fi
}
check_range host 0 1048576 HOSTPATTERN "$(field host)"
check_range guest "$(field guest_offset)" "$(field guest_len)" "GUESTPATTERN-$SEED" "$(field guest)"
check_range tail "$(field tail_offset)" "$(field tail_len)" "GUESTTAIL-$SEED" "$(field tail)"
[ "$(field tail_offset)" = $((SZ - 1048576)) ] || fail "unexpected tail offset"
rm -f "$W/merged.raw"

RESULT=PASS
