// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The durability thread of a COW disk: issues the syncs and bitmap writes
//! the epochs (`epochs.rs`, R5) ask for, through `bitmap_writeback`
//! (R1-R4), and answers their waiters; drives the backing-file watch
//! (R6, `backing_watch`).

use std::{
    collections::{HashMap, VecDeque},
    ops::Range,
    os::fd::AsRawFd,
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use super::epochs::{checkpoint_due, Epochs};
use crate::disk::cow::{
    backing_watch::BackingWatch,
    bitmap_writeback::{BitmapWriteback, Issued, Queued},
    channel::{Cmd, Reply},
    state::CowShared,
};
use crate::{
    disk::Completion,
    engine::{Engine, EventFd, IoDone, IoKind, IoOp, IoVecs},
};

/// Bitmap bytes closer than this share one bitmap write. A page: one
/// buffered write per touched bitmap page instead of one per few bytes (a
/// checkpoint of 16k random first writes on 16 GiB was ~13k writes of a
/// byte or two, +7 us of CPU per guest write; now at most one per page). The
/// bytes in between are current bits, which R3 keeps stable anyway; reads
/// of never-written sectors nearby may park (R4) for the few microseconds
/// a buffered write takes.
const COALESCE_GAP: u64 = 4096;
/// Largest coalesced bitmap write (bounds the bytes a read may wait on).
const MAX_BITMAP_WRITE: u64 = 64 * 1024;
/// io_uring entries of the durability thread.
const META_RING: u32 = 1024;
/// Tag of the `fdatasync` (bitmap writes use their write id, >= 1).
const SYNC_TAG: u64 = 0;

struct Meta {
    shared: Arc<CowShared>,
    engine: Engine,
    epochs: Epochs<Reply>,
    /// Bitmap write id -> (epoch, sectors) for writes pending or waiting.
    writes: HashMap<u64, (u64, Vec<Range<u64>>)>,
    /// Sectors whose bits are set but whose bitmap write failed.
    rewrite: Vec<Range<u64>>,
    shutdown: Vec<mpsc::Sender<Result<(), i32>>>,
    /// Test hook: bitmap write completions held until their due time.
    delayed: VecDeque<(Instant, IoDone)>,
    backing: BackingWatch,
}

/// Runs the durability thread of a COW disk until shutdown.
pub fn run(shared: Arc<CowShared>, event: Arc<EventFd>) {
    let engine = match Engine::new(META_RING, event) {
        Ok(mut e) => {
            e.set_observer(shared.opts.observer.as_ref().map(|o| o.0.clone()));
            e
        }
        Err(e) => {
            log::error!(
                "{}: cannot start the durability thread: {e}",
                shared.info.path.display()
            );
            fail_everything(&shared, libc::EIO);
            return;
        }
    };
    let mut m = Meta {
        shared,
        engine,
        epochs: Epochs::default(),
        writes: HashMap::new(),
        rewrite: Vec::new(),
        shutdown: Vec::new(),
        delayed: VecDeque::new(),
        backing: BackingWatch::new(),
    };
    m.main_loop();
}

fn fail_everything(shared: &CowShared, errno: i32) {
    loop {
        for cmd in shared.channel.take() {
            match cmd {
                Cmd::Flush(r) | Cmd::Persist(_, r) => r.mailbox.deliver(Completion {
                    tag: r.tag,
                    result: Err(errno),
                }),
                Cmd::Kick => {}
                Cmd::Shutdown(tx) => {
                    let _ = tx.send(Err(errno));
                    return;
                }
            }
        }
        shared.channel.event().wait(100);
        shared.channel.event().drain();
    }
}

impl Meta {
    fn main_loop(&mut self) {
        let mut io = Vec::new();
        loop {
            let timeout = self.timeout_ms();
            self.engine.event().wait(timeout);
            if let Err(e) = self.engine.reap(&mut io) {
                log::error!("{}: durability ring: {e}", self.shared.info.path.display());
            }
            for d in io.drain(..) {
                self.on_io(d);
            }
            while self
                .delayed
                .front()
                .is_some_and(|(due, _)| *due <= Instant::now())
            {
                if let Some((_, d)) = self.delayed.pop_front() {
                    self.on_bitmap_write(d.tag, d.result);
                }
            }
            for cmd in self.shared.channel.take() {
                self.on_cmd(cmd);
            }
            self.backing.check(&self.shared);
            self.maybe_checkpoint();
            self.maybe_sync();
            self.finish_epochs();
            if let Err(e) = self.engine.submit() {
                log::error!(
                    "{}: durability ring submit: {e}",
                    self.shared.info.path.display()
                );
            }
            if !self.shutdown.is_empty() && self.idle() {
                let result = self.shutdown_result();
                for tx in self.shutdown.drain(..) {
                    let _ = tx.send(result);
                }
                return;
            }
        }
    }

    /// What shutdown reports: success only when every completed write is
    /// durable with its bits. A bitmap write that failed (kept for a retry
    /// that will not come) or bits still waiting mean the COW file alone
    /// does not hold them: the crash journal must then stay.
    fn shutdown_result(&self) -> Result<(), i32> {
        if let Some(errno) = self.epochs.sticky_error() {
            return Err(errno);
        }
        if self.shared.opts.readonly {
            return Ok(());
        }
        let waiting = self
            .shared
            .state
            .lock()
            .map_or(true, |s| !s.unpersisted.is_empty());
        if !self.rewrite.is_empty() || waiting {
            log::error!(
                "{}: bits of completed writes could not be written at shutdown{}",
                self.shared.info.path.display(),
                if self.shared.journal.is_some() {
                    "; the crash journal keeps them for the next daemon"
                } else {
                    ""
                }
            );
            return Err(libc::EIO);
        }
        Ok(())
    }

    fn idle(&self) -> bool {
        self.epochs.idle()
            && self.delayed.is_empty()
            && self.engine.in_flight() == 0
            && self.shared.state.lock().map_or(true, |s| s.wb.is_idle())
    }

    fn timeout_ms(&self) -> i32 {
        if !self.shutdown.is_empty() {
            return 10;
        }
        let since = self.shared.state.lock().ok().and_then(|s| s.since);
        // A deadline past what an `Instant` can hold is no deadline.
        let checkpoint = since.and_then(|t| t.checked_add(self.shared.opts.max_pending_age));
        let held = self.delayed.front().map(|(due, _)| *due);
        let watch = self.backing.due();
        let left = [checkpoint, held, watch]
            .into_iter()
            .flatten()
            .min()
            .map_or(BackingWatch::period(), |due| {
                due.saturating_duration_since(Instant::now())
            });
        i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Flush(r) => {
                if self.shared.opts.readonly {
                    // Nothing is written, so everything is durable.
                    deliver(r, Ok(()));
                    return;
                }
                // Nothing written since the last sync and no bits waiting.
                let quiet = self.shared.writes_since_sync.load(Ordering::Acquire) == 0
                    && self
                        .shared
                        .state
                        .lock()
                        .is_ok_and(|s| s.unpersisted.is_empty());
                if let Some((r, result)) = self.epochs.flush(r, quiet) {
                    deliver(r, result);
                }
            }
            Cmd::Persist(ranges, r) => self.epochs.persist(ranges, r),
            Cmd::Kick => {}
            Cmd::Shutdown(tx) => {
                self.shutdown.push(tx);
                // A read-only disk writes no bits (sectors a crash journal
                // brought back are only routed to the COW, in memory).
                if !self.shared.opts.readonly && !self.shared.retired.load(Ordering::Acquire) {
                    self.epochs.want();
                }
            }
        }
    }

    fn maybe_checkpoint(&mut self) {
        if self.shared.opts.readonly || self.shared.retired.load(Ordering::Acquire) {
            return;
        }
        let opts = &self.shared.opts;
        let due = self.shared.state.lock().is_ok_and(|s| {
            checkpoint_due(
                s.checkpoint_requested,
                s.since,
                s.unpersisted.len(),
                Instant::now(),
                opts.max_pending_age,
                opts.max_pending_extents,
            )
        });
        if due && !self.epochs.busy() {
            self.epochs.want();
        }
    }

    fn maybe_sync(&mut self) {
        let shared = &self.shared;
        // The batch is fixed when the open epoch closes: the sync about to
        // be issued covers exactly the writes that completed before now.
        let issue = self.epochs.start_sync(|| {
            shared.state.lock().map_or_else(
                |_| Vec::new(),
                |mut s| {
                    s.since = None;
                    s.checkpoint_requested = false;
                    s.unpersisted.iter().collect()
                },
            )
        });
        if !issue {
            return;
        }
        // Every write counted so far completed before this sync is issued.
        shared.writes_since_sync.store(0, Ordering::Release);
        let op = IoOp::fsync(shared.file.meta_fd.as_raw_fd(), SYNC_TAG);
        if let Err(e) = self.engine.push(op) {
            self.epochs
                .sync_not_issued(e.raw_os_error().unwrap_or(libc::EIO));
        }
    }

    fn on_io(&mut self, d: IoDone) {
        if d.tag == SYNC_TAG {
            self.shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
            self.on_sync(d.result);
        } else if let Some(due) = self.held_until() {
            self.delayed.push_back((due, d));
        } else {
            self.on_bitmap_write(d.tag, d.result);
        }
    }

    /// Test hook: until when a bitmap write completing now is held (none
    /// without a delay, or with one past what an `Instant` can hold).
    fn held_until(&self) -> Option<Instant> {
        let delay = self.shared.opts.bitmap_write_delay;
        if delay.is_zero() {
            return None;
        }
        Instant::now().checked_add(delay)
    }

    fn on_sync(&mut self, result: i64) {
        let result = if result < 0 {
            let errno = i32::try_from(result.saturating_neg()).unwrap_or(libc::EIO);
            log::error!(
                "{}: fdatasync failed ({}); data may be lost, every later flush fails",
                self.shared.info.path.display(),
                std::io::Error::from_raw_os_error(errno)
            );
            Err(errno)
        } else {
            Ok(())
        };
        for (id, batch) in self.epochs.sync_done(result) {
            self.start_bitmaps(id, batch);
        }
    }

    /// The epoch's data is durable: write the bits of its batch.
    fn start_bitmaps(&mut self, id: u64, mut epoch_batch: Vec<Range<u64>>) {
        let shared = self.shared.clone();
        let mut batch: Vec<Range<u64>> = std::mem::take(&mut self.rewrite);
        batch.append(&mut epoch_batch);
        let mut issued = Vec::new();
        // Bitmap writes of the epoch submitted: issued now or waiting (R3).
        let mut count = 0usize;
        if let Ok(mut s) = shared.state.lock() {
            let limit = shared.file.geometry.bitmap_sectors();
            for r in &mut batch {
                r.end = r.end.min(limit);
            }
            let groups = BitmapWriteback::<u64>::bytes_for(&batch, COALESCE_GAP, MAX_BITMAP_WRITE);
            count = groups
                .into_iter()
                .map(|(bytes, sectors)| {
                    let keep = sectors.clone();
                    match s.wb.submit(
                        &shared.file.bitmap,
                        &shared.file.geometry,
                        bytes,
                        sectors,
                        id,
                    ) {
                        Ok(Queued::Issue(w)) => {
                            for r in &w.sectors {
                                s.unpersisted.remove(r.clone());
                            }
                            self.writes.insert(w.id, (id, keep));
                            issued.push(w);
                            true
                        }
                        Ok(Queued::Wait(write_id)) => {
                            shared
                                .stats
                                .bitmap_writes_waited
                                .fetch_add(1, Ordering::Relaxed);
                            self.writes.insert(write_id, (id, keep));
                            true
                        }
                        Err(_) => {
                            log::error!(
                                "{}: bitmap write out of range dropped",
                                shared.info.path.display()
                            );
                            false
                        }
                    }
                })
                .filter(|&submitted| submitted)
                .count();
        }
        self.announce(&issued);
        for w in issued {
            self.issue(w.id, w.mem, w.file_offset);
        }
        self.epochs.bitmaps_started(id, count);
    }

    /// The crash journal learns how many bits may reach the file before the
    /// writes that carry them are issued.
    fn announce(&self, writes: &[Issued<u64>]) {
        if let Some(j) = &self.shared.journal {
            let n = writes
                .iter()
                .flat_map(|w| w.sectors.iter())
                .map(|r| r.end.saturating_sub(r.start))
                .sum();
            j.raise_max(n);
        }
    }

    /// R1: the write goes straight from the in-memory bitmap (`mem`, which
    /// it owns until reaped); R3 keeps those bytes unmodified meanwhile.
    fn issue(&mut self, write_id: u64, mem: IoVecs, offset: u64) {
        let fd = self.shared.file.meta_fd.as_raw_fd();
        let pushed = IoOp::rw(
            IoKind::Write { dsync: false },
            fd,
            offset,
            mem,
            false,
            write_id,
        )
        .and_then(|op| self.engine.push(op));
        if let Err(e) = pushed {
            let errno = i64::from(e.raw_os_error().unwrap_or(libc::EIO));
            self.on_bitmap_write(write_id, errno.saturating_neg());
        }
    }

    fn on_bitmap_write(&mut self, write_id: u64, result: i64) {
        let shared = self.shared.clone();
        shared.stats.bitmap_writes.fetch_add(1, Ordering::Relaxed);
        let mut released = Vec::new();
        if let Ok(mut s) = shared.state.lock() {
            released =
                s.wb.complete(&shared.file.bitmap, &shared.file.geometry, write_id);
            for w in &released {
                for r in &w.sectors {
                    s.unpersisted.remove(r.clone());
                }
            }
        }
        // R4: parked reads may go now.
        shared.channel.wake_parked();
        self.announce(&released);
        for w in released {
            self.issue(w.id, w.mem, w.file_offset);
        }
        let Some((epoch, sectors)) = self.writes.remove(&write_id) else {
            return;
        };
        let mut error = None;
        if result < 0 {
            let errno = i32::try_from(result.saturating_neg()).unwrap_or(libc::EIO);
            log::error!(
                "{}: bitmap write failed ({}); will retry at the next flush",
                shared.info.path.display(),
                std::io::Error::from_raw_os_error(errno)
            );
            self.rewrite.extend(sectors);
            error = Some(errno);
        }
        self.epochs.bitmap_done(epoch, error);
    }

    fn finish_epochs(&mut self) {
        for (waiters, result) in self.epochs.take_finished() {
            self.shared.stats.epochs.fetch_add(1, Ordering::Relaxed);
            for r in waiters {
                deliver(r, result);
            }
        }
    }
}

fn deliver(r: Reply, result: Result<(), i32>) {
    r.mailbox.deliver(Completion { tag: r.tag, result });
}

/// How long a disk's durability thread may take to persist at shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
