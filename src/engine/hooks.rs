// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test hooks, read once from the environment. They exist so that the
//! integration tests can hold I/O in flight across a disconnect; nothing
//! sets them in production, and each one only slows the daemon down.
//!
//! - `VHOST_USER_UBD_TEST_HOLD_WRITES=N:MS`: the first `N` writes of the
//!   process wait `MS` ms before they reach the kernel (their memory owned
//!   by the op meanwhile); `%K:MS`: every `K`-th write does.
//! - `VHOST_USER_UBD_TEST_DRAIN_REPORT_MS`: how often a drain that waits for
//!   requests still in flight says so (default 60 s).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

fn millis(var: &str) -> Option<Duration> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// Which writes the hold hook holds.
#[derive(Debug)]
enum Hold {
    /// The first `n` writes (a counter of those left).
    First(AtomicU64),
    /// Every `k`-th write (a counter of writes seen).
    Every(u64, AtomicU64),
}

/// How long the write about to be pushed is held back (test hook), if at
/// all.
pub fn hold_write() -> Option<Duration> {
    static HOLD: OnceLock<Option<(Hold, Duration)>> = OnceLock::new();
    let (which, ms) = HOLD
        .get_or_init(|| {
            let v = std::env::var("VHOST_USER_UBD_TEST_HOLD_WRITES").ok()?;
            let (n, ms) = v.split_once(':')?;
            let ms = ms.parse::<u64>().ok()?;
            let which = match n.strip_prefix('%') {
                Some(k) => {
                    Hold::Every(k.parse::<u64>().ok().filter(|&k| k > 0)?, AtomicU64::new(0))
                }
                None => Hold::First(AtomicU64::new(n.parse::<u64>().ok()?)),
            };
            log::warn!("test hook: writes held {ms} ms before they reach the kernel: {which:?}");
            Some((which, Duration::from_millis(ms)))
        })
        .as_ref()?;
    let hold = match which {
        Hold::First(left) => left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok(),
        Hold::Every(k, seen) => {
            seen.fetch_add(1, Ordering::AcqRel)
                .wrapping_add(1)
                .checked_rem(*k)
                == Some(0)
        }
    };
    hold.then_some(*ms)
}

/// How often a waiting drain reports the requests it still waits for.
pub fn drain_report() -> Duration {
    static REPORT: OnceLock<Duration> = OnceLock::new();
    *REPORT.get_or_init(|| {
        millis("VHOST_USER_UBD_TEST_DRAIN_REPORT_MS")
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60))
    })
}

/// Test hook `VHOST_USER_UBD_TEST_FORBIDDEN_SYSCALL`: a serving thread
/// makes a system call outside the sandbox's list (`socket(AF_INET)`), so
/// that a test can see the sandbox stop it. Does nothing without the
/// variable; with it, once per process.
pub fn forbidden_syscall() {
    // Read once: this runs at every kick.
    static ON: OnceLock<bool> = OnceLock::new();
    static ONCE: std::sync::Once = std::sync::Once::new();
    if !*ON.get_or_init(|| std::env::var_os("VHOST_USER_UBD_TEST_FORBIDDEN_SYSCALL").is_some()) {
        return;
    }
    ONCE.call_once(|| {
        log::warn!("test hook: a forbidden system call (socket(AF_INET)) from a serving thread");
        match std::net::UdpSocket::bind("127.0.0.1:0") {
            Ok(_) => log::warn!("test hook: the forbidden system call went through"),
            Err(e) => log::warn!("test hook: the forbidden system call failed: {e}"),
        }
    });
}

/// Which mechanism of the block-job gate (`disk::cow::gate`) a negative
/// control switches off, from `VHOST_USER_UBD_TEST_GATE_OFF`:
/// `copy-up` (a partial write of a cold COW sector copies nothing),
/// `flatten` (the flatten copies over registered writes, holding nothing),
/// `export` (writes never wait for their chunk's copy-before-write).
pub fn gate_off(what: &str) -> bool {
    static OFF: OnceLock<Option<String>> = OnceLock::new();
    let off = OFF.get_or_init(|| {
        let v = std::env::var("VHOST_USER_UBD_TEST_GATE_OFF").ok()?;
        log::warn!("test hook: the gate's {v} mechanism is off (data will be wrong)");
        Some(v)
    });
    off.as_deref()
        .is_some_and(|v| v.split(',').any(|w| w == what))
}
