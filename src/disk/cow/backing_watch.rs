// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! R6 while serving: **the backing file is sacred.** It is opened read-only
//! and checked against the header at open (`cow::file`); here its size and
//! mtime are checked again once a second while the COW is served. A change
//! makes every read that needs the backing fail (EIO) instead of returning
//! data from a different base; writes and data already in the COW are
//! kept. The durability thread drives the watch.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::state::CowShared;

/// How often the backing file's size and mtime are checked.
const PERIOD: Duration = Duration::from_secs(1);

/// When the backing file was last checked.
#[derive(Debug)]
pub(super) struct BackingWatch {
    last: Instant,
}

impl BackingWatch {
    /// A watch whose first check is a period from now (open just checked).
    pub(super) fn new() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    /// When the next check is due.
    pub(super) fn due(&self) -> Option<Instant> {
        self.last.checked_add(PERIOD)
    }

    /// The longest a caller may sleep before calling [`Self::check`].
    pub(super) fn period() -> Duration {
        PERIOD
    }

    /// Checks the backing file if a period passed; a change is logged once
    /// and marks the disk's `backing_changed`.
    pub(super) fn check(&mut self, shared: &CowShared) {
        if self.last.elapsed() < PERIOD {
            return;
        }
        self.last = Instant::now();
        if shared.backing_changed.load(Ordering::Acquire) {
            return;
        }
        let f = &shared.file;
        let problem = match f.backing_fd.metadata() {
            Err(e) => Some(format!("cannot stat it: {e}")),
            Ok(m) => match crate::cow::file::backing_size(&f.backing_fd, &m) {
                Err(e) => Some(format!("cannot measure it: {e}")),
                Ok(size) => crate::cow::file::check_backing_with(
                    &f.path,
                    &f.backing_path,
                    &f.header,
                    &m,
                    size,
                    f.backing_check,
                )
                .err()
                .map(|e| e.to_string()),
            },
        };
        if let Some(p) = problem {
            shared.backing_changed.store(true, Ordering::Release);
            log::error!(
                "{}: the backing file changed while serving ({p}). Reads of sectors not in the COW \
                 now fail with an I/O error; writes and data already in the COW are kept. Restore \
                 the base image and restart the daemon",
                shared.info.path.display()
            );
        }
    }
}
