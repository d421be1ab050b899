#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""`make bench-migration`: live migration of a booted guest, its disk
handed from backend to backend, downtime and total time.

The guest of tests/boot_migration.rs (its guest script,
vm-images/guest/tests/fio-loop.sh, passed as the fw_cfg script): QEMU 10
TCG, 2 vCPUs, 512 MiB of memfd shared RAM, a vhost-user-blk-pci disk with 2
queues (`reconnect-ms=10`), rounds of fio random 4 KiB writes at depth 32,
O_DIRECT, crc32c verify over the first 32 MiB, sampled blocks checked. The
QEMU command line is the test's (no run-vm.sh: it has no -incoming and no
QMP). Meanwhile the host migrates the VM BENCH_MIGRATIONS times (default
5), each to a new QEMU (`-incoming unix:...`) on a new backend, BENCH_GAP
seconds (default 1.5) of guest I/O on each destination first; QMP
`migrate-set-parameters max-bandwidth` BENCH_BANDWIDTH_MIB MiB/s (default
1024), QEMU's default downtime limit (300 ms), `migrate`, `query-migrate`
polled until `completed`, `quit` to the source. The last destination gets
the fw_cfg stop flag: the guest's round that starts there is its last.
Afterwards the guest's result (every round verified, no I/O error), the
disk's content (the last round's data, host fio --verify_only on the merged
image) and the base (sha256) are checked.

Systems (BENCH_SYSTEMS, comma-separated; default both):
  ours       vhost-user-ubd (UML COW over the base): the first instance
             `serve --socket --control --cow --queues 2`, each destination
             `serve --takeover <ctl of the instance serving now> --socket
             <new> --control <new>`. Its switch-over runs after QEMU's
             migration completed (at the destination's first kick), so
             query-migrate's downtime does not include it: reported are the
             destination's own `handover: live (switch-over of a live
             migration in ...)` and the source's `disk persisted in` at
             suspend.
  qsd-qcow2  qemu-storage-daemon 10, a qcow2 overlay over the same base,
             two qsd instances sharing it. QEMU 10.0's way for this,
             `allow-inactive` exports and `blockdev-set-active`, is not
             available to vhost-user-blk exports (10.0.2: "Export type does
             not support inactive exports"), so each qsd exports a
             `throttle` filter node, and the image moves between them at
             the source's pause before switch-over (migration capability
             `pause-before-switchover`): the source qsd points its filter at
             a null-co placeholder (`blockdev-reopen`, which drains) and
             closes the qcow2 (`blockdev-del`: flushed, locks released),
             the destination qsd opens it (`blockdev-add`) and points its
             filter at it, then `migrate-continue`. That storage switch is
             inside query-migrate's downtime; its own time is reported too.

For ours also: from `completed` to the first guest request the destination
completed (host clock; its request count polled from `completed` on with
`vhost-user-ubd status`). Not for qsd: qsd 10 keeps no request count of a
vhost-user-blk export that QMP shows (its BlockBackend is anonymous, so
query-blockstats skips it). Both serve from the host page cache (their
defaults).

Output: a markdown table (median and max per system) and the per-migration
figures, to stdout and BENCH_OUT (default bench/work/migration.md).

Environment: BENCH_MIGRATIONS (5), BENCH_GAP (1.5 s), BENCH_BANDWIDTH_MIB
(1024), BENCH_SYSTEMS (ours,qsd-qcow2), BENCH_DIR (bench/work), BENCH_OUT,
BENCH_KEEP=1 (keep the work dirs), BENCH_UBD (the vhost-user-ubd binary,
default target/release/vhost-user-ubd; `make bench-migration` builds it).
"""

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import images, listening, log, read, tail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UBD = os.environ.get("BENCH_UBD", os.path.join(ROOT, "target/release/vhost-user-ubd"))
VM = os.path.join(ROOT, "vm-images")
HOST_FIO = os.path.join(VM, "cache/fio/fio")
GUEST_SCRIPT = os.path.join(VM, "guest/tests/fio-loop.sh")
MIGRATIONS = int(os.environ.get("BENCH_MIGRATIONS", "5"))
GAP = float(os.environ.get("BENCH_GAP", "1.5"))
BANDWIDTH_MIB = int(os.environ.get("BENCH_BANDWIDTH_MIB", "1024"))
WORK = os.environ.get("BENCH_DIR", os.path.join(ROOT, "bench/work"))
OUT = os.environ.get("BENCH_OUT", os.path.join(WORK, "migration.md"))
KEEP = os.environ.get("BENCH_KEEP") == "1"
ALL_SYSTEMS = ["ours", "qsd-qcow2"]
SYSTEMS = [s for s in os.environ.get("BENCH_SYSTEMS", ",".join(ALL_SYSTEMS)).split(",") if s]
MIB = 1 << 20
BASE_SIZE = 64 * MIB
FIO_SIZE = 32 * MIB
QUEUES = 2
MEM_MIB = 512
TEST = "migration-loop"
LOOP_CAP = 300  # seconds: the guest's loop ends by the stop flag long before
TIMEOUT = 90.0  # seconds for one migration, a daemon to go live, ...


def guest_script():
    """The guest's fio loop, the one tests/boot_migration.rs runs too."""
    if not os.path.isfile(GUEST_SCRIPT):
        sys.exit(f"no {GUEST_SCRIPT}")
    return GUEST_SCRIPT


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def duration_ms(text):
    """A Rust Duration's Debug text (`72.3ms`, `4.6µs`, `1.2s`) in ms."""
    m = re.match(r"([0-9.]+)(ns|µs|us|ms|s)\b", text)
    if not m:
        return None
    return float(m.group(1)) * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


class Failed(Exception):
    pass


# every process this script started, stopped at the end if still running
STARTED = []


def spawn(args, logf, env=None):
    out = open(logf, "wb")
    p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    out.close()
    STARTED.append(p)
    return p


def cleanup():
    for p in STARTED:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(cond, timeout, what, proc=None, logf=None):
    end = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise Failed(f"{what}: the process exited ({proc.returncode})\n" + (tail(logf) if logf else ""))
        if time.time() > end:
            raise Failed(f"{what}: not within {timeout:.0f} s\n" + (tail(logf) if logf else ""))
        time.sleep(0.005)


class QMP:
    """A QMP connection (one command at a time; events are skipped)."""

    def __init__(self, path, proc, logf):
        wait_for(lambda: os.path.exists(path), 20, f"QMP socket {path}", proc, logf)
        end = time.time() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > end or proc.poll() is not None:
                    raise Failed(f"cannot connect to {path}\n{tail(logf)}")
                time.sleep(0.01)
        self.s.settimeout(60)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise Failed(f"QMP {name}: connection closed")
            r = json.loads(line)
            if "event" in r:
                continue
            if "error" in r:
                raise Failed(f"QMP {name}: {r['error']}")
            return r["return"]


class Probe(threading.Thread):
    """Polls a backend's count of completed guest requests (`value()`,
    None when it cannot tell) until stopped: (host time, count) samples."""

    def __init__(self, value):
        super().__init__(daemon=True)
        self.value = value
        self.samples = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                v = self.value()
            except (Failed, OSError, ValueError, KeyError):
                v = None
            if v is not None:
                self.samples.append((time.time(), v))
            time.sleep(0.002)

    def first_above(self, baseline, timeout=15.0):
        """Host time of the first sample above `baseline` (waiting up to
        `timeout` for one), then stops; None if there was none."""
        end = time.time() + timeout
        while time.time() < end and not any(v > baseline for _, v in list(self.samples)):
            time.sleep(0.01)
        self.done.set()
        self.join()
        return next((t for t, v in self.samples if v > baseline), None)


class Qemu:
    def __init__(self, d, k, sock, kernel, initrd, script, seed, incoming=None, stop=False):
        self.k = k
        self.logf = os.path.join(d, f"qemu-{k}.log")
        qmp = os.path.join(d, f"qmp-{k}.sock")
        args = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-object", f"memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on",
            "-machine", "q35,accel=tcg,memory-backend=mem", "-cpu", "max", "-smp", str(QUEUES),
            "-m", f"{MEM_MIB}M",
            "-chardev", f"socket,id=vub0,path={sock},reconnect-ms=10",
            "-device", f"vhost-user-blk-pci,chardev=vub0,num-queues={QUEUES}",
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 panic=-1 quiet vub.test={TEST} vub.queues={QUEUES} vub.seed={seed} "
                       f"vub.loop_secs={LOOP_CAP} vub.fio_size={FIO_SIZE // MIB}M vub.fio_depth=32",
            "-chardev", f"file,id=ser0,path={os.path.join(d, TEST + '.serial')},append=on",
            "-serial", "chardev:ser0", "-no-reboot",
            "-fw_cfg", f"name=opt/vub/script,file={script}",
            "-fw_cfg", f"name=opt/vub/stop,string={1 if stop else 0}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]
        if incoming:
            args += ["-incoming", f"unix:{incoming}"]
        self.proc = spawn(args, self.logf)
        self.qmp = QMP(qmp, self.proc, self.logf)
        if incoming:
            wait_for(lambda: listening(incoming), 20, f"QEMU {k} -incoming", self.proc, self.logf)

    def quit(self):
        try:
            self.qmp.cmd("quit")
        except (Failed, OSError):
            pass
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise Failed(f"QEMU {self.k} did not quit\n{tail(self.logf)}")


class Ours:
    """vhost-user-ubd on a UML COW over the base."""

    name = "ours"
    capabilities = []

    def __init__(self, d, base):
        self.d = d
        self.base = base
        self.cow = os.path.join(d, "disk.cow")
        subprocess.run([UBD, "create", self.cow, base], check=True, capture_output=True)
        os.makedirs(os.path.join(d, "journal"))
        self.env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.cur = None
        self.first_cmd = ""

    def _path(self, k, ext):
        return os.path.join(self.d, f"vub-{k}.{ext}")

    def start(self, k):
        """Backend k; returns its vhost-user socket."""
        sock, ctl, logf = self._path(k, "sock"), self._path(k, "ctl"), self._path(k, "log")
        if k == 0:
            args = [UBD, "serve", "--socket", sock, "--control", ctl, "--cow", self.cow, "--queues", str(QUEUES),
                    "--crash-journal", os.path.join(self.d, "journal")]
            self.first_cmd = " ".join(args[1:]).replace(self.d + "/", "")
        else:
            args = [UBD, "serve", "--takeover", self._path(k - 1, "ctl"), "--socket", sock, "--control", ctl]
        p = spawn(args, logf, self.env)
        wait_for(lambda: listening(sock), 20, f"vhost-user-ubd {k} listening", p, logf)
        self.prev, self.cur = self.cur, (k, p)
        return sock

    def status(self, k):
        out = subprocess.run([UBD, "status", "--json", "--control", self._path(k, "ctl")],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise Failed(f"status of instance {k}: {out.stdout}{out.stderr}")
        return json.loads(out.stdout)

    def pre_switchover(self, k):
        return None

    def after(self, k, t_done):
        """After QEMU's `completed` (the source QEMU has quit): the
        destination's switch-over, the source's exit, the first guest
        request the destination completes."""
        (pk, pp), (nk, np_) = self.prev, self.cur
        nlog, plog = self._path(nk, "log"), self._path(pk, "log")
        wait_for(lambda: "handover: live" in read(nlog), TIMEOUT, f"instance {nk} live", np_, nlog)
        t_live = time.time()
        try:
            rc = pp.wait(20)
        except subprocess.TimeoutExpired:
            raise Failed(f"instance {pk} still runs 20 s after {nk} went live\n{tail(plog)}{tail(nlog)}")
        if rc != 0:
            raise Failed(f"instance {pk} exited {rc}\n{tail(plog)}")
        st = self.status(nk)
        if st["handover"]["state"] != "live":
            raise Failed(f"instance {nk}: status handover {st['handover']}")
        c0 = st["device"]["completed"]
        end = time.time() + 15
        while self.status(nk)["device"]["completed"] <= c0:
            if time.time() > end:
                raise Failed(f"instance {nk} went live but completed no guest request in 15 s\n{tail(nlog)}")
            time.sleep(0.005)
        m = re.search(r"\(switch-over of a live migration in (\S+?)\)", read(nlog))
        p = re.search(r"disk persisted in (\S+?)\)", read(plog))
        return {
            "switch_ms": duration_ms(m.group(1)) if m else None,
            "persist_ms": duration_ms(p.group(1)) if p else None,
            "live_ms": 1e3 * (t_live - t_done),
            "old_rc": rc,
        }

    def probe(self, k):
        return Probe(lambda: self.status(k)["device"]["completed"])

    def baseline(self):
        """Requests the source completed (its last `stats since start`
        line): the destination's count starts there (restored at the
        switch-over)."""
        got = re.findall(r"requests completed (\d+)", read(self._path(self.prev[0], "log")))
        if not got:
            raise Failed(f"no `requests completed` in {self._path(self.prev[0], 'log')}")
        return int(got[-1])

    def stop(self):
        k, p = self.cur
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
        if rc != 0:
            raise Failed(f"the last instance exited {rc} on SIGTERM\n{tail(self._path(k, 'log'))}")

    def merged(self):
        out = os.path.join(self.d, "merged.raw")
        subprocess.run([UBD, "check", self.cow], check=True, capture_output=True)
        subprocess.run(["uml_moo", self.cow, out], check=True, capture_output=True)
        return out


class QsdQcow2:
    """qemu-storage-daemon 10, a qcow2 overlay over the base, moved between
    two qsd instances at the pause before switch-over (see the docstring)."""

    name = "qsd-qcow2"
    capabilities = ["pause-before-switchover"]

    def __init__(self, d, base):
        self.d = d
        self.base = base
        self.ov = os.path.join(d, "overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", self.ov], check=True)
        self.cur = None
        self.prev = None
        self.first_cmd = ""

    def _path(self, k, ext):
        return os.path.join(self.d, f"qsd-{k}.{ext}")

    def _image_nodes(self):
        """blockdev-add arguments of the image: the backing as its own
        read-only file + raw nodes, the overlay, the qcow2 node."""
        return [
            {"driver": "file", "node-name": "bf", "filename": self.base, "read-only": True},
            {"driver": "raw", "node-name": "bb", "file": "bf", "read-only": True},
            {"driver": "file", "node-name": "of", "filename": self.ov},
            {"driver": "qcow2", "node-name": "q", "file": "of", "backing": "bb"},
        ]

    def start(self, k):
        sock, logf = self._path(k, "sock"), self._path(k, "log")
        args = ["qemu-storage-daemon", "--object", "throttle-group,id=tg0",
                "--blockdev", f"driver=null-co,node-name=n0,size={BASE_SIZE}"]
        if k == 0:
            for n in self._image_nodes():
                args += ["--blockdev", ",".join(f"{a}={'on' if v is True else v}" for a, v in n.items())]
        args += ["--blockdev", f"driver=throttle,node-name=t0,throttle-group=tg0,file={'q' if k == 0 else 'n0'}",
                 "--export", f"type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={sock},"
                             f"writable=on,num-queues={QUEUES}",
                 "--chardev", f"socket,id=m0,path={self._path(k, 'qmp')},server=on,wait=off",
                 "--monitor", "chardev=m0"]
        if k == 0:
            self.first_cmd = " ".join(args[1:]).replace(self.d + "/", "")
        p = spawn(args, logf)
        wait_for(lambda: listening(sock), 20, f"qsd {k} listening", p, logf)
        qmp = QMP(self._path(k, "qmp"), p, logf)
        self.prev, self.cur = self.cur, (k, p, qmp)
        return sock

    def pre_switchover(self, k):
        """At the source's pause: the image moves from qsd k-1 to qsd k."""
        (_, _, src), (_, _, dst) = self.prev, self.cur
        t0 = time.time()
        src.cmd("blockdev-reopen", options=[{"driver": "throttle", "node-name": "t0", "file": "n0",
                                             "throttle-group": "tg0"}])
        for n in ("q", "of", "bb", "bf"):
            src.cmd("blockdev-del", **{"node-name": n})
        t1 = time.time()
        for n in self._image_nodes():
            dst.cmd("blockdev-add", **n)
        dst.cmd("blockdev-reopen", options=[{"driver": "throttle", "node-name": "t0", "file": "q",
                                             "throttle-group": "tg0"}])
        t2 = time.time()
        return {"release_ms": 1e3 * (t1 - t0), "open_ms": 1e3 * (t2 - t1), "switch_ms": 1e3 * (t2 - t0)}

    def probe(self, k):
        """qsd 10 keeps no request count an outsider can read for a
        vhost-user-blk export: its BlockBackend is anonymous, so
        query-blockstats skips it, and node-level stats only carry
        wr_highest_offset. Not measured."""
        return None

    def baseline(self):
        return 0

    def after(self, k, t_done):
        (pk, pp, pq) = self.prev
        try:
            pq.cmd("quit")
        except (Failed, OSError):
            pass
        try:
            rc = pp.wait(20)
        except subprocess.TimeoutExpired:
            raise Failed(f"qsd {pk} did not quit\n{tail(self._path(pk, 'log'))}")
        return {"old_rc": rc}

    def stop(self):
        k, p, q = self.cur
        try:
            q.cmd("quit")
        except (Failed, OSError):
            pass
        rc = p.wait(30)
        if rc != 0:
            raise Failed(f"the last qsd exited {rc}\n{tail(self._path(k, 'log'))}")

    def merged(self):
        chk = subprocess.run(["qemu-img", "check", self.ov], capture_output=True, text=True)
        if chk.returncode != 0:
            raise Failed(f"qemu-img check of the overlay: {chk.stdout}{chk.stderr}")
        out = os.path.join(self.d, "merged.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", self.ov, out], check=True)
        return out


def check_image(path, base, seed):
    """The merged image holds the guest's last round (host fio
    --verify_only, as tests/boot_handover.rs) and the base after it."""
    word = f"FIOPATTERN-{seed}\n".encode()
    out = subprocess.run(
        [HOST_FIO, "--name=v", f"--filename={path}", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
         "--verify=crc32c", f"--size={FIO_SIZE // MIB}M", f"--verify_pattern=0x{word.hex()}", "--verify_only",
         "--verify_fatal=1", "--randrepeat=1", f"--randseed={seed}", "--verify_state_save=0", "--eta=never"],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise Failed(f"host fio --verify_only of the merged image failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    with open(path, "rb") as f, open(base, "rb") as b:
        f.seek(FIO_SIZE)
        b.seek(FIO_SIZE)
        if f.read() != b.read():
            raise Failed("the merged image differs from the base after the guest's region")


def run_system(cls, kernel, initrd):
    d = tempfile.mkdtemp(prefix=f"migration-{cls.name}-", dir=WORK)
    base = os.path.join(d, "base.raw")
    subprocess.run([os.path.join(VM, "make-base.sh"), base, str(BASE_SIZE)], check=True, stdout=subprocess.DEVNULL)
    base_sha = sha256(base)
    script = guest_script()
    serial = os.path.join(d, TEST + ".serial")
    seed = int(time.time()) % 1000000
    be = cls(d, base)
    res = {"system": cls.name, "dir": d, "migrations": [], "failures": [], "rounds": None, "cmd": ""}
    log(f"[{cls.name}] work dir {d}")
    qemus = []
    try:
        sock = be.start(0)
        res["cmd"] = be.first_cmd
        src = Qemu(d, 0, sock, kernel, initrd, script, seed)
        qemus.append(src)
        t = time.time()
        wait_for(lambda: "VUB: loop-start" in read(serial), 120, "the guest's loop", src.proc, serial)
        log(f"[{cls.name}] guest loop started after {time.time() - t:.1f} s")
        for k in range(1, MIGRATIONS + 1):
            time.sleep(GAP)
            if "VUB: loop-done" in read(serial):
                raise Failed(f"the guest's loop ended before migration {k}\n{tail(serial)}")
            sock = be.start(k)
            mig = os.path.join(d, f"mig-{k}.sock")
            dst = Qemu(d, k, sock, kernel, initrd, script, seed, incoming=mig, stop=(k == MIGRATIONS))
            qemus.append(dst)
            src.qmp.cmd("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": True} for c in cls.capabilities])
            src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH_MIB * MIB})
            t0 = time.time()
            src.qmp.cmd("migrate", uri=f"unix:{mig}")
            storage = None
            while True:
                r = src.qmp.cmd("query-migrate")
                st = r.get("status")
                if st == "pre-switchover" and storage is None:
                    storage = be.pre_switchover(k)
                    src.qmp.cmd("migrate-continue", state="pre-switchover")
                elif st == "completed":
                    t_done = time.time()
                    probe = be.probe(k)
                    if probe:
                        probe.start()
                    break
                elif st in ("failed", "cancelled"):
                    raise Failed(f"migration {k} {st}: {r.get('error-desc')}\n{tail(src.logf)}{tail(dst.logf)}")
                if time.time() - t0 > TIMEOUT:
                    raise Failed(f"migration {k} still {st} after {TIMEOUT:.0f} s: {r}")
                time.sleep(0.005)
            wait_for(lambda: dst.qmp.cmd("query-status")["status"] == "running", 20,
                     f"destination QEMU {k} running", dst.proc, dst.logf)
            src.quit()
            extra = be.after(k, t_done)
            t_first = probe.first_above(be.baseline()) if probe else None
            extra["first_ms"] = None if t_first is None else 1e3 * (t_first - t_done)
            m = {"k": k, "downtime": r.get("downtime"), "total": r.get("total-time"),
                 "setup": r.get("setup-time"), "ram_mib": r.get("ram", {}).get("transferred", 0) / MIB}
            m.update(storage or {})
            m.update(extra)
            res["migrations"].append(m)
            log(f"[{cls.name}] migration {k}: " + ", ".join(
                f"{a} {v:.1f}" if isinstance(v, float) else f"{a} {v}" for a, v in m.items() if a != "k"))
            src = dst
        try:
            src.proc.wait(LOOP_CAP + 60)
        except subprocess.TimeoutExpired:
            raise Failed(f"the guest did not finish\n{tail(serial)}")
        text = read(serial)
        done = re.search(r"VUB: loop-done (.*)", text)
        if not done:
            raise Failed(f"no loop-done in the guest console\n{tail(serial, 40)}")
        summary = dict(kv.split("=", 1) for kv in done.group(1).split() if "=" in kv)
        res["rounds"] = summary.get("rounds")
        bad = [line for line in text.splitlines() if line.startswith("VUB:")
               and re.search(r"MISMATCH|failed|error", line)]
        if bad or summary.get("bad") != "0" or f"VUB: test-end name=fw_cfg:{TEST} rc=0" not in text:
            raise Failed("the guest failed: " + "; ".join(bad[:5] or [done.group(0)]))
        be.stop()
        check_image(be.merged(), base, summary["last_seed"])
        if sha256(base) != base_sha:
            raise Failed("the base image changed")
        res["verified"] = True
    except (Failed, subprocess.CalledProcessError, OSError, ValueError) as e:
        res["failures"].append(str(e))
        log(f"[{cls.name}] PROBLEM: {e}")
    finally:
        for q in qemus:
            if q.proc.poll() is None:
                q.proc.kill()
                q.proc.wait()
        cleanup()
    if KEEP or res["failures"]:
        log(f"[{cls.name}] work dir kept: {d}")
    else:
        shutil.rmtree(d)
    return res


def stats(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-", "-"
    return f"{statistics.median(vals):.0f}", f"{max(vals):.0f}"


def cell(vals):
    p50, mx = stats(vals)
    return f"{p50} / {mx}"


def main():
    for tool in ("qemu-system-x86_64", "qemu-storage-daemon", "qemu-img", "uml_moo"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: run `make deps`")
    if "ours" in SYSTEMS and not os.path.exists(UBD):
        sys.exit(f"{UBD} missing: run `cargo build --release`")
    classes = {"ours": Ours, "qsd-qcow2": QsdQcow2}
    unknown = [s for s in SYSTEMS if s not in classes]
    if unknown:
        sys.exit(f"BENCH_SYSTEMS: unknown {unknown} (known: {ALL_SYSTEMS})")
    os.makedirs(WORK, exist_ok=True)
    kernel, initrd = images()
    started = datetime.datetime.now(datetime.timezone.utc)
    results = [run_system(classes[s], kernel, initrd) for s in SYSTEMS]
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        "# Live migration: downtime and total time",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} CPUs, kernel "
        f"{platform.release()}), {qemu}, TCG. Command: `make bench-migration` (bench/migration.py; "
        f"BENCH_MIGRATIONS={MIGRATIONS}, BENCH_GAP={GAP:g}, BENCH_BANDWIDTH_MIB={BANDWIDTH_MIB}).",
        "",
        f"Guest: the one of tests/boot_migration.rs: {QUEUES} vCPUs, {MEM_MIB} MiB memfd shared RAM, "
        f"`vhost-user-blk-pci` with {QUEUES} queues, fio random 4 KiB writes at depth 32 (O_DIRECT, libaio) "
        f"with crc32c verify over the first {FIO_SIZE // MIB} MiB of a {BASE_SIZE // MIB} MiB disk, in rounds, "
        "during every migration. Each migration: a new backend and a new QEMU (`-incoming unix:`), "
        f"max-bandwidth {BANDWIDTH_MIB} MiB/s, QEMU's default downtime limit (300 ms), {GAP:g} s of guest "
        "I/O on each destination before the next one. Downtime, total and setup time: query-migrate at "
        "`completed`. First request (ours only; qsd shows no request count of a vhost-user-blk export): "
        "host time from `completed` to the first guest request the destination daemon completed (its count "
        "polled from `completed` on with `vhost-user-ubd status`, every few ms). Afterwards: every guest "
        "round verified, no I/O error, the merged image holds the last round (host fio --verify_only), the "
        "base unchanged.",
        "",
    ]
    about = {
        "ours": (
            "- ours: vhost-user-ubd, UML COW (page cache, its default). Its disk switch-over runs *after* "
            "QEMU's `completed`, at the destination's first kick (the guest runs, its I/O waits), so it is not "
            "in query-migrate's downtime. Storage switch: the destination daemon's own `switch-over of a live "
            "migration in` (its log; it includes the source's `disk persisted in` at suspend, given apart)."
        ),
        "qsd-qcow2": (
            "- qsd-qcow2: qemu-storage-daemon, qcow2 overlay over the base (page cache, its default), the "
            "image moved between two qsd instances at the source's pause before switch-over (capability "
            "`pause-before-switchover`; each qsd exports a throttle filter node: `blockdev-reopen` to a null-co "
            "placeholder + `blockdev-del` of the image on the source, `blockdev-add` + `blockdev-reopen` on the "
            "destination, then `migrate-continue`). QEMU 10.0's own way, `allow-inactive` exports and "
            "`blockdev-set-active`, is refused for vhost-user-blk exports by 10.0.2: \"Export type does not "
            "support inactive exports\". This switch is *inside* the downtime; storage switch: host clock "
            "around those QMP commands."
        ),
    }
    lines += [about[r["system"]] for r in results]
    lines += [
        "",
        "| system | migrations | downtime p50 / max (ms) | total time p50 / max (ms) | setup p50 / max (ms) | "
        "storage switch p50 / max (ms) | `completed` → first request p50 / max (ms) | "
        "source persist (ours) p50 / max (ms) | guest rounds verified | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ms_ = r["migrations"]
        ours = r["system"] == "ours"
        lines.append(
            f"| {r['system']} | {len(ms_)} | {cell([m['downtime'] for m in ms_])} | "
            f"{cell([m['total'] for m in ms_])} | {cell([m['setup'] for m in ms_])} | "
            f"{cell([m.get('switch_ms') for m in ms_])} | {cell([m.get('first_ms') for m in ms_])} | "
            f"{cell([m.get('persist_ms') for m in ms_]) if ours else '-'} | {r['rounds'] or '-'} | "
            f"{'ok' if not r['failures'] else 'FAILED'} |")
    lines += ["", "Per migration (ms):", ""]
    for r in results:
        lines.append(f"- {r['system']} (first backend: `{r['cmd']}`):")
        for m in r["migrations"]:
            parts = [f"downtime {m['downtime']}", f"total {m['total']}", f"setup {m['setup']}",
                     f"RAM {m['ram_mib']:.0f} MiB"]
            if m.get("switch_ms") is not None:
                parts.append(f"storage switch {m['switch_ms']:.1f}")
            if "release_ms" in m:
                parts.append(f"(source release {m['release_ms']:.1f}, destination open {m['open_ms']:.1f})")
            if m.get("persist_ms") is not None:
                parts.append(f"source persist {m['persist_ms']:.1f}")
            if "live_ms" in m:
                parts.append(f"`completed` → `handover: live` seen {m['live_ms']:.0f}")
            if m.get("first_ms") is not None:
                parts.append(f"`completed` → first request {m['first_ms']:.0f}")
            parts.append(f"old backend exit {m['old_rc']}")
            lines.append(f"  - {m['k']}: " + ", ".join(parts))
        for f in r["failures"]:
            lines.append(f"  - problem: {f.splitlines()[0]}")
    lines.append("")
    os.makedirs(os.path.dirname(OUT) or ".", exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if any(r["failures"] for r in results):
        for r in results:
            for f in r["failures"]:
                log(f"[{r['system']}] {f}")
        sys.exit(1)


if __name__ == "__main__":
    main()
