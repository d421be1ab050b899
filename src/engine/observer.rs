// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the crash-state checker records: every write, zeroing and sync an
//! engine completes, whatever path (io_uring, Linux AIO, buffered or
//! `O_DIRECT`) it took.

use std::os::fd::RawFd;

/// Sees every write, punch and sync an engine completes (the recording
/// layer of the crash-state checker). Called on the thread that reaps.
pub trait IoObserver: Send + Sync {
    /// `data` was written at `offset` of `fd` (one completion; a short write
    /// reports only what reached the file).
    fn on_write(&self, fd: RawFd, offset: u64, data: &[u8]);
    /// `len` bytes at `offset` were deallocated or zeroed.
    fn on_zero(&self, fd: RawFd, offset: u64, len: u64);
    /// An `fdatasync` of `fd` is about to be submitted; returns a token.
    fn on_sync_start(&self, fd: RawFd) -> u64;
    /// That `fdatasync` completed (`ok` false: it failed).
    fn on_sync_done(&self, token: u64, ok: bool);
}
