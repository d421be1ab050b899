// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test hooks, read once from the environment. They exist so that the
//! integration tests can hold I/O in flight across a disconnect; nothing
//! sets them in production, and each one only slows the daemon down.
//!
//! - `VHOST_USER_UBD_TEST_HOLD_WRITES=N:MS`: the first `N` writes of the
//!   process wait `MS` ms before they reach the kernel (their memory owned
//!   by the op meanwhile).
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

/// How long the write about to be pushed is held back (test hook), if at
/// all.
pub fn hold_write() -> Option<Duration> {
    static HOLD: OnceLock<Option<(AtomicU64, Duration)>> = OnceLock::new();
    let (left, ms) = HOLD
        .get_or_init(|| {
            let v = std::env::var("VHOST_USER_UBD_TEST_HOLD_WRITES").ok()?;
            let (n, ms) = v.split_once(':')?;
            let (n, ms) = (n.parse::<u64>().ok()?, ms.parse::<u64>().ok()?);
            log::warn!(
                "test hook: the first {n} writes are held {ms} ms before they reach the kernel"
            );
            Some((AtomicU64::new(n), Duration::from_millis(ms)))
        })
        .as_ref()?;
    left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .ok()
        .map(|_| *ms)
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
