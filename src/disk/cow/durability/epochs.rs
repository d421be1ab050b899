// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The durability epochs of R5 as a pure state machine: no I/O, no lock,
//! no clock except the instants handed in. The durability thread
//! (`durability::thread`) issues the syncs and bitmap writes this asks for
//! and reports their results back.
//!
//! Invariant (R5): **a durable bit implies durable data**, and a FLUSH is
//! answered only when every write completed before it is durable with its
//! bits. An epoch goes
//!
//! ```text
//! Open --(sync issued: batch fixed)--> DataSync --(sync ok)--> Bitmaps
//!      --(its bitmap writes done)--> NeedFinalSync --> FinalSync --(sync ok)--> Done
//! ```
//!
//! - The batch of an epoch (the sectors whose bits it writes) is fixed at
//!   the moment its data sync is issued: exactly the writes completed
//!   before that sync, so the sync covers their data.
//! - One sync is in flight at a time and covers every epoch waiting for one
//!   (the data of the newly closed epoch, the bits of older ones).
//! - Epochs finish in order: a later epoch that is done waits for the
//!   earlier ones before its waiters are answered.
//! - A failed sync is sticky: its epochs and every later FLUSH fail (the
//!   kernel may have dropped the pages it could not write).

use std::{
    collections::VecDeque,
    ops::Range,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its data sync is in flight.
    DataSync,
    /// Its bitmap writes are pending or waiting.
    Bitmaps,
    /// Bitmap writes done; waiting for the sync that makes them durable.
    NeedFinalSync,
    /// That sync is in flight.
    FinalSync,
    /// Durable (or failed).
    Done,
}

/// The epoch collecting waiters.
#[derive(Debug)]
struct OpenEpoch<W> {
    id: u64,
    waiters: Vec<W>,
    /// Sectors of writethrough writes (sent with their waiter).
    extra: Vec<Range<u64>>,
    /// Needs a sync even without waiters (checkpoint, shutdown).
    wanted: bool,
}

#[derive(Debug)]
struct Epoch<W> {
    id: u64,
    phase: Phase,
    waiters: Vec<W>,
    /// Sectors whose bits this epoch sets, until handed out for writing.
    batch: Vec<Range<u64>>,
    outstanding: usize,
    error: Option<i32>,
}

/// Epochs finished in order: their waiters and the answer for them.
pub type Finished<W> = Vec<(Vec<W>, Result<(), i32>)>;

/// The epochs of one COW disk. `W` is what a FLUSH or writethrough write
/// waits with (the queue's reply address).
#[derive(Debug)]
pub struct Epochs<W> {
    open: Option<OpenEpoch<W>>,
    /// Closed epochs, oldest first.
    closed: VecDeque<Epoch<W>>,
    next_id: u64,
    sync_in_flight: Option<Vec<u64>>,
    sticky_error: Option<i32>,
}

impl<W> Default for Epochs<W> {
    fn default() -> Self {
        Self {
            open: None,
            closed: VecDeque::new(),
            next_id: 1,
            sync_in_flight: None,
            sticky_error: None,
        }
    }
}

/// Whether a background checkpoint is due: asked for, or too many
/// extents pending, or the oldest pending write too old.
pub fn checkpoint_due(
    requested: bool,
    oldest: Option<Instant>,
    pending_extents: usize,
    now: Instant,
    max_age: Duration,
    max_extents: usize,
) -> bool {
    requested
        || oldest.is_some_and(|t| now.saturating_duration_since(t) >= max_age)
        || pending_extents >= max_extents
}

impl<W> Epochs<W> {
    fn open_mut(&mut self) -> &mut OpenEpoch<W> {
        let next = &mut self.next_id;
        self.open.get_or_insert_with(|| {
            let id = *next;
            *next = next.saturating_add(1);
            OpenEpoch {
                id,
                waiters: Vec::new(),
                extra: Vec::new(),
                wanted: false,
            }
        })
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Epoch<W>> {
        self.closed.iter_mut().find(|e| e.id == id)
    }

    /// The error every FLUSH gets from now on, if a sync failed.
    pub fn sticky_error(&self) -> Option<i32> {
        self.sticky_error
    }

    /// A FLUSH. `quiet`: nothing was written since the last sync and
    /// nothing waits for bits. Returns the waiter when it is answered at
    /// once (sticky error, or quiet with no epoch in progress), else it
    /// joins the open epoch.
    pub fn flush(&mut self, waiter: W, quiet: bool) -> Option<(W, Result<(), i32>)> {
        if let Some(errno) = self.sticky_error {
            return Some((waiter, Err(errno)));
        }
        if quiet && self.closed.is_empty() && self.open.is_none() && self.sync_in_flight.is_none() {
            return Some((waiter, Ok(())));
        }
        self.open_mut().waiters.push(waiter);
        None
    }

    /// A writethrough write whose data completed: its bits go with the
    /// open epoch, and it is answered when that epoch is durable.
    pub fn persist(&mut self, sectors: Vec<Range<u64>>, waiter: W) {
        let e = self.open_mut();
        e.extra.extend(sectors);
        e.waiters.push(waiter);
    }

    /// The open epoch must be synced even without waiters (a checkpoint,
    /// shutdown).
    pub fn want(&mut self) {
        self.open_mut().wanted = true;
    }

    /// True while a closed epoch is not finished (a checkpoint then waits).
    pub fn busy(&self) -> bool {
        self.closed.iter().any(|e| e.phase != Phase::Done)
    }

    /// Nothing open that needs a sync, nothing closed, no sync in flight.
    pub fn idle(&self) -> bool {
        self.closed.is_empty()
            && self
                .open
                .as_ref()
                .is_none_or(|e| !e.wanted && e.waiters.is_empty())
            && self.sync_in_flight.is_none()
    }

    /// When no sync is in flight and one is needed: the epochs a sync
    /// issued now covers (the caller issues it, then reports with
    /// [`Self::sync_done`] or [`Self::sync_not_issued`]). Closing the open
    /// epoch fixes its batch: `completed()` (the writes completed so far,
    /// called only then) plus its writethrough sectors.
    pub fn start_sync(&mut self, completed: impl FnOnce() -> Vec<Range<u64>>) -> bool {
        if self.sync_in_flight.is_some() {
            return false;
        }
        let mut covered = Vec::new();
        for e in &mut self.closed {
            if e.phase == Phase::NeedFinalSync {
                e.phase = Phase::FinalSync;
                covered.push(e.id);
            }
        }
        let ready = self
            .open
            .as_ref()
            .is_some_and(|e| e.wanted || !e.waiters.is_empty());
        if ready {
            if let Some(o) = self.open.take() {
                let mut batch = completed();
                batch.extend(o.extra);
                covered.push(o.id);
                self.closed.push_back(Epoch {
                    id: o.id,
                    phase: Phase::DataSync,
                    waiters: o.waiters,
                    batch,
                    outstanding: 0,
                    error: None,
                });
            }
        }
        if covered.is_empty() {
            return false;
        }
        self.sync_in_flight = Some(covered);
        true
    }

    /// The sync [`Self::start_sync`] asked for could not be issued.
    pub fn sync_not_issued(&mut self, errno: i32) {
        for id in self.sync_in_flight.take().unwrap_or_default() {
            self.fail(id, errno);
        }
    }

    /// The sync completed (`Err`: failed, sticky). Returns the epochs whose
    /// data is now durable, with the sectors whose bits they must write
    /// now (report with [`Self::bitmaps_started`]).
    pub fn sync_done(&mut self, result: Result<(), i32>) -> Vec<(u64, Vec<Range<u64>>)> {
        let covered = self.sync_in_flight.take().unwrap_or_default();
        let mut start = Vec::new();
        for id in covered {
            match result {
                Err(errno) => {
                    self.sticky_error = Some(errno);
                    self.fail(id, errno);
                }
                Ok(()) => match self.get_mut(id) {
                    Some(e) if e.phase == Phase::DataSync => {
                        start.push((id, std::mem::take(&mut e.batch)));
                    }
                    Some(e) if e.phase == Phase::FinalSync => e.phase = Phase::Done,
                    _ => {}
                },
            }
        }
        start
    }

    /// Epoch `id` has `count` bitmap writes in flight or waiting.
    pub fn bitmaps_started(&mut self, id: u64, count: usize) {
        if let Some(e) = self.get_mut(id) {
            e.outstanding = count;
            e.phase = if count == 0 {
                Phase::Done
            } else {
                Phase::Bitmaps
            };
        }
    }

    /// A bitmap write of epoch `id` completed (`Some(errno)`: failed; the
    /// epoch then fails, and the caller keeps its sectors for a retry).
    pub fn bitmap_done(&mut self, id: u64, error: Option<i32>) {
        let Some(e) = self.get_mut(id) else {
            return;
        };
        if error.is_some() {
            e.error = error;
        }
        e.outstanding = e.outstanding.saturating_sub(1);
        if e.outstanding == 0 && e.phase == Phase::Bitmaps {
            e.phase = if e.error.is_some() {
                Phase::Done
            } else {
                Phase::NeedFinalSync
            };
        }
    }

    fn fail(&mut self, id: u64, errno: i32) {
        if let Some(e) = self.get_mut(id) {
            e.error = Some(errno);
            e.phase = Phase::Done;
        }
    }

    /// Removes the finished epochs at the front, in order.
    pub fn take_finished(&mut self) -> Finished<W> {
        let mut out = Vec::new();
        while self.closed.front().is_some_and(|e| e.phase == Phase::Done) {
            if let Some(e) = self.closed.pop_front() {
                out.push((e.waiters, e.error.map_or(Ok(()), Err)));
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Answers so far, in order: (waiter, result).
    fn answers(e: &mut Epochs<&'static str>) -> Vec<(&'static str, Result<(), i32>)> {
        e.take_finished()
            .into_iter()
            .flat_map(|(ws, r)| ws.into_iter().map(move |w| (w, r)))
            .collect()
    }

    /// Runs an epoch whose data sync completed through one bitmap write
    /// and its final sync.
    fn finish(e: &mut Epochs<&'static str>, id: u64) {
        e.bitmaps_started(id, 1);
        e.bitmap_done(id, None);
        assert!(e.start_sync(Vec::new));
        assert!(e.sync_done(Ok(())).is_empty());
    }

    #[test]
    fn a_flush_covers_exactly_the_writes_completed_before_its_data_sync() {
        let mut e = Epochs::default();
        // Completed writes, as the disk's unpersisted set would hold them.
        let mut completed: Vec<Range<u64>> = vec![0..8];
        assert!(e.flush("f1", false).is_none());
        assert!(e.start_sync(|| std::mem::take(&mut completed)));
        // A write completing while the data sync is in flight is not
        // covered by it: it belongs to the next epoch.
        completed.push(8..16);
        assert!(e.flush("f2", false).is_none());
        assert!(!e.start_sync(Vec::new), "one sync at a time");
        let start = e.sync_done(Ok(()));
        assert_eq!(start, vec![(1, vec![0..8])]);
        e.bitmaps_started(1, 1);
        assert!(answers(&mut e).is_empty(), "bits not durable yet");
        e.bitmap_done(1, None);
        assert!(answers(&mut e).is_empty(), "bits written, not synced");
        // One sync: the bits of epoch 1 and the data of epoch 2.
        assert!(e.start_sync(|| std::mem::take(&mut completed)));
        let start = e.sync_done(Ok(()));
        assert_eq!(start, vec![(2, vec![8..16])]);
        assert_eq!(answers(&mut e), vec![("f1", Ok(()))]);
        finish(&mut e, 2);
        assert_eq!(answers(&mut e), vec![("f2", Ok(()))]);
        assert!(e.idle());
    }

    #[test]
    fn writethrough_sectors_join_the_batch() {
        let mut e = Epochs::default();
        e.persist(vec![40..48], "w");
        assert!(e.start_sync(|| vec![0..8]));
        assert_eq!(e.sync_done(Ok(())), vec![(1, vec![0..8, 40..48])]);
    }

    #[test]
    fn epochs_complete_in_order() {
        let mut e = Epochs::default();
        assert!(e.flush("f1", false).is_none());
        assert!(e.start_sync(|| vec![0..8]));
        e.sync_done(Ok(()));
        e.bitmaps_started(1, 2);
        assert!(e.flush("f2", false).is_none());
        assert!(e.start_sync(Vec::new));
        // Epoch 2 has no bits to write: done at once, but epoch 1 is not.
        assert_eq!(e.sync_done(Ok(())), vec![(2, vec![])]);
        e.bitmaps_started(2, 0);
        assert!(
            answers(&mut e).is_empty(),
            "epoch 2 answered before epoch 1"
        );
        e.bitmap_done(1, None);
        e.bitmap_done(1, None);
        assert!(e.start_sync(Vec::new));
        e.sync_done(Ok(()));
        assert_eq!(answers(&mut e), vec![("f1", Ok(())), ("f2", Ok(()))]);
    }

    #[test]
    fn a_failed_bitmap_write_fails_its_epoch_only() {
        let mut e = Epochs::default();
        assert!(e.flush("f1", false).is_none());
        assert!(e.start_sync(|| vec![0..8]));
        e.sync_done(Ok(()));
        e.bitmaps_started(1, 2);
        e.bitmap_done(1, Some(libc::EIO));
        assert!(answers(&mut e).is_empty(), "one write still out");
        e.bitmap_done(1, None);
        assert_eq!(answers(&mut e), vec![("f1", Err(libc::EIO))]);
        assert_eq!(e.sticky_error(), None);
        assert!(e.flush("f2", true).is_some_and(|(_, r)| r.is_ok()));
    }

    #[test]
    fn a_failed_sync_is_sticky() {
        let mut e = Epochs::default();
        assert!(e.flush("f1", false).is_none());
        assert!(e.start_sync(|| vec![0..8]));
        assert!(e.sync_done(Err(libc::EIO)).is_empty());
        assert_eq!(answers(&mut e), vec![("f1", Err(libc::EIO))]);
        assert_eq!(e.flush("f2", true), Some(("f2", Err(libc::EIO))));
        let mut e = Epochs::<&str>::default();
        e.want();
        assert!(e.start_sync(Vec::new));
        e.sync_not_issued(libc::ENOMEM);
        assert_eq!(e.take_finished().len(), 1);
    }

    #[test]
    fn a_quiet_flush_is_answered_at_once_unless_an_epoch_is_in_progress() {
        let mut e = Epochs::default();
        assert_eq!(e.flush("q", true), Some(("q", Ok(()))));
        e.want();
        assert!(e.flush("q2", true).is_none(), "a checkpoint is open");
        assert!(e.start_sync(Vec::new));
        assert!(e.flush("q3", true).is_none(), "a sync is in flight");
        assert!(!e.idle());
    }

    #[test]
    fn checkpoints_by_count_and_by_age() {
        let now = Instant::now();
        let age = Duration::from_secs(5);
        let due = |req, oldest, n| checkpoint_due(req, oldest, n, now, age, 100);
        assert!(!due(false, None, 0));
        assert!(!due(false, None, 99));
        assert!(due(false, None, 100), "by count");
        assert!(!due(false, Some(now - Duration::from_secs(4)), 1));
        assert!(due(false, Some(now - Duration::from_secs(5)), 1), "by age");
        assert!(due(true, None, 0), "asked for");
        // A clock that went backwards does not make a write old.
        assert!(!due(false, Some(now + Duration::from_secs(60)), 1));
    }
}
