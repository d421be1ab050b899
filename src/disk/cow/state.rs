// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the queues and the durability thread of a COW disk share: the open
//! file, the bitmap writeback scheduler and the completed writes awaiting
//! their bits, under one lock held only for short, I/O-free sections.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8},
        Condvar, Mutex,
    },
    time::Instant,
};

use super::{bitmap_writeback::BitmapWriteback, channel::Channel, gate::Gate, journal::Journal};
use crate::{
    cow::CowFile,
    disk::{extents::ExtentSet, DiskInfo, DiskOptions},
};

/// State shared by the queues and the durability thread, under one lock
/// held only for short, I/O-free sections.
#[derive(Debug, Default)]
pub struct CowState {
    /// Pending and waiting bitmap writes (R1-R4).
    pub wb: BitmapWriteback<u64>,
    /// Sectors whose write completed but whose bit is not set yet.
    pub unpersisted: ExtentSet,
    /// When `unpersisted` last went from clean to dirty.
    pub since: Option<Instant>,
    /// A queue saw too many pending extents.
    pub checkpoint_requested: bool,
    /// Copies in flight (copy-up, flatten, export) and the registered
    /// guest writes they must not cross (seeds 000, 004).
    pub gate: Gate,
}

/// One queue's count of writes in flight that took no ticket, alone on its
/// cache line: the fast path of every write touches it, and a count shared
/// by the queues would bounce between their CPUs.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueCount(pub AtomicU64);

/// The queues' [`QueueCount`]s.
#[derive(Debug, Default)]
pub struct Unregistered(Mutex<Vec<std::sync::Weak<QueueCount>>>);

impl Unregistered {
    /// A new queue's count.
    pub fn register(&self) -> std::sync::Arc<QueueCount> {
        let c = std::sync::Arc::new(QueueCount::default());
        if let Ok(mut v) = self.0.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(std::sync::Arc::downgrade(&c));
        }
        c
    }

    /// Writes in flight without a ticket, over every queue.
    pub fn total(&self) -> u64 {
        self.0.lock().map_or(0, |v| {
            v.iter()
                .filter_map(std::sync::Weak::upgrade)
                .map(|c| c.0.load(std::sync::atomic::Ordering::SeqCst))
                .fold(0, u64::saturating_add)
        })
    }
}

/// `CowShared::gated`: a flatten runs (cold writes register).
pub const GATED_FLATTEN: u8 = 1;
/// `CowShared::gated`: an export runs (every write is checked).
pub const GATED_EXPORT: u8 = 2;

/// Counters of a COW disk.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads handed back with `Again` (R4).
    pub reads_parked: AtomicU64,
    /// Bitmap writes completed.
    pub bitmap_writes: AtomicU64,
    /// Bitmap writes that waited (R3).
    pub bitmap_writes_waited: AtomicU64,
    /// `fdatasync` calls.
    pub syncs: AtomicU64,
    /// Epochs completed.
    pub epochs: AtomicU64,
    /// COW sectors copied up from the backing for a partial write.
    pub copy_ups: AtomicU64,
    /// Requests parked on the gate (a copy of their sectors in flight).
    pub gate_parked: AtomicU64,
}

/// Everything about an open COW disk.
#[derive(Debug)]
pub struct CowShared {
    /// The open, locked file with its bitmap.
    pub file: CowFile,
    /// Size and names.
    pub info: DiskInfo,
    /// Bitmap scheduler and unpersisted writes.
    pub state: Mutex<CowState>,
    /// Writeback (true) or writethrough.
    pub writeback: AtomicBool,
    /// Shut down: requests fail.
    pub closed: AtomicBool,
    /// Handed over to another instance (live handover): nothing more is
    /// written, not even at shutdown.
    pub retired: AtomicBool,
    /// Options it was opened with.
    pub opts: DiskOptions,
    /// Commands to the durability thread.
    pub channel: Channel,
    /// Writes completed since the last `fdatasync` was issued.
    pub writes_since_sync: AtomicU64,
    /// The backing file no longer matches the header (R6): reads that
    /// need it fail.
    pub backing_changed: AtomicBool,
    /// Counters.
    pub stats: Stats,
    /// The crash journal: completed writes whose bits are not durable yet,
    /// kept where a process crash cannot reach them.
    pub journal: Option<Journal>,
    /// Which jobs make writes take the gate ([`GATED_FLATTEN`],
    /// [`GATED_EXPORT`]).
    pub gated: AtomicU8,
    /// Writes in flight that took no ticket at the gate, counted per
    /// queue (a job starting waits for them: they were admitted before it
    /// was gated).
    pub unregistered: Unregistered,
    /// A job waits here (with `state`) for writes and copies to end.
    pub job_cv: Condvar,
}
