#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""`make bench-handover`: the guest-visible stall of a live handover.

A QEMU guest (TCG, `vm-images/run-vm.sh`, 1 vCPU, 1 queue) whose disk is a
UML COW served by `vhost-user-ubd` runs fio at queue depth 1: random 4 KiB
writes, O_DIRECT, libaio, time based, with a latency log entry per request
(`--write_lat_log --log_avg_msec=0 --log_unix_epoch=1`). Meanwhile the host
hands the daemon over BENCH_HANDOVERS times (default 20) to a new instance
(`serve --takeover CTL`, no `--control`: it takes the control socket over
too). Each handover: start the new instance, wait for its `handover: live`,
for the old one's exit (status recorded) and for QEMU to connect to the new
one (`frontend connected` in its log); then BENCH_GAP seconds (default 1.0)
of undisturbed I/O before the next one.

At depth 1 the guest waits on one request at a time, so the longest gap
between completions around a handover is that request's latency: a
handover's stall is the longest request latency whose completion falls in
the handover's window (from its start to 0.5 s after QEMU reconnected),
the guest's clock mapped onto the host's by clock lines the guest prints
(`adjtimex`, the smallest host-minus-guest difference of five). The guest
reports every request slower than max(BENCH_THRESHOLD_US (2000), 4 x p50);
a window without one gets "< threshold".

Two modes, each on a fresh base + COW: QEMU `reconnect=1` (`run-vm.sh
--reconnect`: `-chardev socket,...,reconnect=1`, which QEMU >= 9.2 spells
`reconnect-ms=1000`) and `reconnect-ms=10`. Reported per mode: p50 and max
of the per-handover stall (ms), the requests fio saw fail (its error count
with --continue_on_error=all, plus kernel I/O errors) or lose (issued but
never completed), the normal p50 latency, how long the new instance took to
be live, and the old instances' exit statuses. A markdown table goes to
stdout and to BENCH_OUT (default bench/work/handover.md).

Environment: BENCH_HANDOVERS (20), BENCH_GAP (1.0 s), BENCH_THRESHOLD_US
(2000), BENCH_DIR (bench/work), BENCH_OUT (bench/work/handover.md),
BENCH_MODES (comma-separated subset of reconnect=1,reconnect-ms=10),
BENCH_SERVE_ARGS (more `serve` arguments for every instance, e.g.
"--cache none"), BENCH_KEEP=1 (keep the work dirs). Uses the release binary
(target/release/vhost-user-ubd; `make bench-handover` builds it).
"""

import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import images, listening, log, read, tail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.path.join(ROOT, "target/release/vhost-user-ubd")
VM = os.path.join(ROOT, "vm-images")
HANDOVERS = int(os.environ.get("BENCH_HANDOVERS", "20"))
GAP = float(os.environ.get("BENCH_GAP", "1.0"))
THRESHOLD_US = int(os.environ.get("BENCH_THRESHOLD_US", "2000"))
WORK = os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench/work"))
OUT = os.environ.get("BENCH_OUT", os.path.join(WORK, "handover.md"))
SERVE_ARGS = shlex.split(os.environ.get("BENCH_SERVE_ARGS", ""))
KEEP = os.environ.get("BENCH_KEEP") == "1"
# name, run-vm.sh arguments, how long QEMU waits before it reconnects (s)
ALL_MODES = [
    ("reconnect=1", ["--reconnect"], 1.0),
    ("reconnect-ms=10", ["--reconnect-ms", "10"], 0.01),
]
MODES = [m for m in ALL_MODES
         if not os.environ.get("BENCH_MODES") or m[0] in os.environ["BENCH_MODES"].split(",")]
BASE_SIZE = "256M"
FIO_SIZE = "64M"
WARMUP = 3.0  # seconds of fio before the first handover
LIVE_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0
CONNECT_TIMEOUT = 10.0

GUEST_SCRIPT = r"""#!/bin/sh
# handover-bench (bench/handover.py, passed as an fw_cfg script): fio at
# queue depth 1, random 4 KiB writes, O_DIRECT, one latency log entry per
# request; prints clock lines for the host, every request slower than the
# threshold, and a summary.
# usage: vub.secs=S [vub.size=64M] [vub.thr_us=2000]
set -eu
. /lib/vub/testlib.sh
FIO=/usr/bin/fio
SECS=${VUB_SECS:-60}
SIZE=${VUB_SIZE:-64M}
THR_US=${VUB_THR_US:-2000}
[ -x "$FIO" ] || fail "no $FIO in the initramfs"
now_us() { adjtimex | awk '/time.tv_sec/{s=$2} /time.tv_usec/{u=$2} END{printf "%d%06d\n", s, u}'; }
i=0
while [ $i -lt 5 ]; do echo "VUB: hb-clock us=$(now_us)"; sleep 0.2; i=$((i + 1)); done
echo "VUB: hb-fio-start secs=$SECS size=$SIZE uptime=$(up)"
if "$FIO" --name=h --filename="$DEV" --rw=randwrite --bs=4k --iodepth=1 --ioengine=libaio \
    --direct=1 --size="$SIZE" --time_based --runtime="$SECS" --write_lat_log=/tmp/h \
    --log_avg_msec=0 --log_unix_epoch=1 --continue_on_error=all --eta=never \
    > /tmp/fio.out 2>&1; then rc=0; else rc=$?; fi
LOG=/tmp/h_lat.1.log
[ -s "$LOG" ] || { sed 's/^/fio: /' /tmp/fio.out | tail -n 30; fail "fio wrote no latency log (rc=$rc)"; }
ioerr=$(sed -n 's/.*errors *: total=\([0-9]*\).*/\1/p' /tmp/fio.out | head -n 1)
issued=$(sed -n 's/.*issued rwts: total=[0-9]*,\([0-9]*\),.*/\1/p' /tmp/fio.out | head -n 1)
n=$(wc -l < "$LOG")
cut -d, -f2 "$LOG" | tr -d ' ' | sort -n > /tmp/lat.sorted
p50=$(awk -v k=$(( (n + 1) / 2 )) 'NR == k {printf "%d", $1 / 1000; exit}' /tmp/lat.sorted)
p99=$(awk -v k=$(( (n * 99 + 99) / 100 )) 'NR == k {printf "%d", $1 / 1000; exit}' /tmp/lat.sorted)
max=$(tail -n 1 /tmp/lat.sorted | awk '{printf "%d", $1 / 1000}')
thr=$THR_US
[ $((4 * p50)) -gt "$thr" ] && thr=$((4 * p50))
awk -F', *' -v thr="$thr" '
  { lat = $2 / 1000; gap = (NR > 1) ? $1 - pt : 0; pt = $1
    if (lat >= thr || gap * 1000 >= thr) printf "VUB: hb-slow t=%s lat_us=%d gap_ms=%d\n", $1, lat, gap }
' "$LOG" > /tmp/slow
slow=$(wc -l < /tmp/slow)
head -n 4000 /tmp/slow
dmesg | grep -iE 'I/O error|Buffer I/O|blk_update_request|(vda|virtio_blk|virtio).*(error|fail|timeout|abort)' > /tmp/dmesg.err || true
kerr=$(wc -l < /tmp/dmesg.err)
sed 's/^/VUB: hb-dmesg /' /tmp/dmesg.err
echo "VUB: hb-done rc=$rc ios=$n issued=${issued:-?} ioerr=${ioerr:-?} kerr=$kerr p50_us=$p50 p99_us=$p99 max_us=$max thr_us=$thr slow=$slow uptime=$(up)"
[ "$rc" = 0 ]
"""


# every process this script started, stopped at the end if still running
STARTED = []


def cleanup():
    for p in STARTED:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def log_time(text, needle):
    """Host time (s) of the first daemon log line containing `needle`
    (env_logger's `[2026-12-02T02:46:55.657Z ...` stamps), or None."""
    for line in text.splitlines():
        if needle in line:
            m = re.match(r"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
            if m:
                return datetime.datetime.fromisoformat(m.group(1)).replace(
                    tzinfo=datetime.timezone.utc).timestamp()
    return None


def persisted_ms(text):
    """`disk persisted in 62.960127ms` of a source's log, in ms."""
    m = re.search(r"disk persisted in ([0-9.]+)(ns|µs|us|ms|s)\b", text)
    if not m:
        return None
    return float(m.group(1)) * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


class Instance:
    """One `vhost-user-ubd serve` process and its log."""

    def __init__(self, args, logf):
        self.logf = logf
        self.out = open(logf, "wb")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen([UBD, "serve"] + args + SERVE_ARGS, stdout=self.out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        STARTED.append(self.proc)

    def log(self):
        return read(self.logf)

    def wait_log(self, needle, timeout):
        """Host time at which `needle` was first seen in the log, or None."""
        end = time.time() + timeout
        while time.time() < end:
            if needle in self.log():
                return time.time()
            if self.proc.poll() is not None:
                return time.time() if needle in self.log() else None
            time.sleep(0.002)
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def run_mode(name, vm_args, reconnect_s, kernel, initrd):
    d = tempfile.mkdtemp(prefix="handover-", dir=WORK)
    base, cow = os.path.join(d, "base.raw"), os.path.join(d, "disk.cow")
    sock, ctl = os.path.join(d, "vub.sock"), os.path.join(d, "ctl.sock")
    serial = os.path.join(d, "guest.serial")
    subprocess.run([os.path.join(VM, "make-base.sh"), base, BASE_SIZE], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([UBD, "create", cow, base], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.makedirs(os.path.join(d, "journal"))
    script = os.path.join(d, "handover-bench.sh")
    with open(script, "w") as f:
        f.write(GUEST_SCRIPT)
    # fio runs long enough for every handover: warm-up, then per handover
    # the handover itself, QEMU's reconnect delay and the gap.
    secs = int(WARMUP + HANDOVERS * (1.0 + reconnect_s + GAP) + 5)
    cur = Instance(["--socket", sock, "--control", ctl, "--cow", cow, "--queues", "1",
                    "--crash-journal", os.path.join(d, "journal")], os.path.join(d, "vub-0.log"))
    first_cmd = " ".join(cur.proc.args).replace(d + "/", "").replace(ROOT + "/", "")
    end = time.time() + 20
    while not listening(sock):
        if cur.proc.poll() is not None or time.time() > end:
            sys.exit(f"the first instance did not listen:\n{tail(cur.logf)}")
        time.sleep(0.01)
    vm_out = open(os.path.join(d, "run-vm.out"), "wb")
    vm = subprocess.Popen(
        [os.path.join(VM, "run-vm.sh"), "--socket", sock, "--test", "handover-bench", "--script", script,
         "--queues", "1", "--smp", "1", "--timeout", str(secs + 120), "--serial-log", serial,
         "--kernel", kernel, "--initrd", initrd,
         "--append", f"vub.secs={secs} vub.size={FIO_SIZE} vub.thr_us={THRESHOLD_US}"] + vm_args,
        stdout=vm_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    STARTED.append(vm)
    log(f"[{name}] work dir {d}; guest fio runs {secs} s; {HANDOVERS} handovers")

    # clock lines: host time - guest time, the smallest of five
    offsets, seen, fio_start = [], set(), None
    end = time.time() + 120
    while fio_start is None:
        if vm.poll() is not None or time.time() > end:
            sys.exit(f"[{name}] the guest never started fio\n{tail(serial)}{tail(cur.logf)}")
        now = time.time()
        text = read(serial)
        for m in re.finditer(r"VUB: hb-clock us=(\d+)", text):
            if m.group(1) not in seen:
                seen.add(m.group(1))
                offsets.append(now - int(m.group(1)) / 1e6)
        if "VUB: hb-fio-start" in text:
            fio_start = now
        time.sleep(0.002)
    offset = min(offsets)
    fio_end = fio_start + secs

    handovers, failures = [], []
    time.sleep(WARMUP)
    for k in range(1, HANDOVERS + 1):
        if time.time() + 1.0 + reconnect_s + 0.5 > fio_end - 1.0:
            failures.append(f"only {k - 1} handovers fit in the guest's fio run of {secs} s")
            break
        old = cur
        t0 = time.time()
        new = Instance(["--takeover", ctl], os.path.join(d, f"vub-{k}.log"))
        t_live = new.wait_log("handover: live", LIVE_TIMEOUT)
        if t_live is None:
            failures.append(f"handover {k}: the new instance (pid {new.pid}) was not live "
                            f"(exit {new.proc.poll()})\n{tail(new.logf)}{tail(old.logf)}")
            new.stop()
            break
        try:
            rc = old.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        t_exit = time.time()
        old.out.close()
        cur = new
        t_conn = new.wait_log("frontend connected", CONNECT_TIMEOUT)
        # the daemons' own log stamps (same clock, not delayed by the
        # polling above): when B was live and when QEMU reached it, and
        # how long A's persist at suspend took
        blog = new.log()
        h = {"k": k, "old_pid": old.pid, "new_pid": new.pid, "start": t0,
             "live": log_time(blog, "handover: live") or t_live, "exit": t_exit, "rc": rc,
             "conn": log_time(blog, "frontend connected") or t_conn, "persist": persisted_ms(old.log())}
        handovers.append(h)
        log(f"[{name}] handover {k}: pid {old.pid} -> {new.pid}: live {1e3 * (h['live'] - t0):.0f} ms, "
            f"old exit {rc} at {1e3 * (t_exit - t0):.0f} ms, QEMU on the new one "
            + (f"at {1e3 * (h['conn'] - t0):.0f} ms" if t_conn else "NOT within 10 s")
            + f", persist at suspend {fmt(h['persist'], '.1f')} ms")
        if rc is None:
            failures.append(f"handover {k}: the old instance (pid {old.pid}) did not exit\n{tail(old.logf)}")
            old.proc.kill()
            old.proc.wait()
            break
        if t_conn is None:
            failures.append(f"handover {k}: QEMU did not connect to pid {new.pid}\n{tail(new.logf)}")
            break
        time.sleep(GAP)

    try:
        vm.wait(secs + 180)
    except subprocess.TimeoutExpired:
        vm.send_signal(signal.SIGTERM)
        vm.wait()
        failures.append("run-vm.sh did not end")
    vm_out.close()
    last_rc = cur.stop()
    text = read(serial)
    done = re.search(r"VUB: hb-done (.*)", text)
    if not done:
        failures.append(f"the guest printed no summary (run-vm.sh exit {vm.returncode}; a request lost "
                        f"makes fio hang until the timeout)\n{tail(serial, 40)}")
        summary = {}
    else:
        summary = dict(kv.split("=", 1) for kv in done.group(1).split() if "=" in kv)
    slow = [(int(m.group(1)) / 1e3 + offset, int(m.group(2)) / 1e3, int(m.group(3)))
            for m in re.finditer(r"VUB: hb-slow t=(\d+) lat_us=(\d+) gap_ms=(\d+)", text)]
    # per handover: the slowest request completing in its window
    stalls, gaps, claimed = [], [], set()
    for h in handovers:
        lo = h["start"] - 0.05
        hi = (h["conn"] or h["live"] + 2.0) + 0.5
        inside = [i for i, s in enumerate(slow) if lo <= s[0] <= hi]
        claimed.update(inside)
        stalls.append(max((slow[i][1] for i in inside), default=None))
        gaps.append(max((slow[i][2] for i in inside), default=None))
    outside = [slow[i][1] for i in range(len(slow)) if i not in claimed]
    thr_ms = int(summary.get("thr_us", THRESHOLD_US)) / 1e3

    def num(key):
        v = summary.get(key)
        return int(v) if v is not None and v.isdigit() else None

    lost = None
    if num("issued") is not None and num("ios") is not None:
        lost = num("issued") - num("ios")
    result = {
        "mode": name,
        "handovers": len(handovers),
        "stalls": stalls,
        "gaps": gaps,
        "thr_ms": thr_ms,
        "outside_max": max(outside, default=None),
        "outside_n": len(outside),
        "ioerr": num("ioerr"),
        "kerr": num("kerr"),
        "lost": lost,
        "ios": num("ios"),
        "p50_ms": num("p50_us") / 1e3 if num("p50_us") is not None else None,
        "p99_ms": num("p99_us") / 1e3 if num("p99_us") is not None else None,
        "fio_rc": summary.get("rc"),
        "live_ms": [1e3 * (h["live"] - h["start"]) for h in handovers],
        "conn_ms": [1e3 * (h["conn"] - h["live"]) for h in handovers if h["conn"]],
        "persist_ms": [h["persist"] for h in handovers if h["persist"] is not None],
        "old_rcs": [h["rc"] for h in handovers],
        "last_rc": last_rc,
        "failures": failures,
        "vm_rc": vm.returncode,
        "first_cmd": first_cmd,
        "dir": d,
    }
    for f in failures:
        log(f"[{name}] PROBLEM: {f}")
    if not KEEP and not failures:
        shutil.rmtree(d)
    else:
        log(f"[{name}] work dir kept: {d}")
    return result


def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def stall_cells(r):
    """p50 and max of the per-handover stalls; a window without a slow
    request counts as below the threshold."""
    if not r["stalls"]:
        return "-", "-"
    below = f"< {r['thr_ms']:.0f}"
    vals = sorted(r["stalls"], key=lambda s: -1.0 if s is None else s)
    p50 = vals[(len(vals) - 1) // 2]
    return (below if p50 is None else f"{p50:.0f}"), (below if vals[-1] is None else f"{vals[-1]:.0f}")


def main():
    if not os.path.exists(UBD):
        sys.exit(f"{UBD} missing: run `cargo build --release`")
    if "takeover" not in subprocess.run([UBD, "serve", "--help"], capture_output=True, text=True).stdout:
        sys.exit(f"{UBD} has no `serve --takeover`: rebuild it (`cargo build --release`)")
    for tool in ("qemu-system-x86_64",):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: run `make deps`")
    os.makedirs(WORK, exist_ok=True)
    kernel, initrd = images()
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        results = [run_mode(name, args, rs, kernel, initrd) for name, args, rs in MODES]
    finally:
        cleanup()
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        "# Live handover: guest-visible stall",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} CPUs, kernel "
        f"{platform.release()}), {qemu}, TCG. Command: `make bench-handover` (bench/handover.py; "
        f"BENCH_HANDOVERS={HANDOVERS}, BENCH_GAP={GAP:g}).",
        "",
        "Guest: 1 vCPU, `vhost-user-blk-pci` with 1 queue, fio random 4 KiB writes at queue depth 1 "
        f"(libaio, O_DIRECT, {FIO_SIZE} region of a {BASE_SIZE} UML COW disk, time based), one latency "
        "log entry per request. Host: the first instance "
        f"`{results[0]['first_cmd'] if results else ''}`, then per handover `vhost-user-ubd serve "
        "--takeover ctl.sock`, the next handover "
        f"{GAP:g} s after QEMU connected to the new instance. Stall of a handover: the longest request "
        "latency completing between its start and 0.5 s after QEMU reconnected (at depth 1, the longest "
        "gap between completions). Failed: fio's error count (`--continue_on_error=all`) plus kernel I/O "
        "errors; lost: requests fio issued that never completed. Persist at suspend: the old instance's "
        "`disk persisted in` (data sync, bitmap, sync); live: from the new instance's start to its "
        "`handover: live`; QEMU connected: its `frontend connected` (daemon log stamps).",
        "",
        "| QEMU reconnect | handovers | stall p50 (ms) | stall max (ms) | failed / lost requests | "
        "normal p50 latency (ms) | old instance's persist at suspend, p50 (ms) | new instance live, p50 (ms) | "
        "live → QEMU connected, p50 (ms) | old instances exit 0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p50s, maxs = stall_cells(r)
        failed = None if r["ioerr"] is None else r["ioerr"] + (r["kerr"] or 0)
        ok = sum(1 for c in r["old_rcs"] if c == 0)
        lines.append(
            f"| `{r['mode']}` | {r['handovers']} | {p50s} | {maxs} | {fmt(failed)} / {fmt(r['lost'])} | "
            f"{fmt(r['p50_ms'], '.2f')} | {fmt(statistics.median(r['persist_ms']) if r['persist_ms'] else None, '.1f')} | "
            f"{fmt(statistics.median(r['live_ms']) if r['live_ms'] else None)} | "
            f"{fmt(statistics.median(r['conn_ms']) if r['conn_ms'] else None, '.1f')} | "
            f"{ok}/{len(r['old_rcs'])} |"
        )
    lines += ["", "Per mode:", ""]
    for r in results:
        st = ", ".join("<thr" if s is None else f"{s:.0f}" for s in r["stalls"])
        lines.append(
            f"- `{r['mode']}`: {fmt(r['ios'])} requests, p99 {fmt(r['p99_ms'], '.2f')} ms; per-handover "
            f"stall (ms, in order): {st}; slow requests (>= {r['thr_ms']:.1f} ms) outside the handover "
            f"windows: {r['outside_n']}, the longest {fmt(r['outside_max'])} ms; new instance live after "
            f"max {fmt(max(r['live_ms']) if r['live_ms'] else None)} ms; the last instance exited "
            f"{r['last_rc']} on SIGTERM; fio exit {r['fio_rc']}, run-vm.sh exit {r['vm_rc']}."
        )
        for f in r["failures"]:
            lines.append(f"  - problem: {f.splitlines()[0]}")
    lines.append("")
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if any(r["failures"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
