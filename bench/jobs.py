#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Block jobs on a served COW (issue 15): flatten and export while a guest
runs, and the daemon's memory with a 1 TiB COW. Not part of `make test`.

Measured, on the file system of bench/work:

1. the disk's sequential bandwidth: `dd` with O_DIRECT, 1 MiB, reading the
   base and writing a fresh file (the disk's bandwidth = min of the two; a
   flatten reads the base and writes the COW), and for reference the same
   by `ubd-bench --file` (io_uring, qd1, 1 MiB: a read of the base and a
   write into the holes of a sparse file, as the COW's data area is);
2. the guest's latency idle: a fresh COW (sectorsize 512) over a base of
   BENCH_BASE_GIB GiB of random data, `serve --cache none`; the guest is
   `ubd-bench` (libblkio) doing 4 KiB random I/O at qd1 on one queue, in
   windows of BENCH_WINDOW seconds that alternate randread and randwrite
   (the daemon serves one frontend at a time and ubd-bench does one mode
   per run), BENCH_SECONDS seconds in all;
   for comparison the same guest I/O with no daemon (`ubd-bench --file`:
   randread of the base, randwrite of a sparse scratch file), idle and
   while `dd` copies the base with O_DIRECT 1 MiB reads and writes;
3. a flatten under the same guest load, unlimited and at BENCH_RATES
   percent of the disk's bandwidth: the guest's windows start before the
   job and go on until it ended; only windows wholly inside the job count
   as "during" (the one straddling its start and the one straddling its
   end are dropped). A fresh COW each run;
4. an export (OUT in the same directory) the same way, unlimited and at
   BENCH_EXPORT_RATE percent; the image's size is checked;
5. RSS of the daemon serving a COW over a sparse 1 TiB base, sectorsize
   4096 against 512: at start, with a client doing random writes, after it
   left (/proc/PID/status, smaps_rollup, the bitmap memfd's mapping).

Every measurement of 2-4 runs BENCH_REPS times (default 3), the cases of a
repetition in an order that rotates from one repetition to the next;
medians are reported, and every run with the device's traffic from
/proc/diskstats (the machine may be shared). Per run, a latency figure is the median over that
run's windows, I/O-weighted, estimated from each window's p50 / p99 / p99.9
/ max (`pooled`); the report gives the median over the runs, the worst
window's p99 and the longest I/O.

Environment: BENCH_BASE_GIB (2), BENCH_SECONDS (10), BENCH_REPS (3),
BENCH_WINDOW (1.0), BENCH_RATES (25,50,75), BENCH_EXPORT_RATE (50),
BENCH_OUT (bench/work/jobs.md; the raw results go next to it, .json),
BENCH_DIR (bench/work).
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
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import listening, log  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.path.join(ROOT, "target/release/vhost-user-ubd")
BENCH = os.path.join(ROOT, "target/release/ubd-bench")
WORK = os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench/work"))
OUT = os.environ.get("BENCH_OUT", os.path.join(WORK, "jobs.md"))
BASE_GIB = float(os.environ.get("BENCH_BASE_GIB", "2"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
WINDOW = float(os.environ.get("BENCH_WINDOW", "1.0"))
RATES = [float(r) for r in os.environ.get("BENCH_RATES", "25,50,75").split(",") if r]
EXPORT_RATE = float(os.environ.get("BENCH_EXPORT_RATE", "50"))

MIB = 1 << 20
GIB = 1 << 30
BASE_BYTES = int(BASE_GIB * GIB) // MIB * MIB
GUEST_MODES = ("randread", "randwrite")

D = None  # the run's temporary directory (under WORK)
PROCS = []  # every process started in the background, stopped by PID
COMMANDS = {}  # what -> the first command line of that kind
SEED = [0]


# ---------------------------------------------------------------- helpers

def show(cmd):
    s = " ".join(str(c) for c in cmd)
    s = s.replace(UBD, "vhost-user-ubd").replace(BENCH, "ubd-bench")
    return s.replace(D + "/", "$D/") if D else s


def note(what, cmd):
    COMMANDS.setdefault(what, show(cmd))


def sh(what, cmd, **kw):
    note(what, cmd)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def rm(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def settle():
    """Dirty pages and discards of files just written or removed must not
    land in the next measurement (O_DIRECT everywhere: no cache drop)."""
    os.sync()
    time.sleep(0.5)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f0(x):
    return "-" if x is None else f"{x:.0f}"


def f1(x):
    return "-" if x is None else f"{x:.1f}"


def f2(x):
    return "-" if x is None else f"{x:.2f}"


def machine_load():
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        with open("/proc/pressure/io") as f:
            io = f.readline().strip()
    except OSError:
        io = "?"
    return f"load average {la}; io pressure: {io}"


def busy_others():
    """Other processes using CPU now (the machine is shared)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines()[1:]:
        p = line.split(None, 2)
        if len(p) == 3 and float(p[1]) >= 10 and int(p[0]) != os.getpid():
            rows.append(f"{p[2]} ({p[1]}% CPU)")
    return ", ".join(rows[:6]) or "none above 10% CPU"


# ---------------------------------------------------------------- files

def make_base(path, size):
    log(f"making the base {path}: {size / GIB:g} GiB of random data")
    with open(path, "wb") as f:
        chunk = 16 * MIB
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def create_cow(cow, base, sectorsize=None):
    rm(cow)
    cmd = [UBD, "create"] + (["--sectorsize", str(sectorsize)] if sectorsize else []) + [cow, base]
    sh(f"create{'-' + str(sectorsize) if sectorsize else ''}", cmd)


# ---------------------------------------------------------------- daemon

class Daemon:
    """`serve` on a COW with a control socket; stopped by SIGTERM to its PID."""

    def __init__(self, cow, name):
        self.sock = os.path.join(D, f"{name}.sock")
        self.ctl = os.path.join(D, f"{name}.ctl")
        rm(self.sock, self.ctl)
        cmd = [UBD, "serve", "--socket", self.sock, "--control", self.ctl, "--cache", "none", "--cow", cow]
        note("serve", cmd)
        self.log = open(os.path.join(D, "serve.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        PROCS.append(self.proc)
        self.pid = self.proc.pid
        end = time.time() + 30
        while not (listening(self.sock) and listening(self.ctl)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode} (see {D}/serve.log)")
            if time.time() > end:
                raise RuntimeError("serve: no socket after 30 s")
            time.sleep(0.02)

    def status(self):
        out = sh("status", [UBD, "status", "--control", self.ctl, "--json"]).stdout
        return json.loads(out)

    def cpu_s(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                p = f.read().rsplit(")", 1)[1].split()
            return (int(p[11]) + int(p[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def bench_cmd(target, mode, bs, seconds, depth=1, once=False, label=""):
    SEED[0] += 1
    cmd = [BENCH] + target + ["--queues", "1", "--depth", str(depth), "--mode", mode, "--bs", str(bs),
                              "--seconds", f"{seconds:g}", "--seed", str(SEED[0])]
    if once:
        cmd.append("--once")
    if label:
        cmd += ["--label", label]
    return cmd


class Guest(threading.Thread):
    """The guest: back-to-back ubd-bench windows alternating randread and
    randwrite (4 KiB, qd1, one queue) over the whole disk, until stopped
    or `count` windows ran. Each window: its mode, when the ubd-bench
    process started and ended (the measured interval is inside), its JSON."""

    def __init__(self, sock, count=None, targets=None, tag="guest"):
        super().__init__(daemon=True)
        # mode -> ubd-bench target arguments (default: the daemon's socket)
        self.targets = targets or {m: ["--socket", sock] for m in GUEST_MODES}
        self.tag = tag
        self.count = count
        self.windows = []
        self.error = None
        self.stopping = threading.Event()

    def run(self):
        i = 0
        while not self.stopping.is_set() and (self.count is None or i < self.count):
            mode = GUEST_MODES[i % len(GUEST_MODES)]
            i += 1
            cmd = bench_cmd(self.targets[mode], mode, 4096, WINDOW)
            note(f"{self.tag}-{mode}", cmd)
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            PROCS.append(p)
            out, err = p.communicate()
            t1 = time.monotonic()
            if p.returncode != 0:
                self.error = f"ubd-bench {mode} exited {p.returncode}: {err.strip()[-300:]}"
                break
            r = json.loads(out.strip().splitlines()[-1])
            r.update(t0=t0, t1=t1, window_mode=mode)
            self.windows.append(r)

    def stop(self):
        self.stopping.set()
        self.join()


def pooled(ws, q):
    """The q-quantile of all the windows' latencies together (each I/O
    counts once), estimated from each window's I/O count and percentiles:
    its distribution function is interpolated linearly through (0, 0),
    (p50, .5), (p99, .99), (p99.9, .999), (max, 1), the windows' functions
    summed weighted by their I/Os, and solved for q."""
    ws = [w for w in ws if w["ios"] > 0]
    if not ws:
        return None
    total = sum(w["ios"] for w in ws)

    def below(x):
        n = 0.0
        for w in ws:
            pts = [(0.0, 0.0), (w["p50_us"], 0.5), (w["p99_us"], 0.99), (w["p999_us"], 0.999), (w["max_us"], 1.0)]
            f = 1.0
            for (x0, f0_), (x1, f1_) in zip(pts, pts[1:]):
                if x < x1:
                    f = f0_ if x1 <= x0 else f0_ + (f1_ - f0_) * (x - x0) / (x1 - x0)
                    break
            n += w["ios"] * f
        return n / total

    lo, hi = 0.0, max(w["max_us"] for w in ws)
    for _ in range(60):
        mid = (lo + hi) / 2
        if below(mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


def window_stats(windows, mode):
    ws = [w for w in windows if w["window_mode"] == mode]
    if not ws:
        return None
    return {
        "windows": len(ws),
        "ios": sum(w["ios"] for w in ws),
        "p50": pooled(ws, 0.5),
        "p99": pooled(ws, 0.99),
        "p50_wmed": med([w["p50_us"] for w in ws]),
        "p99_wmed": med([w["p99_us"] for w in ws]),
        "p99_worst": max(w["p99_us"] for w in ws),
        "max": max(w["max_us"] for w in ws),
        "iops": med([w["iops"] for w in ws]),
    }


# ---------------------------------------------------------------- measurements

def dd_rate(cmd, what):
    r = sh(what, cmd)
    last = [ln for ln in r.stderr.splitlines() if "copied" in ln][-1]
    nbytes = int(last.split()[0])
    secs = float(last.split("copied,")[1].split()[0])
    return nbytes / secs / 1e6


def disk_rep(base):
    """One repetition of the sequential bandwidth measurements (MB/s)."""
    res = {}
    count = BASE_BYTES // MIB
    settle()
    res["dd-read"] = dd_rate(["dd", f"if={base}", "of=/dev/null", "bs=1M", "iflag=direct"], "dd-read")
    fresh = os.path.join(D, "fresh.raw")
    rm(fresh)
    settle()
    res["dd-write"] = dd_rate(["dd", "if=/dev/zero", f"of={fresh}", "bs=1M", f"count={count}", "oflag=direct",
                               "conv=fsync"], "dd-write")
    rm(fresh)
    settle()
    r = sh("bench-read", bench_cmd(["--file", base], "read", MIB, 600, once=True))
    res["bench-read"] = json.loads(r.stdout.strip().splitlines()[-1])["mb_s"]
    sparse = os.path.join(D, "sparse.raw")
    rm(sparse)
    note("truncate", ["truncate", "-s", str(BASE_BYTES), sparse])
    with open(sparse, "wb") as f:
        f.truncate(BASE_BYTES)
    r = sh("bench-write-holes", bench_cmd(["--file", sparse], "write", MIB, 600, once=True))
    res["bench-write-holes"] = json.loads(r.stdout.strip().splitlines()[-1])["mb_s"]
    rm(sparse)
    return res


def disk_sectors():
    """Sectors read and written so far on the device of WORK (/proc/diskstats)."""
    dev = os.stat(WORK).st_dev
    want = (os.major(dev), os.minor(dev))
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if (int(p[0]), int(p[1])) == want:
                    return int(p[5]), int(p[9])
    except (OSError, IndexError, ValueError):
        pass
    return None


def traffic(res, s0, s1, ours):
    """The device's traffic over the measured interval, and the part of it
    this run does not explain (other processes on the shared machine)."""
    if s0 and s1:
        total = ((s1[0] - s0[0]) + (s1[1] - s0[1])) * 512
        res["disk_mb"] = total / 1e6
        res["others_mb"] = max(0, total - ours) / 1e6


def guest_bytes(windows, t0=None, t1=None):
    return sum(w["ios"] * 4096 for w in windows if t0 is None or (w["t1"] > t0 and w["t0"] < t1))


def run_host(case, base, rep):
    """The disk itself: the guest's I/O by io_uring at files (randread of the
    base, randwrite of a sparse scratch file), idle or while `dd` copies the
    base to a fresh file with O_DIRECT, 1 MiB (a flatten's I/O)."""
    kind, _ = case
    scratch = os.path.join(D, f"scratch-{rep}.raw")
    copy = os.path.join(D, f"copy-{rep}.raw")
    rm(scratch, copy)
    with open(scratch, "wb") as f:
        f.truncate(BASE_BYTES)
    settle()
    targets = {"randread": ["--file", base], "randwrite": ["--file", scratch]}
    res = {"case": case_name(case), "rep": rep}
    try:
        if kind == "host-idle":
            g = Guest(None, count=max(2, round(SECONDS / WINDOW)), targets=targets, tag="host")
            s0 = disk_sectors()
            g.start()
            g.join()
            traffic(res, s0, disk_sectors(), guest_bytes(g.windows))
        else:
            g = Guest(None, targets=targets, tag="host")
            g.start()
            while not g.windows and g.is_alive():
                time.sleep(0.01)
            cmd = ["dd", f"if={base}", f"of={copy}", "bs=1M", "iflag=direct", "oflag=direct", "conv=fsync"]
            note("dd-copy", cmd)
            s0 = disk_sectors()
            j0 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True)
            j1 = time.monotonic()
            s1 = disk_sectors()
            g.stop()
            last = [ln for ln in p.stderr.splitlines() if "copied" in ln]
            secs = float(last[-1].split("copied,")[1].split()[0]) if last else j1 - j0
            res.update(exit=p.returncode, job={"state": "completed" if p.returncode == 0 else "failed"},
                       mbs=BASE_BYTES / secs / 1e6, elapsed_s=secs, cpu_pct=None)
            res["job_t0"], res["job_t1"] = j0, j1
            during = [w for w in g.windows if w["t0"] >= j0 and w["t1"] <= j1]
            res["coverage"] = sum(max(0.0, min(w["t1"], j1) - max(w["t0"], j0)) for w in g.windows) / (j1 - j0)
            traffic(res, s0, s1, 2 * BASE_BYTES + guest_bytes(g.windows, j0, j1))
            res["windows"] = g.windows
            for m in GUEST_MODES:
                res[m] = window_stats(during, m)
            return res
        if g.error:
            raise RuntimeError(g.error)
        res["windows"] = g.windows
        for m in GUEST_MODES:
            res[m] = window_stats(g.windows, m)
        return res
    finally:
        rm(scratch, copy)


def run_case(case, base, disk_mbs, rep):
    """One run: a fresh COW, the daemon, the guest; for a job, the job
    started once the guest ran a window, and the guest stopped after the
    job ended (its window in progress completes)."""
    kind, pct = case
    if kind.startswith("host"):
        return run_host(case, base, rep)
    cow = os.path.join(D, f"{kind}-{rep}.cow")
    create_cow(cow, base)
    settle()
    srv = Daemon(cow, "guest")
    res = {"case": case_name(case), "rep": rep}
    img = None
    try:
        if kind == "idle":
            g = Guest(srv.sock, count=max(2, round(SECONDS / WINDOW)))
            s0 = disk_sectors()
            g.start()
            g.join()
            if g.error:
                raise RuntimeError(g.error)
            traffic(res, s0, disk_sectors(), guest_bytes(g.windows))
            res["stats"] = srv.status().get("stats")
            res["windows"] = g.windows
            for m in GUEST_MODES:
                res[m] = window_stats(g.windows, m)
            return res
        g = Guest(srv.sock)
        g.start()
        while not g.windows and g.is_alive():
            time.sleep(0.01)
        rate = None if pct is None else round(disk_mbs * pct / 100)
        cmd = [UBD, kind, "--control", srv.ctl]
        if rate is not None:
            cmd += ["--rate", str(rate)]
        cmd += ["--output", "json"]
        if kind == "export":
            img = os.path.join(D, f"export-{rep}.raw")
            rm(img)
            cmd.append(img)
        note(f"{kind}{'-rate' if rate else ''}", cmd)
        cpu0 = srv.cpu_s()
        s0 = disk_sectors()
        j0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        j1 = time.monotonic()
        s1 = disk_sectors()
        cpu1 = srv.cpu_s()
        g.stop()
        if g.error:
            raise RuntimeError(g.error)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        job = json.loads(lines[-1]) if lines else {}
        st = srv.status()
        res.update(rate_mbs=rate, exit=p.returncode, stderr=p.stderr.strip()[-500:], job=job,
                   stats=st.get("stats"), wall_s=j1 - j0)
        elapsed = job.get("elapsed_s") or (j1 - j0)
        res["cpu_pct"] = (cpu1 - cpu0) / (j1 - j0) * 100 if cpu0 is not None and cpu1 is not None else None
        res["mbs"] = job.get("bytes_copied", 0) / elapsed / 1e6
        res["done_mbs"] = job.get("bytes_done", 0) / elapsed / 1e6
        res["elapsed_s"] = elapsed
        # The job ran (about) from j0 (the command's start; the daemon
        # starts it a few ms later) for elapsed_s.
        js, je = j0, min(j1, j0 + elapsed)
        res["job_t0"], res["job_t1"] = js, je
        during = [w for w in g.windows if w["t0"] >= js and w["t1"] <= je]
        cover = sum(max(0.0, min(w["t1"], je) - max(w["t0"], js)) for w in g.windows)
        res["coverage"] = cover / (je - js) if je > js else None
        res["before_start"] = g.windows[0]["t0"] < js
        res["after_end"] = g.windows[-1]["t1"] > je
        # The job reads and writes what it copied (an export's zeros are
        # not written; the base holds none).
        traffic(res, s0, s1, 2 * job.get("bytes_copied", 0) + guest_bytes(g.windows, j0, j1))
        res["windows"] = g.windows
        for m in GUEST_MODES:
            res[m] = window_stats(during, m)
        if img:
            try:
                s = os.stat(img)
                res["image_size"] = s.st_size
                res["image_alloc"] = s.st_blocks * 512
            except FileNotFoundError:
                res["image_size"] = None
        return res
    finally:
        srv.stop()
        rm(cow)
        if img:
            rm(img)


def case_name(case):
    kind, pct = case
    if kind in ("idle", "host-idle"):
        return kind
    if kind == "host-copy":
        return "host dd copy"
    return f"{kind} {'unlimited' if pct is None else f'{pct:g}%'}"


def mem(pid):
    m = {}
    for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
        m[key] = kib(f"/proc/{pid}/status", key)
    m["Pss"] = kib(f"/proc/{pid}/smaps_rollup", "Pss")
    # The bitmap's mapping in /proc/PID/smaps and the memfd's size.
    # ... and the crash journal's (a file in --crash-journal, /dev/shm).
    for k in ("bitmap", "journal"):
        m[k + "_rss"] = m[k + "_map"] = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            cur = None
            for line in f:
                p = line.split()
                if len(p) >= 5 and "-" in p[0] and ":" not in p[0]:
                    cur = ("bitmap" if "ubd-cow-bitmap" in line else
                           "journal" if line.rstrip().endswith(".journal") else None)
                elif cur and p[0] == "Size:":
                    m[cur + "_map"] = (m[cur + "_map"] or 0) + int(p[1])
                elif cur and p[0] == "Rss:":
                    m[cur + "_rss"] = (m[cur + "_rss"] or 0) + int(p[1])
    except OSError as e:
        m["smaps_error"] = str(e)
    m["memfd_bytes"] = None
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if "ubd-cow-bitmap" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    m["memfd_bytes"] = os.stat(f"/proc/{pid}/fd/{fd}").st_size
            except OSError:
                pass
    except OSError as e:
        m["fd_error"] = str(e)
    return m


def kib(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_case(sectorsize):
    base = os.path.join(D, "sparse-1t.raw")
    if not os.path.exists(base):
        note("truncate-1t", ["truncate", "-s", "1T", base])
        with open(base, "wb") as f:
            f.truncate(1 << 40)
    cow = os.path.join(D, f"rss-{sectorsize}.cow")
    create_cow(cow, base, sectorsize if sectorsize != 512 else None)
    cow_alloc = os.stat(cow).st_blocks * 512
    srv = Daemon(cow, f"rss{sectorsize}")
    try:
        time.sleep(0.5)
        res = {"sectorsize": sectorsize, "cow_alloc": cow_alloc, "start": mem(srv.pid)}
        cmd = bench_cmd(["--socket", srv.sock], "randwrite", 4096, 1.5)
        note("rss-client", cmd)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        PROCS.append(p)
        time.sleep(1.0)
        res["client"] = mem(srv.pid)
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"ubd-bench: {err.strip()[-300:]}")
        res["client_ios"] = json.loads(out.strip().splitlines()[-1])["ios"]
        time.sleep(0.5)
        res["after"] = mem(srv.pid)
        return res
    finally:
        srv.stop()
        rm(cow)


# ---------------------------------------------------------------- report

def binary_version():
    """The commit the tree is at, and whether src/ differs from it (the
    release binaries are built from the working tree)."""
    head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %ci"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--short", "src", "bench/src"], capture_output=True,
                           text=True).stdout.split("\n")
    dirty = [d.strip() for d in dirty if d.strip()]
    built = datetime.datetime.fromtimestamp(os.stat(UBD).st_mtime, datetime.timezone.utc)
    return (f"target/release built {built:%Y-%m-%d %H:%M} UTC; tree at {head or '?'}"
            + (f", src/ modified: {', '.join(dirty)}" if dirty else ", src/ clean"))


def goal_text(ok):
    return "**yes**" if ok else "no" if ok is not None else "-"


def report(started, t_total, disk, disk_bw, cases, results, rss, loads):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    fs = subprocess.run(["df", "-T", WORK], capture_output=True, text=True).stdout.splitlines()[-1].split()
    L = [
        "# Block jobs: flatten and export under guest load, RSS of a 1 TiB COW",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()}: {os.cpu_count()} CPUs ({cpu}), kernel "
        f"{platform.release()}; files on {fs[0]} ({fs[1]}) at {WORK}. `bench/jobs.py` "
        f"(BENCH_BASE_GIB={BASE_GIB:g}, BENCH_SECONDS={SECONDS:g}, BENCH_REPS={REPS}, BENCH_WINDOW={WINDOW:g}, "
        f"BENCH_RATES={','.join(f'{r:g}' for r in RATES)}, BENCH_EXPORT_RATE={EXPORT_RATE:g}), {t_total:.0f} s.",
        "",
        f"Binary: {binary_version()}.",
        "",
        f"Machine state: at start {loads[0]}; at the end {loads[1]}. Other busy processes at start: "
        f"{loads[2]}; at the end: {loads[3]}.",
        "",
        "## 1. Disk sequential bandwidth (O_DIRECT, 1 MiB, same file system)",
        "",
        f"{BASE_BYTES / GIB:g} GiB each, the median of {REPS} repetitions.",
        "",
        "| measurement | MB/s (each repetition) | median MB/s |",
        "|---|---|---:|",
    ]
    names = {
        "dd-read": "read of the base, `dd iflag=direct`",
        "dd-write": "write of a fresh file, `dd oflag=direct conv=fsync`",
        "bench-read": "read of the base, `ubd-bench --file` (io_uring, qd1)",
        "bench-write-holes": "write into the holes of a sparse file, `ubd-bench --file` (io_uring, qd1)",
    }
    for k, name in names.items():
        vals = [r[k] for r in disk]
        L.append(f"| {name} | {', '.join(f'{v:.0f}' for v in vals)} | {med(vals):.0f} |")
    L += [
        "",
        f"**The disk's sequential bandwidth** = min(dd read, dd write) = **{disk_bw:.0f} MB/s**; "
        f"the goal's half of it: {disk_bw / 2:.0f} MB/s.",
        "",
    ]

    def per_case(name):
        return [r for r in results if r["case"] == name]

    def agg(rs, mode, key):
        return med([r[mode][key] for r in rs if r.get(mode)])

    idle = per_case("idle")
    idle_p99 = {m: agg(idle, m, "p99") for m in GUEST_MODES}
    L += [
        "## 2. Guest latency idle",
        "",
        f"A fresh COW (sectorsize 512) over a {BASE_GIB:g} GiB base of random data, `serve --cache none`. The "
        f"guest: `ubd-bench` (libblkio vhost-user client), 4 KiB random I/O over the whole disk at qd1 on one queue, "
        f"in {WINDOW:g} s windows alternating randread and randwrite (a new connection per window: the daemon serves "
        f"one frontend at a time, ubd-bench one mode per run), {max(2, round(SECONDS / WINDOW))} windows "
        f"({SECONDS:g} s). Per run: p50 / p99 of the run's guest I/Os of each kind (I/O-weighted over its windows, "
        f"estimated from each window's p50 / p99 / p99.9 / max); the table: the median over the {REPS} runs; the "
        f"worst window's p99 and the longest I/O over all runs.",
        "",
        "| guest I/O | IOPS | p50 us | p99 us | worst window p99 us | max us |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in GUEST_MODES:
        rs = [r for r in idle if r.get(m)]
        L.append(f"| {m} | {f0(agg(rs, m, 'iops'))} | {f0(agg(rs, m, 'p50'))} | {f0(agg(rs, m, 'p99'))} | "
                 f"{f0(max((r[m]['p99_worst'] for r in rs), default=None))} | "
                 f"{f0(max((r[m]['max'] for r in rs), default=None))} |")
    L.append("")

    def job_table(kind):
        rows = [
            f"| {kind} | MB/s copied (runs) | % of disk | s | read p50 / p99 us | write p50 / p99 us | "
            "p99 / idle p99 (read, write) | worst window p99 (read, write) | max us (read, write) | "
            "windows during (r+w) | coverage | daemon CPU | waited | goal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        verdicts = {}
        for c in cases:
            if c[0] != kind:
                continue
            name = case_name(c)
            rs = per_case(name)
            if not rs:
                continue
            errs = [r for r in rs if r.get("exit") != 0 or r.get("job", {}).get("state") != "completed"]
            mbs = med([r["mbs"] for r in rs])
            ratio = {m: (agg(rs, m, "p99") / idle_p99[m]) if agg(rs, m, "p99") and idle_p99[m] else None
                     for m in GUEST_MODES}
            ok = None
            if mbs is not None and all(ratio[m] is not None for m in GUEST_MODES):
                ok = mbs >= disk_bw / 2 and all(ratio[m] <= 2 for m in GUEST_MODES) and not errs
            verdicts[name] = (ok, mbs, ratio)
            wins = [sum(r[m]["windows"] for m in GUEST_MODES if r.get(m)) for r in rs]
            rate = rs[0].get("rate_mbs")
            label = name.split(" ", 1)[1] + (f" ({rate} MB/s)" if rate else "")
            worst = lambda m, k: max((r[m][k] for r in rs if r.get(m)), default=None)  # noqa: E731
            rows.append(
                f"| {label}{' ERR' if errs else ''} | {f0(mbs)} ({', '.join(f0(r['mbs']) for r in rs)}) | "
                f"{f0(mbs / disk_bw * 100 if mbs else None)}% | {f1(med([r['elapsed_s'] for r in rs]))} | "
                f"{f0(agg(rs, 'randread', 'p50'))} / {f0(agg(rs, 'randread', 'p99'))} | "
                f"{f0(agg(rs, 'randwrite', 'p50'))} / {f0(agg(rs, 'randwrite', 'p99'))} | "
                f"{f2(ratio['randread'])}, {f2(ratio['randwrite'])} | "
                f"{f0(worst('randread', 'p99_worst'))}, {f0(worst('randwrite', 'p99_worst'))} | "
                f"{f0(worst('randread', 'max'))}, {f0(worst('randwrite', 'max'))} | "
                f"{'/'.join(str(w) for w in wins)} | {f0(100 * med([r['coverage'] for r in rs]))}% | "
                f"{f0(med([r['cpu_pct'] for r in rs]))}% | "
                f"{'/'.join(str(r.get('job', {}).get('writes_waited', '?')) for r in rs)} | {goal_text(ok)} |")
        return rows, verdicts

    hi, hc = per_case("host-idle"), per_case("host dd copy")
    L += [
        "### The disk itself, for comparison",
        "",
        "The same guest I/O with no daemon: `ubd-bench --file` (io_uring, O_DIRECT, qd1, 4 KiB) randread of the "
        "base and randwrite of a sparse scratch file (first writes, like the COW's), in the same alternating "
        f"{WINDOW:g} s windows; idle, and while `dd` copies the base to a fresh file with O_DIRECT 1 MiB reads and "
        "writes (what a flatten does, without the daemon; windows wholly inside the copy).",
        "",
        "| host guest I/O | copy MB/s | randread p50 / p99 us | randwrite p50 / p99 us | p99 / host idle p99 "
        "(read, write) | worst window p99 (read, write) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    hidle = {m: agg(hi, m, "p99") for m in GUEST_MODES}
    for name, rs in (("idle", hi), ("during dd copy", hc)):
        if not rs:
            continue
        rat = [f2(agg(rs, m, "p99") / hidle[m]) if agg(rs, m, "p99") and hidle[m] else "-" for m in GUEST_MODES]
        worst = [f0(max((r[m]["p99_worst"] for r in rs if r.get(m)), default=None)) for m in GUEST_MODES]
        L.append(f"| {name} | {f0(med([r.get('mbs') for r in rs]))} | "
                 f"{f0(agg(rs, 'randread', 'p50'))} / {f0(agg(rs, 'randread', 'p99'))} | "
                 f"{f0(agg(rs, 'randwrite', 'p50'))} / {f0(agg(rs, 'randwrite', 'p99'))} | "
                 f"{rat[0]}, {rat[1]} | {worst[0]}, {worst[1]} |")
    L.append("")

    L += [
        "## 3. Flatten under the guest load",
        "",
        "Each run: a fresh COW (nothing of it in the COW yet), the daemon, the guest of section 2 started; once "
        "its first window ended, `vhost-user-ubd flatten --control CTL [--rate R] --output json` (waits for the "
        "end); the guest is stopped after the job ended (its window in progress completes). So the guest load "
        "runs from before the job's start to after its end; the latency columns use only the windows wholly "
        "inside the job (from the command's start for the job's `elapsed_s`); *coverage* = the share of the job's "
        "time inside a guest window (the rest: ubd-bench starting and connecting between windows). Throughput = "
        "`bytes_copied / elapsed_s` of the job's last status (`bytes_copied` < disk size: sectors the guest wrote "
        "first are skipped). Rate limits in MB/s (10^6 B/s), as % of the disk's bandwidth. *daemon CPU*: the "
        "daemon's CPU time over the job's wall time (100% = one core). *waited*: the job's `writes_waited` per "
        "run (guest writes parked on a chunk being copied). Goal: flatten >= 50% of the disk's sequential "
        "bandwidth with the guest's p99 <= 2x idle (both reads and writes).",
        "",
    ]
    rows, fl = job_table("flatten")
    L += rows
    L.append("")
    holds = [n for n, v in fl.items() if v[0]]
    unl = fl.get("flatten unlimited")
    if unl and unl[0]:
        L.append("**Goal: holds** with the flatten unlimited.")
    elif holds:
        L.append(f"**Goal: not unlimited; holds with {', '.join(holds)}.**")
    else:
        L.append("**Goal: does not hold** with any rate tried.")
    why = []
    for n, (ok, mbs, ratio) in fl.items():
        if ok is False:
            parts = []
            if mbs is not None and mbs < disk_bw / 2:
                parts.append(f"{mbs:.0f} MB/s < {disk_bw / 2:.0f}")
            for m in GUEST_MODES:
                if ratio[m] is not None and ratio[m] > 2:
                    parts.append(f"{m} p99 {ratio[m]:.1f}x idle")
            why.append(f"{n}: {'; '.join(parts) or 'a run failed'}")
    if why:
        L.append("Misses: " + " | ".join(why) + ".")
    if hc and hi and all(hidle[m] and agg(hc, m, "p99") for m in GUEST_MODES):
        L.append("")
        L.append(f"For comparison, the disk itself (no daemon): while `dd` copies the base at "
                 f"{f0(med([r.get('mbs') for r in hc]))} MB/s, the guest's p99 is "
                 f"{agg(hc, 'randread', 'p99') / hidle['randread']:.1f}x (reads) and "
                 f"{agg(hc, 'randwrite', 'p99') / hidle['randwrite']:.1f}x (writes) its idle p99.")
    L.append("")

    L += [
        "## 4. Export under the guest load",
        "",
        "The same, with `vhost-user-ubd export --control CTL [--rate R] --output json OUT`, OUT in the same "
        "directory (the disk is the fresh COW over the base as the guest wrote it until the start instant). "
        "*waited*: guest writes that waited for their chunk to be saved first (copy-before-write). The goal's "
        "thresholds are shown for comparison.",
        "",
    ]
    rows, ex = job_table("export")
    L += rows
    L.append("")
    exp = [r for r in results if r["case"].startswith("export")]
    sizes = sorted({r.get("image_size") for r in exp}, key=lambda x: (x is None, x))
    allocs = [r.get("image_alloc") for r in exp if r.get("image_alloc") is not None]
    size_ok = all(r.get("image_size") == BASE_BYTES for r in exp)
    L.append(f"Exported image: size {', '.join(str(s) for s in sizes)} bytes in {len(exp)} runs "
             f"(the disk: {BASE_BYTES}): **{'correct' if size_ok else 'WRONG'}**; allocated "
             f"{min(allocs) / MIB:.0f}-{max(allocs) / MIB:.0f} MiB." if allocs else "Exported image: none found.")
    L.append("")

    L += [
        "## 5. RSS of the daemon serving a 1 TiB COW",
        "",
        "A sparse 1 TiB base (`truncate -s 1T`), a fresh COW over it (its bitmap a hole in the file), "
        "`serve --cache none`; read 0.5 s after the sockets listen (*start*), 1 s into a client's 1.5 s of 4 KiB "
        "random writes at qd1 over the whole disk (*client*: libblkio connected, its guest memory mapped), and "
        "0.5 s after it left (*after*). KiB, from /proc/PID/status (VmRSS, RssAnon, RssShmem), smaps_rollup "
        "(Pss), the `memfd:ubd-cow-bitmap` mapping in /proc/PID/smaps (its Size, and Rss = pages touched) and "
        "the crash journal's mapping (`/dev/shm/*.journal`, the default `--crash-journal`).",
        "",
        "| sectorsize | bitmap memfd (expected) | COW file allocated | when | VmRSS | RssAnon | RssShmem | Pss | "
        "bitmap mapping Rss / Size | journal mapping Rss / Size |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rss:
        exp_b = (1 << 40) // r["sectorsize"] // 8
        for when in ("start", "client", "after"):
            m = r[when]
            head = (f"| {r['sectorsize']} | {m['memfd_bytes'] / MIB if m['memfd_bytes'] else 0:.0f} MiB "
                    f"({exp_b / MIB:.0f} MiB) | {r['cow_alloc'] / 1024:.0f} KiB") if when == "start" else "| | |"
            L.append(f"{head} | {when}{' (' + str(r['client_ios']) + ' writes)' if when == 'client' else ''} | "
                     f"{m['VmRSS']} | {m['RssAnon']} | {m['RssShmem']} | {m['Pss']} | "
                     f"{m['bitmap_rss']} / {m['bitmap_map']} | {m['journal_rss']} / {m['journal_map']} |")
    L.append("")
    for r in rss:
        s = r["start"]
        if s["bitmap_rss"] is not None and s["bitmap_map"]:
            L.append(f"- sectorsize {r['sectorsize']}: at start {s['bitmap_rss']} KiB of the bitmap's "
                     f"{s['bitmap_map']} KiB are resident: the bitmap is "
                     f"{'**touched fully**' if s['bitmap_rss'] >= 0.9 * s['bitmap_map'] else 'not touched fully'} "
                     f"at start; after {r['client_ios']} random writes {r['after']['bitmap_rss']} KiB "
                     f"(the journal's mapping: {s['journal_rss']} KiB at start, {r['after']['journal_rss']} KiB "
                     f"after, of {r['after']['journal_map']} KiB).")
    L.append("")

    L += [
        "## Every run",
        "",
        "In the order run. *disk MB*: the device's reads + writes over the measured interval (/proc/diskstats: "
        "the idle windows, or the job's command); *others MB*: what this run does not explain (the job's "
        "bytes read and written, the guest's I/O; the rest is the file system's metadata and other processes "
        "on this shared machine). Daemon counters from `status --json` after the job.",
        "",
        "| case | rep | MB/s | s | read p50 / p99 us | write p50 / p99 us | longest I/O ms (its window's start, "
        "s into the job) | disk MB | others MB | reads_parked | writes_held | copy_ups | bitmap_writes | syncs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rr, rw, st = r.get("randread") or {}, r.get("randwrite") or {}, r.get("stats") or {}
        js, je = r.get("job_t0"), r.get("job_t1")
        ws = [w for w in r["windows"] if js is None or (w["t0"] >= js and w["t1"] <= je)]
        worst = max(ws, key=lambda w: w["max_us"], default=None)
        longest = "-" if worst is None else (
            f"{worst['max_us'] / 1000:.1f} {worst['window_mode'][4:]}"
            + (f" ({worst['t0'] - js:.1f} of {je - js:.1f})" if js is not None else ""))
        L.append(f"| {r['case']} | {r['rep']} | {f0(r.get('mbs'))} | {f1(r.get('elapsed_s'))} | "
                 f"{f0(rr.get('p50'))} / {f0(rr.get('p99'))} | {f0(rw.get('p50'))} / {f0(rw.get('p99'))} | "
                 f"{longest} | "
                 f"{f0(r.get('disk_mb'))} | {f0(r.get('others_mb'))} | " +
                 " | ".join(str(st.get(k, "-")) for k in ("reads_parked", "writes_held", "copy_ups",
                                                          "bitmap_writes", "syncs")) + " |")
    L.append("")

    warns = []
    for line in open(os.path.join(D, "serve.log"), errors="replace") if os.path.exists(os.path.join(D, "serve.log")) else []:
        if " WARN " in line or " ERROR " in line:
            w = line.split("] ", 1)[-1].strip()
            if w not in warns:
                warns.append(w)
    L += ["Daemon log (`serve`, every run): " + (f"{len(warns)} distinct WARN/ERROR lines:" if warns
                                               else "no WARN or ERROR line."), ""]
    L += [f"- `{w[:300]}`" for w in warns[:12]]
    L += [""] if warns else []

    L += ["## Commands", "", "`$D` is the run's temporary directory under bench/work (removed at the end).", "",
          "```sh"]
    L += [f"{c}    # {w}" for w, c in COMMANDS.items()]
    L += ["```", "", f"Raw results (every run, every window): `{os.path.splitext(os.path.basename(OUT))[0]}.json` next to this file.", ""]
    return "\n".join(L)


# ---------------------------------------------------------------- main

def main():
    global D
    for b in (UBD, BENCH):
        if not os.path.exists(b):
            sys.exit(f"{b} missing: run `cargo build --release --workspace`")
    os.makedirs(WORK, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.monotonic()
    loads = [machine_load(), None, busy_others(), None]
    D = tempfile.mkdtemp(prefix="jobs-", dir=WORK)
    try:
        base = os.path.join(D, "base.raw")
        make_base(base, BASE_BYTES)
        disk = []
        for rep in range(REPS):
            disk.append(disk_rep(base))
            log(f"disk rep {rep}: " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in disk[-1].items()))
        disk_bw = min(med([d["dd-read"] for d in disk]), med([d["dd-write"] for d in disk]))
        log(f"disk sequential bandwidth: {disk_bw:.0f} MB/s")
        cases = [("idle", None), ("host-idle", None), ("host-copy", None), ("flatten", None)] + [("flatten", p) for p in RATES] + \
            [("export", None), ("export", EXPORT_RATE)]
        results = []
        for rep in range(REPS):
            k = rep % len(cases)
            for c in cases[k:] + cases[:k]:
                r = run_case(c, base, disk_bw, rep)
                results.append(r)
                rr, rw = r.get("randread") or {}, r.get("randwrite") or {}
                extra = "" if "mbs" not in r else (
                    f" {r['mbs']:.0f} MB/s in {r['elapsed_s']:.1f} s, exit {r['exit']}, "
                    f"{r['job'].get('state')}, coverage {100 * (r['coverage'] or 0):.0f}%")
                extra += f"; disk {f0(r.get('disk_mb'))} MB, others {f0(r.get('others_mb'))} MB"
                log(f"rep {rep} {case_name(c):18}{extra}; read p50/p99 {f0(rr.get('p50'))}/{f0(rr.get('p99'))} us, "
                    f"write {f0(rw.get('p50'))}/{f0(rw.get('p99'))} us")
                settle()
        rm(base)
        rss = []
        for ss in (4096, 512):
            rss.append(rss_case(ss))
            log(f"rss sectorsize {ss}: {rss[-1]}")
        loads[1] = machine_load()
        loads[3] = busy_others()
        text = report(started, time.monotonic() - t_start, disk, disk_bw, cases, results, rss, loads)
        with open(OUT, "w") as f:
            f.write(text)
        with open(os.path.splitext(OUT)[0] + ".json", "w") as f:
            json.dump({"disk": disk, "disk_bw": disk_bw, "results": results, "rss": rss}, f, indent=1)
        print(text)
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(D, ignore_errors=True)


if __name__ == "__main__":
    main()
