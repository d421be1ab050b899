#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""`make bench`: vhost-user-ubd side by side with qemu-storage-daemon.

One run, same base, same cache mode (O_DIRECT everywhere), the systems
alternated A B C ... A B C so machine drift cancels, BENCH_REPS repetitions
(default 3), medians reported. Writes BENCHMARKS.md.

Systems:
  ours-cow   vhost-user-ubd, UML COW over the raw base
  ours-raw   vhost-user-ubd, raw file
  ours-raw-ooo  the same, completing requests out of order (as with inflight tracking)
  qsd-qcow2  qemu-storage-daemon, qcow2 overlay over the same base, the
             backing declared as its own blockdev with cache.direct=on,
             its default set-up: the export on the main loop, aio=native
  qsd-raw    qemu-storage-daemon, raw file, the same default set-up
  qsd-qcow2-iot, qsd-raw-iot
             qemu-storage-daemon's strongest set-up for the same files: the
             export in an iothread with polling (poll-max-ns=32768) and
             aio=io_uring on every file blockdev
  limit      the same I/O by io_uring straight at the raw file, no virtio

Environment: BENCH_SECONDS (5), BENCH_REPS (3), BENCH_DIR (bench/work),
BENCH_ONLY (comma-separated workload names), BENCH_SYSTEMS (comma-separated
systems), BENCH_OUT (BENCHMARKS.md).
"""

import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.path.join(ROOT, "target/release/vhost-user-ubd")
BENCH = os.path.join(ROOT, "target/release/ubd-bench")
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
WORK = os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench/work"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "BENCHMARKS.md"))
ONLY = [w for w in os.environ.get("BENCH_ONLY", "").split(",") if w]

GIB = 1 << 30
BASE_SIZE = 16 * GIB  # the device: a 16 GiB base ...
DATA_SIZE = 1 * GIB  # ... whose first GiB holds data (the rest is a hole)
BASE_MTIME = 1704067200
ALL_SYSTEMS = ["ours-cow", "ours-raw", "ours-raw-ooo", "qsd-qcow2", "qsd-qcow2-iot", "qsd-raw", "qsd-raw-iot",
               "limit"]
# BENCH_SYSTEMS: a comma-separated subset (default: all).
SYSTEMS = [s for s in ALL_SYSTEMS
           if not os.environ.get("BENCH_SYSTEMS") or s in os.environ["BENCH_SYSTEMS"].split(",")]
SERVERS = [s for s in SYSTEMS if s != "limit"]
# qemu-storage-daemon's strongest set-up (QEMU 10: one iothread per export).
IOT_OBJECT = "iothread,id=iot0,poll-max-ns=32768"

# name, mode, bs, queues, depth, files ("data": region with data in the
# base; "fresh": never-written 16 GiB devices; "rewrite": region already
# written through the server), region bytes
WORKLOADS = [
    ("randread-qd1-1q", "randread", 4096, 1, 1, "data", DATA_SIZE),
    ("randread-qd32-1q", "randread", 4096, 1, 32, "data", DATA_SIZE),
    ("randread-qd1-2q", "randread", 4096, 2, 1, "data", DATA_SIZE),
    ("randread-qd32-2q", "randread", 4096, 2, 32, "data", DATA_SIZE),
    ("randwrite-first-qd1-1q", "randwrite", 4096, 1, 1, "fresh", BASE_SIZE),
    ("randwrite-first-qd32-1q", "randwrite", 4096, 1, 32, "fresh", BASE_SIZE),
    ("randwrite-first-qd1-2q", "randwrite", 4096, 2, 1, "fresh", BASE_SIZE),
    ("randwrite-first-qd32-2q", "randwrite", 4096, 2, 32, "fresh", BASE_SIZE),
    ("randwrite-rewrite-qd1-1q", "randwrite", 4096, 1, 1, "rewrite", DATA_SIZE),
    ("randwrite-rewrite-qd32-2q", "randwrite", 4096, 2, 32, "rewrite", DATA_SIZE),
    ("seqread-64k-qd8-2q", "read", 65536, 2, 8, "data", DATA_SIZE),
    ("seqwrite-64k-qd8-2q", "write", 65536, 2, 8, "fresh", BASE_SIZE),
    ("flushmix-qd32-2q", "flushmix", 4096, 2, 32, "fresh", BASE_SIZE),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*cmd, **kw):
    subprocess.run(cmd, check=True, **kw)


def make_base():
    base = os.path.join(WORK, "base.raw")
    if os.path.exists(base) and os.path.getsize(base) == BASE_SIZE:
        return base
    log(f"making {base}: {BASE_SIZE >> 30} GiB, first {DATA_SIZE >> 30} GiB random data")
    with open(base + ".tmp", "wb") as f:
        chunk = 16 << 20
        for _ in range(DATA_SIZE // chunk):
            f.write(os.urandom(chunk))
        f.truncate(BASE_SIZE)
    os.utime(base + ".tmp", (BASE_MTIME, BASE_MTIME))
    os.rename(base + ".tmp", base)
    return base


def wait_socket(path, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"no socket {path}")


class Server:
    """One server process on a socket; stopped with SIGTERM."""

    def __init__(self, cmd, sock, logf):
        if os.path.exists(sock):
            os.unlink(sock)
        self.log = open(logf, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        self.sock = sock
        wait_socket(sock, self.proc)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def ours(args, sock, logf):
    return Server([UBD, "serve", "--socket", sock, "--cache", "none", "--queues", "2"] + args, sock, logf)


def qsd_cmd(blockdevs, sock, iothread):
    cmd = ["qemu-storage-daemon"]
    if iothread:
        cmd += ["--object", IOT_OBJECT]
    for b in blockdevs:
        cmd += ["--blockdev", b]
    cmd += [
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
        "writable=on,num-queues=2" + (",iothread=iot0" if iothread else ""),
    ]
    return cmd


def qsd_raw_cmd(path, sock, iothread=False):
    aio = "io_uring" if iothread else "native"
    return qsd_cmd(
        [
            f"driver=file,node-name=file0,filename={path},cache.direct=on,aio={aio}",
            "driver=raw,node-name=disk0,file=file0",
        ],
        sock,
        iothread,
    )


def qsd_qcow2_cmd(base, ovl, sock, iothread=False):
    aio = "io_uring" if iothread else "native"
    return qsd_cmd(
        [
            f"driver=file,node-name=bfile,filename={base},cache.direct=on,aio={aio},read-only=on",
            "driver=raw,node-name=bimg,file=bfile,read-only=on",
            f"driver=file,node-name=ofile,filename={ovl},cache.direct=on,aio={aio}",
            "driver=qcow2,node-name=disk0,file=ofile,backing=bimg",
        ],
        sock,
        iothread,
    )


def fresh_files(base, tag):
    """New, never-written devices of BASE_SIZE, one per system: a raw file
    shared by two systems would give the second one writes into blocks the
    first allocated and the file system's allocation state it left."""
    d = os.path.join(WORK, "run")
    os.makedirs(d, exist_ok=True)
    files = {
        "ours-cow": os.path.join(d, f"{tag}.cow"),
        "ours-raw": os.path.join(d, f"{tag}.ours.raw"),
        "ours-raw-ooo": os.path.join(d, f"{tag}.ours-ooo.raw"),
        "qsd-qcow2": os.path.join(d, f"{tag}.qcow2"),
        "qsd-qcow2-iot": os.path.join(d, f"{tag}.iot.qcow2"),
        "qsd-raw": os.path.join(d, f"{tag}.qsd.raw"),
        "qsd-raw-iot": os.path.join(d, f"{tag}.qsd-iot.raw"),
        "limit": os.path.join(d, f"{tag}.limit.raw"),
    }
    for p in files.values():
        if os.path.exists(p):
            os.unlink(p)
    sh(UBD, "create", files["ours-cow"], base, stderr=subprocess.DEVNULL)
    for s in ("qsd-qcow2", "qsd-qcow2-iot"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", files[s])
    for s in ("ours-raw", "ours-raw-ooo", "qsd-raw", "qsd-raw-iot", "limit"):
        with open(files[s], "wb") as f:
            f.truncate(BASE_SIZE)
    return files


def data_raw(base):
    """A raw copy of the base (same data, same holes) for the raw systems."""
    p = os.path.join(WORK, "data.raw")
    if not os.path.exists(p):
        log("copying the base to data.raw")
        sh("cp", "--sparse=always", base, p + ".tmp")
        os.rename(p + ".tmp", p)
    return p


def bench(target, wl, label, pid=None, seconds=None, mode=None, bs=None, size=None):
    name, m, b, queues, depth, _, region = wl
    cmd = [BENCH] + target + [
        "--queues", str(queues), "--depth", str(depth), "--mode", mode or m,
        "--bs", str(bs or b), "--seconds", str(seconds or SECONDS),
        "--size", str(size or region), "--label", label,
    ]
    if pid:
        cmd += ["--pid", str(pid)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prefill_region(target, pid, region):
    """Writes the region once (1 MiB sequential, each queue its half) so
    that rewrites find it allocated."""
    cmd = [BENCH] + target + [
        "--queues", "2", "--depth", "8", "--mode", "write", "--bs", str(1 << 20),
        "--seconds", "600", "--once", "--size", str(region), "--label", "prefill",
    ]
    if pid:
        cmd += ["--pid", str(pid)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def settle():
    """Dirty pages of freshly made files must not disturb O_DIRECT runs."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def run_one(system, wl, base, rep, files):
    name, mode, bs, queues, depth, kind, region = wl
    settle()
    logf = os.path.join(WORK, "servers.log")
    sock = os.path.join(WORK, f"{system}.sock")
    # Reads use the data copy of the base; writes a device of their own.
    path = files[system] if kind != "data" else data_raw(base)
    if system == "limit":
        if kind == "rewrite":
            prefill_region(["--file", path], None, region)
            settle()
        return bench(["--file", path], wl, system)
    if system == "ours-cow":
        srv = ours(["--cow", files[system]], sock, logf)
    elif system == "ours-raw":
        srv = ours(["--raw", path], sock, logf)
    elif system == "ours-raw-ooo":
        # Out-of-order completion, as with inflight tracking (which libblkio
        # does not negotiate): the hidden test switch forces it.
        srv = ours(["--raw", path, "--test-out-of-order"], sock, logf)
    elif system in ("qsd-qcow2", "qsd-qcow2-iot"):
        srv = Server(qsd_qcow2_cmd(base, files[system], sock, system.endswith("-iot")), sock, logf)
    else:
        srv = Server(qsd_raw_cmd(path, sock, system.endswith("-iot")), sock, logf)
    try:
        if kind == "rewrite":
            prefill_region(["--socket", sock], srv.proc.pid, region)
            settle()
        return bench(["--socket", sock], wl, system, pid=srv.proc.pid)
    finally:
        srv.stop()


def main():
    for tool in ("qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: run `make deps`")
    for b in (UBD, BENCH):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run `cargo build --release --workspace`")
    os.makedirs(WORK, exist_ok=True)
    base = make_base()
    data_raw(base)
    results = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    wls = [w for w in WORKLOADS if not ONLY or w[0] in ONLY]
    for wl in wls:
        name, _, _, _, _, kind, _ = wl
        for rep in range(REPS):
            # Fresh devices per repetition (first writes stay first writes).
            files = fresh_files(base, f"{name}-{rep}")
            # The order rotates with each repetition, so no system always
            # runs first (or right after a given other one).
            for system in SYSTEMS[rep % len(SYSTEMS):] + SYSTEMS[:rep % len(SYSTEMS)]:
                r = run_one(system, wl, base, rep, files)
                results.setdefault((name, system), []).append(r)
                log(f"{name:28} {system:10} rep {rep}: {r['iops']:9.0f} IOPS  p50 {r['p50_us']:8.1f} us  "
                    f"p99 {r['p99_us']:9.1f} us  max {r['max_us']:9.1f} us  cpu/io {r.get('cpu_us_per_io') or 0:6.1f} us")
            for p in files.values():
                os.unlink(p)
    write_report(wls, results, started)


def med(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


RATIOS = [
    ("ours-cow", "qsd-qcow2"),
    ("ours-cow", "qsd-qcow2-iot"),
    ("ours-cow", "qsd-raw"),
    ("ours-cow", "qsd-raw-iot"),
    ("ours-raw", "qsd-raw"),
    ("ours-raw", "qsd-raw-iot"),
    ("ours-raw-ooo", "ours-raw"),
    ("ours-cow", "limit"),
]


def ratios():
    return [(a, b) for a, b in RATIOS if a in SYSTEMS and b in SYSTEMS]


def short(system):
    return system.replace("ours-", "").replace("qsd-", "")


def write_report(wls, results, started):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qsd_ver = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    threads = max(1, min(2, len(os.sched_getaffinity(0)) // 2))
    cmdline = lambda c: " ".join(c).replace(WORK + "/", "")  # noqa: E731
    lines = [
        "# Benchmarks",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPUs ({cpu}), "
        f"kernel {platform.release()}, {qsd_ver}.",
        "",
        f"Command: `make bench` (BENCH_SECONDS={SECONDS:g}, BENCH_REPS={REPS}). Client: `ubd-bench` "
        "(libblkio virtio-blk-vhost-user, one thread per queue), the same for every server. All "
        "systems use O_DIRECT; the systems alternate within each repetition, in an order that "
        "rotates from one repetition to the next; each figure is the median of the repetitions.",
        "",
        "Devices: a 16 GiB raw base whose first GiB holds random data. `data` workloads use that "
        "GiB (COW and qcow2 read it from the base); `fresh` workloads write never-written 16 GiB "
        "devices (COW bits / qcow2 clusters / file blocks allocated on the fly), one per system; "
        "`rewrite` workloads write a GiB that was written once before.",
        "",
        "Servers (every one with 2 queues):",
        "",
        f"- ours-cow / ours-raw: `vhost-user-ubd serve --socket S --cache none --queues 2 --cow C` "
        f"(or `--raw F`), default `--threads` ({threads} here: one per queue, at most half the CPUs).",
        "- qsd-qcow2 / qsd-raw, qemu-storage-daemon's default set-up (the export served by its main "
        "loop, `aio=native`):",
        f"  `{cmdline(qsd_qcow2_cmd('base.raw', 'ovl.qcow2', 'S'))}`",
        "- qsd-qcow2-iot / qsd-raw-iot, its strongest set-up (an iothread with polling, `aio=io_uring`; "
        "QEMU 10 serves an export from one iothread only):",
        f"  `{cmdline(qsd_qcow2_cmd('base.raw', 'ovl.qcow2', 'S', True))}`",
        "  (the raw systems: the same without the qcow2 and backing nodes).",
        "- ours-raw-ooo: ours-raw completing requests out of order, as it does when a frontend takes "
        "inflight tracking (QEMU, cloud-hypervisor; libblkio does not, so the hidden "
        "`--test-out-of-order` forces it here). ooo/raw compares the two orders.",
        "- limit: `ubd-bench --file` doing the same I/O by io_uring straight at a raw file, no virtio.",
        "",
        "## IOPS (median) and ratios",
        "",
        "| workload | " + " | ".join(SYSTEMS) + " | "
        + " | ".join(f"{short(a)}/{short(b)}" for a, b in ratios()) + " |",
        "|---|" + "---:|" * (len(SYSTEMS) + len(ratios())),
    ]
    for wl in wls:
        name = wl[0]
        v = {s: med(results.get((name, s), []), "iops") for s in SYSTEMS}

        def ratio(a, b):
            return f"{v[a] / v[b]:.2f}" if v[a] and v[b] else "-"

        lines.append(
            f"| {name} | " + " | ".join(f"{v[s]:.0f}" if v[s] else "-" for s in SYSTEMS)
            + " | " + " | ".join(ratio(a, b) for a, b in ratios()) + " |"
        )
    lines += [
        "",
        "## Latency (median of p50 / p99 / max, microseconds)",
        "",
        "| workload | " + " | ".join(SYSTEMS) + " |",
        "|---|" + "---:|" * len(SYSTEMS),
    ]
    for wl in wls:
        name = wl[0]
        cells = []
        for s in SYSTEMS:
            rs = results.get((name, s), [])
            if rs:
                cells.append(f"{med(rs, 'p50_us'):.0f} / {med(rs, 'p99_us'):.0f} / {max(r['max_us'] for r in rs):.0f}")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Server CPU per I/O (microseconds, median)",
        "",
        "| workload | " + " | ".join(SERVERS) + " |",
        "|---|" + "---:|" * len(SERVERS),
    ]
    for wl in wls:
        name = wl[0]
        cells = []
        for s in SERVERS:
            c = med(results.get((name, s), []), "cpu_us_per_io")
            cells.append(f"{c:.1f}" if c is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Raw results: `bench/work/results.json` of the run.", ""]
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({f"{k[0]}|{k[1]}": v for k, v in results.items()}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
