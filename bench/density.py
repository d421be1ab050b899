#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""`make bench-density`: many daemons on one host (issue 16, item 7).

BENCH_DAEMONS (default 1000) daemons, each serving its own COW over one
shared 64 MiB base (`serve --socket S --cow C --crash-journal DIR`, the
defaults otherwise: 16 queues offered, a queue's io_uring made only at its
first request), started one after another; then BENCH_GUESTS (default 8) of
them serve a booted test guest (vm-images/run-vm.sh, guest test `rw`: it
writes and reads its disk), one guest at a time, while all the others run.

Per daemon, from /proc: RSS and PSS (smaps_rollup; PSS shares the binary's
pages among the daemons), open descriptors, threads; start-up = exec until
the socket accepts. Host: MemAvailable before and after all daemons run.
Reported: median, p99 and max per quantity, idle (all daemons, after start)
and serving (the guests' daemons while their guest runs, sampled every 50
ms, the peak). A markdown section goes to stdout and BENCH_OUT (default
bench/work/density.md). The issue's goal: <= 4 MiB idle each, nothing that
grows with the number of daemons on the host.
"""

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.path.join(ROOT, "target/release/vhost-user-ubd")
VM = os.path.join(ROOT, "vm-images/run-vm.sh")
N = int(os.environ.get("BENCH_DAEMONS", "1000"))
GUESTS = int(os.environ.get("BENCH_GUESTS", "8"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench/work/density.md"))


def kib(pid, key, path="status"):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_available():
    return kib("self", "MemAvailable", "../meminfo")


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def threads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def accepts(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def stats(xs):
    xs = sorted(xs)
    if not xs:
        return (0, 0, 0)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (statistics.median(xs), p99, xs[-1])


def fmt(t, unit, scale=1.0, digits=1):
    return " / ".join(f"{v / scale:.{digits}f}" for v in t) + f" {unit}"


def main():
    if not os.path.exists(UBD):
        sys.exit(f"{UBD} missing: run `make release`")
    work = tempfile.mkdtemp(prefix="density-", dir=os.environ.get("BENCH_DIR"))
    procs = []
    try:
        base = os.path.join(work, "base.img")
        with open(base, "wb") as f:
            f.write(os.urandom(1 << 20) * 64)
        journal = os.path.join(work, "journal")
        os.mkdir(journal)
        avail0 = mem_available()
        starts = []
        for i in range(N):
            cow = os.path.join(work, f"d{i}.cow")
            sock = os.path.join(work, f"d{i}.sock")
            subprocess.run([UBD, "create", cow, base], check=True, stderr=subprocess.DEVNULL)
            t0 = time.monotonic()
            p = subprocess.Popen(
                [UBD, "serve", "--socket", sock, "--cow", cow, "--crash-journal", journal],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(os.environ, RUST_LOG="warn"),
            )
            procs.append((p, sock))
            while not accepts(sock):
                if p.poll() is not None:
                    sys.exit(f"daemon {i} exited with {p.returncode}")
                time.sleep(0.001)
            starts.append((time.monotonic() - t0) * 1000)
            if i % 100 == 99:
                print(f"{i + 1} daemons running", file=sys.stderr)
        # The accept test connections above are gone; let the daemons settle.
        time.sleep(2)
        avail1 = mem_available()
        pids = [p.pid for p, _ in procs]
        rss = [kib(pid, "VmRSS") for pid in pids]
        pss = [kib(pid, "Pss", "smaps_rollup") for pid in pids]
        nfd = [fds(pid) for pid in pids]
        nthr = [threads(pid) for pid in pids]
        # Booted guests on a few of them, one at a time: 32 MiB of direct
        # reads and 16 MiB of direct writes.
        script = os.path.join(work, "guest.sh")
        with open(script, "w") as f:
            f.write(
                "dd if=/dev/vda of=/dev/null bs=1M count=32 iflag=direct 2>/dev/null || exit 1\n"
                "dd if=/dev/zero of=/dev/vda bs=1M count=16 seek=8 oflag=direct 2>/dev/null || exit 1\n"
                "sync\n"
            )
        serving = []
        results = []
        for g in range(min(GUESTS, N)):
            p, sock = procs[(g * max(1, N // max(1, GUESTS))) % N]
            peak = {"rss": 0, "pss": 0, "fds": 0, "thr": 0}
            done = threading.Event()

            def sample(pid=p.pid, peak=peak, done=done):
                while not done.is_set():
                    peak["rss"] = max(peak["rss"], kib(pid, "VmRSS"))
                    peak["pss"] = max(peak["pss"], kib(pid, "Pss", "smaps_rollup"))
                    peak["fds"] = max(peak["fds"], fds(pid))
                    peak["thr"] = max(peak["thr"], threads(pid))
                    time.sleep(0.05)

            t = threading.Thread(target=sample)
            t.start()
            r = subprocess.run(
                [
                    VM,
                    "--socket",
                    sock,
                    "--test",
                    "none",
                    "--script",
                    script,
                    "--serial-log",
                    os.path.join(work, f"guest{g}.serial"),
                    "--timeout",
                    "120",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            done.set()
            t.join()
            summary = [l for l in r.stdout.splitlines() if l.startswith("run-vm:")]
            results.append((r.returncode, summary[-1] if summary else r.stdout[-300:]))
            serving.append(peak)
        alive = sum(1 for p, _ in procs if p.poll() is None)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    host = (avail0 - avail1) / max(1, N)
    lines = [
        "### Density (`make bench-density`, bench/density.py)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {N} daemons, "
        f"each its own COW over one 64 MiB base, `serve --socket S --cow C` "
        f"(defaults: 16 queues offered, queues made at their first request); "
        f"{len(serving)} of them then served a booted guest (32 MiB of O_DIRECT reads, 16 MiB of O_DIRECT writes), "
        f"one at a time, while all ran. {alive} of {N} daemons still ran at the end.",
        "",
        "| quantity | idle: median / p99 / max | serving a guest: median / p99 / max of the peaks |",
        "|---|---:|---:|",
        f"| RSS | {fmt(stats(rss), 'MiB', 1024, 2)} | "
        f"{fmt(stats([s['rss'] for s in serving]), 'MiB', 1024, 2)} |",
        f"| PSS (binary pages shared) | {fmt(stats(pss), 'MiB', 1024, 2)} | "
        f"{fmt(stats([s['pss'] for s in serving]), 'MiB', 1024, 2)} |",
        f"| open descriptors | {fmt(stats(nfd), '', 1, 0)} | "
        f"{fmt(stats([s['fds'] for s in serving]), '', 1, 0)} |",
        f"| threads | {fmt(stats(nthr), '', 1, 0)} | "
        f"{fmt(stats([s['thr'] for s in serving]), '', 1, 0)} |",
        f"| start-up (exec to accepting) | {fmt(stats(starts), 'ms', 1, 1)} | |",
        "",
        f"Host memory: MemAvailable fell by {host / 1024:.2f} MiB per daemon "
        f"({(avail0 - avail1) / 1024:.0f} MiB for {N}).",
        "",
        "Guests: " + "; ".join(f"rc {rc}: {s}" for rc, s in results),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
