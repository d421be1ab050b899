// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The switch-over gate of a migration destination: the daemon answers
//! the frontend's set-up messages before it has a disk, and the first event
//! of a started ring (vhost-user-backend handles a ring's enable as a kick;
//! QEMU enables the destination's rings when the VM runs there, after the
//! source stopped its rings) asks for the disk and waits until the
//! handover has brought it.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

/// How long a queue waits for the switch-over before its requests fail.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No ring has started.
    Waiting,
    /// A ring started: the handover should run.
    Triggered,
    /// The disk is here.
    Open,
    /// The handover failed (or the frontend left): requests fail.
    Failed,
}

/// A one-shot gate between the queues and the handover.
#[derive(Debug)]
pub struct SwitchGate {
    open: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
}

impl Default for SwitchGate {
    fn default() -> Self {
        Self::new()
    }
}

impl SwitchGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self {
            open: AtomicBool::new(false),
            state: Mutex::new(State::Waiting),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For a queue about to pop: true once the disk is here (asking for it
    /// and waiting, up to [`SWITCH_TIMEOUT`], the first time); false if
    /// the switch-over failed.
    pub fn pass(&self) -> bool {
        if self.open.load(Ordering::Acquire) {
            return true;
        }
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        let mut s = self.lock();
        if *s == State::Waiting {
            log::info!("switch-over: a ring started; asking for the disk");
            *s = State::Triggered;
            self.cv.notify_all();
        }
        while matches!(*s, State::Waiting | State::Triggered) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::error!("switch-over: no disk after {SWITCH_TIMEOUT:?}; requests fail");
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        *s == State::Open
    }

    /// For the handover: waits until a ring asks for the disk (true) or the
    /// gate was failed first (false).
    pub fn wait_trigger(&self) -> bool {
        let mut s = self.lock();
        while *s == State::Waiting {
            s = self
                .cv
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *s == State::Triggered
    }

    /// True once a ring asked for the disk.
    pub fn triggered(&self) -> bool {
        *self.lock() != State::Waiting
    }

    /// The disk is here (`true`), or will not come (`false`).
    pub fn open(&self, ok: bool) {
        let mut s = self.lock();
        *s = if ok { State::Open } else { State::Failed };
        self.open.store(ok, Ordering::Release);
        self.cv.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::SwitchGate;
    use std::sync::Arc;

    #[test]
    fn the_first_queue_triggers_the_handover_and_every_queue_waits_for_it() {
        let g = Arc::new(SwitchGate::new());
        assert!(!g.triggered());
        let q = {
            let g = g.clone();
            std::thread::spawn(move || g.pass())
        };
        assert!(g.wait_trigger(), "a ring asked");
        g.open(true);
        assert!(q.join().unwrap());
        assert!(g.pass(), "open: no wait");
    }

    #[test]
    fn a_failed_switch_over_fails_the_queues_and_wakes_the_handover() {
        let g = SwitchGate::new();
        g.open(false);
        assert!(!g.wait_trigger());
        assert!(!g.pass());
    }
}
