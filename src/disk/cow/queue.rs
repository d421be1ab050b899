// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A queue of a COW disk: routing of reads (R4 parking included) and the
//! write path (R7); completed writes are recorded for the durability
//! thread (R5) and the crash journal.

use std::{
    io,
    ops::Range,
    os::fd::{AsRawFd, RawFd},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use super::{
    channel::{Cmd, Mailbox, Reply},
    gate::Copier,
    state::{CowShared, GATED_EXPORT},
};
use crate::{
    disk::queue_core::{eio, QueueCore, ZeroFallback},
    disk::{
        check_request, extents::ExtentSet, sectors_to_bytes, Completion, DiskQueue, IoVecs, Op,
        Request, Submitted, SECTOR,
    },
    engine::{hooks, BufReturn, Engine, IoKind, IoOp},
};

/// How a write in flight is known to the gate (see `gate`).
#[derive(Clone, Copy, Debug)]
enum Reg {
    /// Counted in `unregistered` (no job and no copy-up needed it).
    Fast,
    /// Registered at the gate with this ticket.
    Ticket(u64),
}

/// What a request in flight on a queue is waiting for.
#[derive(Debug)]
enum Stage {
    /// Reads: all parts must land.
    Read,
    /// Data of a write (or a punch) is being written; then the COW sectors
    /// `bits` need their bits (empty for rewrites).
    Data { bits: Range<u64>, reg: Reg },
    /// Copy-up: the backing's content of COW sectors `copies` is being
    /// read; then it is written to the COW, then `then` runs.
    CopyRead {
        held: Vec<u64>,
        copies: Vec<(u64, BufReturn)>,
        then: Then,
    },
    /// Copy-up: the copied sectors are being written to the COW.
    CopyWrite { copies: Vec<u64>, then: Then },
}

/// The write a copy-up runs for.
#[derive(Debug)]
struct Then {
    op: Op,
    bits: Range<u64>,
    reg: Reg,
}

/// What the gate says about a write.
enum Admit {
    /// Go, with these bits to set, this registration, and these COW
    /// sectors to copy up first (elected: nobody else copies them).
    Go {
        bits: Range<u64>,
        reg: Reg,
        copies: Vec<u64>,
    },
    /// Park it: a copy of its sectors is in flight.
    Park,
}

pub(super) struct CowQueue {
    core: QueueCore<Stage>,
    data_fd: RawFd,
    backing_fd: RawFd,
    /// Keeps the files (`data_fd`, `backing_fd`), the bitmap and the zero
    /// buffer alive while operations are in flight.
    shared: Arc<CowShared>,
    mailbox: Arc<Mailbox>,
    /// Requests handed to the durability thread.
    at_meta: usize,
    /// Writethrough writes at the durability thread: their registration
    /// ends when their bits are durable.
    persisting: Vec<(u64, Reg)>,
    /// log2 of 512-byte sectors per COW sector.
    shift: u32,
    /// This queue's writes in flight without a ticket.
    unregistered: Arc<super::state::QueueCount>,
}

impl CowQueue {
    /// A queue of `shared` with its own engine and mailbox.
    pub(super) fn new(shared: Arc<CowShared>, engine: Engine, mailbox: Arc<Mailbox>) -> Self {
        Self {
            core: QueueCore::new(engine, shared.info.path.clone()),
            data_fd: shared.file.data_fd.as_raw_fd(),
            backing_fd: shared.file.backing_fd.as_raw_fd(),
            shift: shared.file.geometry.shift(),
            unregistered: shared.unregistered.register(),
            shared,
            mailbox,
            at_meta: 0,
            persisting: Vec::new(),
        }
    }

    fn push(&mut self, key: usize, op: std::io::Result<IoOp>) {
        self.core.push(key, op);
    }

    fn new_slot(&mut self, tag: u64, stage: Stage) -> usize {
        self.core.open(tag, stage)
    }

    fn fail(&mut self, tag: u64, errno: i32) {
        self.core.complete(tag, Err(errno));
    }

    /// Parks a request on the gate (under the state lock).
    fn park(&self, state: &mut super::state::CowState) {
        self.mailbox.park();
        state.gate.parked = true;
        self.shared
            .stats
            .gate_parked
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Splits a read into COW, backing runs (R4 check included).
    fn read(&mut self, tag: u64, sector: u64, iov: IoVecs) -> Submitted {
        let nsect = iov.len() / SECTOR;
        let Some(end) = sector.checked_add(nsect) else {
            self.fail(tag, libc::EIO);
            return Submitted::Queued;
        };
        let range = sector..end;
        let shared = self.shared.clone();
        let file = &shared.file;
        let bits = file.geometry.bits_of(range.clone());
        let key;
        if file.bitmap.all_set(bits.clone()) {
            key = self.new_slot(tag, Stage::Read);
            let op = IoOp::rw(
                IoKind::Read,
                self.data_fd,
                file.geometry.data_pos(sector),
                iov,
                file.direct,
                key as u64,
            );
            self.push(key, op);
        } else {
            let runs = {
                let Ok(mut state) = shared.state.lock() else {
                    self.fail(tag, libc::EIO);
                    return Submitted::Queued;
                };
                // Readers of a sector being copied up wait for the copy
                // (seed 000). Flatten's copies need no such wait: their
                // source, the backing, never changes (see `gate`).
                if self.shift > 0 && state.gate.busy(&bits, Some(Copier::CopyUp)) {
                    self.park(&mut state);
                    drop(state);
                    return Submitted::Again(Request {
                        op: Op::Read { sector, iov },
                        tag,
                    });
                }
                let runs = route(&file.bitmap, &state.unpersisted, bits);
                let backing: Vec<Range<u64>> =
                    runs.iter().filter(|r| !r.2).map(|r| r.0..r.1).collect();
                if !backing.is_empty() && shared.backing_changed.load(Ordering::Acquire) {
                    drop(state);
                    self.fail(tag, libc::EIO);
                    return Submitted::Queued;
                }
                if state.wb.check_read(&backing).is_err() {
                    self.mailbox.park();
                    shared.stats.reads_parked.fetch_add(1, Ordering::Relaxed);
                    drop(state);
                    return Submitted::Again(Request {
                        op: Op::Read { sector, iov },
                        tag,
                    });
                }
                runs
            };
            key = self.new_slot(tag, Stage::Read);
            for (b0, b1, cow) in runs {
                // COW sectors back to the request's 512-byte sectors.
                let start = (b0 << self.shift).max(sector);
                let end = (b1 << self.shift).min(end);
                let op = run_part(&iov, sector, start..end).and_then(|part| {
                    if cow {
                        IoOp::rw(
                            IoKind::Read,
                            self.data_fd,
                            file.geometry.data_pos(start),
                            part,
                            file.direct,
                            key as u64,
                        )
                    } else {
                        IoOp::rw(
                            IoKind::Read,
                            self.backing_fd,
                            sectors_to_bytes(start).ok_or_else(eio)?,
                            part,
                            file.backing_direct,
                            key as u64,
                        )
                    }
                });
                self.push(key, op);
            }
        }
        self.settle(key);
        Submitted::Queued
    }

    /// Decides how a write (or punch) of `sector..end` may go.
    ///
    /// Without a job and with 512-byte COW sectors this takes no lock: the
    /// write is counted in `unregistered`, and a job that starts waits for
    /// those (the counter is raised before `gated` is read, the job sets
    /// `gated` before reading the counter: one of the two sees the other).
    fn admit(&mut self, sector: u64, end: u64) -> Admit {
        let shared = self.shared.clone();
        let g = &shared.file.geometry;
        let bits = g.bits_of(sector..end);
        let all_set = shared.file.bitmap.all_set(bits.clone());
        let to_set = if all_set {
            bits.start..bits.start
        } else {
            bits.clone()
        };
        let slow =
            |gated: u8| gated & GATED_EXPORT != 0 || (!all_set && (self.shift > 0 || gated != 0));
        if !slow(shared.gated.load(Ordering::SeqCst)) {
            self.unregistered.0.fetch_add(1, Ordering::SeqCst);
            if !slow(shared.gated.load(Ordering::SeqCst)) {
                return Admit::Go {
                    bits: to_set,
                    reg: Reg::Fast,
                    copies: Vec::new(),
                };
            }
            self.unregistered.0.fetch_sub(1, Ordering::SeqCst);
        }
        let Ok(mut guard) = shared.state.lock() else {
            return Admit::Park;
        };
        let state = &mut *guard;
        if state.gate.busy(&bits, None) {
            self.park(state);
            return Admit::Park;
        }
        if shared.gated.load(Ordering::SeqCst) & GATED_EXPORT != 0 && !hooks::gate_off("export") {
            if let Some(map) = state.gate.export.as_mut() {
                if !map.admit(&bits) {
                    self.park(state);
                    shared.job_cv.notify_all();
                    return Admit::Park;
                }
            }
        }
        let mut copies = Vec::new();
        if self.shift > 0 && !all_set && !hooks::gate_off("copy-up") {
            // The head and tail COW sectors the write covers only in part
            // and that are not in the COW need the rest from the backing.
            let mut ends = vec![bits.start];
            if bits.end.saturating_sub(1) != bits.start {
                ends.push(bits.end.saturating_sub(1));
            }
            for c in ends {
                let whole = g.sectors_of(c..c.saturating_add(1));
                let partial = whole.start < sector || whole.end > end;
                let in_cow = shared.file.bitmap.test(c) || state.unpersisted.contains(c);
                if !partial || in_cow {
                    continue;
                }
                if state.gate.writing(&(c..c.saturating_add(1))) {
                    // A write in flight will put this sector in the COW
                    // (or is a copy-up's own): copying now could land
                    // over it.
                    self.park(state);
                    return Admit::Park;
                }
                copies.push(c);
            }
            for &c in &copies {
                state.gate.hold(c..c.saturating_add(1), Copier::CopyUp);
            }
        }
        let ticket = state.gate.register(bits);
        Admit::Go {
            bits: to_set,
            reg: Reg::Ticket(ticket),
            copies,
        }
    }

    /// Starts an admitted write, punch or copy-up.
    fn start(&mut self, tag: u64, op: Op, bits: Range<u64>, reg: Reg, copies: Vec<u64>) {
        if !copies.is_empty() {
            self.copy_up(tag, copies, Then { op, bits, reg });
            return;
        }
        match op {
            Op::Write { sector, iov } => self.write(tag, sector, iov, bits, reg),
            Op::Discard { sector, nsect } | Op::WriteZeroes { sector, nsect, .. } => {
                self.punch(tag, sector, nsect, bits, reg);
            }
            _ => {
                self.release(reg);
                self.fail(tag, libc::EIO);
            }
        }
    }

    /// Reads the backing's content of COW sectors `copies` (seed 000:
    /// this request was elected to copy them).
    fn copy_up(&mut self, tag: u64, copies: Vec<u64>, then: Then) {
        let shared = self.shared.clone();
        let g = &shared.file.geometry;
        let len = g.sectorsize as usize;
        let key = self.new_slot(
            tag,
            Stage::CopyRead {
                held: copies.clone(),
                copies: Vec::new(),
                then,
            },
        );
        for &c in &copies {
            let whole = g.sectors_of(c..c.saturating_add(1));
            let n = usize::try_from(
                sectors_to_bytes(whole.end.saturating_sub(whole.start)).unwrap_or(0),
            )
            .unwrap_or(0);
            let mut ret = None;
            let op = crate::engine::AlignedBuf::new(len).and_then(|buf| {
                let (iov, r) = IoVecs::from_buf(buf, n);
                ret = Some(r);
                IoOp::rw(
                    IoKind::Read,
                    self.backing_fd,
                    sectors_to_bytes(whole.start).ok_or_else(eio)?,
                    iov,
                    shared.file.backing_direct,
                    key as u64,
                )
            });
            self.push(key, op);
            if let (Some(r), Some(Stage::CopyRead { copies, .. })) = (ret, self.core.stage_mut(key))
            {
                copies.push((c, r));
            }
        }
        if shared.backing_changed.load(Ordering::Acquire) {
            self.push(key, Err(eio()));
        }
        self.settle(key);
    }

    fn write(&mut self, tag: u64, sector: u64, iov: IoVecs, bits: Range<u64>, reg: Reg) {
        let shared = self.shared.clone();
        let file = &shared.file;
        // Data writes go through Linux AIO with `--aio native` (see
        // `AioMode`): a first write lands in a hole of the COW file and
        // must allocate; a rewrite completes sooner than through io_uring.
        let aio = file.direct && shared.opts.aio == crate::disk::AioMode::Native;
        let key = self.new_slot(tag, Stage::Data { bits, reg });
        let op = IoOp::rw(
            IoKind::Write { dsync: false },
            self.data_fd,
            file.geometry.data_pos(sector),
            iov,
            file.direct,
            key as u64,
        )
        .map(|op| if aio { op.via_aio() } else { op });
        self.push(key, op);
        self.settle(key);
    }

    fn punch(&mut self, tag: u64, sector: u64, nsect: u64, bits: Range<u64>, reg: Reg) {
        let (Some(_), Some(len)) = (sector.checked_add(nsect), sectors_to_bytes(nsect)) else {
            self.release(reg);
            self.fail(tag, libc::EIO);
            return;
        };
        let key = self.new_slot(tag, Stage::Data { bits, reg });
        let pos = self.shared.file.geometry.data_pos(sector);
        self.core.set_zero_fallback(
            key,
            ZeroFallback {
                fd: self.data_fd,
                pos,
                len,
                direct: self.shared.file.direct,
                dsync: false,
            },
        );
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.push(
            key,
            Ok(IoOp::fallocate(self.data_fd, pos, len, mode, key as u64)),
        );
        self.settle(key);
    }

    /// A write's registration ends (it completed, or failed).
    fn release(&self, reg: Reg) {
        match reg {
            Reg::Fast => {
                self.unregistered.0.fetch_sub(1, Ordering::SeqCst);
            }
            Reg::Ticket(t) => {
                if let Ok(mut s) = self.shared.state.lock() {
                    s.gate.unregister(t);
                    self.opened(&mut s);
                }
            }
        }
    }

    /// Something that held requests back ended: wake the parked ones and
    /// the job (under the state lock).
    fn opened(&self, s: &mut super::state::CowState) {
        if s.gate.parked {
            s.gate.parked = false;
            self.shared.channel.wake_parked();
        }
        if s.gate.job_waits {
            self.shared.job_cv.notify_all();
        }
    }

    /// A request whose operations all landed moves on.
    fn settle(&mut self, key: usize) {
        let Some(l) = self.core.close(key) else {
            return;
        };
        match (l.err, l.stage) {
            (Some(errno), Stage::Data { reg, .. }) => {
                self.release(reg);
                self.fail(l.tag, errno);
            }
            (Some(errno), Stage::CopyRead { held, then, .. }) => {
                self.copy_failed(l.tag, errno, &held, then);
            }
            (Some(errno), Stage::CopyWrite { copies, then }) => {
                self.copy_failed(l.tag, errno, &copies, then);
            }
            (Some(errno), Stage::Read) => self.fail(l.tag, errno),
            (None, Stage::Read) => self.core.complete(l.tag, Ok(())),
            (None, Stage::Data { bits, reg }) => self.data_done(l.tag, bits, reg),
            (None, Stage::CopyRead { copies, then, .. }) => self.copy_read(l.tag, copies, then),
            (None, Stage::CopyWrite { copies, then }) => self.copied(l.tag, &copies, then),
        }
    }

    /// The backing's content is in memory: write it to the COW.
    fn copy_read(&mut self, tag: u64, copies: Vec<(u64, BufReturn)>, then: Then) {
        let shared = self.shared.clone();
        let g = &shared.file.geometry;
        let bits: Vec<u64> = copies.iter().map(|c| c.0).collect();
        let key = self.new_slot(tag, Stage::CopyWrite { copies: bits, then });
        for (c, ret) in copies {
            let whole = g.sectors_of(c..c.saturating_add(1));
            let n = usize::try_from(
                sectors_to_bytes(whole.end.saturating_sub(whole.start)).unwrap_or(0),
            )
            .unwrap_or(0);
            let op = ret.take().ok_or_else(eio).and_then(|buf| {
                let (iov, _) = IoVecs::from_buf(buf, n);
                IoOp::rw(
                    IoKind::Write { dsync: false },
                    self.data_fd,
                    g.data_pos(whole.start),
                    iov,
                    shared.file.direct,
                    key as u64,
                )
            });
            self.push(key, op);
        }
        self.settle(key);
    }

    /// The copied sectors are in the COW: they are read from there now,
    /// the sectors leave the gate, and the write that copied them goes.
    fn copied(&mut self, tag: u64, copies: &[u64], then: Then) {
        let shared = self.shared.clone();
        if let Some(j) = &shared.journal {
            for &c in copies {
                j.record(c..c.saturating_add(1));
            }
        }
        let mut kick = false;
        if let Ok(mut s) = shared.state.lock() {
            for &c in copies {
                s.unpersisted.insert(c..c.saturating_add(1));
                s.gate.release(&(c..c.saturating_add(1)));
            }
            if s.since.is_none() {
                s.since = Some(Instant::now());
                kick = true;
            }
            self.opened(&mut s);
        }
        shared
            .stats
            .copy_ups
            .fetch_add(copies.len() as u64, Ordering::Relaxed);
        if kick {
            shared.channel.send(Cmd::Kick);
        }
        self.start(tag, then.op, then.bits, then.reg, Vec::new());
    }

    /// A copy-up failed: its sectors leave the gate (nothing was marked),
    /// the write fails.
    fn copy_failed(&mut self, tag: u64, errno: i32, copies: &[u64], then: Then) {
        if let Ok(mut s) = self.shared.state.lock() {
            for &c in copies {
                s.gate.release(&(c..c.saturating_add(1)));
            }
            self.opened(&mut s);
        }
        self.release(then.reg);
        self.fail(tag, errno);
    }

    /// The data of a write is in the COW file: record it (R5).
    fn data_done(&mut self, tag: u64, bits: Range<u64>, reg: Reg) {
        let shared = self.shared.clone();
        shared.writes_since_sync.fetch_add(1, Ordering::AcqRel);
        if !shared.writeback.load(Ordering::Acquire) {
            self.at_meta = self.at_meta.saturating_add(1);
            let ranges = if bits.is_empty() {
                Vec::new()
            } else {
                vec![bits]
            };
            // Registered until the bits are set: a copy must not take
            // these sectors for the base's meanwhile.
            self.persisting.push((tag, reg));
            shared.channel.send(Cmd::Persist(
                ranges,
                Reply {
                    mailbox: self.mailbox.clone(),
                    tag,
                },
            ));
            return;
        }
        if !bits.is_empty() {
            // Before the completion is posted: a daemon crash from here on
            // must not lose this write (see `journal`).
            if let Some(j) = &shared.journal {
                j.record(bits.clone());
            }
            let mut kick = false;
            if let Ok(mut s) = shared.state.lock() {
                s.unpersisted.insert(bits);
                if s.since.is_none() {
                    s.since = Some(Instant::now());
                    kick = true;
                }
                if s.unpersisted.len() >= shared.opts.max_pending_extents && !s.checkpoint_requested
                {
                    s.checkpoint_requested = true;
                    kick = true;
                }
                // In the COW and out of the gate under one lock: a copy
                // sees the sectors one way or the other.
                if let Reg::Ticket(t) = reg {
                    s.gate.unregister(t);
                    self.opened(&mut s);
                }
            }
            if kick {
                shared.channel.send(Cmd::Kick);
            }
            if let Reg::Fast = reg {
                self.release(reg);
            }
        } else {
            self.release(reg);
        }
        self.core.complete(tag, Ok(()));
    }
}

/// Runs `(start, end, in_cow)` of a range of COW sectors (bits): a COW
/// sector is in the COW when its bit is set or its completed write awaits
/// its bit.
pub(super) fn route(
    bitmap: &crate::cow::Bitmap,
    unpersisted: &ExtentSet,
    range: Range<u64>,
) -> Vec<(u64, u64, bool)> {
    let extents: Vec<(u64, u64)> = unpersisted.overlapping(range.clone()).collect();
    let mut ext = extents.iter().peekable();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for s in range.clone() {
        while ext.peek().is_some_and(|e| e.1 <= s) {
            ext.next();
        }
        let cow = bitmap.test(s) || ext.peek().is_some_and(|e| e.0 <= s);
        // A run lasts until the next one starts, the last one to the end.
        if out.last().is_none_or(|last| last.2 != cow) {
            if let Some(last) = out.last_mut() {
                last.1 = s;
            }
            out.push((s, range.end, cow));
        }
    }
    out
}

/// The memory of sectors `run` of a read of `iov` at `sector`.
fn run_part(iov: &IoVecs, sector: u64, run: Range<u64>) -> io::Result<IoVecs> {
    let from = run.start.checked_sub(sector).and_then(sectors_to_bytes);
    let len = run.end.checked_sub(run.start).and_then(sectors_to_bytes);
    match (from, len) {
        (Some(from), Some(len)) => Ok(iov.slice(from, len)),
        _ => Err(eio()),
    }
}

impl DiskQueue for CowQueue {
    fn submit(&mut self, req: Request) -> Submitted {
        if self.shared.closed.load(Ordering::Acquire) {
            self.fail(req.tag, libc::ESHUTDOWN);
            return Submitted::Queued;
        }
        if let Err(e) = check_request(&req.op, &self.shared.info) {
            self.fail(req.tag, e);
            return Submitted::Queued;
        }
        if req.op.is_write() {
            if let Some((sector, nsect)) = req.op.sectors() {
                let limit = self.shared.file.geometry.bitmap_sectors();
                let end = sector.checked_add(nsect);
                if end.is_none_or(|end| self.shared.file.geometry.bits_of(sector..end).end > limit)
                {
                    log::warn!(
                        "{}: sectors from {} on have no bit in this {} bitmap; write refused",
                        self.shared.info.path.display(),
                        limit << self.shift,
                        self.shared.file.header.version.name()
                    );
                    self.fail(req.tag, libc::EIO);
                    return Submitted::Queued;
                }
            }
        }
        match req.op {
            Op::Read { sector, iov } => return self.read(req.tag, sector, iov),
            Op::Flush => {
                self.at_meta = self.at_meta.saturating_add(1);
                self.shared.channel.send(Cmd::Flush(Reply {
                    mailbox: self.mailbox.clone(),
                    tag: req.tag,
                }));
            }
            Op::Discard { nsect: 0, .. } | Op::WriteZeroes { nsect: 0, .. } => {
                self.core.complete(req.tag, Ok(()));
            }
            op => {
                let Some((sector, nsect)) = op.sectors() else {
                    self.fail(req.tag, libc::EIO);
                    return Submitted::Queued;
                };
                let Some(end) = sector.checked_add(nsect) else {
                    self.fail(req.tag, libc::EIO);
                    return Submitted::Queued;
                };
                match self.admit(sector, end) {
                    Admit::Park => return Submitted::Again(Request { op, tag: req.tag }),
                    Admit::Go { bits, reg, copies } => self.start(req.tag, op, bits, reg, copies),
                }
            }
        }
        Submitted::Queued
    }

    fn commit(&mut self) -> std::io::Result<()> {
        self.core.commit()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        let keys = self.core.reap();
        for &key in &keys {
            self.settle(key);
        }
        self.core.recycle(keys);
        self.core.drain_done(out);
        let before = out.len();
        let n = self.mailbox.take(out);
        self.at_meta = self.at_meta.saturating_sub(n);
        if !self.persisting.is_empty() {
            for c in out.get(before..).unwrap_or_default() {
                if let Some(i) = self.persisting.iter().position(|p| p.0 == c.tag) {
                    let (_, reg) = self.persisting.swap_remove(i);
                    self.release(reg);
                }
            }
        }
        self.mailbox.take_retry()
    }

    fn event_fd(&self) -> RawFd {
        self.core.event_fd()
    }

    fn wait(&self, timeout: Option<Duration>) {
        self.core.wait(timeout);
    }

    fn in_flight(&self) -> usize {
        self.core.len().saturating_add(self.at_meta)
    }
}
