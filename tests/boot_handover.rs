// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live handover in a booted guest (issue 13): a QEMU guest (TCG, see
//! `tests/boot.rs` and `vm-images/`) whose disk is a UML COW served over
//! vhost-user-blk runs a write/verify loop while the host hands the daemon
//! over to a new instance again and again.
//!
//! * `a_cow_is_handed_over_20_times_under_a_guest_write_verify_loop`: the
//!   guest (QEMU `-chardev socket,...,reconnect-ms=10`, 2 queues) runs
//!   rounds of fio: random 4 KiB writes at depth 32 with O_DIRECT over the
//!   first 32 MiB, then crc32c verify, then sampled blocks checked against
//!   the round's own pattern (`vm-images/guest/tests/fio-loop.sh`, passed
//!   as the fw_cfg script).
//!   Meanwhile the host starts `serve --takeover CTL` (no `--control`: the
//!   new instance takes the control socket over too) `HANDOVER_ROUNDS`
//!   times (default 20), one every `HANDOVER_PERIOD_MS` (default 600) ms;
//!   each new instance must log `handover: live`, the old one must exit
//!   with status 0, and QEMU must reconnect to the new one before the next
//!   handover. Afterwards: every round verified in the guest, no guest I/O
//!   error, a round completed after the last handover, the last instance
//!   stops with SIGTERM (exit 0), `vhost-user-ubd check` accepts the COW,
//!   `uml_moo` of the COW holds the last round's data (the same fio
//!   `--verify_only` on the host, and every block's pattern), the rest of
//!   the merged image is the base's, and the base is unchanged (sha256,
//!   mtime).
//!
//! `make handover-long` runs it with `HANDOVER_ROUNDS=100`. Each instance
//! logs to `vub-K.log` in the work dir (the first one to `vub.log`), kept on
//! failure or with `KEEP=1`.

mod common;
#[path = "common/boot.rs"]
mod kit;

use std::{
    fs::File,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use common::{
    daemon::{Daemon, DaemonBuilder},
    handover::{self, LIVE},
};
use kit::{
    env_u64, fio_loop_script, ms, rounds_ok, secs, tail, wait_timeout, Boot, Scenario, Vm, MIB,
};

/// Handovers by default (`HANDOVER_ROUNDS` overrides).
const DEFAULT_ROUNDS: u64 = 20;
/// Time from one handover's start to the next one's (`HANDOVER_PERIOD_MS`).
const DEFAULT_PERIOD_MS: u64 = 600;
/// The region each guest round writes and verifies.
const FIO_SIZE: u64 = 32 * MIB;
/// Queues of the device (and guest vCPUs).
const QUEUES: u32 = 2;
/// How long a new instance may take to say `handover: live`, the old one
/// to exit after that, and QEMU to connect to the new one.
const LIVE_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Times of one handover, from the new instance's start.
struct Handover {
    live: Duration,
    old_exit: Duration,
    connected: Duration,
}

/// Starts `serve --takeover CTL` as instance `k` and waits until it is
/// live, `old` has exited with status 0 and QEMU has connected to the new
/// instance. Panics with both daemons' logs and the guest console's tail.
fn hand_over(sc: &Scenario, old: Daemon, ctl: &Path, k: u64, serial: &Path) -> (Daemon, Handover) {
    let t = Instant::now();
    let new = DaemonBuilder::new(&sc.path)
        .name(&format!("vub-{k}"))
        .takeover(ctl, &sc.sock)
        .default_rust_log("debug")
        .no_deadline()
        .die_with_parent()
        .spawn();
    let context = |what: &str| {
        format!(
            "handover {k}: {what}\n{}{}{}",
            tail(old.log_path(), 40),
            tail(new.log_path(), 60),
            tail(serial, 30)
        )
    };
    let live = loop {
        if new.log().contains(LIVE) {
            break t.elapsed();
        }
        if let Some(st) = new.try_status() {
            panic!(
                "{}",
                context(&format!(
                    "the new instance (pid {}) exited ({st}) before it was live",
                    new.pid()
                ))
            );
        }
        assert!(
            t.elapsed() < LIVE_TIMEOUT,
            "{}",
            context(&format!(
                "the new instance (pid {}) not live after {LIVE_TIMEOUT:?}",
                new.pid()
            ))
        );
        thread::sleep(Duration::from_millis(5));
    };
    let Some(st) = old.wait_timeout(EXIT_TIMEOUT) else {
        panic!(
            "{}",
            context(&format!(
                "the old instance (pid {}) still runs {EXIT_TIMEOUT:?} after the new one went live",
                old.pid()
            ))
        );
    };
    let old_exit = t.elapsed();
    assert!(
        st.code() == Some(0),
        "{}",
        context(&format!(
            "the old instance (pid {}) exited with {st}, not 0",
            old.pid()
        ))
    );
    let connected = loop {
        if new.log().contains("frontend connected") {
            break t.elapsed();
        }
        assert!(
            new.is_running(),
            "{}",
            context("the new instance died after it was live")
        );
        assert!(
            t.elapsed() < live + CONNECT_TIMEOUT,
            "{}",
            context(&format!(
                "QEMU did not connect to the new instance within {CONNECT_TIMEOUT:?} of `handover: live`"
            ))
        );
        thread::sleep(Duration::from_millis(5));
    };
    (
        new,
        Handover {
            live,
            old_exit,
            connected,
        },
    )
}

/// p50 and max of some durations.
fn p50_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

#[test]
fn a_cow_is_handed_over_20_times_under_a_guest_write_verify_loop() {
    let rounds = env_u64("HANDOVER_ROUNDS", DEFAULT_ROUNDS);
    assert!(rounds >= 1, "HANDOVER_ROUNDS must be at least 1");
    let period = Duration::from_millis(env_u64("HANDOVER_PERIOD_MS", DEFAULT_PERIOD_MS));
    let mut sc = Scenario::new("handover");
    let ctl = sc.path.join("control.sock");
    sc.serve_args = vec!["--control".into(), ctl.display().to_string()];
    let mut daemon = sc.start_daemon(QUEUES);

    // The guest loops for as long as the handovers take, and a bit more,
    // so that rounds run on the last instance too.
    let script = fio_loop_script();
    let loop_secs = (period.as_secs_f64() * (rounds + 1) as f64).ceil() as u64 + 4;
    let vm_timeout = 90 + 2 * loop_secs;
    let test = "handover-loop";
    let serial = sc.serial_log(test);
    let out_path = sc.path.join(format!("{test}.out"));
    let out_file = File::create(&out_path).unwrap();
    let t = Instant::now();
    let child = sc
        .vm_cmd(
            test,
            QUEUES,
            &[
                "--reconnect-ms",
                "10",
                "--timeout",
                &vm_timeout.to_string(),
                "--script",
                &script.display().to_string(),
            ],
            &format!(
                "vub.loop_secs={loop_secs} vub.fio_size={}M vub.fio_depth=32",
                FIO_SIZE / MIB
            ),
        )
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("run vm-images/run-vm.sh");
    let mut vm = Vm(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("VUB: loop-start")
    {
        if let Some(st) = vm.0.try_wait().unwrap() {
            panic!(
                "guest ended ({st}) before its loop started:\n{}{}{}",
                tail(&out_path, 40),
                tail(&serial, 40),
                tail(daemon.log_path(), 40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the guest's loop never started\n{}",
            tail(&serial, 40)
        );
        thread::sleep(Duration::from_millis(20));
    }
    let loop_start = Instant::now();
    sc.note(&format!(
        "guest loop started after {} ({loop_secs} s loop); {rounds} handovers, one every {}",
        secs(t.elapsed()),
        ms(period)
    ));

    let mut times = Vec::new();
    let mut pids = vec![daemon.pid()];
    let mut rounds_before_last = 0;
    for k in 1..=rounds {
        let due = loop_start + period * u32::try_from(k).unwrap();
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let s = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(
            !s.contains("VUB: loop-done") && vm.0.try_wait().unwrap().is_none(),
            "the guest's loop ended before handover {k} of {rounds} (the guest failed, or \
             handovers take longer than HANDOVER_PERIOD_MS={}: raise it)\n{}{}",
            period.as_millis(),
            tail(&out_path, 20),
            tail(&serial, 40)
        );
        let old_pid = daemon.pid();
        let (next, h) = hand_over(&sc, daemon, &ctl, k, &serial);
        daemon = next;
        pids.push(daemon.pid());
        sc.note(&format!(
            "handover {k}/{rounds}: pid {old_pid} -> {}: live after {}, old exited 0 after {}, \
             QEMU on the new one after {} ({} guest rounds verified so far)",
            daemon.pid(),
            ms(h.live),
            ms(h.old_exit),
            ms(h.connected),
            rounds_ok(&s)
        ));
        times.push(h);
        rounds_before_last = rounds_ok(&std::fs::read_to_string(&serial).unwrap_or_default());
    }
    let handovers_took = loop_start.elapsed();
    sc.step(&format!("{rounds} handovers"), handovers_took);

    let st = wait_timeout(&mut vm.0, Duration::from_secs(vm_timeout + 20))
        .expect("run-vm.sh outlived its own timeout");
    drop(vm);
    let boot = Boot {
        status: st,
        out: std::fs::read_to_string(&out_path).unwrap_or_default(),
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
        wall: t.elapsed(),
    };
    sc.step("guest", boot.wall);
    assert!(
        boot.status.success(),
        "the guest failed ({}):\n{}\n{}{}",
        boot.status,
        boot.out,
        tail(&serial, 60),
        tail(daemon.log_path(), 40)
    );
    let end = format!("VUB: test-end name=fw_cfg:{test} rc=0");
    assert!(boot.has(&end), "no `{end}` line:\n{}", boot.out);
    let done = boot.check_fio_loop(rounds_before_last, "handover");
    let verified = done.rounds;
    let (live_p50, live_max) = p50_max(times.iter().map(|h| h.live).collect());
    let (conn_p50, conn_max) = p50_max(times.iter().map(|h| h.connected).collect());
    sc.note(&format!(
        "guest passed: {verified} rounds written and verified, {} of them after the last of \
         {rounds} handovers; live after p50 {} max {}, QEMU on the new instance after p50 {} \
         max {}; {} instances, pids {} to {}",
        verified - rounds_before_last,
        ms(live_p50),
        ms(live_max),
        ms(conn_p50),
        ms(conn_max),
        pids.len(),
        pids[0],
        pids[pids.len() - 1]
    ));

    // The last instance: status names it the destination of a live
    // handover; it stops cleanly on SIGTERM.
    let h = handover::handover_of(&ctl);
    assert_eq!(h["role"], "destination", "{h}");
    assert_eq!(h["state"], "live", "{h}");

    // uml_moo of the COW: the last round's data over the first FIO_SIZE
    // bytes (host fio and every block), the base's bytes after them.
    sc.stop_and_check_fio_loop(daemon, FIO_SIZE, &done.last_seed);
    sc.finish();
}
