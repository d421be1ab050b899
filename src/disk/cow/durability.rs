// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Durability of a COW disk (R5, after the ext4 patch of seed 003): the
//! bitmap bits of completed writes reach the disk in epochs, on one thread.
//!
//! Invariant: **a durable bit implies durable data.** Every epoch runs
//! `fdatasync` (data) -> bitmap writes (through `bitmap_writeback`, R1-R4)
//! -> `fdatasync` (bits), so no bitmap byte is written before the data of
//! every bit it carries is on stable storage.
//!
//! - Writeback mode: completed writes are recorded in the disk's
//!   `unpersisted` set (reads already see them) and the guest is answered at
//!   once. A FLUSH joins the open epoch and is answered when that epoch and
//!   every earlier one are durable. A background checkpoint opens an epoch
//!   when too many writes are pending or the oldest is too old.
//! - Writethrough mode: a write whose data completed joins the open epoch
//!   with its sector range and is answered when the epoch is durable.
//!
//! One `fdatasync` is in flight at a time; each covers every epoch waiting
//! for it (data of the newly closed epoch, bits of older ones), so syncs
//! are shared (group commit). Epochs complete in order. An `fdatasync`
//! failure is sticky: later flushes fail too, because the kernel may have
//! dropped the dirty pages it could not write.

use std::{
    collections::{HashMap, VecDeque},
    ops::Range,
    os::fd::AsRawFd,
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use super::{
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
/// How often the backing file's size and mtime are checked (R6).
const BACKING_CHECK_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Collecting waiters.
    Open,
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

#[derive(Debug)]
struct Epoch {
    id: u64,
    phase: Phase,
    waiters: Vec<Reply>,
    extra: Vec<Range<u64>>,
    /// Sectors whose bits this epoch sets: snapshot of `unpersisted` taken
    /// when its data sync is issued (only writes completed by then are
    /// covered by that sync), plus `extra`.
    batch: Vec<Range<u64>>,
    /// Needs a sync even without waiters (checkpoint, shutdown).
    wanted: bool,
    outstanding: usize,
    error: Option<i32>,
}

impl Epoch {
    fn new(id: u64) -> Self {
        Self {
            id,
            phase: Phase::Open,
            waiters: Vec::new(),
            extra: Vec::new(),
            batch: Vec::new(),
            wanted: false,
            outstanding: 0,
            error: None,
        }
    }
}

struct Meta {
    shared: Arc<CowShared>,
    engine: Engine,
    /// The epoch collecting waiters, if any.
    open: Option<Epoch>,
    /// Closed epochs, oldest first.
    epochs: VecDeque<Epoch>,
    next_epoch: u64,
    sync_in_flight: Option<Vec<u64>>,
    /// Bitmap write id -> (epoch, sectors) for writes pending or waiting.
    writes: HashMap<u64, (u64, Vec<Range<u64>>)>,
    /// Sectors whose bits are set but whose bitmap write failed.
    rewrite: Vec<Range<u64>>,
    sticky_error: Option<i32>,
    shutdown: Vec<mpsc::Sender<Result<(), i32>>>,
    /// Test hook: bitmap write completions held until their due time.
    delayed: VecDeque<(Instant, IoDone)>,
    last_backing_check: Instant,
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
        open: None,
        epochs: VecDeque::new(),
        next_epoch: 1,
        sync_in_flight: None,
        writes: HashMap::new(),
        rewrite: Vec::new(),
        sticky_error: None,
        shutdown: Vec::new(),
        delayed: VecDeque::new(),
        last_backing_check: Instant::now(),
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
            self.watch_backing();
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
        if let Some(errno) = self.sticky_error {
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
        self.epochs.is_empty()
            && self
                .open
                .as_ref()
                .is_none_or(|e| !e.wanted && e.waiters.is_empty())
            && self.sync_in_flight.is_none()
            && self.delayed.is_empty()
            && self.engine.in_flight() == 0
            && self.shared.state.lock().map_or(true, |s| s.wb.is_idle())
    }

    fn timeout_ms(&self) -> i32 {
        if !self.shutdown.is_empty() {
            return 10;
        }
        let since = self.shared.state.lock().ok().and_then(|s| s.since);
        let checkpoint = since.map(|t| t + self.shared.opts.max_pending_age);
        let held = self.delayed.front().map(|(due, _)| *due);
        let watch = self.last_backing_check + BACKING_CHECK_PERIOD;
        let due = [checkpoint, held, Some(watch)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(watch);
        let left = due.saturating_duration_since(Instant::now());
        i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
    }

    /// R6: the backing file must not change under a COW. Checked once a
    /// second; a change makes every read that needs the backing fail (EIO)
    /// instead of returning data from a different base.
    fn watch_backing(&mut self) {
        if self.last_backing_check.elapsed() < BACKING_CHECK_PERIOD {
            return;
        }
        self.last_backing_check = Instant::now();
        if self.shared.backing_changed.load(Ordering::Acquire) {
            return;
        }
        let f = &self.shared.file;
        let problem = match f.backing_fd.metadata() {
            Err(e) => Some(format!("cannot stat it: {e}")),
            Ok(m) => crate::cow::file::check_backing(&f.path, &f.backing_path, &f.header, &m)
                .err()
                .map(|e| e.to_string()),
        };
        if let Some(p) = problem {
            self.shared.backing_changed.store(true, Ordering::Release);
            log::error!(
                "{}: the backing file changed while serving ({p}). Reads of sectors not in the COW \
                 now fail with an I/O error; writes and data already in the COW are kept. Restore \
                 the base image and restart the daemon",
                self.shared.info.path.display()
            );
        }
    }

    fn open_epoch(&mut self) -> &mut Epoch {
        let id = self.next_epoch;
        if self.open.is_none() {
            self.next_epoch += 1;
        }
        self.open.get_or_insert_with(|| Epoch::new(id))
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Flush(r) => {
                if self.shared.opts.readonly {
                    // Nothing is written, so everything is durable.
                    r.mailbox.deliver(Completion {
                        tag: r.tag,
                        result: Ok(()),
                    });
                    return;
                }
                if let Some(errno) = self.sticky_error {
                    r.mailbox.deliver(Completion {
                        tag: r.tag,
                        result: Err(errno),
                    });
                    return;
                }
                // Nothing written since the last sync and nothing in
                // progress: already durable.
                let quiet = self.epochs.is_empty()
                    && self.open.is_none()
                    && self.sync_in_flight.is_none()
                    && self.shared.writes_since_sync.load(Ordering::Acquire) == 0
                    && self
                        .shared
                        .state
                        .lock()
                        .is_ok_and(|s| s.unpersisted.is_empty());
                if quiet {
                    r.mailbox.deliver(Completion {
                        tag: r.tag,
                        result: Ok(()),
                    });
                } else {
                    self.open_epoch().waiters.push(r);
                }
            }
            Cmd::Persist(ranges, r) => {
                let e = self.open_epoch();
                e.extra.extend(ranges);
                e.waiters.push(r);
            }
            Cmd::Kick => {}
            Cmd::Shutdown(tx) => {
                self.shutdown.push(tx);
                // A read-only disk writes no bits (sectors a crash journal
                // brought back are only routed to the COW, in memory).
                if !self.shared.opts.readonly {
                    self.open_epoch().wanted = true;
                }
            }
        }
    }

    fn maybe_checkpoint(&mut self) {
        if self.shared.opts.readonly {
            return;
        }
        let due = self.shared.state.lock().is_ok_and(|s| {
            s.checkpoint_requested
                || s.since
                    .is_some_and(|t| t.elapsed() >= self.shared.opts.max_pending_age)
                || s.unpersisted.len() >= self.shared.opts.max_pending_extents
        });
        let busy = self.epochs.iter().any(|e| e.phase != Phase::Done);
        if due && !busy {
            self.open_epoch().wanted = true;
        }
    }

    fn maybe_sync(&mut self) {
        if self.sync_in_flight.is_some() {
            return;
        }
        let mut covered = Vec::new();
        for e in &mut self.epochs {
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
            if let Some(mut e) = self.open.take() {
                // The batch is fixed now: the sync about to be issued covers
                // exactly the writes that completed before this point.
                if let Ok(mut s) = self.shared.state.lock() {
                    e.batch = s.unpersisted.iter().collect();
                    s.since = None;
                    s.checkpoint_requested = false;
                }
                e.batch.append(&mut e.extra);
                e.phase = Phase::DataSync;
                covered.push(e.id);
                self.epochs.push_back(e);
            }
        }
        if covered.is_empty() {
            return;
        }
        // Every write counted so far completed before this sync is issued.
        self.shared.writes_since_sync.store(0, Ordering::Release);
        let op = IoOp::fsync(self.shared.file.meta_fd.as_raw_fd(), SYNC_TAG);
        match self.engine.push(op) {
            Ok(()) => self.sync_in_flight = Some(covered),
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                for id in covered {
                    self.fail_epoch(id, errno);
                }
            }
        }
    }

    fn epoch_mut(&mut self, id: u64) -> Option<&mut Epoch> {
        self.epochs.iter_mut().find(|e| e.id == id)
    }

    fn fail_epoch(&mut self, id: u64, errno: i32) {
        if let Some(e) = self.epoch_mut(id) {
            e.error = Some(errno);
            e.phase = Phase::Done;
        }
    }

    fn on_io(&mut self, d: IoDone) {
        if d.tag == SYNC_TAG {
            self.shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
            self.on_sync(d.result);
        } else if !self.shared.opts.bitmap_write_delay.is_zero() {
            self.delayed
                .push_back((Instant::now() + self.shared.opts.bitmap_write_delay, d));
        } else {
            self.on_bitmap_write(d.tag, d.result);
        }
    }

    fn on_sync(&mut self, result: i64) {
        let covered = self.sync_in_flight.take().unwrap_or_default();
        if result < 0 {
            let errno = i32::try_from(-result).unwrap_or(libc::EIO);
            log::error!(
                "{}: fdatasync failed ({}); data may be lost, every later flush fails",
                self.shared.info.path.display(),
                std::io::Error::from_raw_os_error(errno)
            );
            self.sticky_error = Some(errno);
            for id in covered {
                self.fail_epoch(id, errno);
            }
            return;
        }
        for id in covered {
            let phase = self.epoch_mut(id).map(|e| e.phase);
            match phase {
                Some(Phase::DataSync) => self.start_bitmaps(id),
                Some(Phase::FinalSync) => {
                    if let Some(e) = self.epoch_mut(id) {
                        e.phase = Phase::Done;
                    }
                }
                _ => {}
            }
        }
    }

    /// The epoch's data is durable: write the bits of its batch.
    fn start_bitmaps(&mut self, id: u64) {
        let shared = self.shared.clone();
        let mut batch: Vec<Range<u64>> = std::mem::take(&mut self.rewrite);
        if let Some(e) = self.epoch_mut(id) {
            batch.append(&mut e.batch);
        }
        let mut issued = Vec::new();
        let mut count = 0usize;
        if let Ok(mut s) = shared.state.lock() {
            let limit = shared.file.geometry.bitmap_sectors();
            for r in &mut batch {
                r.end = r.end.min(limit);
            }
            let groups = BitmapWriteback::<u64>::bytes_for(&batch, COALESCE_GAP, MAX_BITMAP_WRITE);
            for (bytes, sectors) in groups {
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
                        count += 1;
                    }
                    Ok(Queued::Wait(write_id)) => {
                        count += 1;
                        shared
                            .stats
                            .bitmap_writes_waited
                            .fetch_add(1, Ordering::Relaxed);
                        self.writes.insert(write_id, (id, keep));
                    }
                    Err(_) => log::error!(
                        "{}: bitmap write out of range dropped",
                        shared.info.path.display()
                    ),
                }
            }
        }
        self.announce(&issued);
        for w in issued {
            self.issue(w.id, w.mem, w.file_offset);
        }
        if let Some(e) = self.epoch_mut(id) {
            e.outstanding = count;
            e.phase = if count == 0 {
                Phase::Done
            } else {
                Phase::Bitmaps
            };
        }
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
            self.on_bitmap_write(write_id, -i64::from(e.raw_os_error().unwrap_or(libc::EIO)));
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
        if result < 0 {
            let errno = i32::try_from(-result).unwrap_or(libc::EIO);
            log::error!(
                "{}: bitmap write failed ({}); will retry at the next flush",
                shared.info.path.display(),
                std::io::Error::from_raw_os_error(errno)
            );
            self.rewrite.extend(sectors);
            if let Some(e) = self.epoch_mut(epoch) {
                e.error = Some(errno);
            }
        }
        if let Some(e) = self.epoch_mut(epoch) {
            e.outstanding = e.outstanding.saturating_sub(1);
            if e.outstanding == 0 && e.phase == Phase::Bitmaps {
                e.phase = if e.error.is_some() {
                    Phase::Done
                } else {
                    Phase::NeedFinalSync
                };
            }
        }
    }

    fn finish_epochs(&mut self) {
        while self.epochs.front().is_some_and(|e| e.phase == Phase::Done) {
            let Some(e) = self.epochs.pop_front() else {
                break;
            };
            self.shared.stats.epochs.fetch_add(1, Ordering::Relaxed);
            for r in e.waiters {
                r.mailbox.deliver(Completion {
                    tag: r.tag,
                    result: e.error.map_or(Ok(()), Err),
                });
            }
        }
    }
}

/// How long a disk's durability thread may take to persist at shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
