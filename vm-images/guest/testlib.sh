# Helpers for the guest tests; installed as /lib/vub/testlib.sh.
# usage (in a test): . /lib/vub/testlib.sh
# Tests run under `sh -e` from /init with VUB_* variables from the cmdline.
# Patterns are `yes WORD | head -c N` so the host can regenerate them; with
# vub.seed=S every guest-written WORD gets a "-S" suffix, so a stale image
# from an earlier run cannot pass a second-boot check by accident.
DEV=${VUB_DEV:-/dev/vda}
MiB=1048576
SEEDSFX=${VUB_SEED:+-$VUB_SEED}
HOST_WORD=HOSTPATTERN                 # written by make-base.sh at offset 0, 1 MiB
GUEST_WORD=GUESTPATTERN$SEEDSFX       # rw.sh: 4 MiB at offset 1 MiB
TAIL_WORD=GUESTTAIL$SEEDSFX           # rw.sh: the disk's last MiB

up() { read -r u _ < /proc/uptime; echo "$u"; }
# pat WORD BYTES: the pattern bytes on stdout
pat() { yes "$1" | head -c "$2"; }
md5f() { md5sum < "$1" | cut -d' ' -f1; }
# fail MSG: report and end the test with rc 1
fail() { echo "VUB: ${VUB_TEST:-test} failed: $*"; exit 1; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
devsize() { blockdev --getsize64 "$DEV"; }
# dev_write FILE OFFSET: write FILE at byte OFFSET with O_DIRECT + fsync
dev_write() {
  dd if="$1" of="$DEV" bs=$MiB seek="$2" iflag=fullblock oflag=direct,seek_bytes \
     conv=notrunc,fsync 2>/tmp/dd.err || fail "write at $2: $(cat /tmp/dd.err)"
}
# dev_read OFFSET LEN OUTFILE [buffered]: read LEN bytes at OFFSET (O_DIRECT
# unless a 4th argument is given)
dev_read() {
  _fl=direct,skip_bytes,count_bytes
  [ $# -ge 4 ] && _fl=skip_bytes,count_bytes
  dd if="$DEV" of="$3" bs=$MiB skip="$1" count="$2" iflag=$_fl 2>/tmp/dd.err \
    || fail "read at $1: $(cat /tmp/dd.err)"
  [ "$(stat -c %s "$3")" = "$2" ] || fail "short read at $1: $(stat -c %s "$3") of $2 bytes"
}
# check LABEL GOT WANT: print "VUB: LABEL ok" or a MISMATCH line; returns 1 on mismatch
check() {
  if [ "$2" = "$3" ]; then echo "VUB: $1 ok md5=$2"; return 0; fi
  echo "VUB: MISMATCH $1 got=$2 want=$3"; return 1
}
# fio's line of a failed verify (a MISMATCH), in its output
FIO_VERIFY_ERR='verify(:| failed)|bad (magic|header|pattern)|got pattern'
# fio_failed RC [WHAT]: after fio exited with RC (its output in
# /tmp/fio.out), one line saying why: "VUB: [WHAT ]fio-verify MISMATCH
# <fio's line>" (a verify error), "VUB: [WHAT ]fio-io error rc=RC <line>"
# or "VUB: [WHAT ]fio failed rc=RC: <fio's last lines>"; then fio's last 40
# lines as "fio: " lines
fio_failed() {
  _what=${2:+$2 }
  _vline=$(grep -m1 -E "$FIO_VERIFY_ERR" /tmp/fio.out || true)
  _eline=$(grep -m1 -E 'io_u error|err= *[1-9]|fio: ' /tmp/fio.out || true)
  if [ -n "$_vline" ]; then
    echo "VUB: ${_what}fio-verify MISMATCH $_vline"
  elif [ -n "$_eline" ]; then
    echo "VUB: ${_what}fio-io error rc=$1 $_eline"
  else
    echo "VUB: ${_what}fio failed rc=$1: $(grep -v '^ *$' /tmp/fio.out | tail -n 3 | tr '\n' ' ')"
  fi
  sed 's/^/fio: /' /tmp/fio.out | tail -n 40
}
# rw_layout: sets TAIL_OFF (byte offset of the last MiB) after checking the size
rw_layout() {
  SZ=$(devsize)
  [ "$SZ" -ge $((6 * MiB)) ] || fail "disk too small: $SZ bytes, rw needs >= 6 MiB"
  TAIL_OFF=$(( (SZ - MiB) / 4096 * 4096 ))
}
# ext4 test files: "NAME BYTES WORD" (WORD gets the seed suffix)
EXT4_FILES="a.bin 4096 FILEA
b.bin 1048576 FILEB
dir/c.bin 3145851 FILEC
dir/sub/d.bin 1 FILED
e.bin 8388608 FILEE
empty.bin 0 FILEZ"
