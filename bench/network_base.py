#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""`make bench-network-base`: reads of base data through the daemon, with
the base on a network store (an NBD export mounted with nbdfuse, over a
veth pair) and on a local file, side by side.

The storage host is a network namespace of this run's own (`ip netns`,
a veth pair in 198.19.0.0/16), in which `qemu-nbd --read-only` exports the
base over TCP; the compute host (this namespace) mounts the export with
`nbdfuse -r` as a file. COWs (empty: only base data is read) are made over
the mounted file and over the local base file; the daemon serves them with
`--cache writeback` (the default) and `--cache none` (O_DIRECT), one queue.

Each measurement, for every base x cache mode x workload:
  cold  sync, `echo 3 > /proc/sys/vm/drop_caches`, a fresh nbdfuse mount
        (the network base only), a new daemon, then the workload
        (random 4 KiB reads over the whole base, fixed seed);
  warm  the whole base is read once through the same daemon (sequential
        1 MiB reads), then the same workload again (same seed, so the same
        offsets in the same order).
Workloads: qd1 (latency p50/p99) and qd32 (IOPS), one queue, `ubd-bench`
(bench/src, release build, libblkio client). drop_caches drops the page
cache of the one kernel both "hosts" share, so a cold read of the network
base also misses the storage host's cache (qemu-nbd reads the file through
it), and a warm `--cache none` read of it hits the storage host's cache.

Environment: BENCH_SECONDS (5) per run, BENCH_REPS (3; medians),
BENCH_BASE_MIB (1024, random data), BENCH_CACHES (writeback,none),
BENCH_DIR (bench/work/network_base), BENCH_OUT (bench/work/network_base.md).
Needs root, ip, qemu-nbd, nbdfuse, fusermount3 (`make deps`) and the
release build (`cargo build --release --workspace`). Everything it sets up
(mount, qemu-nbd, veth, namespace, daemon) is undone at exit, also on an
error or Ctrl-C.
"""

import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.path.join(ROOT, "target/release/vhost-user-ubd")
BENCH = os.path.join(ROOT, "target/release/ubd-bench")
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
BASE_MIB = int(os.environ.get("BENCH_BASE_MIB", "1024"))
CACHES = [c for c in os.environ.get("BENCH_CACHES", "writeback,none").split(",") if c]
WORK = os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench/work/network_base"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench/work/network_base.md"))

MIB = 1 << 20
BASE_SIZE = BASE_MIB * MIB
BASE_MTIME = 1704067200
NBD_PORT = 10809
PID = os.getpid()
NS = f"vub-netbase-bench-{PID}"
HOST_IF = f"vnbbh{PID}"
STORE_IF = f"vnbbs{PID}"
# One /30 of 198.19.0.0/16 (the benchmarking range; tests/network_base.rs
# takes 198.18.0.0/16).
_NET = (198 << 24) | (19 << 16) | ((PID % (1 << 14)) * 4)
HOST_IP = socket.inet_ntoa((_NET + 1).to_bytes(4, "big"))
STORE_IP = socket.inet_ntoa((_NET + 2).to_bytes(4, "big"))

SYSTEMS = ["local", "nbd"]
# name, depth
WORKLOADS = [("randread-4k-qd1", 1), ("randread-4k-qd32", 32)]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*cmd, check=True, quiet=False):
    kw = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
    return subprocess.run(cmd, check=check, **kw)


def out_of(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Store:
    """The storage host (netns + veth + qemu-nbd) and the nbdfuse mount."""

    def __init__(self, base):
        self.base = base
        self.mnt = os.path.join(WORK, f"mnt-{PID}")
        self.file = os.path.join(self.mnt, "base")
        self.pidfile = os.path.join(WORK, f"nbdfuse-{PID}.pid")
        self.server = None
        self.fuse = None
        self.made_ns = False

    def up(self):
        sh("ip", "netns", "add", NS)
        self.made_ns = True
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", STORE_IF)
        sh("ip", "link", "set", STORE_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "addr", "add", f"{STORE_IP}/30", "dev", STORE_IF)
        sh("ip", "-n", NS, "link", "set", STORE_IF, "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        logf = open(os.path.join(WORK, "qemu-nbd.log"), "ab")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", NS, "qemu-nbd", "--read-only", "--persistent", "--shared=8",
             "--format=raw", f"--bind={STORE_IP}", f"--port={NBD_PORT}", self.base],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        end = time.time() + 15
        while True:
            try:
                socket.create_connection((STORE_IP, NBD_PORT), timeout=0.2).close()
                break
            except OSError:
                if self.server.poll() is not None or time.time() > end:
                    raise RuntimeError("qemu-nbd does not listen (see qemu-nbd.log)")
                time.sleep(0.05)

    def rtt_us(self):
        """Median TCP connect time to the export (one round trip plus a
        little): what the veth costs per request."""
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            socket.create_connection((STORE_IP, NBD_PORT), timeout=1).close()
            ts.append((time.perf_counter() - t) * 1e6)
        return statistics.median(ts)

    def mount(self):
        os.makedirs(self.mnt, exist_ok=True)
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        logf = open(os.path.join(WORK, "nbdfuse.log"), "ab")
        self.fuse = subprocess.Popen(
            ["nbdfuse", "-r", "-P", self.pidfile, self.file, f"nbd://{STORE_IP}:{NBD_PORT}"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        end = time.time() + 15
        while not (os.path.exists(self.pidfile) and os.path.isfile(self.file)
                   and os.path.getsize(self.file) == BASE_SIZE):
            if self.fuse.poll() is not None or time.time() > end:
                raise RuntimeError("nbdfuse did not mount (see nbdfuse.log)")
            time.sleep(0.02)

    def unmount(self):
        if not self.fuse:
            return
        end = time.time() + 5
        while sh("fusermount3", "-u", self.mnt, check=False, quiet=True).returncode != 0:
            if time.time() > end:
                sh("fusermount3", "-u", "-z", self.mnt, check=False, quiet=True)
                break
            time.sleep(0.1)
        try:
            self.fuse.wait(5)
        except subprocess.TimeoutExpired:
            self.fuse.kill()
            self.fuse.wait()
        self.fuse = None

    def remount(self):
        self.unmount()
        self.mount()

    def down(self):
        self.unmount()
        if self.server and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        if self.made_ns:
            sh("ip", "netns", "del", NS, check=False, quiet=True)
            sh("ip", "link", "del", HOST_IF, check=False, quiet=True)
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        if os.path.isdir(self.mnt):
            try:
                os.rmdir(self.mnt)
            except OSError:
                pass


class Daemon:
    def __init__(self, cow, cache, extra):
        self.sock = os.path.join(WORK, f"ubd-{PID}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.logf = open(os.path.join(WORK, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [UBD, "serve", "--socket", self.sock, "--cow", cow, "--cache", cache, "--queues", "1",
             "--crash-journal", "off"] + extra,
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        end = time.time() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.time() > end:
                raise RuntimeError(f"daemon did not start (exit {self.proc.poll()}; see daemon.log)")
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        for p in (self.sock, self.sock + ".pid"):
            if os.path.exists(p):
                os.unlink(p)
        if self.proc.returncode != 0:
            raise RuntimeError(f"daemon exited with {self.proc.returncode} (see daemon.log)")


def ubd_bench(sock, pid, mode, bs, depth, seconds, label, once=False):
    cmd = [BENCH, "--socket", sock, "--queues", "1", "--depth", str(depth), "--mode", mode,
           "--bs", str(bs), "--seconds", str(seconds), "--size", str(BASE_SIZE), "--seed", "1",
           "--pid", str(pid), "--label", label]
    if once:
        cmd.append("--once")
    r = json.loads(out_of(*cmd).strip().splitlines()[-1])
    if r["errors"]:
        raise RuntimeError(f"{label}: {r['errors']} I/O errors")
    return r


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def make_base():
    base = os.path.join(WORK, "base.raw")
    if os.path.exists(base) and os.path.getsize(base) == BASE_SIZE:
        return base
    log(f"making {base}: {BASE_MIB} MiB of random data")
    with open(base + ".tmp", "wb") as f:
        for _ in range(BASE_MIB // 16):
            f.write(os.urandom(16 * MIB))
        f.truncate(BASE_SIZE)
    os.utime(base + ".tmp", (BASE_MTIME, BASE_MTIME))
    os.rename(base + ".tmp", base)
    return base


def make_cow(path, backing):
    if os.path.exists(path):
        os.unlink(path)
    sh(UBD, "create", path, backing, quiet=True)


def measure(store, system, cache, wl, cows):
    """One cold and one warm run of `wl`; returns (cold, warm)."""
    name, depth = wl
    if system == "nbd":
        store.remount()
    drop_caches()
    extra = ["--backing-check", "size"] if system == "nbd" else []
    d = Daemon(cows[system], cache, extra)
    try:
        pid = d.proc.pid
        cold = ubd_bench(d.sock, pid, "randread", 4096, depth, SECONDS, f"{system}-{cache}-cold")
        ubd_bench(d.sock, pid, "read", MIB, 8, 600, "prewarm", once=True)
        warm = ubd_bench(d.sock, pid, "randread", 4096, depth, SECONDS, f"{system}-{cache}-warm")
    finally:
        d.stop()
    return cold, warm


def med(rs, key):
    return statistics.median(r[key] for r in rs)


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return "?"


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def report(results, started, rtt, loads):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def cell(system, cache, wl, phase, what):
        rs = results.get((system, cache, wl[0], phase), [])
        if not rs:
            return "-"
        if what == "lat":
            return f"{med(rs, 'p50_us'):.0f} / {med(rs, 'p99_us'):.0f}"
        return f"{med(rs, 'iops'):.0f}"

    lines = [
        "# Base on a network store: reads of base data through the daemon",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPUs ({cpu}), "
        f"kernel {platform.release()}, {version(['qemu-nbd', '--version'])}, "
        f"{version(['nbdfuse', '--version'])}. Load average at the start {loads[0]}, at the end "
        f"{loads[1]} (other work on the machine shows there).",
        "",
        f"Command: `make bench-network-base` (bench/network_base.py; BENCH_SECONDS={SECONDS:g}, "
        f"BENCH_REPS={REPS}, BENCH_BASE_MIB={BASE_MIB}). Medians of the repetitions; the two bases "
        "alternate within each repetition, in an order that changes from one repetition to the next.",
        "",
        f"- Base: {BASE_MIB} MiB of random data; an empty COW over it, so every read is a base read. "
        "Random 4 KiB reads over the whole base, one queue, `ubd-bench` (libblkio).",
        "- local: the COW's base is the file itself.",
        f"- nbd: the file is exported by `qemu-nbd --read-only --shared=8` in a network namespace "
        f"(the storage host) and mounted on this side with `nbdfuse -r` (multi-conn) over a veth pair "
        f"(TCP connect {rtt:.0f} us); served with `--backing-check size` (the mount's mtime is "
        "not the base's). Both namespaces share one kernel: no real network, and the storage "
        "host's page cache is this machine's.",
        "- cold: `sync; echo 3 > /proc/sys/vm/drop_caches`, a fresh nbdfuse mount (nbd), a new "
        f"daemon, then {SECONDS:g} s of the workload; warm: the whole base read once through the "
        "same daemon (sequential 1 MiB reads), then the same workload again (same seed: the same "
        "offsets in the same order). A cold run warms what it reads as it goes (and with "
        "`--cache writeback` the kernel's readahead around it).",
        "- `--cache writeback` (default): the daemon reads through the page cache (of the FUSE "
        "file for nbd). `--cache none`: O_DIRECT, which nbdfuse's file accepts; a warm nbd read "
        "then still crosses FUSE, nbdfuse and the NBD connection and hits the storage host's "
        "cache.",
        "",
        "| base | --cache | qd1 cold p50 / p99 (us) | qd1 warm p50 / p99 (us) | qd32 cold IOPS | "
        "qd32 warm IOPS | qd32 cold p50 / p99 (us) | qd32 warm p50 / p99 (us) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    qd1, qd32 = WORKLOADS
    for cache in CACHES:
        for system in SYSTEMS:
            lines.append(
                f"| {system} | {cache} | {cell(system, cache, qd1, 'cold', 'lat')} | "
                f"{cell(system, cache, qd1, 'warm', 'lat')} | {cell(system, cache, qd32, 'cold', 'iops')} | "
                f"{cell(system, cache, qd32, 'warm', 'iops')} | {cell(system, cache, qd32, 'cold', 'lat')} | "
                f"{cell(system, cache, qd32, 'warm', 'lat')} |")
    lines += ["", "nbd / local (IOPS ratio; at qd1 IOPS is 1 / latency):", "",
              "| --cache | qd1 cold | qd1 warm | qd32 cold | qd32 warm |", "|---|---:|---:|---:|---:|"]
    for cache in CACHES:
        cells = []
        for wl in WORKLOADS:
            for phase in ("cold", "warm"):
                a = results.get(("nbd", cache, wl[0], phase))
                b = results.get(("local", cache, wl[0], phase))
                cells.append(f"{med(a, 'iops') / med(b, 'iops'):.2f}" if a and b else "-")
        lines.append(f"| {cache} | " + " | ".join(cells) + " |")
    lines += ["", f"Raw results: `{os.path.relpath(os.path.join(WORK, 'results.json'), ROOT)}`.", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"|".join(k): v for k, v in results.items()}, f, indent=1)
    print(text)


def interrupted(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    if os.geteuid() != 0:
        sys.exit("bench-network-base needs root (network namespace, veth pair, FUSE mount, drop_caches)")
    for tool in ("ip", "qemu-nbd", "nbdfuse", "fusermount3"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: run `make deps`")
    if not os.path.exists("/dev/fuse"):
        sys.exit("no /dev/fuse: FUSE is not available")
    for b in (UBD, BENCH):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run `cargo build --release --workspace`")
    os.makedirs(WORK, exist_ok=True)
    base = make_base()
    store = Store(base)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so that `finally` undoes the set-up.
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupted)
    results = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = loadavg()
    cows = {"local": os.path.join(WORK, "local.cow"), "nbd": os.path.join(WORK, "nbd.cow")}
    try:
        store.up()
        store.mount()
        rtt = store.rtt_us()
        make_cow(cows["local"], base)
        make_cow(cows["nbd"], store.file)
        log(f"storage host {NS} at {STORE_IP} (veth {HOST_IP}), TCP connect {rtt:.0f} us; "
            f"base {base} mounted at {store.file}")
        n = 0
        for rep in range(REPS):
            for cache in CACHES:
                for wl in WORKLOADS:
                    order = SYSTEMS if n % 2 == 0 else SYSTEMS[::-1]
                    n += 1
                    for system in order:
                        cold, warm = measure(store, system, cache, wl, cows)
                        for phase, r in (("cold", cold), ("warm", warm)):
                            results.setdefault((system, cache, wl[0], phase), []).append(r)
                            log(f"rep {rep} {system:5} {cache:9} {wl[0]:17} {phase}: {r['iops']:8.0f} IOPS  "
                                f"p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:8.1f} us")
    finally:
        store.down()
    for p in cows.values():
        if os.path.exists(p):
            os.unlink(p)
    report(results, started, rtt, (load0, loadavg()))


if __name__ == "__main__":
    main()
