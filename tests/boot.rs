// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Booted-guest tests: a QEMU guest (TCG unless the host has real VMX/SVM,
//! see `vm-images/run-vm.sh`) whose only disk, `/dev/vda`, is a UML COW file
//! served by the `vhost-user-ubd` binary over vhost-user-blk.
//!
//! Each test drives the shell kit in `vm-images/`: `images.sh` (kernel and
//! initramfs, cached), `make-base.sh` (the base image), `run-vm.sh` (one boot,
//! judged by the guest's `VUB:` lines), through the kit in
//! `tests/common/boot.rs` ([`kit::Scenario`]; shared with
//! `tests/boot_handover.rs`, `tests/boot_migration.rs` and
//! `tests/libvirt.rs`). The scenarios:
//!
//! * `rw_then_verify_across_sigterm_restart`: boot `rw`, stop the daemon with
//!   SIGTERM (exit 0), restart it on the same COW, boot `verify`; then
//!   `uml_moo` the COW and compare the merged image with the base plus the
//!   guest's writes, byte for byte and against the md5s the guest printed.
//! * `ext4_survives_daemon_restart`: `ext4`, restart, `ext4-verify`, and
//!   `e2fsck -fn` on the merged image when e2fsprogs is installed.
//! * `multiqueue_guest_sees_two_hw_queues`: `--queues 2` / `num-queues=2`.
//! * `reconnect_after_sigkill`: `reconnect=1`; the daemon is killed with
//!   SIGKILL mid-loop and restarted on the same socket and COW; every
//!   iteration must pass, and every iteration's data must be in the COW.
//! * `fio_verify_survives_kill_9`: fio random 4 KiB writes at depth 32 with
//!   crc32c verify, the daemon killed with SIGKILL and restarted 3 times
//!   during the write phase (QEMU `reconnect-ms=100`): fio verifies every
//!   block, the guest logs no I/O error, the restarted daemons recovered
//!   completed-but-unflushed writes from the crash journal, and after a
//!   clean stop `uml_moo` of the COW holds what the guest verified (checked
//!   by the same static fio on the host, and block by block in Rust).
//!   `negative_control_fio_verify_fails_without_the_crash_journal`: the same
//!   with `--crash-journal off` must fail fio's verify.
//!
//! Every scenario also checks that the base image's sha256 and mtime are
//! unchanged; `rw` and `reconnect` also that `vhost-user-ubd check` accepts
//! the COW afterwards and `info --json` counts exactly the sectors the guest
//! wrote. Missing QEMU, guest images or UML tools make the tests fail
//! (not skip), naming `make deps` / `make images`.
//!
//! Work files go to a new directory under `vm-images/cache/`; it is removed
//! on success and kept (and printed) on failure or with `KEEP=1`. The daemon
//! logs with `RUST_LOG` (default `debug`). Progress and timings are written
//! straight to stderr, so they show without `--nocapture`.

mod common;
#[path = "common/boot.rs"]
mod kit;

use std::{
    fs::File,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{daemon::Daemon, BINARY};
use kit::{
    pattern, secs, sigkill, sigterm, tail, wait_timeout, which, Boot, RwMd5, Scenario, Vm,
    BASE_SIZE, MIB,
};

/// Iterations of the guest's reconnect loop, and the one after which the
/// daemon is killed.
const RECONNECT_ITERS: u64 = 20;
const RECONNECT_KILL_AFTER: u64 = 5;

#[test]
fn rw_then_verify_across_sigterm_restart() {
    let mut sc = Scenario::new("rw");
    let daemon = sc.start_daemon(1);
    let rw = RwMd5::of(&sc.boot(&daemon, "rw", 1), BASE_SIZE);
    let d = sigterm(daemon);
    sc.note(&format!("daemon stopped with SIGTERM in {}", secs(d)));
    sc.step("SIGTERM", d);

    let daemon = sc.start_daemon(1);
    let verify = sc.boot(&daemon, "verify", 1);
    assert!(verify.has("VUB: verify-ok"), "{}", verify.out);
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();
    sc.check_cow(5 * MIB / 512);

    // The merged image holds the host pattern and exactly the guest's writes,
    // at the offsets (the layout rw.sh documents) and with the md5s the
    // guest printed.
    assert_eq!(
        (
            rw.num("guest_offset"),
            rw.num("guest_len"),
            rw.num("tail_len")
        ),
        (MIB, 4 * MIB, MIB),
        "rw layout"
    );
    assert_eq!(rw.num("tail_offset"), BASE_SIZE - MIB, "tail offset");
    sc.check_rw_image(&rw);
    sc.note("merged image == base + guest writes, byte for byte");
    sc.finish();
}

#[test]
fn ext4_survives_daemon_restart() {
    let mut sc = Scenario::new("ext4");
    let daemon = sc.start_daemon(1);
    let b = sc.boot(&daemon, "ext4", 1);
    assert!(b.has("VUB: ext4-ok"), "{}", b.out);
    let files = b
        .vub_lines()
        .filter(|l| l.starts_with("VUB: ext4-file "))
        .count();
    assert!(
        files >= 6,
        "expected 6 ext4-file lines, got {files}:\n{}",
        b.out
    );
    sc.step("SIGTERM", sigterm(daemon));

    let daemon = sc.start_daemon(1);
    let b = sc.boot(&daemon, "ext4-verify", 1);
    assert!(b.has("VUB: ext4-verify-ok"), "{}", b.out);
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();

    if let Some(e2fsck) = which("e2fsck") {
        let merged = sc.merge();
        let out = Command::new(e2fsck)
            .arg("-fn")
            .arg(&merged)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "e2fsck -fn on the merged image: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        sc.note("e2fsck -fn on the uml_moo-merged image: clean");
    } else {
        sc.note("e2fsck not installed: host-side fsck skipped");
    }
    sc.finish();
}

#[test]
fn multiqueue_guest_sees_two_hw_queues() {
    let mut sc = Scenario::new("mq");
    let daemon = sc.start_daemon(2);
    let b = sc.boot(&daemon, "mq", 2);
    assert!(
        b.has("VUB: nr_hw_queues=2 "),
        "guest does not see 2 hardware queues:\n{}",
        b.out
    );
    assert!(
        b.vub_lines()
            .any(|l| l.starts_with("VUB: vda-ready ") && l.contains(" nr_hw_queues=2 ")),
        "{}",
        b.out
    );
    assert!(b.has("VUB: mq-ok"), "{}", b.out);
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();
    sc.finish();
}

/// The README's plain command lines: `serve` without `--queues`, QEMU
/// without `num-queues` (it then uses the vCPU count, 4 here). The daemon
/// offered one queue by default before, and QEMU gave up ("The maximum
/// number of queues supported by the backend is 1").
#[test]
fn plain_command_lines_work_with_qemus_default_num_queues() {
    let mut sc = Scenario::new("defaults");
    sc.default_queues = true;
    let daemon = sc.start_daemon(1);
    let b = sc.boot_with(&daemon, "mq", 1, &["--queues", "0", "--smp", "4"]);
    assert!(
        b.has("VUB: nr_hw_queues=4 "),
        "the guest does not see QEMU's default 4 queues:\n{}",
        b.out
    );
    assert!(b.has("VUB: mq-ok"), "{}", b.out);
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();
    sc.finish();
}

#[test]
fn reconnect_after_sigkill() {
    let mut sc = Scenario::new("reconnect");
    let daemon = sc.start_daemon(1);
    let serial = sc.serial_log("reconnect");
    let out_path = sc.path.join("reconnect.out");
    let out_file = File::create(&out_path).unwrap();
    let t = Instant::now();
    let child = sc
        .vm_cmd(
            "reconnect",
            1,
            &["--reconnect", "--timeout", "150"],
            &format!("vub.iters={RECONNECT_ITERS}"),
        )
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("run vm-images/run-vm.sh");
    let mut vm = Vm(child);

    let mark = format!("VUB: iter {RECONNECT_KILL_AFTER} ok");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = std::fs::read_to_string(&serial).unwrap_or_default();
        if s.lines().any(|l| l.starts_with(&mark)) {
            break;
        }
        if let Some(st) = vm.0.try_wait().unwrap() {
            panic!(
                "guest ended ({st}) before `{mark}`:\n{}{}{}",
                tail(&out_path, 60),
                tail(&serial, 60),
                tail(daemon.log_path(), 40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "guest never reached `{mark}`\n{}",
            tail(&serial, 60)
        );
        thread::sleep(Duration::from_millis(50));
    }
    sc.note(&format!(
        "guest at `{mark}` after {}: SIGKILL daemon pid {}",
        secs(t.elapsed()),
        daemon.pid()
    ));
    sigkill(daemon);
    let down = Instant::now();
    // restart 1.5 s later on the same socket and COW
    let _ = std::fs::remove_file(&sc.sock);
    thread::sleep(Duration::from_millis(1500));
    let daemon = sc.start_daemon(1);
    sc.note(&format!(
        "daemon restarted {} after the SIGKILL",
        secs(down.elapsed())
    ));

    let st = wait_timeout(&mut vm.0, Duration::from_secs(160))
        .expect("run-vm.sh outlived its own timeout");
    drop(vm);
    let boot = Boot {
        status: st,
        out: std::fs::read_to_string(&out_path).unwrap_or_default(),
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
        wall: t.elapsed(),
    };
    sc.check_boot(&boot, "reconnect", Some(&daemon));
    let max_dt = boot.check_reconnect(RECONNECT_ITERS);
    boot.assert_no_errors();
    sc.note(&format!(
        "{RECONNECT_ITERS}/{RECONNECT_ITERS} iterations ok, longest iteration {max_dt:.2}s"
    ));
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();
    sc.check_cow(RECONNECT_ITERS * MIB / 512);

    // Every iteration's write was fsynced, so it is in the COW even though
    // the first daemon died with SIGKILL: iteration i wrote 1 MiB of
    // `yes ITERi-SEED` at (8 + i mod span) MiB.
    let merged = sc.merged();
    let span = BASE_SIZE / MIB - 9;
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..RECONNECT_ITERS {
        let off = (8 + i % span) * MIB;
        writes.retain(|(o, _)| *o != off);
        writes.push((off, pattern(&format!("ITER{i}-{}", sc.seed), MIB)));
    }
    sc.check_merged(&merged, &writes);
    sc.note("merged image == base + every iteration's write");
    sc.finish();
}

/// fio's write phase on a 192 MiB range: 49,152 random 4 KiB writes.
const FIO_SIZE: u64 = 192 * MIB;
/// Kills of the daemon during the write phase, and the time between them.
const FIO_KILLS: u32 = 3;
const FIO_KILL_EVERY: Duration = Duration::from_millis(1500);
/// Kills of the inflight run, and how far apart.
const INFLIGHT_KILLS: u32 = 20;
const INFLIGHT_KILL_EVERY: Duration = Duration::from_millis(1000);

/// What one fio-under-kill-9 run saw.
struct FioRun {
    sc: Scenario,
    boot: Boot,
    /// The daemon serving when the guest ended.
    daemon: Daemon,
    /// Sectors the restarted daemons recovered from the crash journal.
    recovered: u64,
}

/// Boots `fio-verify` on a COW and kills the daemon `FIO_KILLS` times while
/// fio writes, restarting it at once on the same socket and COW.
fn fio_under_kill9(name: &'static str, serve_args: &[&str]) -> FioRun {
    fio_under_kills(name, serve_args, &[], FIO_KILLS, FIO_KILL_EVERY, 400)
}

/// Like [`fio_under_kill9`], with test hooks in the daemons' environment,
/// `kills` kills `every` apart, and a guest timeout of `vm_timeout` s.
fn fio_under_kills(
    name: &'static str,
    serve_args: &[&str],
    env: &[(&str, &str)],
    kills: u32,
    every: Duration,
    vm_timeout: u32,
) -> FioRun {
    let mut sc = Scenario::sized(name, FIO_SIZE + MIB);
    sc.serve_args = serve_args.iter().map(|a| (*a).to_owned()).collect();
    sc.serve_env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut daemon = sc.start_daemon(2);
    let serial = sc.serial_log("fio-verify");
    let out_path = sc.path.join("fio.out");
    let out_file = File::create(&out_path).unwrap();
    let t = Instant::now();
    let child = sc
        .vm_cmd(
            "fio-verify",
            2,
            &[
                "--reconnect-ms",
                "100",
                "--timeout",
                &vm_timeout.to_string(),
            ],
            &format!("vub.fio_size={}M vub.fio_depth=32", FIO_SIZE / MIB),
        )
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("run vm-images/run-vm.sh");
    let mut vm = Vm(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = std::fs::read_to_string(&serial).unwrap_or_default();
        if s.lines().any(|l| l.starts_with("VUB: fio-start")) {
            break;
        }
        if let Some(st) = vm.0.try_wait().unwrap() {
            panic!(
                "guest ended ({st}) before fio started:\n{}{}",
                tail(&out_path, 40),
                tail(&serial, 40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "fio never started\n{}",
            tail(&serial, 40)
        );
        thread::sleep(Duration::from_millis(20));
    }
    sc.note(&format!("fio started after {}", secs(t.elapsed())));
    for k in 1..=kills {
        thread::sleep(every);
        let s = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(
            !s.contains("VUB: fio-write-done") && !s.contains("VUB: test-end"),
            "fio's write phase ended before kill {k}: raise FIO_SIZE\n{}",
            tail(&serial, 20)
        );
        sc.note(&format!(
            "kill -9 #{k} of daemon pid {} during fio's writes",
            daemon.pid()
        ));
        sigkill(daemon);
        let _ = std::fs::remove_file(&sc.sock);
        daemon = sc.start_daemon(2);
    }
    let st = wait_timeout(&mut vm.0, Duration::from_secs(u64::from(vm_timeout) + 20))
        .expect("run-vm.sh outlived its own timeout");
    drop(vm);
    let boot = Boot {
        status: st,
        out: std::fs::read_to_string(&out_path).unwrap_or_default(),
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
        wall: t.elapsed(),
    };
    let log = daemon.log();
    let recovered = log
        .lines()
        .filter(|l| l.contains("written and completed by the earlier daemon"))
        .filter_map(|l| {
            l.split(".journal: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    sc.note(&format!(
        "guest ended after {}; the restarted daemons recovered {recovered} sectors from the crash journal",
        secs(boot.wall)
    ));
    FioRun {
        sc,
        boot,
        daemon,
        recovered,
    }
}

#[test]
fn fio_verify_survives_kill_9() {
    let run = fio_under_kill9("fio-kill9", &[]);
    assert!(
        run.recovered > 0,
        "no restarted daemon recovered anything from the crash journal: the kills missed the \
         window this test is about"
    );
    check_fio_run(run);
}

/// Inflight tracking in a booted guest (issue 12): fio at queue depth 32
/// while every third write is held 100 ms in the daemon (test hook), so
/// that requests complete out of order, and the daemon is killed and
/// restarted 20 times. QEMU hands every new daemon the same inflight
/// region; the requests the dead one had not completed are resubmitted.
/// No guest I/O error, fio verifies, and the uml_moo-merged COW holds what
/// fio verified.
#[test]
fn fio_verify_survives_20_kills_with_requests_completing_out_of_order() {
    let run = fio_under_kills(
        "fio-inflight",
        &[],
        &[("VHOST_USER_UBD_TEST_HOLD_WRITES", "%3:100")],
        INFLIGHT_KILLS,
        INFLIGHT_KILL_EVERY,
        400,
    );
    let log = run.daemon.log();
    let resubmitted: usize = log
        .lines()
        .filter_map(|l| l.split("inflight tracking: resubmitting ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    run.sc.note(&format!(
        "{INFLIGHT_KILLS} kills; the restarted daemons resubmitted {resubmitted} requests from the \
         inflight region"
    ));
    assert!(
        resubmitted > 0,
        "no restarted daemon resubmitted anything: the kills missed the window this test is about"
    );
    check_fio_run(run);
}

/// Negative control of the test above: the same run with requests
/// completing out of order but no inflight tracking (`--inflight off
/// --test-out-of-order`) must fail: QEMU's rewind to the used index then
/// replays requests that had already completed, on descriptors the guest
/// may have reused for newer ones.
#[test]
fn negative_control_out_of_order_without_inflight_fails_under_kills() {
    let run = fio_under_kills(
        "fio-ooo-noinflight",
        &["--inflight", "off", "--test-out-of-order"],
        &[("VHOST_USER_UBD_TEST_HOLD_WRITES", "%3:100")],
        INFLIGHT_KILLS,
        INFLIGHT_KILL_EVERY,
        120,
    );
    let failed = !run.boot.status.success()
        || run
            .boot
            .vub_lines()
            .any(|l| l.contains("MISMATCH") || l.contains("dmesg-error") || l.contains("failed"));
    assert!(
        failed,
        "out-of-order completion without inflight tracking survived {INFLIGHT_KILLS} kills: the \
         test above cannot fail\n{}",
        run.boot.out
    );
    let why = run
        .boot
        .vub_lines()
        .find(|l| l.contains("MISMATCH") || l.contains("dmesg-error") || l.contains("failed"))
        .map_or_else(
            || format!("the guest did not finish ({})", run.boot.status),
            str::to_owned,
        );
    run.sc
        .note(&format!("without inflight tracking, as expected: {why}"));
    // What the guest's kernel said (a broken virtqueue shows up here).
    let said: Vec<&str> = run
        .boot
        .serial
        .lines()
        .filter(|l| !l.starts_with("VUB:"))
        .rev()
        .take(3)
        .collect();
    run.sc
        .note(&format!("last kernel lines on the console: {said:?}"));
    let _ = sigterm(run.daemon);
}

/// The checks after a fio run under kills that must pass: the boot, fio's
/// own verify, no guest error, and the uml_moo-merged COW verified again
/// on the host, block by block.
fn check_fio_run(run: FioRun) {
    let FioRun {
        mut sc,
        boot,
        daemon,
        ..
    } = run;
    sc.check_boot(&boot, "fio-verify", Some(&daemon));
    assert!(boot.has("VUB: fio-write-done"), "{}", boot.out);
    assert!(boot.has("VUB: fio-verify-ok"), "{}", boot.out);
    let bad: Vec<&str> = boot
        .vub_lines()
        .filter(|l| l.contains("dmesg-error") || l.contains("MISMATCH") || l.contains("error"))
        .collect();
    assert!(bad.is_empty(), "errors in the guest: {bad:#?}");
    if let Some(stats) = boot.vub_lines().find(|l| l.starts_with("VUB: fio-stats")) {
        sc.note(stats);
    }
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();

    // The COW after a clean stop: uml_moo, then the same fio verifies the
    // merged image on the host, and every block holds the pattern.
    let merged_path = sc.merge();
    let seed = sc.seed.clone();
    sc.check_fio_image(&merged_path, FIO_SIZE, &seed);
    sc.note("uml_moo of the COW == what the guest's fio verified (host fio and every block)");
    sc.finish();
}

#[test]
fn negative_control_fio_verify_fails_without_the_crash_journal() {
    let FioRun {
        sc, boot, daemon, ..
    } = fio_under_kill9("fio-nojournal", &["--crash-journal", "off"]);
    assert!(
        !boot.status.success() && boot.has("VUB: fio-verify MISMATCH"),
        "with --crash-journal off fio verified after {FIO_KILLS} kills: the test above cannot \
         fail\n{}",
        boot.out
    );
    let line = boot
        .vub_lines()
        .find(|l| l.starts_with("VUB: fio-verify MISMATCH"))
        .unwrap_or_default()
        .to_owned();
    sc.note(&format!("without the journal, as expected: {line}"));
    let _ = sigterm(daemon);
    drop(sc);
}

/// Live resize (issue 12, item 5): the host grows a raw disk through the
/// daemon's control socket while the guest runs; the daemon sends
/// CONFIG_CHANGE_MSG, QEMU re-reads the config space and the guest sees the
/// new capacity in /sys/block/vda/size at once, then writes and reads the
/// new tail. The host finds the guest's bytes at the new end of the file.
#[test]
fn a_raw_disk_grows_while_the_guest_runs() {
    let mut sc = Scenario::new("resize");
    sc.raw = true;
    let control = sc.path.join("control.sock");
    sc.serve_args = vec!["--control".into(), control.display().to_string()];
    let daemon = sc.start_daemon(1);
    let serial = sc.serial_log("resize");
    let out_path = sc.path.join("resize.out");
    let out = File::create(&out_path).unwrap();
    let child = sc
        .vm_cmd("resize", 1, &["--timeout", "120"], "")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("run vm-images/run-vm.sh");
    let mut vm = Vm(child);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("VUB: resize-wait")
    {
        assert!(
            vm.0.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "the guest never waited for the resize\n{}{}",
            tail(&out_path, 30),
            tail(&serial, 30)
        );
        thread::sleep(Duration::from_millis(20));
    }
    let new_size = BASE_SIZE + 8 * MIB;
    let t = Instant::now();
    let r = Command::new(BINARY)
        .args(["resize", "--control"])
        .arg(&control)
        .arg(new_size.to_string())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "resize: {said}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(said.contains("the frontend was told"), "{said}");
    let st = wait_timeout(&mut vm.0, Duration::from_secs(150)).expect("run-vm.sh hung");
    drop(vm);
    let boot = Boot {
        status: st,
        out: std::fs::read_to_string(&out_path).unwrap_or_default(),
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
        wall: t.elapsed(),
    };
    sc.check_boot(&boot, "resize", Some(&daemon));
    let f = boot.fields("VUB: resized ");
    assert_eq!(
        f.get("to").map(String::as_str),
        Some((new_size / 512).to_string().as_str()),
        "the guest's new size: {f:?}"
    );
    sc.note(&format!(
        "the guest saw {} sectors {} after the resize command",
        new_size / 512,
        f.get("after").map_or("?", String::as_str)
    ));
    assert!(boot.has("VUB: resize-ok"), "{}", boot.out);
    let bytes = std::fs::read(&sc.base).unwrap();
    assert_eq!(bytes.len() as u64, new_size, "the file's new length");
    let want = pattern(&format!("GUESTRESIZE-{}", sc.seed), 4096);
    assert!(
        bytes[bytes.len() - 4096..] == want[..],
        "the guest's write is not at the new end of the file"
    );
    let _ = sigterm(daemon);
    drop(sc);
}
