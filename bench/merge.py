#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""`vhost-user-ubd merge` against `uml_moo` (bench-merge).

A BENCH_SIZE_GIB (4) GiB base of non-zero data, a COW over it with
BENCH_WRITES (20000) random 4 KiB writes (bits and data written by hand, as
the format says), merged into a new image by `uml_moo COW OUT` and by
`vhost-user-ubd merge COW OUT2` (release build); the two images must be
equal (cmp). Warm: the base in the page cache; cold: after `echo 3 >
/proc/sys/vm/drop_caches`, when that works. `merge` syncs its image before
it renames it; `uml_moo` does not sync, so its time is given without and
with an fsync of its image. BENCH_REPS (3) runs of each, alternated; the
median is reported. The same writes over a sparse base (64 MiB of data)
are measured warm too. Prints a markdown table and writes it to
bench/work/merge.md (BENCH_OUT).
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.path.join(ROOT, "target/release/vhost-user-ubd")
WORK = os.path.join(os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench/work")), "merge")
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench/work/merge.md"))
SIZE = int(float(os.environ.get("BENCH_SIZE_GIB", "4")) * (1 << 30))
WRITES = int(os.environ.get("BENCH_WRITES", "20000"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
MTIME = 1_704_067_200
CHUNK = 64 << 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_base(path):
    """SIZE bytes of non-zero data (a random 64 MiB block, varied per chunk)."""
    if os.path.exists(path) and os.path.getsize(path) == SIZE:
        os.utime(path, (MTIME, MTIME))
        return
    block = bytes(b | 1 for b in os.urandom(CHUNK))
    with open(path, "wb") as f:
        for i in range(0, SIZE, CHUNK):
            n = min(CHUNK, SIZE - i)
            f.write(bytes([i // CHUNK & 0xFF | 1]) + block[1:n])
    os.utime(path, (MTIME, MTIME))


def make_cow(cow, base):
    if os.path.exists(cow):
        os.unlink(cow)
    subprocess.run([UBD, "create", cow, base], check=True, stderr=subprocess.DEVNULL)
    bitmap_offset, data_offset = 8192, None
    nsect = SIZE // 512
    bitmap_len = (nsect + 7) // 8
    data_offset = (bitmap_offset + bitmap_len + 4095) // 4096 * 4096
    bitmap = bytearray(bitmap_len)
    rng = random.Random(20000)
    fd = os.open(cow, os.O_RDWR)
    try:
        for _ in range(WRITES):
            page = rng.randrange(SIZE // 4096)
            os.pwrite(fd, rng.randbytes(4096), data_offset + page * 4096)
            bitmap[page] = 0xFF  # sectors 8*page .. 8*page+7: one bitmap byte
        os.pwrite(fd, bytes(bitmap), bitmap_offset)
    finally:
        os.close(fd)


def sync():
    subprocess.run(["sync"], check=True)


def drop_caches():
    try:
        sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(path):
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def rm(path):
    if os.path.exists(path):
        os.unlink(path)


def timed(cmd):
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def run_moo(cow, out):
    rm(out)
    sync()
    t = timed(["uml_moo", cow, out])
    t0 = time.monotonic()
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return t, t + time.monotonic() - t0


def run_ours(cow, out):
    """Wall time of `merge`, and the part of it its fsync took."""
    rm(out)
    sync()
    t = time.monotonic()
    r = subprocess.run([UBD, "merge", "--output", "json", cow, out], check=True,
                       capture_output=True, text=True)
    wall = time.monotonic() - t
    done = json.loads(r.stdout.splitlines()[-1])
    return wall, done["sync_s"]


def cmp(a, b):
    r = subprocess.run(["cmp", a, b], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"the images differ: {r.stdout}{r.stderr}")


def measure(cow, base, moo_out, ours_out, modes):
    """Rows (mode, uml_moo, uml_moo + fsync, merge, merge's fsync), medians."""
    rows = []
    for mode in modes:
        moo, moo_sync, ours, ours_sync = [], [], [], []
        for _ in range(REPS):
            for system in ["uml_moo", "merge"]:
                if mode == "cold":
                    if not drop_caches():
                        log("cold: cannot drop the page cache (not root?); skipped")
                        break
                else:
                    warm(base)
                    warm(cow)
                if system == "uml_moo":
                    t, ts = run_moo(cow, moo_out)
                    moo.append(t)
                    moo_sync.append(ts)
                    log(f"{mode} uml_moo {t:.2f} s (+fsync {ts:.2f} s)")
                else:
                    t, ts = run_ours(cow, ours_out)
                    ours.append(t)
                    ours_sync.append(ts)
                    log(f"{mode} merge {t:.2f} s (of which fsync {ts:.2f} s)")
        if not ours or not moo:
            continue
        cmp(moo_out, ours_out)
        med = statistics.median
        rows.append((mode, med(moo), med(moo_sync), med(ours), med(ours_sync)))
    return rows


def main():
    if not os.path.exists(UBD):
        sys.exit(f"{UBD} missing: cargo build --release")
    os.makedirs(WORK, exist_ok=True)
    base, cow = os.path.join(WORK, "base.img"), os.path.join(WORK, "c.cow")
    sbase, scow = os.path.join(WORK, "sparse.img"), os.path.join(WORK, "sparse.cow")
    moo_out, ours_out = os.path.join(WORK, "moo.img"), os.path.join(WORK, "ours.img")
    log(f"base {SIZE >> 20} MiB, COW with {WRITES} random 4 KiB writes")
    make_base(base)
    make_cow(cow, base)
    rows = [("non-zero", *r) for r in measure(cow, base, moo_out, ours_out, ["warm", "cold"])]
    allocated = os.stat(ours_out).st_blocks * 512
    # The same COW writes over a sparse base (64 MiB of data, the rest a hole).
    with open(sbase, "wb") as f:
        f.truncate(SIZE)
        f.write(bytes(b | 1 for b in os.urandom(64 << 20)))
    os.utime(sbase, (MTIME, MTIME))
    make_cow(scow, sbase)
    rows += [("sparse", *r) for r in measure(scow, sbase, moo_out, ours_out, ["warm"])]
    sparse_allocated = os.stat(ours_out).st_blocks * 512
    gib = f"{SIZE / (1 << 30):g} GiB"
    table = [
        f"### merge: {gib} COW, {WRITES} random 4 KiB writes",
        "",
        f"`uml_moo COW OUT` vs `vhost-user-ubd merge COW OUT` (release), median of {REPS}, "
        "alternated; images cmp-equal. `merge` includes its fsync (and syncs while it "
        "writes); `uml_moo` does not sync (second column: with an fsync of its image). Base "
        f"non-zero: {gib} of non-zero data; sparse: 64 MiB of data, the rest a hole.",
        "",
        "| base | cache | uml_moo | uml_moo + fsync | merge (of which last fsync) | speed-up | "
        "speed-up vs uml_moo + fsync |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for base_kind, mode, m, ms, o, os_ in rows:
        table.append(
            f"| {base_kind} | {mode} | {m:.2f} s | {ms:.2f} s | {o:.2f} s ({os_:.2f} s) | "
            f"{m / o:.1f}x | {ms / o:.1f}x |"
        )
    table.append("")
    table.append(
        f"Image: {SIZE} bytes; allocated {allocated} (non-zero base), {sparse_allocated} "
        "(sparse base)."
    )
    text = "\n".join(table) + "\n"
    print(text, end="")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    for p in (moo_out, ours_out):
        rm(p)


if __name__ == "__main__":
    main()
