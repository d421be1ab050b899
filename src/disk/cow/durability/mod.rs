// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Durability of a COW disk (R5, after the ext4 patch of seed 003): the
//! bitmap bits of completed writes reach the disk in epochs, on one thread.
//!
//! Invariant: **a durable bit implies durable data.** Every epoch runs
//! `fdatasync` (data) -> bitmap writes (through `bitmap_writeback`, R1-R4)
//! -> `fdatasync` (bits), so no bitmap byte is written before the data of
//! every bit it carries is on stable storage.
//!
//! - [`epochs`]: the epochs as a pure state machine (what a FLUSH covers,
//!   group commit, order, sticky errors, when a checkpoint is due), with
//!   its unit tests.
//! - [`thread`]: the thread that issues the syncs and bitmap writes the
//!   epochs ask for and answers their waiters; it also watches the backing
//!   file (R6).
//!
//! - Writeback mode: completed writes are recorded in the disk's
//!   `unpersisted` set (reads already see them) and the guest is answered at
//!   once. A FLUSH joins the open epoch and is answered when that epoch and
//!   every earlier one are durable. A background checkpoint opens an epoch
//!   when too many writes are pending or the oldest is too old.
//! - Writethrough mode: a write whose data completed joins the open epoch
//!   with its sector range and is answered when the epoch is durable.

pub mod epochs;
pub mod thread;

pub use thread::{run, SHUTDOWN_TIMEOUT};
