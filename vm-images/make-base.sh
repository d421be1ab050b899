#!/bin/bash
# Make a base raw disk image for the guest tests.
#
# usage: vm-images/make-base.sh OUT SIZE
#   OUT   image file to (re)create (an existing file is replaced)
#   SIZE  truncate(1) size, e.g. 64M, 1G (>= 8M recommended; rw needs 6 MiB,
#         reconnect 10 MiB, mq 18 MiB)
# Result: a sparse raw file of SIZE bytes whose first MiB is
# `yes HOSTPATTERN | head -c 1M` (what guest rw.sh/verify.sh expect), zeroes
# (holes) beyond, and a fixed mtime of 2024-01-01 00:00:00 UTC (1704067200),
# so UML COW headers that record the backing file's mtime are reproducible.
set -eu
OUT=${1:?usage: make-base.sh OUT SIZE}
SIZE=${2:?usage: make-base.sh OUT SIZE}
rm -f "$OUT"
truncate -s "$SIZE" "$OUT"
if [ "$(stat -c %s "$OUT")" -lt 1048576 ]; then
  rm -f "$OUT"; echo "make-base: SIZE must be at least 1M" >&2; exit 1
fi
# `yes` dies of SIGPIPE when head is done; keep that out of the exit status
{ yes HOSTPATTERN || true; } | head -c 1048576 | dd of="$OUT" conv=notrunc status=none
TZ=UTC touch -d '2024-01-01 00:00:00' "$OUT"
echo "make-base: $OUT $(stat -c %s "$OUT") bytes, mtime $(stat -c %Y "$OUT")"
