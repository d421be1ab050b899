// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration of a booted guest whose disk is handed from daemon to
//! daemon (issue 14; `docs/live-upgrade.md`): a QEMU guest (TCG, see
//! `tests/boot.rs` and `vm-images/`) on a UML COW served over
//! vhost-user-blk runs a write/verify loop while the host migrates it
//! between QEMU processes, each with its own daemon.
//!
//! `run-vm.sh` has no `-incoming` and no QMP, so this file builds the QEMU
//! command line itself: the same machine and device as `run-vm.sh` (q35,
//! TCG, `memory-backend-memfd,share=on`, `vhost-user-blk-pci` with
//! `num-queues=2`, `reconnect-ms=10`, the guest script `fio-loop.sh` as
//! the fw_cfg blob `opt/vub/script`), plus `-qmp
//! unix:qmp-K.sock,server=on,wait=off`, the console appended to one file
//! by every QEMU of the test (`-chardev file,...,append=on`), a one-byte
//! fw_cfg blob `opt/vub/stop` (`1` on the last destination, `0`
//! elsewhere: the guest makes the round it starts there its last, so the
//! loop ends soon after the last migration without a fixed length) and,
//! for a destination, `-incoming unix:mig-K.sock`. QMP is spoken with a
//! small JSON client ([`Qmp`]).
//!
//! * `a_vm_migrates_5_times_between_two_daemons_under_a_guest_write_verify_loop`:
//!   the source QEMU on daemon A (`serve --socket vub.sock --control
//!   vub.ctl`), the guest running rounds of fio (random 4 KiB writes at
//!   depth 32, O_DIRECT, over the first 32 MiB, crc32c verify, sampled
//!   blocks checked against the round's pattern:
//!   `vm-images/guest/tests/fio-loop.sh`, the loop of
//!   `tests/boot_handover.rs`). Then `MIGRATION_ROUNDS` (default 5)
//!   migrations, each to a new daemon and a new QEMU: `serve --takeover
//!   <ctl of the daemon serving now> --socket vub-K.sock --control
//!   vub-K.ctl`, a destination QEMU with `-incoming` on vub-K.sock, QMP
//!   `migrate` (max-bandwidth 1 GiB/s, QEMU's default downtime limit), wait
//!   for `query-migrate` status `completed`, the destination running, QMP
//!   `quit` to the source; the old daemon must exit 0, the new one log
//!   `handover: live`, say role destination / state live in its status and
//!   complete guest requests. Each migration's downtime, total and setup
//!   time (query-migrate) and the daemon's switch-over time (`handover:
//!   live (switch-over of a live migration in ...)`) are printed. Then the
//!   guest finishes its loop on the last destination (a whole round there,
//!   ended by the stop flag): every round verified, no I/O error;
//!   the last daemon stops on SIGTERM (exit 0), `vhost-user-ubd check`
//!   accepts the COW, `uml_moo` of the COW holds the last round's data
//!   (host fio `--verify_only` and every block's pattern), the rest is the
//!   base's, and the base is unchanged (sha256, mtime).
//! * `a_cancelled_migration_leaves_the_source_serving`: the same guest on
//!   daemon A; a destination daemon B and QEMU; `migrate-set-parameters
//!   max-bandwidth` 1 MiB/s, so the migration cannot finish, `migrate`,
//!   B's status `waiting` while it runs, `migrate_cancel`; the destination
//!   QEMU quits (or is killed); B must exit 0 with `the frontend left
//!   before the switch-over`, never live; A logs `handover aborted`, its
//!   status handover is idle, it keeps completing guest requests, the
//!   source VM runs on, and the guest finishes its loop (18 s) verified,
//!   with the same checks of the COW and the base afterwards.
//!
//! `MIGRATION_ROUNDS`, `MIGRATION_LOOP_SECS` (the longest the guest's
//! loop may run, default 150 s; it fails the test if it ends before the
//! last migration) and `MIGRATION_GAP_MS` (guest I/O on each destination
//! before the next migration, default 1500) tune the first test. Daemon K
//! logs to `vub-K.log` (A to `vub.log`), QEMU K to `qemu-K.log`, the guest
//! console to `migration-loop.serial`, all in the work dir, kept on
//! failure or with `KEEP=1`.

mod common;
#[path = "common/boot.rs"]
mod kit;

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    daemon::{die_with_parent, listening, Daemon, DaemonBuilder},
    handover::{self, status, LIVE},
};
use kit::{
    env_u64, fio_loop_script, images, ms, rounds_ok, send_signal, tail, wait_timeout, Boot,
    Scenario, MIB,
};
use serde_json::{json, Value};

/// Migrations by default (`MIGRATION_ROUNDS` overrides).
const DEFAULT_ROUNDS: u64 = 5;
/// The longest the guest's loop may run in the first test
/// (`MIGRATION_LOOP_SECS`); it ends earlier, after the first round that
/// starts on the last destination.
const DEFAULT_LOOP_SECS: u64 = 150;
/// Guest I/O on a destination before the next migration
/// (`MIGRATION_GAP_MS`).
const DEFAULT_GAP_MS: u64 = 1500;
/// Length of the guest's loop in the cancel test (no stop flag there).
const CANCEL_LOOP_SECS: u64 = 18;
/// The region each guest round writes and verifies.
const FIO_SIZE: u64 = 32 * MIB;
/// Queues of the device, and guest vCPUs.
const QUEUES: u32 = 2;
/// Guest RAM (MiB), as `run-vm.sh`'s default.
const MEM_MIB: u32 = 512;
/// `migrate-set-parameters max-bandwidth` (bytes/s) of the migrations
/// (QEMU's default is 128 MiB/s).
const BANDWIDTH: u64 = 1 << 30;
/// The cancel test's bandwidth: ~100 MiB of guest RAM cannot go in time.
const SLOW_BANDWIDTH: u64 = 1 << 20;
/// The guest test's name (`vub.test=`, the console file).
const TEST: &str = "migration-loop";
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(90);
const LIVE_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to complete a guest request once it serves.
const SERVE_TIMEOUT: Duration = Duration::from_secs(15);

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `Duration`'s `Debug` text (`72.333897ms`, `4.6µs`, `1.2s`).
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-9,
        "µs" | "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(v * scale))
}

/// The daemon's own switch-over time: `handover: live (switch-over of a
/// live migration in 72.3ms)`.
fn switch_over_time(log: &str) -> Option<Duration> {
    let rest = log
        .lines()
        .find_map(|l| l.split_once("(switch-over of a live migration in "))?
        .1;
    parse_debug_duration(rest.trim_end().trim_end_matches(')'))
}

/// Guest requests the daemon behind `ctl` has completed.
fn completed(ctl: &Path) -> u64 {
    let v = status(ctl);
    v["device"]["completed"]
        .as_u64()
        .unwrap_or_else(|| panic!("status without device.completed: {v}"))
}

/// Waits until the daemon behind `ctl` completes more guest requests than
/// it had when called: it serves the guest. Returns how long that took.
fn wait_serving(ctl: &Path, what: &dyn Fn() -> String) -> Duration {
    let t = Instant::now();
    let c0 = completed(ctl);
    loop {
        if completed(ctl) > c0 {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < SERVE_TIMEOUT,
            "{}",
            what()
                + &format!(
                    "the daemon completed no guest request in {SERVE_TIMEOUT:?} (still {c0})"
                )
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A QMP connection (one command at a time; events are skipped).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket and
    /// leaves capabilities negotiation mode.
    fn connect(path: &Path, qemu: &mut Child, log: &Path) -> Self {
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(st) = qemu.try_wait().expect("try_wait") {
                        panic!(
                            "QEMU exited ({st}) before its QMP socket accepted\n{}",
                            tail(log, 30)
                        );
                    }
                    assert!(
                        t.elapsed() < LISTEN_TIMEOUT,
                        "QMP socket {}: {e} after {LISTEN_TIMEOUT:?}\n{}",
                        path.display(),
                        tail(log, 30)
                    );
                    thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.cmd("qmp_capabilities", json!({}))
            .unwrap_or_else(|e| panic!("qmp_capabilities: {e}"));
        q
    }

    fn line(&mut self) -> Value {
        let mut s = String::new();
        let n = self.reader.read_line(&mut s).expect("read from QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("QMP said {s:?}: {e}"))
    }

    /// Runs `name`; its `return`, or the error's description.
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.writer, "{msg}").expect("write to QMP");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(format!("{name}: {}", v["error"]));
        }
    }

    fn run(&mut self, name: &str, args: Value) -> Value {
        self.cmd(name, args).unwrap_or_else(|e| panic!("QMP {e}"))
    }
}

/// One QEMU process of the test: killed (SIGKILL) on drop if it runs.
struct Qemu {
    k: usize,
    child: Child,
    qmp: Qmp,
    log: PathBuf,
}

impl Qemu {
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// QMP `quit`; waits for the exit. Returns the exit status and whether
    /// `quit` reached QEMU: a QEMU that has gone already (its QMP socket
    /// closed) is waited for too, so that its status and log tell why it
    /// went, where a write error on the socket would not.
    fn quit(&mut self) -> (ExitStatus, bool) {
        let msg = json!({"execute": "quit", "arguments": {}});
        let sent = writeln!(self.qmp.writer, "{msg}").is_ok();
        match wait_timeout(&mut self.child, EXIT_TIMEOUT) {
            Some(st) => (st, sent),
            None => panic!(
                "QEMU {} still runs {EXIT_TIMEOUT:?} after `quit`\n{}",
                self.k,
                tail(&self.log, 20)
            ),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = send_signal(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// QEMU option values: ',' -> ',,'.
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Starts QEMU number `k` of the test on the vhost-user socket `sock`: the
/// source (`incoming` None) or a migration destination listening on
/// `incoming`. Every QEMU appends the guest console to the same file.
/// `stop`: the guest's fw_cfg blob `opt/vub/stop` reads 1 (the same size
/// as 0: only the content differs from the other QEMUs'), so the round
/// the guest starts on this QEMU is its last.
fn start_qemu(
    sc: &Scenario,
    k: usize,
    sock: &Path,
    incoming: Option<&Path>,
    stop: bool,
    script: &Path,
    append: &str,
) -> Qemu {
    let img = images();
    let qmp = sc.path.join(format!("qmp-{k}.sock"));
    let log = sc.path.join(format!("qemu-{k}.log"));
    let _ = std::fs::remove_file(&qmp);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-monitor", "none"])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"
        ))
        .args([
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-cpu",
            "max",
        ])
        .arg("-smp")
        .arg(QUEUES.to_string())
        .arg("-m")
        .arg(format!("{MEM_MIB}M"))
        .arg("-chardev")
        .arg(format!("socket,id=vub0,path={},reconnect-ms=10", esc(sock)))
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,chardev=vub0,num-queues={QUEUES}"
        ))
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet vub.test={TEST} vub.queues={QUEUES} vub.seed={} {append}",
            sc.seed
        ))
        .arg("-chardev")
        .arg(format!(
            "file,id=ser0,path={},append=on",
            esc(&sc.serial_log(TEST))
        ))
        .args(["-serial", "chardev:ser0", "-no-reboot"])
        .arg("-fw_cfg")
        .arg(format!("name=opt/vub/script,file={}", esc(script)))
        .arg("-fw_cfg")
        .arg(format!("name=opt/vub/stop,string={}", u8::from(stop)))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", esc(&qmp)));
    if let Some(mig) = incoming {
        let _ = std::fs::remove_file(mig);
        cmd.arg("-incoming").arg(format!("unix:{}", esc(mig)));
    }
    let out = File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd.spawn().expect("run qemu-system-x86_64");
    let qmp = Qmp::connect(&qmp, &mut child, &log);
    let mut q = Qemu { k, child, qmp, log };
    if let Some(mig) = incoming {
        let t = Instant::now();
        while !listening(mig) {
            if let Some(st) = q.exited() {
                panic!("destination QEMU {k} exited ({st})\n{}", tail(&q.log, 30));
            }
            assert!(
                t.elapsed() < LISTEN_TIMEOUT,
                "destination QEMU {k}: {} not listening\n{}",
                mig.display(),
                tail(&q.log, 30)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    q
}

/// Starts the source QEMU and waits until the guest's loop has started.
/// QEMU 10's TCG sometimes aborts on its own assertion while the guest
/// boots, before the guest printed anything (see `Scenario::boot_with`):
/// one retry then.
fn boot_source(sc: &Scenario, daemon: &Daemon, script: &Path, append: &str) -> Qemu {
    let serial = sc.serial_log(TEST);
    for attempt in 0..2 {
        let _ = std::fs::remove_file(&serial);
        let t = Instant::now();
        let mut q = start_qemu(sc, 0, daemon.socket(), None, false, script, append);
        loop {
            let s = read(&serial);
            if s.contains("VUB: loop-start") {
                sc.note(&format!(
                    "guest loop started after {}",
                    kit::secs(t.elapsed())
                ));
                return q;
            }
            if let Some(st) = q.exited() {
                let qlog = read(&q.log);
                if attempt == 0
                    && !s.contains("VUB: test-start")
                    && qlog.contains("Assertion")
                    && qlog.contains("failed")
                {
                    sc.note(&format!(
                        "QEMU aborted on its own assertion before the guest ran ({}); booting once more",
                        tail(&q.log, 1).trim()
                    ));
                    break;
                }
                panic!(
                    "the source QEMU ended ({st}) before the guest's loop started\n{}{}{}",
                    tail(&q.log, 30),
                    tail(&serial, 40),
                    tail(daemon.log_path(), 40)
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the guest's loop never started\n{}",
                tail(&serial, 40)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    unreachable!("two boots")
}

/// A daemon and its control socket.
struct Served {
    daemon: Daemon,
    ctl: PathBuf,
}

/// Starts migration destination `k`: `serve --takeover <ctl of from>
/// --socket vub-K.sock --control vub-K.ctl`, and waits until it listens.
fn start_destination(sc: &Scenario, from: &Path, k: usize) -> Served {
    let sock = sc.path.join(format!("vub-{k}.sock"));
    let ctl = sc.path.join(format!("vub-{k}.ctl"));
    let b = DaemonBuilder::new(&sc.path)
        .name(&format!("vub-{k}"))
        .default_rust_log("debug")
        .no_deadline()
        .die_with_parent();
    let daemon = handover::start_destination(b, from, &sock, &ctl, LISTEN_TIMEOUT, &String::new);
    Served { daemon, ctl }
}

/// QMP `migrate` of `src` to `mig` at `bandwidth` bytes/s.
fn start_migration(src: &mut Qemu, mig: &Path, bandwidth: u64) {
    src.qmp.run(
        "migrate-set-parameters",
        json!({"max-bandwidth": bandwidth}),
    );
    src.qmp
        .run("migrate", json!({"uri": format!("unix:{}", mig.display())}));
}

/// Polls `query-migrate` until its status is one of `want` (or an end
/// state); returns the last answer.
fn wait_migration(src: &mut Qemu, want: &[&str], limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let r = src.qmp.run("query-migrate", json!({}));
        let st = r["status"].as_str().unwrap_or("");
        if want.contains(&st) || matches!(st, "completed" | "failed" | "cancelled") {
            return r;
        }
        assert!(
            t.elapsed() < limit,
            "migration still {st} after {limit:?}: {r}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Figures of one migration.
struct Migration {
    k: usize,
    /// query-migrate's downtime, total-time and setup-time.
    downtime: u64,
    total: u64,
    setup: u64,
    ram_mib: f64,
    /// The destination daemon's switch-over (its `handover: live` line).
    switch_over: Option<Duration>,
    /// From `completed` to the new daemon's `handover: live` (host).
    live_after: Duration,
    /// From `handover: live` to its first completed guest request (host).
    served_after: Duration,
}

/// Migrates the VM from `src` (served by `cur`) to a new QEMU and daemon
/// number `k` (`last`: the guest's last round runs there); returns them
/// once the old ones are gone and the new daemon serves the guest.
fn migrate(
    sc: &Scenario,
    mut src: Qemu,
    cur: Served,
    k: usize,
    last: bool,
    script: &Path,
    append: &str,
) -> (Qemu, Served, Migration) {
    let serial = sc.serial_log(TEST);
    let new = start_destination(sc, &cur.ctl, k);
    let context = |what: &str| {
        format!(
            "migration {k}: {what}\n{}{}{}",
            tail(cur.daemon.log_path(), 40),
            tail(new.daemon.log_path(), 60),
            tail(&serial, 30)
        )
    };
    let mig = sc.path.join(format!("mig-{k}.sock"));
    let mut dst = start_qemu(sc, k, new.daemon.socket(), Some(&mig), last, script, append);
    let st = status(&new.ctl);
    assert_eq!(st["handover"]["role"], "destination", "{st}");
    assert_eq!(st["handover"]["state"], "waiting", "{st}");
    start_migration(&mut src, &mig, BANDWIDTH);
    let r = wait_migration(&mut src, &["completed"], MIGRATE_TIMEOUT);
    assert_eq!(
        r["status"],
        "completed",
        "{}",
        context(&format!(
            "query-migrate: {r}\n{}{}",
            tail(&src.log, 20),
            tail(&dst.log, 20)
        ))
    );
    let done = Instant::now();
    // the destination runs (QEMU's autostart after the incoming migration)
    let t = Instant::now();
    loop {
        let s = dst.qmp.run("query-status", json!({}));
        if s["status"] == "running" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10) && dst.exited().is_none(),
            "{}",
            context(&format!(
                "the destination QEMU is {s}, not running\n{}",
                tail(&dst.log, 20)
            ))
        );
        thread::sleep(Duration::from_millis(10));
    }
    let (src_exit, sent) = src.quit();
    if !sent {
        // The source QEMU went by itself after `completed`, once in a CI
        // run (its QMP socket closed before `quit`). The guest runs on the
        // destination and its data are checked below; what matters of the
        // source here is that it is gone. Its status and log are kept for
        // the record (libvirt kills the source at this point anyway).
        sc.note(&format!(
            "migration {k}: the source QEMU had exited before `quit` ({src_exit})\n{}",
            tail(&src.log, 20)
        ));
    } else {
        assert!(
            src_exit.success(),
            "{}",
            context(&format!(
                "the source QEMU exited with {src_exit}\n{}",
                tail(&src.log, 20)
            ))
        );
    }
    // the new daemon took the disk over; the old one exits 0
    loop {
        if new.daemon.log().contains(LIVE) {
            break;
        }
        if let Some(st) = new.daemon.try_status() {
            panic!(
                "{}",
                context(&format!("the new daemon exited ({st}) before it was live"))
            );
        }
        assert!(
            done.elapsed() < LIVE_TIMEOUT,
            "{}",
            context(&format!(
                "the new daemon not live {LIVE_TIMEOUT:?} after the migration completed"
            ))
        );
        thread::sleep(Duration::from_millis(5));
    }
    let live_after = done.elapsed();
    let Some(old_exit) = cur.daemon.wait_timeout(EXIT_TIMEOUT) else {
        panic!(
            "{}",
            context(&format!(
                "the old daemon (pid {}) still runs {EXIT_TIMEOUT:?} after the new one went live",
                cur.daemon.pid()
            ))
        );
    };
    assert_eq!(
        old_exit.code(),
        Some(0),
        "{}",
        context(&format!("the old daemon exited with {old_exit}"))
    );
    let st = status(&new.ctl);
    assert_eq!(st["handover"]["role"], "destination", "{st}");
    assert_eq!(st["handover"]["state"], "live", "{st}");
    let served_after = live_after + wait_serving(&new.ctl, &|| context(""));
    let m = Migration {
        k,
        downtime: r["downtime"].as_u64().unwrap_or_default(),
        total: r["total-time"].as_u64().unwrap_or_default(),
        setup: r["setup-time"].as_u64().unwrap_or_default(),
        ram_mib: r["ram"]["transferred"].as_f64().unwrap_or_default() / MIB as f64,
        switch_over: switch_over_time(&new.daemon.log()),
        live_after,
        served_after,
    };
    (dst, new, m)
}

/// After the guest's loop: the guest's result from the console, the
/// daemon stopped (SIGTERM, exit 0), the COW checked, the merged image
/// holding the last round's data over the base's bytes, the base
/// unchanged. `rounds_before` rounds were verified before the last
/// disturbance (a migration, a cancelled one); one more must have been
/// after it. `why`: how the loop must have ended (`stop`: the stop flag
/// of the last destination; `time`: its time limit).
fn finish(
    mut sc: Scenario,
    mut qemu: Qemu,
    served: Served,
    rounds_before: usize,
    why: &str,
    limit: Duration,
) {
    let serial = sc.serial_log(TEST);
    let t = Instant::now();
    let st = wait_timeout(&mut qemu.child, limit).unwrap_or_else(|| {
        panic!(
            "the guest still runs {limit:?} after the migrations\n{}{}",
            tail(&serial, 40),
            tail(served.daemon.log_path(), 40)
        )
    });
    sc.note(&format!(
        "the guest powered off {} after the last migration step (QEMU {st})",
        kit::secs(t.elapsed())
    ));
    let boot = Boot {
        status: st,
        out: read(&serial),
        serial: read(&serial),
        wall: sc.start.elapsed(),
    };
    let end = format!("VUB: test-end name=fw_cfg:{TEST} rc=0");
    assert!(
        boot.has(&end),
        "no `{end}` line\n{}{}",
        tail(&serial, 60),
        tail(served.daemon.log_path(), 40)
    );
    let done = boot.check_fio_loop(rounds_before, "migration step");
    assert_eq!(
        done.done.get("why").map(String::as_str),
        Some(why),
        "how the guest's loop ended (stop: the last destination's stop flag; time: its time \
         limit, MIGRATION_LOOP_SECS in the first test): {:?}",
        done.done
    );
    sc.note(&format!(
        "guest passed: {} rounds written and verified, {} of them after the last \
         migration step",
        done.rounds,
        done.rounds - rounds_before
    ));
    sc.stop_and_check_fio_loop(served.daemon, FIO_SIZE, &done.last_seed);
    sc.finish();
}

/// Scenario, daemon A (`--control vub.ctl`) and the guest script
/// (`vm-images/guest/tests/fio-loop.sh`).
fn setup(name: &'static str) -> (Scenario, Served, PathBuf) {
    let mut sc = Scenario::new(name);
    let ctl = sc.path.join("vub.ctl");
    sc.serve_args = vec!["--control".into(), ctl.display().to_string()];
    let daemon = sc.start_daemon(QUEUES);
    (sc, Served { daemon, ctl }, fio_loop_script())
}

fn guest_append(loop_secs: u64) -> String {
    format!(
        "vub.loop_secs={loop_secs} vub.fio_size={}M vub.fio_depth=32",
        FIO_SIZE / MIB
    )
}

#[test]
fn a_vm_migrates_5_times_between_two_daemons_under_a_guest_write_verify_loop() {
    let rounds = usize::try_from(env_u64("MIGRATION_ROUNDS", DEFAULT_ROUNDS)).unwrap();
    assert!(rounds >= 1, "MIGRATION_ROUNDS must be at least 1");
    let loop_secs = env_u64("MIGRATION_LOOP_SECS", DEFAULT_LOOP_SECS);
    let gap = Duration::from_millis(env_u64("MIGRATION_GAP_MS", DEFAULT_GAP_MS));
    let (mut sc, mut cur, script) = setup("migration");
    let append = guest_append(loop_secs);
    let serial = sc.serial_log(TEST);
    let mut qemu = boot_source(&sc, &cur.daemon, &script, &append);
    let loop_start = Instant::now();
    thread::sleep(gap);
    let mut figures = Vec::new();
    let mut rounds_before_last = 0;
    for k in 1..=rounds {
        let s = read(&serial);
        assert!(
            !s.contains("VUB: loop-done") && qemu.exited().is_none(),
            "the guest's loop ended before migration {k} of {rounds} (the guest failed, or the \
             migrations take longer than MIGRATION_LOOP_SECS={loop_secs}: raise it)\n{}{}",
            tail(&qemu.log, 20),
            tail(&serial, 40)
        );
        let old_pid = cur.daemon.pid();
        let (q, next, m) = migrate(&sc, qemu, cur, k, k == rounds, &script, &append);
        qemu = q;
        cur = next;
        let s = read(&serial);
        sc.note(&format!(
            "migration {k}/{rounds}: daemon pid {old_pid} -> {}: downtime {} ms, total {} ms \
             (setup {} ms, {:.0} MiB sent); the new daemon live {} after `completed` \
             (switch-over {}), serving after {}; {} guest rounds verified so far",
            cur.daemon.pid(),
            m.downtime,
            m.total,
            m.setup,
            m.ram_mib,
            ms(m.live_after),
            m.switch_over.map_or("?".into(), ms),
            ms(m.served_after),
            rounds_ok(&s)
        ));
        figures.push(m);
        rounds_before_last = rounds_ok(&read(&serial));
        if k < rounds {
            thread::sleep(gap);
        }
    }
    let took = loop_start.elapsed();
    sc.step(&format!("{rounds} migrations"), took);
    println!(
        "\n{rounds} migrations in {} (QEMU 10 TCG, {MEM_MIB} MiB guest, max-bandwidth {} MiB/s):",
        kit::secs(took),
        BANDWIDTH / MIB
    );
    println!(
        "| migration | downtime (ms) | total-time (ms) | setup-time (ms) | RAM sent (MiB) | \
         switch-over (ms) | completed -> live (ms) | completed -> first request (ms) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &figures {
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {:.0} | {:.0} |",
            m.k,
            m.downtime,
            m.total,
            m.setup,
            m.ram_mib,
            m.switch_over
                .map_or("?".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3)),
            m.live_after.as_secs_f64() * 1e3,
            m.served_after.as_secs_f64() * 1e3
        );
    }
    let limit = Duration::from_secs(loop_secs + 90).saturating_sub(loop_start.elapsed());
    finish(
        sc,
        qemu,
        cur,
        rounds_before_last,
        "stop",
        limit.max(Duration::from_secs(60)),
    );
}

#[test]
fn a_cancelled_migration_leaves_the_source_serving() {
    let (sc, a, script) = setup("migration-cancel");
    let append = guest_append(CANCEL_LOOP_SECS);
    let serial = sc.serial_log(TEST);
    let mut src = boot_source(&sc, &a.daemon, &script, &append);
    let loop_start = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let b = start_destination(&sc, &a.ctl, 1);
    let context = |what: &str| {
        format!(
            "{what}\n{}{}{}",
            tail(a.daemon.log_path(), 40),
            tail(b.daemon.log_path(), 40),
            tail(&serial, 30)
        )
    };
    let mig = sc.path.join("mig-1.sock");
    let mut dst = start_qemu(
        &sc,
        1,
        b.daemon.socket(),
        Some(&mig),
        false,
        &script,
        &append,
    );
    start_migration(&mut src, &mig, SLOW_BANDWIDTH);
    // it runs: RAM on its way, B waiting for the switch-over
    let t = Instant::now();
    loop {
        let r = wait_migration(&mut src, &["active"], Duration::from_secs(30));
        assert_eq!(r["status"], "active", "{}", context(&format!("{r}")));
        if r["ram"]["transferred"].as_u64().unwrap_or(0) > 0 && t.elapsed() > Duration::from_secs(2)
        {
            sc.note(&format!(
                "migration active: {:.1} MiB of RAM sent at {} MiB/s, {} MiB remaining",
                r["ram"]["transferred"].as_f64().unwrap_or(0.0) / MIB as f64,
                SLOW_BANDWIDTH / MIB,
                r["ram"]["remaining"].as_u64().unwrap_or(0) / MIB
            ));
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let st = status(&b.ctl);
    assert_eq!(st["handover"]["role"], "destination", "{st}");
    assert_eq!(st["handover"]["state"], "waiting", "{st}");
    let st = status(&a.ctl);
    assert_eq!(
        st["handover"]["role"], "source",
        "A while the migration runs: {st}"
    );
    sc.note(&format!("while it runs: A's handover {}", st["handover"]));

    src.qmp.run("migrate_cancel", json!({}));
    let r = wait_migration(&mut src, &["cancelled"], Duration::from_secs(20));
    assert_eq!(r["status"], "cancelled", "{}", context(&format!("{r}")));
    let cancelled_at = rounds_ok(&read(&serial));
    // the destination QEMU's incoming migration failed: it quits, or is
    // killed
    let dst_exit = match wait_timeout(&mut dst.child, Duration::from_secs(10)) {
        Some(st) => format!("exited by itself ({st})"),
        None => {
            let _ = send_signal(dst.child.id(), libc::SIGKILL);
            format!("killed ({})", dst.child.wait().unwrap())
        }
    };
    sc.note(&format!(
        "migration cancelled; the destination QEMU {dst_exit}: {}",
        read(&dst.log).lines().last().unwrap_or("")
    ));
    drop(dst);
    let Some(b_exit) = b.daemon.wait_timeout(EXIT_TIMEOUT) else {
        panic!(
            "{}",
            context(&format!(
                "the destination daemon still runs {EXIT_TIMEOUT:?} after its QEMU was gone"
            ))
        );
    };
    let blog = b.daemon.log();
    assert_eq!(
        b_exit.code(),
        Some(0),
        "{}",
        context(&format!("the destination daemon exited with {b_exit}"))
    );
    assert!(
        blog.contains("the frontend left before the switch-over"),
        "{}",
        context("no `the frontend left before the switch-over` in the destination's log")
    );
    assert!(
        !blog.contains("handover: live") && !blog.contains("a ring started"),
        "{}",
        context("the destination went live (or was asked for the disk) in a cancelled migration")
    );
    assert!(
        a.daemon
            .wait_for_log("handover aborted", Duration::from_secs(10)),
        "{}",
        context("no `handover aborted` in A's log")
    );
    a.daemon.assert_running();
    let st = status(&a.ctl);
    assert_eq!(st["handover"]["state"], "idle", "A after the cancel: {st}");
    let served = wait_serving(&a.ctl, &|| context("A after the cancel: "));
    let s = src.qmp.run("query-status", json!({}));
    assert_eq!(
        s["status"], "running",
        "the source VM after the cancel: {s}"
    );
    sc.note(&format!(
        "B exited 0 without going live; A's handover {}, A completed a guest request {} \
         after the check; the source VM {}",
        st["handover"],
        ms(served),
        s["status"]
    ));
    let limit = Duration::from_secs(CANCEL_LOOP_SECS + 90).saturating_sub(loop_start.elapsed());
    finish(
        sc,
        src,
        a,
        cancelled_at,
        "time",
        limit.max(Duration::from_secs(60)),
    );
}
