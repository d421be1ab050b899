// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers of the handover and migration tests (`tests/handover.rs`,
//! `tests/migration.rs`, `tests/boot_handover.rs`,
//! `tests/boot_migration.rs`): the test hook and log lines of a handover,
//! polling, `status --json` on a control socket, starting a migration
//! destination, and the base image check.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};

use serde_json::Value;

use super::{
    control_cli,
    daemon::{listening, Daemon, DaemonBuilder},
    BACKING_MTIME,
};

/// The pause hook of the handover steps.
pub const PAUSE: &str = "VHOST_USER_UBD_TEST_HANDOVER_PAUSE";
/// A destination's log line once it serves the socket.
pub const LIVE: &str = "handover: live";
/// A source's log line when it gives a handover up.
pub const ABORTED: &str = "handover aborted";

/// The log line of a process paused at `step` (see [`PAUSE`]).
pub fn paused_at(step: &str) -> String {
    format!("handover: test pause at {step}")
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `vhost-user-ubd status --json` on `control`, which must succeed.
pub fn status(control: &Path) -> Value {
    let (ok, out) = control_cli(&["status", "--json"], control);
    assert!(ok, "status on {}: {out}", control.display());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON ({e}): {out}"))
}

/// The `handover` object of `status --json` on `control`.
pub fn handover_of(control: &Path) -> Value {
    let v = status(control);
    let h = v["handover"].clone();
    assert!(h.is_object(), "status has no handover object: {v}");
    h
}

/// Starts a migration destination, `b` with `--takeover FROM --socket
/// SOCK --control CTL`, and waits until it listens on SOCK; panics (with
/// `context()` and the destination's log) if it exits first or does not
/// listen within `timeout`.
pub fn start_destination(
    b: DaemonBuilder,
    from: &Path,
    sock: &Path,
    ctl: &Path,
    timeout: Duration,
    context: &dyn Fn() -> String,
) -> Daemon {
    let d = b
        .takeover(from, sock)
        .arg("--socket")
        .arg(sock)
        .arg("--control")
        .arg(ctl)
        .spawn();
    let t = Instant::now();
    let failed = |what: String| -> String {
        format!(
            "the destination (pid {}) {what}\n{}--- {}:\n{}",
            d.pid(),
            context(),
            d.log_path().display(),
            d.log_tail(40)
        )
    };
    while !listening(sock) {
        if let Some(st) = d.try_status() {
            panic!(
                "{}",
                failed(format!(
                    "exited ({st}) before it listened on {}",
                    sock.display()
                ))
            );
        }
        assert!(
            t.elapsed() < timeout,
            "{}",
            failed(format!(
                "does not listen on {} after {timeout:?}",
                sock.display()
            ))
        );
        thread::sleep(Duration::from_millis(5));
    }
    d
}

/// The base image at `base` is byte for byte `before`, and its mtime is
/// still [`BACKING_MTIME`].
pub fn assert_base_unchanged(base: &Path, before: &[u8]) {
    let now = std::fs::read(base).expect("read the base");
    assert!(now == before, "the base image changed");
    let mtime = std::fs::metadata(base)
        .and_then(|m| m.modified())
        .expect("mtime")
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    assert_eq!(mtime, BACKING_MTIME, "the base image's mtime changed");
}
