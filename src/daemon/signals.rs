// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGTERM and SIGINT: stop accepting, drain the requests in flight (up to
//! a timeout), drop the connection; the main loop then persists the disk.
//! SIGHUP is ignored. The signals are blocked in every thread and taken by
//! one signal thread with `sigwait`.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{DaemonError, DRAIN_TIMEOUT};
use crate::{
    engine::sys::Signals,
    vhost::{
        connection::{Disconnect, Listener},
        BlkBackend,
    },
};

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread it
/// starts later, so that only the signal thread receives them. Call first.
pub fn block_signals() -> Result<Signals, DaemonError> {
    Signals::block(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]).map_err(DaemonError::Signals)
}

/// The signal thread: waits for SIGTERM/SIGINT, then stops the daemon.
pub(super) fn wait_and_stop(
    signals: &Signals,
    stop: &AtomicBool,
    disconnect: &Disconnect,
    backend: &BlkBackend,
    listener: &Listener,
) {
    let sig = loop {
        match signals.wait() {
            Ok(s) if s == libc::SIGTERM || s == libc::SIGINT => break s,
            Ok(libc::SIGHUP) => log::info!("SIGHUP ignored"),
            Ok(_) | Err(_) => {}
        }
    };
    log::info!("signal {sig}: draining requests in flight");
    super::notify::notify("STOPPING=1");
    stop.store(true, Ordering::Release);
    // A migration destination's rings waiting for the switch-over give up.
    backend.gate_failed();
    // Wake `accept` if no frontend is connected (without touching the
    // socket itself: after a handover, another instance serves it).
    listener.wake();
    if disconnect.connected() {
        if !backend.drain(DRAIN_TIMEOUT) {
            log::error!("requests still in flight after {DRAIN_TIMEOUT:?}; disconnecting anyway");
        }
        disconnect.now();
    }
}
