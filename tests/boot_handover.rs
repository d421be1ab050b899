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
//!   the round's own pattern (`GUEST_SCRIPT`, passed as an fw_cfg script).
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
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    daemon::{Daemon, DaemonBuilder},
    BINARY,
};
use kit::{secs, sigterm, tail, wait_timeout, Boot, Scenario, Vm, MIB};

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

/// The guest's write/verify loop, run as the fw_cfg script
/// (`run-vm.sh --script`).
const GUEST_SCRIPT: &str = r#"#!/bin/sh
# handover-loop (tests/boot_handover.rs, passed as an fw_cfg script): rounds
# of fio random 4 KiB writes at queue depth DEPTH with O_DIRECT (libaio) and
# crc32c verify over the first SIZE bytes of the disk, until LOOP_SECS have
# passed since the loop started; the host hands the daemon over meanwhile.
# Round r uses seed SEED+r and the pattern FIOPATTERN-<SEED+r>: a block an
# earlier round wrote fails fio's numberio check (other seed, other order)
# and the sampled pattern check after fio's verify (page cache dropped).
# usage: vub.seed=S vub.loop_secs=N [vub.fio_size=32M] [vub.fio_depth=32]
#        [vub.fio_samples=16]
# Prints
#   VUB: loop-start size= depth= seed= secs= uptime=
#   VUB: round R ok seed= secs= uptime=            (one per round)
#   VUB: round R fio-verify MISMATCH ... / fio-io error ... / fio failed ...
#   VUB: dmesg-error LINE
#   VUB: loop-done rounds=N last_seed=S bad=B uptime=
set -eu
. /lib/vub/testlib.sh
FIO=/usr/bin/fio
SIZE=${VUB_FIO_SIZE:-32M}
DEPTH=${VUB_FIO_DEPTH:-32}
SEED=${VUB_SEED:-1}
SECS=${VUB_LOOP_SECS:-20}
SAMPLES=${VUB_FIO_SAMPLES:-16}
BS=4096
HDR=44   # fio's verify header (40 bytes) + crc32c (4)
[ -x "$FIO" ] || fail "no $FIO in the initramfs (vm-images/images.sh builds it)"
case "$SIZE" in *M) ;; *) fail "vub.fio_size=$SIZE: expected NM" ;; esac
SIZE_BYTES=$(( ${SIZE%M} * MiB ))
nblk=$((SIZE_BYTES / BS))
end=$(awk -v a="$(up)" -v s="$SECS" 'BEGIN{printf "%.2f", a + s}')
echo "VUB: loop-start size=$SIZE depth=$DEPTH seed=$SEED secs=$SECS uptime=$(up)"
r=0; bad=0; last=none
while :; do
  s=$((SEED + r))
  word=FIOPATTERN-$s
  hex=0x$(printf '%s\n' "$word" | od -An -tx1 | tr -d ' \n')
  t0=$(up)
  if "$FIO" --name=v --filename="$DEV" --rw=randwrite --bs=4k --iodepth="$DEPTH" \
      --ioengine=libaio --direct=1 --size="$SIZE" --verify=crc32c --verify_pattern="$hex" \
      --verify_fatal=1 --do_verify=1 --randrepeat=1 --randseed="$s" --verify_state_save=0 \
      --eta=never > /tmp/fio.out 2>&1; then rc=0; else rc=$?; fi
  if [ $rc != 0 ]; then
    bad=1
    vline=$(grep -m1 -E 'verify(:| failed)|bad (magic|header|pattern)|got pattern' /tmp/fio.out || true)
    eline=$(grep -m1 -E 'io_u error|err= *[1-9]|fio: ' /tmp/fio.out || true)
    if [ -n "$vline" ]; then
      echo "VUB: round $r fio-verify MISMATCH $vline"
    elif [ -n "$eline" ]; then
      echo "VUB: round $r fio-io error rc=$rc $eline"
    else
      echo "VUB: round $r fio failed rc=$rc: $(grep -v '^ *$' /tmp/fio.out | tail -n 3 | tr '\n' ' ')"
    fi
    sed 's/^/fio: /' /tmp/fio.out | tail -n 40
    break
  fi
  pat "$word" $BS | tail -c +$((HDR + 1)) > /tmp/want
  drop_caches
  i=0
  while [ $i -le "$SAMPLES" ]; do
    b=$((i * nblk / SAMPLES))
    [ $i = "$SAMPLES" ] && b=$((nblk - 1))
    if ! dd if="$DEV" bs=$BS skip=$((b * BS + HDR)) count=$((BS - HDR)) \
        iflag=skip_bytes,count_bytes 2>/tmp/dd.err > /tmp/got; then
      echo "VUB: round $r read of block $b failed: $(cat /tmp/dd.err)"; bad=1; break
    fi
    if ! cmp -s /tmp/got /tmp/want; then
      echo "VUB: round $r fio-verify MISMATCH pattern at offset $((b * BS)): not $word after fio's header: $(head -c 24 /tmp/got | od -An -c | tr -s ' \n' '  ')"
      bad=1; break
    fi
    i=$((i + 1))
  done
  [ $bad = 0 ] || break
  t1=$(up)
  echo "VUB: round $r ok seed=$s secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}') uptime=$t1"
  last=$s
  r=$((r + 1))
  if awk -v a="$t1" -v b="$end" 'BEGIN{exit !(a >= b)}'; then break; fi
done
dmesg | grep -iE 'I/O error|Buffer I/O|blk_update_request|(vda|virtio_blk|virtio).*(error|fail|timeout|abort)' > /tmp/dmesg.err || true
while read -r l; do echo "VUB: dmesg-error $l"; bad=1; done < /tmp/dmesg.err
echo "VUB: loop-done rounds=$r last_seed=$last bad=$bad uptime=$(up)"
[ $bad = 0 ]
"#;

/// A whole number from the environment, or `default`.
fn env_u64(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v}: expected a whole number")),
        Err(_) => default,
    }
}

/// Rounds the guest's console has reported as verified so far.
fn rounds_ok(serial: &str) -> usize {
    serial
        .lines()
        .filter(|l| l.starts_with("VUB: round ") && l.contains(" ok seed="))
        .count()
}

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
        if new.log().contains("handover: live") {
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

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
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
    let script = sc.path.join("handover-loop.sh");
    std::fs::write(&script, GUEST_SCRIPT).unwrap();
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
    let bad: Vec<&str> = boot
        .vub_lines()
        .filter(|l| {
            l.contains("dmesg-error")
                || l.contains("MISMATCH")
                || l.contains("failed")
                || l.contains("error")
        })
        .collect();
    assert!(bad.is_empty(), "errors in the guest: {bad:#?}");
    let done = boot.fields("VUB: loop-done ");
    assert_eq!(
        done.get("bad").map(String::as_str),
        Some("0"),
        "{}",
        boot.out
    );
    let verified: usize = done
        .get("rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("loop-done without rounds: {done:?}"));
    assert_eq!(
        verified,
        rounds_ok(&boot.serial),
        "rounds reported against `round R ok` lines\n{}",
        boot.out
    );
    assert!(
        verified > rounds_before_last,
        "no guest round completed after the last handover ({verified} rounds, all before it)"
    );
    let last_seed = done
        .get("last_seed")
        .cloned()
        .unwrap_or_else(|| panic!("loop-done without last_seed: {done:?}"));
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
    let out = Command::new(BINARY)
        .args(["status", "--json", "--control"])
        .arg(&ctl)
        .stdin(Stdio::null())
        .output()
        .expect("run vhost-user-ubd status");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&said).expect("status --json");
    assert_eq!(v["handover"]["role"], "destination", "{said}");
    assert_eq!(v["handover"]["state"], "live", "{said}");
    sc.step("SIGTERM", sigterm(daemon));
    sc.check_base_unchanged();
    sc.check_cow(FIO_SIZE / 512);

    // uml_moo of the COW: the last round's data over the first FIO_SIZE
    // bytes (host fio and every block), the base's bytes after them.
    let merged_path = sc.merge();
    sc.check_fio_image(&merged_path, FIO_SIZE, &last_seed);
    let merged = std::fs::read(&merged_path).unwrap();
    let base = std::fs::read(&sc.base).unwrap();
    assert!(
        merged[FIO_SIZE as usize..] == base[FIO_SIZE as usize..],
        "the merged image differs from the base after the guest's {} MiB",
        FIO_SIZE / MIB
    );
    sc.note(&format!(
        "uml_moo of the COW == the guest's last round (seed {last_seed}) + the base"
    ));
    sc.finish();
}
